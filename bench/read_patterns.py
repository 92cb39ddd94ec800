"""tierkv's store file read without the engine: where a cold restore's time goes.

``bench/reload.py`` times these next to tierkv's own restore, on the same store file, so that a
gap to a baseline can be split in two: the read pattern (what the disk is asked for, in what
order, from how many threads) and the engine's own work on top of it (session and block lookups
in LMDB, header checks, task bookkeeping, codec decode, writing into the caller's tensors).

- ``layer_major``: the engine's pattern, bare: per session, a descriptor per value, layer 0 of
  every value asked for up front (``WILLNEED``), then (value, layer) ranges read layer after
  layer by ``threads`` threads, each range checked with CRC32C (zstd frames are checksummed,
  not decoded: the codec's share shows in the engine's row).
- ``whole_values``: one stream, value after value in restore order, each value read whole into
  one reused buffer and nothing checked: the pattern of reading LMDB values through a map with
  readahead, with ``pread``.

Value locations come from tierkv's own reader (``ValueReader.locate``, ``read_head``), so this
module uses engine internals; it is a measuring tool, not an API.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from crc32c import crc32c

import tierkv
from tierkv.codec import parse_block


@dataclass
class Value:
    offset: int            # in data.mdb
    size: int
    layers: list[tuple[int, int]]  # per layer: (offset in the value, length) of its planes
    crcs: list[int | None]         # per layer: its CRC32C if stored unsplit (else None: zstd frames)


def value_layout(store: str, spec: tierkv.KVSpec, sessions: list[str], **settings) -> list[list[Value]]:
    """Per session (in order), its values in restore order, located as tierkv's reader does."""
    out: list[list[Value]] = []
    with tierkv.TierKV(store, spec, **settings) as s:
        ssd = s._ssd
        if ssd.values is None:
            raise SystemExit("read_patterns needs tierkv's pread reader (Linux)")
        with ssd.reader() as txn:
            cur = ssd.blocks_cursor(txn)
            for name in sessions:
                row = []
                for key in ssd.get_session(name).keys:
                    offset, size = ssd.values.locate(cur, key)
                    head = ssd.values.read_head(offset, size, s._header_bound)
                    parsed = parse_block(size, s.fingerprint, s.spec, s.codec, s.block_tokens, head=head,
                                         read_at=lambda off, bufs, nbytes: None, key=key)
                    row.append(Value(offset, size,
                                     [(planes[0][0], planes[-1][0] + planes[-1][1] - planes[0][0])
                                      for _, _, planes in parsed.layers],
                                     [planes[0][2] if len(planes) == 1 else None for _, _, planes in parsed.layers]))
                out.append(row)
    return out


def layer_major(path: str, layout: list[list[Value]], threads: int = 2, starts: list[float] | None = None,
                into: np.ndarray | None = None) -> None:
    """Read every session as the engine does, without the engine (see the module doc).

    ``starts``: if given, each session's start (``time.perf_counter()``) is appended to it.
    ``into``: a uint8 buffer of at least one session's values to read into (e.g. one already
    written, as a server's KV memory is); by default a fresh one, faulted in by the first session.
    """
    biggest = max(sum(v.size for v in row) for row in layout)
    # one session's values, back to back; reused
    pool = into[:biggest] if into is not None and into.nbytes >= biggest else np.empty(biggest, np.uint8)
    for row in layout:
        if starts is not None:
            starts.append(time.perf_counter())
        base = np.cumsum([0] + [v.size for v in row[:-1]])
        fds = [os.open(path, os.O_RDONLY) for _ in row]
        try:
            for fd, v in zip(fds, row):
                os.posix_fadvise(fd, v.offset + v.layers[0][0], v.layers[0][1], os.POSIX_FADV_WILLNEED)
            tasks = iter([(i, layer) for layer in range(len(row[0].layers)) for i in range(len(row))])
            take = threading.Lock()
            errors: list[BaseException] = []   # a thread's exception, raised by the caller

            def work() -> None:
                try:
                    while not errors:
                        with take:
                            task = next(tasks, None)
                        if task is None:
                            return
                        i, layer = task
                        off, length = row[i].layers[layer]
                        dst = pool[base[i] + off:base[i] + off + length]
                        if os.preadv(fds[i], [dst], row[i].offset + off) != length:
                            raise OSError("short read")
                        crc = crc32c(dst)
                        if row[i].crcs[layer] not in (None, crc):
                            raise OSError(f"layer {layer} of a value fails its checksum: wrong location?")
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    errors.append(e)

            pool_threads = [threading.Thread(target=work) for _ in range(threads)]
            for t in pool_threads:
                t.start()
            for t in pool_threads:
                t.join()
            if errors:
                raise errors[0]
        finally:
            for fd in fds:
                os.close(fd)


def whole_values(path: str, layout: list[list[Value]]) -> None:
    """Read every value whole, in restore order, from one thread (see the module doc)."""
    buf = np.empty(max(v.size for row in layout for v in row), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        for row in layout:
            for v in row:
                if os.preadv(fd, [buf[:v.size]], v.offset) != v.size:
                    raise OSError("short read")
    finally:
        os.close(fd)
