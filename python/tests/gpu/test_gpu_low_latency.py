"""Low-latency mode through the Python binding on 2+ GPUs, against ref_torch: dispatch in BF16 and FP8
(plain, round_scale, UE8M0) with DeepEP's column-major scales, combine, stats, hooks, two results alive at
once, async events, reused outputs and CUDA-graph capture and replay."""
import os
import random

import pytest

from dist_helpers import (generator, graph_capture_kwargs, needs_gpus, new_stream, routing, run_ranks, tokens, torch,
                          world_sizes)
import ref_torch

pytestmark = needs_gpus
SEED = int(os.environ.get("EPCOMM_TEST_SEED", random.randrange(1 << 20)))
T, HIDDEN, TOPK = 128, 2048, 8


def experts_for(world):
    return 8 * world


def ll_inputs(seed, source, world, scale=1.0):
    g = generator(seed, source)
    n = 100 + 7 * source  # N <= T, different on every rank
    idx, w = routing(g, n, experts_for(world), TOPK)
    return {"x": (tokens(g, n, HIDDEN).float() * scale).to(torch.bfloat16).cuda(), "idx": idx.cuda(), "w": w.cuda()}


def make_buffer(group, world, reuse=False):
    import epcomm as deep_ep

    E = experts_for(world)
    return deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, world, E),
                          low_latency_mode=True, num_qps_per_rank=E // world, explicitly_destroy=True,
                          low_latency_reuse_outputs=reuse)


def same(name, rank, got, want):
    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert got.shape == want.shape, f"rank {rank}: {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    bad = got != want
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"rank {rank}: {name}{list(i)} = {got[i].item()}, expected {want[i].item()} "
                             f"({int(bad.sum())} differ)")


def check_dispatch(rank, everyone, world, recv, recv_count, handle, use_fp8=False, round_scale=False,
                   use_ue8m0=False):
    want = ref_torch.low_latency_dispatch(everyone, rank, experts_for(world), world)
    recv_x, scales = recv if use_fp8 else (recv, None)
    L = len(want)
    assert recv_x.shape == (L, world * T, HIDDEN) and recv_count.shape == (L,)
    assert recv_x.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    src_info, layout_range, t, h, e = handle
    assert (t, h, e) == (T, HIDDEN, experts_for(world))
    if use_fp8:  # DeepEP's layout: [L, R*T, S] with the last two dimensions column-major
        S = HIDDEN // (512 if use_ue8m0 else 128)
        assert scales.shape == (L, world * T, S) and scales.stride()[1:] == (1, world * T)
        assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
    for l, exp in enumerate(want):
        c = exp["count"]
        assert recv_count[l].item() == c, f"rank {rank}: recv_count[{l}] = {recv_count[l].item()}, expected {c}"
        same(f"src_info[{l}]", rank, src_info[l, :c], exp["src"])
        # (begin << 32) | count per source; an empty range's begin is not specified, so only its count is checked.
        want_range = torch.tensor(exp["range"], device="cuda")
        nonempty = (want_range & 0xFFFFFFFF) > 0
        same(f"layout_range[{l}] counts", rank, layout_range[l] & 0xFFFFFFFF, want_range & 0xFFFFFFFF)
        same(f"layout_range[{l}] begins", rank, layout_range[l][nonempty], want_range[nonempty])
        if use_fp8:
            q, s = ref_torch.cast_fp8(exp["x"], round_scale, use_ue8m0)
            same(f"recv_x[{l}] (fp8)", rank, recv_x[l, :c], q)
            same(f"recv_x_scales[{l}]", rank, scales[l, :c], s)
        else:
            same(f"recv_x[{l}]", rank, recv_x[l, :c], exp["x"])
    return want


def expert_outputs(rank, recv_x, recv_count, world):
    """What the test's experts send back: rows scaled by a power of two, rows past the count poisoned."""
    L = recv_x.size(0)
    scale = torch.tensor([ref_torch.expert_scale(rank * L + l) for l in range(L)], device="cuda")
    y = (recv_x.float() * scale.view(L, 1, 1)).to(torch.bfloat16)
    rows = torch.arange(recv_x.size(1), device="cuda").view(1, -1)
    return y.masked_fill((rows >= recv_count.view(L, 1)).unsqueeze(-1), float("nan"))


def _dispatch_combine_worker(rank, world, group, seed, reuse):
    everyone = [ll_inputs(seed, s, world) for s in range(world)]
    mine, E, L = everyone[rank], experts_for(world), experts_for(world) // world
    buffer = make_buffer(group, world, reuse)
    stats = torch.zeros(L, dtype=torch.int32, device="cuda")
    waits = torch.zeros(world, dtype=torch.int64, device="cuda")
    for use_fp8, round_scale, use_ue8m0 in ((False, False, False), (True, False, False), (True, True, False),
                                            (True, True, True)):
        recv, count, handle, event, hook = buffer.low_latency_dispatch(
            mine["x"], mine["idx"], T, E, cumulative_local_expert_recv_stats=stats,
            dispatch_wait_recv_cost_stats=waits, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
        assert hook is None and event.event is None
        check_dispatch(rank, everyone, world, recv, count, handle, use_fp8, round_scale, use_ue8m0)
    counts = torch.tensor([w["count"] for w in ref_torch.low_latency_dispatch(everyone, rank, E, world)],
                          dtype=torch.int32, device="cuda")
    same("cumulative_local_expert_recv_stats", rank, stats, counts * 4)
    assert (waits >= 0).all()  # the values are checked in test_low_latency_wait_cost_stats

    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False)
    y = expert_outputs(rank, recv_x, count, world)
    want = ref_torch.low_latency_combine(mine["x"], mine["idx"], mine["w"])
    combine_waits = torch.zeros(world, dtype=torch.int64, device="cuda")
    out, event, hook = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle,
                                                  combine_wait_recv_cost_stats=combine_waits)
    assert hook is None and event.event is None
    same("combined_x", rank, out, want)
    given = torch.full_like(out, float("nan"))
    out2, _, _ = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle, out=given)
    assert out2 is given
    same("combined_x (out=)", rank, given, want)
    # Zero-copy: the expert outputs are written into the buffer epcomm hands out; x is then not read.
    zc = buffer.get_next_low_latency_combine_buffer(handle)
    assert zc.shape == y.shape and zc.dtype == torch.bfloat16
    zc.copy_(y)
    out3, _, _ = buffer.low_latency_combine(torch.empty_like(y), mine["idx"], mine["w"], handle, zero_copy=True)
    same("combined_x (zero_copy)", rank, out3, want)
    assert buffer.get_next_low_latency_combine_buffer(handle).data_ptr() != zc.data_ptr()  # two in turn

    # Two results alive at once (the buffer's two halves), combined in turn.
    other = ll_inputs(seed + 7, rank, world, scale=0.25)
    first = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False)
    second = buffer.low_latency_dispatch(other["x"], mine["idx"], T, E, use_fp8=False)
    for (rx, c, h, _, _), inp in ((first, mine), (second, other)):
        out, _, _ = buffer.low_latency_combine(expert_outputs(rank, rx, c, world), mine["idx"], mine["w"], h)
        same("combined_x (double buffered)", rank, out, ref_torch.low_latency_combine(inp["x"], mine["idx"],
                                                                                        mine["w"]))
    if reuse:  # the third result reuses the first one's tensors, as DeepEP's two-buffer contract allows
        third = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False)
        assert third[0].data_ptr() == first[0].data_ptr() != second[0].data_ptr()
    buffer.clean_low_latency_buffer(T, HIDDEN, E)
    recv, count, handle, _, _ = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False)
    check_dispatch(rank, everyone, world, recv, count, handle)
    buffer.destroy()


def _hooks_worker(rank, world, group, seed):
    everyone = [ll_inputs(seed, s, world) for s in range(world)]
    mine, E = everyone[rank], experts_for(world)
    buffer = make_buffer(group, world)
    recv, count, handle, event, hook = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=True,
                                                                   return_recv_hook=True)
    assert callable(hook)
    with pytest.raises(Exception, match="hook"):  # combining before the receive is refused
        buffer.low_latency_combine(recv[0].to(torch.bfloat16), mine["idx"], mine["w"], handle)
    hook()
    check_dispatch(rank, everyone, world, recv, count, handle, use_fp8=True)

    recv_x, count, handle, _, hook = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False,
                                                                 return_recv_hook=True)
    hook()
    out, event, hook = buffer.low_latency_combine(expert_outputs(rank, recv_x, count, world), mine["idx"],
                                                  mine["w"], handle, return_recv_hook=True)
    hook()
    same("combined_x (hooks)", rank, out, ref_torch.low_latency_combine(mine["x"], mine["idx"], mine["w"]))

    recv_x, count, handle, event, _ = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False,
                                                                  async_finish=True)
    assert event.event is not None and event.extra_tensors is not None
    event.current_stream_wait()
    check_dispatch(rank, everyone, world, recv_x, count, handle)
    out, event, _ = buffer.low_latency_combine(expert_outputs(rank, recv_x, count, world), mine["idx"], mine["w"],
                                               handle, async_finish=True)
    event.current_stream_wait()
    same("combined_x (async)", rank, out, ref_torch.low_latency_combine(mine["x"], mine["idx"], mine["w"]))
    with pytest.raises(ValueError, match="async_finish"):
        buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, async_finish=True, return_recv_hook=True)
    # LogFMT on the wire: within its bound of the exact combine (the C GPU tests check it bit for bit).
    y = expert_outputs(rank, recv_x, count, world) * 0.125  # most groups below 1: log format
    exact, _, _ = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle)
    lossy, _, _ = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle, use_logfmt=True)
    scale = ref_torch.low_latency_combine(mine["x"].float().abs().to(torch.bfloat16), mine["idx"],
                                          mine["w"].abs()).float().abs() * 0.125
    err = (lossy.float() - exact.float()).abs()
    assert (err <= 0.0324 * scale * 1.01 + exact.float().abs() / 128 + 1e-6).all(), \
        f"rank {rank}: LogFMT combine off by {err.max().item()}"
    buffer.destroy()


def _graph_worker(rank, world, group, seed):
    """Capture dispatch, the experts and combine in one CUDA graph; replay it with fresh tokens."""
    mine, E = ll_inputs(seed, rank, world), experts_for(world)
    buffer = make_buffer(group, world)
    x = mine["x"].clone()
    L = E // world
    scale = torch.tensor([ref_torch.expert_scale(rank * L + l) for l in range(L)], device="cuda").view(L, 1, 1)

    def step():
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, mine["idx"], T, E, use_fp8=False)
        y = (recv_x.float() * scale).to(torch.bfloat16)
        return buffer.low_latency_combine(y, mine["idx"], mine["w"], handle)[0]

    side = new_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the graph (plans, allocator)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, **graph_capture_kwargs()):
        out = step()
    for i in range(3):
        fresh = ll_inputs(seed + 100 + i, rank, world)["x"]
        x.copy_(fresh)
        graph.replay()
        torch.cuda.current_stream().synchronize()
        same(f"combined_x (graph replay {i})", rank, out, ref_torch.low_latency_combine(fresh, mine["idx"],
                                                                                          mine["w"]))
    del graph
    buffer.destroy()


def _wait_stats_worker(rank, world, group, seed):
    """dispatch_/combine_wait_recv_cost_stats: nanoseconds added per source rank. Rank 0 starts each call about
    100 ms late (a sleep kernel on its stream, the ranks lined up just before by a synchronized call), so every
    other rank must have waited most of that for rank 0. Every entry starts at a base that must be kept."""
    mine, E = ll_inputs(seed, rank, world), experts_for(world)
    buffer = make_buffer(group, world)
    base, late_ns, sleep_cycles, most_ns = 1 << 40, 20_000_000, 200_000_000, 60_000_000_000

    def line_up_then_delay_rank0():
        torch.cuda.current_stream().synchronize()
        if rank == 0:
            torch.cuda._sleep(sleep_cycles)  # about 100 ms at 2 GHz

    def check(name, waits):
        added = (waits - base).tolist()
        assert all(0 <= a < most_ns for a in added), f"rank {rank}: {name} added {added} ns to a base of {base}"
        if rank != 0:
            assert added[0] >= late_ns, (f"rank {rank}: {name}[0] = base + {added[0]} ns, but rank 0 came about "
                                         f"100 ms late (expected at least {late_ns} ns)")
            assert all(a < added[0] // 2 for a in added[1:]), (f"rank {rank}: {name} added {added} ns: only rank 0 "
                                                               f"came late, so only its entry should be large")

    buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False)  # the first call's setup, untimed
    waits = torch.full((world,), base, dtype=torch.int64, device="cuda")
    line_up_then_delay_rank0()
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(mine["x"], mine["idx"], T, E, use_fp8=False,
                                                              dispatch_wait_recv_cost_stats=waits)
    y = expert_outputs(rank, recv_x, count, world)
    combine_waits = torch.full((world,), base, dtype=torch.int64, device="cuda")
    line_up_then_delay_rank0()
    out, _, _ = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle,
                                           combine_wait_recv_cost_stats=combine_waits)
    same("combined_x (rank 0 late)", rank, out, ref_torch.low_latency_combine(mine["x"], mine["idx"], mine["w"]))
    check("dispatch_wait_recv_cost_stats", waits)
    check("combine_wait_recv_cost_stats", combine_waits)
    buffer.destroy()


@pytest.mark.parametrize("world", world_sizes())
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh_outputs", "reused_outputs"])
def test_low_latency_dispatch_combine(world, reuse):
    run_ranks(_dispatch_combine_worker, world, SEED, reuse)


@pytest.mark.parametrize("world", world_sizes())
def test_low_latency_hooks_and_events(world):
    run_ranks(_hooks_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_low_latency_cuda_graph(world):
    run_ranks(_graph_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_low_latency_wait_cost_stats(world):
    run_ranks(_wait_stats_worker, world, SEED)
