"""Two ranks build the same adapted tiny Llama; rank 0 exports it unsharded, then both shard it with FSDP2
(``fully_shard`` per block, then the root) and export it again, every rank taking part in the gathers.
Run by test_export_fsdp.py:  torchrun --nproc_per_node 2 fsdp_export_run.py OUT"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import tiny_llama  # noqa: E402

from lit_lowrank import LoRAConfig, export_merged, inject_lora  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = inject_lora(tiny_llama(), LoRAConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    if dist.get_rank() == 0:
        export_merged(model, out / "single")
    dist.barrier()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.model.layers[0].self_attn.q_proj.lora_A).__name__ == "DTensor"
    export_merged(model, out / "sharded")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
