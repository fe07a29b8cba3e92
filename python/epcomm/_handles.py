"""Lifetime of the C handles (ep_handle_t, ep_ll_handle_t) behind the Python handle objects. No torch here.

When a Python handle is garbage collected, its C handle is released at once only if that makes no device
call (a low-latency handle: host memory only). A normal-mode handle's release enqueues a cudaFreeAsync on
the group's stream, and the collector may run at any bytecode, e.g. while a CUDA graph is captured, which
would record the free into the graph. So those are queued, and the owning Buffer releases them at its next
call when device calls are safe, and all handles (live or queued) when it is destroyed, before
ep_group_destroy (which refuses while handles are alive).
"""
import collections

HT_HANDLE, LL_HANDLE = "ht", "ll"  # kinds: a normal-mode ep_handle_t, a low-latency ep_ll_handle_t


class NativeHandle:
    """Owns one C handle. Unusable once released, or once its book is closed (the Buffer was destroyed)."""

    __slots__ = ("ptr", "kind", "_book")

    def __init__(self, ptr, kind, book):
        self.ptr = ptr
        self.kind = kind
        self._book = book

    def require(self, what="handle"):
        ptr = self.ptr
        if ptr is None or self._book.closed:
            raise RuntimeError(f"{what}: released (its Buffer was destroyed)")
        return ptr

    def __del__(self):
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self._book._dropped(self.kind, ptr)


class HandleBook:
    """The live C handles of one group. `release(kind, ptr)` frees one; `needs_device(kind)` says whether
    freeing that kind makes a device call."""

    def __init__(self, release, needs_device):
        self._release = release
        self._needs_device = needs_device
        self._deferred = {}  # kind -> needs_device(kind), asked once per kind
        # ptr -> kind of the handles whose Python object is alive: a plain dict, not a WeakSet of the
        # objects (adopt runs once per low-latency dispatch, and a weak reference costs more than an entry).
        # An entry leaves when its object is collected, before the C handle is freed, so a C address that
        # is reused for a later handle never meets a stale entry.
        self._live = {}
        self._dead = collections.deque()  # (kind, ptr) dropped by the collector, waiting for a safe moment
        self.closed = False

    def adopt(self, ptr, kind):
        handle = NativeHandle(ptr, kind, self)
        self._live[ptr] = kind
        return handle

    def _dropped(self, kind, ptr):
        if self.closed:
            return
        self._live.pop(ptr, None)
        deferred = self._deferred.get(kind)
        if deferred is None:
            deferred = self._deferred[kind] = bool(self._needs_device(kind))
        if deferred:
            self._dead.append((kind, ptr))
            return
        try:
            self._release(kind, ptr)
        except Exception:  # a collector callback must not raise; the group reports errors on its next call
            pass

    def pending(self):
        return len(self._dead)

    def collect(self):
        """Releases the queued handles (call only when device calls are safe). Returns the first exception
        a release raised, after trying them all."""
        error = None
        while self._dead:
            kind, ptr = self._dead.popleft()
            try:
                self._release(kind, ptr)
            except Exception as e:
                error = error or e
        return error

    def release_all(self):
        """At destroy: every handle, live or queued. Live Python handle objects become unusable (closed)."""
        self.closed = True  # first: a handle object collected during the releases below does nothing
        error = None
        live, self._live = self._live, {}
        for ptr, kind in live.items():
            try:
                self._release(kind, ptr)
            except Exception as e:
                error = error or e
        return self.collect() or error
