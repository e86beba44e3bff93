"""The device-side skip of LoRAPreAdamW and LoRAPreMuon (what accelerators run), forced on CPU tensors.

On an accelerator the skip decision for non-finite gradients must never be read on the host: step counts are 0-d
device tensors and every write is masked by a per-parameter flag. ``_device_side_skip = True`` runs that path on
CPU, so these tests check it against the host path (the CPU default): equal results on finite gradients, NaN/inf
leaving parameters and state bit for bit, no host read during ``step()``, and checkpoints moving between both.
"""
import copy
import math

import pytest
import torch
from host_reads import HostRead, no_host_reads
from torch import nn

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon
from lit_lowrank.optim.lora_pre import factors
from lit_lowrank.optim.lora_pre.adam_scalars import adam_step_constants, adam_step_tensors, device_step_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {  # name: (optimizer class, keyword arguments, parameter dtype)
    "adam": (LoRAPreAdamW, dict(lr=1e-2, rank=2, weight_decay=0.1), torch.float32),
    "adam_jacobi_adam_floor": (LoRAPreAdamW, dict(lr=1e-2, rank=3, factor_update="jacobi", update_bound="adam_floor",
                                                  betas=(0.8, 0.99), scale=0.5), torch.float32),
    "adam_rms_clip_chunked": (LoRAPreAdamW, dict(lr=1e-2, rank=2, update_bound="rms_clip", chunk_rows=5),
                              torch.float32),
    "adam_no_debias": (LoRAPreAdamW, dict(lr=1e-2, rank=2, debias_second_moment=False), torch.float32),
    "adam_no_residual": (LoRAPreAdamW, dict(lr=1e-2, rank=2, residual_step=False), torch.float32),
    "adam_bf16": (LoRAPreAdamW, dict(lr=1e-2, rank=2, weight_decay=0.1), torch.bfloat16),
    "adam_float64": (LoRAPreAdamW, dict(lr=1e-2, rank=2), torch.float64),
    "adam_dense_fallback": (LoRAPreAdamW, dict(lr=1e-2, rank=6, full_rank="dense"), torch.float32),
    "muon": (LoRAPreMuon, dict(lr=1e-2, rank=2, weight_decay=0.1, adamw_weight_decay=0.1), torch.float32),
    "muon_jacobi_bf16": (LoRAPreMuon, dict(lr=1e-2, rank=2, factor_update="jacobi", nesterov=False, adamw_lr=1e-2),
                         torch.bfloat16),
    "muon_dense_fallback": (LoRAPreMuon, dict(lr=1e-2, rank=6, full_rank="dense"), torch.float32),
    "muon_no_residual": (LoRAPreMuon, dict(lr=1e-2, rank=2, residual_step=False), torch.float32),
}


def make(name, device_side):
    optimizer_class, kwargs, dtype = CONFIGS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 6)).to(dtype)
    optimizer = optimizer_class(model.parameters(), seed=3, **kwargs)
    optimizer._device_side_skip = device_side
    return model, optimizer


def backward(model, seed, poison=None):
    """Gradients of a fixed batch; ``poison`` (a value) goes into one entry of a factored matrix and of a bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).dtype)
    model.zero_grad()
    model(x).float().square().mean().backward()
    if poison is not None:
        model[0].weight.grad[3, 4] = poison
        model[3].bias.grad[1] = poison
    return {model[0].weight, model[3].bias} if poison is not None else set()


def close(actual, expected, rtol):
    """Equal up to ``rtol`` of the expected tensor's largest magnitude."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(rtol * scale))


def close_param(actual, expected, initial, rtol):
    """The displacements agree to ``rtol`` of the largest one, plus one rounding of the parameter itself."""
    ulp = torch.finfo(expected.dtype).eps * expected.detach().double().abs()
    difference = (actual.detach().double() - expected.detach().double()).abs()
    scale = (expected.detach().double() - initial.double()).abs().max()
    assert (difference <= rtol * scale + ulp).all(), float((difference - ulp).max() / scale)


def as_number(value):
    return float(value) if isinstance(value, torch.Tensor) and value.ndim == 0 else value


def assert_same_training(model_a, optimizer_a, model_b, optimizer_b, initial, rtol):
    """Parameters (by their displacement), factors and moments agree to ``rtol``; counters exactly."""
    for (name, a), b, start in zip(model_a.named_parameters(), model_b.parameters(), initial):
        close_param(a, b, start, rtol)
        state_a, state_b = optimizer_a.state[a], optimizer_b.state[b]
        for key, value in state_b.items():
            if key in ("step", "skipped_steps", "seed"):
                assert as_number(state_a.get(key, 0)) == as_number(value), (name, key)
            else:
                close(state_a[key], value, rtol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_device_side_skip_trains_like_the_host_path(name):
    """Finite gradients: the same steps (ulp-level rounding aside: the scalars come from float64 tensors)."""
    (host_model, host), (device_model, device) = make(name, False), make(name, True)
    initial = [param.detach().clone() for param in host_model.parameters()]
    for seed in range(4):
        for model, optimizer in ((host_model, host), (device_model, device)):
            backward(model, seed)
            optimizer.step()
    rtol = 2e-2 if CONFIGS[name][2] == torch.bfloat16 else 1e-5  # bf16: a flipped rounding is one bf16 ulp
    assert_same_training(device_model, device, host_model, host, initial, rtol)
    for state in device.state.values():
        assert isinstance(state["step"], torch.Tensor) and state["step"].dtype == torch.float32
        assert float(state["skipped_steps"]) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_non_finite_gradient_leaves_param_and_state_bitwise_on_the_device(name, bad):
    model, optimizer = make(name, True)
    for seed in range(2):
        backward(model, seed)
        optimizer.step()
    before = [param.detach().clone() for param in model.parameters()]
    state_before = {param: copy.deepcopy(dict(state)) for param, state in optimizer.state.items()}
    poisoned = backward(model, 2, poison=bad)
    optimizer.step()
    for param, old in zip(model.parameters(), before):
        assert torch.equal(param.detach(), old) == (param in poisoned)
        for key, value in optimizer.state[param].items():
            assert torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all(), key
            if key == "skipped_steps":
                assert float(value) == float(state_before[param][key]) + (param in poisoned)
            elif param in poisoned or key == "seed":
                old_value = state_before[param][key]
                assert torch.equal(value, old_value) if isinstance(value, torch.Tensor) else value == old_value, key
    assert optimizer.skipped_steps() == 2
    backward(model, 3)  # training goes on from where it was
    optimizer.step()
    assert all(not torch.equal(param.detach(), old) for param, old in zip(model.parameters(), before))
    assert float(optimizer.state[model[0].weight]["step"]) == 4 - 1  # the skipped step is not counted


def test_a_skipped_first_step_on_the_device_leaves_initial_state_then_steps_like_adam():
    param = torch.nn.Parameter(torch.randn(8, 6))
    before = param.detach().clone()
    optimizer = LoRAPreAdamW([param], rank=2)
    optimizer._device_side_skip = True
    param.grad = torch.full((8, 6), float("nan"))
    optimizer.step()
    state = optimizer.state[param]
    assert torch.equal(param.detach(), before)
    assert float(state["step"]) == 0 and float(state["skipped_steps"]) == 1
    assert state["B"].abs().max() == 0 and state["V_B"].abs().max() == 0  # the initial factors, untouched
    param.grad = torch.ones(8, 6)
    optimizer.step()
    assert float(state["step"]) == 1  # its first real step is Adam's first step: lr * sign(g)
    torch.testing.assert_close(param.detach(), before - 1e-3)


@pytest.mark.parametrize("poison", [None, float("nan")], ids=["finite", "nan"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_device_side_step_reads_nothing_on_the_host(name, poison):
    model, optimizer = make(name, True)
    with no_host_reads():  # the first step too: it creates the state
        backward(model, 0)
        optimizer.step()
        backward(model, 1, poison=poison)
        optimizer.step()
    assert optimizer.skipped_steps() == (0 if poison is None else 2)


def test_the_guard_sees_the_host_path_read():
    model, optimizer = make("adam", False)
    backward(model, 0)
    with no_host_reads(), pytest.raises(HostRead, match="tolist"):
        optimizer.step()


@pytest.mark.parametrize("name", ["adam", "adam_bf16", "muon", "adam_dense_fallback"])
@pytest.mark.parametrize("saved_on_device, resumed_on_device", [(False, True), (True, False), (True, True)],
                         ids=["host_to_device", "device_to_host", "device_to_device"])
def test_checkpoints_move_between_the_host_and_the_device_side_skip(name, saved_on_device, resumed_on_device):
    """Two steps (one of them skipping a tensor), a checkpoint, two more steps; against the same four steps run
    uninterrupted in the resumed run's mode. Counters take the form of the mode that steps them."""
    model, optimizer = make(name, saved_on_device)
    backward(model, 0)
    optimizer.step()
    backward(model, 1, poison=float("nan"))
    optimizer.step()
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    resumed_model, resumed = make(name, resumed_on_device)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.skipped_steps() == 2
    uninterrupted_model, uninterrupted = make(name, resumed_on_device)
    initial = [param.detach().clone() for param in uninterrupted_model.parameters()]
    backward(uninterrupted_model, 0)
    uninterrupted.step()
    backward(uninterrupted_model, 1, poison=float("nan"))
    uninterrupted.step()
    for seed in (2, 3):
        for model_, optimizer_ in ((resumed_model, resumed), (uninterrupted_model, uninterrupted)):
            backward(model_, seed)
            optimizer_.step()
    rtol = 0.0 if saved_on_device == resumed_on_device else (2e-2 if CONFIGS[name][2] == torch.bfloat16 else 1e-5)
    assert_same_training(resumed_model, resumed, uninterrupted_model, uninterrupted, initial, rtol)
    assert resumed.skipped_steps() == uninterrupted.skipped_steps() == 2
    counter_type = torch.Tensor if resumed_on_device else int
    assert all(isinstance(state["step"], counter_type) for state in resumed.state.values())


def test_device_side_counters_are_state_tensors_of_their_parameter():
    model, optimizer = make("adam", True)
    backward(model, 0)
    optimizer.step()
    host_model, host = make("adam", False)
    backward(host_model, 0)
    host.step()
    bytes_, host_bytes = optimizer.state_bytes(), host.state_bytes()
    parameters = len(list(model.parameters()))
    assert bytes_.factors == host_bytes.factors
    assert bytes_.dense == host_bytes.dense + parameters * 2 * 4  # step and skipped_steps: 0-d float32 each
    for param, state in optimizer.state.items():
        for key in ("step", "skipped_steps"):
            assert state[key].shape == () and state[key].device == param.device


def test_the_host_path_is_the_default_on_cpu_and_meta_never_skips_on_the_device():
    model, optimizer = make("adam", None)
    backward(model, 0)
    optimizer.step()
    assert all(type(state["step"]) is int for state in optimizer.state.values())
    assert not optimizer._skips_on_device([torch.zeros(2, device="meta")])
    optimizer._device_side_skip = True
    assert optimizer._skips_on_device(list(model.parameters()))
    assert not optimizer._skips_on_device([torch.zeros(2, device="meta")])


SCALAR_CASES = [  # beta1, beta2, debias, bound
    (0.9, 0.999, True, "v_floor"),
    (0.9, 0.999, False, "none"),
    (0.9, 0.999, True, "adam_floor"),
    (0.8, 0.99, False, "adam_floor"),
    (0.9, 0.81, True, "adam_floor"),  # beta1^2 == beta2: C_t's geometric sum is t
    (0.95, 0.9, True, "adam_floor"),  # beta1^2 > beta2: the sum grows geometrically
    (0.0, 0.999, True, "v_floor"),
    (0.9, 0.0, True, "v_floor"),
]


@pytest.mark.parametrize("beta1, beta2, debias, bound", SCALAR_CASES)
def test_device_side_step_scalars_equal_the_host_constants(beta1, beta2, debias, bound):
    """adam_step_tensors (float64, from a step-count tensor) against adam_step_constants (Python floats)."""
    inputs = device_step_inputs(lr=3e-3, beta1=beta1, beta2=beta2, eps=1e-8, scale=0.25,
                                debias_second_moment=debias, update_bound=bound)
    steps = [1, 2, 3, 10, 100, 1000, 12345, 10**6]
    got = adam_step_tensors(torch.tensor(steps, dtype=torch.float32), inputs)
    for index, step in enumerate(steps):
        try:
            want = adam_step_constants(step=step, lr=3e-3, beta1=beta1, beta2=beta2, eps=1e-8, scale=0.25,
                                       debias_second_moment=debias, update_bound=bound)
        except OverflowError:  # the host's ratio**step, for beta1^2 > beta2 (the tensors' floor tends to 0)
            assert float(got[3][index]) == 0.0
            continue
        expected = (want.rho, want.step_size, want.eps_hat, want.floor)
        for tensor, value in zip(got, expected):
            assert math.isclose(float(tensor[index]), value, rel_tol=1e-11, abs_tol=1e-300), (step, tensor, value)
    zero = adam_step_tensors(torch.tensor(0.0), inputs)  # a skipped first step: read as step 1, finite
    one = adam_step_tensors(torch.tensor(1.0), inputs)
    assert all(torch.equal(a, b) for a, b in zip(zero, one))


def test_the_accelerators_damped_pinv_solve_equals_the_cpu_one(monkeypatch):
    """Off CPU the damped pseudo-inverses solve with two triangular solves (``torch.cholesky_inverse`` checks its
    error codes on the host); on the same factors both give the same pseudo-inverses."""
    gen = torch.Generator().manual_seed(5)
    matrices = [torch.randn(4, 30, generator=gen), torch.zeros(4, 30),  # B^T at step 1 is zero
                torch.randn(4, 2, generator=gen) @ torch.randn(2, 30, generator=gen)]  # rank-deficient
    for factor in matrices:
        on_cpu = factors.damped_pinv(factor, 1e-6)
        with monkeypatch.context() as patch:
            patch.setattr(factors, "cholesky_solve", factors.triangular_solves)
            off_cpu = factors.damped_pinv(factor, 1e-6)
        close(off_cpu, on_cpu, 1e-5)
        assert torch.isfinite(off_cpu).all()
