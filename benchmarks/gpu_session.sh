#!/usr/bin/env bash
# One lent-GPU call, planned for a short lease: the GPU test tier, then the benchmarks that decide
# the issues' targets, most important first, each step under its own time limit and all of them
# under BUDGET_S seconds. Results (CSV + markdown with GPU, torch/triton, git sha, date) and one log
# per step are packed into ONE tarball, $OUT/gpu_session.tar.gz (the device tool brings back at
# most 8 files), re-packed after every step so that a call cut short keeps what it measured.
#
# Here (registry access), once:   make wheels          # fusediff + diffusers wheels into .whl/
# Device tool:  run(command="make gpu-session", carry=[".whl"], timeout_s=600)
# Back here:    tar xzf <files_at>/gpu_session.tar.gz -C docs/benchmarks/gpu-<date>/
# The device image has torch, triton, tabulate, networkx, onnx, pytest, transformers; no diffusers,
# no fusediff (its wheel carries the torch_dynamo_backends entry point).
#
# FUSEDIFF_GPU_DRY_RUN=1 (make gpu-session-dry): the same steps on a CPU machine, each up to its
# first line that needs CUDA (pytest collects the GPU tier; each benchmark parses its arguments,
# imports what it needs and stops at require_cuda()): an import or argument error shows here, not
# in the lease.
set -u
OUT=${OUT:-out/gpu}
BUDGET_S=${BUDGET_S:-560}
DRY=${FUSEDIFF_GPU_DRY_RUN:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusediff-gpu.XXXXXX")
RES="$WORK/results"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$RES" "$LOGS"
PY=${PY:-python3}
SITE=$WORK/site
pack() { tar czf "$OUT/gpu_session.tar.gz.tmp" -C "$WORK" results logs && mv "$OUT/gpu_session.tar.gz.tmp" "$OUT/gpu_session.tar.gz"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl >"$LOGS/wheels.log" 2>&1 \
    || echo "wheel install failed (see logs/wheels.log)"
else
  echo "no .whl/ (run make wheels here first): diffusers and the fusediff entry point will be missing" | tee "$LOGS/wheels.log"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
git rev-parse --short HEAD >"$LOGS/git_sha.txt" 2>/dev/null || true
# Imports first: a failure here costs seconds, not the lease.
$PY - <<'EOF' 2>&1 | tee "$LOGS/env.txt"
import datetime, platform, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
import fusediff
print("fusediff", fusediff.__version__, "layout", fusediff.LAYOUT, "ops", len([n for n in dir(torch.ops.fusediff) if not n.startswith("_")]))
from torch._dynamo.backends.registry import lookup_backend
print("backend entry point", lookup_backend("fusediff").__module__)
for name in ("diffusers", "transformers", "onnx", "onnxruntime", "onnxscript"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", type(e).__name__, e)
from diffusers import UNet2DConditionModel  # bench_unet's model
EOF
env_rc=${PIPESTATUS[0]}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$LOGS/nvidia-smi.txt" 2>&1

SUMMARY="$LOGS/summary.txt"
echo "env: rc=$env_rc" >"$SUMMARY"
pack
# step NAME LIMIT_S CMD...: run when the budget still holds LIMIT_S, log, record rc and seconds, pack.
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
  pack
}

B=benchmarks
GPU_TIER=(-m pytest -q -m gpu -p no:cacheprovider -x --timeout 140)
[ "$DRY" = 1 ] && GPU_TIER=(-m pytest -q -m gpu -p no:cacheprovider --collect-only)
export FUSEDIFF_GPU_DRY_RUN=$DRY
# 1. correctness on the real compiled kernels (sm_90, the device's triton)
step test_gpu 150 $PY "${GPU_TIER[@]}"
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
echo "== summary ($SECONDS s of $BUDGET_S)" >>"$SUMMARY"
cat "$SUMMARY"
ls "$RES"
pack
cp "$SUMMARY" "$OUT/summary.txt"
rm -rf "$WORK"
# dry run: every step must have reached its first CUDA line (rc 0)
if [ "$DRY" = 1 ]; then
  ! grep -vE ': rc=0( |$)|^== summary' "$OUT/summary.txt"
fi
