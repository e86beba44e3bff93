"""The LoRA-Pre Adam kernels' GPU build, checked without a GPU: the GPU launch path (autotuned kernels, every config
the pruning keeps, the autotuner's hooks, the fixed reduction tiling) run by Triton's interpreter under an emulated
autotuner, and the GPU configs compiled to sm_90 cubins. Steps through the adapter: ``test_lora_pre_adam_kernel.py``;
shared helpers: ``tests/lora_pre_kernel_cases.py``.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported")

import lora_pre_kernel_cases as cases  # noqa: E402
from hopper_compile import compile_for_hopper  # noqa: E402
from lora_pre_kernel_cases import (  # noqa: E402
    close,
    close_param,
    expected_first_pass,
    expected_second_pass,
    interpreted,
    matrices,
    stacks,
)

from lit_lowrank.kernels import lora_pre_adam  # noqa: E402

# The shared fixture, bound here so that pytest uses it for this module's tests.
fresh_dispatch = cases.fresh_dispatch


# ---------------------------------------------------------------------------------------------- GPU build
class AutotuneEmulator:
    """Stands for ``triton.autotune`` in the interpreter, doing what Triton's ``Autotuner.run`` does on a first
    call per key: prune (``early_config_prune(configs, positional args, **keyword args)``), time every remaining
    config (here: run it once) between the autotuner's ``pre_hook`` and ``post_hook``, call
    ``pre_hook(reset_only=True)``, then launch the chosen config for real. ``observe(args)`` records each timing
    run's outputs, so the GPU configs' tilings get checked on CPU."""

    def __init__(self, autotuned_like, configs, prune, observe, hooks=(None, None)):
        self.fn, self.configs, self.prune, self.observe = autotuned_like, configs, prune, observe
        self.pre_hook = hooks[0] or (lambda kwargs, reset_only=False: None)
        self.post_hook = hooks[1] or (lambda kwargs, exception: None)
        self.outputs, self.best_config = [], None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            named = dict(zip(self.fn.arg_names, args))
            configs = self.prune(self.configs, named, **kwargs)
            every = {**named, **kwargs}
            for config in configs:
                self.pre_hook(every)
                self.fn[grid({**every, **config.kwargs})](*args, **kwargs, **config.kwargs)
                self.outputs.append((config, self.observe(named)))
                self.post_hook(every, exception=None)
            self.pre_hook(every, reset_only=True)
            self.best_config = configs[-1]  # any: they agree
            self.fn[grid({**every, **self.best_config.kwargs})](*args, **kwargs, **self.best_config.kwargs)
        return run


@interpreted
def test_gpu_configs_autotune_hooks_and_launch_glue_in_the_interpreter(monkeypatch):
    """The GPU launch path (autotuned kernels, fixed 512-wide reduction slots, rank chunks of 32) with every GPU
    config that the pruning keeps for r = 40 (R_PAD = 64), run by the interpreter on a batch of two: each config
    gives the same partial sums and parameters, the hooks put the parameters back after each timing run (the real
    launch then updates them once), and the results equal the float64 formulas."""
    K = lora_pre_adam
    first = AutotuneEmulator(K._first_pass, K.FIRST_PASS_CONFIGS, K._prune_first,
                             lambda named: [W.clone() for W in K._launching.params] + [named["part_ptr"].clone()],
                             hooks=(K._autotune_pre_hook, K._autotune_post_hook))
    second = AutotuneEmulator(K._second_pass, K.SECOND_PASS_CONFIGS, K._prune_second,
                              lambda named: [named["part_ptr"].clone()])
    monkeypatch.setattr(K, "_first_autotuned", first)
    monkeypatch.setattr(K, "_second_autotuned", second)
    L, p, q, r = 2, 70, 75, 40
    gen = torch.Generator().manual_seed(9)
    params, grads = matrices(L, p, q, torch.float32, False, gen), matrices(L, p, q, torch.float32, False, gen, 1e-2)
    left, right, right_pinvs, left_pinvs = stacks(L, p, q, r, gen)
    initial = [W.clone() for W in params]
    scalars = (31.6, 1e-2, 1e-6, 0.7)
    expected_params, expected_sums = expected_first_pass(params, grads, left, right, right_pinvs, 9.0, 0.99,
                                                         [scalars] * L)
    sums = K.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=0.99, host_scalars=scalars,
                        precision="ieee")
    right_sums = K.second_pass(grads, left_pinvs, precision="ieee")
    assert len(first.outputs) == len(second.outputs) == 4  # all four configs of each pass
    for outputs in (first.outputs, second.outputs):
        for _, tensors in outputs[1:]:
            for got, want in zip(tensors, outputs[0][1], strict=True):
                close(got, want, rtol=1e-6)  # bitwise equal with numpy here; BLAS kernels may differ
    for W, want, W0, timed in zip(params, expected_params, initial, first.outputs[-1][1], strict=False):
        assert torch.equal(W, timed)  # the chosen config, updating once: restored after every timing run
        close_param(W, want, W0)
    close(sums, expected_sums)
    close(right_sums, expected_second_pass(grads, left_pinvs))
    assert K._launching.params is None and K._launching.copies is None  # nothing held after the launch


COMPILE_FOR_HOPPER = r"""
from lit_lowrank.kernels import lora_pre_adam as K
first, second = K._first_pass, K._second_pass
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16}
def first_types():
    types = {name: "*fp32" for name in ("left_ptr", "right_ptr", "pinv_ptr", "part_ptr", "step_ptr")}
    types.update(w_tab="*i64", g_tab="*i64", ok_ptr="*u8")
    types.update({name: "i32" for name in ("p", "q", "stride_wp", "stride_wq", "stride_gp", "stride_gq")})
    types.update({name: "fp32" for name in ("kappa", "rho", "neg_step", "eps_hat", "decay", "floor")})
    types.update({name: "fp64" for name in ("log_beta1", "log_beta2", "one_minus_beta1", "root_one_minus_beta2",
                                            "rho0", "lr_scale", "eps", "log_ratio", "one_minus_ratio",
                                            "worst_case_scale")})
    assert set(types) | {"r"} <= set(first.arg_names), set(types) - set(first.arg_names)
    return types
def second_types():
    types = {"g_tab": "*i64", "pinv_ptr": "*fp32", "part_ptr": "*fp32"}
    types.update({name: "i32" for name in ("p", "q", "stride_gp", "stride_gq")})
    return types

cases = 0
# The configs at the largest rank they serve: rank 128 (fp32) for those that prune keeps there, the two largest
# tiles at rank 16 (bf16). Of two configs that differ only in stages or by one tile step, one is compiled.
def first_at(r, dtype, config, on_device=False):
    r_pad = K._r_pad(r)
    constexprs = dict(config.kwargs, r=r, R_PAD=r_pad, DECAY=True, FLOOR=True, BLOCK_R=min(K.MAX_BLOCK_R, r_pad),
                      W_DTYPE=DTYPES[dtype], G_DTYPE=DTYPES[dtype], W_ALIGNED=True, G_ALIGNED=True,
                      DOT_PRECISION="tf32x3", SOFT_BF16=False, STEP_ON_DEVICE=on_device, DEBIAS=on_device,
                      BOUND=2 if on_device else 0)
    compiled = compile_(first, first_types(), constexprs, config.num_warps, config.num_stages)
    assert compiled.metadata.shared <= 227 * 1024, ("first", config, r, compiled.metadata.shared)
def second_at(r, dtype, config):
    constexprs = dict(config.kwargs, r=r, R_PAD=K._r_pad(r), G_DTYPE=DTYPES[dtype], G_ALIGNED=True,
                      DOT_PRECISION="tf32x3")
    compiled = compile_(second, second_types(), constexprs, config.num_warps, config.num_stages)
    assert compiled.metadata.shared <= 227 * 1024, ("second", config, r, compiled.metadata.shared)
by_block = lambda configs, block: {c.kwargs[block]: c for c in configs}
firsts, seconds = by_block(K.FIRST_PASS_CONFIGS, "BLOCK_M"), by_block(K.SECOND_PASS_CONFIGS, "BLOCK_N")
assert [c.kwargs["BLOCK_M"] for c in K._fitting(K.FIRST_PASS_CONFIGS, "BLOCK_M", 128)] == [16, 32, 64]
assert [c.kwargs["BLOCK_N"] for c in K._fitting(K.SECOND_PASS_CONFIGS, "BLOCK_N", 128)] == [32, 64, 64]
for r, dtype, compile_at, config in [(128, "fp32", first_at, firsts[16]), (128, "fp32", first_at, firsts[64]),
                                     (16, "bf16", first_at, firsts[128]), (128, "fp32", second_at, seconds[32]),
                                     (128, "fp32", second_at, seconds[64]), (16, "bf16", second_at, seconds[128])]:
    compile_at(r, dtype, config)
    cases += 1
# The device-side step (fp64 scalars from the step counts in-kernel, W's stores masked), at the largest tile.
first_at(16, "bf16", firsts[128], on_device=True)
cases += 1
print("compiled", cases)
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter never lowers the kernels; this compiles the GPU configs to sm_90 cubins (no GPU needed)."""
    compile_for_hopper(tmp_path, COMPILE_FOR_HOPPER, timeout=600)
