"""Per-GPU training memory without a GPU: weights, gradients, optimizer state and adapters, for every method.

The model is built on the meta device (shapes, no storage) and each method's real optimizer takes one step on it, so
the state counted is the state that optimizer creates (and its ``state_bytes()`` reports); only GaLore, whose
optional galore-torch has no ``state_bytes()``, is counted by formula. Every tensor is then counted per rank under
DDP (everything replicated) or FSDP2 (``fully_shard``: row shards). ``tests/test_memory.py`` checks the numbers
against real optimizer steps. ``lit-lowrank memory ...``
prints the table (:mod:`lit_lowrank.cli.memory_command`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

METHODS = ("adamw", "lora", "lora_pro_efficient", "lora_pro_full", "lora_pre_adam", "lora_pre_muon", "galore")
STRATEGIES = ("ddp", "fsdp")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

#: LoRA-Pro full mode's m x n Adam moments under FSDP: ``True`` = row shards like the weight, as ``LoRAPro`` keeps
#: them; ``False`` = whole on every rank (LoRAPro before it sharded them). The one place to switch it
#: (``estimate_memory(lora_pro_full_sharded=...)`` overrides it per call).
LORA_PRO_FULL_MOMENTS_SHARDED = True

# Published shapes, written out so that no download is needed (RoPE settings change no parameter shape).
_LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
LLAMA_2_7B = {**_LLAMA, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096}
LLAMA_3_1_8B = {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
                "max_position_embeddings": 131072, "rope_theta": 500000.0}
KNOWN_CONFIGS = {"llama-2-7b": LLAMA_2_7B, "meta-llama/Llama-2-7b-hf": LLAMA_2_7B,
                 "llama-3.1-8b": LLAMA_3_1_8B, "meta-llama/Llama-3.1-8B": LLAMA_3_1_8B}


@dataclass(frozen=True)
class OptimizerState:
    """Bytes of one rank's optimizer-state tensors, by kind (scratch buffers are not state and not counted).

    ``moments``: Adam(W) moments shaped like a parameter (split like it under FSDP). ``factors``: LoRA-Pre's
    factors (left ``p x r`` split by rows under FSDP, right ``r x q`` whole on every rank). ``projected``: GaLore's
    projected moments and projection matrices. ``weight_moments``: LoRA-Pro full mode's moments of the ``m x n``
    equivalent gradient. ``counters``: 0-d step tensors (torch AdamW; LoRA-Pro also counts skipped steps).

    Example:
        >>> OptimizerState(moments=64, counters=8).total
        72
    """

    moments: int = 0
    factors: int = 0
    projected: int = 0
    weight_moments: int = 0
    counters: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held by one rank (rank 0, whose shards are the largest): see :func:`estimate_memory`."""

    method: str
    strategy: str
    world_size: int
    dtype: str
    rank: int
    weights: int
    adapters: int
    gradients: int
    optimizer_state: OptimizerState

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer_state.total


class _Tensor(NamedTuple):
    kind: str  # "weights", "adapters", "gradients" or an OptimizerState field
    shape: tuple
    itemsize: int
    sharded: bool  # FSDP2 splits it by rows (Shard(0)); False: every rank holds all of it

    def bytes_per_rank(self, world_size: int) -> int:
        if not self.shape:
            return self.itemsize
        rows = math.ceil(self.shape[0] / world_size) if self.sharded else self.shape[0]
        return rows * math.prod(self.shape[1:]) * self.itemsize


def estimate_memory(
    config: str | Mapping[str, Any] | Any,
    method: str,
    rank: int = 16,
    world_size: int = 1,
    strategy: str = "ddp",
    dtype: str | torch.dtype = "float32",
    *,
    lora_targets: str | list = "all-linear",
    lora_pro_full_sharded: bool | None = None,
    auto_class: str = "AutoModelForCausalLM",
) -> MemoryEstimate:
    """Bytes per rank for training ``config``'s model with ``method``; activations are **not** included.

    Counted: parameters (``weights``: every non-adapter parameter, frozen or not; buffers such as RoPE tables are
    left out), ``adapters`` (LoRA A and B), ``gradients`` (of the trainable parameters, in their dtype) and the
    optimizer's state tensors. Left out: activations, temporary buffers of forward/backward and of the optimizer
    step, FSDP's all-gathered layers and unsharded gradients in flight, DDP's gradient buckets (one more copy of
    the gradients unless ``gradient_as_bucket_view=True``), the CUDA context and allocator caching.

    Under ``"ddp"`` every rank holds everything. Under ``"fsdp"`` (FSDP2 ``fully_shard``) parameters, gradients
    and state shaped like a parameter hold ``ceil(rows / world_size)`` rows on rank 0 (the largest shard);
    LoRA-Pre's left factors are split by rows and its right factors replicated; LoRA-Pro full mode's ``m x n``
    moments follow ``lora_pro_full_sharded`` (default :data:`LORA_PRO_FULL_MOMENTS_SHARDED`); GaLore's
    projected state is counted whole on every rank (galore-torch projects the whole gradient and has no FSDP path).

    Args:
        config: a transformers config dict (with ``model_type``), a ``PretrainedConfig``, a known name
            (:data:`KNOWN_CONFIGS`), a local folder or ``config.json``, or a hub name already in the local cache.
        method: one of :data:`METHODS`. ``adamw`` is full training with ``torch.optim.AdamW``; ``lora`` is LoRA
            adapters with AdamW; ``lora_pro_*`` is ``LoRAPro(mode=...)``; ``lora_pre_*`` is ``LoRAPreAdamW`` /
            ``LoRAPreMuon``; ``galore`` is galore-torch's ``GaLoreAdamW`` (``proj_type="std"``). The last three
            compress the block matrices of :func:`~lit_lowrank.optim.lowrank_param_groups`; AdamW keeps the rest.
        rank: the LoRA rank (adapter methods), factor rank (LoRA-Pre) or projection rank (GaLore).
        world_size: number of ranks (GPUs).
        strategy: ``"ddp"`` or ``"fsdp"``.
        dtype: parameter dtype, ``"float32"`` or ``"bfloat16"``. torch AdamW and GaLore keep state in it; LoRA-Pro
            and LoRA-Pre keep float32 state for bf16 parameters.
        lora_targets: ``LoRAConfig.target_modules`` of the adapter methods.
        lora_pro_full_sharded: see above; ``None`` reads :data:`LORA_PRO_FULL_MOMENTS_SHARDED`.
        auto_class: transformers auto class that builds the model from the config.

    Example:
        >>> gib = estimate_memory("llama-2-7b", "lora_pre_adam", rank=16, world_size=8, strategy="fsdp")
        >>> round(gib.weights / 2**30, 2), round(gib.optimizer_state.factors / 2**30, 4)
        (3.14, 0.156)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}. HINT: choose one of {', '.join(METHODS)}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}. HINT: use 'ddp' (replicated) or 'fsdp' (FSDP2 row shards).")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}. HINT: pass the number of GPUs, e.g. 8.")
    torch_dtype = _dtype(dtype)
    sharded_full = LORA_PRO_FULL_MOMENTS_SHARDED if lora_pro_full_sharded is None else lora_pro_full_sharded
    tensors = _tensors(resolve_config(config), method, rank, torch_dtype, lora_targets, sharded_full, auto_class)
    ranks = world_size if strategy == "fsdp" else 1
    totals = dict.fromkeys(["weights", "adapters", "gradients"] + [f.name for f in fields(OptimizerState)], 0)
    for tensor in tensors:
        totals[tensor.kind] += tensor.bytes_per_rank(ranks)
    state = OptimizerState(**{f.name: totals[f.name] for f in fields(OptimizerState)})
    return MemoryEstimate(method, strategy, world_size, str(torch_dtype).removeprefix("torch."), rank,
                          totals["weights"], totals["adapters"], totals["gradients"], state)


def resolve_config(config: str | Mapping[str, Any] | Any):
    """A transformers ``PretrainedConfig`` from a dict, a known name, a local path or the local hub cache (offline).

    Example:
        >>> resolve_config("llama-3.1-8b").num_key_value_heads
        8
    """
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        entries = dict(config)
        if "model_type" not in entries:
            raise ValueError(f"config dict without 'model_type' (keys: {sorted(entries)}). HINT: add e.g. "
                             "'model_type': 'llama', as in a model's config.json.")
        return transformers.AutoConfig.for_model(**entries)
    if not isinstance(config, str):
        raise TypeError(f"config must be a name, a path or a dict, got {type(config).__name__}. HINT: e.g. "
                        "'llama-2-7b' or {'model_type': 'llama', ...}.")
    known = {name.lower(): entries for name, entries in KNOWN_CONFIGS.items()}
    if config.lower() in known:
        return transformers.AutoConfig.for_model(**known[config.lower()])
    path = Path(config)
    if path.is_file():  # a config.json (or any JSON file holding a config dict)
        return resolve_config(json.loads(path.read_text()))
    from lit_lowrank.backbones.hf import resolve_name  # bundled hub names resolve to pip-installed folders

    try:
        return transformers.AutoConfig.from_pretrained(resolve_name(config), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"config {config!r} is neither a known name nor a local folder / config.json, and it is not in the "
            f"local Hugging Face cache ({type(error).__name__}: {error}). Nothing is downloaded. HINT: use one of "
            f"{', '.join(KNOWN_CONFIGS)}, a path to a config.json, or a dict such as "
            "{'model_type': 'llama', 'hidden_size': 4096, ...}.") from error


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported parameter dtype {dtype!r}. HINT: use 'float32' (default) or 'bfloat16'.")


_CACHE: dict = {}  # the tensor list per model and method, so that each world size reuses it


def _tensors(config, method, rank, dtype, lora_targets, sharded_full, auto_class) -> list[_Tensor]:
    key = (config.to_json_string(use_diff=False), method, rank, dtype, json.dumps(lora_targets), sharded_full,
           auto_class)
    if key not in _CACHE:
        import transformers

        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(config).to(dtype)
        _CACHE[key] = _list_tensors(model, method, rank, lora_targets, sharded_full)
    return _CACHE[key]


def _list_tensors(model: nn.Module, method: str, rank: int, lora_targets, sharded_full: bool) -> list[_Tensor]:
    """Every per-rank tensor that ``method`` keeps for the meta ``model``: its parameters and gradients, and the state
    that the method's real optimizer creates in one step on meta tensors (shapes and dtypes, no storage)."""
    adapter_ids: set[int] = set()
    if method in ("lora", "lora_pro_efficient", "lora_pro_full"):
        from lit_lowrank import LoRAConfig, inject_lora
        from lit_lowrank.adapters import lora_modules

        with torch.device("meta"):
            inject_lora(model, LoRAConfig(r=rank, alpha=2 * rank, target_modules=lora_targets))
        adapter_ids = {id(m.lora_A) for _, m in lora_modules(model)} | {id(m.lora_B) for _, m in lora_modules(model)}
    out: list[_Tensor] = []
    for param in model.parameters():  # shared (tied) tensors are listed once, as optimizers see them
        out.append(_Tensor("adapters" if id(param) in adapter_ids else "weights", tuple(param.shape),
                           param.dtype.itemsize, True))
        if param.requires_grad:
            out.append(_Tensor("gradients", tuple(param.shape), param.dtype.itemsize, True))
    if method == "galore":
        return out + _galore_state(model, rank)
    optimizer = _meta_step(_build_optimizer(model, method, rank))
    return out + _state_tensors(optimizer, sharded_full)


def _build_optimizer(model: nn.Module, method: str, rank: int) -> torch.optim.Optimizer:
    """The optimizer that ``method`` trains with, with its defaults (as ``tests/test_memory.py`` steps them)."""
    if method in ("adamw", "lora"):
        return torch.optim.AdamW([param for param in model.parameters() if param.requires_grad])
    if method.startswith("lora_pro"):
        from lit_lowrank.optim import LoRAPro

        return LoRAPro(model, mode=method.removeprefix("lora_pro_"))
    from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

    return (LoRAPreAdamW if method == "lora_pre_adam" else LoRAPreMuon)(model, rank=rank)


def _meta_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` after one step on meta gradients: it creates all its state then (shapes only, instantly)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    return optimizer


# State keys of the m x n moments of LoRA-Pro full mode (in lora_A's state); FSDP placement: lora_pro_full_sharded.
_WEIGHT_MOMENTS = ("weight_exp_avg", "weight_exp_avg_sq")


def _state_tensors(optimizer: torch.optim.Optimizer, sharded_full: bool) -> list[_Tensor]:
    """``optimizer``'s state tensors, each with its FSDP2 placement, checked against ``optimizer.state_bytes()``."""
    factor_names = getattr(optimizer, "_factor_names", ())
    left, right = factor_names[0::2], factor_names[1::2]  # LoRA-Pre keeps (left, right) pairs: left split by rows
    out: list[_Tensor] = []
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue  # Python ints (LoRA-Pre's host step counters, seeds) take no device memory
            shape, itemsize = tuple(value.shape), value.dtype.itemsize
            if not shape:
                out.append(_Tensor("counters", shape, itemsize, False))
            elif key in left or key in right:
                out.append(_Tensor("factors", shape, itemsize, key in left))
            elif key in _WEIGHT_MOMENTS:
                out.append(_Tensor("weight_moments", shape, itemsize, sharded_full))
            elif shape == tuple(param.shape):  # Adam(W) moments follow their parameter's sharding
                out.append(_Tensor("moments", shape, itemsize, True))
            else:
                raise RuntimeError(
                    f"{type(optimizer).__name__} keeps state {key!r} of shape {shape} for a parameter of shape "
                    f"{tuple(param.shape)}, which the memory estimate cannot place under FSDP. HINT: teach "
                    "lit_lowrank.memory._state_tensors how this tensor is sharded.")
    if hasattr(optimizer, "state_bytes"):
        reported, listed = optimizer.state_bytes().total, sum(tensor.bytes_per_rank(1) for tensor in out)
        if reported != listed:
            raise RuntimeError(f"{type(optimizer).__name__}.state_bytes() reports {reported} bytes, its state "
                               f"tensors hold {listed}. HINT: make state_bytes() count every state tensor.")
    return out


def _galore_state(model: nn.Module, rank: int) -> list[_Tensor]:
    """GaLore's state by formula: galore-torch is optional and has no ``state_bytes()``; this is what its
    ``GaLoreAdamW`` (``proj_type="std"``) allocates in a step, checked against it in ``tests/test_memory.py``.

    Each matrix of the low-rank group (``lowrank_param_groups``) keeps a projection matrix of its longer side and two
    projected moments, whole on every rank (galore projects the whole gradient; its step is a Python int). Every
    other trainable parameter keeps two AdamW moments shaped and typed like it.
    """
    from lit_lowrank.optim import lowrank_param_groups

    matrices = {id(param) for group in lowrank_param_groups(model, rank=rank) if group["lowrank"]
                for param in group["params"]}
    out: list[_Tensor] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape, itemsize = tuple(param.shape), param.dtype.itemsize
        if id(param) in matrices:
            (p, q), k = shape, min(rank, *shape)
            projection, moment = ((k, q), (p, k)) if p >= q else ((p, k), (k, q))
            out += [_Tensor("projected", projection, itemsize, False)]
            out += [_Tensor("projected", moment, itemsize, False)] * 2
        else:
            out += [_Tensor("moments", shape, itemsize, True)] * 2
    return out
