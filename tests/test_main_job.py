"""README command 1, cut down: the quickstart recipe with the real bundled MiniLM for a few steps, end to end,
then ``cli.py test`` on its best checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = ["--trainer.max_steps=3", "--trainer.max_epochs=1", "--trainer.limit_val_batches=2",
             "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
             "--data.init_args.cap_per_class=10"]
pytestmark = pytest.mark.slow


def _cli(tmp_path, *args):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout + result.stderr


def test_quickstart_fit_then_test(tmp_path):
    output = _cli(tmp_path, "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *FEW_STEPS)
    run = tmp_path / "runs" / "quickstart" / "version_0"
    for artefact in ("metrics.csv", "metrics.png", "config.yaml", "adapter/final/adapter_config.json",
                     "adapter/final/adapter_model.safetensors", "adapter/best/adapter_model.safetensors"):
        assert (run / artefact).is_file(), artefact
    assert list((run.parent / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard events missing"
    assert "Held-out (test split) metrics:" in output and "metrics plot (PNG)" in output and "TensorBoard" in output
    accuracy = float(re.search(r"test/acc\s+([0-9.]+)", output.split("Held-out")[1]).group(1))
    best = re.search(r"best checkpoint\s+(\S+)", output).group(1)
    again = _cli(tmp_path, "test", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--ckpt_path", best,
                 *FEW_STEPS)
    assert re.search(r"test/acc\s+\S*\s*([0-9.]+)", again), again[-2000:]
    assert f"{accuracy:.4f}"[:5] in again  # the same held-out accuracy from the saved checkpoint
