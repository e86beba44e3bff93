"""DoRA adapters compute, train, save, load and merge as PEFT's DoRA does on identical weights (PEFT: the reference)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES
from torch import nn

from lit_lowrank import LoRAConfig, export_merged, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from lit_lowrank.adapters import DoRALinear, lora_modules

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

#: PEFT's names, given to both libraries; GPT-2's Conv1D stores its weight transposed (fan_in_fan_out).
OPTIONS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
    "gpt2": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
}


def _twins(family, **extra):
    """Our DoRA model and PEFT's with the same random A, B and magnitude (not the initial ones: m != ||W + sBA||)."""
    model, inputs, forward = FAMILIES[family]()
    options = {**OPTIONS[family], **extra}
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(use_dora=True, **options))
    ours = inject_lora(model, LoRAConfig(use_dora=True, **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in lora_modules(ours):
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.3)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.3)
            module.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(module.out_features, generator=generator))
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector)
    return ours, theirs, inputs, forward


def _peft_tensors(theirs, name):
    layer = theirs.base_model.model.get_submodule(name)
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", sorted(OPTIONS))
def test_outputs_and_gradients_equal_peft(family):
    ours, theirs, inputs, forward = _twins(family)
    ours.eval(), theirs.eval()
    our_out, their_out = forward(ours, inputs), forward(theirs, inputs)
    _close(our_out, their_out)
    assert (our_out - forward(_bases(copy.deepcopy(ours)), inputs)).abs().max() > 1e-3  # the adapters matter
    our_out.square().mean().backward()
    their_out.square().mean().backward()
    for name, module in lora_modules(ours):
        for mine, peft_param in zip((module.lora_A, module.lora_B, module.lora_magnitude_vector),
                                    _peft_tensors(theirs, name)):
            assert mine.grad is not None and mine.grad.abs().max() > 0
            _close(mine.grad, peft_param.grad)


def _bases(model):
    """``model`` with its adapter wrappers replaced by their base layers."""
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base_layer)
    return model


def test_training_with_dropout_equals_peft():
    ours, theirs, inputs, forward = _twins("llama", lora_dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    our_out = forward(ours, inputs)
    torch.manual_seed(11)
    their_out = forward(theirs, inputs)
    _close(our_out, their_out)
    torch.manual_seed(12)
    other_mask = forward(ours, inputs)
    assert (other_mask - our_out).abs().max() > 1e-4  # dropout is active: another mask, another output


def test_adamw_steps_equal_peft_and_train_the_magnitude():
    ours, theirs, inputs, forward = _twins("llama")
    ours.eval(), theirs.eval()
    optimizers = [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
                  for model in (ours, theirs)]
    start = {name: module.lora_magnitude_vector.detach().clone() for name, module in lora_modules(ours)}
    for _ in range(3):
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            forward(model, inputs).square().mean().backward()
            optimizer.step()
    for name, module in lora_modules(ours):
        assert (module.lora_magnitude_vector - start[name]).abs().max() > 1e-3
        for mine, peft_param in zip((module.lora_A, module.lora_B, module.lora_magnitude_vector),
                                    _peft_tensors(theirs, name)):
            _close(mine, peft_param, tol=1e-4)  # three Adam steps amplify float32 rounding a little


@pytest.mark.parametrize("family", sorted(OPTIONS))
def test_peft_loads_our_dora_adapter(family, tmp_path):
    ours, _, inputs, forward = _twins(family)
    pristine = _bases(copy.deepcopy(ours))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    name = next(name for name, _ in lora_modules(ours))
    assert f"base_model.model.{name}.lora_magnitude_vector" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    _close(forward(loaded, inputs), forward(ours.eval(), inputs))


@pytest.mark.parametrize("family", sorted(OPTIONS))
def test_we_load_peft_dora_adapter(family, tmp_path):
    ours, theirs, inputs, forward = _twins(family)
    pristine = _bases(copy.deepcopy(ours))
    theirs.save_pretrained(tmp_path)
    loaded = load_adapter(pristine, tmp_path).eval()
    assert all(isinstance(module, DoRALinear) for _, module in lora_modules(loaded))
    _close(forward(loaded, inputs), forward(theirs.eval(), inputs))


@pytest.mark.parametrize("family", sorted(OPTIONS))
def test_merge_unmerge_and_export_fold_the_magnitude_in(family, tmp_path):
    ours, theirs, inputs, forward = _twins(family)
    ours.eval()
    expected = forward(ours, inputs)
    bases = {name: module.base_layer.weight.detach().clone() for name, module in lora_modules(ours)}
    merge_lora(ours)
    _close(forward(ours, inputs), expected)
    peft_merged = theirs.merge_and_unload()
    for name, module in lora_modules(ours):
        _close(module.base_layer.weight, peft_merged.get_submodule(name).weight)
    unmerge_lora(ours)
    for name, module in lora_modules(ours):
        _close(module.base_layer.weight, bases[name], tol=1e-6)
    _close(forward(ours, inputs), expected)
    export_merged(ours, tmp_path)
    plain = type(ours).from_pretrained(tmp_path).eval()
    _close(forward(plain, inputs), expected)
    _close(forward(merge_lora(copy.deepcopy(ours), unload=True), inputs), expected)


def test_load_into_a_merged_dora_model_replaces_its_merged_weights(tmp_path):
    source, _, inputs, forward = _twins("llama")
    save_adapter(source, tmp_path)
    target = inject_lora(_bases(copy.deepcopy(source)), LoRAConfig(use_dora=True, **OPTIONS["llama"])).eval()
    bases = {name: module.base_layer.weight.detach().clone() for name, module in lora_modules(target)}
    merge_lora(target)
    load_adapter(target, tmp_path)
    _close(forward(target, inputs), forward(source.eval(), inputs))
    unmerge_lora(target)
    for name, module in lora_modules(target):
        _close(module.base_layer.weight, bases[name], tol=1e-6)


def test_dora_and_plain_lora_files_do_not_mix(tmp_path):
    source, _, _, _ = _twins("llama")
    save_adapter(source, tmp_path)
    plain = inject_lora(_bases(copy.deepcopy(source)), LoRAConfig(**OPTIONS["llama"]))
    with pytest.raises(ValueError, match="holds DoRA adapters, the model's adapter .* is plain LoRA"):
        load_adapter(plain, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match="holds a DoRA lora_magnitude_vector.*HINT"):
        load_adapter(_bases(copy.deepcopy(source)), tmp_path)


def test_dora_refuses_attention_parts_and_lora_pro():
    from lit_lowrank.optim import LoRAPro

    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="DoRA is not implemented for '0.q_proj', a nn.MultiheadAttention part"):
        inject_lora(attention, LoRAConfig(r=2, target_modules=["0"], dora=True))
    ours, _, _, _ = _twins("llama")
    assert all(module.use_dora for _, module in lora_modules(ours))
    with pytest.raises(ValueError, match="DoRA"):
        LoRAPro(ours, lr=1e-3)


def test_lora_pre_does_not_take_dora_adapters():
    from lit_lowrank.optim import LoRAPreAdamW
    from lit_lowrank.optim.factory import check_optimizer_fits_model

    ours, _, _, _ = _twins("llama")
    with pytest.raises(ValueError, match="LoRAPreAdamW with LoRA adapters"):
        check_optimizer_fits_model(LoRAPreAdamW, ours)


def test_initial_magnitude_makes_a_fresh_dora_layer_a_no_op():
    layer = DoRALinear(nn.Linear(6, 5), r=2, alpha=4.0)
    layer.reset_lora_parameters("random")  # B != 0: the magnitude follows the new init, as in PEFT
    x = torch.randn(3, 6)
    weight = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    _close(layer.lora_magnitude_vector, weight.norm(dim=1))
    _close(layer(x), x @ weight.T + layer.base_layer.bias)
