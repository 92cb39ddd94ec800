"""Block records and payload layout.

Primitives:
    BlockState: what is happening to a block's bytes (an Enum, never a magic count).
    Epoch: a counter that moves whenever a block becomes available or unavailable.
    Block: bookkeeping of one block: where its payload is, its references and pins.
    pack_block: copy a token range of per-layer KV into one flat block payload.
    pack_blocks: the same for several blocks of one save, in one batched copy.
    block_views: every tensor of a block payload, as views in their spec shapes.
    tensor_view: a tensor of a block payload, viewed in its spec shape (no copy).

A payload is one flat uint8 tensor of ``n_tokens * spec.bytes_per_token`` bytes (layout in spec.py),
so a move between tiers is one copy and accounting is exact to the byte.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .spec import KVSpec

__all__ = ["BlockState", "Epoch", "Block", "pack_block", "pack_blocks", "block_views", "tensor_view"]


class BlockState(enum.Enum):
    """State of a block's bytes. Only READY blocks may be demoted or dropped from memory."""

    READY = "ready"          # stable where it is
    LOADING = "loading"      # being read from SSD into host memory
    MOVING = "moving"        # being copied between device and host
    WRITING = "writing"      # being written to SSD; memory copy still valid


class Epoch:
    """A store's availability epoch: bumped whenever one of its blocks becomes available or
    unavailable, or leaves the store's records. A result computed from blocks' availability at
    one epoch is still true while the epoch has not moved (the engine caches how many leading
    blocks of a session are available this way: a 1M-token session is 3,907 blocks to walk)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


_AVAILABILITY_FIELDS = frozenset(("tier", "load", "on_ssd", "corrupt"))


@dataclass(eq=False)
class Block:
    """One block. Guarded by the engine's lock; payload bytes are moved outside it.

    Setting a field that decides ``available`` bumps ``epoch`` when the answer changes, so no
    code path that moves or loses a block can forget to invalidate what was derived from it.
    """

    key: bytes
    n_tokens: int
    nbytes: int
    tier: str | None = None            # "device" | "host" | None (not in memory)
    payload: torch.Tensor | None = None
    on_ssd: bool = False
    refs: int = 0                      # sessions referencing it (mirrors the persisted count)
    pins: int = 0                      # pinned sessions referencing it
    state: BlockState = BlockState.READY
    load: "BlockLoad | None" = None    # the in-flight SSD read, while state is LOADING
    write_queued: bool = False         # a queued op will write its value to SSD
    corrupt: bool = False              # failed a checksum: a miss until rewritten or repaired
    repair: bool = False               # saved again after its SSD value failed a checksum: the next
                                       # write replaces that value (on_ssd is False meanwhile)
    epoch: Epoch | None = field(default=None, repr=False)  # the owning store's; None: not tracked

    def __post_init__(self) -> None:
        if self.epoch is not None:
            self.epoch.bump()  # a new record may answer for a key that had none

    @property
    def available(self) -> bool:
        """Whether a restore can have its bytes: in a memory tier, being loaded, or sound on SSD."""
        return self.tier is not None or self.load is not None or (self.on_ssd and not self.corrupt)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _AVAILABILITY_FIELDS and "epoch" in self.__dict__ and self.epoch is not None:
            before = self.available
            object.__setattr__(self, name, value)
            if self.available != before:
                self.epoch.bump()
        else:
            object.__setattr__(self, name, value)


@dataclass(eq=False)
class BlockLoad:
    """An in-flight SSD → host read of one block, waitable layer by layer."""

    block: Block
    buffer: torch.Tensor
    layer_done: list[threading.Event]
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        for ev in self.layer_done:
            ev.set()
        self.done.set()


def tensor_view(spec: KVSpec, payload: torch.Tensor, n_tokens: int, layer: int, index: int,
                layer_only: bool = False) -> torch.Tensor:
    """Tensor ``index`` of ``layer`` inside a block payload, in its spec shape (a view); with
    ``layer_only``, inside a buffer that holds that layer alone, laid out as in a payload."""
    t = spec.layers[layer].tensors[index]
    start = spec.tensor_offset(layer, index, n_tokens) - (spec.layer_span(layer, n_tokens)[0] if layer_only else 0)
    flat = payload[start:start + t.bytes_per_token * n_tokens]
    return flat.view(t.torch_dtype).view(t.shape(n_tokens))


def block_views(spec: KVSpec, payload: torch.Tensor, n_tokens: int) -> list[torch.Tensor]:
    """Every tensor of every layer inside a block payload, layer by layer, each a view in its
    spec shape. Built from one split of the payload (one reshape where every tensor has the same
    layout), not three tensor ops per tensor as ``tensor_view`` makes (see ``pack_blocks``)."""
    u, tensors = spec.uniform_tensor, spec.tensors
    if u is not None:
        return list(payload.view(u.torch_dtype).view(len(tensors), *u.shape(n_tokens)).unbind(0))
    chunks = payload[:spec.bytes_per_token * n_tokens].split([t.bytes_per_token * n_tokens for t in tensors])
    return [c.view(t.torch_dtype).view(t.shape(n_tokens)) for t, c in zip(tensors, chunks)]


def pack_blocks(spec: KVSpec, kv: Sequence[Sequence[torch.Tensor]], block_tokens: int,
                payloads: dict[int, torch.Tensor], serial: bool = False) -> None:
    """Copy block ``i``'s tokens ``[i * block_tokens, ...)`` of ``kv`` into ``payloads[i]``, for
    every ``i`` given, in one batched copy (``torch._foreach_copy_``: no Python per tensor).

    A 4,096-token SmolLM2 save is 960 (block, layer, tensor) copies: packed one by one, each
    through ``tensor_view``, they took 24.13 ms in fp32 on the test machine, batched 17.84 ms
    (``bench/pack_blocks.py``, 15 rounds side by side; bf16 16.53 against 11.57).

    ``serial``: copy on the calling thread alone (CPU copies; see ``serial_pieces``), for when
    other threads of the process need the cores."""
    if not payloads:
        return
    if serial and next(iter(payloads.values())).device.type == "cpu" and kv[0][0].device.type == "cpu":
        dsts, srcs, rest = _serial_full_blocks(spec, kv, block_tokens, payloads)
        if rest:  # a partial last block, or a layout that is not uniform: cut copy by copy
            more_d, more_s = serial_pieces(spec, *_block_copies(spec, kv, block_tokens, rest))
            dsts, srcs = dsts + more_d, srcs + more_s
    else:
        dsts, srcs = _block_copies(spec, kv, block_tokens, payloads)
    torch._foreach_copy_(dsts, srcs, non_blocking=True)


def _block_copies(spec: KVSpec, kv: Sequence[Sequence[torch.Tensor]], block_tokens: int,
                  payloads: dict[int, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Destination and source views of every (block, layer, tensor) copy, block by block."""
    # cut only the token range the given blocks span (a grown session's new blocks: its tail),
    # not the whole session: a 1M-token session is 3,907 blocks, and a view per block and tensor
    lo, start = min(payloads), min(payloads) * block_tokens
    stop = (max(payloads) + 1) * block_tokens
    pieces = [x.narrow(t.seq_axis, start, min(stop, x.shape[t.seq_axis]) - start).split(block_tokens, dim=t.seq_axis)
              for x, t in zip((x for layer in kv for x in layer), spec.tensors)]
    first = spec.tensors[0]
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for i, out in payloads.items():
        dsts.extend(block_views(spec, out, pieces[0][i - lo].shape[first.seq_axis]))
        srcs.extend(p[i - lo] for p in pieces)
    return dsts, srcs


def _serial_full_blocks(spec: KVSpec, kv: Sequence[Sequence[torch.Tensor]], block_tokens: int,
                        payloads: dict[int, torch.Tensor]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[int, torch.Tensor]]:
    """The pieces ``serial_pieces`` cuts, for the full blocks of a uniform layout, made with a
    few tensor ops per block and per source tensor instead of a split per (block, tensor); and
    the blocks left (a partial last one; all of them where the layout is not uniform).

    Why: ``serial_pieces`` splits each of a 4,096-token SmolLM2 save's 960 copies in Python
    (``Tensor.split``, twice): about 20 ms of the calling thread's time on the test machine, a
    third of its serial copy (``bench/pack_blocks.py``, session 34), all of it holding the GIL,
    which the writer's encoding threads want in the bursts where serial copies are made (a
    py-spy profile of such a burst found a large share of ``pack_blocks``' samples in
    ``Tensor.split``). Here every piece has the same
    token count, the largest divisor of the block size under the grain, so that a block's
    payload, viewed as ``[tensors, ..., pieces, step, ...]``, and each source tensor, viewed
    the same way along its token axis, unbind into the pieces directly."""
    u = spec.uniform_tensor
    full_bytes = block_tokens * spec.bytes_per_token
    full = [i for i, out in payloads.items() if out.numel() == full_bytes] if u is not None else []
    if not full:
        return [], [], payloads
    limit = max(1, (INTRA_OP_GRAIN - 1) // math.prod(u.dims))
    step = max(d for d in range(1, min(limit, block_tokens) + 1) if block_tokens % d == 0)
    per_block, axis, n_tensors = block_tokens // step, u.seq_axis, len(spec.tensors)
    lo, hi = min(full), max(full) + 1
    # every source tensor's tokens of those blocks, in pieces of `step`: piece g of block i is
    # number (i - lo) * per_block + g
    src = [x.narrow(axis, lo * block_tokens, (hi - lo) * block_tokens)
           .unflatten(axis, ((hi - lo) * per_block, step)).unbind(axis)
           for layer in kv for x in layer]
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for i in full:
        # [tensors, *shape with the token axis cut into (pieces, step)], pieces first
        cut = (payloads[i].view(u.torch_dtype).view(n_tensors, *u.shape(block_tokens))
               .unflatten(1 + axis, (per_block, step)).movedim(1 + axis, 0))
        first = (i - lo) * per_block
        for g, piece in enumerate(cut.unbind(0)):
            dsts.extend(piece.unbind(0))
            srcs.extend(s[first + g] for s in src)
    rest = {i: out for i, out in payloads.items() if out.numel() != full_bytes}
    return dsts, srcs, rest


#: torch copies a CPU tensor of this many elements or more on its intra-op (OpenMP) threads
#: (``at::internal::GRAIN_SIZE``), and a smaller one on the calling thread
INTRA_OP_GRAIN = 32768


def serial_pieces(spec: KVSpec, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same copies (tensors in ``spec.tensors`` order, repeating per block), cut along the
    sequence axis into pieces small enough that torch runs each on the calling thread.

    Why: a block's tensor (SmolLM2: 256 tokens x 3 heads x 64) is just over torch's grain, so
    each of a save's copies ran as a parallel region on both intra-op threads, a hundred
    kilobytes each. With the SSD writer busy on a two-core machine, a region's threads waited
    for one another, spinning: in a profile (``perf``) of a write-through burst, the two
    intra-op threads spent a large share of the run spinning in libgomp, while the writer, bound by the
    kernel's copies into the page cache, waited for a core. A piece's token count is the
    largest under the grain (one token at least)."""
    per_token = [math.prod(t.dims) for t in spec.tensors]  # elements per token of each spec tensor
    out_d: list[torch.Tensor] = []
    out_s: list[torch.Tensor] = []
    n = len(spec.tensors)
    for j, (d, s) in enumerate(zip(dsts, srcs)):
        t = spec.tensors[j % n]
        step = max(1, (INTRA_OP_GRAIN - 1) // per_token[j % n])
        if d.shape[t.seq_axis] <= step:
            out_d.append(d)
            out_s.append(s)
        else:
            out_d.extend(d.split(step, dim=t.seq_axis))
            out_s.extend(s.split(step, dim=t.seq_axis))
    return out_d, out_s


def pack_block(spec: KVSpec, kv: Sequence[Sequence[torch.Tensor]], start: int, n_tokens: int,
               out: torch.Tensor) -> None:
    """Copy tokens ``[start, start + n_tokens)`` of ``kv`` into the flat payload ``out``."""
    for li, layer in enumerate(spec.layers):
        for ti, t in enumerate(layer.tensors):
            tensor_view(spec, out, n_tokens, li, ti).copy_(kv[li][ti].narrow(t.seq_axis, start, n_tokens),
                                                          non_blocking=True)
