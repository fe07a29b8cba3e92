"""In-process groups for the Python binding: the ranks are threads of this process (the C API's
ep_get_local_unique_id), with no torch.distributed and no NCCL. Several ranks may share one GPU when each
thread runs in its own green context (an SM partition), which is how the GPU tests run many ranks on one GPU.

    group = epcomm.LocalGroup(4)               # made once, shared by the four threads
    buffer = epcomm.Buffer(group.member(rank), num_nvl_bytes=...)   # on rank `rank`'s thread

Needs no torch (the host tests use it without)."""
import threading
import time


class LocalGroup:
    """The meeting point of `num_ranks` threads. Each thread takes its own `member(rank)`, a stand-in for a
    torch ProcessGroup that `Buffer` accepts. Every exchange waits at most `timeout_s` seconds for the other
    ranks, then raises TimeoutError naming the ranks that did not arrive."""

    def __init__(self, num_ranks, timeout_s=60.0):
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"LocalGroup: num_ranks must be a positive int, got {num_ranks!r}")
        if not timeout_s > 0:
            raise ValueError(f"LocalGroup: timeout_s must be positive, got {timeout_s!r}")
        self.num_ranks = num_ranks
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._rounds = {}  # round number -> {rank: value}
        self._readers = {}  # round number -> ranks that have taken the round's result

    def member(self, rank):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"LocalGroup.member: rank must be an int in [0, {self.num_ranks}), got {rank!r}")
        return LocalGroupMember(self, rank)

    def _all_gather(self, rank, round_no, value):
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            slots = self._rounds.setdefault(round_no, {})
            if rank in slots:
                raise RuntimeError(f"LocalGroup: rank {rank} joined exchange #{round_no} twice (one member per "
                                   "thread, each used by its own thread only)")
            slots[rank] = value
            self._cond.notify_all()
            while len(slots) < self.num_ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in range(self.num_ranks) if r not in slots]
                    raise TimeoutError(f"LocalGroup: rank {rank} waited {self.timeout_s:g} s in exchange "
                                       f"#{round_no} for ranks {missing}, which did not arrive")
                self._cond.wait(left)
            result = [slots[r] for r in range(self.num_ranks)]
            self._readers[round_no] = self._readers.get(round_no, 0) + 1
            if self._readers[round_no] == self.num_ranks:  # everyone has it: forget the round
                del self._rounds[round_no], self._readers[round_no]
        return result


class LocalGroupMember:
    """One rank's view of a LocalGroup: rank(), size() and all_gather_object(), as Buffer uses them."""

    def __init__(self, group, rank):
        self.group = group
        self._rank = rank
        self._round = 0

    def rank(self):
        return self._rank

    def size(self):
        return self.group.num_ranks

    def all_gather_object(self, value):
        """Every rank's `value`, in rank order (collective over the group's threads)."""
        self._round += 1
        return self.group._all_gather(self._rank, self._round, value)

    def __repr__(self):
        return f"LocalGroupMember(rank={self._rank}, size={self.size()})"
