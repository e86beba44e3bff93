"""``fit|validate|test --ckpt_path`` with an empty, truncated or foreign file: one message naming the file, what is
wrong and the fix (another checkpoint of the folder), exit status 2, no traceback."""
import pickle
import re
from fractions import Fraction

import pytest
import torch
from cli_runs import SHORT, override, tiny_quickstart

from lit_lowrank.checkpoint_io import AtomicCheckpointIO, DamagedCheckpointError
from lit_lowrank.cli import LowRankCLI
from lit_lowrank.cli import main as cli_main

DAMAGE = {
    "empty": (lambda good: b"", "the file is empty (0 bytes)"),
    "truncated": (lambda good: good[:len(good) // 2], "the file is cut short"),
    "text": (lambda good: b"not a checkpoint\n", "it is not a PyTorch checkpoint"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step quickstart run: its folder and the bytes of its best checkpoint."""
    tmp = tmp_path_factory.mktemp("damaged")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        cli = LowRankCLI(args=["fit", *tiny_quickstart(tmp), *SHORT, "--test_after_fit=false"])
    return tmp, (tmp / cli.trainer.checkpoint_callback.best_model_path).read_bytes()


# every damage for fit; evaluation reads the file on the same path, so one each
@pytest.mark.parametrize(("damage", "subcommand"), [*((damage, "fit") for damage in sorted(DAMAGE)),
                                                    ("truncated", "validate"), ("empty", "test")])
def test_damaged_checkpoint_is_named_with_the_fix(trained, damage, subcommand, monkeypatch, capsys):
    tmp, good = trained
    make, what = DAMAGE[damage]
    folder = tmp / "checkpoints"
    folder.mkdir(exist_ok=True)
    (folder / "epoch=0-step=1.ckpt").write_bytes(good)
    bad = folder / "epoch=0-step=2.ckpt"
    bad.write_bytes(make(good))
    monkeypatch.chdir(tmp)
    with pytest.raises(SystemExit) as done:
        cli_main([subcommand, *tiny_quickstart(tmp), *SHORT, "--ckpt_path", str(bad)])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert f"error: checkpoint {bad} is damaged: {what}" in err, err
    hint = f"HINT: use another checkpoint, e.g. an earlier one in the same folder ({folder}): epoch=0-step=1.ckpt."
    assert hint in err and "Traceback" not in err and "mmap" not in err


def test_a_file_without_a_checkpoint_dict_is_named(trained, monkeypatch, capsys):
    tmp, _ = trained
    tensor = tmp / "tensor.ckpt"
    torch.save(torch.zeros(2), tensor)
    monkeypatch.chdir(tmp)
    with pytest.raises(SystemExit) as done:
        cli_main(["validate", *tiny_quickstart(tmp), *SHORT, "--ckpt_path", str(tensor)])
    assert done.value.code == 2
    assert f"error: checkpoint {tensor} is not a Lightning checkpoint: it holds a Tensor" in capsys.readouterr().err


def test_the_intact_checkpoint_passes(trained, monkeypatch, capsys):
    tmp, good = trained
    path = tmp / "intact.ckpt"
    path.write_bytes(good)
    monkeypatch.chdir(tmp)
    cli_main(["validate", *tiny_quickstart(tmp), *SHORT, "--ckpt_path", str(path)])
    assert "damaged" not in capsys.readouterr().err


def test_a_damaged_last_ckpt_found_by_lightning_is_named(trained, monkeypatch, capsys):
    # --ckpt_path last: Lightning finds the file and loads it through the CLI's CheckpointIO, inside fit
    tmp, good = trained
    folder = tmp / "by-name"
    folder.mkdir()
    (folder / "epoch=0-step=2.ckpt").write_bytes(good)
    (folder / "last.ckpt").write_bytes(good[:1000])
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(folder), "save_last": True}}
    monkeypatch.chdir(tmp)
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *tiny_quickstart(tmp), *override(tmp, trainer={"callbacks": [checkpoint]}), *SHORT,
                  "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert f"error: checkpoint {folder / 'last.ckpt'} is damaged: the file is cut short" in err, err
    assert "epoch=0-step=2.ckpt" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_checkpoint_io_says_damaged_when_lightning_loads_it(trained, damage, tmp_path):
    # what a resume by name (--ckpt_path last / best) reads: Lightning resolves the path, the CheckpointIO loads it
    make, what = DAMAGE[damage]
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(make(trained[1]))
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"checkpoint {bad} is damaged: {what}")):
        AtomicCheckpointIO().load_checkpoint(bad)


def test_a_checkpoint_refused_by_weights_only_is_not_called_damaged(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "hyper_parameters": {"ratio": Fraction(1, 3)}}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["hyper_parameters"]["ratio"] == Fraction(1, 3)
