"""inject_lora on every supported model family: what is adapted, what trains, what the output does."""
import pytest
import torch
from tiny_models import DEFAULT_TARGETS, FAMILIES
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora, merge_lora, unmerge_lora
from lit_lowrank.adapters import LoRAAdapter, LoRALinear, LoRAMultiheadAttention, lora_modules

# Adapter pairs each family gets with its default targets (2 blocks each).
# gpt2: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; bert: query, key, value and three "dense" per block + the pooler
EXPECTED_PAIRS = {"llama": 14, "bert": 2 * 6 + 1, "gpt2": 2 * 4, "vit": 2 * 4, "clip": 2 * 2 * 4}
# Heads a task adds (fresh init), trained fully by default as PEFT's SEQ_CLS does.
TASK_HEADS = {"bert": "classifier", "vit": "head"}


def _randomize_b(model):
    with torch.no_grad():
        for _, adapter in lora_modules(model):
            adapter.lora_B.normal_(std=0.5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_adapters_and_task_heads_train_and_output_is_unchanged_at_init(family):
    model, inputs, forward = FAMILIES[family]()
    model.eval()
    before = forward(model, inputs).detach()
    inject_lora(model, LoRAConfig(r=4, target_modules=DEFAULT_TARGETS[family]))
    pairs = dict(lora_modules(model))
    assert len(pairs) == EXPECTED_PAIRS[family]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.lora_{side}" for name in pairs for side in "AB"}
    if family in TASK_HEADS:
        expected |= {f"{TASK_HEADS[family]}.{p}" for p in ("weight", "bias")}
    assert trainable == expected
    torch.testing.assert_close(forward(model, inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_reach_only_adapters(family):
    model, inputs, forward = FAMILIES[family]()
    inject_lora(model, LoRAConfig(r=4, target_modules=DEFAULT_TARGETS[family]))
    _randomize_b(model)  # with B = 0 the gradient of A is exactly zero
    forward(model, inputs).pow(2).mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_matches_unmerged_and_unmerge_restores(family):
    model, inputs, forward = FAMILIES[family]()
    model.eval()
    inject_lora(model, LoRAConfig(r=4, target_modules=DEFAULT_TARGETS[family]))
    _randomize_b(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    unmerged = forward(model, inputs).detach()
    merge_lora(model)
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed, "merging must change the base weights"
    torch.testing.assert_close(forward(model, inputs), unmerged, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(forward(model, inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_bf16_base_uses_fp32_delta():
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    model = inject_lora(nn.Sequential(base), LoRAConfig(r=8, target_modules=["0"]))
    _randomize_b(model)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    unmerged = model(x).float()
    # independent reference: the merged weight in float64, rounded to bf16 once
    layer = model[0]
    exact = layer.base_layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    merge_lora(model)
    # within one bf16 rounding of the exact sum (a bf16 delta would add its own rounding on top)
    torch.testing.assert_close(layer.base_layer.weight.double(), exact, rtol=2**-8, atol=1e-30)
    torch.testing.assert_close(model(x).float(), unmerged, rtol=3e-2, atol=3e-2)


def test_merge_unload_gives_plain_model():
    model, inputs, forward = FAMILIES["llama"]()
    model.eval()
    inject_lora(model, LoRAConfig(r=4))
    _randomize_b(model)
    adapted = forward(model, inputs).detach()
    merge_lora(model, unload=True)
    assert not list(lora_modules(model))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(forward(model, inputs), adapted, rtol=1e-4, atol=1e-4)


def test_all_linear_skips_heads():
    names = {}
    for family in ("llama", "bert", "gpt2", "vit"):
        model, _, _ = FAMILIES[family]()
        inject_lora(model, LoRAConfig(r=2))
        names[family] = [name for name, _ in lora_modules(model)]
    assert not any("lm_head" in n for n in names["llama"]) and len(names["llama"]) == 14
    assert not any(n.startswith("classifier") for n in names["bert"])
    assert "bert.pooler.dense" in names["bert"]
    assert not any("lm_head" in n for n in names["gpt2"]) and len(names["gpt2"]) == 2 * 4  # c_attn, c_proj x2, c_fc
    assert "head" not in names["vit"] and len(names["vit"]) == 8


def test_regex_suffix_and_exclude_targets():
    model, _, _ = FAMILIES["llama"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert [n for n, _ in lora_modules(model)] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model, _, _ = FAMILIES["llama"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "mlp.up_proj"],
                                  exclude_modules=["layers.0.self_attn.q_proj"]))
    assert [n for n, _ in lora_modules(model)] == [
        "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]


def test_clip_attention_parts_can_be_chosen_separately():
    model, inputs, forward = FAMILIES["clip"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=["visual.transformer.resblocks.0.attn.q_proj", "v_proj"]))
    names = [n for n, _ in lora_modules(model)]
    assert names[0] == "visual.transformer.resblocks.0.attn.q_proj"
    assert len(names) == 1 + 4  # one q in the vision tower, v in all four blocks
    attention = model.visual.transformer.resblocks[0].attn
    assert isinstance(attention, LoRAMultiheadAttention) and sorted(attention.adapters()) == ["q_proj", "v_proj"]
    # naming the attention module adapts all four projections (a regex: the suffix would match both towers)
    model, _, _ = FAMILIES["clip"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=r"transformer\.resblocks\.1\.attn"))
    assert [n for n, _ in lora_modules(model)] == [f"transformer.resblocks.1.attn.{p}"
                                                   for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def test_attention_adapter_equals_hand_built_projection():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    reference.load_state_dict(mha.state_dict())
    wrapped = LoRAMultiheadAttention(mha, parts=("q_proj", "v_proj", "out_proj"), r=3, alpha=6.0)
    _randomize_b(wrapped)
    with torch.no_grad():  # the reference adds scaling * B A to each slice by hand
        q, v, out = wrapped.q_proj, wrapped.v_proj, wrapped.out_proj
        reference.in_proj_weight[:16] += 2.0 * q.lora_B @ q.lora_A
        reference.in_proj_weight[32:] += 2.0 * v.lora_B @ v.lora_A
        reference.out_proj.weight += 2.0 * out.lora_B @ out.lora_A
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, -2:] = True
    got, got_weights = wrapped(x, kv, kv, key_padding_mask=mask)
    want, want_weights = reference(x, kv, kv, key_padding_mask=mask)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_weights, want_weights)


def test_transformer_encoder_layer_eval_does_not_bypass_adapters():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = inject_lora(nn.Sequential(layer), LoRAConfig(r=2, target_modules=["self_attn"]))
    _randomize_b(model)
    model.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_modules_to_save_stay_trainable():
    model, _, _ = FAMILIES["bert"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("bert.embeddings") for n in trainable)


def test_scaling_rslora_and_gaussian_init():
    model = inject_lora(nn.Sequential(nn.Linear(256, 256)), LoRAConfig(r=16, alpha=8, rslora=True, init="gaussian"))
    layer = model[0]
    assert isinstance(layer, LoRALinear) and layer.scaling == pytest.approx(8 / 4)
    assert layer.lora_A.detach().std().item() == pytest.approx(1 / 16, rel=0.1)
    assert torch.count_nonzero(layer.lora_B) == 0
    default = inject_lora(nn.Sequential(nn.Linear(256, 256)), LoRAConfig(r=16, alpha=8))[0]
    assert default.scaling == 0.5
    bound = (1 / 256) ** 0.5  # Kaiming-uniform with a = sqrt(5), as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert default.lora_A.abs().max() <= bound and default.lora_A.abs().max() > 0.9 * bound


def test_gpt2_conv1d_adapter_matches_transposed_weight():
    model, inputs, forward = FAMILIES["gpt2"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (96, 2)
    _randomize_b(model)
    x = torch.randn(3, 32)
    want = x @ layer.base_layer.weight + layer.base_layer.bias + layer.scaling * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), want)


def test_lora_modules_order_is_stable_and_pairs_are_adapters():
    model, _, _ = FAMILIES["llama"]()
    inject_lora(model, LoRAConfig(r=2))
    first = [n for n, _ in lora_modules(model)]
    assert first == [n for n, m in model.named_modules() if isinstance(m, LoRAAdapter)]
    assert first[:3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
