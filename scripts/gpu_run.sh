#!/usr/bin/env bash
# The one GPU run: on a machine with a CUDA GPU and no internet, at the repo root, in about 9 minutes:
#   1. a venv (/tmp/rmi_fast_gpu_venv) on top of the machine's own CUDA torch (or, failing that, torch wheels carried in .whl/),
#      plus the peer libraries carried as wheels in .whl/ (memeff, inf-cl, cut-cross-entropy);
#   2. the compiled module built with CUDA for this GPU's architecture;
#   3. the GPU tests (pytest -m gpu, 4 processes where pytest-xdist is installed) with a JUnit XML;
#   4. the GPU benchmarks of the design's cases, forward+backward (rmi-fast bench --device cuda: the B = 65536 cases
#      against eager and the peers, then the paper's critic shape and the training step against torch.compile too)
#      → JSON, PNG, markdown;
#   5. the scaling curves (symmetric infonce_loss against B and D) with the time left → JSON, PNG.
# Everything lands in $OUT (default ./gpu_out), 7 files: gpu_run.log (every step's output and status),
# junit_gpu.xml, bench_gpu.json/.png/.md, bench_gpu_scaling.json/.png. A failing step is logged and the script
# goes on; a step stopped by its time limit keeps what it wrote (the JSON is rewritten after every case, and pytest
# is interrupted, not killed, so that it writes its report).
# The second mode, tune, runs steps 1–2 and then `rmi-fast tune --device cuda` → tune_gpu.json (every measurement)
# and tuned_<device key>.json (the dispatch table: commit it as rmi_fast/tuned/<device key>.json, the report under
# benchmarks/results/).
#
#   bash scripts/gpu_run.sh                  run everything (on the GPU machine)
#   bash scripts/gpu_run.sh tune             measure the dispatch table (on the GPU machine)
#   bash scripts/gpu_run.sh --fetch-wheels   here, with internet: download the wheels the GPU machine needs into .whl/
#
# Environment: RMI_FAST_GPU_BUDGET_S (total seconds, default 540), RMI_FAST_CUDA_ARCH (default: the device's, e.g. 90),
# PYTHON (the interpreter that holds torch; default python3), RMI_FAST_BENCH_CASES (step 4 runs these case patterns
# instead, every implementation, in one go).
set -uo pipefail
cd "$(dirname "$0")/.."

PEER_WHEELS="memeff inf-cl cut-cross-entropy"
# the versions whose adapters tests/test_bench_peers.py checks against ours
PEER_PINS="memeff==0.3.1 inf-cl==1.2.1 cut-cross-entropy==25.1.1"

fetch_wheels() {
  # Pure-Python wheels: one version each. Their needs (torch, triton, numpy) are on the GPU image already.
  local py=${PYTHON:-python3}
  mkdir -p .whl
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $PEER_PINS || return 1
  ls -l .whl
  echo "now carry .whl in the device run (carry: [\".whl\"]) and run: bash scripts/gpu_run.sh"
}

MODE=${1:-all}
if [ "$MODE" = "--fetch-wheels" ]; then
  fetch_wheels
  exit $?
elif [ "$MODE" != all ] && [ "$MODE" != tune ]; then
  echo "usage: bash scripts/gpu_run.sh [tune | --fetch-wheels]" >&2
  exit 2
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
: >"$LOG"
START=$(date +%s)
BUDGET=${RMI_FAST_GPU_BUDGET_S:-540}
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS FUNCTION ARGS...: run a function of this script with a time limit (capped by what is left,
# keeping RESERVE seconds for the steps after it), log output and status; never stops the script. timeout(1) runs
# programs, not shell functions: the function runs in a child bash that inherits the functions and variables
# exported below, and knows its own limit as STEP_LIMIT.
RESERVE=0
step() {
  local name=$1 max=$2
  shift 2
  local limit
  limit=$(($(left) - RESERVE))
  [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 10 ]; then
    echo "=== [$(date +%T)] $name: SKIPPED (time budget spent)" | tee -a "$LOG"
    return 1
  fi
  echo "=== [$(date +%T)] $name (limit ${limit}s)" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMED OUT"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  echo "=== [$(date +%T)] $name: $status after $(($(date +%s) - t0))s" | tee -a "$LOG"
  return $rc
}

# ---------------------------------------------------------------------------------------------- 1. environment
BASE_PY=${PYTHON:-python3}
VENV=${RMI_FAST_GPU_VENV:-/tmp/rmi_fast_gpu_venv}
PY=$VENV/bin/python

probe_torch() {
  "$1" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "torch sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print("device", p.name, "SMs", p.multi_processor_count, "capability", f"{p.major}.{p.minor}")
EOF
}

# pip for the venv: its own, or the base interpreter's pointed at it where the venv was made without pip
pipv() {
  if "$PY" -m pip --version >/dev/null 2>&1; then "$PY" -m pip "$@"; else "$BASE_PY" -m pip --python "$PY" "$@"; fi
}

make_venv() {
  nvidia-smi -L || true
  "$BASE_PY" -m venv "$VENV" || "$BASE_PY" -m venv --without-pip "$VENV" || return 1
  # The venv sees the base interpreter's packages (its CUDA torch, triton, pytest, ...) through a .pth file: a plain
  # --system-site-packages would skip them when the base interpreter is itself a venv. site.addsitedir also reads
  # the .pth files in those folders (editable and namespace installs), which a plain path line would not.
  local venv_site
  venv_site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  local pth="import site; print('\n'.join(f'import site; site.addsitedir({d!r})' for d in site.getsitepackages()))"
  "$BASE_PY" -c "$pth" >"$venv_site/_base_site.pth"
  if ! probe_torch "$PY"; then
    echo "no usable CUDA torch on this machine: trying carried torch wheels in .whl/"
    ls .whl/torch-*.whl >/dev/null 2>&1 || { echo "no torch wheel in .whl/"; return 1; }
    pipv install -q --no-index --find-links .whl torch || return 1
    probe_torch "$PY" || return 1
  fi
  local wheels=()
  for name in $PEER_WHEELS; do
    local f
    f=$(ls .whl/"${name//-/_}"-*.whl 2>/dev/null | head -1)
    if [ -n "$f" ]; then wheels+=("$f"); else echo "peer $name: no wheel in .whl/ (run --fetch-wheels here first)"; fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    pipv install -q --no-index --no-deps --no-compile "${wheels[@]}" || return 1
  fi
  pipv list 2>/dev/null | grep -iE "^(torch|triton|memeff|inf.cl|cut.cross.entropy|pytest|numpy) " || true
}

# ------------------------------------------------------------------------------------------------------- 2. build
build() {
  local arch=${RMI_FAST_CUDA_ARCH:-$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")}
  echo "building rmi_fast._C for sm_$arch with $(nproc) jobs"
  RMI_FAST_CUDA_ARCH=$arch RMI_FAST_BUILD_JOBS=$(nproc) \
    pipv install -v --no-index --no-deps --no-build-isolation -e . || return 1
  "$PY" -m rmi_fast.cli info
  # setup.py falls back to a Python-only install when CMake fails: stop here rather than fail every CUDA test
  "$PY" -c "import rmi_fast._C as c; assert c.with_cuda, 'rmi_fast._C was built without the CUDA kernels'"
}

# ------------------------------------------------------------------------------------------------- 3 – 5. run all
# One pytest run over every GPU test, in 4 processes where pytest-xdist exists (Triton compiles each new kernel on
# the CPU, about a second each). It is interrupted (SIGINT) shortly before the step's limit, so that it still writes
# the JUnit XML of what it ran; each test is capped where pytest-timeout exists.
gpu_tests() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=90)
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 4)
  local limit=$((STEP_LIMIT > 40 ? STEP_LIMIT - 20 : STEP_LIMIT / 2))
  timeout -s INT --kill-after=15 "$limit" \
    "$PY" -m pytest tests -m gpu -q -p no:cacheprovider "${extra[@]}" --junitxml="$OUT/junit_gpu.xml"
}

# The design's cases, forward+backward, into one report: first the B = 65536 ones against eager and the peers
# (torch.compile of a B×B formula at that size takes minutes to build), then the critic shape and the training step
# with torch.compile as well. RMI_FAST_BENCH_CASES: these case patterns instead, every implementation.
BENCH_CASES=${RMI_FAST_BENCH_CASES:-}
bench() {
  local common=(--device cuda --passes fwd+bwd --max-time 2 --json "$OUT/bench_gpu.json" --append)
  if [ -n "$BENCH_CASES" ]; then
    "$PY" -m rmi_fast.cli bench "${common[@]}" --cases "$BENCH_CASES" || return
  else
    "$PY" -m rmi_fast.cli bench "${common[@]}" --cases 'clip/*,nwj/*,jsd/*' \
      --impls 'rmi_fast*,eager,memeff,inf-cl,cut-cross-entropy,gemm-x4' || return
    "$PY" -m rmi_fast.cli bench "${common[@]}" --cases 'dv/*,train_step/*' || return
  fi
  render "$OUT/bench_gpu.json" "$OUT/bench_gpu.png" "$OUT/bench_gpu.md"
}

scaling() {
  "$PY" -m rmi_fast.cli bench --device cuda --scaling --impls 'rmi_fast*,eager,memeff,inf-cl,cut-cross-entropy,gemm-x4' \
    --max-time 1 --json "$OUT/bench_gpu_scaling.json" --plot "$OUT/bench_gpu_scaling.png"
}

# The report is rewritten after every shape and the table derived from what was measured, so a stopped run still
# leaves a usable table.
tune() {
  local key
  key=$("$PY" -c "import torch; from rmi_fast import tuning; print(tuning.device_key(tuning.device_name('cuda')))")
  local budget=$(($(left) - 60))
  [ "$budget" -lt 10 ] && budget=10
  "$PY" -m rmi_fast.cli tune --device cuda --budget "$budget" --json "$OUT/tune_gpu.json" \
    --table "$OUT/tuned_$key.json"
}

# The JSON is rewritten after every case, so a run stopped by its limit still has rows: render what it has.
render() {
  local json=$1 png=$2 md=${3:-}
  [ -s "$json" ] || { echo "no $json to render"; return 1; }
  local extra=()
  [ -n "$md" ] && extra=(--markdown "$md")
  "$PY" -m rmi_fast.cli bench --from-json "$json" --plot "$png" "${extra[@]}"
}

finish() {
  echo "=== done in $(($(date +%s) - START))s; files:" | tee -a "$LOG"
  ls -l "$OUT" | tee -a "$LOG"
  exit 0
}

# what the steps' child shells need (see step)
export -f left probe_torch pipv make_venv build gpu_tests bench scaling tune render
export PEER_WHEELS BASE_PY VENV PY OUT LOG START BUDGET BENCH_CASES

# scaled S: S seconds of the default 540 s budget, scaled to this run's (the reserves and limits keep their shares)
scaled() { echo $(($1 * BUDGET / 540)); }

echo "rmi_fast GPU run ($MODE): budget ${BUDGET}s, output in $OUT" | tee -a "$LOG"
if ! RESERVE=$(scaled 400) step "venv" "$(scaled 90)" make_venv; then
  echo "no usable venv: going on with $BASE_PY" | tee -a "$LOG"
  PY=$BASE_PY
fi
# Without the CUDA build the Triton kernels still run (from the repo root): the steps go on, the log says why the
# cuda backend is missing.
RESERVE=$(scaled 330) step "build (CUDA)" "$(scaled 240)" build
if [ "$MODE" = tune ]; then
  RESERVE=0 step "tune" "$BUDGET" tune
  finish
fi
RESERVE=$(scaled 220) step "GPU tests" "$(scaled 180)" gpu_tests
RESERVE=$(scaled 40) step "benchmarks" "$(scaled 240)" bench ||
  RESERVE=0 step "render benchmarks" 30 render "$OUT/bench_gpu.json" "$OUT/bench_gpu.png" "$OUT/bench_gpu.md"
RESERVE=$(scaled 15) step "scaling" "$(scaled 300)" scaling ||
  RESERVE=0 step "render scaling" 20 render "$OUT/bench_gpu_scaling.json" "$OUT/bench_gpu_scaling.png"
finish
