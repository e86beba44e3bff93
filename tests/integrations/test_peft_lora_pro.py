"""LoRA-Pro on PEFT models (``peft.get_peft_model``): the optimizer in both modes, the callback and
``apply_lora_pro_`` step PEFT's LoRA layers exactly as they step lit_lowrank's own adapters with the same weights, the
factors' orientation holds for GPT-2's Conv1D and for embeddings (checked against the explicit full gradient), and
what LoRA-Pro cannot update stops with an error that names the module and the fix."""
import copy
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.callbacks import LoRAProGradients
from lit_lowrank.optim import LoRAPro, apply_lora_pro_, lora_pro_gradients

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def ours_name(peft_name: str) -> str:
    """The lit_lowrank parameter that matches a PEFT one: same module path, ``lora_A`` for ``lora_A.default.weight``,
    the module itself for a ``modules_to_save`` copy."""
    name = peft_name.removeprefix("base_model.model.")
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
    return name.replace(".modules_to_save.default.", ".")


def twin_models(rslora: bool, targets=TARGETS, base=None, seed=0):
    """The same tiny Llama with lit_lowrank's adapters and with PEFT's, identical factors (B non-zero) and trainable
    ``lm_head`` (``modules_to_save``) in both."""
    torch.manual_seed(seed)
    base = base if base is not None else tiny_llama()
    ours = inject_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=targets, rslora=rslora,
                                                       modules_to_save=["lm_head"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.2)
        mine = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            if ".original_module." not in name:
                param.copy_(mine[ours_name(name)])
    trainable = {ours_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}  # lm_head and the factors
    return ours, theirs


def batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (2, 12), generator=generator) for _ in range(STEPS)]


def _optimizer_step(make):
    def run(model):
        optimizer = make(model)
        for ids in batches():
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    return run


def _rewrite_then(make, rewrite):
    def run(model):
        optimizer = make([p for p in model.parameters() if p.requires_grad])
        for ids in batches():
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            rewrite(model, optimizer)
            optimizer.step()
    return run


TRAININGS = {
    "efficient": _optimizer_step(lambda model: LoRAPro(model, lr=1e-2, weight_decay=0.1)),
    "full": _optimizer_step(lambda model: LoRAPro(model, lr=1e-2, weight_decay=0.1, mode="full", use_triton=False)),
    "callback+AdamW": _rewrite_then(lambda params: torch.optim.AdamW(params, lr=1e-2),
                                    lambda model, opt: LoRAProGradients().on_before_optimizer_step(None, model, opt)),
    "apply_lora_pro_+SGD": _rewrite_then(lambda params: torch.optim.SGD(params, lr=0.05),
                                         lambda model, opt: apply_lora_pro_(model)),
}
PLAIN_ADAMW = _optimizer_step(lambda model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                               lr=1e-2, weight_decay=0.1))


def max_difference(ours, theirs) -> float:
    mine = dict(ours.named_parameters())
    return max((param - mine[ours_name(name)]).abs().max().item() for name, param in theirs.named_parameters()
               if ".original_module." not in name)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("training", sorted(TRAININGS))
def test_peft_layers_step_exactly_like_our_adapters(training, rslora):
    ours, theirs = twin_models(rslora)
    start = copy.deepcopy(theirs)
    TRAININGS[training](ours)
    TRAININGS[training](theirs)
    assert max_difference(ours, theirs) <= 1e-6
    moved = max_difference(ours, start)  # the comparison is not between two untouched models
    assert moved > 1e-3
    # ... and the PEFT model was not trained by plain AdamW (what LoRA-Pro on PEFT used to be, silently)
    if training in ("efficient", "callback+AdamW"):
        plain = copy.deepcopy(start)
        PLAIN_ADAMW(plain)
        assert max_difference(ours, plain) > 1e-3


def test_the_optimizer_finds_the_peft_pairs_and_steps_modules_to_save_with_adamw():
    _, theirs = twin_models(rslora=False)
    optimizer = LoRAPro(theirs, lr=1e-2)
    assert len(optimizer.pairs) == 2 * len(TARGETS)
    assert optimizer.pairs[0].name == "base_model.model.model.layers.0.self_attn.q_proj[default]"
    assert optimizer.pairs[0].scaling == 2.0
    heads = [n for n, p in theirs.named_parameters() if any(p is q for q in optimizer.param_groups[1]["params"])]
    assert heads == ["base_model.model.lm_head.modules_to_save.default.weight"]


def explicit_gradient_check(model, layer, A, B, scaling, loss_of, transposed):
    """LoRA-Pro's equivalent gradient ``s (B dA + dB A)`` from the rewritten gradients equals ``P_B g + (I - P_B) g
    P_A`` with ``g`` the base weight's own gradient (oriented as ``B @ A``): the orientation and scaling PEFT's layer
    was read with are right."""
    with torch.no_grad():
        B.normal_(std=0.3)
    base_weight = layer.base_layer.weight.requires_grad_(True)
    loss_of(model).backward()
    g = base_weight.grad.T if transposed else base_weight.grad
    assert apply_lora_pro_(model) >= 1
    equivalent = scaling * (B.detach() @ A.grad + B.grad @ A.detach())
    P_B = B @ torch.linalg.pinv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.pinv(A @ A.T) @ A
    expected = P_B @ g + (torch.eye(len(g)) - P_B) @ g @ P_A
    torch.testing.assert_close(equivalent.detach(), expected.detach(), rtol=1e-4, atol=1e-6)


def test_gpt2_conv1d_with_fan_in_fan_out_is_read_in_the_right_orientation():
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                             fan_in_fan_out=True, use_rslora=True))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert tuple(layer.base_layer.weight.shape) == (32, 96)  # Conv1D: in x out
    ids = torch.randint(3, 128, (2, 10))
    explicit_gradient_check(model, layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                            8 / 4**0.5, lambda m: m(input_ids=ids, labels=ids).loss, transposed=True)


def test_embedding_lora_is_read_in_the_right_orientation():
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer = model.base_model.model.model.embed_tokens
    ids = torch.randint(3, 128, (4, 12))
    explicit_gradient_check(model, layer, layer.lora_embedding_A["default"], layer.lora_embedding_B["default"],
                            2.0, lambda m: m(input_ids=ids, labels=ids).loss, transposed=True)


def test_lora_bias_is_stepped_by_adamw_next_to_the_pair():
    torch.manual_seed(0)
    net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)),
                              peft.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    optimizer = LoRAPro(net, lr=1e-2)
    bias = net.base_model.model[0].lora_B["default"].bias
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]
    assert optimizer.param_groups[1]["params"][0] is bias


# --- what LoRA-Pro cannot update stops, with the module and the fix named ---------------------------------------------

def _all_entry_points(model):
    """Each LoRA-Pro entry point, run on ``model`` after a backward pass."""
    ids = torch.randint(3, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    yield lambda: LoRAPro(model)
    yield lambda: LoRAPro(model, mode="full")
    yield lambda: apply_lora_pro_(model)
    yield lambda: LoRAProGradients().on_before_optimizer_step(None, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_dora_is_refused_by_every_entry_point():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    for entry_point in _all_entry_points(model):
        with pytest.raises(ValueError, match=r"adapter 'default' of 'base_model\.model\.model\.layers\.0\.self_attn"
                                             r"\.q_proj' is DoRA.*HINT: LoraConfig\(use_dora=False\).*AdamW"):
            entry_point()


def test_our_own_dora_flag_is_refused_too():
    net = inject_lora(nn.Sequential(nn.Linear(6, 6)), LoRAConfig(r=2, target_modules=["0"]))
    net[0].use_dora = True  # the flag lit_lowrank's adapters carry for DoRA
    with pytest.raises(ValueError, match=r"adapter '0' is DoRA.*HINT"):
        LoRAPro(net)
    net(torch.randn(3, 6)).sum().backward()
    with pytest.raises(ValueError, match=r"adapter '0' is DoRA"):
        apply_lora_pro_(net)


def test_frozen_dora_adapters_are_left_alone():
    # An adapter nobody trains is part of the frozen weight: nothing to refuse, nothing to rewrite.
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.requires_grad_(False)
    ids = torch.randint(3, 128, (2, 8))
    model.base_model.model.lm_head.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert apply_lora_pro_(model) == 0


def test_two_trainable_active_adapters_are_refused_one_at_a_time_works():
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for entry_point in _all_entry_points(model):
        with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj' has 2 "
                                             r"trainable adapters active at once \('default', 'second'\).*"
                                             r"HINT: .*set_adapter"):
            entry_point()
    model.zero_grad()
    model.set_adapter("second")
    names = [pair.name for pair in LoRAPro(model).pairs]
    assert names == [f"base_model.model.model.layers.{i}.self_attn.q_proj[second]" for i in range(2)]


def test_convolution_lora_is_refused():
    net = peft.get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
                              peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"adapter 'default' of 'base_model\.model\.0' \(Conv2d\) is LoRA with Conv2d "
                                         r"factors.*HINT: leave this layer out of target_modules"):
        LoRAPro(net)


def test_a_callback_without_adapters_warns_once():
    net = nn.Sequential(nn.Linear(4, 2))
    net(torch.randn(3, 4)).sum().backward()
    callback, optimizer = LoRAProGradients(), torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no trainable LoRA adapters.*HINT"):
        callback.on_before_optimizer_step(None, net, optimizer)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_before_optimizer_step(None, net, optimizer)


# --- the docs: a PEFT script gets LoRA-Pro by changing one line ----------------------------------------------------

ONE_LINE = "optimizer = LoRAPro(model, lr=1e-3)"


def _docs_example():
    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return re.search(r"## PEFT models\n.*?```python\n(.*?)```", page, re.S).group(1)


def test_the_docs_example_changes_one_line_of_a_peft_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with_lora_pro = _docs_example()
    line = next(line for line in with_lora_pro.splitlines() if line.startswith(ONE_LINE))
    before = line.split("# was: ", 1)[1]
    plain_script = with_lora_pro.replace(line, before)
    assert len(set(with_lora_pro.splitlines()) ^ set(plain_script.splitlines())) == 2  # that line, nothing else
    namespaces = []
    for script in (with_lora_pro, plain_script):
        namespace = {}
        exec(compile(script, "docs/integrations.md", "exec"), namespace)
        namespaces.append(namespace)
    lora_pro, plain = namespaces
    assert isinstance(lora_pro["optimizer"], LoRAPro) and len(lora_pro["optimizer"].pairs) == 14
    assert isinstance(plain["optimizer"], torch.optim.AdamW)
    trained = {n: p for n, p in lora_pro["model"].named_parameters() if "lora_" in n}
    other = dict(plain["model"].named_parameters())
    assert max((p - other[n]).abs().max().item() for n, p in trained.items()) > 1e-4  # LoRA-Pro did the steps
    assert (tmp_path / "peft_lora_pro" / "adapter_model.safetensors").is_file()


def test_lora_pro_rewrite_matches_the_closed_form_on_peft_factors():
    # The rewrite reads scaling[name] (rsLoRA here) and the factor weights as they are.
    torch.manual_seed(0)
    net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"],
                                                                              use_rslora=True))
    layer = net.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()
    net(torch.randn(7, 6)).square().sum().backward()
    expected = lora_pro_gradients(A.detach(), B.detach(), A.grad.clone(), B.grad.clone(), scaling=6 / 3**0.5)
    apply_lora_pro_(net)
    torch.testing.assert_close((A.grad, B.grad), expected)
