"""SSD reads: the values of a restore or prefetch, read and decoded on the I/O pool.

Primitives:
    SSDReads: ``submit(loads, direct, handle, promote)`` parses the values of blocks only on SSD,
        then reads and decodes them layer-major, into a prefetch's host buffers (``BlockLoad``) or
        straight into a restore's result tensors (``handles._Part``); with
        ``ssd_page_cache="bypass"``, cold values wanted whole are streamed instead (read whole
        with O_DIRECT, in file order, into a bounce buffer, and parsed there: ``_streamable``, ``_stream``) and
        other layers read with O_DIRECT where it pays (``_direct_plan``).
    BounceBuffers: the streamed reads' buffers, kept between loads.

Moves bytes only. Every decision about records (a block's state, its tier, a corrupt mark, a
counted miss) is the engine's, made in the callbacks it passes in: a block's layers loaded, a load
failed, a direct part failed, a thread's unexpected error.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, Iterator

import torch

from .blocks import Block, BlockLoad
from .codec import Codec, CorruptValueError, ValueGoneError, layers_span, parse_block, stored_span
from .valuereader import OVERFLOW_HEADER_BYTES
from .errors import StoreIOError
from .handles import LoadHandle, _Part
from .hostmem import HUGE_PAGE, aligned_empty, prefault
from .movers import decode_layer_into, decode_layer_into_views, read_layers_direct
from .pagecache import advise_willneed
from .spec import KVSpec
from .stats import Stats
from .store import SSDStore
from .tiers import MemoryTier

__all__ = ["SSDReads", "BounceBuffers", "DIRECT_READ_BYTES", "DIRECT_MIN_BYTES", "HINT_AHEAD_BYTES",
           "STREAM_MAX_BYTES"]

#: bytes per O_DIRECT request of a block's layers (``ssd_page_cache="bypass"``): on the test machine's
#: disk, requests of a few MiB went near its sequential rate and requests of one layer did not
#: (bench/direct_ceiling.py); runs of stored layers smaller than DIRECT_MIN_BYTES stay buffered
DIRECT_READ_BYTES = 4 << 20
DIRECT_MIN_BYTES = 1 << 20
#: bytes of a gapped restore (``needed_from`` leaves out some of a block's layers) asked of the
#: disk ahead of the decode threads: enough to keep its queue full, bounded so a restore of
#: gigabytes neither floods the page cache nor blocks its caller while the requests queue. On
#: the test machine 4-16 MiB ahead did best, 1 MiB and 64 MiB worse, everything up front worst
#: (bench/needed_reload.py --hint-ahead: a request far ahead delays the ones the threads wait for)
HINT_AHEAD_BYTES = 8 << 20
#: largest value (its whole pages) a ``ssd_page_cache="bypass"`` load reads in one piece with
#: O_DIRECT into a reused bounce buffer (``SSDReads._stream``); larger ones are read layer by layer
STREAM_MAX_BYTES = 64 << 20


def _consecutive(layers: list[int]) -> Iterator[range]:
    """Runs of consecutive numbers in a sorted list, as ranges."""
    start = prev = None
    for x in layers:
        if start is not None and x != prev + 1:
            yield range(start, prev + 1)
            start = None
        if start is None:
            start = x
        prev = x
    if start is not None:
        yield range(start, prev + 1)


class BounceBuffers:
    """Page-aligned buffers in huge pages that the engine's streamed O_DIRECT reads land in, kept
    from one load to the next: the most recently returned is handed out first, so a read goes
    into memory written a moment before (what the test machine's disk read fastest into:
    bench/direct_ceiling.py, "a ring of reused buffers"). At most ``keep`` wait unused; each is
    made resident when created, so no read waits for its page faults."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[Any] = []   # torch uint8 tensors, most recently returned last
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Any:
        """A buffer of at least ``nbytes`` (a uint8 tensor; give it back with ``give``)."""
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                if self._free[i].numel() >= nbytes:
                    return self._free.pop(i)
        buf = aligned_empty((-(-nbytes // HUGE_PAGE) * HUGE_PAGE,), torch.uint8, huge=True)
        prefault(buf)
        return buf

    def give(self, buf: Any) -> None:
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self._keep:  # the smallest goes
                self._free.remove(min(self._free, key=lambda b: b.numel()))

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)


class SSDReads:
    """Reads SSD values for the engine's loads (see the module docstring).

    Args:
        store: the SSD store; spec, codec, fingerprint, block_tokens, header_bound: what its values
            are checked and decoded against.
        bypass: ``ssd_page_cache="bypass"``: O_DIRECT where it pays, and values read through the
            page cache dropped from it when a load is done.
        pool, io_threads: the engine's I/O pool and how many of its threads a load may take.
        host: the host tier, whose memory a prefetch's blocks are read into.
        stats: the engine's counters.
        on_layers_loaded(load, n, promote): ``n`` more layers of a prefetch's block are in its buffer.
        on_load_failed(load, error): a prefetch's block could not be read (corrupt: a miss).
        on_direct_failed(part, error, handle, all_layers): a restore's block could not be read.
        on_background_error(error): an error no checksum explains (the engine's next call raises it).
    """

    def __init__(self, store: SSDStore, spec: KVSpec, codec: Codec, fingerprint: bytes, block_tokens: int,
                 header_bound: int, bypass: bool, pool: ThreadPoolExecutor, io_threads: int,
                 host: MemoryTier, stats: Stats, *,
                 on_layers_loaded: Callable[[BlockLoad, int, bool], None],
                 on_load_failed: Callable[[BlockLoad, BaseException], None],
                 on_direct_failed: Callable[[_Part, BaseException, LoadHandle, bool], None],
                 on_background_error: Callable[[BaseException], None]) -> None:
        self._store = store
        self.spec = spec
        self.codec = codec
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self._header_bound = header_bound
        self._bypass = bypass
        self._pool = pool
        self._io_threads = io_threads
        self._host = host
        self._stats = stats
        self._on_layers_loaded = on_layers_loaded
        self._on_load_failed = on_load_failed
        self._on_direct_failed = on_direct_failed
        self._on_background_error = on_background_error
        self._bounce = BounceBuffers(io_threads)
        self._disk = threading.Lock()   # one streamed read at the disk at a time (``_stream``)

    def close(self) -> None:
        """Let go of the bounce buffers (the engine's close, after its I/O pool has stopped)."""
        self._bounce.clear()

    def submit(self, loads: list[BlockLoad], direct: list[_Part], handle: LoadHandle, promote: bool) -> None:
        """Parse the values of ``loads`` (into host buffers) and ``direct`` parts (into the
        handle's result), then decode them layer-major on the I/O pool under one read txn.

        Layer-major even for a plain ``restore`` through the page cache: reading whole values
        block after block, with the kernel asked to read each one ahead, or in two sequential
        streams, was not faster (A/B timing probes on an 8K-token session). Values streamed
        with ``ssd_page_cache="bypass"`` (``_streamable``) complete block after block instead:
        a caller waiting for layer 0 waits until every streamed block is in.
        """
        host = self._host
        started = time.perf_counter()
        try:
            txn = self._store.env.begin(buffers=True)
        except Exception as e:  # noqa: BLE001 - translated and delivered to every waiter
            err = StoreIOError(f"cannot read the store: {e}")
            for bl in loads:
                self._on_load_failed(bl, err)
            for p in direct:
                self._on_direct_failed(p, err, handle, all_layers=True)
            return

        values = self._store.values
        where: dict[bytes, Any] = {}   # key -> (offset, size) in data.mdb, or the mapped value
        cursor = self._store.blocks_cursor(txn)
        for b in [bl.block for bl in loads] + [p.block for p in direct]:
            loc = values.locate(cursor, b.key) if values is not None else None
            if loc is None:
                raw = self._store.get_value(txn, b.key)  # inline, or no pread: through the map
                if raw is None:
                    continue
                if values is None:
                    advise_willneed(raw[:4096])  # headers first: parse them without a stall each
                loc = raw
            where[b.key] = loc

        files: list[Any] = []   # the values' readers, closed when the job is done
        streams = self._bypass and values is not None and values.direct_fd() >= 0

        def streamed_whole(b: Block, whole: bool) -> bool:
            """Whether to stream this block's value (``_stream``), which then reads and parses
            its header too: its header is not read here, where the disk waits for it."""
            return streams and whole and self._streamable(where.get(b.key), values)

        def parse(b: Block) -> Any:
            loc = where.get(b.key)
            parsed = None
            if isinstance(loc, tuple):  # pread: the header now, each layer when it is decoded
                offset, size = loc
                head = values.read_head(offset, size, self._header_bound)
                if head is not None:
                    # a descriptor per value: its layers are one readahead stream (ValueReader.read_at)
                    files.append(values.read_at(offset, own_fd=True))
                    parsed = parse_block(size, self.fingerprint, self.spec, self.codec, self.block_tokens,
                                         head=head, read_at=files[-1], key=b.key)
                else:  # the location is not trusted: read through the map instead
                    self._stats.count("pread_fallbacks", 1)
                    loc = self._store.get_value(txn, b.key)
            if parsed is None:
                if loc is None:
                    if not self._store.records_value(txn, b.key):
                        # its record went too, or says it has no value: evicted or dropped since
                        # this process looked (another process may have saved it again since,
                        # with write-back, its value still in that process's memory)
                        raise ValueGoneError("value evicted or dropped before its read")
                    raise CorruptValueError("value missing from the store")
                parsed = parse_block(loc, self.fingerprint, self.spec, self.codec, self.block_tokens, key=b.key)
            if parsed.n_tokens != b.n_tokens:
                raise CorruptValueError("value holds another token count than its record")
            return parsed

        cold: set[int] = set()   # offsets of the values streamed from the disk (``_stream``)

        def release() -> None:
            txn.abort()
            for f in files:
                f.close()
            if self._bypass and values is not None:  # what was read through the page cache goes
                values.drop_values([loc for loc in where.values() if isinstance(loc, tuple)], keep_first=cold)

        work: list[tuple[Any, Any]] = []   # (BlockLoad | _Part, parsed; None: streamed, parsed by its task)
        try:
            for bl in loads:
                try:
                    parsed = None if streamed_whole(bl.block, True) else parse(bl.block)
                    bl.buffer = host.alloc(bl.block.nbytes)
                    work.append((bl, parsed))
                except CorruptValueError as e:
                    self._on_load_failed(bl, e)
            for p in direct:
                whole = handle._needed is None or all(handle._needs(p, layer) for layer in range(self.spec.num_layers))
                try:
                    work.append((p, None if streamed_whole(p.block, whole) else parse(p.block)))
                except CorruptValueError as e:
                    self._on_direct_failed(p, e, handle, all_layers=True)
        except BaseException:
            release()
            raise
        if not work:
            release()
            return
        L = self.spec.num_layers

        def part_needs(item: Any, layer: int) -> bool:
            """A prefetch's block is read whole; a restore's part only for the layers its
            caller needs (``needed_from``)."""
            return isinstance(item, BlockLoad) or handle._needs(item, layer)

        # None where every layer of every block is read (no ``needed_from``): no call per pair
        needs = part_needs if handle._needed is not None else None
        wanted = [range(L) if needs is None else [layer for layer in range(L) if needs(item, layer)]
                  for item, _ in work]
        job = {"left": sum(map(len, wanted)), "lock": threading.Lock(),
               "bytes": sum(item.block.nbytes if len(ls) == L else
                            sum(self.spec.layers[layer].bytes_per_token for layer in ls) * item.block.n_tokens
                            for (item, _), ls in zip(work, wanted)),
               "disk": sum((parsed.nbytes if parsed is not None else where[item.block.key][1]) if len(ls) == L else
                           sum(length for layer in ls for _, length, _ in parsed.layers[layer][2])
                           for (item, parsed), ls in zip(work, wanted))}

        def count_down(n: int) -> bool:
            """``n`` (block, layer) tasks are done; True for the job's last. Its moves are
            counted here, before any waiter is woken: a caller woken by its last layer sees them."""
            with job["lock"]:
                job["left"] -= n
                last = job["left"] == 0
            if last:
                self._stats.moved("ssd->" + ("host" if not direct else "caller"), job["bytes"],
                                  time.perf_counter() - started)
                self._stats.count("ssd_read_bytes", job["disk"])
            return last

        def decode(item: Any, parsed: Any, layers: range, odirect: bool | str) -> None:
            """Decode ``layers`` of one block (one layer; with ``odirect`` a group of stored
            layers read with one O_DIRECT request; with ``odirect="stream"`` every layer, the
            value read whole with O_DIRECT first unless it is mostly cached: ``_stream``) into
            its host buffer or the handle's result."""
            last = False
            try:
                try:
                    if item.error is None and odirect == "stream":
                        self._stream(item, where[item.block.key], handle, values, cold)
                        odirect = True  # nothing left to read
                    elif item.error is None and odirect:  # a handle's part (_direct_memory)
                        odirect = read_layers_direct(parsed, layers, align, handle._targets, item.start, item.used)
                        if odirect:
                            self._stats.count("ssd_direct_read_bytes", sum(
                                parsed.layers[layer][2][0][1] for layer in layers))
                    if item.error is None and not odirect:  # memory not aligned: layer by layer
                        self._decode_layers(item, parsed, layers, handle)
                finally:
                    last = count_down(len(layers))  # before this task's waiters wake, even on a failure
                if not isinstance(item, BlockLoad):
                    for layer in layers:
                        handle._direct_layer_done(layer)
                elif item.error is None:
                    for layer in layers:
                        item.layer_done[layer].set()
                    self._on_layers_loaded(item, len(layers), promote)
            except BaseException as e:  # noqa: BLE001 - every failure must reach the waiters
                if isinstance(item, BlockLoad):
                    self._on_load_failed(item, e)
                else:
                    self._on_direct_failed(item, e, handle, all_layers=False)
                    for layer in layers:
                        handle._direct_layer_done(layer)
                if not isinstance(e, CorruptValueError):
                    self._on_background_error(e)
            finally:
                if last:
                    release()

        align = values.DIRECT_ALIGN if values is not None else 0
        streamed = {w for w, (_, parsed) in enumerate(work) if parsed is None}   # parsed by _stream
        groups, direct_runs = self._direct_plan(work, where, handle, values, needs, streamed)
        for w in {w for w, _ in direct_runs}:
            # its other layers are read through the shared descriptor, without readahead: a
            # window read ahead would bring in layers an O_DIRECT request reads again
            work[w][1].read_at.share()

        # Layer-major order: layer 0 of every block first, so per-layer waits finish early. Read
        # through the map, the disk is asked for the bytes in that order up front; with pread
        # the decode threads read each (block, layer) range themselves, io_threads at a time.
        mapped = [(item, parsed) for item, parsed in work if parsed is not None and parsed.read_at is None]
        for layer in range(L if mapped else 0):
            for item, parsed in mapped:
                if needs is not None and not needs(item, layer):
                    continue
                start, length = layers_span(parsed, range(layer, layer + 1))
                advise_willneed(parsed.buf[start:start + length])
        # The first layer of every block is wanted at once, each at a new place in the file where
        # the kernel's readahead has no history yet: ask for all of them up front, so the disk
        # serves them in parallel instead of two at a time (bench/ttft_parts.py records when
        # layer 0 is ready); later layers follow in file order under the kernel's own readahead.
        # (Not for a group read with O_DIRECT: it would read the same bytes twice.)
        if values is not None:
            first_layers = []
            for w, ((item, parsed), layers) in enumerate(zip(work, wanted)):
                if (w not in streamed and parsed.read_at is not None and len(layers) == L
                        and not any(0 in r for r in direct_runs.get((w, 0), ()))):
                    off, length = layers_span(parsed, range(1))
                    first_layers.append((where[item.block.key][0] + off, length))
            values.advise_willneed(first_layers)
        # A few workers pulling from one queue, not a future per (block, layer): submitting
        # thousands of futures while the workers hold the GIL made the caller wait for the GIL
        # on every submit (profiled: tens of microseconds each).
        # Streamed values first, in file order: one task each (``_stream``).
        order: list[tuple[Any, Any, range, bool | str]] = [
            (work[w][0], work[w][1], range(L), "stream") for w in sorted(streamed, key=lambda w: where[work[w][0].block.key])]
        for g, layers in enumerate(groups):
            if not direct_runs:  # buffered reads (the default): a task per (layer, block)
                order += [(item, parsed, range(layer, layer + 1), False)
                          for layer in layers for w, (item, parsed) in enumerate(work)
                          if w not in streamed and (needs is None or needs(item, layer))]
                continue
            for w, (item, parsed) in enumerate(work):
                if w in streamed:
                    continue
                runs = direct_runs.get((w, g), ())
                for layer in layers:
                    if needs is not None and not needs(item, layer):
                        continue
                    run = next((r for r in runs if r[0] == layer), None)
                    if run is not None:
                        order.append((item, parsed, run, True))
                    elif not any(layer in r for r in runs):
                        order.append((item, parsed, range(layer, layer + 1), False))
        # A block read with gaps (needed_from leaves out some of its layers) gets no help from
        # readahead, which sees no stream in it: its layers are asked for ahead of the decode
        # threads, HINT_AHEAD_BYTES at most, so the disk serves them at full queue depth instead
        # of io_threads requests at a time (bench/needed_reload.py). Per task: (offset, length),
        # or None where it is not such a layer.
        gapped = {id(item) for (item, _), layers in zip(work, wanted) if len(layers) < L}
        spans: list[tuple[int, int] | None] = [None] * len(order) if gapped else []
        for i, (item, parsed, layers, odirect) in enumerate(order if gapped and values is not None else ()):
            if odirect is False and parsed.read_at is not None and id(item) in gapped:
                off, length = layers_span(parsed, layers)
                spans[i] = (where[item.block.key][0] + off, length)
        ahead = {"next": 0, "taken": 0, "bytes": 0}   # next task to hint, tasks taken, bytes hinted not taken

        def hints_due() -> list[tuple[int, int]]:
            """(Under ``take``.) The spans to hint now, to keep HINT_AHEAD_BYTES asked for."""
            due = []
            ahead["next"] = max(ahead["next"], ahead["taken"])
            while ahead["next"] < len(order) and ahead["bytes"] < HINT_AHEAD_BYTES:
                span = spans[ahead["next"]]
                ahead["next"] += 1
                if span is not None:
                    due.append(span)
                    ahead["bytes"] += span[1]
            return due

        hint = values.advise_willneed if values is not None and any(span is not None for span in spans) else None
        if hint is not None:
            hint(hints_due())
        take = threading.Lock()

        def worker() -> None:
            while True:
                due: list[tuple[int, int]] = []
                with take:
                    i = ahead["taken"]
                    if i == len(order):
                        return
                    ahead["taken"] += 1
                    if hint is not None:
                        span = spans[i]
                        if span is not None and i < ahead["next"]:
                            ahead["bytes"] -= span[1]
                        due = hints_due()
                if hint is not None and due:
                    hint(due)
                decode(*order[i])

        for _ in range(min(self._io_threads, len(order))):
            self._pool.submit(worker)

    @staticmethod
    def _streamable(loc: Any, values: Any) -> bool:
        """Whether a value (``ValueReader.locate``'s (offset, size), or None) can be streamed
        (``ssd_page_cache="bypass"``, a value a load wants whole): located for pread, at most
        STREAM_MAX_BYTES of pages.

        Why a bounce: on session 70's machine (AMD EPYC, AVX-512) reads in file order into a few
        reused buffers, copied out and checked, filled a restore's memory at 1.38x the buffered
        layer-major pattern and 1.23x direct reads straight into the result
        (bench/direct_ceiling.py, "What bounds tierkv" in docs/benchmarks.md)."""
        if not isinstance(loc, tuple):
            return False
        a = values.DIRECT_ALIGN
        offset, size = loc
        return -(-(offset + size) // a) * a - (offset - offset % a) <= STREAM_MAX_BYTES

    def _stream(self, item: Any, loc: tuple[int, int], handle: LoadHandle, values: Any, cold: set[int]) -> None:
        """Read one value whole with O_DIRECT (DIRECT_READ_BYTES a request, one value at the disk
        at a time, so the reads go in file order) into a bounce buffer, then parse it there and
        check and decode every layer into ``item``'s host buffer or the handle's result. While
        one I/O thread checks and copies a value, the other reads the next: the disk always has
        one request, and each request lands in memory used a moment before.

        A value mostly in the page cache already (``ValueReader.mostly_cold``: cached bytes come
        faster from memory; asked here, on an I/O thread, not in the restore's setup while the
        disk waits: bench/results/ab_reload_stream_cold_check_in_task.json) is copied from
        there instead. The overflow page header in front of the value must name its page
        (``ValueReader.page_head_ok``), else the value is a miss. ``cold`` gets the offset of a
        value read with O_DIRECT (its first page stays cached: ``ValueReader.drop_values``)."""
        offset, size = loc
        a = values.DIRECT_ALIGN
        start = offset - offset % a
        need = offset + size - start
        length = -(-need // a) * a
        buf = self._bounce.take(length)
        try:
            mem = buf.numpy()
            pages = values.read_at(start)   # through the shared descriptors: nothing to close
            if values.mostly_cold(start, length):
                with self._disk:
                    for pos in range(0, length, DIRECT_READ_BYTES):
                        n = min(DIRECT_READ_BYTES, length - pos)
                        pages.direct(pos, [mem[pos:pos + n]], n)   # buffered where O_DIRECT is refused
                if values.direct_fd() >= 0:
                    self._stats.count("ssd_direct_read_bytes", size)
                    cold.add(offset)
            else:  # mostly cached: from the page cache
                pages(0, [mem[:need]], need)
            lead = offset - start
            if not values.page_head_ok(offset, size, mem[lead - OVERFLOW_HEADER_BYTES:lead]):
                raise CorruptValueError("the page in front of the value does not name it")
            parsed = parse_block(memoryview(mem[lead:need]), self.fingerprint, self.spec, self.codec,
                                 self.block_tokens, key=item.block.key)
            if parsed.n_tokens != item.block.n_tokens:
                raise CorruptValueError("value holds another token count than its record")
            self._decode_layers(item, parsed, range(self.spec.num_layers), handle)
        finally:
            self._bounce.give(buf)

    def _decode_layers(self, item: Any, parsed: Any, layers: range, handle: LoadHandle) -> None:
        """Check and decode ``layers`` of a parsed value into ``item``'s host buffer or the
        handle's result."""
        for layer in layers:
            if isinstance(item, BlockLoad):
                decode_layer_into(self.codec, self.spec, parsed, layer, item.buffer)
            else:
                decode_layer_into_views(self.codec, self.spec, parsed, layer, handle._targets(layer),
                                        item.start, item.used)

    def _direct_plan(self, work: list[tuple[Any, Any]], where: dict[bytes, Any], handle: LoadHandle,
                     values: Any, needs: Callable[[Any, int], bool] | None,
                     streamed: Collection[int] = ()) -> tuple[list[range], dict[tuple[int, int], list[range]]]:
        """Which layers of which SSD blocks to read with O_DIRECT (``ssd_page_cache="bypass"``).

        The layers are taken in groups of about DIRECT_READ_BYTES; within a group, each run
        of consecutive layers stored as they are (not compressed) that holds at least
        DIRECT_MIN_BYTES, lies page-aligned in the file, has no page in the page cache, and
        lands in memory that takes O_DIRECT, is read with one request straight into its
        destination (bench/direct_ceiling.py: O_DIRECT requests of a few MiB went near the
        disk's sequential rate on the test machine, requests of a layer each did not). Returns
        the groups, and per (index in ``work``, group) the runs to read so; every other layer is
        read as before, one task each. Layers a part's caller does not need (``needs``, None: it needs
        every one) are in no run, nor are the values ``streamed`` (``_streamable``: indices in
        ``work``), which are read otherwise; where every value streams, nothing is planned."""
        L = self.spec.num_layers
        if not self._bypass or values is None or values.direct_fd() < 0 or len(streamed) == len(work):
            return [range(layer, layer + 1) for layer in range(L)], {}
        layer_bytes = max(b - a for a, b in (self.spec.layer_span(i, self.block_tokens) for i in range(L)))
        per = max(1, DIRECT_READ_BYTES // max(1, layer_bytes))
        groups = [range(g, min(L, g + per)) for g in range(0, L, per)]
        fits = self._direct_memory(handle, values.DIRECT_ALIGN)
        runs: dict[tuple[int, int], list[range]] = {}
        for w, (item, parsed) in enumerate(work):
            if w in streamed or parsed.read_at is None or not fits(item):
                continue
            base = where[item.block.key][0]
            for g, layers in enumerate(groups):
                stored = [layer for layer in layers
                          if (needs is None or needs(item, layer)) and stored_span(parsed, range(layer, layer + 1)) is not None]
                for run in _consecutive(stored):
                    off, length = stored_span(parsed, run)
                    if length >= DIRECT_MIN_BYTES and values.direct_ok(base + off, length):
                        runs.setdefault((w, g), []).append(run)
        return groups, runs

    def _direct_memory(self, handle: LoadHandle, align: int) -> Callable[[Any], bool]:
        """Whether the memory an SSD block (a BlockLoad or a handle's part) is read into takes
        O_DIRECT requests well: result tensors the caller allocated (memory that exists already,
        as a server's KV memory does) in which every run a whole block fills starts on an
        ``align`` boundary. read_layers_direct checks each destination again before it reads.

        Memory allocated for this load (fresh results, a prefetch's host buffers, staging
        buffers) is read through the page cache instead, and the values are dropped from it
        when the load is done (``release``): O_DIRECT faults such memory in inside the read,
        before the disk is asked, where a buffered read faults it while the kernel's
        readahead keeps the disk busy (reload runs 41-43, docs/benchmarks.md "O_DIRECT
        reads")."""
        steps: set[int] | None = set()   # per result tensor: its bytes per token
        if handle._staged or handle._fresh:
            steps = None
        else:
            for layer, outs in zip(self.spec.layers, handle._outs):
                for t, out in zip(layer.tensors, outs):
                    es = out.element_size()
                    if out.data_ptr() % align or any(st * es % align for st in out.stride()[:t.seq_axis]):
                        steps = None
                        break
                    steps.add(out.stride()[t.seq_axis] * es)
                if steps is None:
                    break

        def fits(item: Any) -> bool:
            if isinstance(item, BlockLoad):
                return False
            return (steps is not None and item.used == item.block.n_tokens
                    and all(st * item.start % align == 0 for st in steps))
        return fits
