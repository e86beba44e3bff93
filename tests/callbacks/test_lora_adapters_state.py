"""LoRAAdapters.load_state_dict: the inverse of state_dict, through a real checkpoint too, and its errors."""
import dataclasses

import lightning as L
import pytest
from tiny_lightning import Regressor, regression_loader

from lit_lowrank import LoRAConfig
from lit_lowrank.callbacks import LoRAAdapters

CONFIG = LoRAConfig(r=2, alpha=4, target_modules=["0", "2"], exclude_modules=None, modules_to_save=["4"])


def _fit(root, callback, ckpt_path=None, steps=4):  # 4 steps: one epoch
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                        default_root_dir=root, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Regressor(), regression_loader(), ckpt_path=ckpt_path)
    return trainer


def test_a_fresh_callback_takes_back_what_state_dict_returned():
    original = LoRAAdapters(CONFIG, attribute="net")
    restored = LoRAAdapters(LoRAConfig())
    restored.load_state_dict(original.state_dict())
    assert (restored.config, restored.attribute) == (CONFIG, "net")
    assert restored.state_dict() == original.state_dict()


def test_resuming_from_a_checkpoint_restores_and_checks_the_settings(tmp_path):
    trainer = _fit(tmp_path / "first", LoRAAdapters(CONFIG))
    checkpoint = tmp_path / "first.ckpt"
    trainer.save_checkpoint(checkpoint)
    # Same settings (dropout may change: it neither shapes nor scales the weights): resumes.
    resumed = LoRAAdapters(dataclasses.replace(CONFIG, dropout=0.1))
    assert _fit(tmp_path / "resumed", resumed, ckpt_path=checkpoint, steps=8).global_step == 8
    # Another alpha loads the weights without a shape error, but they were trained at another scale: refused.
    other_alpha = LoRAAdapters(dataclasses.replace(CONFIG, alpha=8))
    with pytest.raises(ValueError, match=r"config\.alpha: saved 4(\.0)?, this callback 8(\.0)?.*HINT"):
        _fit(tmp_path / "other_alpha", other_alpha, ckpt_path=checkpoint, steps=8)


def test_a_callback_that_injected_refuses_other_shapes_naming_the_keys():
    callback = LoRAAdapters(CONFIG)
    callback.setup(None, Regressor(), "fit")
    saved = LoRAAdapters(dataclasses.replace(CONFIG, r=4), attribute="net").state_dict()
    expected = r"config\.r: saved 4, this callback 2; attribute: saved 'net', this callback None"
    with pytest.raises(ValueError, match=expected):
        callback.load_state_dict(saved)
    assert callback.config == CONFIG  # unchanged


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("attribute"), r"missing keys \['attribute'\], unexpected keys \[\]"),
    (lambda state: state.update(extra=1), r"missing keys \[\], unexpected keys \['extra'\]"),
    (lambda state: state["config"].pop("r"), r"missing keys \['config\.r'\]"),
    (lambda state: state["config"].update(rank=2), r"unexpected keys \['config\.rank'\]"),
    (lambda state: state.update(config=[1, 2]), r"expects \{'config'"),
    (lambda state: state.update(attribute=3), r"'attribute' must be a module name or None, got 3"),
])
def test_malformed_states_are_refused_naming_the_key(edit, message):
    state = LoRAAdapters(CONFIG).state_dict()
    edit(state)
    callback = LoRAAdapters(CONFIG)
    with pytest.raises(ValueError, match=message):
        callback.load_state_dict(state)
    assert callback.config is CONFIG
