"""LoRA-Pro's adapter pairs as stacks: ``lora_A`` paired with ``lora_B`` through their module (lit_lowrank's adapters
and PEFT's LoRA layers alike), layers of one shape stacked for batched solves, and the results written back (the only
place that reads adapters as plain tensors)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lit_lowrank.adapters.lora import LoRAAdapter
from lit_lowrank.adapters.peft_layers import is_peft_lora_layer, peft_lora_factors
from lit_lowrank.optim.sharding import full, local, local_part
from lit_lowrank.optim.state import compute_dtype


@dataclass(frozen=True, eq=False)
class AdapterPair:
    """One adapter's factors, paired through their module: ``W = W0 + scaling * B @ A``.

    ``unsupported`` says why LoRA-Pro cannot update this pair (DoRA, a PEFT convolution, ...; None when it can):
    refused as soon as the pair is trainable and given to LoRA-Pro, never left to plain AdamW.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    unsupported: str | None = None

    def batch_key(self) -> tuple:
        """Pairs with equal keys can be stacked and solved together."""
        return (tuple(self.A.shape), tuple(self.B.shape), self.A.dtype, self.B.dtype, self.A.device, self.scaling)


def all_adapter_pairs(model: nn.Module) -> list[AdapterPair]:
    """Every adapter pair of ``model``, trainable or frozen, in ``named_modules`` order: lit_lowrank's adapters
    (``inject_lora``) and PEFT's LoRA layers (``peft.get_peft_model``), one pair per PEFT adapter name.

    Example:
        >>> import peft
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> ours = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> theirs = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"]))
        >>> [pair.name for pair in all_adapter_pairs(ours)], [pair.name for pair in all_adapter_pairs(theirs)]
        (['0'], ['base_model.model.0[default]'])
    """
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            problem = _dora_problem(name, module)
            pairs.append(AdapterPair(name, module.lora_A, module.lora_B, float(module.scaling), problem))
        elif is_peft_lora_layer(module):
            pairs.extend(AdapterPair(factors.name, factors.A, factors.B, factors.scaling, factors.unsupported)
                         for factors in peft_lora_factors(name, module))
    return pairs


def _dora_problem(name: str, module: nn.Module) -> str | None:
    if not getattr(module, "use_dora", False):
        return None
    return (f"adapter {name!r} is DoRA (use_dora=True): LoRA-Pro's closed form is for plain LoRA, W0 + s B A, and DoRA "
            "also rescales the weight by its magnitude vector. HINT: LoRAConfig(use_dora=False) to train it with "
            "LoRA-Pro, or keep DoRA and use torch.optim.AdamW.")


def adapter_pairs(model: nn.Module) -> list[AdapterPair]:
    """The trainable adapter pairs of ``model`` in ``named_modules`` order. Raises a ValueError for a trainable pair
    LoRA-Pro cannot update (DoRA, several active PEFT adapters, ...: :attr:`AdapterPair.unsupported`) or with one
    trainable factor."""
    pairs = all_adapter_pairs(model)
    for pair in pairs:
        refuse_one_trainable_factor(pair)
        if pair.A.requires_grad:
            refuse_unsupported(pair)
    return [pair for pair in pairs if pair.A.requires_grad]


def refuse_unsupported(pair: AdapterPair) -> None:
    """Raise a ValueError for a pair that is not plain LoRA: LoRA-Pro's update would be wrong for it, and leaving it
    to AdamW would silently train it without LoRA-Pro."""
    if pair.unsupported is not None:
        raise ValueError(pair.unsupported)


def refuse_one_trainable_factor(pair: AdapterPair) -> None:
    """Raise a ValueError for an adapter with exactly one trainable factor: LoRA-Pro moves both or neither."""
    A, B = pair.A, pair.B
    if A.requires_grad != B.requires_grad:
        raise ValueError(
            f"adapter {pair.name!r} has only one trainable factor (lora_A.requires_grad={A.requires_grad}, "
            f"lora_B.requires_grad={B.requires_grad}); LoRA-Pro updates A and B jointly. "
            "HINT: make both trainable or freeze both."
        )


def pairs_in_group(model: nn.Module, tensors: list[torch.Tensor]) -> list[AdapterPair]:
    """The adapter pairs of ``model`` among ``tensors`` (a param group about to be added), in ``named_modules``
    order. Raises a ValueError for a ``lora_A`` without its ``lora_B`` (or the reverse), a pair with one
    trainable factor or one LoRA-Pro cannot update: LoRA-Pro's closed form needs both, and a lone factor would
    silently get plain AdamW.

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> pairs_in_group(net, [net[0].lora_B])
        Traceback (most recent call last):
        ...
        ValueError: lora_B of adapter '0' is in this param group without its lora_A; ...
    """
    members = set(tensors)
    found = []
    for pair in all_adapter_pairs(model):
        has_A, has_B = pair.A in members, pair.B in members
        if has_A != has_B:
            given, missing = ("lora_A", "lora_B") if has_A else ("lora_B", "lora_A")
            names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
            raise ValueError(
                f"{given} of adapter {pair.name!r} is in this param group without its {missing}; LoRA-Pro updates "
                "the two factors of an adapter jointly (the constructor refuses one-sided adapters too). HINT: add "
                f"both in one group, both with requires_grad=True: the parameters {names.get(id(pair.A))!r} and "
                f"{names.get(id(pair.B))!r} of the model."
            )
        if has_A:
            refuse_one_trainable_factor(pair)
            refuse_unsupported(pair)
            found.append(pair)
    return found


class FactorStack(NamedTuple):
    """Stacked r-row factors ``A`` (L x r x n), ``B^T`` (L x r x m) and their gradients, in parameter dtype.

    ``ok`` is False for layers with a non-finite gradient. Batched ops never mix layers (and eigh only
    sees the finite parameter Grams), so such a layer cannot spoil the others; callers mask its results.
    """

    A: torch.Tensor
    B_t: torch.Tensor
    grad_A: torch.Tensor
    grad_B_t: torch.Tensor
    ok: torch.Tensor

    def in_compute_dtype(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B^T, grad_A, grad_B^T)`` in fp32 (fp64 for fp64 parameters) for the solves."""
        dtype = compute_dtype(self.A)
        return self.A.to(dtype), self.B_t.to(dtype), self.grad_A.to(dtype), self.grad_B_t.to(dtype)


def read_factors(pairs: list[AdapterPair]) -> FactorStack:
    """The one place where adapter parameters and gradients are read as plain tensors.

    Sharded training (FSDP2 / DTensor) only has to gather the small A and B factors and their
    gradients here; results go back through :func:`write_rows` (gradient rewrite, full mode's A),
    :func:`write_local` (full mode's B, already this rank's rows) and the in-place AdamW of efficient mode.
    """
    def grad_of(p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p)
        if p.grad.is_sparse:
            raise RuntimeError(f"LoRA-Pro does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        return p.grad

    # Under FSDP2 each rank holds a shard of rows: gather the small factors and gradients (r x (m + n)
    # per adapter), so every rank solves the same full problem and keeps only its rows of the result.
    # Stacking the transposed views of B stores B^T contiguously at no extra cost.
    A = torch.stack([full(pair.A.detach()) for pair in pairs])
    B_t = torch.stack([full(pair.B.detach()).mT for pair in pairs])
    grad_A = torch.stack([full(grad_of(pair.A)) for pair in pairs])
    grad_B_t = torch.stack([full(grad_of(pair.B)).mT for pair in pairs])
    return FactorStack(A, B_t, grad_A, grad_B_t, all_finite(grad_A) & all_finite(grad_B_t))


def all_finite(stack: torch.Tensor) -> torch.Tensor:
    """Per layer (dim 0): True where every entry is finite. Two read-only reductions, ``amax`` and ``amin``, not
    ``isfinite(x).all()``: measured in docs/design.md (Finite checks)."""
    dims = tuple(range(1, stack.dim()))
    return torch.isfinite(stack.amax(dim=dims)) & torch.isfinite(stack.amin(dim=dims))


def write_rows(targets: list[torch.Tensor], values: torch.Tensor) -> None:
    """Scatter a stack back into per-layer tensors (parameters, gradients or state); a sharded target
    receives only its own rows."""
    torch._foreach_copy_([local(t) for t in targets],
                         [local_part(v, like=t) for t, v in zip(targets, values.unbind(0))])


def write_local(targets: list[torch.Tensor], values: torch.Tensor) -> None:
    """Copy a stack of per-layer values that already hold only this rank's rows into the local shards."""
    torch._foreach_copy_([local(t) for t in targets], list(values.unbind(0)))


def batches(pairs: Iterable[AdapterPair], extra_key: Callable[[AdapterPair], object] = lambda pair: None):
    """Group pairs that can be stacked (same shapes, dtypes, device, scaling and ``extra_key``)."""
    groups: dict[tuple, list[AdapterPair]] = defaultdict(list)
    for pair in pairs:
        groups[(extra_key(pair),) + pair.batch_key()].append(pair)
    return groups.values()
