"""Normal (high-throughput) mode through the Python binding on 2+ GPUs, against ref_torch: layout, dispatch
and combine in BF16 and FP8, expert alignment, weights and biases, worst-token and cached dispatch, events."""
import os
import random

import pytest

from dist_helpers import generator, needs_gpus, new_stream, routing, run_ranks, tokens, torch, world_sizes
import ref_torch

pytestmark = needs_gpus
SEED = int(os.environ.get("EPCOMM_TEST_SEED", random.randrange(1 << 20)))
HIDDEN, TOPK = 2048, 8


def experts_for(world):
    return 16 * world


def inputs_of(seed, source, world, hidden=HIDDEN, fp8=False):
    """Rank `source`'s inputs, identical wherever they are rebuilt."""
    g = generator(seed, source)
    n = 300 + 57 * source
    idx, w = routing(g, n, experts_for(world), TOPK)
    inp = {"x": tokens(g, n, hidden), "idx": idx, "w": w}
    if fp8:
        inp["x"] = inp["x"].float().to(torch.float8_e4m3fn)
        inp["scales"] = torch.rand((n, hidden // 128), generator=g) + 0.5
    return {k: v.cuda() for k, v in inp.items()}


def make_buffer(group, world, hidden=HIDDEN):
    import epcomm as deep_ep

    max_tokens = 300 + 57 * (world - 1)
    return deep_ep.Buffer(group, deep_ep.Buffer.get_normal_buffer_size_hint(max_tokens, hidden, world, TOPK),
                          explicitly_destroy=True)


def same(name, rank, got, want):
    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert got.shape == want.shape, f"rank {rank}: {name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    bad = (got != want) & ~(got.isnan() & want.isnan()) if got.is_floating_point() else got != want
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"rank {rank}: {name}{list(i)} = {got[i].item()}, expected {want[i].item()} "
                             f"({int(bad.sum())} differ)")


def _bf16_worker(rank, world, group, seed):
    E = experts_for(world)
    everyone = [inputs_of(seed, s, world) for s in range(world)]
    mine = everyone[rank]
    buffer = make_buffer(group, world)

    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], E)
    want_rank, want_expert, want_in = ref_torch.layout(mine["idx"], E, world)
    assert per_rdma is None
    same("num_tokens_per_rank", rank, per_rank, want_rank)
    same("num_tokens_per_expert", rank, per_expert, want_expert)
    same("is_token_in_rank", rank, in_rank, want_in)

    for alignment in (1, 32):
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            mine["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=mine["idx"], topk_weights=mine["w"], expert_alignment=alignment)
        want = ref_torch.dispatch(everyone, rank, E, world, alignment)
        assert event.event is None and isinstance(counts, list)
        same("recv_x", rank, recv_x, want["x"])
        same("recv_topk_idx", rank, recv_idx, want["idx"])
        same("recv_topk_weights", rank, recv_w, want["w"])
        same("recv_src_idx", rank, handle[3], want["src"])
        assert counts == want["per_expert"], f"rank {rank}: per-expert counts {counts}, expected {want['per_expert']}"

    # The outputs are the binding's own tensors: a later dispatch must not change them.
    kept = recv_x.clone()
    buffer.dispatch(mine["x"] * 2, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert, topk_idx=mine["idx"], topk_weights=mine["w"])
    same("recv_x after another dispatch", rank, recv_x, kept)

    # Combine: each rank's "expert" scales its rows by (rank + 1); weights are summed back; two biases.
    y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
    g = generator(seed + 1, rank)
    bias0, bias1 = (tokens(g, mine["x"].size(0), HIDDEN).cuda() for _ in range(2))
    for bias in (None, bias0, (bias0, bias1)):
        b0, b1 = (bias, None) if not isinstance(bias, tuple) else bias
        out, out_w, event = buffer.combine(y, handle, topk_weights=recv_w, bias=bias)
        same("combined_x", rank, out, ref_torch.combine(mine["x"], in_rank, lambda d: d + 1, b0, b1))
        same("combined_topk_weights", rank, out_w, torch.where(mine["idx"] >= 0, mine["w"], 0.0))
    out, out_w, _ = buffer.combine(y, handle)
    assert out_w is None
    del handle
    buffer.destroy()


def _fp8_worker(rank, world, group, seed):
    E = experts_for(world)
    everyone = [inputs_of(seed, s, world, fp8=True) for s in range(world)]
    mine = everyone[rank]
    buffer = make_buffer(group, world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], E)
    want = ref_torch.dispatch(everyone, rank, E, world)
    for scales in (mine["scales"], mine["scales"].t().contiguous().t()):  # row- and column-major scales
        (recv_x, recv_scales), recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            (mine["x"], scales), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=mine["idx"], topk_weights=mine["w"])
        same("recv_x (fp8)", rank, recv_x, want["x"])
        same("recv_x_scales", rank, recv_scales, want["scales"])
        same("recv_topk_idx", rank, recv_idx, want["idx"])
        assert counts == want["per_expert"]
        # A cached dispatch resends new FP8 rows with the same routing.
        x2 = (mine["x"].float() * 0.5).to(torch.float8_e4m3fn)
        (recv2, scales2), none_idx, none_w, none_counts, none_handle, _ = buffer.dispatch((x2, scales), handle=handle)
        assert none_idx is none_w is none_counts is none_handle is None
        want2 = ref_torch.dispatch([{**inp, "x": (inp["x"].float() * 0.5).to(torch.float8_e4m3fn)}
                                    for inp in everyone], rank, E, world)
        same("cached recv_x (fp8)", rank, recv2, want2["x"])
        same("cached recv_x_scales", rank, scales2, want["scales"])
    del handle
    buffer.destroy()


def _worst_tokens_worker(rank, world, group, seed):
    E = experts_for(world)
    everyone = [inputs_of(seed, s, world) for s in range(world)]
    mine = everyone[rank]
    buffer = make_buffer(group, world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], E)
    worst = sum(inp["x"].size(0) for inp in everyone)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        mine["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=mine["idx"], topk_weights=mine["w"], num_worst_tokens=worst)
    want = ref_torch.dispatch(everyone, rank, E, world)
    n = want["x"].size(0)
    assert counts == [] and recv_x.size(0) == worst
    same("recv_x[:Nr]", rank, recv_x[:n], want["x"])
    same("recv_topk_idx[:Nr]", rank, recv_idx[:n], want["idx"])
    assert (recv_idx[n:] == -1).all(), f"rank {rank}: recv_topk_idx past the {n} received rows is not -1"
    assert (handle[3][n:] == -1).all(), f"rank {rank}: recv_src_idx past the received rows is not -1"
    out, _, _ = buffer.combine(recv_x, handle)
    same("combined_x (worst tokens)", rank, out, ref_torch.combine(mine["x"], in_rank, lambda d: 1))
    # Cached dispatch with the worst-token handle.
    recv2, _, _, _, _, _ = buffer.dispatch(mine["x"], handle=handle)
    same("cached recv_x[:Nr]", rank, recv2[:n], want["x"])
    del handle
    buffer.destroy()


def _events_worker(rank, world, group, seed):
    import epcomm as deep_ep

    E = experts_for(world)
    everyone = [inputs_of(seed, s, world) for s in range(world)]
    mine = everyone[rank]
    buffer = make_buffer(group, world)
    side = new_stream()
    with torch.cuda.stream(side):  # the caller's stream is not the default one
        previous = deep_ep.Buffer.capture()
        per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(
            mine["idx"], E, previous_event=previous, async_finish=True, allocate_on_comm_stream=True)
        assert isinstance(event, deep_ep.EventOverlap) and event.event is not None
        event.current_stream_wait()
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            mine["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=mine["idx"], topk_weights=mine["w"], previous_event=event, async_finish=True)
        with event:
            pass  # compute here would overlap the dispatch; leaving the block makes the stream wait
        out, _, event = buffer.combine(recv_x, handle, async_finish=True)
        event.current_stream_wait()
        torch.cuda.current_stream().synchronize()
    want = ref_torch.dispatch(everyone, rank, E, world)
    same("recv_x (async)", rank, recv_x, want["x"])
    same("combined_x (async)", rank, out, ref_torch.combine(mine["x"], in_rank, lambda d: 1))
    assert buffer.get_comm_stream().cuda_stream != torch.cuda.current_stream().cuda_stream
    # Handles dropped by the garbage collector are released at the next call; destroy needs none left.
    for _ in range(3):
        buffer.dispatch(mine["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=mine["idx"])
    buffer.synchronize()
    del handle
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_dispatch_layout(mine["idx"], E)


def zero_token_inputs(seed, world, fp8):
    """Rank 0 has no tokens (fresh empty tensors: data pointer 0), and no token goes to the last rank's experts
    (it receives no rows)."""
    L = experts_for(world) // world
    everyone = []
    for s in range(world):
        inp = inputs_of(seed, s, world, fp8=fp8)
        inp["idx"] = torch.where(inp["idx"] // L == world - 1, -1, inp["idx"])
        if s == 0:
            inp = {k: torch.empty((0,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in inp.items()}
        everyone.append(inp)
    return everyone


def _zero_tokens_worker(rank, world, group, seed):
    """A rank with no tokens and a rank that receives no rows take part like the others: topk outputs, FP8
    scales, combined weights (an empty tensor is given, not absent, though its data pointer is 0)."""
    E = experts_for(world)
    buffer = make_buffer(group, world)
    for fp8 in (False, True):
        everyone = zero_token_inputs(seed, world, fp8)
        mine = everyone[rank]
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], E)
        recv, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            (mine["x"], mine["scales"]) if fp8 else mine["x"], num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=mine["idx"], topk_weights=mine["w"])
        want = ref_torch.dispatch(everyone, rank, E, world)
        recv_x = recv[0] if fp8 else recv
        assert recv_idx is not None and recv_w is not None, f"rank {rank}: no topk outputs"
        assert rank != world - 1 or recv_x.size(0) == 0
        same("recv_x", rank, recv_x, want["x"])
        if fp8:
            same("recv_x_scales", rank, recv[1], want["scales"])
        same("recv_topk_idx", rank, recv_idx, want["idx"])
        same("recv_topk_weights", rank, recv_w, want["w"])
        assert counts == want["per_expert"]
        if not fp8:
            out, out_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
            same("combined_x", rank, out, ref_torch.combine(mine["x"], in_rank, lambda d: 1))
            same("combined_topk_weights", rank, out_w, torch.where(mine["idx"] >= 0, mine["w"], 0.0))
        del handle
    buffer.destroy()


@pytest.mark.parametrize("world", world_sizes())
def test_layout_dispatch_combine_bf16(world):
    run_ranks(_bf16_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_dispatch_fp8_and_cached(world):
    run_ranks(_fp8_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_worst_token_mode(world):
    run_ranks(_worst_tokens_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_events_streams_and_handle_lifetime(world):
    run_ranks(_events_worker, world, SEED)


@pytest.mark.parametrize("world", world_sizes())
def test_rank_without_tokens_or_rows(world):
    run_ranks(_zero_tokens_worker, world, SEED)
