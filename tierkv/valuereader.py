"""Values read with ``pread`` on data.mdb, at their place in LMDB's map (Linux).

Primitives:
    ValueReader: locates a value from its LMDB leaf node without touching it, reads its header,
        hands out a ``ValueFile`` per value; O_DIRECT where asked and allowed; page-cache hints
        (``WILLNEED`` for the first layers, ``DONTNEED`` for values written or read with
        ``ssd_page_cache="bypass"``).
    ValueFile: one value's reader, a ``codec.ReadAt``, through a descriptor of its own while a
        restore reads it.

Relies on LMDB 0.9's on-disk layout (mdb.c), and checks it: a located value's overflow page must
name its own page, else the caller reads that value through the map.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, Collection

import lmdb
import numpy as np

from .codec import CorruptValueError
from .errors import TierKVError
from .pagecache import any_resident, resident_pages, unmap_pages

if TYPE_CHECKING:
    from .store import SSDStore

__all__ = ["ValueReader", "ValueFile", "OVERFLOW_HEADER_BYTES"]

# LMDB 0.9 on-disk structures (mdb.c): a leaf node's header (data size lo/hi, flags, key size)
# sits right before its key; an overflow page starts with (page number, pad, flags, page count).
_NODE = struct.Struct("<HHHH")
_PAGE_HEAD = struct.Struct("<QHHI")
_F_BIGDATA, _P_OVERFLOW = 0x01, 0x04
#: bytes of an overflow page's header: a large value starts that far into its first page
OVERFLOW_HEADER_BYTES = _PAGE_HEAD.size


def _address(buf: memoryview) -> int:
    """Address of a buffer's first byte (without touching its pages)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


class ValueReader:
    """Reads LMDB values with ``pread`` on data.mdb instead of through LMDB's map.

    Why: py-lmdb pre-faults every page of a value it returns, so ``get`` on a cold 12 MB value
    reads all of it, 4 KiB fault by fault (each pulling a read_ahead_kb window around it), before
    the caller sees a byte; a restore that wants layer 0 of every block first waited for every
    block in full. A value above LMDB's inline size lives in contiguous overflow pages; its leaf
    node (next to the key, which the cursor exposes without pre-faulting the value) holds the
    first page's number and the size. ``pread`` then reads exactly the byte ranges asked for,
    straight into the caller's tensors, from several threads, and a disk error is an OSError
    instead of SIGBUS. The overflow page header in front of a located value must name that page
    (else the value is read through the map), and the value's own header checksum is seeded with
    its key, so a misplaced read is never taken for another block's KV.
    ``open`` returns None (values then go through the map) off Linux or if the map cannot be
    located: where the map starts comes from LMDB itself (a page's header holds its own page
    number), checked by reading a known value with pread, so no /proc is needed.
    """

    #: most descriptors of its own a reader keeps open at once (``read_at(..., own_fd=True)``)
    MAX_OWN_FDS = 256
    #: what O_DIRECT reads here align to: file offset, length and memory address of every buffer
    #: (a page: enough for disks of 512-byte and of 4 KiB sectors)
    DIRECT_ALIGN = 4096
    #: ranges to drop from the page cache closer than this go as one (``advise_dontneed``)
    DONTNEED_GAP = 4 << 20

    def __init__(self, fd: int, start: int, end: int, psize: int, path: str = "") -> None:
        self._fd, self._start, self._end, self._psize = fd, start, end, psize
        self._path = path
        self._own_fds = 0
        self._own_lock = threading.Lock()
        self._direct_fd: int | None = None   # None: not opened yet; -1: O_DIRECT unavailable
        self._direct_refused = False

    @classmethod
    def open(cls, store: "SSDStore") -> "ValueReader | None":
        try:
            fd = os.open(store.data_file(), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            psize, info = store.env.stat()["psize"], store.env.info()
            with store.reader() as txn:
                probe = txn.get(b"fingerprint", db=store.meta)
                if probe is not None and ctypes.sizeof(ctypes.c_size_t) == 8:
                    # the map starts page-aligned, so the probe's page starts at its address
                    # rounded down, and a page begins with its own number (mdb.c: mp_pgno)
                    addr = _address(probe)
                    page = addr - addr % psize
                    pgno = _PAGE_HEAD.unpack(ctypes.string_at(page, _PAGE_HEAD.size))[0]
                    start = page - pgno * psize
                    if pgno <= info["last_pgno"] and os.pread(fd, len(probe), addr - start) == bytes(probe):
                        return cls(fd, start, start + info["map_size"], psize, store.data_file())
        except (OSError, ValueError, TierKVError):
            pass
        os.close(fd)
        return None

    def locate(self, cursor: lmdb.Cursor, key: bytes) -> tuple[int, int] | None:
        """(file offset, size) of the overflow value stored under ``key`` in ``cursor``'s
        database, without touching the value; None if absent or stored inline in its leaf."""
        if not cursor.set_key(key):
            return None
        addr = _address(cursor.key())
        if not (self._start + _NODE.size <= addr and addr + len(key) + 8 <= self._end):
            return None
        lo, hi, flags, ksize = _NODE.unpack(ctypes.string_at(addr - _NODE.size, _NODE.size))
        if not flags & _F_BIGDATA or ksize != len(key):
            return None
        (pgno,) = struct.unpack("<Q", ctypes.string_at(addr + ksize, 8))
        return pgno * self._psize + _PAGE_HEAD.size, lo | (hi << 16)

    def read_head(self, offset: int, size: int, n: int) -> bytes | None:
        """The first ``n`` bytes of the value at ``offset`` (from ``locate``), or None when the
        overflow page header in front of it does not name that page: then the location is not
        trusted (a damaged page, or an LMDB whose layout differs from 0.9's) and the caller
        reads the value through the map, where its own checksums still judge it."""
        page, head = bytearray(_PAGE_HEAD.size), bytearray(min(n, size))
        self.read_at(offset - _PAGE_HEAD.size)(0, [page, head], len(page) + len(head))  # shared descriptor: no close
        return bytes(head) if self.page_head_ok(offset, size, page) else None

    def page_head_ok(self, offset: int, size: int, page: Any) -> bool:
        """Whether ``page``, the OVERFLOW_HEADER_BYTES in front of the value at ``offset`` (of
        ``size`` bytes), is an overflow page header that names its own page and holds the value."""
        pgno, _, flags, pages = _PAGE_HEAD.unpack(bytes(page))
        return (pgno * self._psize + _PAGE_HEAD.size == offset and bool(flags & _P_OVERFLOW)
                and pages * self._psize >= size + _PAGE_HEAD.size)

    def read_at(self, base: int, own_fd: bool = False) -> "ValueFile":
        """A ``read_at`` (codec.ReadAt) for the value at file offset ``base``; ``close()`` it after.

        ``own_fd``: read through a descriptor of its own (while fewer than ``MAX_OWN_FDS`` are
        open, else the shared one). Why: the kernel keeps readahead state per open file. A restore
        reads layer 0 of every block, then layer 1 of every block, ...: through one descriptor
        that is a jump to another block on every read, and readahead sees no stream. With a
        descriptor per value, each block's layers are one sequential stream, read ahead as such:
        the demo's 8K-token turn restored from cold SSD took 425 ms, against 529 ms with one
        shared descriptor, in one run of ``bench/ttft_parts.py`` (475 against 587 in a slower one).
        """
        fd = -1
        if own_fd and self._path:
            with self._own_lock:
                take = self._own_fds < self.MAX_OWN_FDS
                self._own_fds += take
            if take:
                try:
                    fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:  # out of descriptors: the shared one still works
                    self._release_own()
        return ValueFile(self, base, fd)

    def _release_own(self) -> None:
        with self._own_lock:
            self._own_fds -= 1

    def no_readahead(self) -> None:
        """Read through the shared descriptor without readahead (``POSIX_FADV_RANDOM``): a
        value's header read then brings in its first page alone, not a window of the layers
        behind it, which an O_DIRECT read would find in the page cache (and leave to buffered
        reads) or read a second time. Best effort."""
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (OSError, AttributeError):
            pass

    def direct_fd(self) -> int:
        """A descriptor of data.mdb opened with O_DIRECT (opened on first use), or -1 where the
        file system refuses O_DIRECT (tmpfs does) or the platform has none."""
        if self._direct_fd is None:
            with self._own_lock:
                if self._direct_fd is None:
                    fd = -1
                    if self._path and hasattr(os, "O_DIRECT"):
                        try:
                            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                        except OSError:
                            fd = -1
                    self._direct_fd = fd
        return -1 if self._direct_refused else self._direct_fd

    def direct_failed(self) -> None:
        """O_DIRECT was refused for a read that met ``DIRECT_ALIGN`` (a disk of larger sectors,
        a file system that takes the open but not the read): read through the page cache from
        now on. The descriptor stays open until ``close``: another thread may be about to use it,
        and a closed number can be reused by the next ``open``."""
        self._direct_refused = True

    def direct_ok(self, offset: int, length: int) -> bool:
        """Whether the file range suits an O_DIRECT read: aligned, and no page of it in the page
        cache (cached bytes come faster from memory, and a read that was just written is
        cached)."""
        a = self.DIRECT_ALIGN
        return (offset % a == 0 and length % a == 0 and self._start + offset + length <= self._end
                and not any_resident(self._start + offset, length))

    def mostly_cold(self, offset: int, length: int) -> bool:
        """Whether at most half of the file range's pages are in the page cache (and it lies
        inside the map): a value to read from the disk rather than from memory. Some pages of a
        cold value may be cached whatever a restore does: its header's, read just before, or
        those the kernel read ahead around the store's own records when it opened (up to the
        disk's ``read_ahead_kb``, 8 MiB on the test machine)."""
        if self._start + offset + length > self._end:
            return False
        cached, pages = resident_pages(self._start + offset, length)
        return cached * 2 <= pages

    def advise_willneed(self, ranges: list[tuple[int, int]]) -> None:
        """Ask the kernel to start reading these (file offset, length) ranges now (best effort)."""
        self._advise(ranges, os.POSIX_FADV_WILLNEED)

    def drop_values(self, locations: list[tuple[int, int]], keep_first: Collection[int] = ()) -> None:
        """Drop the values at these ``locate`` results (offset, size) from the page cache, the
        page header in front of each included (best effort: ``advise_dontneed``).

        ``keep_first``: the offsets of values whose first page stays: the page that holds their
        overflow page header, which LMDB reads whenever a lookup stops at the key (``locate``).
        Dropped, the next lookup of the block reads it from the disk, in a restore's setup on
        the caller's thread, behind whatever the disk is busy with. For values a load read from
        the disk with O_DIRECT, that page came in alone, when the load looked the block up
        (LMDB's map reads nothing around a page on Linux), so one page a value stays: 4 KiB of a
        256-token SmolLM2 block's 5.6 MiB (bf16). Not for values the page cache held already,
        nor after a write: the kernel caches those in folios of many pages, and one page kept
        would keep its whole folio (17-34 % of the store stayed in reload runs 79 and bf16 raw
        28, when a bypassing restore of cached values kept them all)."""
        a = mmap.PAGESIZE
        ranges: list[tuple[int, int]] = []
        keep: list[int] = []
        for offset, size in locations:
            first = (offset - _PAGE_HEAD.size) - (offset - _PAGE_HEAD.size) % a
            if offset in keep_first:
                keep.append(first)
                if offset + size > first + a:
                    ranges.append((first + a, offset + size - first - a))
            else:
                ranges.append((first, offset + size - first))
        self.advise_dontneed(ranges, keep=keep)

    def advise_dontneed(self, ranges: list[tuple[int, int]], keep: Collection[int] = ()) -> None:
        """Ask the kernel to drop these (file offset, length) ranges' clean pages (best effort),
        after letting go of this process's mappings of them in LMDB's map (which keep a page
        in the cache: ``pagecache.unmap_pages``). The pages at the offsets in ``keep`` stay,
        even where ranges close together go as one."""
        for offset, length in ranges:
            if self._start + offset + length <= self._end:
                unmap_pages(self._start + offset, length)
        # The kernel drops only what lies wholly inside a range, and caches a file in folios of
        # up to a few MiB: a folio that spans two values stays for either value's range alone.
        # Values written together mostly lie together, so ranges less than DONTNEED_GAP apart
        # go as one (pages the process still maps, B-tree pages, stay whatever is asked), then
        # split around the pages to keep.
        merged: list[list[int]] = []
        for offset, length in sorted(ranges):
            if merged and offset - (merged[-1][0] + merged[-1][1]) < self.DONTNEED_GAP:
                merged[-1][1] = max(merged[-1][1], offset + length - merged[-1][0])
            else:
                merged.append([offset, length])
        kept, page = sorted(keep), mmap.PAGESIZE
        pieces: list[tuple[int, int]] = []
        i = 0
        for start, length in merged:
            end = start + length
            while i < len(kept) and kept[i] + page <= start:
                i += 1
            for k in kept[i:]:
                if k >= end:
                    break
                if k > start:
                    pieces.append((start, k - start))
                start = max(start, k + page)
            if end > start:
                pieces.append((start, end - start))
        self._advise(pieces, os.POSIX_FADV_DONTNEED)

    def _advise(self, ranges: list[tuple[int, int]], advice: int) -> None:
        for offset, length in ranges:
            try:
                os.posix_fadvise(self._fd, offset, length, advice)
            except OSError:
                return  # a hint only

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = -1


class ValueFile:
    """One value's reader, a codec.ReadAt: ``file(offset, buffers, nbytes)`` fills ``buffers``
    (``nbytes`` in all) from the value's byte ``offset`` on, through the reader's descriptor or one
    of its own. The caller states ``nbytes`` because it knows it: summing the buffers' sizes here
    (a memoryview per buffer) was a large part of a decode thread's Python time per stored layer
    in a profile."""

    def __init__(self, reader: ValueReader, base: int, own_fd: int = -1) -> None:
        self._reader, self._base, self._own = reader, base, own_fd

    def __call__(self, off: int, bufs, want: int) -> None:
        fd = self._own if self._own >= 0 else self._reader._fd
        try:
            got = os.preadv(fd, bufs, self._base + off)
        except OSError as e:
            raise CorruptValueError(f"cannot read the value: {e}") from None
        if got != want:
            raise CorruptValueError(f"value ends early: read {got} of {want} B")

    def direct(self, off: int, bufs, want: int) -> None:
        """Like a call, with O_DIRECT (the caller checked ``ValueReader.direct_ok`` and that every
        buffer is aligned); where the kernel refuses it, through the page cache instead."""
        fd = self._reader.direct_fd()
        if fd >= 0:
            try:
                got = os.preadv(fd, bufs, self._base + off)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise CorruptValueError(f"cannot read the value: {e}") from None
                self._reader.direct_failed()
            else:
                if got != want:
                    raise CorruptValueError(f"value ends early: read {got} of {want} B")
                return
        self(off, bufs, want)

    def share(self) -> None:
        """Read through the reader's shared descriptor from now on (closing the one of its own)."""
        self.close()

    def close(self) -> None:
        """Close the descriptor of its own, if any (idempotent)."""
        if self._own >= 0:
            os.close(self._own)
            self._own = -1
            self._reader._release_own()
