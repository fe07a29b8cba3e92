"""Multi-process GPU tests: one process per GPU (spawned, so no CUDA state is inherited), a torch NCCL
process group over TCP on localhost, and inputs drawn from (seed, rank) on the CPU so that every rank can
rebuild every other rank's inputs and compute its expected results itself."""
import os
import socket
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# Multicast stays off on the lent machines (shared/GPU.md); children inherit the environment.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def num_gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_sizes():
    """EPCOMM_TEST_WORLD (e.g. "2,4"; "1" runs the cases as one rank on one GPU, a smoke test), else every GPU
    here (2 to 8)."""
    env = os.environ.get("EPCOMM_TEST_WORLD")
    if env:
        return [int(w) for w in env.split(",") if int(w) <= num_gpus()]
    return [min(num_gpus(), 8)] if num_gpus() >= 2 else []


needs_gpus = pytest.mark.skipif(not world_sizes(), reason="needs at least 2 CUDA GPUs (or EPCOMM_TEST_WORLD=1)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, worker, args, errors):
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        try:
            worker(rank, world, dist.group.WORLD, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_ranks(worker, world, *args):
    """Runs worker(rank, world, group, *args) on `world` GPUs; fails with every rank's traceback (and the
    arguments, which hold the seed: rerun with EPCOMM_TEST_SEED=<seed> to reproduce)."""
    os.environ.update(SAFE_ENV)
    os.environ.setdefault("EPCOMM_TIMEOUT_MS", "20000")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, _free_port(), worker, args, errors), nprocs=world, join=True,
                           start_method="spawn")
    except Exception as e:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail(f"{worker.__name__}{args} on {world} GPUs failed:\n" + ("\n".join(messages) or str(e)),
                    pytrace=False)


def generator(seed, rank):
    g = torch.Generator()
    g.manual_seed(seed * 1000 + rank)
    return g


def routing(g, num_tokens, num_experts, num_topk, drop=0.1, idle_tokens=2):
    """topk_idx [N, K] int64 of distinct experts with some -1 entries and `idle_tokens` that go nowhere,
    and topk_weights [N, K] float32 with few mantissa bits (so weighted sums are exact in float32)."""
    scores = torch.rand((num_tokens, num_experts), generator=g)
    idx = scores.topk(num_topk, dim=1).indices
    idx[torch.rand((num_tokens, num_topk), generator=g) < drop] = -1
    idx[:idle_tokens] = -1
    weights = (torch.rand((num_tokens, num_topk), generator=g) * 4).to(torch.bfloat16).float()
    return idx.to(torch.int64), weights


def tokens(g, num_tokens, hidden):
    return torch.randn((num_tokens, hidden), generator=g).to(torch.bfloat16)
