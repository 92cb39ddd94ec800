"""Loads: the half of ``TierKV`` that serves restores and prefetches once matched.

Primitives:
    Loads: one of ``TierKV``'s base classes. ``_start_load_open`` takes the blocks a load
        matched and decides, under the engine's lock, where each comes from: a copy from a
        memory tier, a wait on a prefetch already loading it, or a read from SSD (straight into
        the result for a restore, into the host tier for a prefetch), then hands the SSD reads
        to ``reads.SSDReads``. The rest are what those reads report back, on the I/O pool's
        threads (``_layers_loaded``, ``_load_complete``, ``_load_failed``, ``_direct_failed``,
        ``_background_error``), and a prefetch's move of host blocks up to the device
        (``_promote``).

A block that fails its checksum ends the restore's prefix there and is marked corrupt (a counted
miss, never wrong KV); one whose value another process removed meanwhile is forgotten.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .blocks import Block, BlockLoad, BlockState
from .codec import CorruptValueError, ValueGoneError
from .handles import LoadHandle, _Part, part_ends
from .movers import MOVERS, Transfer
from .reads import SSDReads
from .records import SessionRecord
from .spec import KVSpec
from .stats import Stats
from .tiers import MemoryTier

__all__ = ["Loads"]


class Loads:
    """The loads' half of ``TierKV``; see the module docstring.

    Runs on the engine's records under the engine's lock: the attributes below are the engine's
    (set in ``TierKV.__init__``), listed here as what this half uses; of the engine's methods it
    calls ``_match`` (the blocks of a cached prefix) and ``_forget_vanished`` (a block whose value
    another process removed).
    """

    spec: KVSpec
    block_tokens: int
    _tiers: dict[str, MemoryTier]
    _stats: Stats
    _pool: ThreadPoolExecutor
    _reads: SSDReads
    _lock: threading.RLock
    _wake: threading.Condition
    _blocks: dict[bytes, Block]
    _sessions: dict[str, SessionRecord]
    _touched: dict[str, float]
    _bg_error: BaseException | None

    def _start_load_open(self, toks: Any, session: str | None, tenant: str | None, promote: bool,
                         dev: torch.device, staged: bool, allocate: Any, needed: list[int] | None = None) -> LoadHandle:
        """The handle of a load ``TierKV._start_load`` has admitted: each block of the matched
        prefix captured from its memory tier, joined to a prefetch loading it, or read from SSD,
        straight into the result (a restore) or into the host tier (a prefetch, ``promote``).
        A block no layer needs (``needed``: per layer, the first token the caller needs) is
        only counted into the prefix: nothing of it is read, copied or moved."""
        direct_ok = not promote
        B = self.block_tokens
        now = time.time()
        parts: list[_Part] = []
        loads: list[BlockLoad] = []
        promote_now: list[Block] = []
        least = min(needed) if needed is not None else 0
        with self._lock:
            for i, (b, used) in enumerate(self._match(toks, session, tenant)):
                if i * B + used <= least:  # the caller holds it, or no layer's window reaches it
                    parts.append(_Part(b, i * B, used, None, None, b.tier or "ssd", skipped=True))
                elif b.tier is not None:
                    self._tiers[b.tier].touch(b)
                    parts.append(_Part(b, i * B, used, b.payload, None, b.tier))
                    if promote and b.tier == "host" and b.state is BlockState.READY:
                        promote_now.append(b)
                elif b.load is not None or not direct_ok:
                    if b.load is None:
                        b.load = BlockLoad(b, None, [threading.Event() for _ in self.spec.layers], self.spec.num_layers)
                        b.state = BlockState.LOADING
                        loads.append(b.load)
                    parts.append(_Part(b, i * B, used, None, b.load, "ssd"))
                else:
                    parts.append(_Part(b, i * B, used, None, None, "ssd", direct=True))
            rec = self._sessions.get(session) if session is not None else None
            if rec is not None and rec.tenant == tenant:
                rec.last_used = max(rec.last_used, now)   # TTLs count from the last use
                self._touched[session] = rec.last_used
        # allocates the results (a caller's ``allocate`` is checked there: ConfigError, before
        # any read starts or the hit is counted)
        handle = LoadHandle(self.spec, parts, dev, self._count_failed, allocate, staged=staged, lazy=promote,
                            needed=needed)
        self._stats.count("lookup_tokens", len(toks))
        self._stats.count("hit_tokens", sum(p.used for p in parts))
        for p in parts:
            if not p.skipped:
                self._stats.count(f"hit_blocks_{p.source}", 1)
        if needed is not None:
            ends = part_ends(parts)
            self._stats.count("skipped_block_layers", sum(handle.unneeded(ends, layer)
                                                          for layer in range(self.spec.num_layers)))
        direct = [p for p in parts if p.direct]
        if loads or direct:
            self._reads.submit(loads, direct, handle, promote)
        if promote_now:  # the handle's wait() covers them: a waiter finds the blocks on the device
            handle._wait_also([self._pool.submit(self._guard, self._promote, b) for b in promote_now])
        return handle

    def _count_failed(self, first_token: int, lost_tokens: int) -> None:
        self._stats.count("hit_tokens", -lost_tokens)

    # ------------------------------------------------------------------ SSD reads' outcomes (reads.SSDReads)
    def _direct_failed(self, p: _Part, error: BaseException, handle: LoadHandle, all_layers: bool) -> None:
        """A block decoded straight into a result failed: a counted miss; mark it corrupt
        (unless it only left the store meanwhile)."""
        with self._lock:
            first = p.error is None
            p.error = p.error or error
            if isinstance(error, ValueGoneError):
                if first:
                    self._stats.count("vanished_blocks", 1)
                self._forget_vanished(p.block)
            elif isinstance(error, CorruptValueError):
                p.block.corrupt = True
                if first:
                    self._stats.count("corrupt_blocks", 1)
        if all_layers:
            for layer in range(self.spec.num_layers):
                if handle._needs(p, layer):
                    handle._direct_layer_done(layer)

    def _layers_loaded(self, bl: BlockLoad, n: int, promote: bool) -> None:
        """``n`` more layers of a prefetch's block are in its host buffer; the last completes it."""
        with self._lock:
            bl.remaining -= n
            complete = bl.remaining == 0
        if complete:
            self._load_complete(bl, promote)

    def _background_error(self, error: BaseException) -> None:
        """A background thread failed unexpectedly: the next call raises it."""
        self._bg_error = self._bg_error or error

    def _load_complete(self, bl: BlockLoad, promote: bool) -> None:
        b = bl.block
        with self._lock:
            if self._blocks.get(b.key) is b and b.load is bl:
                b.load = None
                b.state = BlockState.READY
                self._tiers["host"].add(b, bl.buffer)
                self._wake.notify_all()
            else:
                promote = False
        if promote:  # before done: a waiter on a prefetch finds the block on the device
            try:
                self._promote(b)
            finally:
                bl.done.set()
        else:
            bl.done.set()

    def _load_failed(self, bl: BlockLoad, error: BaseException) -> None:
        b = bl.block
        with self._lock:
            if b.load is bl:
                b.load = None
                b.state = BlockState.READY
                if isinstance(error, CorruptValueError) and not isinstance(error, ValueGoneError):
                    b.corrupt = True
            if isinstance(error, ValueGoneError):
                self._forget_vanished(b)
            if isinstance(error, CorruptValueError) and bl.error is None:
                self._stats.count("vanished_blocks" if isinstance(error, ValueGoneError) else "corrupt_blocks", 1)
        bl.fail(error)

    def _promote(self, b: Block) -> None:
        """Move a host block up to the device tier (prefetch)."""
        dev = self._tiers["device"]
        with self._lock:
            if not dev.enabled or b.tier != "host" or b.state is not BlockState.READY or self._blocks.get(b.key) is not b:
                return
            b.state = BlockState.MOVING
            src = b.payload
        t0 = time.perf_counter()
        try:
            new = MOVERS[("host", "device")](Transfer("host", "device", (b,), (src,)), self._tiers)[0]
        finally:
            with self._lock:
                b.state = BlockState.READY
        if new is not src:  # a copy, not a change of tier in the same memory
            self._stats.moved("host->device", b.nbytes, time.perf_counter() - t0)
        with self._lock:
            if b.tier == "host" and b.payload is src and self._blocks.get(b.key) is b:
                self._tiers["host"].remove(b)
                dev.add(b, new)
                self._wake.notify_all()

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - surfaced by the next call
            self._background_error(e)
