"""One LoRA-Pre Muon step for one matrix (torch reference path), and the Newton-Schulz orthogonalisation.

Muon's momentum buffer ``M_t = mu M_{t-1} + g`` is kept as ``B A``. One step (``docs/lora-pre.md``):

    O  = NewtonSchulz5(mu B A + g)                  (Nesterov: NewtonSchulz5(g + mu (mu B A + g)))
    W <- W - lr * (scale(p, q) * O + weight_decay * W)
    B <- (1 - gamma) B + gamma * (g / (1 - mu)) A^T (A A^T)^-1        1 - gamma = sqrt(mu)
    A <- (1 - gamma) A + gamma * (B^T B)^-1 B^T (g / (1 - mu))       with the new B ("alternating") or the old

Writing ``M_t = mu M_{t-1} + (1 - mu) (g / (1 - mu))`` shows the buffer is an EMA of ``g / (1 - mu)``, which the
factors track like LoRA-Pre Adam's first moment; the gradient enters with weight gamma / (1 - mu) = 1 / (1 + sqrt(mu)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.optim.lora_pre.factors import Workspace, damped_pinvs, gradient_or_zero, masked_copy_
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
    """Approximate ``U V^T`` of ``matrix = U S V^T`` by ``steps`` quintic Newton-Schulz iterations.

    Runs in the input's dtype (float32 or float64 here); the result is a new tensor of the same shape. The input is
    first divided by its Frobenius norm (:func:`frobenius_norm`, which cannot overflow); ``read_on_host`` lets that
    norm be checked on the host, cheaper on a CPU (a CPU has nothing to wait for).

    Example:
        >>> X = newton_schulz_orthogonalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), 5)
        >>> bool(((torch.linalg.svdvals(X) - 1).abs() < 0.35).all())
        True
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    transposed = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if transposed else matrix
    x = x / (frobenius_norm(x, read_on_host) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T  # the smaller of the two Gram matrices, thanks to the transpose above
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if transposed else x


def frobenius_norm(x: Tensor, read_on_host: bool = False) -> Tensor:
    """``||x||_F`` as a 0-d tensor, also where the sum of squares overflows: the momentum of a gradient as large as
    the optimizers step with (up to ~9.2e18 in float32) has squares beyond float32's range, and ``x / inf = 0`` would
    freeze the matrix until the momentum decays.

    Where ``torch.linalg.matrix_norm`` is inf, the norm is taken again of ``x`` scaled by a power of two that brings
    its largest entry near 1 (exact, so the norm is too). With ``read_on_host`` that happens only when needed, after
    one host read; otherwise it is always computed and picked by ``torch.where`` (nothing read on the host). Finite
    norms are those of ``matrix_norm``, bit for bit.

    Example:
        >>> x = torch.tensor([[3e30, 4e30]])  # its squares overflow float32
        >>> torch.linalg.matrix_norm(x), frobenius_norm(x), frobenius_norm(x, read_on_host=True)
        (tensor(inf), tensor(5.0000e+30), tensor(5.0000e+30))
    """
    norm = torch.linalg.matrix_norm(x)
    if read_on_host and math.isfinite(norm):
        return norm
    low, high = torch.aminmax(x)
    _, exponent = torch.frexp(torch.maximum(high, low.neg()))
    scale = torch.ldexp(torch.ones_like(norm), exponent.neg())
    scaled = torch.linalg.matrix_norm(x * scale) / scale
    return scaled if read_on_host else torch.where(torch.isfinite(norm), norm, scaled)


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
) -> None:
    """Apply one LoRA-Pre Muon step to a ``p x q`` ``param`` and its factors ``B`` (``p x r``), ``A`` (``r x q``).

    ``scale`` is the update scale of :func:`muon_update_scale`. The factors' dtype is the compute dtype
    (float32, or float64 for float64 parameters); ``param`` and ``grad`` may be bf16.

    ``ok`` (a 0-d bool tensor: the device-side skip) masks every write: where it is False, ``param``, ``B`` and
    ``A`` stay bit for bit, even if ``grad`` holds NaN (it is read as zeros, so nothing computed turns NaN).
    Nothing is read on the host; the cost is a copy of ``grad`` and a ``torch.where`` per written tensor.

    Under FSDP2 (``shards`` given) ``param``, ``grad`` and ``B`` are this rank's row blocks and ``A`` is replicated.
    Newton-Schulz needs the whole momentum, so it is all-gathered (p x q, as every sharded Muon must) and each
    rank keeps its rows of the result; the factor update sums ``B^T B`` and ``B^+ g`` (r x r, r x q) over ranks.

    Example:
        >>> from lit_lowrank.optim.lora_pre.factors import init_factor_pairs
        >>> W, g = torch.zeros(6, 4), torch.randn(6, 4)
        >>> ((B, A),) = init_factor_pairs((6, 4), 2, 0, 1, torch.float32, W.device)
        >>> lora_pre_muon_update_(W, g, B, A, lr=0.1, momentum=0.95, nesterov=False, weight_decay=0.0,
        ...     ns_steps=5, scale=1.0, damping=1e-6, factor_update="alternating", workspace=Workspace())
        >>> torch.linalg.svdvals(W).round(decimals=1)  # lr times an (almost) orthogonal matrix
        tensor([0.1000, 0.1000, 0.1000, 0.1000])
    """
    p, q = param.shape
    dtype, device = B.dtype, B.device
    if ok is not None:
        g = gradient_or_zero(grad, ok, workspace.get("grad", (p, q), dtype, device))
    else:
        g = grad if grad.dtype == dtype else workspace.get("grad", (p, q), dtype, device).copy_(grad)

    buffer = workspace.get("momentum", (p, q), dtype, device)
    torch.addmm(g, B, A, alpha=momentum, out=buffer)  # M_t = mu M_{t-1} + g
    if nesterov:
        buffer.mul_(momentum).add_(g)
    if shards is None:
        update = newton_schulz_orthogonalize(buffer, ns_steps, read_on_host=ok is None and device.type == "cpu")
    else:
        update = shards.local_rows(newton_schulz_orthogonalize(shards.gather(buffer), ns_steps))
    _apply_update_(param, update, lr=lr, scale=scale, weight_decay=weight_decay, ok=ok)

    gamma = 1.0 - math.sqrt(momentum)
    gain = gamma / (1.0 - momentum)  # the target is g / (1 - mu)

    def pinv(factor: Tensor, role: str, shards: RowShards | None = None) -> Tensor:
        out = workspace.get(role, (1, *factor.shape), dtype, device)
        return damped_pinvs([factor], damping, out, workspace, shards)[0]

    A_pinv = pinv(A, "right_pinv")
    if factor_update == "jacobi":
        B_pinv = pinv(B.T, "left_pinv", shards)
    if ok is None:
        B.addmm_(g, A_pinv.T, beta=1.0 - gamma, alpha=gain)
    else:
        masked_copy_(B, torch.addmm(B, g, A_pinv.T, beta=1.0 - gamma, alpha=gain), ok)
    if factor_update != "jacobi":
        B_pinv = pinv(B.T, "left_pinv", shards)
    if shards is None and ok is None:
        A.addmm_(B_pinv, g, beta=1.0 - gamma, alpha=gain)
        return
    # Sharded, each rank holds B^+ g for its rows only: summed over ranks before the replicated A moves.
    product = B_pinv @ g if shards is None else shards.sum_(B_pinv @ g)
    if ok is None:
        A.mul_(1.0 - gamma).add_(product, alpha=gain)
    else:
        masked_copy_(A, torch.mul(A, 1.0 - gamma).add_(product, alpha=gain), ok)


def _apply_update_(param: Tensor, update: Tensor, *, lr: float, scale: float, weight_decay: float,
                   ok: Tensor | None) -> None:
    """``W <- W - lr * (scale * update + weight_decay * W)`` (decay first, rounded to W's dtype, as in place);
    with ``ok`` only where it holds."""
    if ok is None:
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update, alpha=-lr * scale)
        return
    decayed = param * (1.0 - lr * weight_decay) if weight_decay != 0.0 else param
    masked_copy_(param, torch.add(decayed, update, alpha=-lr * scale), ok)


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
    _apply_update_(param, update, lr=lr, scale=scale, weight_decay=weight_decay, ok=ok)
