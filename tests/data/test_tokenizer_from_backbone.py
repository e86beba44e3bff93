"""The text data modules tokenise with the tokenizer of the model's backbone unless told otherwise; a tokenizer named
explicitly must give the same ids (vocabulary, special tokens, chat template), else setup stops with both names.
Issue 23, item 1: a 135M Llama trained silently on MiniLM's ids when `data.tokenizer` was left out."""
import json

import lightning as L
import pytest
import torch

from lit_lowrank.backbones import Backbone, open_clip_backbone, transformers_backbone
from lit_lowrank.data import (
    ByteTokenizer,
    ImageTextDataModule,
    InstructionDataModule,
    TextBlocksDataModule,
    TextClassificationDataModule,
)
from lit_lowrank.data.common import DEFAULT_TOKENIZER, load_tokenizer
from lit_lowrank.data.tokenizer_match import tokenizer_differences
from lit_lowrank.tasks import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["[UNK]", "[PAD]", "[EOS]", "what", "is", "plus", "one", "two", "three", "#", "###", "instruction", "response",
         ":", "?", "the", "answer"]


def word_tokenizer(folder=None):
    """A word-level tokenizer with 17 ids: nothing like MiniLM's 30,522 WordPiece ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")
    if folder is not None:
        tokenizer.save_pretrained(folder)
        tokenizer = load_tokenizer(str(folder))
    return tokenizer


def tiny_llama(vocab: int = 32):
    return transformers_backbone(config=dict(model_type="llama", hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
                                             max_position_embeddings=64), tokenizer=False).model


def instruction_data(tmp_path, **options):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"what is {a} plus one ?", "response": f"the answer is {b}"}
            for a, b in [("one", "two"), ("two", "three")] * 4]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return InstructionDataModule(str(path), val_file=str(path), batch_size=4, max_length=32, **options)


def fit_one_step(task, dm):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)


def test_instruction_data_takes_the_backbones_tokenizer_under_a_plain_trainer(tmp_path):
    own = word_tokenizer(tmp_path / "words")
    task = CausalLMTask(Backbone(tiny_llama(), "all-linear", tokenizer=own))
    dm = instruction_data(tmp_path)
    fit_one_step(task, dm)  # with MiniLM's ids (up to 30521) the 32-row embedding would stop it
    assert dm.tokenizer is own
    example = dm.examples["train"][0]
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    # independent: the word tokenizer's own ids of the response, then its EOS
    response = "the answer is two" if "two" in own.decode(supervised) else "the answer is three"
    assert supervised == own(response, add_special_tokens=False)["input_ids"] + [own.eos_token_id]


def test_without_a_model_the_bundled_minilm_is_the_documented_fallback(tmp_path):
    dm = instruction_data(tmp_path)
    dm.setup("fit")
    assert dm.tokenizer.name_or_path == load_tokenizer(DEFAULT_TOKENIZER).name_or_path
    # use_model: the backbone's tokenizer without a Trainer
    own = word_tokenizer()
    taken = instruction_data(tmp_path).use_model(Backbone(tiny_llama(), [], tokenizer=own))
    taken.setup("fit")
    assert taken.tokenizer is own and max(max(e.input_ids) for e in taken.examples["train"]) < len(WORDS)


def test_an_explicit_tokenizer_other_than_the_backbones_stops_with_both_names(tmp_path):
    task = CausalLMTask(Backbone(tiny_llama(), [], tokenizer=word_tokenizer(tmp_path / "words")))
    dm = instruction_data(tmp_path, tokenizer=DEFAULT_TOKENIZER)
    with pytest.raises(ValueError, match=r"data\.init_args\.tokenizer='sentence-transformers/all-MiniLM-L6-v2' is not "
                                         rf"the tokenizer of the model's backbone \('{tmp_path / 'words'}'\): "
                                         r"vocabulary 30522 vs 17 tokens.*HINT: leave data\.init_args\.tokenizer "
                                         r"unset.*backbone\.init_args\.tokenizer: 'sentence"):
        fit_one_step(task, dm)


def test_an_explicit_tokenizer_equal_to_the_backbones_is_accepted(tmp_path):
    # Compared by content: the same tokenizer saved to another folder is the same tokenizer.
    word_tokenizer(tmp_path / "copy")
    backbone = Backbone(tiny_llama(), [], tokenizer=word_tokenizer(tmp_path / "words"))
    dm = instruction_data(tmp_path, tokenizer=str(tmp_path / "copy"))
    dm.use_model(backbone).setup("fit")
    assert dm.tokenizer is not backbone.tokenizer and dm.vocab_size == len(WORDS)


def test_chat_templates_and_special_tokens_are_part_of_the_comparison(tmp_path):
    plain, chat, other_eos = word_tokenizer(), word_tokenizer(), word_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    other_eos.eos_token = "###"
    assert tokenizer_differences(plain, word_tokenizer()) == []
    assert tokenizer_differences(plain, chat) == ["chat template: none vs one"]
    (special,) = tokenizer_differences(plain, other_eos)
    assert special.startswith("special token ids differ (all special tokens") and "eos 2 vs 10" in special
    assert tokenizer_differences(ByteTokenizer(), plain) == ["a byte tokenizer vs a transformers tokenizer"]


def test_text_blocks_and_classification_follow_the_backbone_too(tmp_path):
    (tmp_path / "a.txt").write_text("what is one plus one ? the answer is two . " * 30)
    own = word_tokenizer()
    backbone = Backbone(tiny_llama(), [], tokenizer=own)
    blocks = TextBlocksDataModule(str(tmp_path / "a.txt"), block_size=8, val_fraction=0.2).use_model(backbone)
    blocks.setup("fit")
    expected = own("what is one plus one ?", add_special_tokens=False)["input_ids"]
    assert blocks.train_blocks.flatten()[:6].tolist() == expected and blocks.vocab_size == len(WORDS)
    with pytest.raises(ValueError, match=r"tokenizer='bytes' is not the tokenizer.*a byte tokenizer vs a transformers"):
        TextBlocksDataModule(str(tmp_path / "a.txt"), tokenizer="bytes").use_model(backbone).setup("fit")
    (tmp_path / "t.csv").write_text("text,label\n" + "what is one,a\nthe answer,b\n" * 5)
    csv = str(tmp_path / "t.csv")
    labelled = TextClassificationDataModule(csv, val_file=csv, batch_size=2).use_model(backbone)
    labelled.setup("fit")
    assert labelled.tokenizer is own and labelled.vocab_size == len(WORDS)


def test_setup_with_the_fallback_before_meeting_the_model_stops(tmp_path):
    dm = instruction_data(tmp_path)
    dm.setup("fit")  # MiniLM's ids
    task = CausalLMTask(Backbone(tiny_llama(), [], tokenizer=word_tokenizer()))
    with pytest.raises(RuntimeError, match=r"was set up with the tokenizer 'sentence-transformers/all-MiniLM-L6-v2' "
                                           r"before it met its model.*HINT: let the Trainer call setup"):
        fit_one_step(task, dm)


def test_a_pretrained_model_without_its_tokenizer_stops_instead_of_reading_minilm_ids(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    task = CausalLMTask(transformers_backbone(str(tmp_path / "llama"), tokenizer=False))
    dm = instruction_data(tmp_path)
    with pytest.raises(ValueError, match=rf"loaded pretrained from '{tmp_path / 'llama'}', but its backbone has no "
                                         r"tokenizer \(tokenizer: false\).*HINT: drop `tokenizer: false`"):
        fit_one_step(task, dm)


def test_image_text_takes_the_clip_backbones_tokenizer_and_context_length(tmp_path):
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), color=(60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n0.png,a red square\n1.png,a black square\n")
    clip = open_clip_backbone(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1,
                                                           head_width=8),
                              text_cfg=dict(context_length=12, width=16, heads=2, layers=1))
    pairs = str(tmp_path / "pairs.csv")
    dm = ImageTextDataModule(pairs, batch_size=2).use_model(clip)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader() if "test" in dm.datasets else dm.train_dataloader()))
    assert dm.tokenizer is clip.tokenizer and batch["texts"].shape == (2, 12)  # the fallback would give 77
    assert torch.equal(batch["texts"], clip.tokenizer(["a red square", "a black square"]))
    assert batch["images"].shape == (2, 3, 16, 16)  # the backbone's size, not open_clip's default 224
    with pytest.raises(ValueError, match=r"context_length=77, but the model's text tower takes 12 tokens"):
        ImageTextDataModule(pairs, context_length=77).use_model(clip).setup("test")
    with pytest.raises(ValueError, match=r"tokenizer='ViT-B-32' is not the tokenizer.*context length 77 vs 12"):
        ImageTextDataModule(pairs, tokenizer="ViT-B-32").use_model(clip).setup("test")


def test_the_fallback_is_accepted_when_it_is_the_pretrained_models_own(tmp_path):
    # The old recipes' way (MiniLM loaded with tokenizer: false, the data module's MiniLM default) still runs.
    minilm = transformers_backbone(DEFAULT_TOKENIZER, auto_class="AutoModel", tokenizer=False)
    (tmp_path / "t.csv").write_text("text,label\n" + "a good film,pos\na bad film,neg\n" * 5)
    csv = str(tmp_path / "t.csv")
    dm = TextClassificationDataModule(csv, val_file=csv).use_model(minilm)
    dm.setup("fit")
    assert dm.vocab_size == 30522 and dm.tokenizer.name_or_path == load_tokenizer(DEFAULT_TOKENIZER).name_or_path
