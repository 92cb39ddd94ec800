"""Host memory for the memory tiers: block buffers carved from large slabs made ready ahead of use.

Primitives:
    can_pin: whether this process can page-lock memory (CUDA is available).
    host_buffer: one flat uint8 CPU buffer, page-locked or not (how tierkv allocates host memory
        outside the pool; the one place that asks torch for page-locked memory).
    aligned_empty: a CPU tensor whose memory starts on a page (O_DIRECT can read into it), on
        huge pages if asked.
    hold_until: keep host buffers referenced until the copies reading them (marked by an event)
        have run.
    prefault: make a new CPU buffer's pages resident before its first write.
    SlabPool: buffers of one size (a full block's payload) carved from slabs; a buffer's place goes
        back to the pool when the last tensor sharing its memory dies, and a background thread
        allocates slabs ahead of need (page-locked, or else prefaulted), up to a limit, pausing
        while a save copies; a plain pool with no free place adds a slab on the caller's thread.

Why a pool: page-locking new memory is slow, and torch's allocator rounds every page-locked buffer
up to a power of two. On the H200 machine of session 25 (``bench/results/h200_pinned_alloc.json``,
its first round, the only one that took new memory) a new page-locked 5.9 MB block took 4.4 ms:
``save`` of a 4,096-token session (16 blocks, 94 MB) copied for 96-114 ms there, against 16.5 ms
on a CPU machine whose host tier is not page-locked. A block also took an 8 MiB buffer. From the
pool a block takes a free place in a slab already locked (no allocation on the caller's thread),
and a 64 MiB slab holds 11 such blocks (3 % unused, against 30 %).

Why a pool for plain memory too (session 32): the first write into new memory pays for a page
fault per page, and on the test machine a save into new memory blocked 1.6-3.3x longer than into
memory written before (docs/benchmarks.md, "How long save blocks its caller"). Plain memory
freed by the host tier went back to the C allocator, so a server at its budget often paid for
the faults again. From the pool, places are reused, and new slabs are prefaulted by the
background thread, which holds off while a save runs (``copying``: in a timing probe,
prefaulting alongside a copy slowed the copy as much as the faults it spared it).
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from .pagecache import madvise

__all__ = ["can_pin", "host_buffer", "aligned_empty", "prefault", "HUGE_PAGE", "hold_until", "SlabPool", "SLAB_MIN_BYTES", "AHEAD_MAX_BYTES"]

#: slab size unless a block or the limit is smaller (a power of two)
SLAB_MIN_BYTES = 64 << 20
#: plain (not page-locked) slabs: four blocks, but no smaller than this
PLAIN_SLAB_MIN_BYTES = 2 << 20
#: a plain slab is prefaulted this much at a time, so that a save's copy waits for no more
PREFAULT_CHUNK = 2 << 20
PAGE = 4096
#: the most free pool memory kept ready ahead of saves
AHEAD_MAX_BYTES = 1 << 30


def can_pin() -> bool:
    """Whether page-locked memory can be had: torch asks the CUDA driver for it."""
    return torch.cuda.is_available()


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A new flat uint8 CPU buffer of ``nbytes``, page-locked if ``pin``."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, huge: bool = False) -> torch.Tensor:
    """An uninitialised CPU tensor whose first byte is on a page: a view of a buffer one page
    longer (torch's CPU allocator aligns to 64 bytes only, and O_DIRECT moves whole disk sectors
    by DMA into memory on a sector boundary).

    ``huge``: align to 2 MiB and ask for transparent huge pages (``MADV_HUGEPAGE``; the kernel
    may refuse). A disk request can carry only so many separate pieces of memory (254 on the
    test machine's virtio disk): an O_DIRECT read of 4 MiB into scattered 4 KiB pages goes to
    the disk as requests of at most about 1 MiB, into huge pages as one. Only for memory
    allocated ahead of use: a first write into a huge page may wait for the kernel to compact
    memory. On Linux such a buffer is a private anonymous map of its own (``_huge_map``), never
    memory from the C allocator: see there why."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if huge and nbytes >= HUGE_PAGE and sys.platform.startswith("linux"):
        return _huge_map(nbytes).view(dtype).view(shape)
    align = HUGE_PAGE if huge else PAGE
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    off = -raw.data_ptr() % align
    return raw[off:off + nbytes].view(dtype).view(shape)


def _huge_map(nbytes: int) -> torch.Tensor:
    """``nbytes`` (uint8) of a new private anonymous map, from a 2 MiB boundary, asked for huge
    pages before any page of it is touched; unmapped when the last tensor viewing it dies.

    Why not the C allocator: glibc serves a large request from a map of its own only until a
    process frees such a map; then it raises its threshold and serves the next ones from its
    heap, in memory faulted in before as 4 KiB pages, which ``MADV_HUGEPAGE`` does not turn into
    huge ones. In reload run 81 (a bench process that had freed many large buffers) the bypass
    stream's bounce buffers came out so: their 4 MiB reads reached the disk as requests of 850
    KiB, and the bypassing restore ran at 1.16 GB/s against 2.19 in run 80.
    ``test_huge_buffers_get_huge_pages_after_the_c_allocator_freed_large_ones``."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, np.uint8)   # holds the map: it is unmapped when no view is left
    skip = -whole.ctypes.data % HUGE_PAGE
    madvise(whole.ctypes.data + skip, nbytes - nbytes % HUGE_PAGE, _MADV_HUGEPAGE)  # best effort
    return torch.from_numpy(whole[skip:skip + nbytes])


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _lowest_priority() -> None:
    """Run the calling thread at the lowest CPU priority (nice 19; Linux sets it per thread):
    prefaulting is work done ahead of need, and must not take a CPU from the threads that need
    one now (the SSD writer, a restore's decode threads, the model). Best effort."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def prefault(buf: torch.Tensor) -> None:
    """Make a new CPU buffer's pages resident now (its contents stay undefined), so that the
    first copy into it does not pay for page faults. The kernel faults the pages in for writing
    (``MADV_POPULATE_WRITE``, on one thread, without the GIL); where it cannot (a kernel before
    5.14, not Linux), the buffer is zeroed."""
    addr, n = buf.data_ptr(), buf.numel() * buf.element_size()
    start = addr - addr % PAGE  # whole pages of the same allocation: populating writes nothing
    if not (sys.platform.startswith("linux") and madvise(start, addr + n - start, _MADV_POPULATE_WRITE) == 0):
        buf.zero_()


_held: deque = deque()  # (event, buffers), oldest first
_held_lock = threading.Lock()


def hold_until(event: Any, buffers: list[torch.Tensor]) -> None:
    """Keep ``buffers`` referenced until ``event`` (a ``torch.cuda.Event``) has completed.

    A copy queued on a CUDA stream reads its host source later. torch's own page-locked buffers
    wait for such copies before torch reuses them; a ``SlabPool`` place is reused as soon as
    nothing references it, so whoever queues a copy from one holds it here."""
    with _held_lock:
        _release_done()
        _held.append((event, buffers))


def _release_done() -> None:
    """Drop the holds whose copies have run (call with ``_held_lock``)."""
    while _held and _held[0][0].query():
        _held.popleft()


class _Place:
    """One place in a slab, exposed to numpy (``__array_interface__``) so that a tensor made from
    it keeps this object alive through its storage: views, slices and reshapes included. When the
    last of them dies, the place goes back to its pool."""

    def __init__(self, pool: "SlabPool", index: int, slab: torch.Tensor, offset: int) -> None:
        self.pool, self.index, self.slab = pool, index, slab
        self.__array_interface__ = {"shape": (pool.slot_bytes,), "typestr": "|u1", "version": 3,
                                    "data": (slab.data_ptr() + offset, False)}

    def __del__(self) -> None:
        self.pool._free.append(self.index)  # deque.append is atomic: no lock in a finaliser


class SlabPool:
    """Buffers of ``slot_bytes`` carved from slabs of page-locked (``pin``) host memory.

    Args:
        slot_bytes: size of every buffer (a full block's payload).
        limit_bytes: slabs stop growing once they hold this much (the tiers' budgets plus the
            slack ``save`` may run over them); they may pass it by less than one slab. Slabs are
            64 MiB (``SLAB_MIN_BYTES``), or the power of two at or above the limit if smaller,
            or above one block if larger; plain slabs also no larger than the power of two at
            or above four blocks, at least 2 MiB (no page-locking to amortise: small blocks get
            small slabs).
        ahead_bytes: how much free pool memory the background thread keeps ready; it starts
            filling at construction (0: nothing until ``expect`` asks).
        pin: page-lock the slabs (CUDA); else they are plain memory, prefaulted.

    A place is reused only when no tensor shares its memory any more. Copies that read a buffer
    asynchronously (queued on a CUDA stream) must keep it referenced until they complete
    (``hold_until``): torch's own page-locked buffers are protected by its allocator's
    events, pool places are not.
    """

    def __init__(self, slot_bytes: int, limit_bytes: int, ahead_bytes: int, pin: bool = True) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be > 0, got {slot_bytes}")
        self.slot_bytes = slot_bytes
        self.stride = -(-slot_bytes // PAGE) * PAGE  # places start on page boundaries
        pow2 = lambda n: 1 << (max(n, 1) - 1).bit_length()  # noqa: E731
        # a power of two, so torch's page-locked allocator does not round it up further; no
        # larger than the limit needs, for small budgets
        cap = SLAB_MIN_BYTES if pin else min(SLAB_MIN_BYTES, max(PLAIN_SLAB_MIN_BYTES, pow2(4 * self.stride)))
        self.slab_bytes = max(pow2(self.stride), min(cap, pow2(limit_bytes)))
        self.per_slab = self.slab_bytes // self.stride
        self.max_slabs = max(1, -(-limit_bytes // (self.per_slab * self.stride)))
        self.ahead_max = max(1, min(limit_bytes, AHEAD_MAX_BYTES) // self.stride)
        self.ahead = min(self.ahead_max, max(int(ahead_bytes > 0), min(ahead_bytes, AHEAD_MAX_BYTES) // self.stride))
        self.pin = pin
        self._copying = 0       # saves copying into places now: the background thread holds off
        self._slabs: list[torch.Tensor] = []
        self._free: deque[int] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.taken = 0          # buffers handed out from the pool
        self.starved = 0        # requests the pool had no free place for
        self.grown_on_demand = 0  # slabs a take() added, finding no free place (plain pools)
        self._unfaulted: deque[int] = deque()  # those slabs, until the thread has prefaulted them
        self.error: BaseException | None = None  # why the slabs stopped growing early, if they did
        self._thread = threading.Thread(target=self._grow_loop, name="tierkv-hostmem", daemon=True)
        self._thread.start()

    def take(self) -> torch.Tensor | None:
        """A free buffer of ``slot_bytes`` (contents undefined), or None when none is free now.

        When free places run low, the background thread is woken to add a slab. With none free,
        a plain pool below its limit adds one here (``_grow_now``: address space only, no
        faults); a page-locked pool returns None. After ``close`` it always returns None."""
        if self._stopping:
            return None
        if not self._free and _held:
            with _held_lock:
                _release_done()  # copies that have run since free their sources' places
        try:
            index = self._free.popleft()
        except IndexError:
            index = self._grow_now()
            if index is None:
                self.starved += 1
                self._wake()
                return None
        if len(self._free) < self.ahead:
            self._wake()
        self.taken += 1
        slab, place = divmod(index, self.per_slab)
        return torch.from_numpy(np.asarray(_Place(self, index, self._slabs[slab], place * self.stride)))

    def _grow_now(self) -> int | None:
        """With no free place, a plain pool below its limit adds a slab on the caller's thread
        and hands out its first place; None otherwise (a page-locked pool, whose new slab would
        cost the caller far more than one block's buffer; the limit; closing).

        The slab is not prefaulted: the caller's copy faults its place in, as it would fault in
        the buffer it would otherwise get from the allocator. What changes is afterwards: that
        memory stays in the pool when its block leaves, and the next save reuses it without a
        fault, where a buffer from the allocator went back to it (and, on a VM, to the host).
        In a burst of saves the background thread, holding off while each copies, seldom got a
        slab made: most blocks came from the allocator, and each save paid for new memory again
        (the pool had 14 slabs for 156 blocks it could not serve in one run of
        ``bench/save_block.py --burst``). Its other places are prefaulted by the background
        thread when no save copies (``_unfaulted``)."""
        if self.pin:
            return None
        with self._cond:
            if self._stopping or len(self._slabs) >= self.max_slabs:
                return None
            try:
                slab = host_buffer(self.slab_bytes, False)
            except (RuntimeError, MemoryError):
                return None
            first = self._add_slab(slab)
            self.grown_on_demand += 1
            self._unfaulted.append(len(self._slabs) - 1)
            self._cond.notify()
        self._free.extend(range(first + 1, first + self.per_slab))
        return first

    def _add_slab(self, slab: torch.Tensor) -> int:
        """Append a slab (with ``_cond`` held); the index of its first place."""
        first = len(self._slabs) * self.per_slab
        self._slabs.append(slab)
        return first

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def expect(self, nbytes: int) -> None:
        """Saves of about ``nbytes`` of full blocks are coming: keep twice that free ahead of
        them, within the limit and ``AHEAD_MAX_BYTES``. What is kept ahead never shrinks."""
        want = min(self.ahead_max, 2 * -(-nbytes // self.slot_bytes))
        if want > self.ahead:
            self.ahead = want
            self._wake()

    @contextmanager
    def copying(self) -> Iterator[None]:
        """Hold the background thread off while a save runs (its copy into places and the
        bookkeeping after it): alongside them, prefaulting a new slab slowed the copy down and
        added milliseconds to the save's return (see the module's docstring). A slab already
        being prefaulted pauses between chunks."""
        with self._cond:
            self._copying += 1
        try:
            yield
        finally:
            with self._cond:
                self._copying -= 1
                if not self._copying:
                    self._cond.notify_all()

    def _wait_quiet(self) -> bool:
        """Wait until no save copies; False once the pool is closing."""
        with self._cond:
            while self._copying and not self._stopping:
                self._cond.wait(timeout=1.0)
            return not self._stopping

    def _wants_slab(self) -> bool:
        return (not self._stopping and self.error is None and len(self._slabs) < self.max_slabs
                and len(self._free) < self.ahead)

    def _has_work(self) -> bool:
        return self._wants_slab() or (bool(self._unfaulted) and not self._stopping)

    def _grow_loop(self) -> None:
        if not self.pin:
            _lowest_priority()
        while True:
            with self._cond:
                while not self._has_work() or self._copying:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=1.0)
                unfaulted = self._unfaulted.popleft() if self._unfaulted else None
            if unfaulted is not None:
                # a slab a save made (_grow_now): fault in its pages now, not in later copies;
                # populating writes nothing, so places in use keep their bytes
                if not self._prefault(self._slabs[unfaulted]):
                    return
                continue
            try:
                slab = self._new_slab()  # slow: outside the condition's lock
            except (RuntimeError, MemoryError) as e:
                # out of lockable memory: serve what there is; alloc() falls back to host_buffer
                self.error = e
                continue
            if slab is None:  # closing
                return
            with self._cond:
                if len(self._slabs) >= self.max_slabs:  # saves grew the pool to its limit meanwhile
                    continue
                first = self._add_slab(slab)
            self._free.extend(range(first, first + self.per_slab))

    def _new_slab(self) -> torch.Tensor | None:
        """A slab whose pages are resident before any place in it is handed out: page-locked by
        the CUDA driver (``pin``), or else prefaulted here, a chunk at a time, holding off while
        a save copies (None if the pool closes meanwhile). Not on huge pages: in a timing probe,
        copies into prefaulted huge-page slabs were no faster, and some rounds much slower."""
        slab = host_buffer(self.slab_bytes, self.pin)
        if not self.pin and not self._prefault(slab):
            return None
        return slab

    def _prefault(self, slab: torch.Tensor) -> bool:
        """Fault a plain slab's pages in, a chunk at a time, holding off while a save copies;
        False if the pool closes meanwhile."""
        for at in range(0, self.slab_bytes, PREFAULT_CHUNK):
            if not self._wait_quiet():
                return False
            prefault(slab[at:at + PREFAULT_CHUNK])
        return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the background thread has nothing left to do now (``ahead`` places free, the
        limit reached, or stopped); False on timeout. For benchmarks and tests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._has_work():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Stop the background thread and let go of the slabs: one with no place handed out is
        freed now, the others when their last place is. Buffers already handed out stay valid.
        Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._free.clear()
        self._unfaulted.clear()
        self._slabs = []

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``TierKV.stats()["host_pool"]``."""
        return {"slot_bytes": self.slot_bytes, "slab_bytes": self.slab_bytes, "slabs": len(self._slabs),
                "pinned": self.pin, "ahead_slots": self.ahead,
                "locked_bytes": len(self._slabs) * self.slab_bytes, "free_slots": len(self._free),
                "taken": self.taken, "starved": self.starved, "grown_on_demand": self.grown_on_demand,
                "growing": self._has_work(),
                "error": None if self.error is None else repr(self.error)}
