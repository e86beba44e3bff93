"""Same-shape matrices stepped together: what the one LoRA-Pre step of each optimizer works on.

A model's weight matrices come in few shapes (a transformer's q, k, v, o of every layer share one), and a LoRA-Pre
step of a small matrix is dozens of small operations whose dispatch, not arithmetic, takes the time. A
:class:`MatrixBatch` holds ``L`` matrices of one shape, dtype and layout with their factors stacked
(``left``: ``k x L x p x r``, ``right``: ``k x L x r x q`` for ``k`` factor pairs), so that each operation of the
step runs once per batch: one batched Cholesky per factor kind, one ``bmm`` per product, one ``torch._foreach_*``
per element-wise write of the parameters. The parameters and gradients stay separate tensors (nothing copies them
into a stack on the host path); ``torch.optim`` users and checkpoints keep seeing one ``state[param]`` per tensor:
the factors are copied into the stacks before the step and back after it (``O((p + q) r)`` per matrix, one
``_foreach_copy_`` each way).

How many matrices go in one batch (:func:`batch_limit`): on CPU, whole matrices up to ``CPU_WHOLE_MATRIX_ELEMENTS``
elements together (the working set stays in cache), a larger matrix alone, in row chunks; on an accelerator up to
``DEVICE_BATCH_ELEMENTS`` elements per batch, the bound on the transient ``L x p x q`` buffers of the torch path,
and ``KERNEL_BATCH_ELEMENTS`` where LoRA-Pre Adam's Triton kernels will run (they form no such buffers; their
partial sums take ``L p q r / 64`` bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_lowrank.optim.lora_pre.factors import CPU_WHOLE_MATRIX_ELEMENTS, Workspace, damped_pinvs, masked_copy_
from lit_lowrank.optim.sharding import RowShards

DEVICE_BATCH_ELEMENTS = 1 << 25
"""Elements of one batch's ``L x p x q`` transient buffers on an accelerator (128 MiB each in float32): 8 matrices
of 2048 x 2048 per batch, 128 of 512 x 512."""

KERNEL_BATCH_ELEMENTS = 1 << 28
"""The same where the Triton kernels take the batch: their partial sums are ``L p q r / 64`` bytes (64 MiB at this
many elements and r = 16): 64 matrices of 2048 x 2048 or 16 of 4096 x 4096 per batch. If the kernel then falls back
to torch (a warning says so), its buffers are 1 GiB each."""


@dataclass
class MatrixBatch:
    """``L`` same-shape matrices of one param group, with their factors stacked for one step.

    Example:
        >>> W, g = torch.zeros(3, 4), torch.ones(3, 4)
        >>> B, A = torch.zeros(3, 2), torch.ones(2, 4)
        >>> batch = MatrixBatch.gather([W], [g], [[B, A]], step=1, workspace=Workspace())
        >>> tuple(batch.left.shape), tuple(batch.right.shape)
        ((1, 1, 3, 2), (1, 1, 2, 4))
        >>> _ = batch.left.fill_(5.0)
        >>> batch.write_back()
        >>> float(B.sum())
        30.0
    """

    params: list[Tensor]  # the local p x q blocks, updated in place
    grads: list[Tensor]
    left: Tensor  # (k, L, p, r): B (and V_B) of every matrix, in the factors' dtype
    right: Tensor  # (k, L, r, q): A (and V_A)
    step: int | Tensor  # host path: the count all L share; device-side skip: (L,) float32 counts
    ok: Tensor | None = None  # device-side skip: (L,) bool, False where the gradient cannot be stepped
    shards: RowShards | None = None  # FSDP2: how every matrix of the batch is split (all alike)
    grad_absmax: float | None = None  # host path: the largest max |g| of the batch, when known
    factors: list[Tensor] = field(default_factory=list)  # the state tensors the stacks are copied back to

    @classmethod
    def gather(cls, params: Sequence[Tensor], grads: Sequence[Tensor], factors: Sequence[Sequence[Tensor]], *,
               step: int | Tensor, workspace: Workspace, ok: Tensor | None = None, shards: RowShards | None = None,
               grad_absmax: float | None = None) -> MatrixBatch:
        """A batch of ``params`` whose ``factors[i]`` are ``[left, right, left, right...]`` (local blocks), copied
        into ``workspace`` stacks by one ``_foreach_copy_``."""
        k, size = len(factors[0]) // 2, len(params)
        (p, r), q = factors[0][0].shape, factors[0][1].shape[1]
        dtype, device = factors[0][0].dtype, factors[0][0].device
        left = workspace.get("batch_left", (k, size, p, r), dtype, device)
        right = workspace.get("batch_right", (k, size, r, q), dtype, device)
        state = [matrix[2 * pair + side] for side in (0, 1) for pair in range(k) for matrix in factors]
        torch._foreach_copy_([*left.flatten(0, 1).unbind(0), *right.flatten(0, 1).unbind(0)], state)
        return cls(list(params), list(grads), left, right, step, ok, shards, grad_absmax, state)

    @property
    def size(self) -> int:
        return len(self.params)

    @property
    def shape(self) -> torch.Size:
        """The shape of each whole matrix (not of this rank's row block)."""
        return self.params[0].shape if self.shards is None else self.shards.param.shape

    @property
    def ok3(self) -> Tensor | None:
        """``ok`` shaped to broadcast over ``L x rows x cols`` stacks."""
        return None if self.ok is None else self.ok.view(-1, 1, 1)

    def write_back(self) -> None:
        """Copy the stacked factors back into the state tensors they came from."""
        torch._foreach_copy_(self.factors, [*self.left.flatten(0, 1).unbind(0), *self.right.flatten(0, 1).unbind(0)])

    def stacked_grads(self, workspace: Workspace, rows: slice | None = None) -> Tensor:
        """The gradients (their ``rows``) as one ``L x n x q`` tensor in the factors' dtype; on the device-side skip
        zero where ``ok`` is False, so that nothing computed from a skipped gradient turns NaN."""
        whole = rows is None or rows.stop - rows.start == self.params[0].shape[0]
        parts = self.grads if whole else [grad[rows] for grad in self.grads]
        shape = (self.size, parts[0].shape[0], parts[0].shape[1])
        if self.size == 1 and parts[0].dtype == self.left.dtype and self.ok is None:
            return parts[0].unsqueeze(0)  # nothing to convert or mask: a view
        out = workspace.get("grad", shape, self.left.dtype, self.left.device)
        torch._foreach_copy_(list(out.unbind(0)), parts)
        if self.ok is not None:
            torch.where(self.ok3, out, out.new_zeros(()), out=out)
        return out


def batch_limit(shape: tuple[int, int], device: torch.device, chunk_rows: int | None,
                budget: int | None = None) -> int:
    """How many ``p x q`` matrices one batch may hold (see the module docstring); 1 with explicit row chunks.
    ``budget`` (elements of ``L x p x q``) replaces the device's default: the Triton path forms no such buffers.

    Example:
        >>> [batch_limit(s, torch.device("cpu"), None) for s in ((128, 128), (1024, 1024), (1024, 2816))]
        [64, 1, 1]
    """
    p, q = shape
    if chunk_rows is not None and chunk_rows < p:
        return 1
    if budget is None:
        budget = CPU_WHOLE_MATRIX_ELEMENTS if device.type == "cpu" else DEVICE_BATCH_ELEMENTS
    return max(1, budget // max(p * q, 1))


def split(items: Sequence, limit: int) -> Iterator[list]:
    """``items`` in consecutive runs of at most ``limit``, as even as possible (5 by 4: 2 + 3, not 4 + 1)."""
    parts = math.ceil(len(items) / limit)
    for index in range(parts):
        yield list(items[index * len(items) // parts:(index + 1) * len(items) // parts])


def stacked_pinvs(factors: Tensor, role: str, damping: float, workspace: Workspace,
                  shards: RowShards | None = None) -> Tensor:
    """Damped pseudo-inverses of ``factors`` (``k x L x r x n``, e.g. ``right`` or ``left.mT``), same shape, in one
    batched Gram / Cholesky / solve (:func:`~lit_lowrank.optim.lora_pre.factors.damped_pinvs`)."""
    flat = factors.flatten(0, 1)
    out = workspace.get(role, tuple(flat.shape), flat.dtype, flat.device)
    return damped_pinvs(flat, damping, out, workspace, shards).view(factors.shape)


def update_params_(params: Sequence[Tensor], update: Tensor, *, alpha: float, decay: float,
                   ok: Tensor | None) -> None:
    """``W <- decay * W + alpha * update[l]`` for each ``params[l]`` (decay first, rounded to W's dtype, as an in-place
    ``mul_`` would). Host path: two ``_foreach`` ops. Device-side skip (``ok``, ``L x 1 x 1``): the new values are
    formed on a stack and kept only where ``ok`` holds, so a skipped matrix stays bit for bit."""
    if ok is None:
        decay_(params, decay)
        torch._foreach_add_(list(params), list(update.unbind(0)), alpha=alpha)
        return
    stack = torch.stack(list(params))
    decayed = stack * decay if decay != 1.0 else stack
    masked_copy_(stack, torch.add(decayed, update, alpha=alpha), ok)
    torch._foreach_copy_(list(params), list(stack.unbind(0)))


def decay_(params: Sequence[Tensor], decay: float) -> None:
    """``W <- decay * W`` for every tensor (nothing for ``decay == 1``), rounded to W's dtype like ``W.mul_(decay)``.

    For float16 the factor goes in as a 0-d tensor: ``_foreach_mul_`` with a Python scalar rounds the scalar itself to
    float16 first (0.999 becomes 0.99902), which an in-place ``mul_`` does not."""
    if decay == 1.0:
        return
    scalar = torch.tensor(decay, device=params[0].device) if params[0].dtype == torch.float16 else decay
    torch._foreach_mul_(list(params), scalar)


def blend_(factors: Tensor, keep: float, sums: Tensor, rate: float, ok: Tensor | None) -> None:
    """``factors <- keep * factors + rate * sums`` in place (``L x n x m`` stacks); with ``ok`` (``L x 1 x 1``) only
    where it holds: a skipped step's sums may be NaN, and its factors stay bit for bit."""
    if ok is None:
        factors.mul_(keep).add_(sums, alpha=rate)
    else:
        masked_copy_(factors, torch.mul(factors, keep).add_(sums, alpha=rate), ok)
