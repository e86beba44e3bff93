"""The batched LoRA-Pre Adam launchers (``first_pass``, ``second_pass`` of ``lit_lowrank.kernels.lora_pre_adam``),
under Triton's interpreter on CPU: what each pass returns and writes against float64 torch arithmetic of the
formulas in the kernels' docstring (``lit_lowrank.kernels.lora_pre_adam_jit``; ``tests/lora_pre_kernel_cases.py``),
launch counts, the pointer tables and scratch buffers of ``lit_lowrank.kernels.batched_launch``, the refusal of
mixed inputs, and that these modules are leaves. The interpreter runs small tiles (32 x 32, two tiles per slot, rank
chunks of 16), so the shapes below span several tiles, slots and rank chunks, with ragged edges in every dimension.
Whole steps through the Triton backend: ``test_lora_pre_adam_kernel.py`` (and ``_device_side``, ``_gpu_build``).
"""
import ast
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported")

import lora_pre_kernel_cases as cases  # noqa: E402
from lora_pre_kernel_cases import (  # noqa: E402
    DEVICE,
    KERNEL_MODULE,
    close,
    close_param,
    expected_first_pass,
    expected_second_pass,
    matrices,
    stacks,
)

from lit_lowrank.kernels import batched_launch, lora_pre_adam  # noqa: E402
from lit_lowrank.optim.lora_pre import adam_scalars  # noqa: E402
from lit_lowrank.optim.lora_pre.factors import Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The shared fixtures, bound here so that pytest uses them for this module's tests.
fresh_dispatch, launches = cases.fresh_dispatch, cases.launches


LAUNCH_CASES = [  # L, p, q, r, W dtype, g dtype, strided, decay, floor
    (1, 37, 70, 3, torch.float32, torch.float32, False, None, 0.0),
    (3, 70, 45, 18, torch.float32, torch.float32, True, 0.99, 0.7),  # r = 18: two rank chunks, R_PAD = 32
    (3, 45, 130, 8, torch.bfloat16, torch.bfloat16, False, 0.99, 0.7),  # three column slots
    (3, 66, 40, 5, torch.float16, torch.float16, True, None, 0.0),
    (3, 33, 53, 4, torch.float32, torch.bfloat16, False, 0.95, 1.3),  # the gradients in their own dtype
]


@pytest.mark.parametrize("L,p,q,r,dtype,grad_dtype,strided,decay,floor", LAUNCH_CASES,
                         ids=[f"L{c[0]}-{c[1]}x{c[2]}r{c[3]}-{str(c[4])[6:]}-g{str(c[5])[6:]}-"
                              f"{'strided' if c[6] else 'contiguous'}-decay{c[7]}-floor{c[8]}" for c in LAUNCH_CASES])
def test_both_passes_with_host_scalars_equal_float64_formulas(L, p, q, r, dtype, grad_dtype, strided, decay, floor,
                                                               launches):
    gen = torch.Generator().manual_seed(L * p + q * r)
    params = matrices(L, p, q, dtype, strided, gen)
    grads = matrices(L, p, q, grad_dtype, strided, gen, scale=1e-2)
    left, right, right_pinvs, left_pinvs = stacks(L, p, q, r, gen)
    initial = [W.clone() for W in params]
    scalars = (31.6, 1e-2, 1e-6, floor)  # rho of beta2 = 0.999; floor 0: no bound
    expected_params, expected_sums = expected_first_pass(params, grads, left, right, right_pinvs, 9.0, decay,
                                                         [scalars] * L)
    sums = lora_pre_adam.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=decay,
                                    host_scalars=scalars)
    assert sums.shape == (2, L, p, r) and sums.dtype == torch.float32
    close(sums, expected_sums)
    for W, want, W0 in zip(params, expected_params, initial, strict=True):
        assert W.dtype == dtype and W.stride() == W0.stride()
        assert not torch.equal(W, W0)
        close_param(W, want, W0)
    right_sums = lora_pre_adam.second_pass(grads, left_pinvs)
    assert right_sums.shape == (2, L, r, q)
    close(right_sums, expected_second_pass(grads, left_pinvs))
    assert launches == {"first": 1, "second": 1}


DEVICE_STEP_CASES = [  # p, q, r, dtype, strided, weight decay, debias, update bound
    (45, 70, 4, torch.float32, False, 0.1, True, "adam_floor"),
    (37, 53, 18, torch.bfloat16, True, 0.0, False, "none"),
]


@pytest.mark.parametrize("p,q,r,dtype,strided,weight_decay,debias,bound", DEVICE_STEP_CASES,
                         ids=[f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}-wd{c[5]}-{c[7]}" for c in DEVICE_STEP_CASES])
def test_first_pass_with_device_step_counts_equals_the_host_formulas(p, q, r, dtype, strided, weight_decay, debias,
                                                                     bound, launches):
    """Each layer's scalars from its own step count in-kernel (fp64): as ``adam_step_constants`` gives them on the
    host. The layer whose flag is False keeps its W bit for bit (its sums are still returned)."""
    L, hyper = 3, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, scale=0.5, debias_second_moment=debias,
                       update_bound=bound)
    gen = torch.Generator().manual_seed(p + q + r)
    params = matrices(L, p, q, dtype, strided, gen)
    grads = matrices(L, p, q, dtype, strided, gen, scale=1e-2)
    left, right, right_pinvs, _ = stacks(L, p, q, r, gen)
    initial = [W.clone() for W in params]
    counts, oks = [3, 1, 7], [True, False, True]
    host = [adam_scalars.adam_step_constants(step=t, **hyper) for t in counts]
    scalars = [(c.rho, c.step_size, c.eps_hat, c.floor) if ok else None for c, ok in zip(host, oks, strict=True)]
    decay = 1.0 - hyper["lr"] * weight_decay if weight_decay else None
    expected_params, expected_sums = expected_first_pass(params, grads, left, right, right_pinvs, host[0].kappa,
                                                         decay, scalars)
    inputs = adam_scalars.device_step_inputs(**hyper)
    device_step = (torch.tensor(counts, dtype=torch.float32, device=DEVICE), torch.tensor(oks, device=DEVICE),
                   tuple(inputs[:10]), inputs.debias, inputs.bound)
    sums = lora_pre_adam.first_pass(params, grads, left, right, right_pinvs, kappa=host[0].kappa, decay=decay,
                                    device_step=device_step)
    close(sums, expected_sums)
    assert torch.equal(params[1], initial[1])
    for layer in (0, 2):
        assert not torch.equal(params[layer], initial[layer])
        close_param(params[layer], expected_params[layer], initial[layer])
    assert launches == {"first": 1}


def test_one_launch_per_pass_whatever_the_number_of_layers(launches):
    gen = torch.Generator().manual_seed(0)
    for L in (1, 6):
        params, grads = matrices(L, 20, 24, torch.float32, False, gen), matrices(L, 20, 24, torch.float32, False, gen)
        left, right, right_pinvs, left_pinvs = stacks(L, 20, 24, 2, gen)
        lora_pre_adam.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=None,
                                 host_scalars=(1.0, 1e-3, 1e-8, 0.0))
        lora_pre_adam.second_pass(grads, left_pinvs)
        assert launches == {"first": 1, "second": 1}, (L, launches)
        launches.clear()


def test_pointer_tables_are_built_once_per_tuple_of_addresses_and_scratch_is_used():
    """A steady state builds no table; the result is the scratch provider's buffer (nothing else allocated)."""
    gen = torch.Generator().manual_seed(1)
    params, grads = matrices(2, 20, 24, torch.float32, False, gen), matrices(2, 20, 24, torch.float32, False, gen)
    left, right, right_pinvs, left_pinvs = stacks(2, 20, 24, 2, gen)
    workspace, roles = Workspace(), []

    def scratch(role, shape, dtype, device):
        roles.append(role)
        return workspace.get(role, shape, dtype, device)

    for _ in range(2):
        sums = lora_pre_adam.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=None,
                                        host_scalars=(1.0, 1e-3, 1e-8, 0.0), scratch=scratch)
        tables = {key: id(table) for key, table in batched_launch._tables.items()}
        lora_pre_adam.second_pass(grads, left_pinvs, scratch=scratch)
        assert {key: id(table) for key, table in batched_launch._tables.items()} == tables
    assert batched_launch.pointer_table(params) is batched_launch.pointer_table(list(params))
    device = params[0].device  # the workspace keys on it (cuda:0, not cuda)
    assert sums.data_ptr() == workspace.get("kernel_left_sums", (2, 2, 20, 2), torch.float32, device).data_ptr()
    assert roles == ["kernel_left_partials", "kernel_left_sums", "kernel_right_partials", "kernel_right_sums"] * 2


def test_launchers_refuse_mixed_layouts_and_both_or_no_scalars():
    gen = torch.Generator().manual_seed(2)
    params, grads = matrices(2, 20, 24, torch.float32, False, gen), matrices(2, 20, 24, torch.float32, False, gen)
    left, right, right_pinvs, left_pinvs = stacks(2, 20, 24, 2, gen)
    run = dict(kappa=9.0, decay=None, host_scalars=(1.0, 1e-3, 1e-8, 0.0))
    with pytest.raises(ValueError, match="one shape, dtype, stride pair"):
        lora_pre_adam.first_pass([params[0], params[1].T.contiguous().T], grads, left, right, right_pinvs, **run)
    with pytest.raises(ValueError, match="one shape, dtype, stride pair"):
        lora_pre_adam.second_pass([grads[0], grads[1].bfloat16()], left_pinvs)
    with pytest.raises(ValueError, match="exactly one"):
        lora_pre_adam.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=None)
    with pytest.raises(ValueError, match="left: fp32 of shape"):
        lora_pre_adam.first_pass(params, grads, left[:, :1], right, right_pinvs, **run)


def run_at_import(nodes):
    """The statements of a module that run when it is imported: all but function bodies (lazy imports)."""
    for node in nodes:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
            yield from run_at_import(ast.iter_child_nodes(node))


def first_party_imports(module: str) -> set[str]:
    """The ``lit_lowrank`` modules that importing ``module`` runs, from the sources (parent packages included)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:depth]) for depth in range(1, len(parts)))  # the parent packages run first
        folder = ROOT / ("kernels" if parts[:2] == ["lit_lowrank", "kernels"] else "lit_lowrank")
        rest = parts[2:] if parts[:2] == ["lit_lowrank", "kernels"] else parts[1:]
        path = folder.joinpath(*rest)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in run_at_import(ast.parse(path.read_text()).body):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            todo.extend(name for name in names if name.split(".")[0] == "lit_lowrank")
    return seen


def imported_outside(file: str, allowed: set[str]) -> set[str]:
    """The modules that ``kernels/<file>`` imports anywhere (lazily too) whose top-level package is not allowed."""
    tree = ast.parse((ROOT / "kernels" / file).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {name for name in imported if name.split(".")[0] not in allowed}


def test_the_kernel_module_is_a_leaf():
    """It imports torch, triton, the standard library, the dispatcher, the batching glue and its kernels only, and
    nothing it imports reaches the optimizer (which loads it through the dispatcher), so the two cannot form a
    cycle. The kernels, ``lit_lowrank.kernels.lora_pre_adam_jit``, import torch, triton and the standard library
    only; the glue, ``lit_lowrank.kernels.batched_launch``, torch and the standard library only (not even triton)."""
    outside = imported_outside("lora_pre_adam.py", {*sys.stdlib_module_names, "torch", "triton"})
    assert outside == {"lit_lowrank.kernels.dispatch", "lit_lowrank.kernels.batched_launch",
                       "lit_lowrank.kernels.lora_pre_adam_jit"}, outside
    assert imported_outside("lora_pre_adam_jit.py", {*sys.stdlib_module_names, "torch", "triton"}) == set()
    assert imported_outside("batched_launch.py", {*sys.stdlib_module_names, "torch"}) == set()
    reached = first_party_imports(KERNEL_MODULE)
    assert {"lit_lowrank.kernels.dispatch", "lit_lowrank.kernels.batched_launch",
            "lit_lowrank.kernels.lora_pre_adam_jit"} <= reached
    assert not [name for name in reached if name.startswith("lit_lowrank.optim")], sorted(reached)
