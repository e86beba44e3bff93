"""InstructionDataModule: which tokens are supervised (plain and chat templates), truncation, bad rows with file:line,
packing, splits, predict prompts, a compacted vocabulary and the Hugging Face path (on local files)."""
import json

import pytest
import torch

from lit_lowrank.data import InstructionDataModule
from lit_lowrank.data.chat_format import IGNORE_INDEX, PLAIN_USER
from lit_lowrank.data.common import DEFAULT_TOKENIZER, load_tokenizer

TOKENIZER = load_tokenizer(DEFAULT_TOKENIZER)
SEP = TOKENIZER.sep_token_id


def ids(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def module(tmp_path, rows, **kwargs):
    kwargs.setdefault("val_file", write_jsonl(tmp_path / "val.jsonl", [{"prompt": "v", "response": "w"}]))
    dm = InstructionDataModule(write_jsonl(tmp_path / "train.jsonl", rows), **kwargs)
    dm.setup("fit")
    return dm


def test_plain_template_supervises_exactly_the_response_and_eos(tmp_path):
    dm = module(tmp_path, [{"prompt": "Add 2 and 3.", "response": "#### 5"}], system_prompt="Be brief.")
    (example,) = dm.examples["train"]
    prompt = ids("Be brief.\n\n") + ids(PLAIN_USER.format(content="Add 2 and 3."))
    response = ids("#### 5") + [SEP]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response
    assert list(example.prompt.ids) == prompt and example.prompt.reference == "#### 5"
    assert example.prompt.reference_decoded == "# # # # 5"  # as the uncased WordPiece renders it


def test_padding_is_masked_and_unsupervised(tmp_path):
    rows = [{"prompt": "short", "response": "a"}, {"prompt": "a much longer prompt than the other", "response": "b"}]
    dm = module(tmp_path, rows, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == sorted(len(e.input_ids) for e in dm.examples["train"])
    assert batch["input_ids"].shape[1] == max(lengths)  # padded to the longest of the batch only
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %} [MASK]{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}[CLS] assistant : {% endif %}")


def test_chat_template_supervises_every_assistant_turn_and_its_end_marker(tmp_path):
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tok")
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"}]
    dm = module(tmp_path, [{"messages": chat}], tokenizer=str(tmp_path / "tok"),
                test_file=write_jsonl(tmp_path / "test.jsonl", [{"messages": chat}]))
    (example,) = dm.examples["test"]
    supervised = TOKENIZER.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert supervised == "hello [MASK] see you [MASK]"
    unsupervised = TOKENIZER.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert unsupervised == "[CLS] system : be kind [CLS] user : hi [CLS] assistant : [CLS] user : bye [CLS] assistant :"
    assert TOKENIZER.decode(example.prompt.ids).endswith("bye [CLS] assistant :")
    assert dm.codec.stop_token_ids == sorted([SEP, TOKENIZER.mask_token_id])  # EOS and the template's end of turn


def test_chat_template_that_is_not_prefix_consistent_is_refused(tmp_path):
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {{ messages|length }} {% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="HINT: set template='plain'"):
        module(tmp_path, [{"prompt": "a", "response": "b"}], tokenizer=str(tmp_path / "tok"))
    plain = module(tmp_path, [{"prompt": "a", "response": "b"}], tokenizer=str(tmp_path / "tok"), template="plain")
    assert plain.examples["train"][0].labels[-2:] == ids("b") + [SEP]


def test_a_long_prompt_loses_its_oldest_tokens_and_the_response_stays_whole(tmp_path):
    prompt = " ".join(f"w{i}" for i in range(60))
    dm = module(tmp_path, [{"prompt": prompt, "response": "the answer"}], max_length=24)
    (example,) = dm.examples["train"]
    full_prompt = ids(PLAIN_USER.format(content=prompt))
    response = ids("the answer") + [SEP]
    assert len(example.input_ids) == 24 and example.truncated == "prompt"
    assert example.input_ids == full_prompt[-(24 - len(response)):] + response
    assert example.labels[-len(response):] == response


def test_a_long_response_keeps_a_quarter_for_the_prompt_and_loses_its_end_and_eos(tmp_path):
    response = " ".join(f"r{i}" for i in range(60))
    with pytest.warns(UserWarning, match=r"1 of 1 train examples are longer than max_length=32: 0 .* 1 had"):
        dm = module(tmp_path, [{"prompt": "tell me a long story please now", "response": response}], max_length=32)
    (example,) = dm.examples["train"]
    full_prompt = ids(PLAIN_USER.format(content="tell me a long story please now"))
    assert example.truncated == "response" and len(example.input_ids) == 32
    assert example.input_ids[:8] == full_prompt[-8:]  # 32 // 4 prompt tokens, the newest
    assert example.labels[8:] == ids(response)[:24] and SEP not in example.labels


def test_bad_rows_are_reported_with_file_and_line_and_counted(tmp_path):
    rows = [{"prompt": "ok", "response": "fine"},
            "{not json",
            {"prompt": "no response here"},
            {"prompt": "empty", "response": "   "},
            {"prompt": 7, "response": "seven"},
            "",
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
            {"prompt": "also ok", "response": "good"}]
    path = tmp_path / "train.jsonl"
    with pytest.warns(UserWarning) as caught:
        dm = module(tmp_path, rows)
    message = str([w for w in caught if "not usable" in str(w.message)][0].message)
    assert f"6 of 8 rows of {path} are not usable examples" in message
    for line, reason in [(2, "not valid JSON"), (3, "no 'response' value"), (4, "'response' is empty"),
                         (5, "'prompt' is 7 (int), expected text"),
                         (7, "'messages' ends with a user message: there is no response to learn"),
                         (8, "'messages'[0] is not a message with a role")]:
        assert f"{path}:{line}: {reason}" in message, (line, message)
    assert "(2 examples kept)" in message and len(dm.bad_rows) == 6
    assert [e.prompt.text for e in dm.examples["train"]] == ["ok", "also ok"]
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        module(tmp_path, rows, bad_rows="error")


def test_csv_rows_report_their_first_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,response\n"two\nline prompt",yes\nfine,\nextra,cells,here\nlast,one\n')
    dm = InstructionDataModule(str(path), val_file=str(path), bad_rows="warn")
    with pytest.warns(UserWarning,
                      match=rf"(?s){path}:4: 'response' is empty.*{path}:5: has 3 cells, the header has 2"):
        dm.setup("fit")
    assert [e.prompt.text for e in dm.examples["train"]] == ["two\nline prompt", "last"]


def test_wrong_field_names_are_one_clear_error(tmp_path):
    with pytest.raises(KeyError, match=r"its fields: \['answer', 'question'\]\).*HINT: set prompt_field="):
        module(tmp_path, [{"question": "q", "answer": "a"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"question": "v", "answer": "w"}])
    dm = module(tmp_path, [{"question": "q", "answer": "a"}], prompt_field="question", response_field="answer",
                val_file=val)
    assert dm.examples["train"][0].prompt.reference == "a"


def test_validation_is_held_out_by_content_when_no_file_is_given(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(60)]
    dm = module(tmp_path, rows, val_file=None, val_fraction=0.25)
    again = module(tmp_path, list(reversed(rows)), val_file=None, val_fraction=0.25)
    train = {e.prompt.text for e in dm.examples["train"]}
    val = {e.prompt.text for e in dm.examples["validation"]}
    assert not train & val and len(train | val) == 60 and 5 < len(val) < 25
    assert val == {e.prompt.text for e in again.examples["validation"]}  # the order of rows does not matter


def test_evaluation_and_predict_batches_carry_prompts_and_references(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl",
                       [{"prompt": "one", "response": "1"}, {"prompt": "two words", "response": "2"}])
    predict = write_jsonl(tmp_path / "predict.jsonl", [{"prompt": "three"}, {"prompt": "four", "response": "4"}])
    dm = module(tmp_path, [{"prompt": "a", "response": "b"}], test_file=test, predict_file=predict, batch_size=2)
    batch = next(iter(dm.test_dataloader()))
    assert batch["references"] == ["1", "2"] and batch["prompts"] == ["one", "two words"]
    prompt_lengths = [len(e.prompt.ids) for e in dm.examples["test"]]
    assert batch["prompt_attention_mask"].sum(1).tolist() == prompt_lengths
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()  # left-padded: every prompt ends in the last column
    predicted = next(iter(dm.predict_dataloader()))
    assert predicted["prompts"] == ["three", "four"] and predicted["references"] == [None, "4"]
    assert "labels" not in predicted


def test_packing_isolates_examples_exactly(tmp_path):
    from tiny_models import tiny_llama

    rows = [{"prompt": f"question number {i}", "response": f"answer {i} " * (i % 3 + 1)} for i in range(6)]
    packed = module(tmp_path, rows, packing=True, max_length=40, batch_size=8)
    plain = module(tmp_path, rows, batch_size=8)
    model = tiny_llama(vocab_size=len(TOKENIZER)).eval()
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape[0] < 6 and batch["attention_mask"].shape[1] == 1  # fewer rows, a 4D mask
    unpacked = next(iter(plain.train_dataloader()))
    with torch.no_grad():
        packed_loss = model(**batch).loss
        unpacked_loss = model(**unpacked).loss
    assert torch.allclose(packed_loss, unpacked_loss, atol=1e-5)  # the same tokens, the same predictions


def test_a_compacted_vocabulary_maps_ids_and_refuses_one_without_eos(tmp_path):
    words = ["[UNK]", "[SEP]", "#", "###", "instruction", "response", ":", "the", "answer", "is"]
    kept = TOKENIZER.convert_tokens_to_ids(words)
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(kept))
    dm = module(tmp_path, [{"prompt": "what is the answer", "response": "the answer is"}], vocabulary=str(vocabulary))
    (example,) = dm.examples["train"]
    assert dm.vocab_size == 10 and max(example.input_ids) < 10
    assert dm.codec.decode([t for t, label in zip(example.input_ids, example.labels)
                            if label != -100]) == "the answer is"
    vocabulary.write_text(json.dumps(TOKENIZER.convert_tokens_to_ids(["[UNK]", "the"])))
    with pytest.raises(ValueError, match="has no id for its EOS token"):
        module(tmp_path, [{"prompt": "a", "response": "b"}], vocabulary=str(vocabulary))


def test_a_huggingface_dataset_folder_is_read_with_row_locations(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(30)])
    write_jsonl(folder / "test.jsonl", [{"question": "q", "answer": ""}, {"question": "q2", "answer": "#### 2"}])
    dm = InstructionDataModule(hf_dataset=str(folder), prompt_field="question", response_field="answer")
    with pytest.warns(UserWarning, match=rf"{folder}/test row 0: 'answer' is empty"):
        dm.setup("fit")
    assert len(dm.examples["train"]) + len(dm.examples["validation"]) == 30 and len(dm.examples["test"]) == 1


def test_docstring_instructions_take_the_classification_tasks_fractions():
    """``fractions`` as in DocstringClassificationDataModule: the same paragraphs in the same splits, and a larger
    test share only adds test paragraphs (a paragraph's split is fixed by its text)."""
    from lit_lowrank.data import DocstringInstructionDataModule
    from lit_lowrank.data.corpus import docstring_classification

    def questions(examples):
        return [example.messages[-2].content.split("\n\n", 1)[1] for example in examples]

    fractions = (0.5, 0.08, 0.42)
    chats = DocstringInstructionDataModule(cap_per_class=10**9, fractions=fractions).read_examples()
    task = docstring_classification(cap_per_class=10**9, fractions=fractions)
    assert questions(chats["test"]) == [example.text for example in task.test] and len(chats["test"]) >= 1000
    default = DocstringInstructionDataModule(cap_per_class=10**9).read_examples()
    assert set(questions(default["test"])) <= set(questions(chats["test"]))
    with pytest.raises(ValueError, match="fractions"):
        DocstringInstructionDataModule(fractions=(0.5, 0.5, 0.5)).read_examples()
