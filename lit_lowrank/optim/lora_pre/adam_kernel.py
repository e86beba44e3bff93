"""The Triton backend of the LoRA-Pre Adam step: the two passes of :mod:`.adam_passes` as fused kernels.

``lit_lowrank.kernels.lora_pre_adam`` holds launchers that take tensors and scalars and import nothing from this
package; it is loaded by the dispatcher (:mod:`lit_lowrank.kernels.dispatch`), never imported here. Each pass
launches a fixed number of kernels per batch, whatever its number of matrices (the parameters and gradients reach
the kernels as pointer tables). Each pass runs under :func:`~lit_lowrank.kernels.dispatch.run_with_fallback`: its
first call per key is compared with the torch backend's pass on copies (the self-check), and a kernel that cannot
run hands that pass to torch. The first launch in a process compiles the second pass (on zero pseudo-inverses) before
the first pass writes ``W``, so a toolchain that fails on either leaves the parameters untouched and torch runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lit_lowrank.kernels.dispatch import (
    SelfCheck,
    fallback_warning,
    run_with_fallback,
    should_use_kernel,
    verified,
)
from lit_lowrank.optim.lora_pre.adam_passes import AdamHyper, TorchAdamPasses
from lit_lowrank.optim.lora_pre.adam_scalars import adam_rates, adam_step_constants
from lit_lowrank.optim.lora_pre.batch import MatrixBatch
from lit_lowrank.optim.lora_pre.factors import Workspace

KERNEL = "lora_pre_adam"
"""The fused Triton passes, ``lit_lowrank.kernels.lora_pre_adam`` (loaded by the dispatcher)."""
KERNEL_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter and gradient dtypes the kernel takes (its factors and arithmetic are float32)."""
KERNEL_MAX_RANK = 128
"""Largest rank the kernel takes: it keeps rank-wide fp32 accumulators in registers, which spill heavily beyond."""
KERNEL_UPDATE_BOUNDS = ("v_floor", "adam_floor", "none")
"""Bounds fused into the kernel's first pass; ``rms_clip`` needs the whole update's RMS first (torch path only)."""


def kernel_passes(batch: MatrixBatch, hyper: AdamHyper, workspace: Workspace, use_triton,
                  torch_passes: TorchAdamPasses) -> KernelAdamPasses | None:
    """The kernel backend if ``use_triton`` asks for it and it can run on ``batch``, else None (torch runs), with
    one warning per reason where the kernel was explicitly asked for."""
    if hyper.residual_step:
        if use_triton is True:
            fallback_warning(KERNEL, "residual_step", "it forms m_t without the residual step; residual_step=False "
                             "keeps the kernel")
        return None
    if hyper.update_bound not in KERNEL_UPDATE_BOUNDS:
        if use_triton is True:
            fallback_warning(KERNEL, "update_bound", f"it fuses the bounds {KERNEL_UPDATE_BOUNDS}, "
                             f"not {hyper.update_bound!r}, which needs the whole update's RMS first")
        return None
    if not should_use_kernel(use_triton, *batch.params, *batch.grads, kernel=KERNEL, dtypes=KERNEL_PARAM_DTYPES):
        return None
    if not should_use_kernel(use_triton, batch.left, batch.right, kernel=KERNEL, dtypes=(torch.float32,)):
        return None
    rank = batch.left.shape[-1]
    if rank > KERNEL_MAX_RANK:
        if use_triton is True:
            fallback_warning(KERNEL, "rank", f"it takes ranks up to {KERNEL_MAX_RANK}, got {rank}")
        return None
    return KernelAdamPasses(batch, hyper, workspace, torch_passes)


class KernelAdamPasses:
    """The two passes as kernels, each falling back to ``torch_passes`` where the kernel cannot run."""

    def __init__(self, batch: MatrixBatch, hyper: AdamHyper, workspace: Workspace,
                 torch_passes: TorchAdamPasses) -> None:
        self.batch, self.hyper, self.workspace, self.torch_passes = batch, hyper, workspace, torch_passes

    def first_pass(self, right_pinvs: Tensor) -> Tensor:
        b, h = self.batch, self.hyper

        def launch(kernel) -> Tensor:
            if not verified(KERNEL):  # the first launch in this process compiles both passes before W is written
                r, p = b.left.shape[-1], b.left.shape[-2]
                kernel.second_pass(b.grads, right_pinvs.new_zeros(2, b.size, r, p), scratch=self.workspace.get)
            decay = 1.0 - h.lr * h.weight_decay if h.weight_decay != 0.0 else None
            sums = kernel.first_pass(b.params, b.grads, b.left, b.right, right_pinvs,
                                     kappa=adam_rates(h.beta1, h.beta2)[0], decay=decay,
                                     scratch=self.workspace.get, **self._scalars())
            return self._zero_skipped(sums)

        def reference(copies: list[Tensor]) -> Tensor:  # a scratch workspace: the torch path's buffers are not kept
            return TorchAdamPasses(dataclasses.replace(b, params=copies), h, Workspace()).first_pass(right_pinvs)

        check = SelfCheck(key=self._key("first pass"), state=list(b.params), reference=reference,
                          names=[*(f"W[{index}]" for index in range(b.size)), "left sums"])
        result = run_with_fallback(KERNEL, launch, check=check)
        return self.torch_passes.first_pass(right_pinvs) if result is None else result

    def second_pass(self, left_pinvs: Tensor) -> Tensor:
        b, h = self.batch, self.hyper

        def launch(kernel) -> Tensor:
            return self._zero_skipped(kernel.second_pass(b.grads, left_pinvs, scratch=self.workspace.get))

        def reference(copies: list[Tensor]) -> Tensor:
            return TorchAdamPasses(b, h, Workspace()).second_pass(left_pinvs)

        # Nothing is written in place: the first gradient stands in as the state the check compares (unchanged).
        check = SelfCheck(key=self._key("second pass"), state=[b.grads[0]], reference=reference,
                          names=["grad[0]", "right sums"])
        result = run_with_fallback(KERNEL, launch, check=check)
        return self.torch_passes.second_pass(left_pinvs) if result is None else result

    def _scalars(self) -> dict:
        """The step's scalars as host floats, or what the kernel computes them from on the device."""
        b, h = self.batch, self.hyper
        if b.ok is None:
            c = adam_step_constants(step=b.step, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, scale=h.scale,
                                    debias_second_moment=h.debias_second_moment, update_bound=h.update_bound)
            return {"host_scalars": (c.rho, c.step_size, c.eps_hat, c.floor)}
        inputs = h.step_inputs()
        return {"device_step": (b.step, b.ok, tuple(inputs[:10]), inputs.debias, inputs.bound)}

    def _zero_skipped(self, sums: Tensor) -> Tensor:
        """Zero the sums of skipped matrices (their gradients may hold NaN), as the torch pass computes them from a
        zero gradient: the blends discard them anyway, and the self-check then compares like with like."""
        if self.batch.ok is not None:
            torch.where(self.batch.ok.view(1, -1, 1, 1), sums, sums.new_zeros(()), out=sums)
        return sums

    def _key(self, which: str) -> tuple:
        """What the kernels were compiled and autotuned for (the dispatcher adds the kernel and dot precision).
        Under FSDP2 the whole parameter's shape is in it too, so every rank checks at the same calls."""
        b, h = self.batch, self.hyper
        W, grad = b.params[0], b.grads[0]
        whole = None if b.shards is None else tuple(b.shards.param.shape)
        return (f"W {tuple(W.shape)} {W.dtype} strides {W.stride()}", f"grad {grad.dtype} strides {grad.stride()}",
                f"r {b.left.shape[-1]}", f"L {b.size}", which, h.factor_update,
                f"weight_decay {h.weight_decay != 0.0}", f"bound {h.update_bound != 'none'}", f"sharded {whole}",
                f"device-side skip {b.ok is not None}")
