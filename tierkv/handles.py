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
from .movers import LayerTargets, layer_targets

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


@dataclass(eq=False)
class _Part:
    block: Block
    start: int                      # first token of the block in the restored prefix
    used: int                       # tokens of the block that belong to the prefix
    payload: torch.Tensor | None    # resident copy captured when the load started
    load: BlockLoad | None          # or the SSD read into host memory that will produce it
    source: str
    direct: bool = False            # or decoded from SSD straight into the result by this handle
    error: BaseException | None = None


Allocator = Callable[[int, int, tuple, torch.dtype, torch.device], torch.Tensor]


def _default_alloc(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class LoadHandle:
    """An in-flight restore or prefetch of a cached prefix.

    ``num_tokens`` is the prefix length planned when the load started; the result tensors are
    allocated then (through ``allocate``, so a caller can place them in its own buffers).
    ``layer(i)`` waits only for layer ``i`` of every block, so a loop can run layer 0 while later
    layers are still decoding; ``result()`` waits for everything and truncates the prefix at the
    first block that failed its checksum (a counted miss), never returning damaged KV.
    """

    def __init__(self, spec: "KVSpec", parts: list[_Part], device: torch.device,
                 on_failed: Callable[[int, int], None], allocate: Allocator | None = None) -> None:
        self._spec = spec
        self._parts = parts
        self._device = device
        self._on_failed = on_failed
        self.num_tokens = sum(p.used for p in parts)
        alloc = allocate or _default_alloc
        self._outs: list[tuple[torch.Tensor, ...]] = [
            tuple(alloc(li, ti, t.shape(self.num_tokens), t.torch_dtype, device) for ti, t in enumerate(layer.tensors))
            for li, layer in enumerate(spec.layers)] if self.num_tokens else []
        self._targets_cache: list[LayerTargets | None] = [None] * spec.num_layers
        n_direct = sum(p.direct for p in parts)
        self._direct_left = [n_direct] * spec.num_layers
        self._layer_ready = [threading.Event() for _ in spec.layers]
        if n_direct == 0:
            for ev in self._layer_ready:
                ev.set()
        self._filled = [False] * spec.num_layers
        self._lock = threading.Lock()        # counters, taken by decode tasks
        self._fill_lock = threading.Lock()   # copies; may wait on loads, so never the one above

    # -- called by the engine's decode tasks -------------------------------------------------------
    def _targets(self, layer: int) -> LayerTargets:
        """Layer ``layer``'s result tensors as byte arrays to decode into, built on first use (two
        tasks racing to build them build equal views; either is kept)."""
        t = self._targets_cache[layer]
        if t is None:
            t = self._targets_cache[layer] = layer_targets(self._spec, layer, self._outs[layer])
        return t

    def _direct_layer_done(self, layer: int) -> None:
        with self._lock:
            self._direct_left[layer] -= 1
            ready = self._direct_left[layer] == 0
        if ready:
            self._layer_ready[layer].set()

    # -- waiting ------------------------------------------------------------------------------------
    def done(self) -> bool:
        return all(ev.is_set() for ev in self._layer_ready) and all(
            p.load is None or p.load.done.is_set() for p in self._parts)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every block is loaded (or failed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        # Last layer first: the decode tasks run layer after layer, so the last layer is
        # normally the last one done, and the caller then wakes once, not once per layer. Each
        # wake-up takes the GIL away from the decode threads while they are mid-restore.
        for ev in reversed(self._layer_ready):
            if not ev.wait(left()):
                return False
        for p in reversed(self._parts):
            if p.load is not None and not p.load.done.wait(left()):
                return False
        return True

    def _failed(self, p: _Part) -> BaseException | None:
        return p.error or (p.load.error if p.load is not None else None)

    def _fill(self, i: int) -> None:
        """Copy layer ``i`` of the parts that are not decoded in place (memory or host loads)."""
        with self._fill_lock:
            if self._filled[i]:
                return
            for p in self._parts:
                if p.direct:
                    continue
                if p.load is not None:
                    p.load.layer_done[i].wait()
                    if p.load.error is not None:
                        continue
                src_payload = p.payload if p.payload is not None else p.load.buffer
                for ti, t in enumerate(self._spec.layers[i].tensors):
                    src = tensor_view(self._spec, src_payload, p.block.n_tokens, i, ti)
                    self._outs[i][ti].narrow(t.seq_axis, p.start, p.used).copy_(src.narrow(t.seq_axis, 0, p.used))
            self._filled[i] = True

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s tensors for the whole prefix, as soon as that layer is loaded.

        Raises:
            BlockLoadError: a block of the prefix failed to load; recompute from
                ``first_bad_token``.
        """
        if not 0 <= i < self._spec.num_layers:
            raise TierKVError(f"layer {i} outside 0..{self._spec.num_layers - 1}")
        if not self.num_tokens:
            return tuple(torch.empty(t.shape(0), dtype=t.torch_dtype, device=self._device)
                         for t in self._spec.layers[i].tensors)
        self._layer_ready[i].wait()
        self._fill(i)
        for p in self._parts:
            err = self._failed(p)
            if err is not None:
                raise BlockLoadError(f"block at token {p.start} failed to load: {err}", p.start)
        return self._outs[i]

    def result(self) -> RestoredKV:
        """Wait for every block and return the restored prefix (truncated at a failed block)."""
        self.wait()
        good: list[_Part] = []
        for p in self._parts:
            if self._failed(p) is not None:
                self._on_failed(p.start, self.num_tokens - p.start)
                break
            good.append(p)
        n = sum(p.used for p in good)
        sources: dict[str, int] = {}
        for p in good:
            sources[p.source] = sources.get(p.source, 0) + 1
        if not n:
            return RestoredKV(0, [], sources)
        for i in range(self._spec.num_layers):
            self._fill(i)
        kv = [tuple(x.narrow(t.seq_axis, 0, n) if n < self.num_tokens else x
                    for t, x in zip(self._spec.layers[i].tensors, self._outs[i]))
              for i in range(self._spec.num_layers)]
        return RestoredKV(n, kv, sources)
