"""LoRAPro(mode="full") on a small adapter chain, sharded with ``fully_shard`` over 2 CPU processes (gloo).

Run by test_lora_pro_sharded.py as a script (it spawns the ranks):  python lora_pro_sharded_run.py --out DIR
Each rank trains STEPS steps and writes ``rank{k}.pt``: the full parameters, its local state tensors, its state
bytes and skipped steps. After STEPS - 1 steps every rank also saves a distributed checkpoint (model and optimizer),
then a fresh model and optimizer load it and take the last step again ("resumed" parameters).
The single-process reference in the test imports ``build`` and ``train`` from here.
"""
import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.optim import LoRAPro

WORLD, STEPS, NAN_STEP, BATCH = 2, 4, 2, 8
#: Widths of the rank-3 chain: 10-row layers split 5 + 5 (two of them share a batch), 5 rows split 3 + 2.
WIDTHS = (6, 10, 10, 10, 5)
POISONED = "0.2"  # its lora_A gradient gets a NaN at NAN_STEP: the layer must be skipped on every rank


def chain(widths, r: int, head: bool) -> nn.Module:
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    if head:  # trained by LoRAPro's AdamW group
        layers.append(nn.Linear(widths[-1], 3))
    targets = [str(2 * i) for i in range(len(widths) - 1)]
    return inject_lora(nn.Sequential(*layers), LoRAConfig(r=r, alpha=2.0 * r, target_modules=targets,
                                                          modules_to_save=[str(len(layers) - 1)] if head else None))


def build() -> nn.Module:
    torch.manual_seed(0)
    # A 1-row layer (rank 1 holds none of its rows) allows only r = 1, so it gets its own adapter config.
    model = nn.Sequential(chain(WIDTHS, r=3, head=False), chain((WIDTHS[-1], 1), r=1, head=True))
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.normal_(std=0.3)  # B = 0 would leave the first Grams degenerate
    return model


def make_optimizer(model: nn.Module, use_triton: bool = False) -> LoRAPro:
    return LoRAPro(model, lr=1e-2, mode="full", weight_decay=0.1, max_grad_norm=1.0, use_triton=use_triton)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, WIDTHS[0], generator=generator), torch.randn(BATCH, 3, generator=generator)


def train(model: nn.Module, optimizer: LoRAPro, steps, rank: int = 0, world: int = 1) -> None:
    """Each rank takes its equal slice of every global batch, so averaged gradients are the global batch's."""
    for step in steps:
        x, y = (t.chunk(world)[rank] for t in data(step))
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        if step == NAN_STEP:
            grad = model.get_submodule(POISONED).lora_A.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if rank == 0:  # the rank holding row 0
                local[0, 0] = float("nan")
        optimizer.step()


def full_parameters(model: nn.Module) -> dict:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def sharded(use_triton: bool) -> tuple[nn.Module, LoRAPro]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model, make_optimizer(model, use_triton)


def state_record(model: nn.Module, optimizer: LoRAPro) -> list[dict]:
    """Every state tensor this rank holds: its parameter, key, local and global shapes."""
    names = {p: name for name, p in model.named_parameters()}
    return [{"param": names[p], "key": key, "local": tuple(getattr(v, "_local_tensor", v).shape),
             "global": tuple(v.shape), "sharded": hasattr(v, "to_local")}
            for p, state in optimizer.state.items() for key, v in state.items() if torch.is_tensor(v)]


def count_kernel_launches() -> list:
    """Make any fallback to torch an error and record the row count of every fused-kernel launch."""
    import warnings

    from lit_lowrank.kernels import lora_pro_full
    from lit_lowrank.kernels.dispatch import KernelFallbackWarning

    warnings.simplefilter("error", KernelFallbackWarning)
    launches, launch = [], lora_pro_full.moments_and_projections

    def counted(A, B_t, *args, **kwargs):
        launches.append(B_t.shape[-1])
        return launch(A, B_t, *args, **kwargs)

    lora_pro_full.moments_and_projections = counted
    return launches


def worker(rank: int, port: int, out: str, use_triton: bool) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lit_lowrank.callbacks.optimizer_state import optimizer_state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    launches = count_kernel_launches() if use_triton else []
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, optimizer = sharded(use_triton)
        train(model, optimizer, range(STEPS - 1), rank, WORLD)
        checkpoint = os.path.join(out, "checkpoint")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
        train(model, optimizer, [STEPS - 1], rank, WORLD)
        fresh, fresh_optimizer = sharded(use_triton)
        model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint)
        set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        train(fresh, fresh_optimizer, [STEPS - 1], rank, WORLD)
        torch.save({"straight": full_parameters(model), "resumed": full_parameters(fresh),
                    "state": state_record(model, optimizer), "state_bytes": optimizer_state_bytes(optimizer),
                    "skipped_steps": optimizer.skipped_steps(),
                    "resumed_skipped_steps": fresh_optimizer.skipped_steps(),
                    "kernel_launches": launches},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--triton", action="store_true", help="the fused kernel on each rank's rows (interpreter)")
    args = parser.parse_args()
    if args.triton:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported, in the spawned ranks too
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), args.out, args.triton), nprocs=WORLD)


if __name__ == "__main__":
    main()
