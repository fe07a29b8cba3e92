"""Normal and low-latency mode on one Buffer (issue 4, item 5): a normal dispatch and combine, then
clean_low_latency_buffer and a low-latency dispatch and combine, then normal mode again, and both modes once more
without clean_low_latency_buffer, each checked against ref_torch; a low-latency handle from before a normal call is refused as stale; get_local_buffer_tensor's views.
And a Buffer without explicitly_destroy: destroy() refused as in DeepEP, released by its destructor."""
import os
import random
import warnings

import pytest

from dist_helpers import needs_gpus, run_ranks, torch, world_sizes
import ref_torch
import test_gpu_low_latency as ll
import test_gpu_normal as normal

pytestmark = needs_gpus
SEED = int(os.environ.get("EPCOMM_TEST_SEED", random.randrange(1 << 20)))


def normal_round(rank, world, buffer, everyone, what):
    mine, E = everyone[rank], normal.experts_for(world)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], E)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        mine["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=mine["idx"], topk_weights=mine["w"])
    want = ref_torch.dispatch(everyone, rank, E, world)
    normal.same(f"{what}: recv_x", rank, recv_x, want["x"])
    normal.same(f"{what}: recv_topk_idx", rank, recv_idx, want["idx"])
    y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
    out, _, _ = buffer.combine(y, handle, topk_weights=recv_w)
    normal.same(f"{what}: combined_x", rank, out, ref_torch.combine(mine["x"], in_rank, lambda d: d + 1, None, None))


def low_latency_round(rank, world, buffer, everyone, what):
    mine, E = everyone[rank], ll.experts_for(world)
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(mine["x"], mine["idx"], ll.T, E, use_fp8=False)
    ll.check_dispatch(rank, everyone, world, recv_x, count, handle)
    y = ll.expert_outputs(rank, recv_x, count, world)
    out, _, _ = buffer.low_latency_combine(y, mine["idx"], mine["w"], handle)
    ll.same(f"{what}: low-latency combined_x", rank, out, ref_torch.low_latency_combine(mine["x"], mine["idx"],
                                                                                      mine["w"]))
    return handle, y


def _both_modes_worker(rank, world, group, seed):
    import epcomm as deep_ep

    normal_in = [normal.inputs_of(seed, s, world) for s in range(world)]
    ll_in = [ll.ll_inputs(seed + 1, s, world) for s in range(world)]
    max_tokens = 300 + 57 * (world - 1)
    E = ll.experts_for(world)
    buffer = deep_ep.Buffer(group, deep_ep.Buffer.get_normal_buffer_size_hint(max_tokens, normal.HIDDEN, world,
                                                                             normal.TOPK),
                            deep_ep.Buffer.get_low_latency_rdma_size_hint(ll.T, ll.HIDDEN, world, E),
                            low_latency_mode=True, num_qps_per_rank=E // world, explicitly_destroy=True)
    normal_round(rank, world, buffer, normal_in, "normal first")
    # get_local_buffer_tensor: views of this rank's buffer (the same memory at any dtype and shape), range-checked.
    view = buffer.get_local_buffer_tensor(torch.bfloat16, torch.Size((4, 8)), offset=256)
    assert view.shape == (4, 8) and view.dtype == torch.bfloat16 and view.is_cuda
    view.fill_(rank + 1)
    raw = buffer.get_local_buffer_tensor(torch.uint8)
    assert raw.data_ptr() + 256 == view.data_ptr()
    assert torch.equal(raw[256:256 + 64].view(torch.bfloat16).view(4, 8), view)
    with pytest.raises(ValueError, match="offset"):
        buffer.get_local_buffer_tensor(torch.int32, offset=2)
    with pytest.raises(ValueError, match="size"):
        buffer.get_local_buffer_tensor(torch.uint8, torch.Size((raw.numel() + 1,)))
    buffer.clean_low_latency_buffer(ll.T, ll.HIDDEN, E)
    handle, y = low_latency_round(rank, world, buffer, ll_in, "after normal")
    normal_round(rank, world, buffer, normal_in, "normal after low-latency")
    with pytest.raises(RuntimeError, match="stale"):  # its routing was in the buffer the normal call reused
        buffer.low_latency_combine(y, ll_in[rank]["idx"], ll_in[rank]["w"], handle)
    buffer.clean_low_latency_buffer(ll.T, ll.HIDDEN, E)
    low_latency_round(rank, world, buffer, ll_in, "low-latency again")
    # Without clean_low_latency_buffer between the modes: the first call of each mode starts with the barrier
    # that keeps a rank from writing into a peer still reading the other mode's rows.
    normal_round(rank, world, buffer, normal_in, "normal right after low-latency")
    low_latency_round(rank, world, buffer, ll_in, "low-latency right after normal")
    # This rank's stream only: with ranks as threads sharing a GPU, a device-wide synchronize may also wait for a
    # rank that already entered destroy, whose handshake waits for this rank (until it times out).
    torch.cuda.current_stream().synchronize()
    buffer.destroy()


@pytest.mark.parametrize("world", world_sizes())
def test_normal_and_low_latency_on_one_buffer(world):
    run_ranks(_both_modes_worker, world, SEED)


def _destructor_worker(rank, world, group, seed):
    import epcomm as deep_ep

    normal_in = [normal.inputs_of(seed, s, world) for s in range(world)]
    max_tokens = 300 + 57 * (world - 1)
    for i in range(2):  # the second group is made after the first was released
        buffer = deep_ep.Buffer(group, deep_ep.Buffer.get_normal_buffer_size_hint(max_tokens, normal.HIDDEN, world,
                                                                                 normal.TOPK))
        normal_round(rank, world, buffer, normal_in, f"buffer {i}")
        with pytest.raises(RuntimeError, match="explicitly_destroy"):
            buffer.destroy()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            buffer.__del__()  # what garbage collection runs (collective: every rank drops its Buffer here)
        assert buffer._group is None, "the destructor did not release the group"
        assert not seen, f"rank {rank}: the destructor warned: {[str(w.message) for w in seen]}"
        del buffer


@pytest.mark.parametrize("world", world_sizes())
def test_buffer_released_by_its_destructor(world):
    run_ranks(_destructor_worker, world, SEED)
