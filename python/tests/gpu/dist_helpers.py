"""Multi-rank GPU tests. By default one process per GPU (spawned, so no CUDA state is inherited) in a torch
NCCL process group over TCP on localhost, like DeepEP's own tests. With EPCOMM_TEST_LOCAL=1 the ranks are
threads of this process in an epcomm.LocalGroup instead, any number per GPU: ranks that share a GPU each run
in a green context of their own (an equal share of its SMs, made by the C tests' helper
libepcomm_test_green.so), so a one-GPU machine runs the multi-rank cases (correctness only: rows then move
through one GPU's memory, not NVLink). Inputs are drawn from (seed, rank) on the CPU so that every rank can
rebuild every other rank's inputs and compute its expected results itself."""
import ctypes
import os
import socket
import threading
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# Multicast stays off on the lent machines (shared/GPU.md); children inherit the environment.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
LOCAL = os.environ.get("EPCOMM_TEST_LOCAL", "") not in ("", "0")
LOCAL_TIMEOUT_S = float(os.environ.get("EPCOMM_TEST_LOCAL_TIMEOUT_S", "300"))


def num_gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_sizes():
    """EPCOMM_TEST_WORLD (e.g. "2,4"; "1" runs the cases as one rank on one GPU, a smoke test), else every GPU
    here (2 to 8). With EPCOMM_TEST_LOCAL=1 the worlds may exceed the GPUs (default "2,3,4": an odd one too,
    which found a race that 2 and 4 did not)."""
    if LOCAL:
        worlds = [int(w) for w in os.environ.get("EPCOMM_TEST_WORLD", "2,3,4").split(",")]
        return worlds if num_gpus() >= 1 else []
    env = os.environ.get("EPCOMM_TEST_WORLD")
    if env:
        return [int(w) for w in env.split(",") if int(w) <= num_gpus()]
    return [min(num_gpus(), 8)] if num_gpus() >= 2 else []


needs_gpus = pytest.mark.skipif(not world_sizes(), reason="needs at least 2 CUDA GPUs (or EPCOMM_TEST_WORLD=1, "
                                                          "or one GPU and EPCOMM_TEST_LOCAL=1)")


def new_stream():
    """A side stream for the calling rank: in thread mode one of the thread's own (green) context."""
    if LOCAL:
        from epcomm import _torch

        return _torch.new_context_stream(torch.cuda.current_device())
    return torch.cuda.Stream()


def graph_capture_kwargs():
    """torch.cuda.graph arguments: in thread mode a capture stream of the rank's context, and thread-local
    capture (a global one would forbid the other ranks' allocations while it lasts)."""
    return {"stream": new_stream(), "capture_error_mode": "thread_local"} if LOCAL else {}


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


def _fail(worker, world, args, messages, fallback=""):
    where = f"{world} ranks in one process" if LOCAL else f"{world} GPUs"
    pytest.fail(f"{worker.__name__}{args} on {where} failed:\n" + ("\n".join(messages) or fallback), pytrace=False)


def run_ranks(worker, world, *args):
    """Runs worker(rank, world, group, *args) on `world` ranks; fails with every rank's traceback (and the
    arguments, which hold the seed: rerun with EPCOMM_TEST_SEED=<seed> to reproduce)."""
    os.environ.update(SAFE_ENV)
    os.environ.setdefault("EPCOMM_TIMEOUT_MS", "20000")
    if LOCAL:
        return _run_threads(worker, world, args)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, _free_port(), worker, args, errors), nprocs=world, join=True,
                           start_method="spawn")
    except Exception as e:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        _fail(worker, world, args, messages, str(e))


# ---- ranks as threads (EPCOMM_TEST_LOCAL=1) ----

_rank_contexts = {}  # world -> each rank's CUcontext (None: the rank has its GPU to itself)


def _driver():
    from epcomm import _torch

    return _torch.libcuda()


def _green_library():
    path = os.environ.get("EPCOMM_TEST_GREEN_LIB")
    if not path:  # next to the library under test: <build>/src/libepcomm.so -> <build>/tests/gpu/
        build = os.path.dirname(os.path.dirname(os.environ.get("EPCOMM_LIBRARY", "")))
        path = os.path.join(build, "tests", "gpu", "libepcomm_test_green.so")
    if not os.path.exists(path):
        pytest.fail(f"thread mode needs {path} (built with the C GPU tests; or set EPCOMM_TEST_GREEN_LIB)",
                    pytrace=False)
    lib = ctypes.CDLL(path)
    lib.ep_test_green_split.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_uint)]
    return lib


def rank_contexts(world):
    """Made once per world size: rank r drives GPU r % GPUs; ranks that share a GPU get equal green contexts."""
    if world not in _rank_contexts:
        torch.cuda.init()
        gpus = num_gpus()
        per_gpu = -(-world // gpus)
        contexts = [None] * world
        if per_gpu > 1:
            lib = _green_library()
            for d in range(gpus):
                made, each = (ctypes.c_void_p * per_gpu)(), ctypes.c_uint()
                if lib.ep_test_green_split(d, per_gpu, made, ctypes.byref(each)) != 0:
                    pytest.fail(f"could not split GPU {d} into {per_gpu} green contexts", pytrace=False)
                for i, r in enumerate(range(d, world, gpus)):
                    contexts[r] = made[i]
                print(f"({world} ranks: GPU {d} split into {per_gpu} green contexts of {each.value} SMs)", end=" ")
        _rank_contexts[world] = contexts
    return _rank_contexts[world]


def _rank_thread(rank, world, group, context, worker, args, errors):
    try:
        torch.cuda.set_device(rank % num_gpus())  # before the green context: set_device makes the primary current
        if context is not None and _driver().cuCtxSetCurrent(ctypes.c_void_p(context)) != 0:
            raise RuntimeError(f"rank {rank}: cuCtxSetCurrent of its green context failed")
        stream = new_stream()
        with torch.cuda.stream(stream):
            worker(rank, world, group.member(rank), *args)
        stream.synchronize()
        current = ctypes.c_void_p()
        if context is not None and (_driver().cuCtxGetCurrent(ctypes.byref(current)) != 0 or
                                    current.value != context):
            raise RuntimeError(f"rank {rank}: the thread's CUDA context changed during the test (was its green "
                               f"context {context:#x}, now {current.value or 0:#x}): the rank did not run on its SMs")
    except BaseException:
        errors[rank] = f"rank {rank}:\n{traceback.format_exc()}"


def _run_threads(worker, world, args):
    import epcomm

    contexts = rank_contexts(world)
    group = epcomm.LocalGroup(world, timeout_s=min(60.0, LOCAL_TIMEOUT_S))
    errors = [None] * world
    threads = [threading.Thread(target=_rank_thread, args=(r, world, group, contexts[r], worker, args, errors),
                                name=f"rank{r}", daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + LOCAL_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    messages = [e for e in errors if e is not None]
    if hung:
        messages.append(f"ranks {hung} did not finish within {LOCAL_TIMEOUT_S:g} s (hang; their threads are left)")
    if messages:
        _fail(worker, world, args, messages)


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
