"""Building blocks shared by the LoRA-Pre optimizers: factor initialisation, damped pseudo-inverses,
row chunking and reusable scratch buffers.

A LoRA-Pre moment of a ``p x q`` weight is kept as ``left @ right`` with ``left`` (``p x r``) starting at zero
and ``right`` (``r x q``) drawn from N(0, 0.02^2). Each step regresses the factors on a target ``T`` with one
least-squares (Newton) step per factor, which needs the *damped* pseudo-inverse of a factor:

    (F F^T + lambda I)^-1 F        for an r x n factor F,   lambda = damping * (tr(F F^T) / r + floor)

``damped_pinv`` returns exactly that, so ``T @ damped_pinv(right).T`` is ``T right^T (right right^T + lambda)^-1``
and ``damped_pinv(left.T) @ T`` is ``(left^T left + lambda)^-1 left^T T``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lit_lowrank.optim.sharding import RowShards

FACTOR_INIT_STD = 0.02
"""Standard deviation of the random right factors (A, V_A) at initialisation, as in the LoRA-Pre spec."""

DAMPING_FLOOR = 1e-60
"""Added to tr(F F^T) / r inside the damping so that an all-zero factor (B at step 1) has a zero pseudo-inverse
instead of 0/0. It is far below the Gram entries of any float32 factor that matters (a factor of 1e-28, as made
by 1e-30 gradients, has Gram entries ~1e-56), yet large enough that the damped pseudo-inverse of a vanishing
factor stays finite in float32 for damping >= 1e-16 (its entries are at most 1 / (2 sqrt(lambda)))."""

_MASK64 = (1 << 64) - 1


def derive_seed(base_seed: int, index: int) -> int:
    """Seed of the ``index``-th parameter's factor generator, derived from an optimizer-wide ``base_seed``.

    The splitmix64 finaliser spreads neighbouring indices over unrelated 63-bit seeds, so each parameter draws
    its own random factors and a resumed run (which stores the seed) re-creates them exactly.

    Example:
        >>> derive_seed(0, 0) == derive_seed(0, 0) != derive_seed(0, 1)
        True
    """
    x = (base_seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def init_factor_pairs(
    shape: tuple[int, int], rank: int, seed: int, n_pairs: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``n_pairs`` (left, right) factor pairs for a ``p x q`` matrix: left = 0 (``p x r``), right ~ N(0, 0.02^2).

    The random draws come from a CPU generator seeded with ``seed`` (in float32, then cast), so the initial
    factors are the same on every device and for every parameter dtype.

    Example:
        >>> (B, A), = init_factor_pairs((4, 6), 2, seed=7, n_pairs=1, dtype=torch.float32, device=torch.device("cpu"))
        >>> B.abs().sum().item(), tuple(A.shape)
        (0.0, (2, 6))
    """
    p, q = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        left = torch.zeros(p, rank, dtype=dtype, device=device)
        right = torch.randn(rank, q, generator=generator, dtype=torch.float32).mul_(FACTOR_INIT_STD)
        pairs.append((left, right.to(device=device, dtype=dtype)))
    return pairs


def damped_pinvs(factors: Sequence[Tensor] | Tensor, damping: float, out: Tensor, workspace: Workspace | None = None,
                 shards: RowShards | None = None) -> Tensor:
    """``(F F^T + damping * (tr(F F^T) / r + DAMPING_FLOOR) I)^-1 F`` for each ``r x n`` factor ``F``, stacked into
    ``out`` (``len(factors) x r x n``, the factors' dtype).

    The factors must share one shape (a list, or one ``N x r x n`` tensor): they are stacked to run one batched
    Gram / Cholesky / product, whatever their number. The ``r x r`` Gram matrices and their Cholesky factorisations are
    computed in float64: forming a Gram squares the factor's condition number, and in float32 its rounding
    error (~ eps32 * sqrt(n) * tr) can exceed the damping (1e-6 * tr / r) and make the matrix indefinite. In
    float64 the damped Gram is safely positive definite, and its range covers the squares of any float32
    entry. Only ``O(n r^2)`` work, small next to the ``O(p q r)`` products it feeds.

    With ``shards`` (FSDP2), each ``F`` is this rank's block of columns (a left factor's rows): the Gram
    matrices are summed over ranks before the damping, and each rank gets its own columns of the result.

    Example:
        >>> A, V_A = torch.randn(4, 30), torch.randn(4, 30)
        >>> pinvs = damped_pinvs([A, V_A], 1e-9, out=torch.empty(2, 4, 30))
        >>> torch.allclose(pinvs[0] @ A.T, torch.eye(4), atol=1e-4)  # a left inverse of A^T, up to the damping
        True
    """
    rank, n = factors[0].shape
    shape = (len(factors), rank, n)
    if workspace is None:
        stacked = torch.empty(shape, dtype=torch.float64, device=factors[0].device)
    else:
        stacked = workspace.get("pinv_float64", shape, torch.float64, factors[0].device)
    # A stacked tensor is copied at once; a list one copy per factor, not torch.stack(out=): inductor cannot lower
    # stack into `out` from transposed views (torch.compile of LoRAPreMuon.step failed), and on CPU the copies were
    # faster (7 vs 11 us at 16 x 1024).
    if isinstance(factors, Tensor):
        stacked.copy_(factors)
    else:
        for index, factor in enumerate(factors):
            stacked[index].copy_(factor)
    gram = torch.bmm(stacked, stacked.transpose(1, 2))
    if shards is not None:
        shards.sum_(gram)
    diagonal = gram.diagonal(dim1=1, dim2=2)
    diagonal.add_(diagonal.sum(dim=1, keepdim=True).mul_(damping / rank).add_(damping * DAMPING_FLOOR))
    # cholesky_ex does not synchronise a GPU to check for failure; with damping > 0 the matrix is positive
    # definite unless the factor already holds NaN/Inf, which then simply propagates.
    cholesky, _ = torch.linalg.cholesky_ex(gram)
    return out.copy_(cholesky_solve(cholesky, stacked))


def cholesky_solve(cholesky: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` for a batch of lower Cholesky factors ``L``, without waiting for an accelerator.

    On CPU: ``cholesky_inverse`` times ``rhs`` (the results the CPU path has always had). Elsewhere two triangular
    solves (:func:`triangular_solves`): ``torch.cholesky_inverse`` keeps its error codes in CPU memory (MAGMA's
    requirement) and checks them there, i.e. it waits for the device; a triangular solve (cuBLAS ``trsm``) has no
    error code to check.
    """
    if cholesky.device.type == "cpu":
        return torch.bmm(torch.cholesky_inverse(cholesky), rhs)
    return triangular_solves(cholesky, rhs)


def triangular_solves(cholesky: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs`` as ``L^-T (L^-1 rhs)``: two triangular solves, nothing read on the host.

    Example:
        >>> L = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
        >>> triangular_solves(L, L @ L.mT)  # (L L^T)^-1 (L L^T) = I
        tensor([[[1., 0.],
                 [0., 1.]]], dtype=torch.float64)
    """
    lower = torch.linalg.solve_triangular(cholesky, rhs, upper=False)
    return torch.linalg.solve_triangular(cholesky.mT, lower, upper=True)


def damped_pinv(factor: Tensor, damping: float) -> Tensor:
    """``(F F^T + damping * (tr(F F^T) / r + DAMPING_FLOOR) I)^-1 F`` for one ``r x n`` factor (see
    :func:`damped_pinvs`). ``T @ damped_pinv(A).T`` is ``T A^T (A A^T)^-1`` and ``damped_pinv(B.T) @ T`` is
    ``(B^T B)^-1 B^T T``, up to the damping.

    Example:
        >>> F = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
        >>> damped_pinv(F, damping=1e-12)  # rows of F divided by their squared norms
        tensor([[0.5000, 0.0000, 0.0000],
                [0.0000, 0.2500, 0.0000]])
    """
    return damped_pinvs([factor], damping, torch.empty((1, *factor.shape), dtype=factor.dtype, device=factor.device))[0]


def masked_copy_(target: Tensor, new: Tensor, ok: Tensor) -> Tensor:
    """``target <- new`` (rounded to ``target``'s dtype) where the bool tensor ``ok`` (0-d, or broadcasting over
    ``target``: one flag per matrix of a stack) is True; elsewhere ``target`` stays bit for bit, whatever ``new``
    holds (NaN included). A ``torch.where`` on the device: nothing is read on the host.

    Example:
        >>> x = torch.ones(3)
        >>> masked_copy_(x, torch.full((3,), float("nan")), torch.tensor(False))
        tensor([1., 1., 1.])
    """
    return torch.where(ok, new.to(target.dtype), target, out=target)


def row_chunks(n_rows: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_rows`` rows covering ``range(n_rows)``.

    Example:
        >>> list(row_chunks(5, 2))
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


CPU_CHUNK_ELEMENTS = 1 << 19
"""Elements per row chunk of the transient ``p x q`` work on CPU (2 MiB per float32 buffer); measured:
docs/design.md."""

CPU_WHOLE_MATRIX_ELEMENTS = 1 << 20
"""Matrices up to this size are done in one chunk on CPU (the working set stays in L3; docs/design.md)."""


def auto_chunk_rows(shape: tuple[int, int], device: torch.device) -> int:
    """Rows per chunk for the transient ``p x q`` work: about ``CPU_CHUNK_ELEMENTS`` on CPU, the whole matrix
    for small matrices and on accelerators (where a chunk loop would only add kernel launches).

    Example:
        >>> [auto_chunk_rows(shape, torch.device("cpu")) for shape in ((1024, 1024), (1024, 2816), (2048, 5461))]
        [1024, 186, 96]
        >>> auto_chunk_rows((2048, 5461), torch.device("meta"))
        2048
    """
    p, q = shape
    if device.type != "cpu" or p * q <= CPU_WHOLE_MATRIX_ELEMENTS:
        return p
    return max(1, min(p, CPU_CHUNK_ELEMENTS // max(q, 1)))


class Workspace:
    """Scratch buffers reused across parameters and steps.

    Buffers are keyed by a role name, dtype and device and grow to the largest request, so a whole model
    needs one buffer per role (sized by its largest matrix, or by a row chunk of it) rather than one per
    parameter. They are never part of the optimizer state: not saved, not counted by ``state_bytes()``.

    Example:
        >>> ws = Workspace()
        >>> a = ws.get("m", (2, 3), torch.float32, torch.device("cpu"))
        >>> b = ws.get("m", (3, 2), torch.float32, torch.device("cpu"))
        >>> a.data_ptr() == b.data_ptr()
        True
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._views: dict[tuple, Tensor] = {}  # cached views: a step asks for the same ones again and again

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        view = self._views.get((role, shape, dtype, device))
        if view is not None:
            return view
        numel = math.prod(shape)
        key = (role, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
            self._views = {k: v for k, v in self._views.items() if k[0] != role or k[2:] != key[1:]}
        view = self._views[(role, shape, dtype, device)] = buffer[:numel].view(shape)
        return view

    def nbytes(self) -> int:
        """Bytes currently held (for benchmarks that report scratch memory next to state memory)."""
        return sum(buffer.nbytes for buffer in self._buffers.values())
