"""Resuming with LoRAAdapters at another rank: the callback's error, naming both ranks and the fix, comes before
torch's size mismatch (Lightning loads the model's weights before it restores callbacks)."""
import lightning as L
import pytest
from tiny_lightning import Regressor, regression_loader

from lit_lowrank import LoRAConfig
from lit_lowrank.callbacks import LoRAAdapters


def _trainer(root, rank, steps):
    callback = LoRAAdapters(LoRAConfig(r=rank, target_modules=["0", "2"]), attribute="net")
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                     default_root_dir=root, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


@pytest.fixture
def rank_2_checkpoint(tmp_path):
    trainer = _trainer(tmp_path / "first", rank=2, steps=4)
    trainer.fit(Regressor(), regression_loader())
    trainer.save_checkpoint(tmp_path / "rank2.ckpt")
    return tmp_path / "rank2.ckpt"


EXPECTED = (r"checkpoint's adapters have rank 2 \(net\.0\.lora_A: 2 x 4\), this callback's have rank 4 "
            r"\(LoRAConfig\(r=4\)\).*HINT: use LoRAAdapters\(LoRAConfig\(r=2, \.\.\.\)\).*without ckpt_path")


def test_fit_resumed_at_another_rank_names_both_ranks(tmp_path, rank_2_checkpoint):
    module = Regressor()
    with pytest.raises(ValueError, match=EXPECTED):  # torch's size mismatch is a RuntimeError
        _trainer(tmp_path / "resumed", rank=4, steps=8).fit(module, regression_loader(), ckpt_path=rank_2_checkpoint)
    # The check is gone with the trainer: a later load_state_dict meets torch's own rules again.
    assert not module._load_state_dict_pre_hooks


def test_test_from_a_checkpoint_of_another_rank_too(tmp_path, rank_2_checkpoint):
    with pytest.raises(ValueError, match=EXPECTED):
        trainer = _trainer(tmp_path / "tested", rank=4, steps=8)
        trainer.test(Regressor(), regression_loader(), ckpt_path=rank_2_checkpoint)


def test_the_same_rank_resumes(tmp_path, rank_2_checkpoint):
    trainer = _trainer(tmp_path / "resumed", rank=2, steps=8)
    trainer.fit(Regressor(), regression_loader(), ckpt_path=rank_2_checkpoint)
    assert trainer.global_step == 8
