"""lit_lowrank.memory: estimates equal the state real optimizers allocate in one step, and FSDP arithmetic by hand."""
import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_lowrank import LoRAConfig, inject_lora, memory
from lit_lowrank.cli import main as cli_main
from lit_lowrank.cli.memory_command import main as memory_main
from lit_lowrank.memory import METHODS, OptimizerState, estimate_memory
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro, lowrank_param_groups
from lit_lowrank.optim.state import StateBytes

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
# One block small enough to count by hand: head_dim 4, so k_proj / v_proj are 4 x 8.
HAND = dict(model_type="llama", hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=10, tie_word_embeddings=False)
RANK = 4
# State key -> OptimizerState field; GaLore's projected moments are told apart by their projector.
FIELD_OF = {"exp_avg": "moments", "exp_avg_sq": "moments", "B": "factors", "A": "factors", "V_B": "factors",
            "V_A": "factors", "weight_exp_avg": "weight_moments", "weight_exp_avg_sq": "weight_moments",
            "step": "counters", "skipped_steps": "counters"}


def real_optimizer(method, model):
    if method in ("lora", "lora_pro_efficient", "lora_pro_full"):
        inject_lora(model, LoRAConfig(r=RANK, alpha=2 * RANK, target_modules="all-linear"))
    if method in ("adamw", "lora"):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    if method.startswith("lora_pro"):
        return LoRAPro(model, mode=method.rsplit("_", 1)[1])
    if method.startswith("lora_pre"):
        return (LoRAPreAdamW if method == "lora_pre_adam" else LoRAPreMuon)(model, rank=RANK)
    galore_torch = pytest.importorskip("galore_torch")
    matrices, others = lowrank_param_groups(model, rank=RANK)
    return galore_torch.GaLoreAdamW([{"params": matrices["params"], "rank": RANK, "update_proj_gap": 200, "scale": 0.25,
                                      "proj_type": "std"}, {"params": others["params"]}], no_deprecation_warning=True)


def measured_state(optimizer) -> OptimizerState:
    found = dict.fromkeys(FIELD_OF.values(), 0) | {"projected": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "projector":
                found["projected"] += value.ortho_matrix.nbytes
            elif isinstance(value, torch.Tensor):
                found["projected" if "projector" in state and key != "step" else FIELD_OF[key]] += value.nbytes
    return OptimizerState(**found)


def one_real_step(method, dtype):
    """The TINY model (on CPU, with values) and ``method``'s optimizer after one training step."""
    torch.manual_seed(0)
    config = {key: value for key, value in TINY.items() if key != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**config)).to(memory.DTYPES[dtype])
    optimizer = real_optimizer(method, model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_estimate_equals_one_real_step(method, dtype):
    model, optimizer = one_real_step(method, dtype)
    estimate = estimate_memory(TINY, method, rank=RANK, dtype=dtype)
    assert estimate.optimizer_state == measured_state(optimizer)
    assert estimate.gradients == sum(p.grad.nbytes for p in model.parameters() if p.requires_grad)
    assert estimate.adapters == sum(p.nbytes for name, p in model.named_parameters() if ".lora_" in name)
    assert estimate.weights + estimate.adapters == sum(p.nbytes for p in model.parameters())
    assert estimate.total == estimate.weights + estimate.adapters + estimate.gradients + estimate.optimizer_state.total


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["lora_pro_efficient", "lora_pro_full", "lora_pre_adam", "lora_pre_muon"])
def test_estimate_equals_state_bytes_of_one_real_step(method, dtype):
    _, optimizer = one_real_step(method, dtype)
    exact, estimated = optimizer.state_bytes(), estimate_memory(TINY, method, rank=RANK, dtype=dtype).optimizer_state
    # dense: every state tensor but LoRA-Pre's factors (LoRAPro's m x n moments and 0-d counters included)
    assert (exact.total, exact.factors, exact.dense) == (
        estimated.total, estimated.factors, estimated.total - estimated.factors)


class FakeStateOptimizer(torch.optim.SGD):
    """One zero tensor of shape ``extra_dims + param.shape`` per parameter; ``state_bytes()`` says ``reported``."""

    def __init__(self, params, extra_dims, reported):
        super().__init__(params, lr=0.1)
        self.extra_dims, self.reported = extra_dims, reported

    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["sketch"] = torch.zeros(*self.extra_dims, *param.shape, device=param.device)

    def state_bytes(self):
        return StateBytes(total=self.reported, per_group=(self.reported,), factors=0, dense=self.reported)


def test_state_that_cannot_be_placed_or_disagrees_with_state_bytes_is_refused():
    def listed(extra_dims, reported):
        layer = torch.nn.Linear(4, 2, device="meta")  # 8 + 2 float32 entries: 40 bytes of state shaped like them
        optimizer = memory._meta_step(FakeStateOptimizer(layer.parameters(), extra_dims, reported))
        return memory._state_tensors(optimizer, sharded_full=True)

    assert [(t.kind, t.shape) for t in listed((), 40)] == [("moments", (2, 4)), ("moments", (2,))]
    with pytest.raises(RuntimeError, match=r"'sketch' of shape \(3, 2, 4\).*HINT"):
        listed((3,), 3 * 40)
    with pytest.raises(RuntimeError, match="reports 41 bytes, its state tensors hold 40.*HINT"):
        listed((), 41)


@pytest.mark.parametrize("method", ["adamw", "lora_pre_muon"])
def test_tied_embeddings_are_counted_once(method):
    tied = {**TINY, "tie_word_embeddings": True}
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in tied.items() if k != "model_type"}))
    optimizer = real_optimizer(method, model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    estimate = estimate_memory(tied, method, rank=RANK)
    assert estimate.optimizer_state == measured_state(optimizer)
    assert estimate.weights == sum(p.nbytes for p in model.parameters())


def test_fsdp_lora_pre_adam_by_hand():
    # Shards hold ceil(rows / 3) rows. Matrices (p x q, rank 2): left factors 2 x ceil(p/3) x 2, right 2 x 2 x q:
    # q 8x8: 2*(3*2 + 2*8) = 44, k/v 4x8: 2*(2*2 + 16) = 40 each, o 44, gate/up 12x8: 2*(4*2 + 16) = 48 each,
    # down 8x12: 2*(3*2 + 24) = 60 -> 324 floats. AdamW: embed / head 10x8 -> 2*4*8 = 64 each, 3 norms 2*3 -> 146.
    # Weights: 32 + 24 + 16 + 16 + 24 + 32 + 32 + 36 + 3*3 + 32 = 253 floats (the same for gradients).
    found = estimate_memory(HAND, "lora_pre_adam", rank=2, world_size=3, strategy="fsdp")
    assert found.optimizer_state == OptimizerState(moments=146 * 4, factors=324 * 4)
    assert (found.weights, found.gradients, found.adapters) == (253 * 4, 253 * 4, 0)
    # DDP replicates: world size changes nothing; the whole model is 664 parameters.
    ddp = estimate_memory(HAND, "lora_pre_adam", rank=2, world_size=3, strategy="ddp")
    assert ddp == dataclasses.replace(estimate_memory(HAND, "lora_pre_adam", rank=2), world_size=3)
    assert ddp.weights == 664 * 4 and ddp.optimizer_state.factors == 464 * 4


def test_fsdp_lora_pro_full_by_hand(monkeypatch):
    # m x n moments: 64 + 32 + 32 + 64 + 96 + 96 + 96 = 480 entries, twice, float32, whole on every rank; as row
    # shards 3*8 + 2*8 + 2*8 + 3*8 + 4*8 + 4*8 + 3*12 = 180. Counters: step + skipped_steps of the 7 lora_A's.
    # Adapters: A (2 x n) keeps 1 row: 6*8 + 12 = 60; B (m x 2) keeps ceil(m/3) rows: (3+2+2+3+4+4+3)*2 = 42.
    replicated = estimate_memory(HAND, "lora_pro_full", rank=2, world_size=3, strategy="fsdp",
                                 lora_pro_full_sharded=False)
    assert replicated.optimizer_state == OptimizerState(weight_moments=2 * 480 * 4, counters=7 * 8)
    assert (replicated.adapters, replicated.gradients, replicated.weights) == (102 * 4, 102 * 4, 253 * 4)
    sharded = estimate_memory(HAND, "lora_pro_full", rank=2, world_size=3, strategy="fsdp")  # LoRAPro's layout
    assert sharded.optimizer_state.weight_moments == 2 * 180 * 4
    monkeypatch.setattr(memory, "LORA_PRO_FULL_MOMENTS_SHARDED", False)  # the module-level switch does the same
    assert estimate_memory(HAND, "lora_pro_full", rank=2, world_size=3, strategy="fsdp") == replicated


def test_fsdp_galore_keeps_projected_state_whole():
    # k = 2: q/o 8x8: 2x8 projection + 2 moments 8x2 = 48; k/v 4x8: 4x2 + 2*(2x8) = 40; gate/up 12x8: 16 + 48 = 64;
    # down 8x12: 8x2 + 2*(2x12) = 64 -> 368, on every rank. AdamW part as for LoRA-Pre: 146 floats per rank.
    found = estimate_memory(HAND, "galore", rank=2, world_size=3, strategy="fsdp")
    assert found.optimizer_state == OptimizerState(moments=146 * 4, projected=368 * 4)


def test_known_configs_have_the_published_parameter_counts():
    assert estimate_memory("llama-2-7b", "adamw").weights == 4 * 6_738_415_616
    assert estimate_memory("meta-llama/Llama-3.1-8B", "adamw", dtype="bf16").weights == 2 * 8_030_261_248


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="sgd"), "unknown method"),
    (dict(method="adamw", strategy="zero3"), "unknown strategy"),
    (dict(method="adamw", world_size=0), "world_size"),
    (dict(method="adamw", dtype="float16"), "unsupported parameter dtype"),
    (dict(method="lora_pre_muon", rank=4), "rank 4 >= min"),
    (dict(method="adamw", config={"hidden_size": 8}), "without 'model_type'"),
    (dict(method="adamw", config="no-such-org/no-such-model"), "not in the local Hugging Face cache"),
])
def test_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        estimate_memory(**{"config": HAND, **kwargs})
    assert "HINT" in str(error.value)


def test_cli_table_matches_the_api(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HAND))
    assert memory_main(["--config", str(path), "--rank", "2", "--world-size", "1", "3", "--detail"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert set(METHODS) <= set(rows)
    cells = rows["lora_pro_full"].strip("| ").split(" | ")[1:]
    found = estimate_memory(HAND, "lora_pro_full", rank=2, world_size=3, strategy="fsdp")
    assert cells[5:7] == [f"{found.total / 2**30:.2f}", f"{found.optimizer_state.total / 2**30:.2f}"]


def test_lit_lowrank_memory_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--config", "llama-2-7b", "--methods", "adamw", "lora_pre_adam", "--world-size", "1", "8"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "| adamw | 100.41 | 50.21 | 12.55 | 6.28 |" in out and "| lora_pre_adam |" in out
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--config", "no-such-org/no-such-model"])
    assert done.value.code == 2 and "HINT" in capsys.readouterr().err
