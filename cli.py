"""Entry point: ``python cli.py fit --config configs/quickstart.yaml`` (see ``python cli.py --help``)."""
import sys
from pathlib import Path

# Python puts this script's folder, the repository root, first on sys.path. There our kernels/ folder (installed as
# lit_lowrank.kernels) would be found as the top-level `kernels`, shadowing Hugging Face's kernel hub package that
# transformers and bitsandbytes import (`from kernels import get_kernel`). lit_lowrank itself is installed.
_ROOT = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]

try:
    from lit_lowrank.cli import main
except ModuleNotFoundError as error:
    if error.name != "lit_lowrank":
        raise
    sys.exit("error: lit_lowrank is not installed in this Python. HINT: run `pip install -e .` in the repository root.")

if __name__ == "__main__":
    main()
