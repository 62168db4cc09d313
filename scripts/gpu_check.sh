#!/usr/bin/env bash
# The first look at a CUDA machine, in one script (175 s on one H200 before the compiled sweep was
# added, 2026-12-04: results/gpu-check-h200; the compiled sweep's time is not measured yet):
#   1. the environment (nvidia-smi, torch/triton/CUDA, dsbench's probe with calibrated peaks);
#   2. dsbench installed into a venv that sees the machine's own torch (nothing is downloaded
#      when torch, triton, pandas, pyarrow, matplotlib, typer, rich and pytest are already there);
#   3. the `gpu`-marked tests and the kernel tests (FP8 GEMM/quant and MLA decode against their
#      references) on the GPU;
#   4. a short `medium-gpu` sweep (bf16 train, prefill, decode of the medium model) and its report,
#      then `compiled-gpu` (eager vs torch.compile vs CUDA graphs) and its report;
#   5. (run right after the tests) every op family's implementations side by side: the FP8 GEMM,
#      MLA-decode and attention benchmarks (CUDA events per call, L2 flushed before each:
#      dsbench.measure.time_calls);
#   6. one profiled GPU cell (time per part, roofline, memory, a Perfetto trace);
#   7. with 2+ GPUs, the expert-parallel preset ep-gpu (NCCL), where this checkout has it.
# Everything lands under $OUT (default ./gpu-check): summary.md (each step's status, time and
# the benchmarks' tables), environment.json, and gpu_check.tar.gz with every log, results
# folder, report and trace. A step that fails is recorded and the next one runs; the exit code
# is the number of failed steps (0: all passed). Each step has its own time limit, cut to what
# is left of the whole run's budget (GPU_CHECK_BUDGET_S, default 480 s), so that the summary and
# the archive are always written before a caller's own time limit kills the script; a step with
# under 20 s left is recorded as skipped. GPU_CHECK_STEPS=name,name runs only those steps (and the
# environment, install and probe steps), to rerun what failed. The archive leaves out profiler traces when it would
# pass 15 MiB (the device tool brings back files of up to 16 MiB).
#
#   OUT=/tmp/gpu-check scripts/gpu_check.sh            # PYTHON=... to pick the interpreter
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
KNOWN="$(grep -oE '^ *step [a-z0-9_]+' "$SELF" | awk '{print $2}' | paste -sd, -)"
steps="${GPU_CHECK_STEPS:-}"
for name in ${steps//,/ }; do
    if [[ ",$KNOWN," != *",$name,"* ]]; then
        echo "GPU_CHECK_STEPS: '$name' is not a step; allowed: $KNOWN" >&2
        exit 2
    fi
done
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.md"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
ALWAYS="nvidia_smi,versions,install,probe"  # run whatever GPU_CHECK_STEPS selects
failed=0
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(date -u +%T)] $*" >&2; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/logs/NAME.log, add a summary row.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0 left=$((BUDGET_S - SECONDS - 15))
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$ALWAYS,$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        echo "| $name | skipped: not in GPU_CHECK_STEPS | 0 | |" >> "$SUMMARY"
        return 0
    fi
    if [ "$left" -lt 20 ]; then
        echo "| $name | skipped: the run's ${BUDGET_S} s budget is spent | 0 | |" >> "$SUMMARY"
        say "$name: skipped (budget spent)"
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    say "$name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - start)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timed out after ${limit} s"; elif [ "$rc" -ne 0 ]; then status="failed (rc $rc)"; fi
    [ "$status" = ok ] || failed=$((failed + 1))
    local last
    last="$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-200 | tr '|' '/')"
    echo "| $name | $status | $took | ${last} |" >> "$SUMMARY"
    say "$name: $status in ${took} s"
}

finish() {
    {
        echo
        for table in fp8_gemm_bench mla_decode_bench attention_bench attention_bwd_bench; do
            if [ -s "$WORK/logs/$table.log" ]; then
                echo "## $table"
                echo
                grep -E '^(command:|timing:|device:|not run:|failed:|\|)' "$WORK/logs/$table.log"
                echo
            fi
        done
        if [ -s "$WORK/logs/gpu_tests.log" ]; then
            echo "## gpu tests"
            echo
            tail -n 5 "$WORK/logs/gpu_tests.log" | sed 's/^/    /'
        fi
    } >> "$SUMMARY"
    tar -C "$WORK" --exclude=./venv --exclude="*/weights" -czf "$OUT/gpu_check.tar.gz" . 2>/dev/null || say "could not write the archive"
    if [ "$(stat -c %s "$OUT/gpu_check.tar.gz" 2>/dev/null || echo 0)" -gt $((15 * 1024 * 1024)) ]; then
        say "archive over 15 MiB: written again without profiler traces"
        tar -C "$WORK" --exclude=./venv --exclude="*/weights" --exclude="trace.json.gz" -czf "$OUT/gpu_check.tar.gz" . 2>/dev/null || say "could not write the archive"
    fi
    say "done: $failed step(s) failed; $SUMMARY, $OUT/gpu_check.tar.gz"
}
trap finish EXIT

mkdir -p "$WORK/logs" "$WORK/results"
{
    echo "# dsbench GPU check"
    echo
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'), $(date -u +%FT%TZ)"
    echo
    echo "| step | status | seconds | last line of its log |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

if ! command -v nvidia-smi > /dev/null 2>&1 || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "| cuda | no CUDA device visible to $PY (nvidia-smi or torch.cuda.is_available() missing) | 0 | |" >> "$SUMMARY"
    say "no CUDA device: nothing to check"
    failed=1
    exit 1
fi
N_GPUS="$(nvidia-smi -L | grep -c '^GPU')"

# --- 1. environment
step nvidia_smi 30 nvidia-smi -q
step versions 60 "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"

# --- 2. install: a venv over the machine's own packages; only dsbench itself goes in.
install_dsbench() {
    "$PY" -m venv "$WORK/venv" || return 1
    # $PY may itself be a venv (the H200 image's is), whose packages --system-site-packages would
    # not show: a .pth file puts $PY's own site-packages on the new venv's path instead.
    "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent-site.pth" || return 1
    # shellcheck disable=SC1091
    . "$WORK/venv/bin/activate"
    pip install --quiet --no-deps --no-build-isolation -e . 2>&1 || pip install --quiet -e ".[test]" || return 1
    python -c "import torch, typer, pytest, dsbench, dsbench.variants, dsbench.kernels; print('dsbench', dsbench.__version__, 'from', dsbench.__file__, 'torch', torch.__version__)"
}
# `timeout` runs programs, not shell functions: the function goes to a child bash.
export WORK PY
step install 240 bash -c "$(declare -f install_dsbench); install_dsbench"
# shellcheck disable=SC1091
[ -f "$WORK/venv/bin/activate" ] && . "$WORK/venv/bin/activate"
if ! python -c "import torch, dsbench" 2>/dev/null; then
    say "dsbench could not be installed; see the install log"
    exit 1
fi
step probe 120 bash -c "python -m dsbench.probe cuda bf16,fp8 1 > '$OUT/environment.json'"

# --- 3. tests on the GPU
# TRITON_INTERPRET=0: the compiled kernels. (Under the interpreter, Triton 3.6 with numpy 2.5 fails
# on a loop bound computed from program_id, "only 0-dimensional arrays can be converted to Python
# scalars", seen on the H200 image 2026-12-04; the CPU suite runs Triton 3.9's interpreter.)
step gpu_tests 150 env TRITON_INTERPRET=0 python -m pytest -q -m gpu -p no:cacheprovider
step kernel_tests 150 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_mla_kernel.py tests/test_fp8.py tests/test_fp8_gemm_family.py

# --- 3b. every op family's implementations side by side at V3's shapes (issue 27), before the sweeps:
# they say which implementation each sweep cell's `auto` should find fastest
step fp8_gemm_bench 240 python scripts/fp8_gemm_bench.py --device cuda --reps 20 --json "$WORK/results/fp8_gemm_bench.json"
# reference, sdpa and triton at B 1/32/64/128 × 1K/4K/16K; the first triton call autotunes (5 configs).
step mla_decode_bench 150 python scripts/mla_decode_bench.py --device cuda --reps 20 --json "$WORK/results/mla_decode_bench.json"

step attention_bench 90 python scripts/attention_bench.py --device cuda --reps 10 --json "$WORK/results/attention_bench.json"
step attention_bwd_bench 90 python scripts/attention_bench.py --device cuda --reps 10 --backward --json "$WORK/results/attention_bwd_bench.json"

# --- 4. a short sweep and its report
step medium_gpu_sweep 200 dsbench run sweep --preset medium-gpu --out "$WORK/results/medium-gpu"
step medium_gpu_report 60 dsbench report "$WORK/results/medium-gpu" --out "$WORK/results/medium-gpu-report"

# --- 4b. eager vs torch.compile vs CUDA graphs (decode is launch-bound in eager on a GPU)
step compiled_gpu_sweep 420 dsbench run sweep --preset compiled-gpu --out "$WORK/results/compiled-gpu"
step compiled_gpu_report 60 dsbench report "$WORK/results/compiled-gpu" --out "$WORK/results/compiled-gpu-report"

# --- 6. one profiled GPU cell: DeepSeekMoE + MLA in bf16, training
step profile_cell 120 dsbench profile --workload train --ffn deepseekmoe --attention mla --precision bf16 --size medium \
    --batch-size 8 --seq-len 1024 --steps 8 --warmup 3 --device cuda --out "$WORK/results/profile"

# --- 7. expert parallelism across GPUs
if [ "$N_GPUS" -ge 2 ] && [ -f dsbench/presets/ep-gpu.toml ]; then
    step ep_sweep 180 dsbench run sweep --preset ep-gpu --out "$WORK/results/ep-gpu"
else
    echo "| ep_sweep | skipped: $N_GPUS GPU(s)$([ -f dsbench/presets/ep-gpu.toml ] || echo ', no ep-gpu preset in this checkout') | 0 | |" >> "$SUMMARY"
fi
exit "$failed"
