"""What the hooks hand back to an inference loop.

Primitives:
    RestoredKV: a restored prefix: its token count and per-layer tensors.
    SaveHandle: completion of a save's persistence (write-through: values on SSD).
    LoadHandle: an in-flight restore or prefetch, waitable as a whole or layer by layer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .blocks import Block, BlockLoad, tensor_view
from .errors import BlockLoadError, TierKVError

if TYPE_CHECKING:
    from .spec import KVSpec

__all__ = ["RestoredKV", "SaveHandle", "LoadHandle"]


@dataclass
class RestoredKV:
    """A restored prefix.

    Attributes:
        num_tokens: tokens restored (0 on a miss).
        kv: one tuple of tensors per layer, each in its spec shape with ``num_tokens`` tokens;
            empty when ``num_tokens`` is 0.
        sources: blocks served from each tier (``"device"``, ``"host"``, ``"ssd"``).
    """

    num_tokens: int
    kv: list[tuple[torch.Tensor, ...]]
    sources: dict[str, int] = field(default_factory=dict)


class SaveHandle:
    """Completion of a save's background persistence.

    ``wait()`` returns once the session record (and, in write-through mode, every new block value)
    is committed to LMDB, and raises the error if the write failed (for example StoreFullError).
    The KV itself is cached in memory as soon as ``save`` returns.
    """

    def __init__(self, event: threading.Event, error: Callable[[], BaseException | None]) -> None:
        self._event = event
        self._error = error

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write; True when it completed, False on timeout; raises its error."""
        if not self._event.wait(timeout):
            return False
        err = self._error()
        if err is not None:
            raise err
        return True


@dataclass
class _Part:
    block: Block
    start: int                      # first token of the block in the restored prefix
    used: int                       # tokens of the block that belong to the prefix
    payload: torch.Tensor | None    # resident copy captured when the load started
    load: BlockLoad | None          # or the SSD read that will produce it
    source: str


class LoadHandle:
    """An in-flight restore or prefetch of a cached prefix.

    ``num_tokens`` is the prefix length planned when the load started. ``layer(i)`` waits only for
    layer ``i`` of every block, so a loop can run layer 0 while later layers are still decoding;
    ``result()`` waits for everything and truncates the prefix at the first block that failed its
    checksum (a counted miss), never returning damaged KV.
    """

    def __init__(self, spec: "KVSpec", parts: list[_Part], device: torch.device,
                 on_failed: Callable[[int, int], None]) -> None:
        self._spec = spec
        self._parts = parts
        self._device = device
        self._on_failed = on_failed
        self.num_tokens = sum(p.used for p in parts)

    def done(self) -> bool:
        return all(p.load is None or p.load.done.is_set() for p in self._parts)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every block is in memory (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self._parts:
            if p.load is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not p.load.done.wait(left):
                    return False
        return True

    def _source(self, p: _Part) -> torch.Tensor:
        return p.payload if p.payload is not None else p.load.buffer

    def _assemble(self, layer: int, parts: list[_Part], n_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        out = []
        for ti, t in enumerate(self._spec.layers[layer].tensors):
            dst = torch.empty(t.shape(n_tokens), dtype=t.torch_dtype, device=device)
            for p in parts:
                src = tensor_view(self._spec, self._source(p), p.block.n_tokens, layer, ti)
                dst.narrow(t.seq_axis, p.start, p.used).copy_(src.narrow(t.seq_axis, 0, p.used))
            out.append(dst)
        return tuple(out)

    def layer(self, i: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s tensors for the whole prefix, as soon as that layer is loaded.

        Raises:
            BlockLoadError: a block of the prefix failed to load; recompute from
                ``first_bad_token``.
        """
        if not 0 <= i < self._spec.num_layers:
            raise TierKVError(f"layer {i} outside 0..{self._spec.num_layers - 1}")
        for p in self._parts:
            if p.load is not None:
                p.load.layer_done[i].wait()
                if p.load.error is not None:
                    raise BlockLoadError(f"block at token {p.start} failed to load: {p.load.error}", p.start)
        return self._assemble(i, self._parts, self.num_tokens, torch.device(device) if device else self._device)

    def result(self, device: torch.device | str | None = None) -> RestoredKV:
        """Wait for every block and return the restored prefix (truncated at a failed block)."""
        self.wait()
        good: list[_Part] = []
        for p in self._parts:
            if p.load is not None and p.load.error is not None:
                self._on_failed(p.start, self.num_tokens - p.start)
                break
            good.append(p)
        n = sum(p.used for p in good)
        dev = torch.device(device) if device else self._device
        sources: dict[str, int] = {}
        for p in good:
            sources[p.source] = sources.get(p.source, 0) + 1
        kv = [self._assemble(li, good, n, dev) for li in range(self._spec.num_layers)] if n else []
        return RestoredKV(n, kv, sources)
