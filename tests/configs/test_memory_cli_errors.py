"""``lit-lowrank memory --config FILE`` with a file that is no model config: one line naming the file and what is
wrong in it, exit status 2, no traceback."""
import pytest

from lit_lowrank.cli import main as cli_main

CASES = {
    "JSON array": (b'[{"model_type": "llama"}]', "holds an array, not a JSON object"),
    "JSON string": (b'"llama-2-7b"', "holds a string, not a JSON object"),
    "not JSON": (b"model_type: llama\n", "is not JSON (JSONDecodeError: Expecting value"),
    "empty": (b"", "is empty"),
    "binary": (b"\x80\x02\x8a\x0a", "is not JSON (UnicodeDecodeError"),
    "no model_type": (b'{"hidden_size": 64}', "config dict without 'model_type'"),
    "wrong value type": (b'{"model_type": "llama", "hidden_size": "big"}', "transformers cannot build a model config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_file_is_named_with_what_is_wrong(case, tmp_path, capsys):
    content, what = CASES[case]
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--config", str(path), "--methods", "adamw", "--world-size", "1"])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith(f"error: config file {path}: {what}"), err
    assert "HINT:" in err and "Traceback" not in err


def test_a_good_file_after_a_known_name_still_works(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, '
                    '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}')
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--config", "llama-2-7b", str(path), "--methods", "adamw", "--world-size", "1"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "### llama-2-7b" in out and f"### {path}" in out
