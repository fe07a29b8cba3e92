"""Handing the group's unique id from rank 0 to every rank of a torch ProcessGroup, an mpi4py communicator or
an epcomm LocalGroup member (ranks as threads). torch is imported only when a ProcessGroup is given, so the
other paths (and their tests) need no torch."""
from . import _capi
from .local_group import LocalGroupMember


def group_rank_and_size(group=None, comm=None):
    if group is not None:
        return group.rank(), group.size()
    if comm is not None:
        return comm.Get_rank(), comm.Get_size()
    raise ValueError("Either 'group' (a torch.distributed ProcessGroup or an epcomm.LocalGroup member) or 'comm' "
                     "(an mpi4py communicator) must be provided")


def is_local(group):
    """Whether `group` is an in-process group (its ranks threads of this process)."""
    return isinstance(group, LocalGroupMember)


def exchange_unique_id(group=None, comm=None):
    """Collective over the group: returns (rank, num_ranks, the 128-byte id made by rank 0)."""
    rank, size = group_rank_and_size(group, comm)
    mine = _capi.new_unique_id(local=is_local(group)) if rank == 0 else None
    if is_local(group):
        uid = group.all_gather_object(mine)[0]
    elif group is not None:
        import torch.distributed as dist

        # all_gather_object, not broadcast_object_list: its source is a group rank, not a global one.
        everyone = [None] * size
        dist.all_gather_object(everyone, mine, group=group)
        uid = everyone[0]
    else:
        uid = comm.bcast(mine, root=0)
    if not isinstance(uid, (bytes, bytearray)) or len(uid) != _capi.EP_UNIQUE_ID_BYTES:
        raise RuntimeError(f"rank {rank}: the unique id received from rank 0 is not {_capi.EP_UNIQUE_ID_BYTES} bytes "
                           f"({type(uid).__name__}); do all ranks create the Buffer with the same group?")
    return rank, size, bytes(uid)
