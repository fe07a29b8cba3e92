"""epcomm.LocalGroup (ranks as threads of one process), without a GPU: the all-gather its members do for
Buffer, the timeout naming missing ranks, argument checks, and the unique-id exchange over it."""
import threading

import pytest

import epcomm
from epcomm import bootstrap


def run_threads(num_ranks, body):
    """body(rank) on num_ranks threads; returns their results (or the exceptions they raised) by rank."""
    results = [None] * num_ranks

    def run(rank):
        try:
            results[rank] = body(rank)
        except BaseException as e:  # returned to the test, which checks it
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank thread did not finish"
    return results


def test_members_gather_every_ranks_value_in_rank_order_round_after_round():
    group = epcomm.LocalGroup(4)

    def body(rank):
        member = group.member(rank)
        assert (member.rank(), member.size()) == (rank, 4)
        return [member.all_gather_object(f"r{rank}x{i}") for i in range(5)]

    for got in run_threads(4, body):
        assert got == [[f"r{r}x{i}" for r in range(4)] for i in range(5)]
    assert group._rounds == {} and group._readers == {}  # finished rounds are forgotten


def test_a_missing_rank_is_named_after_the_timeout():
    group = epcomm.LocalGroup(3, timeout_s=0.2)
    results = run_threads(2, lambda rank: group.member(rank).all_gather_object(rank))
    for rank, e in enumerate(results):
        assert isinstance(e, TimeoutError), e
        assert f"rank {rank} waited" in str(e) and "ranks [2]" in str(e)


@pytest.mark.parametrize("args, match", [((0,), "num_ranks"), ((True,), "num_ranks"), ((2.0,), "num_ranks"),
                                         ((2, 0), "timeout_s")])
def test_bad_group_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        epcomm.LocalGroup(*args)


@pytest.mark.parametrize("rank", [-1, 2, "0", None])
def test_a_rank_outside_the_group_is_refused(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        epcomm.LocalGroup(2).member(rank)


def test_one_member_used_twice_in_an_exchange_is_an_error():
    group = epcomm.LocalGroup(2, timeout_s=0.2)
    a, b = group.member(0), group.member(0)
    results = run_threads(2, lambda i: (a, b)[i].all_gather_object(i))
    errors = [e for e in results if isinstance(e, RuntimeError) and "twice" in str(e)]
    assert len(errors) == 1, results


def test_every_rank_gets_rank_zeros_local_id(capi):
    group = epcomm.LocalGroup(3)
    results = run_threads(3, lambda rank: bootstrap.exchange_unique_id(group.member(rank)))
    ids = {uid for _, _, uid in results}
    assert [(rank, size) for rank, size, _ in results] == [(0, 3), (1, 3), (2, 3)]
    assert len(ids) == 1 and len(ids.pop()) == 128
    assert bootstrap.is_local(group.member(0)) and not bootstrap.is_local(None)


def test_local_ids_differ_from_each_other(capi):
    assert capi.new_unique_id(local=True) != capi.new_unique_id(local=True)
