#!/usr/bin/env bash
# The main job (README's first command): build in Release and run epcomm-bench. With GPUs it runs on all
# local GPUs; without, it says so and runs the CPU reference. Extra arguments go to epcomm-bench.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${EPCOMM_BUILD_DIR:-$ROOT/build}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [[ -z "${NCCL_HOME:-}" ]]; then
  NCCL_HOME="$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)"
fi
LOG="$BUILD.build.log"
mkdir -p "$(dirname "$BUILD")"
if ! { cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release ${NCCL_HOME:+-DNCCL_HOME="$NCCL_HOME"} &&
       ninja -C "$BUILD" epcomm-bench; } > "$LOG" 2>&1; then
  tail -n 40 "$LOG"
  echo "run.sh: the build failed (log: $LOG)" >&2
  exit 1
fi
exec "$BUILD/bench/epcomm-bench" "$@"
