"""Leases: blocks a save has just trusted on SSD, kept from other processes' eviction.

Primitives:
    Leases: a table of ``LEASE_SLOTS`` slots in a file of the store directory (``leases.bin``),
        mapped shared by every process that has the store open. ``grant`` writes a lease for
        each key (its first 8 bytes as a tag, and when the lease runs out), ``release`` ends
        the leases of keys a committed record now references, ``held`` reads one.

Why: a save does not copy a block whose value it finds on SSD. Until its record commits, nothing
in the store says the block is wanted, and another process sharing the store could evict the
session that referenced it, deleting its value; the commit's check (``Batch.put_session``) then
cut the record back before it (5.3 % of saves in a two-process fp32 soak at a full SSD budget,
``bench/soak.py``). A save now leases such blocks before it looks at the store, and a write
transaction keeps a leased block that loses its last reference as an unowned block instead of
deleting it; eviction passes over leased unowned blocks while it can take anything else.

A lease is a hint, not a lock: there is no lock around the table. Slot ``tag % LEASE_SLOTS``
holds the last lease granted for any key of that slot, so a collision replaces an older lease;
a read racing a write may see half of one. Either way a lease is lost or kept a moment too long,
never more: the commit's check stays the guarantee, and an unowned block kept too long is
evicted later like any other. Leases are wall-clock times, so processes on one machine agree.
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
#: slots in the table (16 B each: a 2 MiB file, sparse until written)
LEASE_SLOTS = 1 << 17
#: how long a lease lasts: longer than a save's record normally waits in the writer's queue
#: (the commit's check covers a longer wait)
LEASE_S = 60.0


class Leases:
    """The lease table of one store directory; see the module docstring."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LEASES_FILE)
        size = LEASE_SLOTS * 16
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
        #: slot -> (tag, expiry in ns since the epoch)
        self._slots = np.frombuffer(self._map, dtype="<u8").reshape(LEASE_SLOTS, 2)

    def grant(self, keys: Sequence[bytes], seconds: float = LEASE_S) -> None:
        """Lease ``keys`` (16-byte block keys) for ``seconds`` from now."""
        if not keys:
            return
        tags = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        slots = tags % LEASE_SLOTS
        self._slots[slots, 0] = tags
        self._slots[slots, 1] = int((time.time() + seconds) * 1e9)

    def release(self, keys: Sequence[bytes]) -> None:
        """End the leases on ``keys`` (a record that references them has been written)."""
        if not keys:
            return
        tags = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")
        slots = tags % LEASE_SLOTS
        mine = slots[self._slots[slots, 0] == tags]  # a slot another key has taken since is left
        self._slots[mine, 1] = 0

    def held(self, key: bytes) -> bool:
        """Whether a lease on ``key`` is in the table and has not run out."""
        tag = int.from_bytes(key[:8], "little")
        slot = self._slots[tag % LEASE_SLOTS]
        return int(slot[0]) == tag and int(slot[1]) > time.time() * 1e9

    def close(self) -> None:
        """Unmap the table (idempotent)."""
        if self._map is not None:
            del self._slots
            self._map.close()
            self._map = None
