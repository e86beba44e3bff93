"""Fit a tiny Llama with dropout on the embedded corpus, per case (an optimizer, maybe with loader workers):
uninterrupted; stopped after 3 of 4 steps, checkpointing every step and every epoch; or resumed in a new process
from three of those checkpoints (mid-epoch 0, end of epoch 0, mid-epoch 1). Run by test_resume.py; writes
parameters and per-step losses.

    python resume_run.py --phase {straight,first,resume} --cases adamw,lora_pre_adam --out DIR
"""
import argparse
import dataclasses
import json
from pathlib import Path

import lightning as L
from distributed_run import full_parameters, methods
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.data import TextBlocksDataModule
from lit_lowrank.tasks import CausalLMTask

# Dropout everywhere it can be (attention, LoRA input): resumes must replay the same masks.
TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=30522, max_position_embeddings=64, tie_word_embeddings=True,
                  attention_dropout=0.2)
#: case -> (optimizer of distributed_run.methods(), DataLoader workers)
CASES = {**{name: (name, 0) for name in ["adamw", "lora_pro_efficient", "lora_pro_full", "lora_pre_adam",
                                         "lora_pre_muon"]}, "lora_pro_full_workers": ("lora_pro_full", 1)}
#: resume point -> checkpoint written by the "first" phase (two steps per epoch)
POINTS = {"mid0": "steps/step=1.ckpt", "end0": "epochs/epoch=0.ckpt", "mid1": "steps/step=3.ckpt"}


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(case: str, out: Path, name: str, ckpt_path=None, max_steps: int = -1, checkpoints=()) -> None:
    method, workers = CASES[case]
    lora, optimizer = methods()[method]
    lora = dataclasses.replace(lora, dropout=0.2) if lora else None
    L.seed_everything(0, verbose=False)
    task = CausalLMTask(transformers_backbone(config=TINY_LLAMA, tokenizer=False), lora=lora, optimizer=optimizer)
    data = TextBlocksDataModule(source="python", block_size=16, batch_size=4, max_train_blocks=8, max_val_blocks=4,
                                num_workers=workers)
    losses = StepLosses()
    # Validation and its sanity check stay on: they run between loading a checkpoint and the next batch.
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, max_steps=max_steps, logger=False,
                        callbacks=[losses, *checkpoints], enable_checkpointing=bool(checkpoints),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        deterministic=True)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    save_file(full_parameters(task.model), out / f"{name}-{case}.safetensors")
    (out / f"{name}-{case}.json").write_text(json.dumps(losses.losses))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["straight", "first", "resume"], required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    for case in args.cases.split(","):
        if args.phase == "straight":
            fit(case, out, "straight")
        elif args.phase == "first":
            where = out / "first" / case
            checkpoints = [ModelCheckpoint(where / "steps", "{step}", every_n_train_steps=1, save_top_k=-1),
                           ModelCheckpoint(where / "epochs", "{epoch}", save_top_k=-1)]
            fit(case, out, "first", max_steps=3, checkpoints=checkpoints)
        else:
            for point, ckpt in POINTS.items():
                fit(case, out, f"resume-{point}", ckpt_path=out / "first" / case / ckpt)


if __name__ == "__main__":
    main()
