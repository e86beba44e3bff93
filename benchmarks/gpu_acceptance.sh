#!/usr/bin/env bash
# GPU acceptance: what CPU-only CI cannot check, in one command, within 10 minutes on one H100/H200.
#
#   bash benchmarks/gpu_acceptance.sh [OUT]     # OUT: results folder, default gpu_results/<UTC date-time>
#
# Needs only a clone: when lit_lowrank or pytest cannot be imported it first runs `pip install -e ".[dev]"`
# (not counted in the 10 minutes; PYTHON=... picks the interpreter). Stages, each logged to OUT/<stage>.log and
# capped in time so that the whole run stays within BUDGET_S:
#   kernel_tests    tests/kernels natively (TRITON_INTERPRET=0: compiled, autotuned kernels on CUDA tensors),
#                   one pytest per file in parallel (compilation is per CPU core); the sm_90 compile tests skip
#   fit_bf16_mixed  configs/quickstart.yaml in LoRA-Pro full mode (kernel lora_pro_full), bf16-mixed, 30 steps
#   fit_bf16_true   the same in bf16-true
#   fsdp_smoke      configs/pretrain_lora_pre.yaml + configs/strategy/fsdp.yaml (FSDP2 on 1 GPU; LoRA-Pre's
#                   sharded kernel path, lora_pre_adam), bf16-mixed, 30 steps
#   launch_count    the CUDA kernels of one LoRAPreAdamW(use_triton=True).step() for models of L = 4 and L = 16
#                   same-shape matrices (torch.profiler): printed per step, failed if they grow with L (the step is
#                   batched: one launch per pass and batch) or the LoRA-Pre passes did not run as Triton kernels
#   kernels_gpu     benchmarks/kernels_gpu.py on one ragged Llama-1B shape (timings, errors against torch)
# The fits go through benchmarks/gpu_acceptance_fit.py: a fit fails if its kernel never launched, fell back to
# torch or failed its self-check. OUT/summary.md says PASS/FAIL per stage; the exit status is 1 if any failed.
# Without a GPU it says so and exits 0 before installing or writing anything. CI never runs it.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
OUT="${1:-$REPO/gpu_results/$(date -u +%Y%m%d-%H%M%S)}"
BUDGET_S=570  # all stages together; caps below add up to it

# --- a GPU? (torch's answer once installed, else the driver's; CUDA_VISIBLE_DEVICES="" hides them as for torch)
gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)"
if [ -z "$gpus" ]; then
    if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ]; then gpus=0; else gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"; fi
fi
if [ "${gpus:-0}" -eq 0 ]; then
    echo "gpu_acceptance: no GPU present (torch sees none, nor does nvidia-smi): nothing to accept on this machine;"
    echo "run it where a CUDA GPU is visible. Exiting 0 without installing or writing anything."
    exit 0
fi

mkdir -p "$OUT" || { echo "gpu_acceptance: cannot create $OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
if ! "$PY" -c 'import lit_lowrank, pytest' 2>/dev/null; then
    echo "installing: $PY -m pip install -e \"$REPO[dev]\" (log: $OUT/install.log)"
    "$PY" -m pip install -e "$REPO[dev]" >"$OUT/install.log" 2>&1 \
        || { echo "gpu_acceptance: the install failed, see $OUT/install.log" >&2; exit 1; }
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    "$PY" -c 'import sys, torch, triton, lit_lowrank; print("python", sys.version.split()[0], "| torch", torch.__version__,
"cuda", torch.version.cuda, "| triton", triton.__version__, "|", torch.cuda.get_device_name(), "|", lit_lowrank.__file__)'
} >"$OUT/environment.txt" 2>&1

start=$SECONDS
failed=0
echo "| stage | result | seconds | log |" >"$OUT/summary.rows"
echo "|---|---|---|---|" >>"$OUT/summary.rows"

# run_stage NAME CAP_S DIR COMMAND...: COMMAND in DIR, output to OUT/NAME.log, at most CAP_S (and the budget left).
run_stage() {
    local name="$1" cap="$2" dir="$3"
    shift 3
    local left=$((BUDGET_S - (SECONDS - start)))
    local limit=$((cap < left ? cap : left)) t0=$SECONDS result rc
    if [ "$limit" -lt 15 ]; then
        result="FAIL (not run: the ${BUDGET_S} s budget is spent)"
    else
        echo "[$(date -u +%H:%M:%S)] $name (at most ${limit} s) ..."
        mkdir -p "$dir"
        (cd "$dir" && timeout --kill-after=15 "$limit" "$@") >"$OUT/$name.log" 2>&1
        rc=$?
        case $rc in
            0) result=PASS ;;
            124 | 137) result="FAIL (timed out after ${limit} s)" ;;
            *) result="FAIL (exit status $rc)" ;;
        esac
    fi
    [ "$result" = PASS ] || failed=1
    echo "    $result"
    echo "| $name | $result | $((SECONDS - t0)) | $name.log |" >>"$OUT/summary.rows"
}

# The kernel test files in parallel, each natively; fails if any file fails (per-file logs in OUT/kernel_tests/).
kernel_tests() {
    local pids=() status=0 file
    mkdir -p "$OUT/kernel_tests"
    for file in "$REPO"/tests/kernels/test_*.py; do
        TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider "$file" -k "not hopper" \
            --junitxml "$OUT/kernel_tests/$(basename "$file" .py).xml" >"$OUT/kernel_tests/$(basename "$file" .py).log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    tail -n 3 "$OUT"/kernel_tests/*.log
    return $status
}
export -f kernel_tests
export OUT PY REPO

fit() {  # fit NAME CAP EXPECTED_KERNEL CONFIGS... [-- EXTRA ARGS]
    local name="$1" cap="$2" kernel="$3"
    shift 3
    run_stage "$name" "$cap" "$OUT/$name" env LIT_LOWRANK_KERNEL_CHECK=auto \
        "$PY" "$REPO/benchmarks/gpu_acceptance_fit.py" --expect "$kernel" -- fit "$@" \
        --trainer.accelerator gpu --trainer.devices 1 --trainer.max_steps 30 --trainer.limit_val_batches 4
}
QUICK=(--config "$REPO/configs/quickstart.yaml" --model.init_args.optimizer.init_args.mode full
       --trainer.limit_test_batches 4)

run_stage kernel_tests 160 "$REPO" bash -c kernel_tests
fit fit_bf16_mixed 90 lora_pro_full "${QUICK[@]}" --config "$REPO/configs/precision/bf16-mixed.yaml"
fit fit_bf16_true 60 lora_pro_full "${QUICK[@]}" --config "$REPO/configs/precision/bf16-true.yaml"
fit fsdp_smoke 90 lora_pre_adam --config "$REPO/configs/pretrain_lora_pre.yaml" \
    --config "$REPO/configs/strategy/fsdp.yaml" --config "$REPO/configs/precision/bf16-mixed.yaml" \
    --trainer.strategy.init_args.data_parallel_size 1 --trainer.val_check_interval 15
run_stage launch_count 40 "$REPO" "$PY" benchmarks/gpu_acceptance_fit.py --launch-counts 4 16
grep -E "^(launches per step|FAILED)" "$OUT/launch_count.log" 2>/dev/null | sed 's/^/    /'
run_stage kernels_gpu 130 "$REPO" "$PY" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu" \
    --shapes 2048x5461 --ranks 16 128 --repeats 20 --warmup 3

{
    echo "# GPU acceptance: $([ $failed -eq 0 ] && echo PASSED || echo FAILED)"
    echo
    sed 's/^/    /' "$OUT/environment.txt"
    echo
    cat "$OUT/summary.rows"
    echo
    echo "Total: $((SECONDS - start)) s of a ${BUDGET_S} s budget. Command: bash benchmarks/gpu_acceptance.sh $OUT"
} >"$OUT/summary.md"
rm -f "$OUT/summary.rows"
cat "$OUT/summary.md"
exit $failed
