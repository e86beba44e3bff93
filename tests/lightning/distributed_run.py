"""Train a tiny Llama for a few steps with each optimizer under one strategy; rank 0 saves the parameters.

Run by tests/lightning/test_distributed.py as a script (Lightning's DDP and ModelParallel launchers re-execute
the script for every rank):  python distributed_run.py --strategy fsdp --methods adamw,lora_pro_full --out DIR
"""
import argparse
import functools
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.callbacks import AdapterExport
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
        table["lora_pre_adam"] = (None, functools.partial(optim.LoRAPreAdamW, lr=1e-2, rank=4, debias_second_moment=True))
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    world = strategy(args.strategy)[1]
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH * args.steps, LENGTH), generator=torch.Generator().manual_seed(7))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    for method in args.methods.split(","):
        lora, optimizer = methods()[method]
        L.seed_everything(0, verbose=False)
        task = CausalLMTask(transformers_backbone(config=TINY_LLAMA, tokenizer=False), lora=lora, optimizer=optimizer)
        if args.strategy == "single":  # the starting point, to check that training moved the parameters
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_file(full_parameters(task.model), os.path.join(args.out, f"initial-{method}.safetensors"))
        # With adapters, also export them at the end of fit: under FSDP2 every rank must join the gather.
        export = [AdapterExport(dirpath=os.path.join(args.out, f"{args.strategy}-{method}-adapter"))] if lora else []
        trainer = L.Trainer(strategy=strategy(args.strategy)[0], accelerator="cpu", devices=world, max_steps=args.steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, use_distributed_sampler=False, callbacks=export)
        trainer.fit(task, datamodule=FixedOrderData(data))
        params = full_parameters(task.model)
        sharded = sum(hasattr(p, "full_tensor") for p in task.model.parameters())
        if trainer.is_global_zero:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_file(params, os.path.join(args.out, f"{args.strategy}-{method}.safetensors"),
                      metadata={"sharded_parameters": str(sharded)})


if __name__ == "__main__":
    main()
