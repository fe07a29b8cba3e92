#!/usr/bin/env bash
# The tests that need no GPU (README's second command; CI runs it): configure with AddressSanitizer and
# UBSan on the host code and warnings as errors, build everything (CUDA kernels included), run ctest; then
# the Python binding's host tests (pytest) against a plain build of the library.
# On a GPU machine, tools/gpu-check.sh runs the GPU tests.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${EPCOMM_TEST_BUILD_DIR:-$ROOT/build-test}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DEPCOMM_SANITIZE=ON -DEPCOMM_WERROR=ON
ninja -C "$BUILD"
(cd "$BUILD" && ctest --output-on-failure -j "$(nproc)")

# Python: an ASan-built library cannot be loaded into an interpreter that was not started with libasan, so
# the binding is tested against a second, plain build of the library alone (no tests, no benchmark).
PYBUILD="${EPCOMM_PY_BUILD_DIR:-$ROOT/build-py}"
cmake -S "$ROOT" -B "$PYBUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_BUILD_TESTS=OFF -DEPCOMM_BUILD_BENCH=OFF
ninja -C "$PYBUILD" epcomm
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check pytest
# The packaging test builds the wheel offline: it needs `wheel` with setuptools < 70.1 (skips without it).
python3 -c 'import wheel' >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check wheel || true
cd "$ROOT"
EPCOMM_LIBRARY="$PYBUILD/src/libepcomm.so" python3 -m pytest -q -p no:cacheprovider python/tests
