"""Leases and doom marks: the handshake between a save that trusts blocks on SSD and a write
transaction that deletes blocks, in any process or thread sharing the store.

Primitives:
    Leases: two tables in a file of the store directory (``leases.bin``), mapped shared by every
        process that has the store open.
        - Leases, ``LEASE_SLOTS`` slots of 32 B: a key's first 8 bytes as a tag, when the lease
          runs out, and its last two owners. An owner is one save (``new_owner``); ``grant``
          writes its lease on each of its record's keys, ``release`` takes it off once the record
          is committed, ``held`` says whether any owner holds one.
        - Doom marks, ``MARK_BUCKETS`` buckets of 128 B: ``MARK_WAYS`` entries (a marked key's
          tag, how many marks, when the last runs out) and an overflow (how many marks of keys
          that found every entry taken, when the last runs out): the keys a write transaction
          is deleting. ``doom`` marks keys before the transaction's last look at
          their leases, ``undoom`` takes the marks off after its commit, and ``grant`` answers
          with the keys it finds marked.

Why: a save does not copy a block whose value it finds on SSD. Until its record commits, nothing
in the store says the block is wanted, so another transaction (another process's, or this
process's writer running a batch taken before the save) could delete the value, and the
commit's check (``Batch.put_session``) then cut the record back before it: 5.3 % of saves in a
two-process fp32 soak at a full SSD budget with no leases, and still 1.2 % with leases alone
(``bench/soak.py``), because a transaction could look at a key's lease before the save wrote it
and commit the deletion after the save looked at the store. The handshake closes that window:

- the transaction marks a key (``doom``) before it looks at the key's lease, and takes the mark
  off only after its commit (a key it keeps after all too: saves copy it meanwhile);
- the save writes its lease before it looks at the marks (``grant``), then at the store.

The two are serialized by a file lock (``flock``), whose release and acquisition also order
the two processes' memory. Grants and releases hold it exclusively too, and within a process
a thread lock as well: each reads a slot and writes it back, so two at once lost leases. A
release that read the slot before another process's grant shifted its owners wrote its zero
over the newer lease, and two grants that read a slot together each wrote their own owner over
the other's (session 47: in two processes granting and releasing the same keys, each holding at
most one lease per key, up to 6.7 % of the leases checked were gone; none since:
``bench/lease_race.py``). So either
the transaction's look comes after the lease, and it keeps the block (an unowned block, evicted
later), or the save finds the mark and copies the block as if it were not on SSD, or the mark is
gone and the save's look at the store, after its commit, finds the value gone. The lock is held
only while a save's slots are written or read, never across a commit: a grant for a 1M-token
session's 3,907 blocks holds it about half a millisecond (``bench/ops.py``, 0.51 ms p50 in
bench/results/ops_session47.json), a few blocks' for microseconds.

Owners: a save's lease is its own (``new_owner``), so its commit takes off only its own, and a
transaction keeps what any save, in this process or another, has leased (a batch taken before
the save does not know it: ``Batch.keep`` covers only the saves queued before it).

Hints, not locks: a lease slot holds the last leases of any key that maps to it, so a collision
replaces older ones, a third owner replaces the older of two still leasing (a commit's release
frees its column for the next), and a lease runs out; eviction that must take a leased block to
make room takes it. Either way a record may be cut back, never
wrong: the commit's check stays the guarantee. Marks are counted, so none is lost to a
collision: a key's marks go to the entry of its bucket that holds its tag, or a free one, and
only where all ``MARK_WAYS`` hold live marks of other keys to the bucket's overflow,
which stands for every key of the bucket until its count is back to zero: at worst a save
copies a block that was not being deleted. (Until session 45 a mark slot held one tag and a
flag: two keys in a slot already stood for every key of it, 855 needless copies in a bf16
soak.) A process killed between its marks and its commit leaves them until they run out.
Times are wall-clock, so processes on one machine agree.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import threading
import time
from contextlib import contextmanager
from typing import Collection, Iterator, Sequence

import numpy as np

from .errors import StoreIOError

try:
    import fcntl
except ImportError:  # Windows: no flock; the handshake's order is then a hint too
    fcntl = None  # type: ignore[assignment]

__all__ = ["Leases", "LEASES_FILE", "LEASE_S", "LEASE_SLOTS", "MARK_BUCKETS", "MARK_WAYS"]

LEASES_FILE = "leases.bin"
#: the file's first page: its layout's name (a file with another is cleared at open)
HEADER = b"tierkv leases v4"
HEADER_BYTES = 4096
#: lease slots (32 B each: 1 MiB)
LEASE_SLOTS = 1 << 15
#: doom mark buckets, after the leases; each holds ``MARK_WAYS`` keys' marks and an overflow
#: (128 B each: 1 MiB)
MARK_BUCKETS = 1 << 13
MARK_WAYS = 4
_MARK_WORDS = 16  # u64 per bucket: MARK_WAYS x (tag, marks, expiry), overflow (marks, expiry), 2 spare
_OVER = 3 * MARK_WAYS  # the overflow's column
#: the whole file, allocated on disk when it is created: a page of a sparse file first written
#: through the map when the file system is full kills the process (SIGBUS)
FILE_BYTES = HEADER_BYTES + LEASE_SLOTS * 32 + MARK_BUCKETS * _MARK_WORDS * 8
#: how long a lease lasts: longer than a save's record normally waits in the writer's queue
#: (the commit's check covers a longer wait)
LEASE_S = 60.0
#: how long a mark lasts: longer than a transaction takes from its marks to its commit; a
#: process killed in between leaves marks that make saves copy those blocks until then
MARK_S = 60.0
_MASK = (1 << 64) - 1


def _allocate(fd: int) -> bool:
    """Give the file ``FILE_BYTES`` of disk blocks (it never shrinks); False where the file
    system is full (or over quota)."""
    full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, FILE_BYTES)
                return True
            except OSError as e:
                if e.errno in full:
                    raise  # otherwise (a file system without it): zeros, below
        have = os.fstat(fd).st_size
        if have < FILE_BYTES:  # zeros written are blocks allocated
            os.pwrite(fd, bytes(FILE_BYTES - have), have)
    except OSError as e:
        if e.errno in full:
            return False
        raise
    return True


def _tags(keys: Sequence[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")


def _rounds(keys: Sequence[bytes]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``keys``' (tags, mark buckets) in rounds of at most one key per bucket: the first key of
    each bucket, then the second, and so on, so that a round's work on whole bucket rows,
    vectorized, does what one key at a time would."""
    tags = _tags(keys)
    buckets = (tags % MARK_BUCKETS).astype(np.int64)
    order = np.argsort(buckets, kind="stable")
    ordered = buckets[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    for r in range(int(rank.max()) + 1):
        pick = np.flatnonzero(rank == r)
        yield tags[pick], buckets[pick]


def _entries(m: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """For rows ``m`` of the mark table and a key's tag per row: which entries hold marks of
    that key (at most one: ``doom`` keeps a key in one entry), run out or not."""
    return (m[:, 0:_OVER:3] == tags[:, None]) & (m[:, 1:_OVER:3] > 0)


class Leases:
    """The lease and mark tables of one store directory; see the module docstring."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LEASES_FILE)
        self._map = None
        self._fds: list[int] = []
        try:
            # two open files: a lock is held per open file, so this process's saves (leases,
            # on the first) and its writer's marks (on the second) exclude each other as two
            # processes' would
            for _ in range(2):
                self._fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._lock(1, exclusive=True)
            try:
                self.shared = _allocate(self._fds[0])
                # shared, read-write; where the file system had no room for the file, this
                # process's own memory: its saves and its writer still hand over, other
                # processes do not see its leases (the commit's check covers them)
                self._map = mmap.mmap(self._fds[0] if self.shared else -1, FILE_BYTES)
                if self._map[:len(HEADER)] != HEADER:  # new, or another layout's: start clear
                    self._map[:] = bytes(FILE_BYTES)
                    self._map[:len(HEADER)] = HEADER
            finally:
                self._unlock(1)
        except OSError as e:
            self.close()
            raise StoreIOError(f"cannot open the lease table {path}: {e}") from None
        #: slot -> (tag, expiry in ns since the epoch, latest owner, the owner before it); 0: none
        self._slots = np.frombuffer(self._map, dtype="<u8", count=LEASE_SLOTS * 4,
                                    offset=HEADER_BYTES).reshape(LEASE_SLOTS, 4)
        #: bucket -> MARK_WAYS x (tag, marks, when the last runs out in ns since the epoch),
        #: then the overflow's (marks, when the last runs out); 0 marks: free
        self._marks = np.frombuffer(self._map, dtype="<u8", count=MARK_BUCKETS * _MARK_WORDS,
                                    offset=HEADER_BYTES + LEASE_SLOTS * 32).reshape(MARK_BUCKETS, _MARK_WORDS)
        self._base = int.from_bytes(os.urandom(8), "little")
        self._count = itertools.count(1)
        #: this process's grants so far: live leases of other saves they wrote over (a key of
        #: another tag in the slot, or the older of two owners), and keys they answered as
        #: marked only because their bucket's overflow holds marks
        self.displaced = 0
        self.shared_marks = 0
        #: this process's threads granting and releasing (an flock does not exclude two
        #: threads locking through one open file)
        self._slot_writers = threading.Lock()

    def _lock(self, which: int, exclusive: bool) -> None:
        if fcntl is not None:
            fcntl.flock(self._fds[which], fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def _unlock(self, which: int) -> None:
        if fcntl is not None:
            fcntl.flock(self._fds[which], fcntl.LOCK_UN)

    @contextmanager
    def _writing_slots(self) -> Iterator[None]:
        """The lease slots to this thread alone, of every process: a grant or a release reads
        slots and writes them back."""
        with self._slot_writers:
            self._lock(0, exclusive=True)
            try:
                yield
            finally:
                self._unlock(0)

    def new_owner(self) -> int:
        """An owner id for one save's leases: unique among this table's users, never 0."""
        return ((self._base + 2 * next(self._count)) & _MASK) | 1

    def grant(self, keys: Sequence[bytes], owner: int, seconds: float = LEASE_S) -> set[bytes]:
        """Lease ``keys`` (16-byte block keys) for ``seconds`` from now, as ``owner``; returns
        the keys a write transaction is deleting (marked): the save must not trust their values."""
        if not keys:
            return set()
        tags = _tags(keys)
        slots = tags % LEASE_SLOTS
        buckets = tags % MARK_BUCKETS
        me = np.uint64(owner)
        with self._writing_slots():
            now = time.time_ns()
            cur = self._slots[slots]  # a copy
            live = (cur[:, 0] == tags) & (cur[:, 1] > now)
            mine = live & ((cur[:, 2] == me) | (cur[:, 3] == me))
            self._slots[slots, 0] = tags
            self._slots[slots, 2] = np.where(mine, cur[:, 2], me)
            # the owner before: the newer of the two still leasing (a released owner is 0), so
            # a slot with one free column loses no live lease
            before = np.where(cur[:, 2] != 0, cur[:, 2], cur[:, 3])
            self._slots[slots, 3] = np.where(mine, cur[:, 3], np.where(live, before, 0))
            self._slots[slots, 1] = now + int(seconds * 1e9)
            # this grant's own keys that share a slot: the last one written keeps it
            crowded = int(np.count_nonzero(self._slots[slots, 0] != tags))
            m = self._marks[buckets]  # a copy
        # counted outside the lock: the live leases written over, another key's (one or two
        # owners), the older owner of this key's, and this grant's own keys that share a slot
        other = (cur[:, 0] != tags) & (cur[:, 1] > now)
        self.displaced += crowded + int(np.count_nonzero(other[:, None] & (cur[:, 2:] != 0))
                                        + np.count_nonzero(live & ~mine & (cur[:, 2] != 0) & (cur[:, 3] != 0)))
        own = (_entries(m, tags) & (m[:, 2:_OVER:3] > now)).any(axis=1)
        over = (m[:, _OVER] > 0) & (m[:, _OVER + 1] > now)
        self.shared_marks += int(np.count_nonzero(over & ~own))
        return {keys[i] for i in np.flatnonzero(own | over)}

    def release(self, keys: Sequence[bytes], owner: int) -> None:
        """Take ``owner``'s leases off ``keys`` (its record that names them is committed, or
        failed); other owners' leases on them stay."""
        if not keys:
            return
        tags = _tags(keys)
        slots = tags % LEASE_SLOTS
        me = np.uint64(owner)
        with self._writing_slots():
            ours = slots[self._slots[slots, 0] == tags]  # a slot another key has taken since is left
            for col in (2, 3):
                self._slots[ours[self._slots[ours, col] == me], col] = 0

    def _slot(self, key: bytes) -> tuple[bool, int, list[int]]:
        """``key``'s lease slot: whether it holds the key's lease, when that runs out, its owners."""
        tag = int.from_bytes(key[:8], "little")
        _tag, expiry, *owners = (int(x) for x in self._slots[tag % LEASE_SLOTS])
        return _tag == tag, expiry, owners

    def held(self, key: bytes) -> bool:
        """Whether any save holds a lease on ``key`` that has not run out."""
        ours, expiry, owners = self._slot(key)
        return ours and expiry > time.time_ns() and any(owners)

    def standing(self, key: bytes, owner: int) -> str:
        """How ``owner``'s lease on ``key`` stands now: "held" (it is in the slot and has not run
        out), "ran_out", "taken" (another key's lease has taken the slot) or "pushed_out" (the
        slot's lease on the key no longer names the owner: two later saves of the block, or
        another key took the slot and a later grant of this key took it back). Asked by a commit that
        found the value of a block its save trusted gone (``Batch.put_session``): which way the
        value got past the lease."""
        ours, expiry, owners = self._slot(key)
        if not ours:
            return "taken"
        if owner not in owners:
            return "pushed_out"
        return "held" if expiry > time.time_ns() else "ran_out"

    def doom(self, keys: Sequence[bytes], seconds: float = MARK_S) -> None:
        """Mark ``keys`` as being deleted, before the caller's last look at their leases, for at
        most ``seconds`` (``undoom`` takes the marks off once the caller has committed)."""
        if not keys:
            return
        self._lock(1, exclusive=True)
        try:
            now = time.time_ns()
            until = now + int(seconds * 1e9)
            for tags, buckets in _rounds(keys):
                m = self._marks[buckets]  # a copy
                rows = np.arange(len(tags))
                # the entry holding the key's marks, else a free one: no marks, or only marks run
                # out (left by a process killed before its commit)
                mine = _entries(m, tags)
                free = (m[:, 1:_OVER:3] == 0) | (m[:, 2:_OVER:3] <= now)
                has = mine.any(axis=1)
                fresh = ~has & free.any(axis=1)
                col = np.where(has, 1 + 3 * mine.argmax(axis=1),
                               np.where(fresh, 1 + 3 * free.argmax(axis=1), _OVER))  # else every entry another key's
                m[rows[fresh], col[fresh] - 1] = tags[fresh]
                count, expiry = m[rows, col], m[rows, col + 1]
                gone = fresh | (expiry <= now)  # a free entry's, or an overflow's run out
                m[rows, col] = np.where(gone, 0, count) + 1
                m[rows, col + 1] = np.where(gone, until, np.maximum(expiry, until))
                self._marks[buckets] = m
        finally:
            self._unlock(1)

    def undoom(self, keys: Collection[bytes]) -> None:
        """Take the marks ``doom`` set on ``keys`` off (their transaction committed or aborted)."""
        if not keys:
            return
        self._lock(1, exclusive=True)
        try:
            for tags, buckets in _rounds(list(keys)):
                m = self._marks[buckets]  # a copy
                rows = np.arange(len(tags))
                # the key's entry, or else the overflow, where a mark of it went when every entry
                # was taken: a key with marks left is then still marked by one or the other
                mine = _entries(m, tags)
                col = np.where(mine.any(axis=1), 1 + 3 * mine.argmax(axis=1), _OVER)
                count = m[rows, col]
                m[rows, col] = count - (count > 0)  # never below zero
                self._marks[buckets] = m
        finally:
            self._unlock(1)

    def close(self) -> None:
        """Unmap the tables and close the files (idempotent)."""
        if self._map is not None:
            del self._slots, self._marks
            self._map.close()
            self._map = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
