"""Skip a test, with the actual error, where bitsandbytes' 4/8-bit layers cannot run (not installed, no kernel for
this CPU/GPU): ``require_bnb(4)`` runs one quantized Linear forward and backward first."""
import pytest
import torch
from torch import nn


def require_bnb(bits: int) -> None:
    try:
        import bitsandbytes as bnb

        if bits == 4:
            layer = bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
        layer.load_state_dict(nn.Linear(16, 8).state_dict())
        layer = layer.to("cpu")  # bitsandbytes quantizes when the layer is moved to a device
        x = torch.randn(2, 16, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), "no finite input gradient"
    except Exception as error:  # any failure means: this machine cannot run the layers
        pytest.skip(f"bitsandbytes {bits}-bit layers do not run here ({type(error).__name__}: {error})")


def quantized_llama(directory, bits: int):
    """The tiny Llama saved in ``directory``, loaded by transformers with bitsandbytes at ``bits`` bits."""
    from transformers import AutoModelForCausalLM

    config = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"} if bits == 4 else {"load_in_8bit": True}
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config)


def matmul_tolerance(bits: int) -> float:
    """How far a dense copy's outputs may be from the quantized model's: 8-bit matmuls also round the activations,
    and on CPUs with AVX512-BF16 bitsandbytes computes 4-bit matmuls in bfloat16 whatever the compute dtype."""
    if bits == 8:
        return 2e-2
    try:
        from bitsandbytes.backends.cpu.ops import has_avx512bf16
    except ImportError:
        return 1e-5
    return 2e-2 if has_avx512bf16() else 1e-5


#: Smallest hidden size for tiny quantized models: bitsandbytes' CPU 4-bit inference (AVX512-BF16 machines) packs
#: weights in blocks of 64 inputs and fails on narrower layers.
QUANTIZED_HIDDEN = 64
