"""Memory tiers: the device pool (GPU memory, or a CPU pool without CUDA) and host DRAM.

Primitives:
    MemoryTier: a byte budget, exact usage and an LRU order over the blocks it holds.

A tier only keeps books; the engine decides moves and the movers copy bytes. Usage counts block
payload bytes exactly (``Block.nbytes``), not allocator overhead. A page-locked host tier takes
its full-block buffers from a ``hostmem.SlabPool`` (page-locking new memory is slow).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch

from . import hostmem
from .blocks import Block, BlockState

__all__ = ["MemoryTier"]


class MemoryTier:
    """Blocks resident in one memory, least recently used first.

    Args:
        name: ``"device"`` or ``"host"``.
        device: where its payloads live.
        budget: bytes it may hold; 0 disables the tier.
        pin: allocate page-locked host memory (host tier with CUDA present).
        pool: where buffers of its size come from first (a page-locked host tier's full blocks).
    """

    def __init__(self, name: str, device: torch.device, budget: int, pin: bool = False,
                 pool: hostmem.SlabPool | None = None) -> None:
        self.name = name
        self.device = device
        self.budget = budget
        self.pin = pin
        self.pool = pool
        self.used = 0
        self._lru: OrderedDict[bytes, Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer for a payload of ``nbytes`` in this tier's memory."""
        if self.pool is not None and nbytes == self.pool.slot_bytes:
            buf = self.pool.take()
            if buf is not None:
                return buf
        if self.device.type == "cpu":
            return hostmem.host_buffer(nbytes, self.pin)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def add(self, block: Block, payload: torch.Tensor) -> None:
        """Make ``payload`` the block's resident copy here (most recently used)."""
        block.tier, block.payload = self.name, payload
        self._lru[block.key] = block
        self.used += block.nbytes

    def remove(self, block: Block) -> torch.Tensor | None:
        """Forget the block's copy here; returns the payload (still valid while referenced)."""
        if self._lru.pop(block.key, None) is None:
            return None
        self.used -= block.nbytes
        payload, block.tier, block.payload = block.payload, None, None
        return payload

    def clear(self) -> None:
        """Forget every block's copy here (close): the payloads go once nothing else holds them."""
        for block in self._lru.values():
            block.tier, block.payload = None, None
        self._lru.clear()
        self.used = 0

    def touch(self, block: Block) -> None:
        if block.key in self._lru:
            self._lru.move_to_end(block.key)

    def excess(self) -> int:
        """Bytes above budget (0 when within it)."""
        return max(0, self.used - self.budget)

    def victims(self) -> Iterator[Block]:
        """Evictable blocks, least recently used first: READY and not pinned; then, while the
        pinned blocks alone hold more than the budget, the least recently used pinned ones.

        ``save`` refuses a pinned session whose new bytes would take a tier's pinned bytes past
        its budget, but blocks also become pinned, or move up a tier, without new bytes: a
        session pinned again over blocks cached already, a prefetch promoting pinned blocks, a
        pinned record loaded from disk. A pin keeps a session from SSD eviction, and in memory
        as far as the budget allows; without the second pass such a tier stayed over budget and
        every later save waited for a writer with nothing to move. A disabled tier (budget 0)
        only passes blocks through, pinned ones included.
        """
        pinned = []
        for block in list(self._lru.values()):
            if block.state is BlockState.READY:
                if block.pins == 0 or self.budget == 0:
                    yield block
                else:
                    pinned.append(block)
        over = self.pinned_bytes() - self.budget
        for block in pinned:
            if over <= 0:
                return
            if block.pins > 0 and block.key in self._lru:
                yield block
                over -= block.nbytes

    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self._lru.values() if b.pins > 0)
