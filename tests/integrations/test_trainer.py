"""transformers' Trainer with LoRA-Pre as a custom optimizer: it trains, and a run resumed from a checkpoint ends
bitwise where the uninterrupted run ends."""
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

STEPS, SAVE_AT = 6, 3

OPTIMIZERS = {
    "adamw": lambda model, seed: LoRAPreAdamW(model, lr=1e-2, rank=4, seed=seed),
    "muon": lambda model, seed: LoRAPreMuon(model, lr=0.02, rank=4, seed=seed),
}


class Tokens(torch.utils.data.Dataset):
    """Counting sequences from random starts: learnable in a few steps."""

    def __init__(self):
        starts = torch.randint(0, 125, (24, 1), generator=torch.Generator().manual_seed(5))
        self.ids = (starts + torch.arange(12)) % 125 + 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _train(output_dir, optimizer_name, init_seed, resume_from=None):
    torch.manual_seed(init_seed)
    model = tiny_llama()
    optimizer = OPTIMIZERS[optimizer_name](model, init_seed)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, scheduler))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def _loss(model):
    ids = Tokens().ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_trainer_trains_and_resumes_bitwise(tmp_path, optimizer_name):
    full = _train(tmp_path / "full", optimizer_name, init_seed=0)
    torch.manual_seed(0)
    untrained = tiny_llama()
    assert _loss(full.model) < _loss(untrained) - 0.1

    # Another initial model and factor seed: everything the resumed run ends with comes from the checkpoint.
    resumed = _train(tmp_path / "resumed", optimizer_name, init_seed=1,
                     resume_from=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    assert resumed.state.global_step == STEPS
    expected = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()


def _docs_example(heading):
    """The Python block under ``## heading`` in docs/integrations.md."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", page, re.S).group(1)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_docs_example("transformers' Trainer"), "docs/integrations.md", "exec"), {})
    assert (tmp_path / "trainer_run" / "checkpoint-8" / "optimizer.pt").is_file()
