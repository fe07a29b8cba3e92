"""Lifetime of the C handles (ep_handle_t, ep_ll_handle_t) behind the Python handle objects. No torch here.

When a Python handle is garbage collected, its C handle is released at once only if that makes no device
call (a low-latency handle: host memory only). A normal-mode handle's release enqueues a cudaFreeAsync on
the group's stream, and the collector may run at any bytecode, e.g. while a CUDA graph is captured, which
would record the free into the graph. So those are queued, and the owning Buffer releases them at its next
call when device calls are safe, and all handles (live or queued) when it is destroyed, before
ep_group_destroy (which refuses while handles are alive).
"""
import collections
import weakref

HT_HANDLE, LL_HANDLE = "ht", "ll"  # kinds: a normal-mode ep_handle_t, a low-latency ep_ll_handle_t


class NativeHandle:
    """Owns one C handle. `ptr` becomes None once released; then the handle may no longer be used."""

    __slots__ = ("ptr", "kind", "_book", "__weakref__")

    def __init__(self, ptr, kind, book):
        self.ptr = ptr
        self.kind = kind
        self._book = book

    def require(self, what="handle"):
        if self.ptr is None:
            raise RuntimeError(f"{what}: released (its Buffer was destroyed)")
        return self.ptr

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
        self._live = weakref.WeakSet()
        self._dead = collections.deque()  # (kind, ptr) dropped by the collector, waiting for a safe moment
        self.closed = False

    def adopt(self, ptr, kind):
        handle = NativeHandle(ptr, kind, self)
        self._live.add(handle)
        return handle

    def _dropped(self, kind, ptr):
        if self.closed:
            return
        if self._needs_device(kind):
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
        """At destroy: every handle, live or queued. Live Python handle objects become unusable."""
        error = None
        for handle in list(self._live):
            ptr, handle.ptr = handle.ptr, None
            if ptr is None:
                continue
            try:
                self._release(handle.kind, ptr)
            except Exception as e:
                error = error or e
        error = self.collect() or error
        self.closed = True
        return error
