#!/usr/bin/env bash
# The tests that need no GPU (README's second command; CI runs it): configure with AddressSanitizer and
# UBSan on the host code and warnings as errors, build everything (CUDA kernels included), run ctest.
# On a GPU machine, tools/gpu-check.sh runs the GPU tests.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${EPCOMM_TEST_BUILD_DIR:-$ROOT/build-test}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DEPCOMM_SANITIZE=ON -DEPCOMM_WERROR=ON
ninja -C "$BUILD"
cd "$BUILD"
ctest --output-on-failure -j "$(nproc)"
