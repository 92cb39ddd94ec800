"""Leases: blocks a save has just trusted on SSD, kept from other processes' eviction.

Primitives:
    Leases: a table of ``LEASE_SLOTS`` slots in a file of the store directory (``leases.bin``),
        mapped shared by every process that has the store open, each open with an owner id of
        its own. ``grant`` writes this owner's lease on each key (a slot: the key's first 8
        bytes as a tag, when the lease runs out, and its last two owners), ``release`` takes
        this owner off the keys a committed record now references, ``held`` says whether
        another owner holds one.

Why: a save does not copy a block whose value it finds on SSD. Until its record commits, nothing
in the store says the block is wanted, and another process sharing the store could evict the
session that referenced it, deleting its value; the commit's check (``Batch.put_session``) then
cut the record back before it (5.3 % of saves in a two-process fp32 soak at a full SSD budget,
``bench/soak.py``). A save now leases such blocks before it looks at the store, and a write
transaction keeps a leased block that loses its last reference as an unowned block instead of
deleting it; eviction passes over leased unowned blocks while it can take anything else.

Owners: a process's transactions pass over its own leases (its queued records' blocks are
kept by ``Batch.keep`` already, and a drop there deletes what it always did), and a commit takes
only its own owner off a key: two processes saving the same session's prefix each hold the
lease until their own record commits. A first version kept one lease per key, ended by any
commit naming the key; in a two-process soak where both save the same sessions' shared
prefixes, that cut 2.2 % of saves back against 5.3 % with no leases (``bench/soak.py``,
docs/reliability.md).

A lease is a hint, not a lock: there is no lock around the table. Slot ``tag % LEASE_SLOTS``
holds the last leases granted for any key of that slot, so a collision replaces older ones, a
third owner replaces the oldest of two, and a read racing a write may see half of one. Either
way a lease is lost or kept a moment too long, never more: the commit's check stays the
guarantee, and an unowned block kept too long is evicted later like any other. Leases are
wall-clock times, so processes on one machine agree.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Sequence

import numpy as np

from .errors import StoreIOError

__all__ = ["Leases", "LEASES_FILE", "LEASE_S", "LEASE_SLOTS"]

LEASES_FILE = "leases.bin"
#: slots in the table (32 B each: a 4 MiB file, sparse until written)
LEASE_SLOTS = 1 << 17
#: how long a lease lasts: longer than a save's record normally waits in the writer's queue
#: (the commit's check covers a longer wait)
LEASE_S = 60.0


class Leases:
    """The lease table of one store directory, as one owner sees it; see the module docstring."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LEASES_FILE)
        size = LEASE_SLOTS * 32
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)  # shared, read-write
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreIOError(f"cannot open the lease table {path}: {e}") from None
        #: slot -> (tag, expiry in ns since the epoch, latest owner, the owner before it); 0: none
        self._slots = np.frombuffer(self._map, dtype="<u8").reshape(LEASE_SLOTS, 4)
        self.owner = int.from_bytes(os.urandom(8), "little") | 1

    @staticmethod
    def _tags(keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        tags = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        return tags, tags % LEASE_SLOTS

    def grant(self, keys: Sequence[bytes], seconds: float = LEASE_S) -> None:
        """Lease ``keys`` (16-byte block keys) for ``seconds`` from now, as this owner."""
        if not keys:
            return
        tags, slots = self._tags(keys)
        now = time.time_ns()
        me = np.uint64(self.owner)
        cur = self._slots[slots]  # a copy
        live = (cur[:, 0] == tags) & (cur[:, 1] > now)
        mine = live & ((cur[:, 2] == me) | (cur[:, 3] == me))
        self._slots[slots, 0] = tags
        self._slots[slots, 2] = np.where(mine, cur[:, 2], me)
        self._slots[slots, 3] = np.where(mine, cur[:, 3], np.where(live, cur[:, 2], 0))
        self._slots[slots, 1] = now + int(seconds * 1e9)

    def release(self, keys: Sequence[bytes]) -> None:
        """Take this owner off the leases on ``keys`` (its record that names them is written);
        other owners' leases on them stay."""
        if not keys:
            return
        tags, slots = self._tags(keys)
        me = np.uint64(self.owner)
        ours = slots[self._slots[slots, 0] == tags]  # a slot another key has taken since is left
        for col in (2, 3):
            self._slots[ours[self._slots[ours, col] == me], col] = 0

    def held(self, key: bytes) -> bool:
        """Whether another owner holds a lease on ``key`` that has not run out."""
        tag = int.from_bytes(key[:8], "little")
        _tag, expiry, *owners = (int(x) for x in self._slots[tag % LEASE_SLOTS])
        return _tag == tag and expiry > time.time_ns() and any(o not in (0, self.owner) for o in owners)

    def close(self) -> None:
        """Unmap the table (idempotent)."""
        if self._map is not None:
            del self._slots
            self._map.close()
            self._map = None
