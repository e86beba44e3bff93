"""The LoRA-Pre Muon step, written once for a batch of same-shape matrices, and the Newton-Schulz orthogonalisation.

Muon's momentum buffer ``M_t = mu M_{t-1} + g`` is kept as ``B A``. One step (``docs/lora-pre.md``):

    M  = mu B A + g + c_t (g - g A_pinv^T A)        c_t = (1 - mu^t) / (1 - mu) - 1: the residual step (default)
    O  = NewtonSchulz5(M)                           (Nesterov: NewtonSchulz5(g + mu M))
    W <- W - lr * (scale(p, q) * O + weight_decay * W)
    B <- (1 - gamma) B + gamma * (g / (1 - mu)) A^T (A A^T)^-1        1 - gamma = sqrt(mu)
    A <- (1 - gamma) A + gamma * (B^T B)^-1 B^T (g / (1 - mu))       with the new B ("alternating") or the old

Writing ``M_t = mu M_{t-1} + (1 - mu) (g / (1 - mu))`` shows the buffer is an EMA of ``g / (1 - mu)``, which the
factors track like LoRA-Pre Adam's first moment; the gradient enters with weight gamma / (1 - mu) = 1 / (1 + sqrt(mu)).
The residual step gives the part of ``g`` outside the rows of ``A``, which ``B A`` cannot hold, the weight a steady
direction has in an exact buffer after ``t`` steps, ``(1 - mu^t) / (1 - mu)``, instead of 1 (as LoRA-Pre Adam's).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lit_lowrank.optim.lora_pre.adam_scalars import residual_weight
from lit_lowrank.optim.lora_pre.batch import MatrixBatch, blend_, stacked_pinvs, update_params_
from lit_lowrank.optim.lora_pre.factors import Workspace, masked_copy_
from lit_lowrank.optim.sharding import RowShards

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of the odd quintic ``a x + b x^3 + c x^5`` iterated on the singular values. These are the values of
Keller Jordan's Muon (2024). They are tuned for speed, not exactness: the large slope ``a`` at 0 pulls small
singular values up quickly, and the polynomial keeps every singular value of a norm-1 input roughly within
[0.7, 1.2] after five steps, which is as orthogonal as the update needs to be."""

SCALE_RULES = ("muon", "adamw_rms")


def muon_update_scale(shape: tuple[int, int], rule: str) -> float:
    """Factor applied to the orthogonalised update of a ``p x q`` matrix (rows and columns as stored).

    ``"muon"``: ``sqrt(max(1, p / q))`` as in Keller Jordan's Muon, for an ``nn.Linear`` weight (``out x in``)
    ``sqrt(max(1, fan_out / fan_in))`` (the RMS-to-RMS operator norm convention). ``"adamw_rms"``:
    ``0.2 * sqrt(max(p, q))`` as in Moonlight (Liu et al., 2025): the update's RMS becomes ~0.2, like AdamW's,
    so AdamW's learning rate and weight decay can be reused.

    Example:
        >>> muon_update_scale((4096, 1024), "muon"), muon_update_scale((1024, 4096), "adamw_rms")
        (2.0, 12.8)
    """
    p, q = shape
    if rule == "muon":
        return math.sqrt(max(1.0, p / q))
    if rule == "adamw_rms":
        return 0.2 * math.sqrt(max(p, q))
    raise ValueError(f"Unknown Muon scale rule {rule!r}; expected one of {SCALE_RULES}.")


def newton_schulz_orthogonalize(matrix: Tensor, steps: int, eps: float = 1e-7, read_on_host: bool = False) -> Tensor:
    """Approximate ``U V^T`` of ``matrix = U S V^T`` by ``steps`` quintic Newton-Schulz iterations; ``matrix`` is one
    ``p x q`` matrix or a batch ``L x p x q`` (each orthogonalised on its own, by batched products).

    Runs in the input's dtype (float32 or float64 here); the result is a new tensor of the same shape. Each matrix
    is first divided by its Frobenius norm (:func:`frobenius_norm`, which cannot overflow); ``read_on_host`` lets
    that norm be checked on the host, cheaper on a CPU (a CPU has nothing to wait for).

    Example:
        >>> X = newton_schulz_orthogonalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), 5)
        >>> bool(((torch.linalg.svdvals(X) - 1).abs() < 0.35).all())
        True
    """
    if matrix.ndim == 2:
        return newton_schulz_orthogonalize(matrix.unsqueeze(0), steps, eps, read_on_host)[0]
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    transposed = matrix.shape[1] > matrix.shape[2]
    x = matrix.mT if transposed else matrix
    x = x / (frobenius_norm(x, read_on_host) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)  # the smaller of the two Gram matrices, thanks to the transpose above
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return x.mT if transposed else x


def frobenius_norm(x: Tensor, read_on_host: bool = False) -> Tensor:
    """``||x||_F`` of a matrix (0-d), or of each matrix of an ``L x p x q`` batch (``L x 1 x 1``), also where the sum
    of squares overflows: the momentum of a gradient as large as the optimizers step with (up to ~9.2e18 in
    float32) has squares beyond float32's range, and ``x / inf = 0`` would freeze the matrix until the momentum
    decays.

    Where ``torch.linalg.matrix_norm`` is inf, the norm is taken again of ``x`` scaled by a power of two that brings
    its largest entry near 1 (exact, so the norm is too). With ``read_on_host`` that happens only when needed, after
    one host read; otherwise it is always computed and picked by ``torch.where`` (nothing read on the host). Finite
    norms are those of ``matrix_norm``, bit for bit.

    Example:
        >>> x = torch.tensor([[3e30, 4e30]])  # its squares overflow float32
        >>> torch.linalg.matrix_norm(x), frobenius_norm(x), frobenius_norm(x, read_on_host=True)
        (tensor(inf), tensor(5.0000e+30), tensor(5.0000e+30))
    """
    if x.ndim == 2:
        return frobenius_norm(x.unsqueeze(0), read_on_host).reshape(())
    norm = torch.linalg.matrix_norm(x, keepdim=True)
    if read_on_host and bool(torch.isfinite(norm).all()):
        return norm
    low, high = torch.aminmax(x.flatten(1), dim=1)
    _, exponent = torch.frexp(torch.maximum(high, low.neg()))
    scale = torch.ldexp(torch.ones_like(high), exponent.neg()).view(-1, 1, 1)
    scaled = torch.linalg.matrix_norm(x * scale, keepdim=True) / scale
    return torch.where(torch.isfinite(norm), norm, scaled)


class MuonHyper(NamedTuple):
    """A param group's LoRA-Pre Muon hyper-parameters for one batch (``scale``: :func:`muon_update_scale` of its
    shape)."""

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    ns_steps: int
    scale: float
    damping: float = 1e-6
    factor_update: str = "alternating"
    residual_step: bool = True


def lora_pre_muon_step_(batch: MatrixBatch, hyper: MuonHyper, workspace: Workspace) -> None:
    """One LoRA-Pre Muon step of every matrix of ``batch`` (parameters and stacked factors ``B``, ``A``, in place;
    the caller copies the factors back: :meth:`MatrixBatch.write_back`): one batched Newton-Schulz, two batched
    damped pseudo-inverses and one ``_foreach`` parameter update per batch, whatever its size.

    With the device-side skip (``batch.ok``) every write is kept only where ``ok`` holds: a skipped matrix's
    parameter and factors stay bit for bit, even if its gradient holds NaN (it is read as zeros, so nothing computed
    turns NaN). Nothing is read on the host then. Under FSDP2 (``batch.shards``) the parameters, gradients and ``B``
    are this rank's row blocks and ``A`` is replicated: Newton-Schulz needs the whole momentum, so it is
    all-gathered (p x q, as every sharded Muon must) and each rank keeps its rows; the factor update sums ``B^T B``
    and ``B^+ g`` (r x r, r x q) over ranks.
    """
    ok, shards, mu = batch.ok3, batch.shards, hyper.momentum
    B, A = batch.left[0], batch.right[0]
    g = batch.stacked_grads(workspace)
    A_pinv = stacked_pinvs(batch.right, "right_pinv", hyper.damping, workspace)[0]
    projected = torch.bmm(g, A_pinv.mT) if hyper.residual_step else None  # B's regression product, formed anyway
    momentum = _momentum(batch, g, projected, mu, workspace.get("momentum", tuple(g.shape), g.dtype, g.device))
    if hyper.nesterov:
        momentum.mul_(mu).add_(g)  # g + mu * M_t
    update = _orthogonalize(momentum, hyper.ns_steps, shards, read_on_host=ok is None and g.device.type == "cpu")
    update_params_(batch.params, update, alpha=-hyper.lr * hyper.scale, decay=1.0 - hyper.lr * hyper.weight_decay,
                   ok=ok)

    gamma = 1.0 - math.sqrt(mu)
    gain = gamma / (1.0 - mu)  # the target is g / (1 - mu)
    if hyper.factor_update == "jacobi":
        B_pinv = stacked_pinvs(batch.left.mT, "left_pinv", hyper.damping, workspace, shards)[0]
    if ok is None and projected is None:
        B.baddbmm_(g, A_pinv.mT, beta=1.0 - gamma, alpha=gain)
    else:
        blend_(B, 1.0 - gamma, torch.bmm(g, A_pinv.mT) if projected is None else projected, gain, ok)
    if hyper.factor_update != "jacobi":
        B_pinv = stacked_pinvs(batch.left.mT, "left_pinv", hyper.damping, workspace, shards)[0]
    if shards is None and ok is None:
        A.baddbmm_(B_pinv, g, beta=1.0 - gamma, alpha=gain)
        return
    product = torch.bmm(B_pinv, g)  # sharded: each rank holds B^+ g for its rows only, summed before A moves
    blend_(A, 1.0 - gamma, product if shards is None else shards.sum_(product), gain, ok)


def _momentum(batch: MatrixBatch, g: Tensor, projected: Tensor | None, mu: float, out: Tensor) -> Tensor:
    """``mu B A + g``, plus the residual step's ``c_t (g - S A)`` with ``S = g A_pinv^T`` (``projected``) when given:
    ``(1 + c_t) g + (mu B - c_t S) A``, one product either way. ``c_t`` is a float shared by the batch on the host, an
    ``L x 1 x 1`` tensor from the step counts on the device-side skip (nothing read on the host)."""
    B, A = batch.left[0], batch.right[0]
    if projected is None:
        return torch.baddbmm(g, B, A, alpha=mu, out=out)
    c = residual_weight(batch.step, mu)
    if isinstance(c, Tensor):
        c = (c - 1.0).to(g.dtype).view(-1, 1, 1)
        return torch.baddbmm(g * (1.0 + c), B * mu - projected * c, A, out=out)
    c -= 1.0
    return torch.baddbmm(g, torch.mul(B, mu).sub_(projected, alpha=c), A, beta=1.0 + c, out=out)


def _orthogonalize(momentum: Tensor, steps: int, shards: RowShards | None, read_on_host: bool) -> Tensor:
    """Newton-Schulz of each matrix of the batch; sharded, of the whole matrices gathered from their row blocks."""
    if shards is None:
        return newton_schulz_orthogonalize(momentum, steps, read_on_host=read_on_host)
    whole = torch.stack([shards.gather(rows) for rows in momentum.unbind(0)])
    return torch.stack([shards.local_rows(matrix) for matrix in newton_schulz_orthogonalize(whole, steps).unbind(0)])


def lora_pre_muon_update_(
    param: Tensor,
    grad: Tensor,
    B: Tensor,
    A: Tensor,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
    scale: float,
    damping: float,
    factor_update: str,
    workspace: Workspace,
    shards: RowShards | None = None,
    ok: Tensor | None = None,
    step: int | Tensor | None = None,
    residual_step: bool = True,
) -> None:
    """Apply one LoRA-Pre Muon step to a ``p x q`` ``param`` and its factors ``B`` (``p x r``), ``A`` (``r x q``): the
    step of :func:`lora_pre_muon_step_` for a batch of one.

    ``step``: this step's count (>= 1; with ``ok``, a 0-d tensor counting this step where ``ok`` holds), which the
    residual step's weight needs; ``residual_step=False``: the paper's momentum, which needs no count.

    ``scale`` is the update scale of :func:`muon_update_scale`. The factors' dtype is the compute dtype
    (float32, or float64 for float64 parameters); ``param`` and ``grad`` may be bf16. ``ok`` (a 0-d bool tensor:
    the device-side skip) masks every write; ``shards``: FSDP2 row blocks, as in :func:`lora_pre_muon_step_`.

    Example:
        >>> from lit_lowrank.optim.lora_pre.factors import init_factor_pairs
        >>> W, g = torch.zeros(6, 4), torch.randn(6, 4)
        >>> ((B, A),) = init_factor_pairs((6, 4), 2, 0, 1, torch.float32, W.device)
        >>> lora_pre_muon_update_(W, g, B, A, lr=0.1, momentum=0.95, nesterov=False, weight_decay=0.0,
        ...     ns_steps=5, scale=1.0, damping=1e-6, factor_update="alternating", workspace=Workspace(), step=1)
        >>> torch.linalg.svdvals(W).round(decimals=1)  # lr times an (almost) orthogonal matrix
        tensor([0.1000, 0.1000, 0.1000, 0.1000])
    """
    if residual_step and step is None:
        raise ValueError("lora_pre_muon_update_: the residual step weighs the gradient by the step count: pass "
                         "step=t (this step's count, from 1), or residual_step=False for the paper's momentum.")
    steps = 0 if step is None else step if ok is None else step.reshape(1)
    batch = MatrixBatch.gather([param], [grad], [[B, A]], step=steps, workspace=workspace,
                               ok=None if ok is None else ok.reshape(1), shards=shards)
    lora_pre_muon_step_(batch, MuonHyper(lr, momentum, nesterov, weight_decay, ns_steps, scale, damping,
                                         factor_update, residual_step), workspace)
    batch.write_back()


def dense_muon_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
    scale: float,
    ok: Tensor | None = None,
) -> None:
    """Plain Muon with a dense momentum buffer (the ``full_rank="dense"`` fallback of LoRAPreMuon); ``ok`` as in
    :func:`lora_pre_muon_update_`."""
    if ok is None:
        momentum_buffer.mul_(momentum).add_(grad)
    else:
        grad = torch.where(ok, grad, 0.0)
        masked_copy_(momentum_buffer, torch.mul(momentum_buffer, momentum).add_(grad), ok)
    direction = momentum_buffer
    if nesterov:
        direction = torch.add(grad, momentum_buffer, alpha=momentum)
    update = newton_schulz_orthogonalize(direction, ns_steps, read_on_host=ok is None and param.device.type == "cpu")
    update_params_([param], update.unsqueeze(0), alpha=-lr * scale, decay=1.0 - lr * weight_decay,
                   ok=None if ok is None else ok.view(1, 1, 1))
