"""Train a tiny Llama for a few steps with each optimizer under one strategy; rank 0 saves the parameters and
every rank its optimizer state (bytes logged by OptimizerStateMonitor, shapes of its state tensors).

Run by tests/lightning/test_distributed.py as a script (Lightning's DDP and ModelParallel launchers re-execute
the script for every rank):  python distributed_run.py --strategy fsdp --methods adamw,lora_pro_full --out DIR
``--resume METHODS`` also trains those for ``--steps`` one-batch epochs straight, and for one epoch less then
resumed from the epoch-end checkpoint (Lightning's own, a distributed checkpoint under FSDP2).
"""
import argparse
import functools
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.callbacks import AdapterExport, OptimizerStateMonitor
from lit_lowrank.tasks import CausalLMTask

GLOBAL_BATCH, LENGTH, VOCAB = 8, 16, 64
TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def methods():
    from lit_lowrank import optim

    lora = LoRAConfig(r=4, alpha=8, target_modules="default")
    table = {
        "adamw": (lora, functools.partial(torch.optim.AdamW, lr=1e-2)),
        "lora_pro_efficient": (lora, functools.partial(optim.LoRAPro, lr=1e-2, mode="efficient")),
        "lora_pro_full": (lora, functools.partial(optim.LoRAPro, lr=1e-2, mode="full")),
    }
    if hasattr(optim, "LoRAPreAdamW"):
        # The spec's second moment holds almost nothing of earlier gradients in the first steps, so an entry whose
        # current gradient is ~0 moves by ~m/eps: rounding differences between 1 and 2 processes (the order of
        # gradient averaging) then become O(lr) parameter differences. The debiased warm-up keeps v at Adam's scale.
        table["lora_pre_adam"] = (None, functools.partial(optim.LoRAPreAdamW, lr=1e-2, rank=4,
                                                          debias_second_moment=True))
        table["lora_pre_muon"] = (None, functools.partial(optim.LoRAPreMuon, lr=1e-2, rank=4))
    return table


def strategy(name: str):
    if name == "single":
        return "auto", 1
    if name == "ddp":
        return "ddp", 2
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 2


class FixedOrderData(L.LightningDataModule):
    """Rank r takes samples r, r + W, ... in order, so each global batch equals the single-process batch
    (Lightning's own distributed sampler shuffles training data)."""

    def __init__(self, data: list) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def full_parameters(module: torch.nn.Module) -> dict:
    out = {}
    for name, param in module.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 shards are DTensors
        out[name] = value.detach().float().cpu().contiguous()
    return out


def state_shapes(task: L.LightningModule, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every tensor of this rank's optimizer state: its parameter, key, local (this rank's) and global shape."""
    names = {p: name for name, p in task.model.named_parameters()}
    return [{"param": names[p], "key": key, "global": list(value.shape),
             "local": list((value.to_local() if hasattr(value, "to_local") else value).shape)}
            for p, state in optimizer.state.items() for key, value in state.items() if torch.is_tensor(value)]


def make_task(method: str) -> CausalLMTask:
    lora, optimizer = methods()[method]
    L.seed_everything(0, verbose=False)
    return CausalLMTask(transformers_backbone(config=TINY_LLAMA, tokenizer=False), lora=lora, optimizer=optimizer)


def fit(args, task: CausalLMTask, data: list, steps: int, callbacks=(), ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(strategy=strategy(args.strategy)[0], accelerator="cpu", devices=strategy(args.strategy)[1],
                        max_steps=steps, logger=False, enable_checkpointing=any(
                            isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=list(callbacks))
    trainer.fit(task, datamodule=FixedOrderData(data), ckpt_path=ckpt_path)
    return trainer


def save_parameters(trainer: L.Trainer, params: dict, path: str, **metadata: str) -> None:
    if trainer.is_global_zero:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(params, path, metadata=metadata or None)


def resume(args, method: str, data: list) -> None:
    """One-batch epochs, so the checkpoint at an epoch end is where the uninterrupted run stands (Lightning
    restarts a plain DataLoader's epoch from its first batch)."""
    where = Path(args.out) / f"{args.strategy}-{method}-checkpoints"
    one_batch = data[:GLOBAL_BATCH]
    for name, steps, checkpoints, ckpt_path in [
        ("straight", args.steps, [], None),
        ("stopped", args.steps - 1, [ModelCheckpoint(where, "{epoch}", save_top_k=-1)], None),
        ("resumed", args.steps, [], where / f"epoch={args.steps - 2}.ckpt"),
    ]:
        task = make_task(method)
        trainer = fit(args, task, one_batch, steps, callbacks=checkpoints, ckpt_path=ckpt_path)
        save_parameters(trainer, full_parameters(task.model),
                        os.path.join(args.out, f"{args.strategy}-{method}-{name}.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--resume", default="", help="methods to check a resume with, comma-separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH * args.steps, LENGTH), generator=torch.Generator().manual_seed(7))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    for method in args.methods.split(","):
        lora, _ = methods()[method]
        task = make_task(method)
        if args.strategy == "single":  # the starting point, to check that training moved the parameters
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_file(full_parameters(task.model), os.path.join(args.out, f"initial-{method}.safetensors"))
        # With adapters, also export them at the end of fit: under FSDP2 every rank must join the gather.
        export = [AdapterExport(dirpath=os.path.join(args.out, f"{args.strategy}-{method}-adapter"))] if lora else []
        monitor = OptimizerStateMonitor(every_n_steps=1)
        trainer = fit(args, task, data, args.steps, callbacks=[*export, monitor])
        params = full_parameters(task.model)
        sharded = sum(hasattr(p, "full_tensor") for p in task.model.parameters())
        save_parameters(trainer, params, os.path.join(args.out, f"{args.strategy}-{method}.safetensors"),
                        sharded_parameters=str(sharded))
        report = {**monitor.last, "state": state_shapes(task, trainer.optimizers[0])}
        Path(args.out, f"{args.strategy}-{method}-rank{trainer.global_rank}.json").write_text(json.dumps(report))
    for method in filter(None, args.resume.split(",")):
        resume(args, method, data)


if __name__ == "__main__":
    main()
