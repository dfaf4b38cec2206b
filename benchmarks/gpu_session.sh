#!/usr/bin/env bash
# One lent-GPU call, planned for a short lease: the GPU test tier, then the benchmarks that decide
# the issues' targets, most important first, each step under its own time limit and all of them
# under BUDGET_S seconds. Results (CSV + markdown with GPU, torch/triton, git sha, date) and one log
# per step land under $OUT/docs/benchmarks and $OUT/logs; copy the CSV/md into docs/benchmarks/.
#
# Here (registry access), once:   make wheels          # diffusers wheel into .whl/ (git-ignored)
# Device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# The device image has torch, triton, tabulate, networkx, onnx, pytest, transformers; no diffusers.
set -u
OUT=${OUT:-out/gpu}
BUDGET_S=${BUDGET_S:-560}
RES="$OUT/docs/benchmarks"
LOGS="$OUT/logs"
mkdir -p "$RES" "$LOGS"
PY=${PY:-python3}
SITE=/tmp/fusediff-site
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$LOGS/wheels.log" 2>&1 \
    || echo "wheel install failed (see logs/wheels.log)"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
git rev-parse --short HEAD >"$LOGS/git_sha.txt" 2>/dev/null || true
$PY - <<'EOF' | tee "$LOGS/env.txt"
import datetime, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import diffusers
    print("diffusers", diffusers.__version__)
except Exception as e:  # noqa: BLE001
    print("diffusers missing:", e)
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$LOGS/nvidia-smi.txt" 2>&1

SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
# step NAME LIMIT_S CMD...: run when the budget still holds LIMIT_S, log, record rc and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  # cut short by the limit, a benchmark still writes the rows it measured (<name>_partial.csv/md)
  FUSEDIFF_BENCH_PARTIAL="$RES/$name" timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$SUMMARY"
  tail -n 4 "$LOGS/$name.log"
}

B=benchmarks
# 1. correctness on the real compiled kernels (sm_90, the device's triton)
step test_gpu 150 $PY -m pytest -q -m gpu -p no:cacheprovider -x --timeout 140
# 2. the end-to-end targets: fusediff bf16 vs inductor, MoDiff W8A8 step vs inductor bf16
step unet_sd15 170 $PY $B/bench_unet.py --out "$RES" --models sd15 --dtypes bfloat16 \
  --providers eager inductor fusediff fusediff-modiff-w8a8 fusediff-baseline-w8a8
# 3. the kernels against eager (inductor max-autotune compiles per shape: a later, longer call)
step conv_int8 60 $PY $B/bench_conv_int8.py --out "$RES" --dtype bfloat16 --batches 32 \
  --providers eager fusediff_w8 fusediff_w4 modiff_w8 modiff_w8_e2e
step groupnorm 40 $PY $B/bench_groupnorm.py --out "$RES" --batches 2 32 --providers eager fusediff
step attention 50 $PY $B/bench_attention.py --out "$RES" --batches 2 32 --providers eager sdpa fusediff
step geglu 30 $PY $B/bench_geglu.py --out "$RES" --batches 2
step quantize 30 $PY $B/bench_quantize.py --out "$RES" --batches 2 32 --providers eager fusediff
step linear_int8 30 $PY $B/bench_linear_int8.py --out "$RES" --dtype bfloat16 --batches 2 \
  --providers eager fusediff_w8 modiff_w8
echo "== summary ($SECONDS s of $BUDGET_S)"
cat "$SUMMARY"
ls "$RES"
