"""How close could a cold restore come to the disk's limit? Read patterns measured without the engine.

tierkv restores cold values with buffered reads (``preadv`` through the page cache), layer-major,
on two decode threads: each (block, layer) read straight into the result's per-head runs and
checked with CRC32C. The reload target compares that with an O_DIRECT read of the same bytes into
one reused huge-page buffer. This script times, side by side on one file, what other read
patterns reach on the same disk, with nothing of the engine around them (no lookups, headers or
per-task bookkeeping), so it gives a ceiling, not a figure of the engine:

- ``buffered, layer-major``: tierkv's pattern as above (2 threads; CRC32C of every run read);
- ``direct, block-major``: one thread reads each value in file order with O_DIRECT, ``--group``
  layers per ``preadv``, straight into the result's per-head runs (no bounce buffer); a second
  thread checks each group's CRC32C as it lands;
- ``direct, file order, through a ring of reused buffers`` (session 29): one thread reads each
  value in file order with O_DIRECT, 4 MiB a request, into a ring of four reused huge-page
  buffers; the calling thread checks the value's CRC32C and copies its per-head runs into the
  result (a bounce: a copy more, but every read lands in memory used a moment before);
- each of those into a result of 4 KiB pages and into one backed by huge pages (memory a server
  reserves for its KV at start-up could ask for them);
- ``direct, file order, whole values into a bounce buffer per thread`` (session 72): what
  ``ssd_page_cache="bypass"`` does since session 71 (``reads.SSDReads._stream``): two threads
  take the values in file order, one value at the disk at a time; each reads its value whole,
  4 MiB a request, into its own reused huge-page buffer, then checks every layer's CRC32C and
  copies the layer's per-head runs into the result while the other thread reads the next value;
- ``direct, file order, 4 MiB pieces into a bounce buffer per thread`` (session 72): the same
  with buffers of one request: each thread reads the next 4 MiB of the file, copies its bytes
  into the runs they belong to, and checks a layer's CRC32C on the result once all of it has
  landed (this VM's disk reads faster into less memory used again and again);
- ``O_DIRECT sequential, reused huge-page buffer``: the reload target's baseline;
- ``O_DIRECT sequential, whole huge-page destination``: the same read, each 4 MiB to its own place.

The file holds copies of one session of the bench's KV (``bench/reload.py``'s: SmolLM2 over 2,048
tokens), one value per block of ``--block-tokens``, laid out as tierkv's raw codec lays out a
payload (layer after layer; per layer K then V; per head the block's tokens), each value's
payload starting on a page. tierkv's store does not align payloads so (an LMDB value starts 16
bytes into its page, after tierkv's header): O_DIRECT straight into the result needs it. Results
are written once, before the rounds (preallocated), and every method reads all sessions, after
the file's pages are dropped.

    python bench/direct_ceiling.py [--size 1GiB] [--block-tokens 256] [--group 10] [--rounds 5]
                                   [--out bench/results/direct_ceiling.json]
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import shutil
import sys
import tempfile
import threading
from typing import Any, Callable

import numpy as np
import torch
from crc32c import crc32c

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_side_by_side_arguments, against_baseline, block_payloads, cold, int_at_least,  # noqa: E402
                    machine, print_against_baseline, ring_read, side_by_side, write_json, write_sessions)
from reload import HUGE_PAGE, TOKENS, huge_page_buffer, odirect_read, session_kv  # noqa: E402

from tierkv.config import parse_size  # noqa: E402

PAGE = 4096
BASELINE = "O_DIRECT sequential, reused huge-page buffer"


class Layout:
    """Where each (session, block, layer) lies in the file and in a result of all sessions.

    A result holds, per session, layer and tensor (K, V), a ``[heads, TOKENS, dim]`` tensor, as
    a restore's result does; a block's bytes of one head are one run of ``run`` bytes in it."""

    def __init__(self, layers: int, heads: int, row_bytes: int, block_tokens: int, sessions: int) -> None:
        if TOKENS % block_tokens:
            raise SystemExit(f"--block-tokens must divide {TOKENS}")
        self.layers, self.heads, self.sessions = layers, heads, sessions
        self.blocks = TOKENS // block_tokens
        self.run = block_tokens * row_bytes                 # one head's tokens of one block
        self.layer_bytes = 2 * heads * self.run              # one block's layer: K then V
        self.value = layers * self.layer_bytes                # one block's payload
        self.stride = -(-self.value // PAGE) * PAGE           # values page-aligned in the file
        self.tensor = TOKENS * row_bytes                      # one head of one result tensor
        self.nbytes = sessions * self.blocks * self.value

    def value_offset(self, session: int, block: int) -> int:
        return (session * self.blocks + block) * self.stride

    def shaped(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` (``nbytes`` of result memory) as [session, layer, tensor, head, bytes]."""
        return flat.reshape(self.sessions, self.layers, 2, self.heads, self.tensor)

    def runs(self, result: np.ndarray, session: int, block: int, layer: int) -> list[np.ndarray]:
        """The result's runs of one (block, layer), in the payload's order."""
        at = slice(block * self.run, (block + 1) * self.run)
        return [result[session, layer, t, h, at] for t in range(2) for h in range(self.heads)]


def kv_bytes(kv: list[tuple[Any, Any]]) -> list[list[np.ndarray]]:
    """Per layer, K's and V's bytes as ``[heads, tokens * row bytes]`` (any dtype, bf16 too)."""
    return [[x.contiguous().view(torch.uint8).numpy().reshape(x.shape[0], -1) for x in layer] for layer in kv]


def write_file(path: str, layout: Layout, spec: Any, kv: list[tuple[Any, Any]], block_tokens: int) -> list[int]:
    """Every session's values, each block's payload packed by tierkv itself (``pack_block``: its
    raw layout), page-aligned; returns each block's payload CRC32C."""
    values = block_payloads(spec, kv, block_tokens, layout.blocks, layout.stride)
    write_sessions(path, values, layout.sessions)
    return [crc32c(v[:layout.value]) for v in values]


def holds_the_kv(result: np.ndarray, layout: Layout, kv: list[list[np.ndarray]]) -> bool:
    """Whether every session's place in ``result`` holds the KV, byte for byte."""
    return all(np.array_equal(result[s, layer, t], kv[layer][t])
               for s in range(layout.sessions) for layer in range(layout.layers) for t in range(2))


def buffered_layer_major(path: str, layout: Layout, result: np.ndarray, threads: int = 2) -> None:
    """tierkv's pattern: a descriptor per value, (block, layer) tasks layer-major per session,
    ``threads`` threads each reading a task's runs with one ``preadv`` and checking them."""
    fds = [os.open(path, os.O_RDONLY) for _ in range(layout.sessions * layout.blocks)]
    tasks = iter([(s, b, layer) for s in range(layout.sessions) for layer in range(layout.layers)
                  for b in range(layout.blocks)])
    take = threading.Lock()
    failed: list[BaseException] = []

    def worker() -> None:
        try:
            while True:
                with take:
                    task = next(tasks, None)
                if task is None:
                    return
                s, b, layer = task
                runs = layout.runs(result, s, b, layer)
                got = os.preadv(fds[s * layout.blocks + b], runs, layout.value_offset(s, b) + layer * layout.layer_bytes)
                if got != layout.layer_bytes:
                    raise OSError(f"short read: {got} of {layout.layer_bytes} bytes")
                c = 0
                for r in runs:
                    c = crc32c(r, c)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        for fd in fds:
            os.close(fd)
    if failed:
        raise failed[0]


def direct_block_major(path: str, layout: Layout, result: np.ndarray, group: int) -> None:
    """One thread reads the values in file order with O_DIRECT, ``group`` layers per ``preadv``,
    straight into the result's runs; another checks each group's CRC32C once it has landed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    landed: queue.SimpleQueue = queue.SimpleQueue()

    def check() -> None:
        while (runs := landed.get()) is not None:
            c = 0
            for r in runs:
                c = crc32c(r, c)

    checker = threading.Thread(target=check)
    checker.start()
    try:
        for s in range(layout.sessions):
            for b in range(layout.blocks):
                for first in range(0, layout.layers, group):
                    layers = range(first, min(layout.layers, first + group))
                    runs = [r for layer in layers for r in layout.runs(result, s, b, layer)]
                    got = os.preadv(fd, runs, layout.value_offset(s, b) + first * layout.layer_bytes)
                    if got != len(layers) * layout.layer_bytes:
                        raise OSError(f"short read: {got} bytes")
                    landed.put(runs)
    finally:
        landed.put(None)
        checker.join()
        os.close(fd)


def direct_through_ring(path: str, layout: Layout, result: np.ndarray, crcs: list[int]) -> None:
    """One thread reads the values in file order with O_DIRECT, 4 MiB a request, into a ring of
    reused huge-page buffers (``common.ring_read``); this thread checks each value's CRC32C and
    copies each of its (layer, tensor, head) runs into its place in the result: a bounce, one copy
    more than the direct pattern, with every read into memory used a moment before."""
    per_session = layout.blocks
    index = [(layout.value_offset(s, b), layout.value, crcs[b])
             for s in range(layout.sessions) for b in range(per_session)]

    def deliver(i: int, chunk: memoryview) -> None:
        s, b = divmod(i, per_session)
        value = np.frombuffer(chunk, np.uint8)
        at = 0
        for layer in range(layout.layers):
            for r in layout.runs(result, s, b, layer):
                r[:] = value[at:at + layout.run]
                at += layout.run

    slot = -(-layout.value // HUGE_PAGE) * HUGE_PAGE
    ring_read(path, index, deliver, slot)



def layer_crcs(spec: Any, kv: list[tuple[Any, Any]], layout: Layout, block_tokens: int) -> list[list[int]]:
    """Per block of a session, each layer's CRC32C (its K then V runs), as tierkv's header keeps them."""
    values = block_payloads(spec, kv, block_tokens, layout.blocks, layout.stride)
    return [[crc32c(v[layer * layout.layer_bytes:(layer + 1) * layout.layer_bytes]) for layer in range(layout.layers)]
            for v in values]


def _in_two_threads(tasks: list[Any], work: Callable[[np.ndarray, Any], None], buffer_bytes: int) -> None:
    """``work(buffer, task)`` for each of ``tasks``, taken in order by two threads, each with its
    own reused huge-page buffer; the first failure is raised here."""
    maps = [huge_page_buffer(buffer_bytes) for _ in range(2)]
    left, take = iter(tasks), threading.Lock()
    failed: list[BaseException] = []

    def run(view: memoryview) -> None:
        buf = np.frombuffer(view, np.uint8)
        try:
            while True:
                with take:
                    task = next(left, None)
                if task is None:
                    return
                work(buf, task)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(e)

    pool = [threading.Thread(target=run, args=(view,)) for _, view in maps]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for m, view in maps:
        view.release()
        m.close()
    if failed:
        raise failed[0]


def direct_whole_values(path: str, layout: Layout, result: np.ndarray, crcs: list[list[int]],
                        request: int = 4 << 20) -> None:
    """tierkv's bypass stream: two threads take the values in file order; one value at the disk at
    a time, read whole (``request`` bytes a ``preadv``) into the thread's own buffer; then every
    layer is checked (CRC32C) and its runs copied into the result while the other thread reads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    disk = threading.Lock()

    def work(buf: np.ndarray, value: tuple[int, int]) -> None:
        s, b = value
        at = layout.value_offset(s, b)
        with disk:
            for off in range(0, layout.stride, request):
                n = min(request, layout.stride - off)
                if os.preadv(fd, [buf[off:off + n]], at + off) < min(n, layout.value - off):
                    raise OSError("short read")
        for layer in range(layout.layers):
            src = buf[layer * layout.layer_bytes:(layer + 1) * layout.layer_bytes]
            if crc32c(src) != crcs[b][layer]:
                raise SystemExit(f"value {value}, layer {layer}: checksum mismatch")
            for i, r in enumerate(layout.runs(result, s, b, layer)):
                r[:] = src[i * layout.run:(i + 1) * layout.run]

    try:
        _in_two_threads([(s, b) for s in range(layout.sessions) for b in range(layout.blocks)], work,
                        -(-layout.stride // HUGE_PAGE) * HUGE_PAGE)
    finally:
        os.close(fd)


def direct_pieces(path: str, layout: Layout, result: np.ndarray, crcs: list[list[int]],
                  piece: int = 4 << 20) -> None:
    """The same in pieces of one request: two threads take the next ``piece`` bytes of a value
    in file order (one piece at the disk at a time) into a buffer of that size each, copy its
    bytes into the runs they belong to, and check a layer's CRC32C on the result once every byte
    of it has landed (whichever thread lands the last)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    disk, count = threading.Lock(), threading.Lock()
    landed: dict[tuple[int, int, int], int] = {}

    def work(buf: np.ndarray, task: tuple[int, int, int]) -> None:
        s, b, off = task
        n = min(piece, layout.stride - off)
        with disk:
            if os.preadv(fd, [buf[:n]], layout.value_offset(s, b) + off) < min(n, layout.value - off):
                raise OSError("short read")
        pos, end = off, min(off + n, layout.value)
        while pos < end:   # value bytes [pos, end): a run, or the part of one in this piece
            layer, within = divmod(pos, layout.layer_bytes)
            i, at = divmod(within, layout.run)
            k = min(end - pos, layout.run - at)
            layout.runs(result, s, b, layer)[i][at:at + k] = buf[pos - off:pos - off + k]
            with count:
                got = landed[(s, b, layer)] = landed.get((s, b, layer), 0) + k
            if got == layout.layer_bytes:
                c = 0
                for r in layout.runs(result, s, b, layer):
                    c = crc32c(r, c)
                if c != crcs[b][layer]:
                    raise SystemExit(f"value {(s, b)}, layer {layer}: checksum mismatch")
            pos += k

    try:
        _in_two_threads([(s, b, off) for s in range(layout.sessions) for b in range(layout.blocks)
                         for off in range(0, layout.stride, piece)], work, piece)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=5, out="bench/results/direct_ceiling.json")
    ap.add_argument("--size", default="1GiB", help="raw KV bytes in total (whole sessions)")
    ap.add_argument("--block-tokens", type=int_at_least(1), default=256)
    ap.add_argument("--group", type=int_at_least(1), default=10, help="layers per O_DIRECT read in the direct pattern")
    ap.add_argument("--dir", default=None, help="working directory on the disk to test (default: a temp dir)")
    args = ap.parse_args(argv)
    from tierkv.cli import default_cache_dir

    spec, kv = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    kvb = kv_bytes(kv)
    heads, row_bytes = kv[0][0].shape[0], kv[0][0].shape[2] * kv[0][0].element_size()
    sessions = max(1, parse_size(args.size) // (spec.bytes_per_token * TOKENS))
    layout = Layout(spec.num_layers, heads, row_bytes, args.block_tokens, sessions)
    work = tempfile.mkdtemp(prefix="tierkv-direct-", dir=args.dir)
    path = os.path.join(work, "values.bin")
    try:  # the maps live until the process ends (it is a script: nothing to hand back sooner)
        crcs = write_file(path, layout, spec, kv, args.block_tokens)
        hp_map, hp_view = huge_page_buffer(layout.nbytes)
        # 4 KiB pages: a private anonymous map, page-aligned, never asked for huge pages (a numpy
        # array this large is: numpy advises MADV_HUGEPAGE for big allocations, which made this
        # row's result huge pages too up to session 27)
        plain_map = mmap.mmap(-1, layout.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        plain = np.frombuffer(plain_map, np.uint8)
        results = {"4 KiB pages": layout.shaped(plain), "huge pages": layout.shaped(np.frombuffer(hp_view, np.uint8))}
        whole_map, whole = huge_page_buffer(os.path.getsize(path))
        for flat in (plain, np.frombuffer(hp_view, np.uint8), np.frombuffer(whole, np.uint8)):
            flat[::PAGE] = 1  # written once, before the rounds, as a server's KV memory is

        methods: dict[str, Callable[[], Any]] = {}
        for kind, result in results.items():
            methods[f"buffered, layer-major (tierkv's pattern), result in {kind}"] = (
                lambda r=result: buffered_layer_major(path, layout, r))
            methods[f"direct, block-major, result in {kind}"] = (
                lambda r=result: direct_block_major(path, layout, r, args.group))
            methods[f"direct, file order, through a ring of reused buffers, result in {kind}"] = (
                lambda r=result: direct_through_ring(path, layout, r, crcs))
        per_layer = layer_crcs(spec, kv, layout, args.block_tokens)
        hp = results["huge pages"]
        methods["direct, file order, whole values into a bounce buffer per thread, result in huge pages"] = (
            lambda: direct_whole_values(path, layout, hp, per_layer))
        methods["direct, file order, 4 MiB pieces into a bounce buffer per thread, result in huge pages"] = (
            lambda: direct_pieces(path, layout, hp, per_layer))
        methods[BASELINE] = lambda: odirect_read(path, huge=True)
        methods["O_DIRECT sequential, whole huge-page destination"] = lambda: odirect_read(path, into=whole)
        for name, f in methods.items():  # first use: code warmed; and each pattern's bytes checked
            result = next((r for kind, r in results.items() if name.endswith(kind)), None)
            if result is not None:
                result.fill(0)
            f()
            if result is not None and not holds_the_kv(result, layout, kvb):
                raise SystemExit(f"{name}: the result does not hold the KV")

        rows, orders = side_by_side({k: cold(path, f) for k, f in methods.items()}, args.rounds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "sessions": sessions, "bytes": layout.nbytes, "block_tokens": args.block_tokens, "group": args.group,
        "rounds": args.rounds, "seed": args.seed, "round_orders": orders,
        **against_baseline(rows, layout.nbytes, BASELINE),
    }
    print(f"{sessions} sessions x {TOKENS} tokens = {layout.nbytes / 2**30:.2f} GiB, {args.block_tokens}-token blocks, "
          f"{args.group} layers per direct read")
    print_against_baseline(out, layout.nbytes)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
