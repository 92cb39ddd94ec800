"""What the hooks hand back to an inference loop.

Primitives:
    RestoredKV: a restored prefix: its token count and per-layer tensors.
    SaveHandle: completion of a save's persistence (write-through: values on SSD).
    LoadHandle: an in-flight restore or prefetch, waitable as a whole or layer by layer.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_right
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from . import hostmem
from .blocks import Block, BlockLoad, block_views, tensor_view
from .config import check_timeout, is_int
from .errors import BlockLoadError, ConfigError
from .movers import LayerTargets, copy_stream, layer_targets

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
        known_from: a restore with ``needed_from``: per layer, the first token whose rows it may
            have left unread before (the rows before are zeros, not KV); pass it to
            ``save(..., known_from=...)`` when this KV, grown, is saved again. None: every row read.
    """

    num_tokens: int
    kv: list[tuple[torch.Tensor, ...]]
    sources: dict[str, int] = field(default_factory=dict)
    known_from: list[int] | None = None


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
        if not self._event.wait(check_timeout(timeout)):
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
    skipped: bool = False           # or needed by no layer (``needed_from``): counted, never read


def part_ends(parts: list[_Part]) -> list[int]:
    """Where each part ends in the prefix (ascending: parts are in prefix order)."""
    return [p.start + p.used for p in parts]


Allocator = Callable[[int, int, tuple, torch.dtype, torch.device], torch.Tensor]


def _default_alloc(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros_alloc(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Results of a restore that leaves some rows unread (``needed_from``): zeros there, never
    whatever the memory held before."""
    return torch.zeros(shape, dtype=dtype, device=device)


def slab_alloc(spec: "KVSpec", n_tokens: int) -> Allocator:
    """An ``allocate`` that carves every tensor of an ``n_tokens`` restore on the CPU from one
    buffer on huge pages (``hostmem.aligned_empty``), each tensor starting on a page, for memory
    reserved ahead (``CachePool.reserve``): O_DIRECT reads of a few MiB
    (``ssd_page_cache="bypass"``) reach the disk as one request each only into huge pages. The
    buffer lives as long as any of the tensors."""
    places, total = {}, 0
    for li, layer in enumerate(spec.layers):
        for ti, t in enumerate(layer.tensors):
            places[(li, ti)] = total
            total += -(-t.bytes_per_token * n_tokens // hostmem.PAGE) * hostmem.PAGE
    slab = hostmem.aligned_empty((total,), torch.uint8, huge=True)

    def allocate(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return _default_alloc(layer, index, shape, dtype, device)
        at = places[(layer, index)]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return slab[at:at + n].view(dtype).view(shape)
    return allocate


def _checked(allocate: object) -> Allocator:
    """A caller's ``allocate``, each result checked before anything is written into it: a tensor
    of the asked shape, dtype and device whose last axis is contiguous (the reads fill runs of
    it). Else ConfigError, and the restore does not start: a wrong tensor used to fail inside an
    I/O thread, which stopped the whole store."""
    if not callable(allocate):
        raise ConfigError(f"allocate must be a callable (layer, index, shape, dtype, device) -> tensor, "
                          f"got {type(allocate).__name__}")

    def checked(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = allocate(layer, index, shape, dtype, device)
        # the common case in one test (a restore asks for 2 tensors a layer): messages only on failure
        if (isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == shape
                and out.device == device and (not out.dim() or out.shape[-1] <= 1 or out.stride(-1) == 1)):
            return out
        where = f"allocate(layer={layer}, index={index}, shape={tuple(shape)}, dtype={dtype}, device={device})"
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{where} returned {type(out).__name__}, not a torch.Tensor")
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            raise ConfigError(f"{where} returned a tensor of shape {tuple(out.shape)} and dtype {out.dtype}")
        if out.device.type != device.type or (device.index is not None and out.device.index != device.index):
            raise ConfigError(f"{where} returned a tensor on {out.device}")
        if out.dim() and out.shape[-1] > 1 and out.stride(-1) != 1:
            raise ConfigError(f"{where} returned a tensor whose last axis is not contiguous (strides {out.stride()})")
        return out
    return checked


#: the most device memory one restore's staging of memory blocks takes at a time
_STAGE_BYTES = 256 << 20


def via_host_staging(device: torch.device) -> bool:
    """Whether results on ``device`` are filled through host staging: blocks read from SSD are
    decoded into one host buffer (pinned for CUDA) and each layer goes up in one copy per tensor,
    and blocks in memory go up whole and are scattered into place on the device. True for any
    device but the CPU; the tests force it on the CPU to run the GPU path's logic without a GPU."""
    return device.type != "cpu"


class LoadHandle:
    """An in-flight restore or prefetch of a cached prefix.

    ``num_tokens`` is the prefix length planned when the load started; the result tensors are
    allocated then (through ``allocate``, so a caller can place them in its own buffers), a
    prefetch's only when ``layer`` or ``result`` first asks for them.
    ``layer(i)`` waits only for layer ``i`` of every block, so a loop can run layer 0 while later
    layers are still decoding; ``result()`` waits for everything and truncates the prefix at the
    first block that failed its checksum (a counted miss), never returning damaged KV.
    """

    def __init__(self, spec: "KVSpec", parts: list[_Part], device: torch.device,
                 on_failed: Callable[[int, int], None], allocate: Allocator | None = None,
                 staged: bool = False, lazy: bool = False, needed: list[int] | None = None) -> None:
        self._spec = spec
        self._parts = parts
        #: per layer, the first token the caller needs (``needed_from``); None: every token
        self._needed = needed
        self._device = device
        self._on_failed = on_failed
        self.num_tokens = sum(p.used for p in parts)
        #: the results are memory tierkv allocates now (no ``allocate``): never touched before
        self._fresh = allocate is None
        self._alloc = _checked(allocate) if allocate is not None else (
            _default_alloc if needed is None else _zeros_alloc)
        self._outs_made: list[tuple[torch.Tensor, ...]] | None = None
        self._outs_lock = threading.Lock()
        self._targets_cache: list[LayerTargets | None] = [None] * spec.num_layers
        direct = [p for p in parts if p.direct]
        n_direct = len(direct)
        # per layer, the direct parts still to decode into it
        ends = part_ends(direct)
        self._direct_left = [n_direct - self.unneeded(ends, layer) for layer in range(spec.num_layers)]
        self._layer_ready = [threading.Event() for _ in spec.layers]
        for left, ev in zip(self._direct_left, self._layer_ready):
            if left == 0:
                ev.set()
        self._filled = [False] * spec.num_layers
        self._lock = threading.Lock()        # counters, taken by decode tasks
        self._fill_lock = threading.Lock()   # copies; may wait on loads, so never the one above
        # CUDA results: copies run on tierkv's side stream, after whatever the creating thread's
        # stream had queued when the result tensors were allocated (their memory may have been
        # that stream's until then); one event per layer marks its copies done, and a caller's
        # stream waits on it (``layer``, ``result``) instead of the caller's thread.
        self._stream = copy_stream(device) if device.type == "cuda" and self.num_tokens else None
        self._layer_events: list[torch.cuda.Event | None] = [None] * spec.num_layers
        self._upload_events: list[torch.cuda.Event | None] = [None] * spec.num_layers
        # a prefetch (``lazy``, never direct parts) makes its results only when ``layer`` or
        # ``result`` first asks: a prefetch that only moves blocks up, as a server issues one at a
        # request's arrival, took result memory the size of the prefix, on a GPU beside the
        # device-tier copies it was making, for as long as the caller held the handle
        if not lazy or n_direct:
            self._make_outs()
        # staged (results off the CPU): direct parts decode into a host buffer per layer, laid
        # out like that layer of one block of the whole prefix, and each layer goes up in one
        # copy per tensor when its last block is decoded (_upload); memory parts go up whole
        # (_copy_memory_runs). A layer's buffer is made when its first block is decoded and let
        # go once its upload is queued (torch's page-locked allocator reuses it after the copy),
        # so a restore holds a few layers' buffers, not the whole prefix's: one buffer for the
        # prefix took page-locked memory of its size rounded up to a power of two (8 GiB for a
        # 5.5 GiB session), locked anew for every new size (4.4 ms per 5.9 MB on an H200 machine).
        self._staged = staged and bool(self.num_tokens)
        self._shadow: list[tuple[torch.Tensor, ...] | None] | None = None
        if self._staged and n_direct:
            self._shadow = [None] * spec.num_layers
        self._shadow_lock = threading.Lock()  # makes each layer's targets (and buffer) once
        self._batched: set[int] | None = None   # ids of memory parts copied by _copy_memory_runs
        self._fills = any(not p.direct and not p.skipped for p in parts)  # parts _fill copies (memory, loads)
        self._part_views: dict[int, list[torch.Tensor]] = {}  # id(part) -> block_views of its payload
        self._block_tokens = max((p.block.n_tokens for p in parts), default=1)  # a full block's, if any
        self._moves: list[Future] = []

    def _needs(self, p: _Part, layer: int) -> bool:
        """Whether ``layer`` of part ``p`` is read or copied into the results (``needed_from``)."""
        return not p.skipped and (self._needed is None or p.start + p.used > self._needed[layer])

    def unneeded(self, ends: list[int], layer: int) -> int:
        """How many parts (``part_ends`` of them, in prefix order) ``layer`` does not need: the
        leading ones, which end at or before its ``needed_from`` (a skipped part ends before every
        layer's). By bisection, not a ``_needs`` per part: a restore of a million tokens has
        thousands of parts, times every layer."""
        return 0 if self._needed is None else bisect_right(ends, self._needed[layer])

    def _direct_runs(self, layer: int) -> list[list[int]]:
        """The token ranges the direct parts decoded into ``layer`` cover, consecutive parts
        merged: only these go up from the host buffer (the rest of it holds nothing; memory parts
        fill their own ranges)."""
        runs: list[list[int]] = []
        for p in self._parts:
            if not p.direct or not self._needs(p, layer):
                continue
            if runs and sum(runs[-1]) == p.start:
                runs[-1][1] += p.used
            else:
                runs.append([p.start, p.used])
        return runs

    @property
    def _outs(self) -> list[tuple[torch.Tensor, ...]]:
        outs = self._outs_made
        return outs if outs is not None else self._make_outs()

    def _make_outs(self) -> list[tuple[torch.Tensor, ...]]:
        """The result tensors (through ``allocate``, each checked), made once."""
        with self._outs_lock:
            if self._outs_made is None:
                n, dev = self.num_tokens, self._device
                outs = [tuple(self._alloc(li, ti, t.shape(n), t.torch_dtype, dev) for ti, t in enumerate(layer.tensors))
                        for li, layer in enumerate(self._spec.layers)] if n else []
                if self._stream is not None:
                    # the side stream's copies come after whatever the allocating thread's stream
                    # had queued (that memory may have been its until now)
                    self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
                self._outs_made = outs
            return self._outs_made

    # -- called by the engine's decode tasks -------------------------------------------------------
    def _targets(self, layer: int) -> LayerTargets:
        """Layer ``layer``'s result tensors (or, staged, its host buffer) as byte arrays to decode
        into, built on first use."""
        t = self._targets_cache[layer]
        if t is None:
            with self._shadow_lock:
                t = self._targets_cache[layer]
                if t is None:
                    into = self._outs[layer]
                    if self._shadow is not None:
                        spec, n = self._spec, self.num_tokens
                        buf = hostmem.host_buffer(spec.layers[layer].bytes_per_token * n, self._device.type == "cuda")
                        into = self._shadow[layer] = tuple(tensor_view(spec, buf, n, layer, ti, layer_only=True)
                                                           for ti in range(len(spec.layers[layer].tensors)))
                    t = self._targets_cache[layer] = layer_targets(self._spec, layer, into)
        return t

    def _direct_layer_done(self, layer: int) -> None:
        with self._lock:
            self._direct_left[layer] -= 1
            ready = self._direct_left[layer] == 0
        if ready:
            if self._shadow is not None:
                self._upload(layer)
            self._layer_ready[layer].set()

    def _upload(self, layer: int) -> None:
        """Copy a decoded layer from the host buffer up to the results (a decode thread calls
        this for the block that completes the layer): one copy per tensor and run of consecutive
        SSD blocks, on the side stream."""
        stream = self._stream
        shadow = self._shadow[layer]
        if shadow is None:  # every SSD block of this layer failed before decoding: nothing to copy
            return
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            runs = self._direct_runs(layer)
            for t, out, src in zip(self._spec.layers[layer].tensors, self._outs[layer], shadow):
                for start, used in runs:
                    out.narrow(t.seq_axis, start, used).copy_(src.narrow(t.seq_axis, start, used),
                                                              non_blocking=stream is not None)
            if stream is not None:
                self._upload_events[layer] = self._copies_end(layer)
        # every block of the layer is decoded: let its buffer go (from page-locked memory, torch
        # reuses it only after the copies queued from it have run)
        self._shadow[layer] = self._targets_cache[layer] = None

    # -- waiting ------------------------------------------------------------------------------------
    def _wait_also(self, futures: list[Future]) -> None:
        """Background moves this handle's ``wait`` and ``done`` cover too (a prefetch's
        promotions of blocks already in the host tier)."""
        self._moves = futures

    def done(self) -> bool:
        return all(ev.is_set() for ev in self._layer_ready) and all(
            p.load is None or p.load.done.is_set() for p in self._parts) and all(f.done() for f in self._moves)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every block is loaded (or failed), and for a prefetch moved up to the
        device tier; False on timeout."""
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        if self._moves and futures_wait(self._moves, left()).not_done:
            return False
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
        """Copy layer ``i`` of the parts that are not decoded in place (memory or host loads).

        Into CUDA results the copies are queued on the side stream (``non_blocking``: from pinned
        host buffers they overlap the reads of later layers) and an event records their end."""
        with self._fill_lock:
            if self._filled[i] or not self._fills:
                return
            stream = self._stream
            sources: list[torch.Tensor] = []  # host buffers the queued copies read
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                if self._staged and self._batched is None:
                    self._batched = self._copy_memory_runs(sources)
                # one batched copy for the layer (torch._foreach_copy_), from views of each
                # part's payload made once per restore (blocks.block_views). With a view and a
                # copy from Python per part and tensor, a 2,048-token fp32 SmolLM2 restore from
                # memory into preallocated tensors took 15.3-16.8 ms on the CPU, against 6.5-7.9
                # for one copy per tensor; batched, 12.0-12.4 (bench/results/memory_restore_ab)
                dsts: list[torch.Tensor] = []
                srcs: list[torch.Tensor] = []
                first = self._spec.first_tensor(i)
                tensors = self._spec.layers[i].tensors
                # each result tensor cut at block boundaries once (part k starts at block k)
                cuts = [out.split(self._block_tokens, dim=t.seq_axis) for t, out in zip(tensors, self._outs[i])]
                for p in self._parts:
                    if p.direct or not self._needs(p, i) or (self._batched and id(p) in self._batched):
                        continue
                    if p.load is not None:
                        p.load.layer_done[i].wait()
                        if p.load.error is not None:
                            continue
                    src_payload = p.payload if p.payload is not None else p.load.buffer
                    views = self._part_views.get(id(p))
                    if views is None:
                        if stream is not None and src_payload.is_cuda:
                            # a device-tier payload may be evicted and freed before the copies run
                            # (recorded once: the allocator waits for the stream when it is freed)
                            src_payload.record_stream(stream)
                        views = self._part_views[id(p)] = block_views(self._spec, src_payload, p.block.n_tokens)
                    if stream is not None and not src_payload.is_cuda:
                        sources.append(src_payload)
                    k = p.start // self._block_tokens
                    for ti, t in enumerate(tensors):
                        dst = cuts[ti][k]
                        if dst.shape[t.seq_axis] != p.used:  # not the block grid (never from the engine)
                            dst = self._outs[i][ti].narrow(t.seq_axis, p.start, p.used)
                        dsts.append(dst)
                        src = views[first + ti]
                        srcs.append(src if p.used == p.block.n_tokens else src.narrow(t.seq_axis, 0, p.used))
                if dsts:
                    torch._foreach_copy_(dsts, srcs, non_blocking=stream is not None)
                if stream is not None:
                    self._layer_events[i] = self._copies_end(i)
                    if sources:
                        # a host-tier block may be dropped meanwhile, and its pool place reused
                        hostmem.hold_until(self._layer_events[i], sources)
            self._filled[i] = True

    def _copies_end(self, layer: int) -> torch.cuda.Event:
        """An event after the copies into ``layer``'s results queued so far on the side stream,
        which now holds those results: dropped unread, their memory waits for the copies."""
        for out in self._outs[layer]:
            out.record_stream(self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _copy_memory_runs(self, sources: list[torch.Tensor]) -> set[int]:
        """Copy every run of consecutive whole blocks held in memory up to the results at once:
        each block's payload in one copy into a staging tensor on the device, then per layer and
        tensor one copy that scatters the run's blocks into place. Per block, layer and tensor,
        the copies cost tens of microseconds each in launches (a 2,048-token SmolLM2 session is
        480 of them): host-tier hits reached 6 % of the link's rate on an H200 that way. Returns
        the ids of the parts it copied; adds the host buffers the copies read to ``sources``."""
        spec, runs, run = self._spec, [], []
        for p in self._parts:
            whole = (not p.direct and not p.skipped and p.load is None and p.payload is not None
                     and p.used == p.block.n_tokens)
            if whole and run and run[-1].block.n_tokens == p.block.n_tokens and run[-1].start + run[-1].used == p.start:
                run.append(p)
                continue
            if len(run) > 1:
                runs.append(run)
            run = [p] if whole else []
        if len(run) > 1:
            runs.append(run)
        # runs go up in pieces of at most _STAGE_BYTES, the device memory the staging may take
        runs = [run[j:j + max(1, _STAGE_BYTES // run[0].payload.numel())]
                for run in runs for j in range(0, len(run), max(1, _STAGE_BYTES // run[0].payload.numel()))]
        stream = self._stream
        for run in runs:
            n, nb = run[0].block.n_tokens, len(run)
            stage = torch.empty((nb, run[0].payload.numel()), dtype=torch.uint8, device=self._device)
            for j, p in enumerate(run):
                if stream is not None and p.payload.is_cuda:
                    p.payload.record_stream(stream)  # a device-tier block may be evicted meanwhile
                elif stream is not None:
                    sources.append(p.payload)
                stage[j].copy_(p.payload, non_blocking=stream is not None)
            ends = part_ends(run)
            for li, layer in enumerate(spec.layers):
                k = self.unneeded(ends, li)  # its first blocks this layer does not need
                if k == nb:
                    continue
                for ti, t in enumerate(layer.tensors):
                    off = spec.tensor_offset(li, ti, n)
                    src = stage[k:, off:off + t.bytes_per_token * n].view(t.torch_dtype).view(nb - k, *t.shape(n))
                    dst = self._outs[li][ti].narrow(t.seq_axis, run[k].start, (nb - k) * n).unflatten(t.seq_axis, (nb - k, n))
                    dst.copy_(src.movedim(0, t.seq_axis))
        if runs and stream is not None:
            for outs in self._outs:
                for out in outs:
                    out.record_stream(stream)
        return {id(p) for run in runs for p in run}

    def _ordered(self, layers: range) -> None:
        """Make the calling thread's current CUDA stream wait for the copies of ``layers``."""
        if self._stream is None:
            return
        current = torch.cuda.current_stream(self._stream.device)
        for i in layers:
            for event in (self._layer_events[i], self._upload_events[i]):
                if event is not None:
                    current.wait_event(event)

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s tensors for the whole prefix, as soon as that layer is loaded.

        Raises:
            BlockLoadError: a block of the prefix failed to load; recompute from
                ``first_bad_token``.
        """
        if not is_int(i) or not 0 <= i < self._spec.num_layers:
            raise ConfigError(f"layer {i!r} is not an int in 0..{self._spec.num_layers - 1}")
        if not self.num_tokens:
            return tuple(torch.empty(t.shape(0), dtype=t.torch_dtype, device=self._device)
                         for t in self._spec.layers[i].tensors)
        self._layer_ready[i].wait()
        self._fill(i)
        for p in self._parts:
            err = self._failed(p)
            if err is not None:
                raise BlockLoadError(f"block at token {p.start} failed to load: {err}", p.start)
        self._ordered(range(i, i + 1))
        return self._outs[i]

    def result(self) -> RestoredKV:
        """Wait for every block and return the restored prefix (truncated at a failed block).

        Into GPU memory each layer is copied as soon as every block has it, so the copies of
        early layers overlap the reads of later ones (SSD blocks: by the decode threads; the
        rest: here, layer by layer, only when there are such blocks); the returned tensors are
        ready for work queued on the calling thread's current CUDA stream."""
        if self._stream is not None and self._fills:
            for i in range(self._spec.num_layers):
                self._layer_ready[i].wait()
                self._fill(i)
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
            if not p.skipped:
                sources[p.source] = sources.get(p.source, 0) + 1
        if not n:
            return RestoredKV(0, [], sources)
        for i in range(self._spec.num_layers):
            self._fill(i)
        self._ordered(range(self._spec.num_layers))
        kv = [tuple(x.narrow(t.seq_axis, 0, n) if n < self.num_tokens else x
                    for t, x in zip(self._spec.layers[i].tensors, self._outs[i]))
              for i in range(self._spec.num_layers)]
        return RestoredKV(n, kv, sources, None if self._needed is None else list(self._needed))
