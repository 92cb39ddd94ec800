"""Movers: the code that moves block bytes between tiers, and nothing else.

Primitives:
    Transfer: a move as data: source tier, destination tier, blocks.
    MOVERS: the registry of memory-to-memory moves, one function per (source, destination) pair.
    copy_stream: the side CUDA stream a device's copies run on (one per device).
    copy_payload: device <-> host copy (on that side stream when CUDA is used).
    same_memory: whether a move between memory tiers needs no copy (both tiers in plain CPU memory).
    encode_payload: host -> SSD bytes (the codec); the LMDB write itself is the writer's.
    decode_layer_into: SSD bytes -> one layer of a host buffer (prefetch: the block is cached).
    decode_layer_into_views: SSD bytes -> one layer of the caller's result tensors (restore).
    read_layers_direct: stored layers of one block, read with O_DIRECT in one request straight
        into the caller's result tensors (``ssd_page_cache="bypass"``).

Bookkeeping (which block, which state) stays in engine.py; a mover never takes the engine's lock.
"""

from __future__ import annotations

import itertools
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .blocks import Block
from .codec import (Codec, ParsedBlock, decode_layer, encode_block, iter_layer_planes, join_byte_pair, read_stored_layer,
                    read_stored_layers)
from .spec import KVSpec
from .tiers import MemoryTier

__all__ = ["Transfer", "MOVERS", "copy_stream", "copy_payload", "same_memory", "encode_payload", "decode_layer_into", "decode_layer_into_views",
           "read_layers_direct", "LayerTargets", "layer_targets"]


@dataclass(frozen=True)
class Transfer:
    """One move: ``blocks`` from tier ``src`` to tier ``dst`` ("device", "host" or "ssd").

    ``payloads`` are the source copies, captured under the engine's lock when the move was
    planned: a block may be dropped meanwhile, but the bytes being moved stay valid.
    """

    src: str
    dst: str
    blocks: tuple[Block, ...]
    payloads: tuple[torch.Tensor, ...]


_streams: dict[torch.device, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream tierkv copies on for a CUDA ``device`` (one per device, made on first use)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _streams.get(device)
    if stream is None:
        with _streams_lock:
            stream = _streams.get(device)
            if stream is None:
                stream = _streams[device] = torch.cuda.Stream(device=device)
    return stream


def copy_payload(payload: torch.Tensor, dst: MemoryTier) -> torch.Tensor:
    """Copy a payload into a new buffer of ``dst`` and return it once the copy is complete.

    With CUDA the copy runs on a dedicated stream, so it overlaps the caller's compute stream,
    and is synchronised before returning: a returned buffer is always safe to read.
    """
    out = dst.alloc(payload.numel())
    cuda_dev = payload.device if payload.is_cuda else (dst.device if dst.device.type == "cuda" else None)
    if cuda_dev is None:
        out.copy_(payload)
        return out
    stream = copy_stream(cuda_dev)
    stream.wait_stream(torch.cuda.current_stream(cuda_dev))
    with torch.cuda.stream(stream):
        out.copy_(payload, non_blocking=True)
    stream.synchronize()
    return out


def encode_payload(codec: Codec, fingerprint: bytes, spec: KVSpec, block: Block, payload: torch.Tensor,
                   align: tuple[int, int] | None = None,
                   into: Callable[[int], memoryview | None] | None = None) -> bytes | memoryview:
    """Encode a host payload into a self-describing SSD value (planes page-aligned in the store's
    file when ``align``, ``SSDStore.value_alignment``, is given; into a buffer ``into`` gives,
    where it gives one: ``encode_block``)."""
    if payload.device.type != "cpu":
        payload = payload.cpu()
    return encode_block(codec, fingerprint, spec, payload.numpy(), block.n_tokens, key=block.key, align=align, into=into)


def decode_layer_into(codec: Codec, spec: KVSpec, parsed: ParsedBlock, layer: int, buffer: torch.Tensor) -> None:
    """Decode ``layer`` of a parsed SSD value into its byte range of a host buffer."""
    start, end = spec.layer_span(layer, parsed.n_tokens)
    decode_layer(codec, parsed, layer, buffer[start:end].numpy())


@dataclass(frozen=True)
class LayerTargets:
    """One layer's result tensors as the byte arrays a decode writes into, built once per restore
    and layer (``layer_targets``) instead of once per (block, layer) task: building the views per
    task took a fifth of decoding a stored fp32 layer from the page cache (117 against 95 us for a
    256-token SmolLM2 block, one thread), all of it under the GIL the other decode thread needs."""

    #: per tensor: its bytes, shape ``tensor.shape + (itemsize,)``
    u8s: tuple[np.ndarray, ...]
    #: per tensor and index of the axes before the sequence axis (e.g. per head): a C-contiguous
    #: array whose first axis is the token axis, so any token range of it is one read segment;
    #: None when a tensor is not laid out so (or there are too many for one ``preadv``)
    runs: tuple[np.ndarray, ...] | None
    #: (block tokens, tokens used, planes) -> where a block's byte planes land (``_plane_plan``)
    plans: dict = field(default_factory=dict, compare=False)


def layer_targets(spec: KVSpec, layer: int, outs: tuple[torch.Tensor, ...]) -> LayerTargets:
    """Byte views of ``layer``'s result tensors (CPU, last axis contiguous, any other strides)."""
    u8s: list[np.ndarray] = []
    runs: list[np.ndarray] | None = []
    for t, out in zip(spec.layers[layer].tensors, outs):
        u8 = _reshaped(out.view(torch.uint8).numpy(), tuple(out.shape) + (t.itemsize,))
        u8s.append(u8)
        for idx in itertools.product(*map(range, u8.shape[:t.seq_axis])):  # cheaper than np.ndindex
            run = u8[idx]
            if runs is None or not run.flags.c_contiguous:
                runs = None
                break
            runs.append(run)
    return LayerTargets(tuple(u8s), tuple(runs) if runs is not None and len(runs) <= 512 else None)


def _reshaped(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` viewed in ``shape``; raises rather than silently copying (writes must land in ``a``)."""
    try:
        return np.reshape(a, shape, copy=False)
    except TypeError:  # numpy before 2.1 has no copy=; setting the shape of a view raises alike
        v = a.view()
        v.shape = shape
        return v


def decode_layer_into_views(codec: Codec, spec: KVSpec, parsed: ParsedBlock, layer: int,
                            targets: LayerTargets, start: int, used: int) -> None:
    """Decode ``layer`` of a parsed SSD value straight into the caller's output tensors.

    ``targets``: ``layer_targets`` of the layer's tensors for the whole restored prefix; the
    block's first ``used`` tokens land at token ``start``. This skips the host-tier copy: bytes go
    from the disk (a stored layer: one vectored read) or through the codec into the result once.
    """
    n = parsed.n_tokens
    k = parsed.layers[layer][0]  # planes as stored: 1 when the layer was stored unsplit
    if used == n and parsed.read_at is not None and targets.runs is not None and k == 1:
        if read_stored_layer(parsed, layer, [run[start:start + used] for run in targets.runs]):
            return
    plan = targets.plans.get((n, used, k))
    if plan is None:
        plan = targets.plans[(n, used, k)] = _plane_plan(spec, layer, targets, n, used, k)
    at = slice(start, start + used)
    layer_bytes, entries = plan
    writes = [(dst[lead + (at,)], elems[lead + (at,)] if elems is not None else None, cnt, shape, cut)
              for dst, elems, lead, cnt, shape, cut in entries]
    if k == 2 and all(w[1] is not None for w in writes):
        (_, lo), (_, hi) = iter_layer_planes(codec, parsed, layer, layer_bytes)
        off = 0
        for _, elems, cnt, shape, cut in writes:
            join_byte_pair(lo[off:off + cnt].reshape(shape)[cut], hi[off:off + cnt].reshape(shape)[cut], elems)
            off += cnt
        return
    for j, plane in iter_layer_planes(codec, parsed, layer, layer_bytes):
        off = 0
        for dst, elems, cnt, shape, cut in writes:
            part = plane[off:off + cnt].reshape(shape)[cut]
            off += cnt
            if k == 1:
                dst[...] = part
            elif j == 0 and elems is not None:
                # plane 0 (the least significant byte on a little-endian machine) as whole
                # elements, zero-extended; each later plane as bytes at a stride of k: faster
                # than strided writes for every plane, and than a shift-or of every plane for
                # k = 4 (two planes take join_byte_pair above)
                elems[...] = part
            else:
                dst[..., j] = part


def read_layers_direct(parsed: ParsedBlock, layers: range, align: int, targets: Callable[[int], LayerTargets],
                       start: int, used: int) -> bool:
    """Read ``layers`` of a block, all stored as they are and lying back to back in its value,
    with one O_DIRECT request (``ValueFile.direct``) straight into the ``targets`` (``layer ->
    LayerTargets``, as ``decode_layer_into_views`` takes them) at token ``start``, for a block
    used whole (``used`` = its tokens); then check each layer's CRC32C.

    Returns False, having read nothing, when a destination is not on an ``align`` boundary in
    address and size (O_DIRECT moves whole sectors by DMA): the caller then reads the layers
    through the page cache. The value's side (file offset, length) is the caller's to check.
    """
    if used != parsed.n_tokens:
        return False
    dsts = []
    for layer in layers:
        runs = targets(layer).runs
        if runs is None:
            return False
        dsts.append([run[start:start + used] for run in runs])
    if any(d.ctypes.data % align or d.nbytes % align for ds in dsts for d in ds):
        return False
    read_stored_layers(parsed, layers, dsts, parsed.read_at.direct)
    return True


def _plane_plan(spec: KVSpec, layer: int, targets: LayerTargets, n: int, used: int, k: int) -> tuple[int, list]:
    """How a block of ``n`` tokens (``used`` of them kept) in ``k`` planes lands in ``targets``,
    computed once per restore, layer and block shape rather than per task: the layer's bytes,
    and per tensor (its bytes, its elements as ``k``-byte integers or None, the index up to the
    token axis, its bytes per plane, a plane part's shape, the cut to ``used`` tokens)."""
    wide = _WIDE.get(k) if _LITTLE and k > 1 else None
    entries = []
    for t, u8 in zip(spec.layers[layer].tensors, targets.u8s):
        shape = t.shape(n) + ((t.itemsize,) if k == 1 else ())
        cut = tuple(slice(0, used) if a == t.seq_axis else slice(None) for a in range(len(t.dims) + 1))
        entries.append((u8, u8.view(wide)[..., 0] if wide is not None else None, (slice(None),) * t.seq_axis,
                        t.bytes_per_token * n // k, shape, cut))
    return spec.layers[layer].bytes_per_token * n, entries


_LITTLE = sys.byteorder == "little"
#: plane count -> the unsigned integer of that many bytes, for joining planes as whole elements
_WIDE = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _memory_move(transfer: Transfer, tiers: dict[str, MemoryTier]) -> list[torch.Tensor]:
    dst = tiers[transfer.dst]
    return [p if same_memory(p, dst) else copy_payload(p, dst) for p in transfer.payloads]


def same_memory(payload: torch.Tensor, tier: MemoryTier) -> bool:
    """Whether ``payload`` already lies in the kind of memory ``tier`` allocates (a "device" tier
    on the CPU next to an unpinned host tier): moving it there is a change of tier, not a copy.
    Payloads are never written after they are packed, so the moved block may keep the buffer."""
    return payload.device == tier.device and payload.device.type == "cpu" and payload.is_pinned() == tier.pin


#: (src, dst) -> mover for moves between memory tiers; they return the new payloads. Moves to and
#: from SSD are driven by the engine's writer and loader, which call encode_payload and
#: decode_layer_into / decode_layer_into_views around their LMDB transactions.
MOVERS: dict[tuple[str, str], Callable[[Transfer, dict[str, MemoryTier]], list[torch.Tensor]]] = {
    ("device", "host"): _memory_move,
    ("host", "device"): _memory_move,
}
