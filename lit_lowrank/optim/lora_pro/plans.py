"""What one :class:`~lit_lowrank.optim.LoRAPro` step plans before it updates anything (so that clipping sees every
direction first), and which layers and tensors it may step.

A layer or tensor is skipped (its parameters and state stay bit for bit, and ``skipped_steps`` counts it) when its
gradients are not finite, or when what would enter its Adam moments, ``(dA, dB)`` or ``g~``, has an entry beyond
the :func:`~lit_lowrank.optim.state.gradient_limit` of the state dtype: its square would overflow the second moment,
which would then freeze the tensor for good.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_lowrank.optim.sharding import all_reduce_, local, process_group
from lit_lowrank.optim.state import compute_dtype, gradient_limit


@dataclass(eq=False)
class EfficientPlan:
    """One batch's rewritten gradients (zero for the layers it skips), kept until clipping has seen every
    direction."""

    batch: list
    group: dict
    ok: torch.Tensor
    dA: torch.Tensor
    dB_t: torch.Tensor
    A: torch.Tensor

    def squared_norm(self) -> torch.Tensor:
        return self.dA.square().sum() + self.dB_t.square().sum()

    def scale_(self, coefficient: torch.Tensor) -> None:
        self.dA.mul_(coefficient)
        self.dB_t.mul_(coefficient)


@dataclass(eq=False)
class FullPlan:
    """One batch's equivalent gradient ``g~ = U_t^T V`` (zero for the layers it skips)."""

    batch: list
    group: dict
    ok: torch.Tensor
    A: torch.Tensor
    B_t: torch.Tensor
    spectrum: object
    U_t: torch.Tensor
    V: torch.Tensor

    def squared_norm(self) -> torch.Tensor:
        return ((self.U_t @ self.U_t.mT) * (self.V @ self.V.mT)).sum()

    def scale_(self, coefficient: torch.Tensor) -> None:
        self.V.mul_(coefficient)


@dataclass(eq=False)
class OtherPlan:
    """Parameters that are not adapter factors (heads, modules_to_save), stepped by plain AdamW."""

    params: list
    group: dict
    grads: list
    ok: torch.Tensor


def steppable_grads(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Local gradient shards, zeroed where they cannot be stepped, and per-parameter flags agreed by all ranks (a
    shard's NaN must skip the whole parameter everywhere, or the ranks would diverge). A gradient can be stepped
    when it is finite and within the :func:`~lit_lowrank.optim.state.gradient_limit` of its state dtype."""
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError("LoRAPro's AdamW path does not support sparse gradients. HINT: use a dense embedding "
                           "(nn.Embedding(sparse=False)) or leave that tensor frozen.")
    grads = [local(p.grad) for p in params]
    limit = gradient_limit(compute_dtype(params[0]))  # callers group parameters by state dtype
    ok = torch.stack([within_limit(g.reshape(1, -1), limit).squeeze(0) for g in grads])
    group = process_group(params)
    if group is not None:
        ok = all_reduce_(ok.to(torch.int32), group, op=torch.distributed.ReduceOp.MIN).bool()
    return [torch.where(finite, g, 0) for g, finite in zip(grads, ok.unbind())], ok


def within_limit(stack: torch.Tensor, limit: float) -> torch.Tensor:
    """Per layer (dim 0): True where every entry lies in ``[-limit, limit]`` (False where one is NaN). Two
    read-only reductions, like :func:`~lit_lowrank.optim.lora_pro.pairs.all_finite`.

    Example:
        >>> within_limit(torch.tensor([[1.0, -3.0], [1.0, float("nan")], [5.0, 0.0]]), limit=4.0)
        tensor([ True, False, False])
    """
    dims = tuple(range(1, stack.dim()))
    return (stack.amax(dim=dims) <= limit) & (stack.amin(dim=dims) >= -limit)


def equivalent_gradient_bound(U_t: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per layer, an upper bound of ``max |g~|`` for ``g~ = U_t^T V`` (float64, NaN where a factor holds NaN).

    ``U_t = [B^T ; perp^T]`` and ``V = [Q_B g_A ; A] / s`` (2r rows each) pair block by block, so
    ``|g~_ij| <= r (max|B| max|V_top| + max|perp| max|V_bottom|)``; bounding each block separately keeps the bound
    near ``max |g~|`` even where ``B`` and ``Q_B g_A`` have very different scales. Eight r-row reductions, no m x n
    product: full mode's kernel never forms ``g~``.
    """
    rank = U_t.shape[-2] // 2

    def absmax(x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x.amax(dim=(1, 2)), x.amin(dim=(1, 2)).neg()).double()

    top = absmax(U_t[:, :rank]) * absmax(V[:, :rank])
    bottom = absmax(U_t[:, rank:]) * absmax(V[:, rank:])
    return rank * (top + bottom)
