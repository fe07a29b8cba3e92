"""The GPU tests' torch reference for the low-latency FP8 cast (python/tests/gpu/ref_torch.py) against the C
reference it must equal bit for bit (ref/formats.c, which the kernel matches), on the CPU: ref/formats.c is
compiled into a small shared library and called through ctypes, one 128-channel group at a time."""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO_ROOT, "python", "tests", "gpu"))
import ref_torch  # noqa: E402

CC = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build ref/formats.c")


@pytest.fixture(scope="module")
def c_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("epref") / "libepref_formats.so"
    ref = os.path.join(REPO_ROOT, "ref")
    cmd = [CC, "-std=c11", "-O1", "-shared", "-fPIC", "-I", ref, os.path.join(ref, "formats.c"), "-o", str(out),
           "-lm"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"ref/formats.c does not build alone:\n{build.stderr}"
    lib = ctypes.CDLL(str(out))
    lib.epref_cast_fp8_group.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                         ctypes.c_void_p]
    lib.epref_cast_fp8_group.restype = None
    lib.epref_ue8m0_byte.argtypes = [ctypes.c_float]
    lib.epref_ue8m0_byte.restype = ctypes.c_uint8
    return lib


def c_cast(lib, x, round_scale, use_ue8m0):
    """(e4m3 bytes [N, H], scale_inv [N, H/128] float32 or UE8M0 words [N, H/512] int32) from the C reference."""
    N, H = x.shape
    bits = x.contiguous().view(torch.int16)
    q = torch.empty((N, H), dtype=torch.uint8)
    s = torch.empty((N, H // 128), dtype=torch.float32)
    for n in range(N):
        for g in range(H // 128):
            lib.epref_cast_fp8_group(bits[n, g * 128:].data_ptr(), 128, int(round_scale),
                                     q[n, g * 128:].data_ptr(), s[n, g:].data_ptr())
    if not use_ue8m0:
        return q, s
    words = torch.zeros((N, H // 512), dtype=torch.int64)
    for n in range(N):
        for g in range(H // 128):
            words[n, g // 4] |= int(lib.epref_ue8m0_byte(float(s[n, g]))) << (8 * (g % 4))
    return q, (words - ((words >> 31) << 32)).to(torch.int32)  # as int32 bit patterns


def inputs(seed):
    """bf16 rows [N, 1024]: random magnitudes from 1e-30 to 1e30, plus groups made to hit the edges: all zero
    (amax clamped to 1e-4), a NaN, an Inf, amax a power of two (round_scale's exact case), values at bf16's
    largest, tiny values that cast to e4m3 subnormals, and halfway cases of the e4m3 rounding."""
    g = torch.Generator()
    g.manual_seed(seed)
    rows = []
    for exp in (-30, -8, -3, 0, 2, 8, 30):
        rows.append(torch.randn((6, 1024), generator=g) * 10.0 ** exp)
    edge = torch.randn((8, 1024), generator=g)
    edge[0, :128] = 0.0
    edge[0, 128:256] = -0.0
    edge[1, 5] = float("nan")
    edge[1, 128 + 9] = float("-nan")
    edge[2, 7] = float("inf")
    edge[2, 128 + 3] = float("-inf")
    edge[3, :128] *= 0.5 / edge[3, :128].abs().max()  # amax exactly 0.5
    edge[3, 128:256] *= 448.0 / edge[3, 128:256].abs().max()  # amax exactly 448
    edge[4, :] = 3.3895e38  # bf16's largest finite value
    edge[4, ::2] *= -1
    edge[5, :128] = torch.arange(128) * 1e-6
    edge[6, :] = torch.linspace(-448.0, 448.0, 1024)  # amax 448: scale 1, many e4m3 ties
    edge[7, :] = 1e-5  # below the clamp: amax = 1e-4
    rows.append(edge)
    return torch.cat(rows).to(torch.bfloat16)


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)],
                         ids=["plain", "round_scale", "ue8m0"])
def test_ref_torch_fp8_cast_equals_the_c_reference_bit_for_bit(c_ref, round_scale, use_ue8m0):
    x = inputs(7)
    q, s = ref_torch.cast_fp8(x, round_scale, use_ue8m0)
    want_q, want_s = c_cast(c_ref, x, round_scale, use_ue8m0)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == (torch.int32 if use_ue8m0 else torch.float32)
    q = q.view(torch.uint8)
    bad = (q != want_q).nonzero()
    assert len(bad) == 0, (f"values: {len(bad)} differ, first at {bad[0].tolist()}: ref_torch "
                           f"{int(q[tuple(bad[0])])}, C reference {int(want_q[tuple(bad[0])])}, input "
                           f"{float(x[tuple(bad[0])])}")
    s_bits, want_bits = s.view(torch.int32), want_s.view(torch.int32)
    bad = (s_bits != want_bits).nonzero()
    assert len(bad) == 0, (f"scales: {len(bad)} differ, first at {bad[0].tolist()}: ref_torch "
                           f"{int(s_bits[tuple(bad[0])]):#x}, C reference {int(want_bits[tuple(bad[0])]):#x}")

