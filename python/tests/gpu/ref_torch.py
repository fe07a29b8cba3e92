"""Expected results in plain torch, written from shared/SPEC.md and ref/epref.h's numeric definitions (not
from the kernels). Each function computes what rank `rank` must get from the inputs of every rank."""
import torch


def layout(idx, num_experts, num_ranks):
    L = num_experts // num_ranks
    valid = idx >= 0
    rank_of = torch.where(valid, idx // L, -1)
    in_rank = torch.stack([(rank_of == r).any(1) for r in range(num_ranks)], 1)
    per_rank = in_rank.sum(0).to(torch.int32)
    per_expert = torch.bincount(idx[valid], minlength=num_experts).to(torch.int32)
    return per_rank, per_expert, in_rank


def dispatch(inputs, rank, num_experts, num_ranks, alignment=1):
    """inputs[s] = dict(x, idx, w[, scales]). Rows ordered by (source rank, source token)."""
    L = num_experts // num_ranks
    lo, hi = rank * L, (rank + 1) * L
    out = {"x": [], "idx": [], "w": [], "src": [], "scales": []}
    for inp in inputs:
        _, _, in_rank = layout(inp["idx"], num_experts, num_ranks)
        sel = in_rank[:, rank].nonzero().squeeze(1)
        idx = inp["idx"][sel]
        local = (idx >= lo) & (idx < hi)
        x = inp["x"]
        is_fp8 = x.dtype == torch.float8_e4m3fn  # index and concatenate FP8 rows as bytes
        out["x"].append(x.view(torch.uint8)[sel] if is_fp8 else x[sel])
        out["idx"].append(torch.where(local, idx - lo, -1))
        out["w"].append(torch.where(local, inp["w"][sel], 0.0))
        out["src"].append(sel.to(torch.int32))
        if "scales" in inp:
            out["scales"].append(inp["scales"][sel])
    res = {k: torch.cat(v) if v else None for k, v in out.items()}
    if inputs[0]["x"].dtype == torch.float8_e4m3fn:
        res["x"] = res["x"].view(torch.float8_e4m3fn)
    counts = torch.bincount(res["idx"][res["idx"] >= 0], minlength=L)
    res["per_expert"] = [int((c + alignment - 1) // alignment * alignment) for c in counts.tolist()]
    return res


def combine(x, in_rank, scale_of_rank, bias0=None, bias1=None):
    """Rank d sends back bf16(row * scale_of_rank(d)); sums in float32, ascending rank, then the biases."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for d in range(in_rank.size(1)):
        row = (x.float() * scale_of_rank(d)).to(torch.bfloat16).float()
        acc = acc + torch.where(in_rank[:, d:d + 1], row, 0.0)
    for b in (bias0, bias1):
        if b is not None:
            acc = acc + b.float()
    return acc.to(torch.bfloat16)


def _f32_const(bits, like):
    """A float32 constant given by its bits (so no double-to-float rounding is involved), shaped like `like`."""
    return torch.full_like(like, bits, dtype=torch.int32).view(torch.float32)


E4M3_NAN_CODE = 0x7F


def cast_fp8(x, round_scale=False, use_ue8m0=False):
    """Per 128-channel group: (e4m3 values [N, H], scale_inv [N, H/128] float32 or UE8M0 words [N, H/512]).

    ref/formats.c's epref_cast_fp8_group, one float32 operation per step (each a single IEEE-rounded torch
    op on float32 tensors, nothing fused, no double intermediates): amax = max |x| (NaN ignored) clamped to
    >= 1e-4f; plain: scale_inv = amax * (1.0f / 448.0f), scale = 448.0f / amax (a true division: torch's
    `448.0 / t` is reciprocal(t) * 448, which rounds differently); round_scale: e = ceil(log2(amax *
    (1.0f / 448.0f))) read from the bits, scale_inv = 2^e, scale = 2^-e (an Inf amax gives Inf and 0);
    values: e4m3(x * scale), round to nearest even, saturating to +-448, every NaN product -> 0x7F.
    python/tests/test_ref_torch.py checks this against the C reference bit for bit."""
    N, H = x.shape
    G = H // 128
    xf = x.float().view(N, G, 128)
    absx = xf.abs()
    amax = torch.where(absx.isnan(), torch.zeros_like(absx), absx).amax(-1)
    amax = torch.maximum(amax, _f32_const(0x38D1B717, amax))  # 1e-4f
    s = amax * _f32_const(0x3B124925, amax)  # amax * (1.0f / 448.0f)
    if round_scale:
        bits = s.view(torch.int32)
        e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)  # ceil(log2(s)), s normal
        scale_inv = ((e + 127) << 23).view(torch.float32)
        scale = ((127 - e) << 23).view(torch.float32)
        inf = amax.isinf()
        scale_inv = torch.where(inf, amax, scale_inv)
        scale = torch.where(inf, torch.zeros_like(scale), scale)
    else:
        scale_inv = s
        scale = torch.full_like(amax, 448.0) / amax  # 448 is exact in float32
    v = xf * scale.unsqueeze(-1)
    # torch's float -> e4m3fn cast rounds to nearest even but makes NaN of |v| >= 480: saturate first.
    limit = torch.full_like(v, 448.0)
    q = torch.minimum(torch.maximum(v, -limit), limit).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(v.isnan(), torch.full_like(q, E4M3_NAN_CODE), q)
    q = q.view(N, H).view(torch.float8_e4m3fn)
    if not use_ue8m0:
        return q, scale_inv
    exp_bytes = ((scale_inv.view(torch.int32) >> 23) & 0xFF).view(N, H // 512, 4)
    words = exp_bytes[..., 0] | (exp_bytes[..., 1] << 8) | (exp_bytes[..., 2] << 16) | (exp_bytes[..., 3] << 24)
    return q, words.to(torch.int32)


def low_latency_dispatch(inputs, rank, num_experts, num_ranks):
    """Per local expert: rows, source token indices and per-source (begin << 32 | count)."""
    L = num_experts // num_ranks
    experts = []
    for l in range(L):
        e = rank * L + l
        rows, src, ranges, begin = [], [], [], 0
        for inp in inputs:
            sel = (inp["idx"] == e).any(1).nonzero().squeeze(1)
            rows.append(inp["x"][sel])
            src.append(sel.to(torch.int32))
            ranges.append((begin << 32) | sel.numel())
            begin += sel.numel()
        experts.append({"x": torch.cat(rows), "src": torch.cat(src), "range": ranges, "count": begin})
    return experts


def expert_scale(expert):
    """What the test's expert multiplies its rows by: a power of two, so bf16(row * scale) is exact."""
    return 2.0 ** ((expert % 3) - 1)


def low_latency_combine(x, idx, w):
    """out[t] = bf16(fmaf chain over k of w[t, k] * bf16(x[t] * expert_scale(idx[t, k]))), -1 skipped.
    float64 holds each product exactly and the sum before its single rounding to float32 (= fmaf) here."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(idx.size(1)):
        e = idx[:, k]
        scale = torch.where(e >= 0, 2.0 ** ((e.clamp(min=0) % 3) - 1).double(), 0.0).unsqueeze(1)
        v = (x.double() * scale).to(torch.bfloat16).double()
        step = (acc.double() + w[:, k:k + 1].double() * v).float()
        acc = torch.where((e >= 0).unsqueeze(1), step, acc)
    return acc.to(torch.bfloat16)
