"""The LoRA-Pre Adam step, written once: :func:`lora_pre_adam_step_` on a batch of same-shape matrices.

For each matrix (the math, our defaults and why: ``docs/lora-pre.md``):

    m_t = beta1 * (B A) + (1 - beta1) * g                     (B, A from step t-1)
        + (beta1 - beta1^t) * (g - g A_pinv^T A)                (the residual step, default: docs/lora-pre.md)
    v_t = beta2 * (D_t V_B V_A)^2 + (1 - beta2) * g^2         D_t: the warm-up correction (1 without debiasing)
    m_hat = m_t / (1 - beta1^t),  v_hat = max(v_t / (1 - beta2^t), m_hat^2 / C)   (the bound; C = 1 by default)
    W  <- W - lr * ( scale * m_hat / (sqrt(v_hat) + eps) + weight_decay * W )
    B  <- (1 - gamma1) B + gamma1 * g A^T (A A^T)^-1          1 - gamma1 = sqrt(beta1)
    A  <- (1 - gamma1) A + gamma1 * (B^T B)^-1 B^T g          B: the new B ("alternating"), or the old one ("jacobi")
    V_B, V_A: the same with gamma2 (1 - gamma2 = beta2^(1/4)) and target |g|

The factor algebra (one batched damped pseudo-inverse per side, the blends, the FSDP2 sums) is here; the two passes
over ``g`` come from a backend (:mod:`.adam_passes` in torch, :mod:`.adam_kernel` as Triton kernels), chosen by
:func:`adam_passes`. :func:`lora_pre_adam_update_` is the same step for one matrix.
"""

from __future__ import annotations

from torch import Tensor

from lit_lowrank.optim.lora_pre.adam_passes import AdamHyper, TorchAdamPasses
from lit_lowrank.optim.lora_pre.adam_scalars import adam_rates
from lit_lowrank.optim.lora_pre.batch import MatrixBatch, blend_, stacked_pinvs
from lit_lowrank.optim.lora_pre.factors import Workspace
from lit_lowrank.optim.sharding import RowShards

UPDATE_BOUNDS = ("v_floor", "adam_floor", "rms_clip", "none")
"""How the update is bounded: ``v_hat`` floored at ``m_hat^2`` (``|update| <= 1``, the default), floored at
``m_hat^2 / C_t`` (Adam's own worst case, ``|update| <= sqrt(C_t)``), the update's RMS over the matrix clipped at
1 (Adafactor), or not at all (the paper's formula: unsafe, see ``docs/lora-pre.md``)."""


def adam_passes(batch: MatrixBatch, hyper: AdamHyper, workspace: Workspace, use_triton=False):
    """The backend for this batch: the Triton kernels if ``use_triton`` asks for them and they can run
    (:func:`~lit_lowrank.optim.lora_pre.adam_kernel.kernel_passes`), else torch."""
    torch_passes = TorchAdamPasses(batch, hyper, workspace)
    if use_triton is False:
        return torch_passes
    from lit_lowrank.optim.lora_pre.adam_kernel import kernel_passes

    return kernel_passes(batch, hyper, workspace, use_triton, torch_passes) or torch_passes


def lora_pre_adam_step_(batch: MatrixBatch, hyper: AdamHyper, workspace: Workspace, use_triton=False) -> None:
    """One LoRA-Pre Adam step of every matrix of ``batch``: its parameters and stacked factors, in place (the
    caller copies the factors back: :meth:`MatrixBatch.write_back`).

    Per batch, whatever its size: two batched damped pseudo-inverses (``[A, V_A]``, then ``[B, V_B]`` once
    updated; both from the old factors for Jacobi), the backend's two passes and four blends. Under FSDP2 the
    ``r x r`` Grams and the ``r x q`` products are summed over ranks once per batch; nothing ``p x q`` moves.
    With the device-side skip (``batch.ok``) every write is kept only where ``ok`` holds, and nothing is read on
    the host.
    """
    passes = adam_passes(batch, hyper, workspace, use_triton)
    _, gamma1, gamma2 = adam_rates(hyper.beta1, hyper.beta2)
    jacobi, ok, shards = hyper.factor_update == "jacobi", batch.ok3, batch.shards
    right_pinvs = stacked_pinvs(batch.right, "right_pinv", hyper.damping, workspace)
    if jacobi:
        left_pinvs = stacked_pinvs(batch.left.mT, "left_pinv", hyper.damping, workspace, shards)
    left_sums = passes.first_pass(right_pinvs)
    blend_(batch.left[0], 1.0 - gamma1, left_sums[0], gamma1, ok)
    blend_(batch.left[1], 1.0 - gamma2, left_sums[1], gamma2, ok)
    if not jacobi:
        left_pinvs = stacked_pinvs(batch.left.mT, "left_pinv", hyper.damping, workspace, shards)
    right_sums = passes.second_pass(left_pinvs)
    if shards is not None:  # each rank summed its rows only
        shards.sum_(right_sums)
    blend_(batch.right[0], 1.0 - gamma1, right_sums[0], gamma1, ok)
    blend_(batch.right[1], 1.0 - gamma2, right_sums[1], gamma2, ok)


def lora_pre_adam_update_(
    param: Tensor,
    grad: Tensor,
    B: Tensor,
    A: Tensor,
    V_B: Tensor,
    V_A: Tensor,
    *,
    step: int | Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    damping: float,
    factor_update: str,
    chunk_rows: int | None,
    workspace: Workspace,
    shards: RowShards | None = None,
    debias_second_moment: bool = True,
    update_bound: str = "v_floor",
    use_triton=False,
    grad_absmax: float | None = None,
    ok: Tensor | None = None,
    residual_step: bool = True,
) -> None:
    """Apply LoRA-Pre Adam step ``step`` (>= 1) to one ``p x q`` ``param`` and its factors, all in place: the step of
    :func:`lora_pre_adam_step_` for a batch of one.

    ``B, V_B`` are ``p x r`` and ``A, V_A`` are ``r x q``, in the factor dtype (float32, or float64 for float64
    parameters); ``param`` and ``grad`` may have any floating dtype (bf16 included). ``m_t`` and ``v_t`` are never
    stored: they are formed ``chunk_rows`` rows at a time (None: automatic) in ``workspace`` buffers.
    ``residual_step`` (default) steps the part of ``g`` outside the rows of ``A`` at full weight (see
    :class:`~lit_lowrank.optim.LoRAPreAdamW`). ``debias_second_moment`` (default) rescales ``V_B V_A`` so that ``v_t``
    warms up like Adam's; ``update_bound``
    is one of ``UPDATE_BOUNDS``; ``grad_absmax`` (``max |g|``) lets the CPU path form squares where they cannot
    overflow. Under FSDP2 (``shards``) ``param``, ``grad``, ``B`` and ``V_B`` are this rank's row blocks and ``A``,
    ``V_A`` replicated. ``use_triton``: the fused kernels (:mod:`lit_lowrank.kernels.dispatch`; float32 factors,
    rank <= 128, not ``rms_clip``). ``ok`` (0-d bool) selects the device-side skip: ``step`` is then the count as
    a 0-d tensor, this step included when ``ok`` holds, and where ``ok`` is False nothing changes, bit for bit.

    Example:
        >>> import torch
        >>> from lit_lowrank.optim.lora_pre.factors import init_factor_pairs
        >>> W, g = torch.zeros(6, 4), torch.ones(6, 4)
        >>> (B, A), (V_B, V_A) = init_factor_pairs((6, 4), 2, 0, 2, torch.float32, W.device)
        >>> lora_pre_adam_update_(W, g, B, A, V_B, V_A, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
        ...     weight_decay=0.0, scale=1.0, damping=1e-6, factor_update="alternating", chunk_rows=None,
        ...     workspace=Workspace())
        >>> W.unique()  # Adam's first step moves every entry by lr
        tensor([-0.1000])
    """
    steps = step if ok is None else step.reshape(1)
    batch = MatrixBatch.gather([param], [grad], [[B, A, V_B, V_A]], step=steps, workspace=workspace,
                               ok=None if ok is None else ok.reshape(1), shards=shards, grad_absmax=grad_absmax)
    hyper = AdamHyper(lr, beta1, beta2, eps, weight_decay, scale, damping, factor_update, debias_second_moment,
                      update_bound, chunk_rows, residual_step)
    lora_pre_adam_step_(batch, hyper, workspace, use_triton)
    batch.write_back()
