"""The multi-rank harness itself: a rank that fails must fail the case, with its message, both with ranks as
processes and as threads (EPCOMM_TEST_LOCAL=1), so that a passing GPU test means every rank passed."""
import pytest

from dist_helpers import needs_gpus, run_ranks, world_sizes

pytestmark = needs_gpus


def _last_rank_fails(rank, world, group, token):
    assert group.rank() == rank and group.size() == world
    if rank == world - 1:
        raise AssertionError(f"planted failure {token} on rank {rank}")


@pytest.mark.parametrize("world", world_sizes())
def test_a_failing_rank_fails_the_case(world):
    with pytest.raises(pytest.fail.Exception, match=f"planted failure 7301 on rank {world - 1}"):
        run_ranks(_last_rank_fails, world, 7301)


def _all_ranks_pass(rank, world, group, token):
    assert group.rank() == rank and group.size() == world


@pytest.mark.parametrize("world", world_sizes())
def test_ranks_that_all_pass_pass_the_case(world):
    run_ranks(_all_ranks_pass, world, 7302)
