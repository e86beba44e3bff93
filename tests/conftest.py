"""Test-wide settings: never touch a model hub, never import the repository root as top-level modules, keep CPU
threads fixed, seed everything."""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory, usually the repository root, first on sys.path. There kernels/
# (installed as lit_lowrank.kernels) would be found as the top-level `kernels` and shadow Hugging Face's kernel hub
# package that transformers and bitsandbytes import. Nothing in the tests imports from the root itself.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds spin-wait stalls when the cores are shared.

    Test modules (tests/optim, tests/tasks) that work on tiny tensors use it for every test:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
