"""CausalLMTask generates (EOS, stop strings, left padding), scores answers by exact match after a regex, evaluates
on supervised tokens only, writes generations as JSONL, reports the test split before fit, loads initial weights."""
import json

import lightning as L
import pytest
import torch
from tiny_models import tiny_llama
from transformers import GenerationConfig

from lit_lowrank.backbones import Backbone
from lit_lowrank.data import InstructionDataModule
from lit_lowrank.data.codec import TokenCodec
from lit_lowrank.data.common import DEFAULT_TOKENIZER, load_tokenizer
from lit_lowrank.tasks import CausalLMTask
from lit_lowrank.tasks.generation import (
    GSM8K_ANSWER,
    GSM8K_ANSWER_SPACED,
    GenerationOptions,
    StopOnStrings,
    extract_answer,
    generate_texts,
    is_exact_match,
)

TOKENIZER = load_tokenizer(DEFAULT_TOKENIZER)
WORDS = ["[UNK]", "[SEP]", "[PAD]"] + ("the a cat dog sat ran on in mat hat big small red blue one two three four "
                                       "five six seven eight nine ten # instruction response :").split()
KEPT = TOKENIZER.convert_tokens_to_ids(WORDS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def trainer(root, **kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root), **kwargs}
    return L.Trainer(**kwargs)


def task(**kwargs) -> CausalLMTask:
    torch.manual_seed(0)
    return CausalLMTask(Backbone(tiny_llama(vocab_size=len(KEPT))), **kwargs)


def vocabulary(tmp_path, kept=KEPT) -> str:
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(kept))
    return str(path)


def prompts(codec, texts):
    from lit_lowrank.data.prompts import Prompt, PromptCollator

    return PromptCollator(codec.pad_token_id)([Prompt(codec.encode(t), t) for t in texts])


def test_generation_stops_at_eos_and_at_stop_strings_and_left_padding_changes_nothing():
    model = tiny_llama(vocab_size=len(KEPT)).eval()
    codec = TokenCodec(TOKENIZER, KEPT)
    batch = prompts(codec, ["the cat sat on the mat", "a dog"])
    options = GenerationOptions(max_new_tokens=10)
    free = generate_texts(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], options, codec)
    alone = generate_texts(model, batch["prompt_input_ids"][1:, -2:], batch["prompt_attention_mask"][1:, -2:],
                           options, codec)
    assert alone[0] == free[1]  # the same continuation with or without padding on its left
    words = free[0].split()
    stop = words[3]  # a word the free generation reaches after three others
    stopped = generate_texts(model, batch["prompt_input_ids"][:1], batch["prompt_attention_mask"][:1],
                             GenerationOptions(max_new_tokens=10, stop=(stop,)), codec)
    assert stopped[0] == free[0][: free[0].index(stop)]
    raw = model.generate(input_ids=batch["prompt_input_ids"][:1], attention_mask=batch["prompt_attention_mask"][:1],
                         generation_config=GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0)
                         )[0, batch["prompt_input_ids"].shape[1]:].tolist()  # no EOS: all ten tokens
    k = next(i for i in range(1, len(raw)) if raw[i] not in raw[:i])  # a token first generated at position k
    swapped = list(KEPT)
    swapped[raw[k]], swapped[1] = TOKENIZER.sep_token_id, KEPT[raw[k]]  # that token is now the EOS token
    eos_codec = TokenCodec(TOKENIZER, swapped)
    cut = generate_texts(model, batch["prompt_input_ids"][:1], batch["prompt_attention_mask"][:1], options, eos_codec)
    assert cut[0] == eos_codec.decode(raw[:k]) and k >= 1


def test_stop_on_strings_marks_only_the_rows_that_reached_one():
    codec = TokenCodec(TOKENIZER, KEPT)
    rows = torch.tensor([[5, 6] + codec.encode("the red cat"), [5, 6] + codec.encode("a blue dog")])
    assert StopOnStrings(["red cat"], codec, prompt_width=2)(rows).tolist() == [True, False]
    assert StopOnStrings(["red cat"], codec, prompt_width=4)(rows).tolist() == [False, False]  # only new tokens count


@pytest.mark.parametrize("generation, reference, pattern, expected", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "#### 72", GSM8K_ANSWER, True),
    ("#### 1,080", "She earns 1080 dollars.\n#### 1080", GSM8K_ANSWER, True),
    ("#### -3.5", "#### -3.5", GSM8K_ANSWER, True),
    ("#### 71", "#### 72", GSM8K_ANSWER, False),
    ("The answer is 72", "#### 72", GSM8K_ANSWER, False),  # no answer line: no answer
    ("# # # # 72", "# # # # 72", GSM8K_ANSWER_SPACED, True),
    ("  Paris. ", "Paris", None, True),
    ("Paris is nice", "Paris", None, False),
    ("#### asyncio", "#### asyncio", r"####\s*(\w+)", True),
])
def test_exact_match_after_answer_extraction(generation, reference, pattern, expected):
    assert is_exact_match(generation, reference, pattern) is expected


def test_extracted_answers():
    assert extract_answer("so 5 + 7 = 12\n#### 12", GSM8K_ANSWER) == "12"
    assert extract_answer("#### 12 apples", r"####") == "####"  # no group: the whole match
    assert extract_answer("nothing", GSM8K_ANSWER) is None and extract_answer(None, None) is None


def instruction_files(tmp_path, responses):
    rows = [{"prompt": f"the {w} cat", "response": r} for w, r in zip(["big", "small", "red", "blue"], responses)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data(tmp_path, responses, **kwargs):
    path = instruction_files(tmp_path, responses)
    return InstructionDataModule(path, val_file=path, test_file=path, vocabulary=vocabulary(tmp_path), batch_size=2,
                                 max_length=32, **kwargs)


def test_exact_match_is_the_share_of_references_the_model_generates(tmp_path):
    probe = data(tmp_path, ["one"] * 4)
    probe.setup("fit")
    model_task = task(exact_match=True, max_new_tokens=4)
    model_task.model.eval()
    generated = []
    for batch in probe.val_dataloader():
        generated += generate_texts(model_task.model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                    model_task.generation, probe.codec)
    # Two references are what the model generates, two are not: exact match must be 1/2.
    responses = [generated[0], "nine ten", generated[2], "ten nine"]
    dm = data(tmp_path, responses)
    result = trainer(tmp_path).validate(model_task, datamodule=dm, verbose=False)[0]
    assert result["val/exact_match"] == pytest.approx(0.5)


def test_validation_loss_covers_response_tokens_only(tmp_path):
    dm = data(tmp_path, ["one two", "three", "four five six", "seven"])
    model_task = task()
    result = trainer(tmp_path).validate(model_task, datamodule=dm, verbose=False)[0]
    total, count = 0.0, 0
    model_task.model.eval()
    with torch.no_grad():
        for example in dm.examples["validation"]:
            ids = torch.tensor([example.input_ids])
            logits = model_task.model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert count == sum(len(dm.codec.encode(r)) + 1 for r in ["one two", "three", "four five six", "seven"])
    assert result["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert "val/exact_match" not in result  # off unless asked for


def test_predict_writes_prompt_generation_and_answer_as_jsonl(tmp_path, capsys):
    dm = data(tmp_path, ["#### one", "#### two", "#### three", "#### four"])
    model_task = task(max_new_tokens=3, answer_pattern=r"#\s*#\s*#\s*#\s*(\w+)")
    returned = trainer(tmp_path).predict(model_task, datamodule=dm)
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows] == [
        "the big cat", "the small cat", "the red cat", "the blue cat"]
    assert [r["generation"] for r in rows] == [r["generation"] for batch in returned for r in batch]
    assert [r["reference_answer"] for r in rows] == ["one", "two", "three", "four"]
    assert all(set(r) == {"index", "prompt", "generation", "answer", "reference", "reference_answer", "correct"}
               for r in rows)
    printed = capsys.readouterr().out
    assert f"Generations (4 rows) written to {(tmp_path / 'generations.jsonl').resolve()}; exact match " in printed


def test_test_before_fit_reports_the_initial_weights_and_leaves_training_unchanged(tmp_path, capsys):
    def run(before):
        dm = data(tmp_path, ["one", "two", "three", "four"])
        model_task = task(exact_match=True, test_before_fit=before, max_new_tokens=2)
        fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
        fit.fit(model_task, datamodule=dm)
        return model_task

    plain, reported = run(False), run(True)
    assert torch.equal(plain.model.lm_head.weight, reported.model.lm_head.weight)  # same training with the report
    initial = task(exact_match=True, max_new_tokens=2)
    tested = trainer(tmp_path).test(initial, datamodule=data(tmp_path, ["one", "two", "three", "four"]),
                                    verbose=False)[0]
    assert reported.before_fit_metrics["before_fit/test/loss"] == pytest.approx(tested["test/loss"], rel=1e-5)
    assert reported.before_fit_metrics["before_fit/test/exact_match"] == tested["test/exact_match"]
    assert "Test split before fine-tuning (initial weights):" in capsys.readouterr().out
    trainer(tmp_path).test(reported, datamodule=data(tmp_path, ["one", "two", "three", "four"]), verbose=False)
    assert "Test split, before fine-tuning -> after:\n  test/exact_match" in capsys.readouterr().out


def test_initial_weights_come_from_a_checkpoint_and_must_fit(tmp_path):
    source = task()
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=True)
    fit.fit(source, datamodule=data(tmp_path, ["one", "two", "three", "four"]))
    path = tmp_path / "source.ckpt"
    fit.save_checkpoint(path)
    from lit_lowrank.adapters import LoRAConfig

    loaded = CausalLMTask(Backbone(tiny_llama(vocab_size=len(KEPT))), init_weights=str(path),
                          lora=LoRAConfig(r=2, target_modules=["q_proj"]))
    assert torch.equal(loaded.model.lm_head.weight, source.model.lm_head.weight)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                       source.model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError,
                       match=r"does not fit the model: other shape: \['lm_head.weight \(31, 32\) vs \(64, 32\)'"):
        CausalLMTask(Backbone(tiny_llama(vocab_size=64)), init_weights=str(path))
    with pytest.raises(FileNotFoundError, match="HINT: run the pre-training step first"):
        CausalLMTask(Backbone(tiny_llama(vocab_size=64)), init_weights=str(tmp_path / "missing.ckpt"))
