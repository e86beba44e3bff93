"""A configured value that a data module finds unusable at setup (here an image size the model cannot take) ends the
CLI run as one ``error:`` line with exit status 2, like a parse error, not as a traceback."""
import pytest
from cli_runs import CONFIGS, SHORT, override

from lit_lowrank.cli import main as cli_main

TINY_DIGITS_VIT = {"model_kwargs": {"patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}}


def test_an_image_size_the_model_cannot_take_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "digits_vit_lora_pre_muon.yaml"), *override(tmp_path, TINY_DIGITS_VIT),
            *SHORT, "--data.init_args.image_size=16"]
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error: data.init_args.image_size=16, but 'vit_tiny_patch16_224' takes 32x32 images only" in err
    assert "HINT: leave data.init_args.image_size unset" in err and "Traceback" not in err

