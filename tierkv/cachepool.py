"""KV memory kept from one restore to the next: what a server restores into.

Primitives:
    CachePool: per-(layer, tensor) buffers, reserved at start-up (``reserve``) and handed out again
        by later restores (``allocator`` for ``TierKV.restore_async``; ``buffer`` for code that
        wants the whole buffer, headroom included, as ``integrations.hf.restore_cache`` does).

Needs torch only: a server that does not use transformers restores into a pool the same way.
"""

from __future__ import annotations

import torch

from . import hostmem
from .config import check_device, is_int
from .errors import ConfigError
from .handles import Allocator, slab_alloc
from .spec import KVSpec

__all__ = ["CachePool"]


class CachePool:
    """Per-layer KV buffers kept from one restore to the next: a server's KV memory pool.

    Why: a restore into fresh tensors pays a page fault and a page zeroing per 4 KiB of KV the
    first time each page is written, taken from the prefill it overlaps: an 8K-token SmolLM2 turn
    restored from cold SSD takes 559 ms into fresh tensors, 425 ms into a pool
    (bench/ttft_parts.py). Buffers from the pool are already mapped.

    A buffer is handed out again by the next restore that asks for the same (layer, tensor): the
    pool serves one restore at a time, and a restore's tensors are valid until the next one
    (``integrations.hf.SessionRunner`` owns one pool and runs one turn at a time).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], torch.Tensor] = {}

    def buffer(self, layer: int, index: int, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str, seq_axis: int = 2) -> torch.Tensor:
        """The buffer of tensor ``index`` of ``layer``: at least ``shape``, larger only along
        ``seq_axis`` (the token axis; 2 for transformers' ``[1, heads, tokens, dim]``). The one
        held is returned while it is large enough and of that dtype and device; else a new one
        replaces it."""
        return self._buffer(layer, index, shape, dtype, check_device(device), seq_axis)

    def _buffer(self, layer: int, index: int, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device, seq_axis: int) -> torch.Tensor:
        """``buffer`` for a device already checked: a restore's ``allocate`` gets the one the
        engine checked when the restore began, and is called per layer and tensor."""
        have = self._bufs.get((layer, index))
        if (have is not None and have.dtype == dtype and have.device == device and have.dim() == len(shape)
                and have.shape[seq_axis] >= shape[seq_axis]
                and have.shape[:seq_axis] == tuple(shape[:seq_axis])
                and have.shape[seq_axis + 1:] == tuple(shape[seq_axis + 1:])):
            return have
        buf = self._bufs[(layer, index)] = _empty(tuple(shape), dtype, device)
        return buf

    def reserve(self, spec: KVSpec, tokens: int, device: torch.device | str = "cpu") -> None:
        """Allocate and touch buffers for ``tokens`` tokens of every layer (at start-up), each
        ``[1, *tensor shape]``. On the CPU they are carved from one buffer on huge pages
        (``handles.slab_alloc``), where ``ssd_page_cache="bypass"`` reads a few MiB per disk
        request."""
        _check_spec(spec)
        if not is_int(tokens) or tokens < 1:
            raise ConfigError(f"tokens must be an int >= 1, got {tokens!r}")
        device = check_device(device)
        carve = slab_alloc(spec, tokens) if device.type == "cpu" else None
        for i, layer in enumerate(spec.layers):
            for j, t in enumerate(layer.tensors):
                shape = (1, *t.shape(tokens))
                if carve is not None:
                    self._bufs[(i, j)] = carve(i, j, shape, t.torch_dtype, device)
                self._buffer(i, j, shape, t.torch_dtype, device, 1 + t.seq_axis).zero_()

    def allocator(self, spec: KVSpec) -> Allocator:
        """An ``allocate`` for ``TierKV.restore_async`` that hands out views of this pool's
        buffers: ``store.restore_async(tokens, allocate=pool.allocator(store.spec))``. A restore
        longer than the buffers held gets larger ones (kept for the next)."""
        _check_spec(spec)
        axes = [[t.seq_axis for t in layer.tensors] for layer in spec.layers]

        def allocate(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            axis = axes[layer][index]
            full = self._buffer(layer, index, (1, *shape), dtype, device, 1 + axis)
            return full[0].narrow(axis, 0, shape[axis])
        return allocate


def _check_spec(spec: object) -> None:
    if not isinstance(spec, KVSpec):
        raise ConfigError(f"spec must be a tierkv.KVSpec, got {type(spec).__name__}")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pool's buffer; on the CPU page-aligned, so ``ssd_page_cache="bypass"`` can fill it with
    O_DIRECT once it is reused."""
    if device.type == "cpu":
        return hostmem.aligned_empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)
