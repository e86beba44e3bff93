"""Log the exact bytes of optimizer state and the peak memory of the device."""
from __future__ import annotations

import resource
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_lowrank.callbacks.skipped_steps import skipped_steps
from lit_lowrank.optim.sharding import is_sharded
from lit_lowrank.optim.state import tensor_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` on this process (a DTensor counts its local shard).

    Optimizers with a ``state_bytes()`` method (LoRAPro, LoRAPreAdamW, LoRAPreMuon) report it themselves (the same
    count: :func:`lit_lowrank.optim.state.tensor_bytes` of every state tensor).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(10, 10))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones_like(p); opt.step()
        >>> optimizer_state_bytes(opt)  # one fp32 momentum buffer of 100 elements
        400
    """
    if hasattr(optimizer, "state_bytes"):
        report = optimizer.state_bytes()
        return int(getattr(report, "total", report))
    return sum(tensor_bytes(value) for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class OptimizerStateMonitor(Callback):
    """Log ``optimizer/state_bytes`` (exact, summed over ranks under sharding), ``memory/peak_bytes`` and
    ``optimizer/skipped_steps`` (updates the optimizers skipped for non-finite gradients, where they count them).

    Values go straight to the loggers as integers (``self.log`` would round them to float32).

    Args:
        every_n_steps: logging interval in optimizer steps; default: the trainer's ``log_every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.last: dict[str, int] = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        interval = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step == 0 or step % interval and not trainer.is_last_batch:
            return
        local = sum(optimizer_state_bytes(opt) for opt in trainer.optimizers)
        total = int(trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64, device=pl_module.device),
                                            reduce_op="sum")) if is_sharded(trainer) else local
        self.last = {"optimizer/state_bytes": total, "optimizer/state_bytes_per_rank": local,
                     "memory/peak_bytes": peak_memory_bytes(pl_module.device),
                     "optimizer/skipped_steps": skipped_steps(trainer)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(self.last), step=step)
