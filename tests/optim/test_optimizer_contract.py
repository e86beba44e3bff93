"""torch.optim's contracts, checked for every optimizer of this package from its ``OptimizerInfo``
(``optimizer_infos.py``), over all its inputs: state_dict round trips, hooks, deep copies and pickles, zero and
missing gradients, LR schedulers, dtype moves, param-group defaults, maximize, error messages (issue 24, items 4-8).

Where torch's own behaviour is the reference (hooks, schedulers, AdamW groups), the same calls run on a
``torch.optim.AdamW`` beside ours; elsewhere an uninterrupted run, or the same run with negated gradients, is.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from optim.optimizer_infos import OPTIMIZER_INFOS, STEP_ERROR, ModelOptimizerInfo
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro
from lit_lowrank.optim.state import COUNTERS

pytestmark = pytest.mark.usefixtures("one_thread")

infos = pytest.mark.parametrize("info", OPTIMIZER_INFOS, ids=lambda info: info.name)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def set_grads(model: nn.Module, seed: int, sign: float = 1.0) -> list[torch.Tensor]:
    """Fixed random gradients (times ``sign``) on every trainable tensor; returns copies of them."""
    generator = torch.Generator().manual_seed(seed)
    for p in trainable(model):
        p.grad = sign * torch.randn(p.shape, generator=generator).to(p.dtype)
    return [p.grad.clone() for p in trainable(model)]


def run(model: nn.Module, optimizer: torch.optim.Optimizer, seeds: range | list[int]) -> None:
    for seed in seeds:
        set_grads(model, seed)
        optimizer.step()


def values(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, value, its parameter) of every state tensor."""
    return [(key, value, p) for group in optimizer.param_groups for p in group["params"]
            for key, value in optimizer.state.get(p, {}).items() if isinstance(value, torch.Tensor)]


def built(info: ModelOptimizerInfo, optim_input, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = info.make_model(dtype)
    return model, info.build(optim_input, model, **overrides)


# ------------------------------------------------------------------------------------------- state_dict
@infos
def test_a_state_dict_saved_and_loaded_continues_exactly_like_the_uninterrupted_run(info):
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        reference, reference_optimizer = built(info, optim_input)
        run(model, optimizer, [0, 1])
        run(reference, reference_optimizer, range(4))
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        resumed_model = copy.deepcopy(model)
        resumed = info.build(optim_input, resumed_model)
        resumed.load_state_dict(saved)
        run(resumed_model, resumed, [2, 3])
        assert_equal(values(resumed_model), values(reference))


@infos
def test_loaded_state_is_an_own_copy_of_the_state_dict(info):
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0])
        other = info.build(optim_input, copy.deepcopy(model))
        other.load_state_dict(optimizer.state_dict())
        for _, value, _ in state_tensors(other):
            value.add_(1.0)  # must not reach the source optimizer
        sources = {key: value for key, value, _ in state_tensors(optimizer)}
        assert all(not torch.equal(value, sources[key]) for key, value, _ in state_tensors(other) if key in sources)


# ------------------------------------------------------------------------------------------------ hooks
def load_with_hooks(optimizer: torch.optim.Optimizer, state_dict: dict) -> tuple[list, torch.optim.Optimizer]:
    """Load ``state_dict`` through a pre-hook that edits it in place (prepended), one that replaces it (other lr, every
    moment 0.25), and a post-hook that records what it sees, then edits the groups and every state tensor."""
    calls = []

    def edit_in_place(opt, sd):
        calls.append("edit")
        sd["param_groups"][0]["lr"] = 0.002

    def replace(opt, sd):
        calls.append(("replace", sd["param_groups"][0]["lr"]))
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 0.003
        for entry in new["state"].values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and key not in COUNTERS:
                    value.fill_(0.25)
        return new

    def post(opt):
        moments = [value for key, value, _ in state_tensors(opt) if key not in COUNTERS]
        calls.append(("post", opt.param_groups[0]["lr"], bool(moments) and all((m == 0.25).all() for m in moments)))
        opt.param_groups[0]["weight_decay"] = 0.25
        for _, value, _ in state_tensors(opt):
            value.fill_(0.5)

    optimizer.register_load_state_dict_pre_hook(replace)
    optimizer.register_load_state_dict_pre_hook(edit_in_place, prepend=True)
    optimizer.register_load_state_dict_post_hook(post)
    optimizer.load_state_dict(state_dict)
    return calls, optimizer


@infos
def test_load_state_dict_hooks_work_as_in_torch_adamw(info):
    """A pre-hook's returned state dict is the one loaded, and a post-hook's edits are kept (issue 24, item 5)."""
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0])
        calls, loaded = load_with_hooks(info.build(optim_input, copy.deepcopy(model)), optimizer.state_dict())
        torch_model = copy.deepcopy(model)
        adamw = torch.optim.AdamW(trainable(torch_model))
        run(torch_model, adamw, [0])
        torch_calls, _ = load_with_hooks(torch.optim.AdamW(trainable(copy.deepcopy(torch_model))), adamw.state_dict())
        assert calls == torch_calls == ["edit", ("replace", 0.002), ("post", 0.003, True)]
        assert loaded.param_groups[0]["lr"] == 0.003 and loaded.param_groups[0]["weight_decay"] == 0.25
        assert state_tensors(loaded) and all((value == 0.5).all() for _, value, _ in state_tensors(loaded))


@infos
def test_state_dict_hooks_run_and_a_post_hook_may_replace_the_state_dict(info):
    optim_input = info.inputs()[0]
    model, optimizer = built(info, optim_input)
    run(model, optimizer, [0])
    seen = []
    optimizer.register_state_dict_pre_hook(lambda opt: seen.append(opt is optimizer))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": len(sd["state"])})
    saved = optimizer.state_dict()
    assert seen == [True] and saved["extra"] == len(optimizer.state) > 0


@infos
def test_step_hooks_run_around_every_step_with_the_step_arguments(info):
    optim_input = info.inputs()[0]
    model, optimizer = built(info, optim_input)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt is optimizer, args, kwargs)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt is optimizer)))
    handle = register_optimizer_step_post_hook(lambda opt, *_: calls.append("global"))
    try:
        set_grads(model, 0)
        loss = optimizer.step(closure=lambda: torch.tensor(1.5))
    finally:
        handle.remove()
    assert loss == 1.5
    assert calls[0][:2] == ("pre", True) and calls[1:] == [("post", True), "global"]


# --------------------------------------------------------------------------------------- copy and pickle
def pickled(thing):
    return pickle.loads(pickle.dumps(thing))


@infos
@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copy_of_model_and_optimizer_steps_exactly_like_the_original(info, how):
    """``copy.deepcopy((model, optimizer))`` and a pickle round trip of the pair (issue 24, item 4): the copy steps the
    copied model as the original steps its own, and leaves the original alone."""
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0])
        copied_model, copied = how((model, optimizer))
        before = values(model)
        run(copied_model, copied, [1, 2])
        assert_equal(values(model), before)
        run(model, optimizer, [1, 2])
        assert_equal(values(copied_model), values(model))


@infos
def test_a_copy_of_the_optimizer_alone_keeps_its_public_attributes_and_steps_its_own_tensors(info):
    """torch's test_deepcopy_copies_all_public_attrs, and the copy must step (never an AttributeError later)."""
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0])
        copied = copy.deepcopy(optimizer)
        public = {key for key in vars(optimizer) if not key.startswith("_")}
        assert public == {key for key in vars(copied) if not key.startswith("_")}
        copied_params = [p for group in copied.param_groups for p in group["params"]]
        generator = torch.Generator().manual_seed(5)
        for p, q in zip([p for group in optimizer.param_groups for p in group["params"]], copied_params):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        copied.step()
        assert_equal(copied_params, [p.detach() for group in optimizer.param_groups for p in group["params"]])
        if info.optim_cls is LoRAPro:  # its model was copied along, and is gone: a clear error, not a wrong pairing
            with pytest.raises(RuntimeError, match=r"no longer exists.*HINT: copy or pickle the model with it"):
                copied.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copied_lora_pre_muon_adds_groups_with_its_adamw_defaults(how):
    weight, bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.zeros(6))
    copied = how(LoRAPreMuon([weight], rank=2, lr=0.05, adamw_lr=7e-3, adamw_betas=(0.8, 0.9)))
    copied.add_param_group({"params": [bias]})
    assert copied.param_groups[-1]["lr"] == 7e-3 and copied.param_groups[-1]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("how", [copy.deepcopy, pickled], ids=["deepcopy", "pickle"])
def test_a_copied_lora_pro_adds_the_copied_models_adapters(how):
    info = next(info for info in OPTIMIZER_INFOS if info.optim_cls is LoRAPro)
    model = info.make_model(torch.float32)
    late = model[2].requires_grad_(False)
    optimizer = LoRAPro(model, lr=1e-2)
    copied_model, copied = how((model, optimizer))
    copied_late = copied_model[2].requires_grad_(True)
    copied.add_param_group({"params": [copied_late.lora_A, copied_late.lora_B]})
    assert [pair.name for pair in copied.pairs] == ["0", "2"] and copied.pairs[1].A is copied_late.lora_A
    late.requires_grad_(True)  # the original's model did not change
    assert [pair.name for pair in optimizer.pairs] == ["0"]


# ------------------------------------------------------------------------------------ zero and no gradients
@infos
def test_zero_gradients_leave_the_parameters_as_torch_adamw_does(info):
    for optim_input in info.inputs():
        if optim_input.kwargs.get("weight_decay", 0.0) or optim_input.kwargs.get("adamw_weight_decay", 0.0):
            continue  # decay moves weights whatever the gradient
        model, optimizer = built(info, optim_input)
        before = values(model)
        for p in trainable(model):
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.step()
        assert_equal(values(model), before)
        optimizer.zero_grad()
        assert all(p.grad is None for p in trainable(model))


@infos
def test_tensors_without_gradients_are_not_stepped_and_get_no_state_tensors(info):
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        before = values(model)
        optimizer.step()
        assert_equal(values(model), before)
        assert not state_tensors(optimizer)


# --------------------------------------------------------------------------------------------- schedulers
def step_scheduler(scheduler, epoch_loss):
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(epoch_loss)
    else:
        scheduler.step()


def as_float(lr) -> float:
    return float(lr)


@infos
def test_lr_schedulers_set_the_same_learning_rates_as_on_torch_adamw(info):
    for optim_input in info.inputs():
        for make_scheduler in info.scheduler_inputs[0]:
            model, optimizer = built(info, optim_input)
            adamw = torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)], "lr": as_float(group["lr"])}
                                       for group in optimizer.param_groups])
            ours, theirs = make_scheduler(optimizer), make_scheduler(adamw)
            for seed in range(3):
                run(model, optimizer, [seed])
                adamw.step()  # no gradient: nothing moves, but the scheduler sees a step
                step_scheduler(ours, 1.0)
                step_scheduler(theirs, 1.0)
                # a tensor lr (LoRAPro) holds float32 values
                assert [as_float(g["lr"]) for g in optimizer.param_groups] == pytest.approx(
                    [g["lr"] for g in adamw.param_groups], rel=1e-6)
            assert all(torch.isfinite(p).all() for p in model.parameters())


@infos
def test_a_scheduler_that_sets_every_lr_to_zero_freezes_every_tensor(info):
    """The groups' ``lr`` is what the step uses: AdamW groups of LoRAPreMuon and a tensor lr of LoRAPro too."""
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0])
        LambdaLR(optimizer, lambda step: 0.0)  # sets every group's lr to 0 at once
        before = values(model)
        run(model, optimizer, [1, 2])
        assert_equal(values(model), before)


# ------------------------------------------------------------------------------------------- dtype moves
@infos
def test_a_float32_checkpoint_resumes_the_model_cast_to_float64(info):
    """State follows its parameter as in torch (issue 24, item 6): float64 state, float32 counters; the dense AdamW
    moments get the dtype torch.optim.AdamW's get from the same load."""
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input)
        run(model, optimizer, [0, 1])
        saved = optimizer.state_dict()
        wide = copy.deepcopy(model).double()
        resumed = info.build(optim_input, wide)
        resumed.load_state_dict(saved)
        for key, value, param in state_tensors(resumed):
            assert value.dtype == (torch.float32 if key in COUNTERS else torch.float64), key
        run(wide, resumed, [2])
        run(model, optimizer, [2])
        for wide_value, value in zip(wide.parameters(), model.parameters()):
            torch.testing.assert_close(wide_value.float(), value, rtol=1e-4, atol=1e-5)


def test_torch_adamw_casts_loaded_moments_like_ours():
    """The reference for the test above: torch.optim.AdamW's moments follow a float64 parameter on load."""
    param = nn.Parameter(torch.randn(3))
    adamw = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    adamw.step()
    wide = torch.optim.AdamW([nn.Parameter(param.detach().double())])
    wide.load_state_dict(adamw.state_dict())
    assert {key: value.dtype for key, value in next(iter(wide.state.values())).items()} == {
        "step": torch.float32, "exp_avg": torch.float64, "exp_avg_sq": torch.float64}


@infos
def test_a_bfloat16_model_keeps_float32_state_through_a_checkpoint(info):
    for optim_input in info.inputs():
        model, optimizer = built(info, optim_input, dtype=torch.bfloat16)
        reference, reference_optimizer = built(info, optim_input, dtype=torch.bfloat16)
        run(model, optimizer, [0])
        run(reference, reference_optimizer, [0, 1])
        resumed_model = copy.deepcopy(model)
        resumed = info.build(optim_input, resumed_model)
        resumed.load_state_dict(optimizer.state_dict())
        assert all(value.dtype == torch.float32 for _, value, _ in state_tensors(resumed) if value.is_floating_point())
        run(resumed_model, resumed, [1])
        assert_equal(values(resumed_model), values(reference))


# ------------------------------------------------------------------------------------- param-group defaults
@infos
def test_groups_get_the_constructor_defaults_for_what_they_leave_out(info):
    """torch's rule: every key of ``defaults`` in every group, a group's own values kept, groups added later filled
    the same way. LoRAPreMuon's AdamW groups take ``adamw_lr``, ``adamw_betas``, ... instead (issue 24, item 7;
    documented: Muon's lr is ~60x too large for AdamW)."""
    model = info.make_model(torch.float32)
    betas = {"adamw_betas" if info.optim_cls is LoRAPreMuon else "betas": (0.8, 0.9)}
    if info.optim_cls is LoRAPro:
        optimizer = LoRAPro(model, lr=0.02, **betas)
    else:
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim == 1]
        extra = {"adamw_lr": 7e-3} if info.optim_cls is LoRAPreMuon else {}
        optimizer = info.optim_cls([{"params": matrices}, {"params": vectors}], lr=0.02, rank=2, **betas, **extra)
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.5, "betas": (0.7, 0.8)})
    for group in optimizer.param_groups:
        assert set(optimizer.defaults) <= set(group)
    first, *middle, added, own = optimizer.param_groups
    assert first["lr"] == 0.02 and own["lr"] == 0.5 and own["betas"] == (0.7, 0.8)
    if info.optim_cls is LoRAPreMuon:  # the vectors' group and the added one are AdamW groups
        assert [(g["lowrank"], g["lr"], g["betas"]) for g in (*middle, added)] == [(False, 7e-3, (0.8, 0.9))] * 2
    else:
        assert [(g["lr"], g["betas"]) for g in (first, *middle, added)] == [(0.02, (0.8, 0.9))] * (len(middle) + 2)


# -------------------------------------------------------------------------------------------------- maximize
@infos
def test_maximize_steps_exactly_like_minimizing_the_negated_gradients_and_restores_them(info):
    for optim_input in info.inputs():
        kwargs = {key: value for key, value in optim_input.kwargs.items() if key != "maximize"}
        model, maximizing = built(info, optim_input, **kwargs, maximize=True)
        reference, minimizing = built(info, optim_input, **kwargs, maximize=False)
        initial = values(model)
        for seed in range(3):
            grads = set_grads(model, seed)
            set_grads(reference, seed, sign=-1.0)
            maximizing.step()
            minimizing.step()
            assert_equal([p.grad for p in trainable(model)], grads)
        assert_equal(values(model), values(reference))
        assert any(not torch.equal(value, start) for value, start in zip(values(model), initial))


@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_maximize_on_the_adamw_groups_is_torch_adamw_maximize_bitwise(optimizer_class):
    vectors = [nn.Parameter(torch.randn(5)) for _ in range(2)]
    copies = [nn.Parameter(v.detach().clone()) for v in vectors]
    kwargs = {"adamw_lr": 1e-2, "adamw_weight_decay": 0.1} if optimizer_class is LoRAPreMuon else {
        "lr": 1e-2, "weight_decay": 0.1}
    ours = optimizer_class([{"params": vectors, "lowrank": False}], maximize=True, **kwargs)
    theirs = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, maximize=True, foreach=True,
                               betas=ours.param_groups[0]["betas"])
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        for v, c in zip(vectors, copies):
            v.grad = torch.randn(5, generator=generator)
            c.grad = v.grad.clone()
        ours.step()
        theirs.step()
    assert_equal([v.detach() for v in vectors], [c.detach() for c in copies])


@infos
def test_a_state_dict_saved_before_maximize_existed_loads_and_steps(info):
    optim_input = info.inputs()[0]
    model, optimizer = built(info, optim_input)
    run(model, optimizer, [0])
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["maximize"]
    resumed = info.build(optim_input, model)
    resumed.load_state_dict(saved)
    assert all(group["maximize"] is False for group in resumed.param_groups)
    run(model, resumed, [1])
    assert "maximize" in repr(resumed) and type(resumed).__name__ in repr(resumed)


# ----------------------------------------------------------------------------------------------------- errors
@infos
def test_wrong_inputs_raise_torch_s_error_types_with_a_clear_message(info):
    for error_input in info.optim_error_inputs_func(torch.device("cpu"), torch.float32):
        optim_input = error_input.optimizer_error_input
        model = info.make_model(torch.float32)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            optimizer = info.build(optim_input, model)
            if error_input.error_on == STEP_ERROR:
                set_grads(model, 0)
                last = trainable(model)[-1]
                last.grad = last.grad.to_sparse()
                optimizer.step()


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_lora_pre_muon_step_compiles_with_inductor_and_matches_eager():
    """``torch.compile(optimizer.step)`` failed in inductor ("Cannot view a tensor with shape [1, 2, 8]", issue 24,
    item 7). One step of a compiled and an eager optimizer from the same start (about 10 s of compiling)."""
    torch._dynamo.reset()
    weight = nn.Parameter(torch.randn(6, 8))
    twin = nn.Parameter(weight.detach().clone())
    compiled, eager = LoRAPreMuon([weight], rank=2, seed=0), LoRAPreMuon([twin], rank=2, seed=0)
    weight.grad = torch.randn(6, 8)
    twin.grad = weight.grad.clone()
    torch.compile(compiled.step, backend="inductor")()
    eager.step()
    torch.testing.assert_close(weight.detach(), twin.detach(), rtol=1e-5, atol=1e-6)
    for key in ("B", "A"):
        torch.testing.assert_close(compiled.state[weight][key], eager.state[twin][key], rtol=1e-5, atol=1e-6)
