"""The package's torch-free parts: lazy imports, Config and the size hints, the constructor's option policy,
the handle book and the unique-id exchange (with a stand-in for an mpi4py communicator)."""
import gc
import importlib.util

import pytest

import epcomm
from epcomm import _capi, bootstrap, config
from epcomm._handles import HandleBook

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_import_needs_no_torch_and_exports_deepeps_names():
    assert set(["Buffer", "Config", "EventOverlap"]) <= set(epcomm.__all__)
    assert epcomm.Config is config.Config
    with pytest.raises(AttributeError):
        epcomm.no_such_name


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed here")
def test_torch_names_say_that_they_need_torch():
    with pytest.raises(ImportError, match="PyTorch"):
        epcomm.Buffer


def test_config_keeps_deepeps_arguments_and_defaults():
    c = epcomm.Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 256)
    c = epcomm.Config(24, 8, 512, 16, 128)
    assert (c.num_sms, c.num_max_nvl_chunked_recv_tokens, c.num_max_rdma_chunked_send_tokens) == (24, 512, 16)
    with pytest.raises(ValueError, match="num_sms"):
        epcomm.Config(0)


def test_nvl_hint_is_the_normal_buffer_size_for_the_largest_dispatch(capi, monkeypatch):
    monkeypatch.delenv("EPCOMM_MAX_TOKENS_PER_RANK", raising=False)
    hidden_bytes = 7168 * 2
    want = capi.normal_buffer_bytes(8, config.DEFAULT_MAX_TOKENS_PER_RANK, 7168, 2, 0, config.MAX_TOPK_NORMAL)
    assert epcomm.Config().get_nvl_buffer_size_hint(hidden_bytes, 8) == want
    assert epcomm.Config(num_max_tokens_per_rank=512).get_nvl_buffer_size_hint(hidden_bytes, 4) == \
        capi.normal_buffer_bytes(4, 512, 7168, 2, 0, config.MAX_TOPK_NORMAL)
    monkeypatch.setenv("EPCOMM_MAX_TOKENS_PER_RANK", "256")
    assert epcomm.Config().get_nvl_buffer_size_hint(hidden_bytes, 2) == \
        capi.normal_buffer_bytes(2, 256, 7168, 2, 0, config.MAX_TOPK_NORMAL)
    monkeypatch.setenv("EPCOMM_MAX_TOKENS_PER_RANK", "many")
    with pytest.raises(ValueError, match="EPCOMM_MAX_TOKENS_PER_RANK"):
        epcomm.Config().get_nvl_buffer_size_hint(hidden_bytes, 2)


def test_rdma_hint_is_zero_in_one_nvlink_domain_and_refused_beyond(capi):
    assert epcomm.Config().get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(NotImplementedError, match="scale-out"):
        epcomm.Config().get_rdma_buffer_size_hint(7168 * 2, 16)


def test_low_latency_hint_covers_any_topk(capi):
    assert config.low_latency_buffer_size_hint(128, 7168, 8, 256) == capi.low_latency_buffer_bytes(8, 128, 7168, 16, 256)
    assert config.low_latency_buffer_size_hint(128, 7168, 8, 256, num_topk=8) < \
        config.low_latency_buffer_size_hint(128, 7168, 8, 256)
    with pytest.raises(ValueError, match="invalid sizes"):
        config.low_latency_buffer_size_hint(128, 7168, 8, 4)


def test_constructor_policy_accepts_deepeps_defaults_and_a_low_latency_rdma_size():
    assert config.symmetric_buffer_bytes(1 << 20) == 1 << 20
    assert config.symmetric_buffer_bytes(1 << 20, 3 << 20, low_latency_mode=True) == 3 << 20
    assert config.symmetric_buffer_bytes(0, 0) == 0


@pytest.mark.parametrize("kwargs,word", [
    (dict(num_rdma_bytes=1 << 20), "num_rdma_bytes"),
    (dict(allow_nvlink_for_low_latency_mode=False), "allow_nvlink_for_low_latency_mode"),
    (dict(allow_mnnvl=True), "allow_mnnvl"),
    (dict(use_fabric=True), "use_fabric"),
    (dict(enable_shrink=True), "enable_shrink"),
    (dict(num_qps_per_rank=0), "num_qps_per_rank"),
    (dict(num_nvl_bytes=-1), "num_nvl_bytes"),
])
def test_constructor_policy_refuses_what_epcomm_lacks_naming_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        config.symmetric_buffer_bytes(**{"num_nvl_bytes": 1 << 20, **kwargs})


class Releases:
    def __init__(self):
        self.calls = []

    def __call__(self, kind, ptr):
        self.calls.append((kind, ptr))


def test_handles_without_device_work_are_released_when_dropped():
    rel = Releases()
    book = HandleBook(rel, needs_device=lambda kind: kind == "ht")
    h = book.adopt(0x10, "ll")
    assert h.require() == 0x10
    del h
    gc.collect()
    assert rel.calls == [("ll", 0x10)] and book.pending() == 0


def test_handles_with_device_work_wait_for_collect():
    rel = Releases()
    book = HandleBook(rel, needs_device=lambda kind: kind == "ht")
    h = book.adopt(0x20, "ht")
    del h
    gc.collect()
    assert rel.calls == [] and book.pending() == 1
    assert book.collect() is None
    assert rel.calls == [("ht", 0x20)] and book.pending() == 0


def test_release_all_frees_live_and_queued_handles_and_disarms_the_objects():
    rel = Releases()
    book = HandleBook(rel, needs_device=lambda kind: kind == "ht")
    live = [book.adopt(1, "ht"), book.adopt(2, "ll")]
    dropped = book.adopt(3, "ht")
    del dropped
    gc.collect()
    assert book.release_all() is None
    assert sorted(rel.calls) == [("ht", 1), ("ht", 3), ("ll", 2)]
    for h in live:
        with pytest.raises(RuntimeError, match="destroyed"):
            h.require()
    del live
    gc.collect()
    assert len(rel.calls) == 3  # nothing released twice


def test_a_failing_release_is_reported_after_the_others_ran():
    calls = []

    def release(kind, ptr):
        calls.append(ptr)
        if ptr == 1:
            raise RuntimeError("boom")

    book = HandleBook(release, needs_device=lambda kind: True)
    a, b = book.adopt(1, "ht"), book.adopt(2, "ht")
    del a, b
    gc.collect()
    error = book.collect()
    assert isinstance(error, RuntimeError) and sorted(calls) == [1, 2]


class FakeMpiComm:
    """The three calls the binding makes on an mpi4py communicator."""

    def __init__(self, rank, size, root_payload=None):
        self.rank, self.size, self.root_payload = rank, size, root_payload

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        assert root == 0
        return obj if self.rank == 0 else self.root_payload


def test_rank_zero_makes_the_id_and_others_receive_it(capi):
    rank, size, uid = bootstrap.exchange_unique_id(comm=FakeMpiComm(0, 4))
    assert (rank, size, len(uid)) == (0, 4, 128)
    rank, size, got = bootstrap.exchange_unique_id(comm=FakeMpiComm(3, 4, root_payload=uid))
    assert (rank, size, got) == (3, 4, uid)


def test_a_bad_id_from_rank_zero_is_a_clear_error():
    with pytest.raises(RuntimeError, match="128 bytes"):
        bootstrap.exchange_unique_id(comm=FakeMpiComm(1, 2, root_payload="nonsense"))


def test_a_group_or_a_communicator_is_required():
    with pytest.raises(ValueError, match="'group'.*'comm'"):
        bootstrap.exchange_unique_id()


def test_group_creation_without_a_gpu_fails_cleanly_after_the_exchange(capi):
    """Everything up to the device: exchange, config, ep_group_create, which reports the missing GPU."""
    import ctypes

    _, size, uid = bootstrap.exchange_unique_id(comm=FakeMpiComm(0, 1))
    cfg = capi.ep_group_config_t(num_nvl_bytes=1 << 20)
    group = ctypes.c_void_p()
    status = capi.lib().ep_group_create(ctypes.byref(capi.unique_id_from_bytes(uid)), size, 0, 0, ctypes.byref(cfg),
                                        ctypes.byref(group))
    if status == 0:  # a GPU is there after all: nothing to check here
        capi.check(capi.lib().ep_group_destroy(group))
        pytest.skip("a CUDA device is present")
    with pytest.raises(_capi.EpcommError) as info:
        capi.check(status)
    assert info.value.status in (capi.Status.EP_ERROR_UNSUPPORTED, capi.Status.EP_ERROR_CUDA,
                                 capi.Status.EP_ERROR_VERSION_MISMATCH)
    assert group.value is None
