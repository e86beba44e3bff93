"""LoRAPro and apply_lora_pro_ on models with adapters, against independent references.

References: scipy's Sylvester solver with explicit pseudo-inverses (the reference code's method), dense
projectors, the full-weight gradient captured by hooks on each adapted layer, and torch.optim.AdamW.
"""
import copy
import io

import numpy as np
import pytest
import torch
from scipy.linalg import solve_sylvester
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.optim import LoRAPro, apply_lora_pro_

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def reference_lora_pro(A, B, gA, gB, s):
    """LoRA-Pro's (dA, dB) the way the paper's code computes it: explicit inverses + scipy Sylvester (fp64)."""
    A, B, gA, gB = (t.detach().double().numpy() for t in (A, B, gA, gB))
    QB, QA = np.linalg.pinv(B.T @ B, rcond=1e-10), np.linalg.pinv(A @ A.T, rcond=1e-10)
    dA = QB @ gA / s**2
    dB = (gB - B @ QB @ B.T @ gB) @ QA / s**2
    X = solve_sylvester(B.T @ B, A @ A.T, -dA @ A.T)
    return torch.from_numpy(dA + X @ A), torch.from_numpy(dB - B @ X)


def make_net(seed=0, dtype=F64, b_std=0.3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    net = inject_lora(net, LoRAConfig(r=2, alpha=3.0, target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        for _, module in lora_modules(net):
            module.lora_B.normal_(std=b_std)
    return net


def batch(seed, dtype=F64, n=16):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randn(n, 3, generator=gen).to(dtype)


def loss_of(net, data):
    x, y = data
    return (net(x) - y).square().mean()


def delta_weight(module):
    return module.scaling * module.lora_B.detach().double() @ module.lora_A.detach().double()


def adapted_weight(module):
    return module.weight.detach().double() + delta_weight(module)


class WeightGradients:
    """dL/dW of each adapted Linear, from its input and output gradient (never from the adapter grads)."""

    def __init__(self, net):
        self.grads = {}
        for name, module in lora_modules(net):
            module.register_forward_hook(lambda m, args, out, name=name: self._watch(name, args[0], out))

    def _watch(self, name, x, out):
        def record(grad_out):
            self.grads[name] = grad_out.reshape(-1, grad_out.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()
        out.register_hook(record)


def step_with_reference(opt, net, data, grads_fn):
    """Backward, put reference gradients on the adapters with grads_fn, then opt.step()."""
    opt.zero_grad()
    loss_of(net, data).backward()
    with torch.no_grad():
        for _, module in lora_modules(net):
            dA, dB = grads_fn(module)
            module.lora_A.grad.copy_(dA)
            module.lora_B.grad.copy_(dB)
    opt.step()


def train(opt, net, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        loss_of(net, batch(i, next(net.parameters()).dtype)).backward()
        opt.step()


def test_apply_lora_pro_matches_the_reference_and_each_module_scaling():
    net = make_net()
    modules = dict(lora_modules(net))
    modules["2"].scaling = 0.7  # pairs are solved with their own module's scaling, never a hard-wired one
    loss_of(net, batch(0)).backward()
    expected = {name: reference_lora_pro(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling)
                for name, m in modules.items()}
    assert apply_lora_pro_(net) == 2
    for name, module in modules.items():
        torch.testing.assert_close(module.lora_A.grad, expected[name][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(module.lora_B.grad, expected[name][1], rtol=1e-9, atol=1e-12)


def test_efficient_mode_with_sgd_moves_W_by_minus_lr_g():  # invariant 9
    errors = {}
    for rewrite in (True, False):
        for lr in (1e-2, 1e-3, 1e-4):
            torch.manual_seed(0)
            layer = inject_lora(nn.Sequential(nn.Linear(5, 5).double()), LoRAConfig(r=5, target_modules=["0"]))
            module = layer[0]
            with torch.no_grad():
                module.lora_B.normal_()
            recorder = WeightGradients(layer)
            loss_of_layer = (layer(torch.randn(8, 5, dtype=F64)) - 1).pow(3).sum()
            loss_of_layer.backward()
            W, g = adapted_weight(module), recorder.grads["0"]
            if rewrite:
                apply_lora_pro_(layer)
            torch.optim.SGD([module.lora_A, module.lora_B], lr=lr).step()
            errors[rewrite, lr] = float((adapted_weight(module) - (W - lr * g)).norm() / lr**2)
    lora_pro = [errors[True, lr] for lr in (1e-2, 1e-3, 1e-4)]
    assert max(lora_pro) < 2 * min(lora_pro), errors  # error is O(lr^2)
    assert errors[False, 1e-4] > 50 * errors[False, 1e-2], errors  # plain LoRA gradients are off at O(lr)


def test_clipping_after_the_rewrite_sees_the_lora_pro_norm():
    net = make_net()
    loss_of(net, batch(0)).backward()
    modules = [m for _, m in lora_modules(net)]
    expected = [t for m in modules
                for t in reference_lora_pro(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling)]
    params = [p for m in modules for p in (m.lora_A, m.lora_B)]
    apply_lora_pro_(net)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    torch.testing.assert_close(total, torch.stack([e.norm() for e in expected]).norm())
    for param, ref in zip(params, expected):
        torch.testing.assert_close(param.grad, ref * 1e-3 / (total + 1e-6), rtol=1e-9, atol=1e-15)  # torch adds 1e-6


@pytest.mark.parametrize("b_std", [0.0, 0.3])
def test_efficient_mode_equals_reference_grads_with_torch_adamw(b_std):
    net = make_net(b_std=b_std)
    ref_net = copy.deepcopy(net)
    opt = LoRAPro(net, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    ref_opt = torch.optim.AdamW([p for p in ref_net.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.99),
                                weight_decay=0.1)
    for i in range(4):
        train(opt, net, 1, start=i)
        step_with_reference(ref_opt, ref_net, batch(i),
                            lambda m: reference_lora_pro(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling))
    for (name, p), ref in zip(net.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-8, atol=1e-10, msg=name)


def test_other_parameters_follow_torch_adamw():
    net = make_net(dtype=torch.float32)
    ref_net = copy.deepcopy(net)
    opt = LoRAPro(net, lr=1e-2, weight_decay=0.05)
    opt.param_groups[0]["lr"] = 0.0  # adapters frozen in place: both runs see the same head gradients
    head = [p for p in ref_net[4].parameters()]
    ref_opt = torch.optim.AdamW(head, lr=1e-2, weight_decay=0.05)
    for i in range(5):
        train(opt, net, 1, start=i)
        ref_opt.zero_grad()
        loss_of(ref_net, batch(i, torch.float32)).backward()
        ref_opt.step()
    for p, ref in zip(net[4].parameters(), head):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)
    for p, ref in zip([m.lora_A for _, m in lora_modules(net)], [m.lora_A for _, m in lora_modules(ref_net)]):
        assert torch.equal(p, ref)


def reference_full_mode(net, data, moments, lr, betas, eps, wd, recorder):
    """Adam on g~ = P_B g + (I - P_B) g P_A in weight space (dense projectors), projected back by scipy."""
    loss_of(net, data).backward()
    with torch.no_grad():
        for name, m in lora_modules(net):
            A, B, s, g = m.lora_A.double(), m.lora_B.double(), m.scaling, recorder.grads[name]
            P_B, P_A = B @ torch.linalg.pinv(B), torch.linalg.pinv(A) @ A
            g_tilde = P_B @ g + (torch.eye(len(B), dtype=F64) - P_B) @ g @ P_A
            avg, avg_sq, t = moments.setdefault(name, [torch.zeros_like(g), torch.zeros_like(g), 0])
            t += 1
            avg = betas[0] * avg + (1 - betas[0]) * g_tilde
            avg_sq = betas[1] * avg_sq + (1 - betas[1]) * g_tilde**2
            moments[name] = [avg, avg_sq, t]
            G = (avg / (1 - betas[0] ** t)) / ((avg_sq / (1 - betas[1] ** t)).sqrt() + eps)
            dA, dB = reference_lora_pro(A, B, s * B.T @ G, s * G @ A.T, s)
            decay = (1 - lr * wd) ** 0.5
            m.lora_A.copy_(decay * A - lr * dA)
            m.lora_B.copy_(decay * B - lr * dB)
            m.lora_A.grad = m.lora_B.grad = None


def test_full_mode_equals_dense_weight_space_adam():
    net = make_net()
    ref_net = copy.deepcopy(net)
    for module in ref_net[4].parameters():
        module.requires_grad_(False)
    net[4].requires_grad_(False)
    recorder, moments = WeightGradients(ref_net), {}
    opt = LoRAPro(net, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, mode="full")
    for i in range(4):
        train(opt, net, 1, start=i)
        reference_full_mode(ref_net, batch(i), moments, 1e-2, (0.8, 0.95), 1e-6, 0.2, recorder)
    for (name, module), (_, ref) in zip(lora_modules(net), lora_modules(ref_net)):
        torch.testing.assert_close(module.lora_A, ref.lora_A, rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(module.lora_B, ref.lora_B, rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(opt.state[module.lora_A]["weight_exp_avg"], moments[name][0])
        assert opt.state[module.lora_A]["step"] == 4


def test_full_mode_tracks_full_finetuning_closer_than_lora():  # invariant 10
    torch.manual_seed(0)
    n, m, r, lr = 16, 12, 2, 1e-2
    x = torch.randn(64, n)
    base = nn.Linear(n, m, bias=False)
    y = x @ (base.weight.detach() + 0.3 * torch.randn(m, r) @ torch.randn(r, n)).T
    full = copy.deepcopy(base)
    adapted = inject_lora(nn.Sequential(copy.deepcopy(base)), LoRAConfig(r=r, alpha=2 * r))
    lora, pro = copy.deepcopy(adapted), copy.deepcopy(adapted)
    runs = {
        "full": (full, torch.optim.Adam(full.parameters(), lr=lr)),
        "lora": (lora, torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=lr)),
        "pro": (pro, LoRAPro(pro, lr=lr, mode="full")),
    }
    distance = {"lora": 0.0, "pro": 0.0}
    for _ in range(80):
        for model, opt in runs.values():
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        for name in distance:
            distance[name] += float((adapted_weight(runs[name][0][0]) - full.weight.detach().double()).norm())
    assert distance["pro"] < 0.6 * distance["lora"], distance


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bitwise(mode, dtype):
    net = make_net(dtype=dtype)
    opt = LoRAPro(net, lr=1e-2, weight_decay=0.01, mode=mode)
    train(opt, net, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = make_net(seed=7, dtype=dtype)
    fresh.load_state_dict(saved["model"])
    fresh_opt = LoRAPro(fresh, lr=1e-2, weight_decay=0.01, mode=mode)
    fresh_opt.load_state_dict(saved["opt"])
    train(opt, net, 1, start=3)
    train(fresh_opt, fresh, 1, start=3)
    for p, q in zip(net.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(net.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            assert value.dtype == fresh_opt.state[q][key].dtype and torch.equal(value, fresh_opt.state[q][key]), key


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_bf16_params_keep_fp32_state_and_follow_fp32(mode):
    nets = {dtype: make_net(dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    opts = {dtype: LoRAPro(net, lr=1e-2, mode=mode) for dtype, net in nets.items()}
    for dtype in nets:
        train(opts[dtype], nets[dtype], 3)
    for (_, low), (_, ref) in zip(lora_modules(nets[torch.bfloat16]), lora_modules(nets[torch.float32])):
        assert low.lora_A.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in opts[torch.bfloat16].state[low.lora_A].values())
        torch.testing.assert_close(adapted_weight(low), adapted_weight(ref), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_non_finite_gradients_skip_the_layer_without_nan(mode):
    net = make_net(dtype=torch.float32)
    opt = LoRAPro(net, lr=1e-2, mode=mode)
    train(opt, net, 1)
    snapshot = copy.deepcopy({"params": list(net.parameters()), "state": {k: dict(v) for k, v in opt.state.items()}})
    opt.zero_grad()
    loss_of(net, batch(1, torch.float32)).backward()
    net[0].lora_A.grad[0, 0] = float("inf")
    net[4].weight.grad[0, 0] = float("nan")
    opt.step()
    params = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    for index, p in enumerate(params):
        if not p.requires_grad:
            continue
        skipped = p is net[0].lora_A or p is net[0].lora_B or p is net[4].weight
        assert torch.equal(p, snapshot["params"][index]) == skipped, index
        old_state = snapshot["state"].get(snapshot["params"][index], {})
        for key, value in opt.state.get(p, {}).items():
            if key == "skipped_steps":  # counted per adapter (in lora_A's state) and per other parameter
                counted = p is net[0].lora_A or p is net[4].weight
                assert float(value) == float(old_state[key]) + counted, (index, key)
                continue
            assert torch.equal(value, old_state[key]) == skipped, (index, key)
    assert opt.skipped_steps() == 2


def test_apply_lora_pro_keeps_non_finite_layers_non_finite():
    net = make_net(dtype=torch.float32)
    loss_of(net, batch(0, torch.float32)).backward()
    net[2].lora_B.grad[1, 0] = float("inf")
    assert apply_lora_pro_(net) == 2
    assert torch.isnan(net[2].lora_A.grad).all() and torch.isnan(net[2].lora_B.grad).all()
    assert torch.isfinite(net[0].lora_A.grad).all() and torch.isfinite(net[0].lora_B.grad).all()


def test_grad_scaler_unscales_before_step_and_skips_overflow():
    nets = [make_net(dtype=torch.float32) for _ in range(2)]
    opts = [LoRAPro(net, lr=1e-2, mode="full") for net in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    train(opts[0], nets[0], 1)
    opts[1].zero_grad()
    scaler.scale(loss_of(nets[1], batch(0, torch.float32))).backward()
    scaler.step(opts[1])
    scaler.update()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = copy.deepcopy(list(nets[1].parameters()))
    opts[1].zero_grad()
    scaler.scale(loss_of(nets[1], batch(1, torch.float32)) * float("inf")).backward()
    scaler.step(opts[1])
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, nets[1].parameters()))
    assert scaler.get_scale() < 2.0**12


def test_lr_scheduler_and_closure():
    nets = [make_net(dtype=torch.float32) for _ in range(2)]
    halved = LoRAPro(nets[0], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(halved, lambda epoch: 0.5**epoch)
    with pytest.warns(UserWarning, match="before `optimizer.step"):  # stepping the schedule first on purpose
        scheduler.step()
    direct = LoRAPro(nets[1], lr=5e-3)
    calls = []

    def closure(net, opt):
        def run():
            calls.append(1)
            opt.zero_grad()
            loss = loss_of(net, batch(0, torch.float32))
            loss.backward()
            return loss
        return run

    losses = [opt.step(closure(net, opt)) for net, opt in zip(nets, (halved, direct))]
    assert len(calls) == 2 and torch.equal(losses[0], losses[1])
    assert all(g["lr"] == 5e-3 for g in halved.param_groups)
    for p, q in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_task_factory_hands_lora_pro_the_model():
    import functools

    from lit_lowrank.optim import build_optimizer

    net = make_net()
    opt = build_optimizer(functools.partial(LoRAPro, lr=1e-2, mode="full"), net)
    assert isinstance(opt, LoRAPro) and opt.mode == "full" and len(opt.pairs) == 2


def test_errors_explain_the_fix():
    with pytest.raises(ValueError, match="inject_lora"):
        LoRAPro(nn.Linear(3, 3))
    net = make_net()
    with pytest.raises(TypeError, match="nn.Module"):
        LoRAPro(net.parameters())
    with pytest.raises(ValueError, match="efficient"):
        LoRAPro(net, mode="fast")
    with pytest.raises(ValueError, match="use_triton"):
        LoRAPro(net, use_triton="yes")
    full = LoRAPro(net, mode="full")
    train(full, net, 1)
    with pytest.raises(ValueError, match="same mode"):
        LoRAPro(net, mode="efficient").load_state_dict(full.state_dict())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return inject_lora(transformers.LlamaForCausalLM(config), LoRAConfig(r=4, alpha=8.0))


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_tiny_llama_trains(mode):
    model = tiny_llama()
    assert len(list(lora_modules(model))) == 14  # 7 projections x 2 layers
    opt = LoRAPro(model, lr=1e-2, mode=mode)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_tiny_llama_rewrite_matches_reference_for_every_projection():
    model = tiny_llama()
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.normal_(std=0.1)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    modules = dict(lora_modules(model))
    expected = {name: reference_lora_pro(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling)
                for name, m in modules.items()}
    assert apply_lora_pro_(model) == 14
    for name, module in modules.items():
        torch.testing.assert_close(module.lora_A.grad.double(), expected[name][0], rtol=1e-3, atol=1e-6, msg=name)
        torch.testing.assert_close(module.lora_B.grad.double(), expected[name][1], rtol=1e-3, atol=1e-6, msg=name)


def test_multihead_attention_adapters_are_paired_by_module():
    torch.manual_seed(0)
    layer = inject_lora(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), LoRAConfig(r=2))
    names = [name for name, _ in lora_modules(layer)]
    assert {"self_attn.q_proj", "self_attn.v_proj", "linear1"} <= set(names)
    opt = LoRAPro(layer, lr=1e-2, mode="full")
    x = torch.randn(3, 5, 16)
    before = {name: delta_weight(m) for name, m in lora_modules(layer)}
    opt.zero_grad()
    layer(x).square().mean().backward()
    opt.step()
    assert all(not torch.equal(delta_weight(m), before[name]) for name, m in lora_modules(layer))


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append(func.overloadpacket.__name__)
        self.shapes.extend(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                           if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("mode", ["efficient", "full", "rewrite"])
def test_layers_are_solved_in_batches_without_host_sync(mode):
    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=tokens, labels=tokens).loss.backward()
    with OpRecorder() as recorder:
        if mode == "rewrite":
            apply_lora_pro_(model)
        else:
            LoRAPro(model, lr=1e-3, mode=mode).step()
    eigh_calls = sum(name in ("linalg_eigh", "_linalg_eigh") for name in recorder.calls)
    assert eigh_calls == 4, recorder.calls  # shapes: q/o, k/v, gate/up, down -> 4 batches, not 14 layers
    assert "_local_scalar_dense" not in recorder.calls  # no .item() / bool(tensor): nothing waits on the device
    if mode != "full":  # efficient LoRA-Pro never forms an m x n (let alone m x m) matrix of an adapted layer
        assert all(min(shape[-2:]) <= 8 for shape in recorder.shapes if len(shape) >= 2)
