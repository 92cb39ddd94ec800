"""Counters behind ``TierKV.stats()``.

Primitives:
    Stats: thread-safe counters and per-direction byte/second totals.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

__all__ = ["Stats", "CUT_STANDINGS"]

#: how a save's lease can stand when its commit finds a trusted block's value gone
#: (``Leases.standing``): the keys of ``stats()["cuts_by_lease"]``
CUT_STANDINGS = ("held", "pushed_out", "taken", "ran_out")


class Stats:
    """Counts events and bytes moved; ``snapshot`` turns them into the public dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._moved: dict[str, list[float]] = {}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def moved(self, direction: str, nbytes: int, seconds: float) -> None:
        """Record ``nbytes`` moved in ``direction`` (e.g. ``"ssd->host"``) taking ``seconds``."""
        if nbytes <= 0:
            return
        with self._lock:
            cell = self._moved.setdefault(direction, [0, 0.0, 0])
            cell[0] += nbytes
            cell[1] += seconds
            cell[2] += 1

    def snapshot(self, resident: dict[str, int], blocks: dict[str, int], budgets: dict[str, int]) -> dict[str, Any]:
        with self._lock:
            c = dict(self._counts)
            moved = {d: {"bytes": int(b), "seconds": s, "ops": n, "gbps": (b / s / 1e9) if s > 0 else None}
                     for d, (b, s, n) in self._moved.items()}
        raw, enc = c.get("ssd_raw_written", 0), c.get("ssd_enc_written", 0)
        lookups, hits = c.get("lookup_tokens", 0), c.get("hit_tokens", 0)
        return {
            "hits": {t: c.get(f"hit_blocks_{t}", 0) for t in ("device", "host", "ssd")},
            "hit_tokens": hits,
            "miss_tokens": max(0, lookups - hits),
            "corrupt_blocks": c.get("corrupt_blocks", 0),
            # blocks a restore or prefetch had matched that were evicted or dropped before their
            # read (misses, nothing damaged)
            "vanished_blocks": c.get("vanished_blocks", 0),
            # session records read from the store again because another process sharing it saved
            # the session further, or down another branch, since this one read it
            "sessions_reread": c.get("sessions_reread", 0),
            # sessions whose record was cut back as it was committed: a block it newly named had
            # lost its value (another process sharing the store, or this commit's eviction, removed
            # it after the save looked), and this process held no copy of it
            "sessions_cut": c.get("sessions_cut", 0),
            # sessions_cut, by how the save's lease on the block found without a value stood at
            # the cut (leases.py): "held" (a transaction took the block all the same: eviction
            # with nothing else left, leased_blocks_evicted in whichever process evicted it),
            # "pushed_out" (the slot's lease on the block no longer named the save: two later
            # saves of it, or another block's lease took the slot and a later save of this
            # block took it back),
            # "taken" (another block's lease took the slot), "ran_out"
            "cuts_by_lease": {how: c.get(f"cut_lease_{how}", 0) for how in CUT_STANDINGS},
            # values a commit wrote from this process's memory because a record being committed
            # named them and the store had none: another process had removed them after a save
            # here looked, or (write-through) the write that claimed them had failed
            "values_written_again": c.get("values_written_again", 0),
            # blocks this process's write transactions kept, as unowned blocks, when their last
            # reference went (an eviction, a drop, an expiry), because a save (in this process or
            # another) had leased them: its record is about to name them (leases.py)
            "blocks_kept_for_leases": c.get("blocks_kept_for_leases", 0),
            # leased unowned blocks this process's eviction took all the same, nothing else
            # being left to take: a save that trusted one is cut back at its commit
            "leased_blocks_evicted": c.get("leased_blocks_evicted", 0),
            # blocks a save here copied although their values were on SSD, because a write
            # transaction was deleting them as it looked (leases.py: their marks)
            "blocks_copied_being_deleted": c.get("blocks_copied_being_deleted", 0),
            # blocks a save found held in this process's memory as "on SSD" whose value the
            # store no longer had (another process had removed it): written again from memory
            "stale_blocks_rewritten": c.get("stale_blocks_rewritten", 0),
            "dropped_saves": c.get("dropped_saves", 0),
            # saves that ended before a block the caller had not given all the rows of
            # (``known_from``: a restore left them unread) and the store no longer held
            "saves_cut_unknown": c.get("saves_cut_unknown", 0),
            "saved_tokens": c.get("saved_tokens", 0),
            "moved": moved,
            "resident_bytes": resident,
            "resident_blocks": blocks,
            "budgets": budgets,
            "ssd_read_bytes": c.get("ssd_read_bytes", 0),
            # (block, layer) pairs of restores left unread because the caller had no need of them
            # (``needed_from``: its own copy, or a layer's window no longer reaching them)
            "skipped_block_layers": c.get("skipped_block_layers", 0),
            # of ssd_read_bytes, bytes read with O_DIRECT (ssd_page_cache="bypass"), past the page cache
            "ssd_direct_read_bytes": c.get("ssd_direct_read_bytes", 0),
            # values whose place in data.mdb did not check out, read through LMDB's map instead
            "pread_fallbacks": c.get("pread_fallbacks", 0),
            # I/O threads the kernel would not move onto their CPU slice (io_affinity="spread")
            "io_affinity_refused": c.get("io_affinity_refused", 0),
            # where the writer's time went: waiting for its values' encoding (on the I/O threads;
            # a batch's encodes start while the one before commits), and the write transactions
            # that stored them, of which LMDB's commit (writing its dirty pages to data.mdb, then
            # fdatasync); the rest of a transaction is copying values into LMDB's pages and the
            # bookkeeping
            "ssd_writes": {"batches": c.get("ssd_batches", 0),
                           "encode_seconds": c.get("ssd_encode_us", 0) / 1e6,
                           "transaction_seconds": c.get("ssd_transaction_us", 0) / 1e6,
                           "commit_seconds": c.get("ssd_commit_us", 0) / 1e6,
                           # values past 32 MiB encoded into a buffer the writer had used before
                           # (given back once LMDB copied its value), or into a new one
                           "buffers_reused": c.get("encode_buffers_reused", 0),
                           "buffers_new": c.get("encode_buffers_new", 0)},
            "ssd_raw_written": raw,
            "ssd_enc_written": enc,
            "compression_ratio": (raw / enc) if enc else None,
            # saves that waited for the writer because a memory tier ran over its budget's slack
            "backpressure": {"save_waits": c.get("save_waits", 0),
                             "seconds": c.get("save_wait_us", 0) / 1e6,
                             "timeouts": c.get("save_wait_timeouts", 0)},
            "evicted": {"host_blocks": c.get("host_evicted_blocks", 0),
                        # released from a device tier with no host tier under it (their copy on SSD)
                        "device_blocks": c.get("device_evicted_blocks", 0),
                        "ssd_sessions": c.get("ssd_evicted_sessions", 0)},
        }
