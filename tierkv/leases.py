"""Leases and doom marks: the handshake between a save that trusts blocks on SSD and a write
transaction that deletes blocks, in any process or thread sharing the store.

Primitives:
    Leases: two tables in a file of the store directory (``leases.bin``), mapped shared by every
        process that has the store open.
        - Leases, ``LEASE_SLOTS`` slots of 32 B: a key's first 8 bytes as a tag, when the lease
          runs out, and its last two owners. An owner is one save (``new_owner``); ``grant``
          writes its lease on each of its record's keys, ``release`` takes it off once the record
          is committed, ``held`` says whether any owner holds one.
        - Doom marks, ``MARK_SLOTS`` slots of 32 B (the marked key's tag, how many marks, when
          the last runs out, whether keys of other tags are marked there too): the keys a write
          transaction is deleting. ``doom`` marks keys before the transaction's last look at
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
  off only after its commit;
- the save writes its lease before it looks at the marks (``grant``), then at the store.

The two are serialized by a file lock (``flock``; exclusive for marking and unmarking, shared
for granting), whose release and acquisition also order the two processes' memory. So either
the transaction's look comes after the lease, and it keeps the block (an unowned block, evicted
later), or the save finds the mark and copies the block as if it were not on SSD, or the mark is
gone and the save's look at the store, after its commit, finds the value gone. The lock is held
only while a few slots are written or read: a save waits microseconds, never for a commit.

Owners: a save's lease is its own (``new_owner``), so its commit takes off only its own, and a
transaction keeps what any save, in this process or another, has leased (a batch taken before
the save does not know it: ``Batch.keep`` covers only the saves queued before it).

Hints, not locks: a lease slot holds the last leases of any key that maps to it, so a collision
replaces older ones, a third owner replaces the oldest of two, and a lease runs out; eviction
that must take a leased block to make room takes it. Either way a record may be cut back, never
wrong: the commit's check stays the guarantee. A mark slot counts its marks, so it never loses
one to a collision: a slot holding marks of two tags stands for every key that maps to it
until its count is back to zero, which at worst makes a save copy a block that was not being
deleted. A process killed between its marks and its commit leaves them until they run out.
Times are wall-clock, so processes on one machine agree.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import time
from typing import Collection, Sequence

import numpy as np

from .errors import StoreIOError

try:
    import fcntl
except ImportError:  # Windows: no flock; the handshake's order is then a hint too
    fcntl = None  # type: ignore[assignment]

__all__ = ["Leases", "LEASES_FILE", "LEASE_S", "LEASE_SLOTS", "MARK_SLOTS"]

LEASES_FILE = "leases.bin"
#: the file's first page: its layout's name (a file with another is cleared at open)
HEADER = b"tierkv leases v3"
HEADER_BYTES = 4096
#: lease slots (32 B each: 1 MiB)
LEASE_SLOTS = 1 << 15
#: doom mark slots (32 B each: 1 MiB), after the leases
MARK_SLOTS = 1 << 15
#: the whole file, allocated on disk when it is created: a page of a sparse file first written
#: through the map when the file system is full kills the process (SIGBUS)
FILE_BYTES = HEADER_BYTES + LEASE_SLOTS * 32 + MARK_SLOTS * 32
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


class Leases:
    """The lease and mark tables of one store directory; see the module docstring."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LEASES_FILE)
        self._map = None
        self._fds: list[int] = []
        try:
            # two open files: a lock is held per open file, so this process's saves (shared,
            # on the first) and its writer's marks (exclusive, on the second) exclude each
            # other as two processes' would
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
        #: slot -> (tag, marks, when the last runs out in ns since the epoch, 1 where marks of
        #: other tags share the slot)
        self._marks = np.frombuffer(self._map, dtype="<u8", count=MARK_SLOTS * 4,
                                    offset=HEADER_BYTES + LEASE_SLOTS * 32).reshape(MARK_SLOTS, 4)
        self._base = int.from_bytes(os.urandom(8), "little")
        self._count = itertools.count(1)
        #: this process's grants so far: live leases of other saves they wrote over (a key of
        #: another tag in the slot, or the older of two owners), and keys they answered as
        #: marked only because their mark slot holds marks of several tags
        self.displaced = 0
        self.shared_marks = 0

    def _lock(self, which: int, exclusive: bool) -> None:
        if fcntl is not None:
            fcntl.flock(self._fds[which], fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def _unlock(self, which: int) -> None:
        if fcntl is not None:
            fcntl.flock(self._fds[which], fcntl.LOCK_UN)

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
        marks = tags % MARK_SLOTS
        me = np.uint64(owner)
        self._lock(0, exclusive=False)
        try:
            now = time.time_ns()
            cur = self._slots[slots]  # a copy
            live = (cur[:, 0] == tags) & (cur[:, 1] > now)
            mine = live & ((cur[:, 2] == me) | (cur[:, 3] == me))
            self._slots[slots, 0] = tags
            self._slots[slots, 2] = np.where(mine, cur[:, 2], me)
            self._slots[slots, 3] = np.where(mine, cur[:, 3], np.where(live, cur[:, 2], 0))
            self._slots[slots, 1] = now + int(seconds * 1e9)
            # this grant's own keys that share a slot: the last one written keeps it
            crowded = int(np.count_nonzero(self._slots[slots, 0] != tags))
            m = self._marks[marks]
            marked = np.flatnonzero((m[:, 1] > 0) & (m[:, 2] > now) & ((m[:, 0] == tags) | (m[:, 3] == 1)))
        finally:
            self._unlock(0)
        # counted outside the lock: the live leases written over, another key's (one or two
        # owners), the older owner of this key's, and this grant's own keys that share a slot
        other = (cur[:, 0] != tags) & (cur[:, 1] > now)
        self.displaced += crowded + int(np.count_nonzero(other[:, None] & (cur[:, 2:] != 0))
                                        + np.count_nonzero(live & ~mine & (cur[:, 3] != 0)))
        self.shared_marks += int(np.count_nonzero(m[marked, 0] != tags[marked]))
        return {keys[i] for i in marked}

    def release(self, keys: Sequence[bytes], owner: int) -> None:
        """Take ``owner``'s leases off ``keys`` (its record that names them is committed, or
        failed); other owners' leases on them stay."""
        if not keys:
            return
        tags = _tags(keys)
        slots = tags % LEASE_SLOTS
        me = np.uint64(owner)
        ours = slots[self._slots[slots, 0] == tags]  # a slot another key has taken since is left
        for col in (2, 3):
            self._slots[ours[self._slots[ours, col] == me], col] = 0

    def held(self, key: bytes) -> bool:
        """Whether any save holds a lease on ``key`` that has not run out."""
        tag = int.from_bytes(key[:8], "little")
        _tag, expiry, *owners = (int(x) for x in self._slots[tag % LEASE_SLOTS])
        return _tag == tag and expiry > time.time_ns() and any(owners)

    def doom(self, keys: Sequence[bytes], seconds: float = MARK_S) -> None:
        """Mark ``keys`` as being deleted, before the caller's last look at their leases, for at
        most ``seconds`` (``undoom`` takes the marks off once the caller has committed)."""
        if not keys:
            return
        marks = self._marks
        self._lock(1, exclusive=True)
        try:
            now = time.time_ns()
            until = now + int(seconds * 1e9)
            for key in keys:
                tag = int.from_bytes(key[:8], "little")
                slot = tag % MARK_SLOTS
                was, count, expiry, many = (int(x) for x in marks[slot])
                if expiry <= now:
                    count = 0  # left by a process killed before its commit: run out
                if count == 0:
                    was, many = tag, 0
                marks[slot] = (was, count + 1, max(expiry, until), 1 if many or was != tag else 0)
        finally:
            self._unlock(1)

    def undoom(self, keys: Collection[bytes]) -> None:
        """Take the marks ``doom`` set on ``keys`` off (their transaction committed or aborted)."""
        if not keys:
            return
        marks = self._marks
        self._lock(1, exclusive=True)
        try:
            for key in keys:
                slot = int.from_bytes(key[:8], "little") % MARK_SLOTS
                if marks[slot, 1] > 0:
                    marks[slot, 1] -= 1
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
