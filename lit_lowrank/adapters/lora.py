"""LoRA layers: a low-rank pair ``W = W0 + scaling * lora_B @ lora_A`` attached to a frozen base layer.

Three module kinds, one contract. Every *adapter pair* is a :class:`LoRAAdapter` exposing ``lora_A``
(r x in_features), ``lora_B`` (out_features x r) and ``scaling``; optimizers (LoRA-Pro) pair A with B
through these modules, never through parameter order.

- :class:`LoRALinear` wraps ``nn.Linear`` (and subclasses) or transformers' GPT-2 ``Conv1D``.
- :class:`LoRAMultiheadAttention` wraps ``nn.MultiheadAttention`` (open_clip's towers) with one
  :class:`LoRAAdapter` per packed projection (``q_proj``, ``k_proj``, ``v_proj`` of ``in_proj_weight``,
  and ``out_proj``), as CLIP-LoRA adapts q/k/v separately.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for users who only adapt torch layers
        return None
    return Conv1D


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a Linear-like layer.

    ``fan_in_fan_out`` is True for GPT-2's ``Conv1D``, whose weight is stored transposed (in x out).
    """
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        n_in, n_out = layer.weight.shape
        return n_in, n_out, True
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    raise TypeError(f"{type(layer).__name__} is not a Linear-like layer (nn.Linear or transformers Conv1D)")


def is_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


class Mergeable:
    """``merge()`` / ``unmerge()`` for wrappers that implement ``_base_deltas()``: each base weight (or slice of one)
    with the fp32 delta its adapter adds to it."""

    merged = False

    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the base weight(s)."""
        self._add_to_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the delta again; inverse of :meth:`merge` up to the base dtype's rounding."""
        self._add_to_base(-1.0)
        self.merged = False

    @contextmanager
    def replacing_factors(self) -> Iterator[None]:
        """Replace ``lora_A`` / ``lora_B`` inside; a merged wrapper's base weights follow, so they hold the new delta.

        Each base weight gets ``new delta - old delta`` added in fp32 and rounded once: one rounding, where an
        unmerge, load and merge would round twice. Not merged: the block runs as it is.

        Example:
            >>> layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0)
            >>> start, x = layer.weight.clone(), torch.randn(3, 4)
            >>> layer.merge()
            >>> with layer.replacing_factors():
            ...     _ = nn.init.normal_(layer.lora_B)
            >>> torch.allclose(layer(x), x @ (start + layer.delta_weight()).T + layer.bias, atol=1e-6)
            True
            >>> layer.unmerge()
            >>> torch.allclose(layer.weight, start, atol=1e-6)
            True
        """
        if not self.merged:
            yield
            return
        with torch.no_grad():
            before = [delta for _, delta in self._base_deltas()]
        try:
            yield
        finally:  # also after a failure midway: the base then holds the delta of whatever factors are there
            with torch.no_grad():
                for (target, after), old in zip(self._base_deltas(), before):
                    add_delta_(target, after - old, +1.0)

    def _add_to_base(self, sign: float) -> None:
        for target, delta in self._base_deltas():
            add_delta_(target, delta, sign)

    def _base_deltas(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


@torch.no_grad()
def add_delta_(target: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """``target += sign * delta`` with the sum formed in fp32 and rounded once to the target's dtype."""
    target.copy_((target.float() + sign * delta.to(target.device)).to(target.dtype))


class LoRAAdapter(nn.Module):
    """One low-rank pair whose weight delta is ``scaling * lora_B @ lora_A`` (out x in).

    Example:
        >>> pair = LoRAAdapter(in_features=6, out_features=4, r=2, alpha=4.0)
        >>> pair.lora_A.shape, pair.lora_B.shape, pair.scaling
        (torch.Size([2, 6]), torch.Size([4, 2]), 2.0)
        >>> bool(pair.delta_weight().abs().sum() == 0)  # B starts at zero
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if r <= 0 or r > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank r={r} must satisfy 0 < r <= min(in_features, out_features) = "
                f"min({in_features}, {out_features}). HINT: lower LoRAConfig.r."
            )
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.reset_lora_parameters()

    def reset_lora_parameters(self, init: str = "default") -> None:
        """Re-initialise A and B with a registered init (see :func:`lit_lowrank.adapters.register_lora_init`)."""
        from lit_lowrank.adapters.inits import LORA_INITS

        LORA_INITS[init](self)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling * B @ A`` computed in ``dtype`` (fp32 by default, so bf16 merges stay accurate)."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class LoRALinear(Mergeable, LoRAAdapter):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a trainable low-rank update.

    ``forward(x) = base_layer(x) + scaling * dropout(x) @ A^T @ B^T``. The wrapper forwards ``weight``
    and ``bias`` to the base layer so code that inspects ``module.weight`` keeps working.

    Example:
        >>> layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=4.0)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(layer(x), layer.base_layer(x))  # B = 0: the output is unchanged at first
        True
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        n_in, n_out, fan_in_fan_out = linear_shape(base_layer)
        weight = base_layer.weight
        super().__init__(n_in, n_out, r, alpha, rslora, dtype=_adapter_dtype(weight), device=weight.device)
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_in = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(lora_in, self.lora_A), self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    def _base_deltas(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        delta = self.delta_weight()
        return [(self.base_layer.weight, delta.T if self.fan_in_fan_out else delta)]


class LoRAMultiheadAttention(Mergeable, nn.Module):
    """``nn.MultiheadAttention`` with LoRA on chosen packed projections (``q_proj``/``k_proj``/``v_proj``/``out_proj``).

    ``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` directly inside
    ``F.multi_head_attention_forward``, so adapters cannot sit in front of a sub-layer: the forward adds
    each adapter's delta to its slice of the packed weight instead. LoRA dropout cannot be expressed in
    that weight-delta form and is therefore not applied here (``inject_lora`` warns when it is set).

    Example:
        >>> mha = nn.MultiheadAttention(16, 2, batch_first=True)
        >>> lora = LoRAMultiheadAttention(mha, parts=("q_proj", "v_proj"), r=4, alpha=8.0)
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(lora(x, x, x)[0], mha(x, x, x)[0])
        True
    """

    # Keeps nn.TransformerEncoderLayer off its fused inference fast path, which reads the base
    # in_proj_weight directly and would silently bypass the adapters.
    _qkv_same_embed_dim = False

    def __init__(self, base_layer: nn.MultiheadAttention, parts: Sequence[str], r: int, alpha: float,
                 rslora: bool = False, part_shapes: dict[str, tuple[int, float]] | None = None):
        super().__init__()
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on nn.MultiheadAttention needs the packed in_proj_weight (kdim == vdim == embed_dim). "
                "HINT: exclude this module from target_modules."
            )
        unknown = set(parts) - set(MHA_PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {MHA_PARTS}, got {tuple(parts)}")
        self.base_layer = base_layer
        width = base_layer.embed_dim
        weight = base_layer.in_proj_weight
        for part in MHA_PARTS:
            if part in parts:  # part_shapes: (r, alpha) of parts that differ (LoRAConfig.rank_pattern / alpha_pattern)
                rank, part_alpha = (part_shapes or {}).get(part, (r, alpha))
                pair = LoRAAdapter(width, width, rank, part_alpha, rslora, dtype=_adapter_dtype(weight),
                                   device=weight.device)
                self._modules[part] = pair  # add_module would see base_layer's attribute through __getattr__

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def adapters(self) -> dict[str, LoRAAdapter]:
        return {part: self._modules[part] for part in MHA_PARTS if part in self._modules}

    def adapted_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_proj_weight, out_proj.weight)`` with the adapters' deltas added (differentiable)."""
        mha, adapters = self.base_layer, self.adapters()
        in_weight, out_weight = mha.in_proj_weight, mha.out_proj.weight
        deltas = [
            (adapters[part].lora_B @ adapters[part].lora_A * adapters[part].scaling).to(in_weight.dtype)
            if part in adapters
            else in_weight.new_zeros(mha.embed_dim, mha.embed_dim)
            for part in MHA_PARTS[:3]
        ]
        if any(part in adapters for part in MHA_PARTS[:3]):
            in_weight = in_weight + torch.cat(deltas, dim=0)
        if "out_proj" in adapters:
            out = adapters["out_proj"]
            out_weight = out_weight + (out.lora_B @ out.lora_A * out.scaling).to(out_weight.dtype)
        return in_weight, out_weight

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mha = self.base_layer
        if self.merged:
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        in_weight, out_weight = self.adapted_weights()
        batched_first = mha.batch_first and query.dim() == 3
        if batched_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_weight, mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, out_weight, mha.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return (output.transpose(0, 1) if batched_first else output), weights

    def _base_deltas(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mha = self.base_layer
        width = mha.embed_dim
        found = []
        for index, part in enumerate(MHA_PARTS):
            if part in self._modules:
                target = (mha.out_proj.weight if part == "out_proj"
                          else mha.in_proj_weight[index * width:(index + 1) * width])
                found.append((target, self._modules[part].delta_weight()))
        return found


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Quantised or integer base weights cannot hold gradients; their adapters train in fp32.
    return weight.dtype if weight.is_floating_point() else torch.float32
