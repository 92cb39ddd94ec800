"""Page-cache control for honest cold reads.

Primitives:
    drop_file_cache: write back and evict a file's pages, so the next read comes from the disk.
    make_cold: the same, then check that the pages went (``ColdReadError`` where they stay).
    direct_io_supported: whether a directory's file system takes O_DIRECT reads.
    resident_fraction: how much of a file is in the page cache now (``mincore``).
    any_resident: whether any page of a mapped range is in the page cache.
    unmap_pages: let go of this process's mappings of a range of a shared file map.
    madvise: the system call itself (also for ``hostmem``'s huge-page advice).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import tempfile

from .errors import ColdReadError

__all__ = ["drop_file_cache", "make_cold", "direct_io_supported", "resident_fraction", "any_resident", "unmap_pages", "madvise"]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def drop_file_cache(path: str) -> None:
    """fsync ``path`` and ask the kernel to drop its cached pages (no mapping of it may be open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_cold(path: str, max_resident: float = 0.01) -> float:
    """Drop ``path``'s pages from the page cache (``drop_file_cache``), then check with
    ``mincore`` that at most ``max_resident`` of them stayed; return that fraction.

    Raises ``ColdReadError`` where more stayed: on a file system kept in memory (tmpfs, ramfs)
    the pages are the file and cannot go, and a page that any process still maps stays whatever
    ``POSIX_FADV_DONTNEED`` asks. A benchmark that timed such a read as cold would report memory
    speed as the disk's."""
    drop_file_cache(path)
    left = resident_fraction(path)
    if left > max_resident:
        raise ColdReadError(
            f"{left:.0%} of {path} stayed in the page cache after it was dropped, so a read of it "
            f"would not come from the disk. Its file system keeps files in memory (tmpfs, ramfs), "
            f"or a mapping of it is still open. Put the files to be measured on the disk itself "
            f"(e.g. --dir /var/tmp).")
    return left


def direct_io_supported(directory: str) -> bool:
    """Whether files in ``directory`` can be read with ``O_DIRECT`` (tmpfs refuses it, and
    some other file systems do). Writes, reads and removes a small probe file there."""
    if not hasattr(os, "O_DIRECT"):
        return False
    fd, probe = tempfile.mkstemp(prefix=".tierkv-direct-probe-", dir=directory)
    try:
        os.write(fd, b"\0" * (1 << 16))
        os.close(fd)
        try:
            fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT needs
        try:
            return os.preadv(fd, [buf], 0) == 1 << 16
        except OSError:
            return False
        finally:
            os.close(fd)
            buf.close()
    finally:
        os.unlink(probe)


def resident_fraction(path: str, offset: int = 0, length: int | None = None) -> float:
    """Fraction (0.0 .. 1.0) of ``path``'s pages resident in the page cache; of the pages holding
    bytes ``[offset, offset + length)`` when given."""
    size = os.path.getsize(path)
    end = size if length is None else min(size, offset + length)
    start = offset - offset % mmap.PAGESIZE
    if end <= start:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (end - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), end - start, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return bytes(vec).translate(_LOW_BIT).count(1) / pages
        finally:
            _libc.munmap(ctypes.c_void_p(addr), end - start)
    finally:
        os.close(fd)


def any_resident(addr: int, length: int) -> bool:
    """Whether any page of the mapped range ``[addr, addr + length)`` is in the page cache
    (``mincore``; it reads nothing). True when it cannot tell."""
    return resident_pages(addr, length)[0] > 0


def resident_pages(addr: int, length: int) -> tuple[int, int]:
    """(pages in the page cache, pages) of the mapped range ``[addr, addr + length)``
    (``mincore``; it reads nothing); every page counts as resident when it cannot tell."""
    start = addr - addr % mmap.PAGESIZE
    pages = (addr + length - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if pages <= 0:
        return 0, 0
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), pages * mmap.PAGESIZE, vec) != 0:
        return pages, pages
    return bytes(vec).translate(_LOW_BIT).count(1), pages


_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore's byte per page: bit 0 = resident


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4


def madvise(addr: int, length: int, advice: int) -> int:
    """``madvise(2)`` on ``[addr, addr + length)`` (``addr`` page-aligned); its return code."""
    return _libc.madvise(ctypes.c_void_p(addr), length, advice)


def unmap_pages(addr: int, length: int) -> None:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside ``[addr, addr + length)`` of a shared,
    read-only file map (LMDB's): the process lets go of its mappings of them, and the next read
    through the map faults them in again from the page cache or the disk; nothing is lost. A
    page the process maps stays in the page cache whatever ``POSIX_FADV_DONTNEED`` asks, and
    py-lmdb maps a value's pages when a cursor stops at its key. Best effort."""
    start = addr + (-addr % mmap.PAGESIZE)
    end = (addr + length) - (addr + length) % mmap.PAGESIZE
    if end > start:
        madvise(start, end - start, _MADV_DONTNEED)


def advise_willneed(buf: memoryview) -> None:
    """Ask the kernel to start reading a mapped buffer's pages now (asynchronous readahead).

    Used on LMDB values about to be decoded: the disk then streams every block of a restore at
    full queue depth while the decode threads work, instead of faulting pages in one by one.
    Best effort: a failure only loses the hint.
    """
    import numpy as np

    if len(buf) == 0:
        return
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    start = addr - addr % mmap.PAGESIZE
    _libc.madvise(ctypes.c_void_p(start), len(buf) + (addr - start), _MADV_WILLNEED)
