"""The native stack guest code runs on (threat T-DOS-1).

Compiled wasm runs on the host thread that calls into it. wasmtime stops it
with a clean "stack overflow" trap once it has used ``WASM_STACK`` bytes below
the point of entry, but it cannot know how big that thread's stack really is:
a thread with less room than that is hit by the operating system's guard page
first, and the whole worker process dies of SIGSEGV (measured: an 8 MiB limit
on the 8 MiB main thread does exactly that).

So the limit is set here, once, and every entry into a guest goes through
``on_guest_stack``: it runs on the calling thread only when that thread's stack
is known to hold the wasm stack plus ``HOST_ROOM`` for the host frames above
and below it; otherwise (too small, or unreadable) on a fresh thread made with
``GUEST_THREAD_STACK`` bytes. The worker runs its whole loop on such a thread,
so the hop never happens on the hot path.

Why 32 MiB: the guest CPython's C recursion guard counts the WebAssembly
*shadow* stack (a 128 KiB window in linear memory), not the native frames.
With wasmtime's default of well under a megabyte, ``json.dumps`` of a deeply
nested list overflows the native stack before that guard fires. From 4 MiB
on, the guard fires first for the C recursion we measured (json, repr,
pickle, deepcopy, ==, format, __getattr__), so the guest raises
``RecursionError``. Some C code recurses without touching the shadow stack at
all, so no guard stops it: freeing a nested structure (about 200 bytes of
native stack per level of a list), the AST optimiser on long operator chains,
freeing the traceback of a raised ``sys.setrecursionlimit``. 32 MiB lets a
100,000-deep list be built, fail in ``json.dumps`` and be dropped again, and
``sys.setrecursionlimit(100_000)`` end in ``RecursionError``; deeper than that
still traps, and the answer then says so in words (``outcome.trap_words``).
The stack is reserved address space; pages are only committed as a guest
actually goes that deep.
"""
from __future__ import annotations

import ctypes
import queue
import threading
from typing import Callable, TypeVar

WASM_STACK = 32 << 20
HOST_ROOM = 4 << 20  # host frames above the entry point and host calls made at the deepest point
GUEST_THREAD_STACK = WASM_STACK + HOST_ROOM

T = TypeVar("T")

_known = threading.local()


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.pthread_self.restype = ctypes.c_ulong
        libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
        libc.pthread_attr_getstack.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                               ctypes.POINTER(ctypes.c_size_t)]
        libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def thread_stack_bytes() -> int | None:
    """Size of the calling thread's stack, or None when it cannot be read."""
    if _LIBC is None:
        return None
    attr = ctypes.create_string_buffer(256)  # pthread_attr_t is 56 bytes on x86-64 glibc
    if _LIBC.pthread_getattr_np(_LIBC.pthread_self(), attr) != 0:
        return None
    try:
        addr, size = ctypes.c_void_p(), ctypes.c_size_t()
        if _LIBC.pthread_attr_getstack(attr, ctypes.byref(addr), ctypes.byref(size)) != 0:
            return None
        return int(size.value)
    finally:
        _LIBC.pthread_attr_destroy(attr)


def guest_stack_ok() -> bool:
    """True when guest code may run on this thread (its stack holds WASM_STACK + HOST_ROOM)."""
    ok = getattr(_known, "ok", None)
    if ok is None:
        size = thread_stack_bytes()
        ok = size is not None and size >= GUEST_THREAD_STACK
        _known.ok = ok
    return bool(ok)


def on_guest_stack(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread whose stack holds the guest's: this one if it does,
    else the process's one guest thread (unknown size counts as too small).

    One long-lived thread, not one per call: what a host call starts on the
    calling thread (an MCP server child dies with the thread that spawned it,
    through PR_SET_PDEATHSIG) outlives the run, as it does in the worker."""
    if guest_stack_ok():
        return fn()
    call = _Call(fn)
    _runner().put(call)
    call.done.wait()
    if call.error is not None:
        raise call.error
    return call.value  # type: ignore[return-value]


class _Call:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None


_runner_lock = threading.Lock()
_queue: queue.SimpleQueue[_Call] | None = None


def _runner() -> queue.SimpleQueue[_Call]:
    global _queue
    with _runner_lock:
        if _queue is None:
            q: queue.SimpleQueue[_Call] = queue.SimpleQueue()

            def loop() -> None:
                while True:
                    call = q.get()
                    try:
                        call.value = call.fn()
                    except BaseException as e:  # handed back to the caller's thread
                        call.error = e
                    finally:
                        call.done.set()

            start_guest_thread(loop, "cell-guest")
            _queue = q
        return _queue


_size_lock = threading.Lock()


def start_guest_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start ``target`` on a new thread with GUEST_THREAD_STACK bytes of stack."""
    with _size_lock:
        old = threading.stack_size(GUEST_THREAD_STACK)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(old)
    return thread
