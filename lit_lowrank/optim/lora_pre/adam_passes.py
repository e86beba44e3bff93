"""The two passes over ``g`` of a LoRA-Pre Adam step, in torch, for a :class:`~.batch.MatrixBatch`.

:func:`~lit_lowrank.optim.lora_pre.adam_update.lora_pre_adam_step_` does the factor algebra (damped
pseudo-inverses, blends) once for every backend; a backend supplies the ``p x q`` work:

- ``first_pass(right_pinvs)``: the parameter update from ``m_t, v_t`` (formed a row chunk at a time, never stored)
  and the left factors' regression products ``[g A_pinv^T, |g| V_A_pinv^T]`` (``2 x L x p x r``);
- ``second_pass(left_pinvs)``: the right factors' products ``[B_pinv g, V_B_pinv |g|]`` (``2 x L x r x q``).

:class:`TorchAdamPasses` is the torch backend in two modes: the host path (Python-float scalars, read once on the
host) and the device-side skip (``batch.ok`` set: scalars as ``L x 1 x 1`` tensors from the step counts, writes
kept only where ``ok`` holds, nothing read on the host). The Triton backend, :mod:`.adam_kernel`, runs the same two
passes as kernels and falls back to this class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lit_lowrank.optim.lora_pre.adam_scalars import (
    NO_FLOOR,
    adam_rates,
    adam_step_constants,
    adam_step_tensors,
    device_step_inputs,
    residual_weight,
)
from lit_lowrank.optim.lora_pre.batch import MatrixBatch, decay_, update_params_
from lit_lowrank.optim.lora_pre.factors import Workspace, auto_chunk_rows, row_chunks


class AdamHyper(NamedTuple):
    """A param group's LoRA-Pre Adam hyper-parameters, as one step uses them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    scale: float
    damping: float
    factor_update: str = "alternating"
    debias_second_moment: bool = True
    update_bound: str = "v_floor"
    chunk_rows: int | None = None
    residual_step: bool = True

    @classmethod
    def of(cls, group: dict) -> AdamHyper:
        beta1, beta2 = group["betas"]
        return cls(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["scale"], group["damping"],
                   group["factor_update"], group["debias_second_moment"], group["update_bound"], group["chunk_rows"],
                   group["residual_step"])

    def step_inputs(self):
        return device_step_inputs(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, scale=self.scale,
                                  debias_second_moment=self.debias_second_moment, update_bound=self.update_bound)


SQUARES_LIMIT = 2.0**62
"""Inputs below this in magnitude cannot overflow ``x^2 + y^2`` in float32 (largest finite value ~2^128)."""


class TorchAdamPasses:
    """The torch backend of the LoRA-Pre Adam step (see the module docstring).

    Two algebraic rewrites keep the element-wise work to a few passes and away from overflow:
    ``m_t = (1 - beta1) * (g + kappa * B A)`` (one ``baddbmm``) and ``sqrt(v_t) = sqrt(1 - beta2) * hypot(g, rho *
    V_B V_A)``, so neither ``g^2`` nor ``(V_B V_A)^2`` is formed; the constant factors move into the step size and
    epsilon (:func:`~lit_lowrank.optim.lora_pre.adam_scalars.adam_step_constants`). On the host path ``m`` is formed
    pre-scaled by the floor factor (the bound is then one ``maximum``), and where every operand is known to be small
    (:meth:`_squares_are_safe`, CPU only) ``hypot`` is formed from squares, which is faster there (docs/design.md).
    A batch of one matrix is done ``chunk_rows`` rows at a time; a batch of several, whole.
    """

    def __init__(self, batch: MatrixBatch, hyper: AdamHyper, workspace: Workspace) -> None:
        self.batch, self.hyper, self.workspace = batch, hyper, workspace
        p, q = batch.params[0].shape
        rows = p if batch.size > 1 else hyper.chunk_rows or auto_chunk_rows((p, q), batch.left.device)
        self.chunks = list(row_chunks(p, rows))
        self.kappa = adam_rates(hyper.beta1, hyper.beta2)[0]
        self._last: tuple[slice, Tensor, Tensor] | None = None  # pass 1's last chunk, reused by pass 2

    # ------------------------------------------------------------------------------------------- scalars
    def _scalars(self, right_pinvs: Tensor) -> None:
        """``rho, eps_hat, floor`` and the step size(s) of this step, and how ``m`` is formed (``m_beta, m_alpha``,
        and ``residual``: ``a_t``, see :meth:`_first_moment`)."""
        b, h = self.batch, self.hyper
        self.residual = residual_weight(b.step, h.beta1) if h.residual_step else None
        if b.ok is None:
            c = adam_step_constants(step=b.step, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, scale=h.scale,
                                    debias_second_moment=h.debias_second_moment, update_bound=h.update_bound)
            self.rho, self.eps_hat, self.floor, step_size = c.rho, c.eps_hat, c.floor, c.step_size
            # With a floor, m is formed as floor * (g + kappa B A), so that the floor is a plain maximum with |m|.
            self.m_beta, self.m_alpha = (c.floor, c.floor * self.kappa) if c.floor else (1.0, self.kappa)
            self.step_size = step_size / c.floor if c.floor else step_size
        else:
            inputs = self.hyper.step_inputs()
            tensors = adam_step_tensors(b.step, inputs)
            self.rho, self.step_size, self.eps_hat, self.floor = (t.to(b.left.dtype).view(-1, 1, 1) for t in tensors)
            self.m_beta, self.m_alpha, self.has_floor = 1.0, self.kappa, inputs.bound != NO_FLOOR
            if self.residual is not None:  # m is formed divided by a_t (per matrix): the scalars carry a_t instead
                self.residual = self.residual.to(b.left.dtype).view(-1, 1, 1)
                self.step_size, self.floor = self.step_size * self.residual, self.floor * self.residual
        if h.update_bound == "rms_clip":  # a first look at the whole update: the step that keeps its RMS at most 1
            m_hat_per_m = self.step_size / (h.lr * h.scale) if h.lr else self.step_size * 0.0
            factors = self._rms_clip_factors(m_hat_per_m, right_pinvs)
            self.step_size = ([self.step_size * f for f in factors] if b.ok is None else self.step_size * factors)

    # -------------------------------------------------------------------------------------------- passes
    def first_pass(self, right_pinvs: Tensor) -> Tensor:
        """Update the parameters; return ``[g A_pinv^T, |g| V_A_pinv^T]`` (``2 x L x p x r``)."""
        b, ws = self.batch, self.workspace
        (B, V_B), (A, V_A) = b.left, b.right
        self._scalars(right_pinvs)  # here, not in __init__: unused when a kernel runs this pass
        sums = ws.get("left_sums", (2, *B.shape), B.dtype, B.device)
        squares = self._squares_are_safe()
        for rows in self.chunks:
            g = b.stacked_grads(ws, rows)
            projected = torch.bmm(g, right_pinvs[0].mT, out=sums[0][:, rows])  # g A_pinv^T: B's regression, and
            m, root_v, abs_g = self._moments(g, B[:, rows], V_B[:, rows], A, V_A, squares, projected)  # the residual
            self._update_params(rows, m, root_v)
            torch.bmm(abs_g, right_pinvs[1].mT, out=sums[1][:, rows])
            self._last = (rows, g, abs_g)
        return sums

    def second_pass(self, left_pinvs: Tensor) -> Tensor:
        """``[B_pinv g, V_B_pinv |g|]`` (``2 x L x r x q``), summed over this rank's rows.

        It visits the chunks backwards: the last chunk of pass 1 is still in the buffers, so its ``g`` and ``|g|``
        (for a matrix done in one chunk, all of them) are reused rather than formed again."""
        b, ws = self.batch, self.workspace
        A = b.right[0]
        sums = ws.get("right_sums", (2, *A.shape), A.dtype, A.device)
        for index, rows in enumerate(reversed(self.chunks)):
            if index == 0 and self._last is not None and self._last[0] == rows:
                g, abs_g = self._last[1:]
            else:
                g = b.stacked_grads(ws, rows)
                abs_g = torch.abs(g, out=ws.get("abs_grad", tuple(g.shape), g.dtype, g.device))
            keep = 0.0 if index == 0 else 1.0  # beta = 0 ignores the buffer's stale values
            sums[0].baddbmm_(left_pinvs[0][:, :, rows], g, beta=keep)
            sums[1].baddbmm_(left_pinvs[1][:, :, rows], abs_g, beta=keep)
        return sums

    # --------------------------------------------------------------------------------------------- parts
    def _first_moment(self, g: Tensor, B: Tensor, A: Tensor, projected: Tensor, out: Tensor) -> Tensor:
        """``m_t / (1 - beta1)`` of a chunk into ``out`` (pre-scaled by the floor on the host; divided by ``a_t`` on
        the device-side skip, whose scalars carry it).

        Without the residual step it is ``g + kappa B A``. With it, ``m_t = beta1 B A + (1 - beta1) g + (beta1 -
        beta1^t) (g - g A_pinv^T A)``: the part of ``g`` outside the rows of ``A`` enters at weight ``1 - beta1^t``,
        i.e. 1 after bias correction, instead of ``1 - beta1``; divided by ``1 - beta1`` that is ``a_t g + (kappa B
        - (a_t - 1) S) A`` with ``a_t = (1 - beta1^t) / (1 - beta1)`` and ``S = g A_pinv^T`` (``projected``, the
        left factor's regression product, formed anyway): one ``rows x r`` combination more, no extra product."""
        if self.residual is None:
            return torch.baddbmm(g, B, A, beta=self.m_beta, alpha=self.m_alpha, out=out)
        left = self.workspace.get("residual_left", tuple(B.shape), B.dtype, B.device)
        if self.batch.ok is None:  # host: a_t a Python float shared by the batch
            torch.mul(B, self.kappa, out=left).sub_(projected, alpha=self.residual - 1.0)
            return torch.baddbmm(g, left, A, beta=self.m_beta * self.residual, alpha=self.m_beta, out=out)
        a = self.residual  # (L, 1, 1): (kappa B - (a - 1) S) / a, then m / a = g + that A
        torch.mul(B, self.kappa / a, out=left).sub_(projected * ((a - 1.0) / a))
        return torch.baddbmm(g, left, A, out=out)

    def _moments(self, g: Tensor, B: Tensor, V_B: Tensor, A: Tensor, V_A: Tensor, squares: bool,
                 projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``m`` (:meth:`_first_moment`), ``root_v`` (``sqrt(v_hat) / c`` bounded, plus ``eps_hat``) and ``|g|`` of a
        chunk, in workspace buffers."""
        ws, shape, dtype, device = self.workspace, tuple(g.shape), B.dtype, B.device
        m = self._first_moment(g, B, A, projected, ws.get("m", shape, dtype, device))
        root_v = ws.get("root_v", shape, dtype, device)
        abs_g = torch.abs(g, out=ws.get("abs_grad", shape, dtype, device))
        if self.batch.ok is not None:
            torch.bmm(V_B, V_A, out=root_v).mul_(self.rho)
            torch.hypot(root_v, abs_g, out=root_v)
            if self.has_floor:
                torch.maximum(root_v, torch.abs(m).mul_(self.floor), out=root_v)
            return m, root_v.add_(self.eps_hat), abs_g
        torch.baddbmm(root_v, V_B, V_A, beta=0.0, alpha=self.rho, out=root_v)
        floor_buffer = ws.get("abs_m", shape, dtype, device) if self.floor else None
        if squares:  # the same, from squares: cheaper than torch.hypot's one slow pass on CPU
            torch.mul(root_v, root_v, out=root_v).addcmul_(g, g)
            if self.floor:
                torch.maximum(root_v, torch.mul(m, m, out=floor_buffer), out=root_v)
            root_v.sqrt_()
        else:
            torch.hypot(root_v, abs_g, out=root_v)
            if self.floor:
                torch.maximum(root_v, torch.abs(m, out=floor_buffer), out=root_v)
        return m, root_v.add_(self.eps_hat), abs_g

    def _update_params(self, rows: slice, m: Tensor, root_v: Tensor) -> None:
        """``W <- W (1 - lr wd) - step_size m / root_v`` for the chunk's rows of every matrix."""
        b, h = self.batch, self.hyper
        params = b.params if rows.stop - rows.start == b.params[0].shape[0] else [p[rows] for p in b.params]
        decay = 1.0 - h.lr * h.weight_decay
        if b.ok is not None:
            update_params_(params, m.div_(root_v).mul_(self.step_size.neg()), alpha=1.0, decay=decay, ok=b.ok3)
            return
        decay_(params, decay)
        if isinstance(self.step_size, list):
            torch._foreach_addcdiv_(params, list(m.unbind(0)), list(root_v.unbind(0)), [-s for s in self.step_size])
        else:
            torch._foreach_addcdiv_(params, list(m.unbind(0)), list(root_v.unbind(0)), value=-self.step_size)

    def _squares_are_safe(self) -> bool:
        """Whether ``x^2 + g^2`` and ``(floor m)^2`` may be formed (``x = rho V_B V_A``, ``m = g + kappa B A``): on
        CPU only (why: docs/design.md), and only when every operand is known to be below ``SQUARES_LIMIT``.
        ``|(B A)_ij| <= |B|_F |A|_F`` (Cauchy-Schwarz; loose, but the limit is ~1e18): one batched norm per stack
        and one host read, which costs nothing on a CPU. Squares that underflow are harmless: ``eps`` dominates."""
        b = self.batch
        gmax = b.grad_absmax
        if b.ok is not None or gmax is None or b.left.device.type != "cpu" or not gmax < SQUARES_LIMIT:
            return False
        norms = (torch.linalg.vector_norm(b.left, dim=(2, 3)).sum(0) + torch.linalg.vector_norm(b.right, dim=(2, 3))
                 .sum(0))
        # |B|_F |A|_F and rho |V_B|_F |V_A|_F are both below (1 + kappa + rho) * (sum of the four norms)^2 / 4
        bound = max(self.floor, 1.0) * (gmax + (1.0 + self.kappa + self.rho) * float(norms.max()) ** 2 / 4)
        return bound < SQUARES_LIMIT

    def _rms_clip_factors(self, m_hat_per_m: float | Tensor, right_pinvs: Tensor) -> list[float] | Tensor:
        """``min(1, 1 / RMS(u))`` per matrix for the Adam-form update ``u = m_hat / (sqrt(v_hat) + eps)`` of the
        whole matrix (all ranks' rows under FSDP2): Adafactor's update clipping with threshold 1. On the host path
        read on the host (it is a candidate measured in the benchmarks, not the default, and has no kernel); on
        the device-side skip an ``L x 1 x 1`` tensor."""
        b, ws = self.batch, self.workspace
        (B, V_B), (A, V_A) = b.left, b.right
        total = torch.zeros(b.size, dtype=torch.float64, device=B.device)
        for rows in self.chunks:
            g = b.stacked_grads(ws, rows)
            m = self._first_moment(g, B[:, rows], A, torch.bmm(g, right_pinvs[0].mT), torch.empty_like(g))
            root_v = torch.hypot(torch.bmm(V_B[:, rows], V_A).mul_(self.rho), g).add_(self.eps_hat)
            total += m.div_(root_v).square().sum(dim=(1, 2), dtype=torch.float64)
        if b.shards is not None:
            b.shards.sum_(total)
        p_all = b.shards.param.shape[0] if b.shards is not None else B.shape[1]
        elements = A.shape[-1] * p_all
        if isinstance(m_hat_per_m, Tensor):
            rms = m_hat_per_m.view(-1) * torch.sqrt(total / elements)
            return rms.clamp_min(1.0).reciprocal().to(B.dtype).view(-1, 1, 1)
        return [1.0 / max(1.0, m_hat_per_m * math.sqrt(value / elements)) for value in total.tolist()]
