#!/usr/bin/env bash
# One call on the GPU machine: build, run the host tests, every GPU test on 2 and 4 GPUs (as many as the
# machine has), then the demo/benchmark. Logs go to $OUT (or build-gpu/logs); a short table is printed last.
#
#   tools/gpu-check.sh [--quick]
# Environment: EPCOMM_RANKS ("2 4", plus 8 on an 8-GPU machine, 1 on a 1-GPU one), EPCOMM_PY_WORLDS ("2,4"),
# EPCOMM_SKIP (any of: tests python bench variants; ht-variants or ll-variants for one mode's opt-in kernels), EPCOMM_TEST_TIMEOUT (seconds per GPU test program, 180),
# EPCOMM_LOCAL_RANKS (e.g. "2 4 8": also run every C GPU test with the ranks as threads of one process, several
# per GPU in green contexts: the multi-rank logic on any machine, one GPU included; not NVLink),
# EPCOMM_PY_LOCAL_WORLDS (e.g. "2,3,4": the Python GPU tests with the ranks as threads, several per GPU),
# EPCOMM_BENCH_RANKS (default: EPCOMM_RANKS), EPCOMM_BENCH_ARGS (e.g. "--only ll"), EPCOMM_TEST_ONLY (case names to run, comma-separated substrings), EPCOMM_PY_K (a pytest -k expression), EPCOMM_DEADLINE_S (seconds in all).
# Order: build, host tests, GPU tests, benchmarks, Python binding.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${EPCOMM_BUILD_DIR:-$ROOT/build-gpu}"
LOGS="${OUT:-$BUILD/logs}"
mkdir -p "$LOGS"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

# Multicast must stay off on these machines (see GPU.md); keep it off for every child process too.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# Prefer the NCCL that PyTorch ships (2.28.9 there); the system copy is older.
if [[ -z "${NCCL_HOME:-}" ]]; then
  NCCL_HOME="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
  export NCCL_HOME
fi

SUMMARY="$LOGS/summary.md"
mkdir -p "$(dirname "$BUILD")"
: > "$SUMMARY"
row() { printf '| %-42s | %-6s | %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: ${EPCOMM_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m
  nvcc --version | tail -1
  echo "NCCL_HOME=$NCCL_HOME"
} > "$LOGS/machine.txt" 2>&1
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# One GPU: every case as one rank (a smoke test of the kernels; peers are what the 2- and 4-GPU runs test).
DEFAULT_RANKS="2 4$( (( NGPU >= 8 )) && echo ' 8')"
(( NGPU == 1 )) && DEFAULT_RANKS=1
RANKS="${EPCOMM_RANKS:-$DEFAULT_RANKS}"
SKIP=" ${EPCOMM_SKIP:-} "
TEST_TIMEOUT="${EPCOMM_TEST_TIMEOUT:-180}"
skipped() { [[ "$SKIP" == *" $1 "* ]]; }
# EPCOMM_DEADLINE_S: seconds this script may take in all; later steps get what is left, and a step that would
# get less than 10 s is skipped (its row says so), so that the logs still come back before the caller's limit.
DEADLINE=$((SECONDS + ${EPCOMM_DEADLINE_S:-100000}))
left() { local l=$((DEADLINE - SECONDS)); (( l > $1 )) && l=$1; echo "$l"; }
# A step about to start with less than 10 s left: skipped, its row says so (and the run counts as failed).
skip_past_deadline() { # label
  (( DEADLINE - SECONDS >= 10 )) && return 1
  row "$1" "skip" "EPCOMM_DEADLINE_S reached"
  status=1
}

# At most 8 files come back from the device machine: keep them few (machine, summary, tests, bench logs,
# JSONL, plot); build logs stay in the build folder unless the build fails.
TESTS="$LOGS/tests.log"
: > "$TESTS"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNCCL_HOME="$NCCL_HOME" \
  > "$BUILD.configure.log" 2>&1 && ninja -C "$BUILD" > "$BUILD.build.log" 2>&1
if [[ $? -ne 0 ]]; then
  cat "$BUILD.configure.log" "$BUILD.build.log" > "$LOGS/build.log"
  tail -n 40 "$BUILD.configure.log"; tail -n 60 "$BUILD.build.log"
  row "build" "FAIL" "see build.log"
  exit 1
fi
row "build" "ok" "$(grep -m1 'epcomm: NCCL' "$BUILD.configure.log" | sed 's/-- //')"

(cd "$BUILD" && ctest --output-on-failure > "$BUILD.host-tests.log" 2>&1)
rc=$?
{ echo "==== host tests (ctest)"; cat "$BUILD.host-tests.log"; } >> "$TESTS"
row "host tests (ctest)" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL)" "$(grep -E 'tests passed' "$BUILD.host-tests.log")"

status=0
run_gpu_test() { # name ranks args... (TAG, when set, names a variant: its label and log)
  local name=$1 ranks=$2; shift 2
  local label="$name${TAG:+ $TAG}${EPCOMM_TEST_LOCAL:+ in-process}"
  if [[ -z "${EPCOMM_TEST_LOCAL:-}" ]] && (( NGPU < ranks )); then row "$label R=$ranks" "skip" "machine has $NGPU GPUs"; return; fi
  local log="$BUILD.$name${TAG:+-$TAG}${EPCOMM_TEST_LOCAL:+-local}-r$ranks.log"
  skip_past_deadline "$label R=$ranks" && return
  timeout "$(left "$TEST_TIMEOUT")" "$BUILD/tests/gpu/$name" --ranks "$ranks" "$@" > "$log" 2>&1
  local rc=$?
  { echo "==== $label R=$ranks (exit $rc)"; head -c 200000 "$log"; } >> "$TESTS"
  [[ $rc -ne 0 ]] && status=1
  row "$label R=$ranks" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL)" "$(tail -1 "$log")"
  grep -E '^(PASS|FAIL)|^     ' "$log" | sed 's/^/    /'
}

run_gpu_suite() { # ranks
  run_gpu_test test_group_gpu "$1"
  run_gpu_test test_layout_gpu "$1"
  run_gpu_test test_ht_gpu "$1" --rounds 2
  if ! skipped variants && ! skipped ht-variants; then # the experimental opt-in kernels
    EPCOMM_HT_DISPATCH_TMA=1 TAG=tma run_gpu_test test_ht_gpu "$1" --rounds 2
    EPCOMM_HT_COMBINE_OVERLAP=8 TAG=overlap run_gpu_test test_ht_gpu "$1" --rounds 2
  fi
  run_gpu_test test_ht_modes_gpu "$1"
  skipped variants || skipped ht-variants || EPCOMM_HT_COMBINE_OVERLAP=8 TAG=overlap run_gpu_test test_ht_modes_gpu "$1"
  run_gpu_test test_ll_gpu "$1"
  skipped variants || skipped ll-variants || EPCOMM_LL_COMBINE_PER_RANK=1 TAG=per_rank run_gpu_test test_ll_gpu "$1"
  run_gpu_test test_ll_modes_gpu "$1"
  skipped variants || skipped ll-variants || EPCOMM_LL_COMBINE_PER_RANK=1 TAG=per_rank run_gpu_test test_ll_modes_gpu "$1"
}
for R in $RANKS; do
  skipped tests && break
  run_gpu_suite "$R"
done
for R in ${EPCOMM_LOCAL_RANKS:-}; do
  skipped tests && break
  EPCOMM_TEST_LOCAL=1 run_gpu_suite "$R"
done

COMMIT="$(sed -n 's/^commit: //p' "$LOGS/machine.txt")"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$GPU_NAME" in *H100*) MACHINE="nvidia-h100-x${NGPU}" ;; *) MACHINE="nvidia-h200-x${NGPU}" ;; esac
for R in ${EPCOMM_BENCH_RANKS:-$RANKS}; do
  skipped bench && break
  (( NGPU < R )) && continue
  log="$LOGS/bench-r$R.log"
  skip_past_deadline "epcomm-bench (main job) R=$R" && continue
  timeout "$(left 600)" "$BUILD/bench/epcomm-bench" --gpus "$R" $([[ $QUICK -eq 1 ]] && echo --quick) \
    --jsonl "$LOGS/ht.jsonl" --machine "$MACHINE" --gpu "${GPU_NAME:-unknown}" --commit "$COMMIT" --tokens 256 ${EPCOMM_BENCH_ARGS:-} > "$log" 2>&1
  rc=$?
  [[ $rc -ne 0 ]] && status=1
  row "epcomm-bench (main job) R=$R" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL)" "$(tail -1 "$log")"
done
if [[ -s "$LOGS/ht.jsonl" ]] && python3 -c 'import matplotlib' 2>/dev/null; then
  python3 "$ROOT/tools/plot_bench.py" "$LOGS/ht.jsonl" "$LOGS/ht.png" >> "$TESTS" 2>&1 || true
fi

# The Python binding (needs torch): its host tests and its multi-process GPU tests (python/tests/gpu), on
# 2 and 4 GPUs, including the per-call host overhead table of the low-latency calls (EPCOMM_PY_WORLDS=none
# leaves this run out). EPCOMM_PY_LOCAL_WORLDS (e.g. "2,3,4"): the GPU tests again with the ranks as threads of
# one process, several per GPU in green contexts (like EPCOMM_LOCAL_RANKS for the C tests).
run_pytest() { # label log extra-env... -- pytest args
  local label=$1 log=$2; shift 2
  skip_past_deadline "$label" && return
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  env EPCOMM_LIBRARY="$BUILD/src/libepcomm.so" "${envs[@]}" timeout "$(left 900)" \
    python3 -m pytest -q -s -p no:cacheprovider ${EPCOMM_PY_K:+-k "$EPCOMM_PY_K"} "$@" > "$log" 2>&1
  local rc=$?
  { echo "==== $label (exit $rc)"; head -c 300000 "$log"; } >> "$TESTS"
  [[ $rc -ne 0 ]] && status=1
  row "$label" "$([[ $rc -eq 0 ]] && echo ok || echo FAIL)" "$(tail -1 "$log")"
}
if skipped python; then
  row "python binding (pytest)" "skip" "EPCOMM_SKIP"
elif python3 -c 'import torch' 2>/dev/null; then
  worlds="${EPCOMM_PY_WORLDS:-$( (( NGPU == 1 )) && echo 1 || echo 2)$( (( NGPU >= 4 )) && echo ,4)}"
  if [[ "$worlds" != none ]]; then
    run_pytest "python binding (pytest, worlds $worlds)" "$BUILD.python.log" EPCOMM_TEST_WORLD="$worlds" -- \
      "$ROOT/python/tests"
    grep -A12 '^host us per call' "$BUILD.python.log" | sed 's/^/    /'
  fi
  if [[ -n "${EPCOMM_PY_LOCAL_WORLDS:-}" ]]; then
    # As the C harness does for thread mode: eager module loading (a lazy load can wait behind a peer's
    # running kernel) and the most hardware work queues.
    run_pytest "python in-process (worlds $EPCOMM_PY_LOCAL_WORLDS)" "$BUILD.python-local.log" EPCOMM_TEST_LOCAL=1 \
      EPCOMM_TEST_WORLD="$EPCOMM_PY_LOCAL_WORLDS" CUDA_DEVICE_MAX_CONNECTIONS=32 \
      CUDA_MODULE_LOADING="${EPCOMM_PY_MODULE_LOADING:-EAGER}" -- "$ROOT/python/tests/gpu"
  fi
else
  row "python binding (pytest)" "skip" "torch is not installed"
fi

for f in "$LOGS"/bench-r*.log; do [[ -f $f ]] && sed -n '/^high-throughput/,/^$/p;/^low-latency/,/^$/p' "$f"; done
echo
echo "== summary ($(head -1 "$LOGS/machine.txt"), $(sed -n 2p "$LOGS/machine.txt"), $NGPU GPUs)"
cat "$SUMMARY"
exit $status
