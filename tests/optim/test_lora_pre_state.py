"""Invariant 7 for both LoRA-Pre optimizers: the reported state bytes equal the spec's formulas exactly, and the
state_dict round-trips through a fresh process with a bitwise identical next step."""

import runpy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

RANK = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def model_and_groups(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.LayerNorm(20), nn.Linear(20, 6), nn.Linear(6, 9))
    model.to(dtype)
    matrices = [model[0].weight, model[3].weight]  # 20 x 12 and 6 x 20
    others = [model[0].bias, model[2].weight, model[2].bias, model[3].bias, model[4].weight, model[4].bias]
    groups = [{"params": matrices, "lowrank": True}, {"params": others, "lowrank": False}]
    return model, groups


def one_step(model, optimizer):
    x = torch.randn(5, 12).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optimizer_class, factor_elements", [(LoRAPreAdamW, 2), (LoRAPreMuon, 1)])
def test_state_bytes_equal_the_formulas(optimizer_class, factor_elements, dtype):
    model, groups = model_and_groups(dtype)
    optimizer = optimizer_class(groups, rank=RANK)
    one_step(model, optimizer)
    fp32 = dense_size = 4  # factors and AdamW moments are float32, also for bf16 parameters
    lowrank = sum(factor_elements * (p + q) * RANK * fp32 for p, q in ((20, 12), (6, 20)))  # 2(p+q)r or (p+q)r
    adamw = sum(2 * param.numel() * dense_size for param in groups[1]["params"])  # 2 p q for the 6 x 9 matrix
    reported = optimizer.state_bytes()
    assert reported.per_group == (lowrank, adamw)
    assert (reported.factors, reported.dense, reported.total) == (lowrank, adamw, lowrank + adamw)
    for param in groups[0]["params"]:  # the state tensors are exactly the factors
        tensors = {k for k, v in optimizer.state[param].items() if isinstance(v, torch.Tensor)}
        assert tensors == ({"B", "A", "V_B", "V_A"} if factor_elements == 2 else {"B", "A"})


@pytest.mark.parametrize("optimizer_class, dense_elements", [(LoRAPreAdamW, 2), (LoRAPreMuon, 1)])
def test_dense_fallback_state_bytes(optimizer_class, dense_elements):
    model, groups = model_and_groups(torch.float32)
    optimizer = optimizer_class(groups[:1], rank=6, full_rank="dense")  # 6 x 20 falls back, 20 x 12 is factored
    one_step(model, optimizer)
    factor_elements = 2 if optimizer_class is LoRAPreAdamW else 1
    assert optimizer.state_bytes().factors == factor_elements * (20 + 12) * 6 * 4
    assert optimizer.state_bytes().dense == dense_elements * 6 * 20 * 4  # AdamW: 2 p q; Muon buffer: p q


def test_load_state_dict_keeps_float32_factors_of_a_bf16_model():
    model, groups = model_and_groups(torch.bfloat16)
    optimizer = LoRAPreAdamW(groups, rank=RANK)
    one_step(model, optimizer)
    restored = LoRAPreAdamW(model_and_groups(torch.bfloat16)[1], rank=RANK)
    restored.load_state_dict(optimizer.state_dict())
    for saved, loaded in zip(optimizer.state.values(), restored.state.values()):
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
                assert loaded[key].data_ptr() != value.data_ptr()
            else:
                assert type(loaded[key]) is int and loaded[key] == value
    assert restored.state_bytes() == optimizer.state_bytes()


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

    torch.set_num_threads(1)
    mode, workdir, steps = sys.argv[1], sys.argv[2], 3
    SHAPES = {"w1": ((20, 12), torch.float32), "w2": ((6, 20), torch.bfloat16), "b": ((20,), torch.float32)}

    def build(optimizer_seed):
        torch.manual_seed(0)
        params = {name: torch.nn.Parameter(torch.randn(shape).to(dtype)) for name, (shape, dtype) in SHAPES.items()}
        # A different default seed in each process: the factors' seeds must come from the saved state.
        torch.manual_seed(optimizer_seed)
        optimizers = [
            LoRAPreAdamW(list(params.items()), lr=0.01, weight_decay=0.1, rank=3),
            LoRAPreMuon(list(params.items()), lr=0.02, rank=3, weight_decay=0.1, adamw_lr=0.01),
        ]
        return params, optimizers

    def step(params, optimizer, t):
        for i, (name, param) in enumerate(params.items()):
            gen = torch.Generator().manual_seed(1000 * t + i)
            param.grad = torch.randn(param.shape, generator=gen).to(param.dtype)
        optimizer.step()

    runs = [build(optimizer_seed=1)[0], build(optimizer_seed=1)[0]]
    for index, optimizer_class in enumerate(("adam", "muon")):
        if mode == "save":
            params, optimizers = build(optimizer_seed=1)
            for t in range(steps):
                step(params, optimizers[index], t)
            torch.save({"params": {k: v.detach() for k, v in params.items()},
                        "optimizer": optimizers[index].state_dict()}, f"{workdir}/{optimizer_class}_checkpoint.pt")
        else:
            params, optimizers = build(optimizer_seed=2)
            checkpoint = torch.load(f"{workdir}/{optimizer_class}_checkpoint.pt")
            with torch.no_grad():
                for name, value in checkpoint["params"].items():
                    params[name].copy_(value)
            optimizers[index].load_state_dict(checkpoint["optimizer"])
        step(params, optimizers[index], steps)
        torch.save({"params": {k: v.detach() for k, v in params.items()},
                    "state": optimizers[index].state_dict()["state"]}, f"{workdir}/{optimizer_class}_{mode}.pt")
    """
)


def test_state_dict_round_trip_in_a_fresh_process_gives_a_bitwise_identical_next_step(tmp_path, monkeypatch):
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP_SCRIPT)
    # "save" (here): steps 1-3, checkpoint, step 4. "resume" (a fresh process): load the checkpoint, step 4.
    monkeypatch.setattr(sys, "argv", [str(script), "save", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    done = subprocess.run(
        [sys.executable, str(script), "resume", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    for name in ("adam", "muon"):
        checkpoint = torch.load(tmp_path / f"{name}_checkpoint.pt")
        for param_state in checkpoint["optimizer"]["state"].values():
            assert all(type(param_state[key]) is int for key in ("step", "seed") if key in param_state)
            assert all(param_state[key].dtype == torch.float32 for key in ("B", "A") if key in param_state)
        uninterrupted, resumed = torch.load(tmp_path / f"{name}_save.pt"), torch.load(tmp_path / f"{name}_resume.pt")
        for key, value in uninterrupted["params"].items():
            assert torch.equal(resumed["params"][key], value), (name, key)
            assert not torch.equal(value, checkpoint["params"][key]), (name, key)  # the step did move it
        for param_id, state in uninterrupted["state"].items():
            for key, value in state.items():
                same = torch.equal(value, resumed["state"][param_id][key]) if isinstance(value, torch.Tensor) else None
                assert same is not False and (same or value == resumed["state"][param_id][key]), (name, key)


@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_a_state_dict_from_before_residual_step_resumes_without_it(optimizer_class):
    """Checkpoints written before ``residual_step`` existed were trained with the paper's first moment: they load
    with ``residual_step=False`` and step exactly like an optimizer built with it, while a current state dict
    keeps its own value (the option is saved in every param group)."""
    def trained(**options):
        model, groups = model_and_groups(torch.float32)
        optimizer = optimizer_class(groups, lr=1e-2, rank=RANK, seed=0, **options)
        torch.manual_seed(1)
        one_step(model, optimizer)
        return model, optimizer

    model, optimizer = trained(residual_step=False)
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        del group["residual_step"]
    resumed_model, resumed = trained()  # built with the new default, True
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(old)
    assert [group["residual_step"] for group in resumed.param_groups] == [False, False]
    torch.manual_seed(2)
    one_step(model, optimizer)
    torch.manual_seed(2)
    one_step(resumed_model, resumed)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    current = trained()[1]
    current.load_state_dict(trained()[1].state_dict())
    assert [group["residual_step"] for group in current.param_groups] == [True, True]
