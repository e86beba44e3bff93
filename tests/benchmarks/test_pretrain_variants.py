"""benchmarks/lora_pre_variants.py's research switches of LoRA-Pre Adam and pretrain_quality.py's research rows.

Each variant is checked on one small matrix against an independent float64 computation of the same formulas,
written out here from the module's docstring (explicit inverses instead of solves, no shared helper), for three
steps: a wrong sign, rate or bias correction shows within three steps. Plus the properties that anchor a variant to
something known: dense moments with the v_floor are Adam's step wherever the floor is inactive, the residual term is
zero at step 1, Adafactor's estimate is exact for a gradient whose square is rank 1.
"""

import itertools
import math

import pytest
import torch
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

B1, B2, EPS, DAMPING, LR, SCALE = 0.9, 0.999, 1e-8, 1e-6, 0.01, 0.25
P, Q, RANK, SEED = 7, 5, 2, 11


@pytest.fixture(scope="module")
def variants():
    return load_benchmark("lora_pre_variants")


@pytest.fixture(scope="module")
def quality():
    pytest.importorskip("transformers")
    return load_benchmark("pretrain_quality")


def gradients(steps: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(P, Q, generator=generator) for _ in range(steps)]


def run_variant(variants, variant, grads, weight=None):
    """The variant's optimizer on one P x Q matrix fed ``grads``; the weight after each step."""
    param = torch.nn.Parameter(torch.zeros(P, Q) if weight is None else weight.clone())
    optimizer = variants.LoRAPreVariant([{"params": [param], "lowrank": True}], lr=LR, rank=RANK, scale=SCALE,
                                        variant=variant, betas=(B1, B2), eps=EPS, damping=DAMPING, seed=SEED)
    weights = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        weights.append(param.detach().clone())
    return weights, optimizer.state[param]


def inverse_damped(gram: torch.Tensor) -> torch.Tensor:
    r = gram.shape[0]
    return torch.linalg.inv(gram + DAMPING * (torch.trace(gram) / r + 1e-60) * torch.eye(r, dtype=gram.dtype))


def reference(variant, grads):
    """Float64, from the formulas: the weight after each step. The initial right factors are drawn as the module
    documents (one generator seeded SEED: A at mrank x r, then V_A), in float32 and widened."""
    m_mode, v_mode, mrank = variant
    generator = torch.Generator().manual_seed(SEED)
    factored_m, m_rank = m_mode != "dense", min(RANK * mrank, P, Q)
    A = (torch.randn(m_rank, Q, generator=generator) * 0.02).double() if factored_m else None
    VA = (torch.randn(RANK, Q, generator=generator) * 0.02).double() if v_mode == "factored_abs" else None
    B, VB = torch.zeros(P, m_rank, dtype=torch.float64), torch.zeros(P, RANK, dtype=torch.float64)
    m, v = torch.zeros(P, Q, dtype=torch.float64), torch.zeros(P, Q, dtype=torch.float64)
    rows, cols = torch.zeros(P, dtype=torch.float64), torch.zeros(Q, dtype=torch.float64)
    W, weights = torch.zeros(P, Q, dtype=torch.float64), []
    g1, g2 = 1 - B1**0.5, 1 - B2**0.25
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        if factored_m:
            m_t = B1 * B @ A + (1 - B1) * g
            if m_mode == "factored_residual":
                projection = B @ inverse_damped(B.T @ B) @ B.T
                m_t = m_t + (B1 - B1**t) * (g - projection @ g)
            elif m_mode == "factored_residual_rows":
                projection = A.T @ inverse_damped(A @ A.T) @ A
                m_t = m_t + (B1 - B1**t) * (g - g @ projection)
        else:
            m = B1 * m + (1 - B1) * g
            m_t = m
        if v_mode == "factored_abs":
            D = 1.0 if t == 1 else math.sqrt(1 - B2 ** (t - 1)) / (1 - B2 ** ((t - 1) / 2))
            v_t = B2 * (D * VB @ VA) ** 2 + (1 - B2) * g**2
        elif v_mode == "dense_sq":
            v = B2 * v + (1 - B2) * g**2
            v_t = v
        else:
            rows = B2 * rows + (1 - B2) * (g**2).sum(1)
            cols = B2 * cols + (1 - B2) * (g**2).sum(0)
            v_t = rows[:, None] * cols[None, :] / rows.sum()
        m_hat = m_t / (1 - B1**t)
        v_hat = torch.maximum(v_t / (1 - B2**t), m_hat**2)
        W = W - LR * SCALE * m_hat / (v_hat.sqrt() + EPS)
        weights.append(W)
        if factored_m:
            B = (1 - g1) * B + g1 * g @ A.T @ inverse_damped(A @ A.T)
            A = (1 - g1) * A + g1 * inverse_damped(B.T @ B) @ B.T @ g
        if v_mode == "factored_abs":
            VB = (1 - g2) * VB + g2 * g.abs() @ VA.T @ inverse_damped(VA @ VA.T)
            VA = (1 - g2) * VA + g2 * inverse_damped(VB.T @ VB) @ VB.T @ g.abs()
    return weights


ALL = [(m, v, 1) for m, v in itertools.product(("factored", "dense", "factored_residual", "factored_residual_rows"),
                                                ("factored_abs", "dense_sq", "adafactor"))]
ALL += [("factored", "adafactor", 2), ("factored_residual", "dense_sq", 2), ("factored_residual_rows", "adafactor", 3)]


@pytest.mark.parametrize("variant", ALL, ids=lambda v: f"m={v[0]},v={v[1]},mrank={v[2]}")
def test_each_variant_matches_a_float64_computation_of_its_formulas(variants, variant):
    weights, _ = run_variant(variants, variants.Variant(*variant), gradients())
    expected = reference(variant, gradients())
    scale = LR * SCALE  # each step moves an entry by at most lr * scale (the v_floor)
    for step, (got, want) in enumerate(zip(weights, expected), start=1):
        assert torch.allclose(got.double(), want, rtol=0, atol=2e-5 * scale), f"step {step}"


def test_dense_moments_are_adam_where_the_floor_is_inactive(variants):
    """m=dense, v=dense_sq is Adam at lr * scale plus the v_floor; with gradients G, -G, G the floor never binds
    (|m_hat| < sqrt(v_hat) after step 1, equal at step 1), so the steps are torch.optim.Adam's."""
    G = gradients(1)[0]
    grads = [G, -G, G]
    weights, _ = run_variant(variants, variants.Variant("dense", "dense_sq"), grads)
    param = torch.nn.Parameter(torch.zeros(P, Q))
    adam = torch.optim.Adam([param], lr=LR * SCALE, betas=(B1, B2), eps=EPS)
    for grad, got in zip(grads, weights):
        param.grad = grad.clone()
        adam.step()
        assert torch.allclose(got, param.detach(), rtol=1e-6, atol=1e-9)


def test_other_tensors_get_plain_adam_at_lr(variants):
    """The embedding and norms (a lowrank=False group) step as torch.optim.Adam at the full lr, floor or not."""
    vector, matrix = torch.nn.Parameter(torch.zeros(Q)), torch.nn.Parameter(torch.zeros(3, Q))
    optimizer = variants.LoRAPreVariant([{"params": [vector, matrix]}], lr=LR, rank=RANK, scale=SCALE)
    twins = [torch.nn.Parameter(torch.zeros(Q)), torch.nn.Parameter(torch.zeros(3, Q))]
    adam = torch.optim.Adam(twins, lr=LR, betas=(B1, B2), eps=EPS)
    for grad in gradients():
        for param, twin, g in ((vector, twins[0], grad[0]), (matrix, twins[1], grad[:3])):
            param.grad, twin.grad = g.clone(), g.clone()
        optimizer.step()
        adam.step()
        assert torch.allclose(vector, twins[0], rtol=1e-6) and torch.allclose(matrix, twins[1], rtol=1e-6)


@pytest.mark.parametrize("residual", ["factored_residual", "factored_residual_rows"])
def test_residual_is_the_spec_at_step_1_and_not_after(variants, residual):
    """Its coefficient (1 - beta1^t) - (1 - beta1) is 0 at step 1 (m_t = g already has weight 1 there)."""
    spec, _ = run_variant(variants, variants.Variant("factored", "factored_abs"), gradients())
    changed, _ = run_variant(variants, variants.Variant(residual, "factored_abs"), gradients())
    assert torch.equal(spec[0], changed[0])
    assert not torch.allclose(spec[1], changed[1])


def test_adafactor_is_exact_for_a_rank_one_square(variants):
    """For g = a b^T every step, g^2 = (a^2)(b^2)^T: the row and column EMAs recover v exactly, so the step is
    dense_sq's; and the kept state is the two EMAs, p + q numbers."""
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(P, generator=generator), torch.randn(Q, generator=generator)
    grads = [c * torch.outer(a, b) for c in (1.0, -0.5, 2.0)]  # one a, b: the EMA of g^2 stays rank 1
    adafactor, state = run_variant(variants, variants.Variant("dense", "adafactor"), grads)
    dense, _ = run_variant(variants, variants.Variant("dense", "dense_sq"), grads)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-9) for x, y in zip(adafactor, dense))
    squares = sum(B2 ** (2 - i) * (1 - B2) * g**2 for i, g in enumerate(grads))
    assert torch.allclose(state["v_rows"], squares.sum(1)) and torch.allclose(state["v_cols"], squares.sum(0))


def test_state_holds_only_what_the_variant_uses(variants):
    _, state = run_variant(variants, variants.Variant("factored_residual", "adafactor", 2), gradients(1))
    assert {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)} == {
        "B": (P, 2 * RANK), "A": (2 * RANK, Q), "v_rows": (P,), "v_cols": (Q,)}
    _, state = run_variant(variants, variants.Variant("factored", "factored_abs", 9), gradients(1))
    assert state["A"].shape == (Q, Q)  # m's rank capped at min(p, q)


def test_protocol_state_of_the_candidate_is_under_045_adamw(quality, variants):
    """The issue's budget: the candidate (m at 2r with the residual step, Adafactor v) keeps <= 0.45 x AdamW's
    state on the protocol's model at r = 32 (the library default's ~0.42)."""
    model = quality.build_model(smoke=False, seed=0)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    method = "lora_pre_variant@m=factored_residual,v=adafactor,mrank=2"
    optimizer = quality.make_optimizer(method, model, 1e-3, rank=32, scale=0.25, galore_gap=200)
    optimizer.step()
    adamw = 2 * 4 * sum(p.numel() for p in model.parameters())
    assert 0.40 < quality.optimizer_state_bytes(optimizer) / adamw <= 0.45


# ---------------------------------------------------------------------------------------- method names
@pytest.mark.parametrize("given, canonical", [
    ("lora_pre_adam", "lora_pre_adam"),
    ("lora_pre_adam@r=64", "lora_pre_adam@r=64"),
    ("lora_pre_muon@r=112", "lora_pre_muon@r=112"),
    ("lora_pre_variant", "lora_pre_variant@m=factored,v=factored_abs"),
    ("lora_pre_variant@v=adafactor,mrank=2,m=factored_residual",
     "lora_pre_variant@m=factored_residual,v=adafactor,mrank=2"),
    ("lora_pre_variant@r=8,mrank=1,m=dense", "lora_pre_variant@m=dense,v=factored_abs,r=8"),
])
def test_method_names_are_canonical(quality, given, canonical):
    assert quality.parse_method(given).name == canonical
    assert quality.parse_method(canonical).name == canonical


@pytest.mark.parametrize("bad", ["adamw@r=4", "lora_pre_adam@r=0", "lora_pre_adam@rank=4", "lora_pre_adam@",
                                 "lora_pre_variant@m=sparse", "lora_pre_variant@m=dense,mrank=2",
                                 "lora_pre_variant@v=dense_sq,v=adafactor", "nonsense", "lora_pre_muon@r=x"])
def test_bad_method_names_are_refused(quality, bad):
    with pytest.raises(ValueError):
        quality.parse_method(bad)
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", bad])


def test_research_rows_grids_ranks_and_fixed_lrs(quality):
    args = quality.parse_args(["--methods", "lora_pre_adam@r=4", "lora_pre_muon@r=8", "lora_pre_muon@r=64",
                               "lora_pre_variant@m=dense,v=adafactor", "galore@r=8", "lora_pre_adam",
                               "--lr", "lora_pre_muon=1e-2", "lora_pre_muon@r=64=3e-2", "lora_pre_variant=3e-3"])
    assert args.grids == {"lora_pre_adam@r=4": quality.GRIDS["lora_pre_adam"], "lora_pre_muon@r=8": [1e-2],
                          "lora_pre_muon@r=64": [3e-2], "lora_pre_variant@m=dense,v=adafactor": [3e-3],
                          "galore@r=8": quality.GRIDS["galore"], "lora_pre_adam": quality.GRIDS["lora_pre_adam"]}
    assert quality.method_rank("lora_pre_muon@r=64", 32) == 64 and quality.method_rank("lora_pre_adam", 32) == 32
    assert quality.label("lora_pre_adam@r=4", 32) == "LoRA-Pre Adam r=4 (default)"
    assert quality.label("galore@r=8", 32) == "GaLore r=8"
    assert "m dense, v adafactor" in quality.label("lora_pre_variant@m=dense,v=adafactor", 32)
    # --lrs is the grid of the rest; a --lr that fixes nothing is a typo, refused
    assert quality.parse_args(["--methods", "adamw", "lora_pre_adam", "--lrs", "1e-3", "--lr",
                               "lora_pre_adam=3e-3"]).grids == {"adamw": [1e-3], "lora_pre_adam": [3e-3]}
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "lora_pre_adam", "--lr", "lora_pre_muon=1e-2"])
    assert "adamw_scaled" in quality.default_methods()


def test_a_variant_runs_through_the_benchmark_and_is_compared_with_the_references(quality, tmp_path):
    method = "lora_pre_variant@m=factored_residual,v=adafactor,mrank=2"
    summary = quality.main(["--smoke", "--out", str(tmp_path), "--methods", "adamw_scaled",
                            "lora_pre_variant@mrank=2,v=adafactor,m=factored_residual", "--lr",
                            "lora_pre_variant=3e-3"])
    assert [row["key"] for row in summary] == ["adamw_scaled", method]
    runs = tmp_path / "pretrain_quality_runs"
    saved = quality.sweep.read_json(runs / f"{method}_lr3e-3_seed1.json")
    assert saved["method"] == method and math.isfinite(saved["final_val_loss"]) and saved["state_bytes"] > 0
    row = summary[1]
    assert row["lr"] == 3e-3 and row["seeds"] == 2 and row["vs_adamw_scaled"] == pytest.approx(
        row["val_loss_mean"] - summary[0]["val_loss_mean"])
    assert row["vs_adamw_scaled_paired_mean"] == pytest.approx(row["vs_adamw_scaled"])
    assert "vs_adamw" not in row  # no AdamW runs in the folder
    table = (tmp_path / "pretrain_quality.md").read_text()
    assert "### Against the full-rank references" in table and "fair full-rank reference" in table
    # a report of the variant alone still finds adamw_scaled in the runs folder
    again = quality.main(["--smoke", "--report-only", "--out", str(tmp_path), "--methods", method])
    assert again[0]["vs_adamw_scaled"] == pytest.approx(row["vs_adamw_scaled"])
