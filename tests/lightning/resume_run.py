"""Fit a tiny Llama on the embedded corpus with each optimizer: uninterrupted, or stopped after one epoch and
resumed from its checkpoint in a new process. Run by test_resume.py; writes parameters and per-step losses.

    python resume_run.py --phase {straight,first,resume} --methods adamw,lora_pre_adam --out DIR
"""
import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from distributed_run import full_parameters, methods
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.data import TextBlocksDataModule
from lit_lowrank.tasks import CausalLMTask

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=30522, max_position_embeddings=64, tie_word_embeddings=True)


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["straight", "first", "resume"], required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    for method in args.methods.split(","):
        lora, optimizer = methods()[method]
        L.seed_everything(0, verbose=False)
        task = CausalLMTask(transformers_backbone(config=TINY_LLAMA, tokenizer=False), lora=lora, optimizer=optimizer)
        data = TextBlocksDataModule(source="python", block_size=16, batch_size=4, max_train_blocks=8, max_val_blocks=4)
        losses = StepLosses()
        checkpoint = ModelCheckpoint(dirpath=out / args.phase / method, save_last=True, save_top_k=0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1 if args.phase == "first" else 2, logger=False,
                            callbacks=[losses, checkpoint], enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, deterministic=True)
        trainer.fit(task, datamodule=data, ckpt_path=out / "first" / method / "last.ckpt" if args.phase == "resume" else None)
        save_file(full_parameters(task.model), out / f"{args.phase}-{method}.safetensors")
        (out / f"{args.phase}-{method}.json").write_text(json.dumps(losses.losses))


if __name__ == "__main__":
    main()
