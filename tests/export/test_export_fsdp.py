"""Under FSDP2 every rank calls export_merged: the sharded adapters and weights are gathered and rank 0 writes
exactly the merged model a single process writes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_exit import finished
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("fsdp_export_run.py")


@pytest.mark.slow
def test_a_sharded_model_exports_what_a_single_process_exports(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT),
                             str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert finished(result), result.stderr[-6000:]
    single = load_file(tmp_path / "single" / "model.safetensors")
    sharded = load_file(tmp_path / "sharded" / "model.safetensors")
    assert single.keys() == sharded.keys() and not any("lora" in key for key in sharded)
    for key, tensor in single.items():
        assert torch.equal(sharded[key], tensor), key
