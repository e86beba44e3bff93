"""A finite but huge gradient (x1e30: its square overflows float32) is skipped and counted exactly like a NaN one, by
every optimizer and for every kind of state: the dense AdamW of embeddings, norms and biases, LoRA-Pre Adam's
factored moments (host path and the device-side skip, run here on CPU), LoRA-Pre Muon, LoRAPro in both modes.
Training then goes on as if that step had not happened (issue 22, item 11).

The references: the same run with NaN gradients at that step (which the NaN tests check against the state before),
torch.optim.AdamW that simply leaves the step out, and dense float64 products."""
import copy
import math

import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro
from lit_lowrank.optim.lora_pro.plans import equivalent_gradient_bound
from lit_lowrank.optim.state import gradient_limit

pytestmark = pytest.mark.usefixtures("one_thread")

EVENT, STEPS = 3, 7  # steps 0-2 normal, step 3 huge (or NaN), steps 4-6 normal again


def lora_pre_model():
    torch.manual_seed(0)  # an embedding, two matrices (factored), a norm and biases (dense AdamW)
    return nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 6))


def lora_pro_model():
    torch.manual_seed(0)  # two adapters, and a head and an embedding on AdamW
    net = nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 6))
    net = inject_lora(net, LoRAConfig(r=2, alpha=4.0, target_modules=["1", "4"], modules_to_save=["0", "3"]))
    with torch.no_grad():
        for module in (net[1], net[4]):
            module.lora_B.normal_(std=0.3)
    return net


def lora_pre(optimizer_class, device_side, **kwargs):
    def build():
        model = lora_pre_model()
        optimizer = optimizer_class(model, lr=1e-2, rank=2, seed=0, **kwargs)
        optimizer._device_side_skip = device_side
        return model, optimizer
    return build


def lora_pro(mode):
    def build():
        model = lora_pro_model()
        return model, LoRAPro(model, lr=1e-2, mode=mode, weight_decay=0.01)
    return build


CASES = {
    "adam_host": lora_pre(LoRAPreAdamW, False, weight_decay=0.1),
    "adam_device_side": lora_pre(LoRAPreAdamW, True, weight_decay=0.1),
    "adam_rms_clip_host": lora_pre(LoRAPreAdamW, False, update_bound="rms_clip"),
    "muon_host": lora_pre(LoRAPreMuon, False, adamw_lr=1e-2),
    "muon_device_side": lora_pre(LoRAPreMuon, True, adamw_lr=1e-2),
    "lora_pro_efficient": lora_pro("efficient"),
    "lora_pro_full": lora_pro("full"),
}


def backward(model, step, event):
    """Gradients of batch ``step``; at the event, those of every trainable tensor but the norm's bias are multiplied
    by 1e30 (``"huge"``) or replaced by NaN (``"nan"``)."""
    tokens = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(step))
    model.zero_grad()
    model(tokens).square().mean().backward()
    hit = []
    if step == EVENT and event is not None:
        for name, param in model.named_parameters():
            if param.grad is not None and name != "3.bias":
                param.grad.mul_(1e30) if event == "huge" else param.grad.fill_(math.nan)
                hit.append(name)
    return hit


def train(build, event):
    """The parameters after every step, the optimizer and the names of the tensors hit by the event."""
    model, optimizer = build()
    trajectory, hit = [], []
    for step in range(STEPS):
        hit += backward(model, step, event)
        optimizer.step()
        trajectory.append({name: param.detach().clone() for name, param in model.named_parameters()})
    return trajectory, optimizer, hit


def expected_skips(name, hit):
    """LoRAPro counts one skip per adapter (in lora_A's state), the others one per tensor."""
    if name.startswith("lora_pro"):
        return len([n for n in hit if not n.endswith("lora_B")])
    return len(hit)


def states_equal(a, b):
    for state_a, state_b in zip(a.state.values(), b.state.values()):
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            other = state_b[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


@pytest.mark.parametrize("name", list(CASES))
def test_a_huge_gradient_is_skipped_and_counted_like_a_nan_one_and_training_goes_on(name):
    huge, optimizer, hit = train(CASES[name], "huge")
    nan, nan_optimizer, _ = train(CASES[name], "nan")
    assert len(hit) >= 5  # matrices or adapters, the embedding, the norm and a bias
    # bit for bit the run whose event step had NaN gradients: the same skips, the same steps before and after
    for after_huge, after_nan in zip(huge, nan):
        assert all(torch.equal(after_huge[key], after_nan[key]) for key in after_huge)
    states_equal(optimizer, nan_optimizer)
    assert optimizer.skipped_steps() == nan_optimizer.skipped_steps() == expected_skips(name, hit)
    for state in optimizer.state.values():  # no inf second moment, no overflowed factor
        for key, value in state.items():
            assert torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all(), key
    # every trained tensor moves at every step after the event (the one not hit moves at the event too)
    model, _ = CASES[name]()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for before, after in zip(huge[EVENT:], huge[EVENT + 1:]):
        assert all(not torch.equal(before[n], after[n]) for n in trained)
    assert all(torch.equal(huge[EVENT - 1][n], huge[EVENT][n]) == (n in hit) for n in trained)


@pytest.mark.parametrize("device_side", [False, True], ids=["host", "device_side"])
@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_the_dense_adamw_part_equals_torch_adamw_leaving_the_huge_step_out(optimizer_class, device_side):
    model, reference = lora_pre_model(), lora_pre_model()
    options = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    if optimizer_class is LoRAPreAdamW:
        optimizer = LoRAPreAdamW([{"params": model.parameters(), "lowrank": False}], **options)
    else:
        optimizer = LoRAPreMuon([{"params": model.parameters(), "lowrank": False}],
                                **{f"adamw_{key}": value for key, value in options.items()})
    optimizer._device_side_skip = device_side
    torch_adamw = torch.optim.AdamW(reference.parameters(), foreach=True, **options)
    for step in range(STEPS):
        backward(model, step, "huge")
        optimizer.step()
        backward(reference, step, None)
        if step != EVENT:
            torch_adamw.step()
        else:  # the tensor the event left alone steps alone
            _step_only(torch_adamw, reference[3].bias)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        if device_side:  # its scalars come from float64 tensors: ulp-level rounding
            torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(param, expected), name
    assert optimizer.skipped_steps() == len(list(model.parameters())) - 1


def _step_only(optimizer, keep):
    """Step ``optimizer`` on ``keep`` only: the other gradients are set aside for the step."""
    others = [p for group in optimizer.param_groups for p in group["params"] if p is not keep]
    saved = [p.grad for p in others]
    for p in others:
        p.grad = None
    optimizer.step()
    for p, grad in zip(others, saved):
        p.grad = grad


def largest_float32_within(limit):
    value = torch.tensor(limit, dtype=torch.float32)
    return value if float(value) <= limit else torch.nextafter(value, torch.tensor(0.0))


@pytest.mark.parametrize("build", [
    lambda p: LoRAPreAdamW([{"params": p, "lowrank": False}], lr=1e-2),
    lambda p: _device_side(LoRAPreAdamW([{"params": p, "lowrank": False}], lr=1e-2)),
    lambda p: LoRAPreMuon([{"params": p, "lowrank": False}], adamw_lr=1e-2, adamw_betas=(0.9, 0.999)),
], ids=["adam_host", "adam_device_side", "muon_adamw"])
def test_the_limit_is_where_the_square_of_a_gradient_stops_fitting_the_second_moment(build):
    limit = gradient_limit(torch.float32)
    within = largest_float32_within(limit)
    beyond = torch.nextafter(within, torch.tensor(math.inf))
    assert float(within) ** 2 < torch.finfo(torch.float32).max < (4 * float(beyond)) ** 2  # within a factor 4
    param, reference = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = build([param])
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0, foreach=True)
    for gradient in (within, -within, beyond, within):
        param.grad = torch.full((3,), float(gradient))
        optimizer.step()
        if gradient is not beyond:
            reference.grad = param.grad.clone()
            torch_adamw.step()
    state = optimizer.state[param]
    assert optimizer.skipped_steps() == 1 and torch.isfinite(state["exp_avg_sq"]).all()
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], torch_adamw.state[reference]["exp_avg_sq"], rtol=1e-6, atol=0)


def _device_side(optimizer):
    optimizer._device_side_skip = True
    return optimizer


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_lora_pro_skips_a_layer_only_when_its_moments_would_overflow(mode):
    """A huge gradient on one adapter skips that adapter only; the other adapter and the AdamW tensors step as in a
    run where that adapter's gradient was NaN."""
    runs = []
    for poison in (1e30, math.nan):
        model = lora_pro_model()
        optimizer = LoRAPro(model, lr=1e-2, mode=mode)
        for step in range(3):
            backward(model, step, None)
            if step == 1:
                model[1].lora_A.grad.mul_(poison) if poison == 1e30 else model[1].lora_A.grad.fill_(poison)
            optimizer.step()
        runs.append((model, optimizer))
    (huge_model, huge), (nan_model, nan) = runs
    for (name, param), other in zip(huge_model.named_parameters(), nan_model.parameters()):
        assert torch.equal(param, other), name
    states_equal(huge, nan)
    assert huge.skipped_steps() == 1


def test_the_full_mode_bound_holds_for_factors_of_any_scale():
    """``max |U_t^T V|`` (dense, float64) never exceeds the blockwise bound, even when the blocks' scales differ by
    1e12; and the bound stays within a small factor of it (no false skips)."""
    generator = torch.Generator().manual_seed(3)
    rank, m, n = 3, 9, 7
    for top, bottom in ((1.0, 1.0), (1e-6, 1e6), (1e6, 1e-6)):
        U_t = torch.randn(4, 2 * rank, m, generator=generator)
        V = torch.randn(4, 2 * rank, n, generator=generator)
        U_t[:, :rank] *= top
        V[:, :rank] /= top
        U_t[:, rank:] *= bottom
        V[:, rank:] /= bottom
        dense = (U_t.double().mT @ V.double()).abs().amax(dim=(1, 2))
        bound = equivalent_gradient_bound(U_t, V)
        assert (dense <= bound * (1 + 1e-6)).all() and (bound <= 20 * dense).all(), (top, bottom)
    V[1, 0, 0] = math.nan
    assert not equivalent_gradient_bound(U_t, V)[1] <= 1e30  # a NaN factor is never within any limit


def test_newton_schulz_normalises_momenta_whose_squares_overflow():
    """Muon's momentum of a gradient near the limit has a Frobenius norm whose squares overflow float32: the
    orthogonalisation must give what it gives for the same matrix scaled down exactly, not zero."""
    from lit_lowrank.optim.lora_pre.muon_update import frobenius_norm, newton_schulz_orthogonalize

    matrix = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    huge = matrix * 2.0**70  # entries ~1e21: squares ~1e42
    assert math.isinf(float(torch.linalg.matrix_norm(huge)))
    for read_on_host in (False, True):
        norm = frobenius_norm(huge, read_on_host)
        assert float(norm) == pytest.approx(2.0**70 * float(torch.linalg.matrix_norm(matrix.double())), rel=1e-6)
        assert torch.equal(newton_schulz_orthogonalize(huge, 5, read_on_host=read_on_host),
                           newton_schulz_orthogonalize(matrix, 5))
    # finite norms: the result of the plain formula, bit for bit
    normalised = matrix / (torch.linalg.matrix_norm(matrix) + 1e-7)
    assert torch.equal(frobenius_norm(matrix), torch.linalg.matrix_norm(matrix))
    assert torch.equal(newton_schulz_orthogonalize(matrix, 0), normalised)


def test_a_huge_gradient_on_the_kernel_path_is_skipped_too(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lit_lowrank.optim.lora_pre import adam_kernel

    launched = []
    kernel_passes = adam_kernel.kernel_passes

    def recording(*args):
        passes = kernel_passes(*args)
        launched.append(passes is not None)
        return passes

    monkeypatch.setattr(adam_kernel, "kernel_passes", recording)
    param = nn.Parameter(torch.randn(40, 36))
    optimizer = LoRAPreAdamW([param], lr=1e-2, rank=4, use_triton=True, residual_step=False)  # the kernel's m_t
    optimizer._device_side_skip = True  # the kernel then takes the skip flag itself
    param.grad = torch.randn(40, 36)
    optimizer.step()
    before, state_before = param.detach().clone(), copy.deepcopy(dict(optimizer.state[param]))
    param.grad = torch.randn(40, 36) * 1e30
    optimizer.step()
    assert torch.equal(param.detach(), before)
    state = optimizer.state[param]
    assert all(torch.equal(state[key], state_before[key]) for key in ("step", "B", "A", "V_B", "V_A"))
    assert optimizer.skipped_steps() == 1
    assert launched == [True, True]  # both steps ran the kernel (Triton's interpreter), the skip flag inside it


@pytest.mark.parametrize("device_side", [False, True], ids=["host", "device_side"])
def test_muon_steps_a_gradient_just_within_the_limit_like_the_same_gradient_scaled_down(device_side):
    """Its momentum's squares overflow float32. Muon's update does not depend on the gradient's scale, so the matrix
    must move as with the same gradients times 2^-40 (whose norms are finite), not by 0 (``x / inf``)."""
    gradient = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    trajectories, huge = [], 0.9 * float(largest_float32_within(gradient_limit(torch.float32)))
    for scale in (huge, huge * 2.0**-40):
        param = nn.Parameter(torch.zeros(8, 6))
        optimizer = LoRAPreMuon([param], lr=1e-2, rank=2, seed=0)
        optimizer._device_side_skip = device_side
        trajectory = []
        for step in range(3):
            param.grad = gradient * (1 + step) * scale / 3
            optimizer.step()
            trajectory.append(param.detach().clone())
        assert optimizer.skipped_steps() == 0
        assert all(torch.isfinite(optimizer.state[param][key]).all() for key in ("B", "A"))
        trajectories.append(torch.stack(trajectory))
    assert trajectories[0].abs().amin(dim=(1, 2)).gt(0).all()
    torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-5, atol=1e-7)
