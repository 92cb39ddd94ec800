"""What bounds a save's throughput to SSD: tierkv's write path next to the disk's own write rates.

`tierkv bench reload` reports how fast tierkv writes its sessions through to SSD (`save`, then
`flush`), well below what the disk reads. This script asks why, with the same sessions (11 of
fp32 KV, or 22 of bf16, 2,048 tokens each, about 1 GiB) written side by side, in an order
shuffled per round, each into a file or store of its own made anew:

- ``tierkv save, write-through, then flush``: the engine, from the caller's tensors to a durable
  store: the copy into the host tier, the writer's encoding (header, CRC32C per layer), LMDB's
  copy into its pages, its commit (the dirty pages written, then fdatasync). The engine's
  ``stats()["ssd_writes"]`` splits the writer's time; the JSON keeps its medians;
- ``raw LMDB values, no codec, a transaction per session``: one value per 256-token block, put
  and committed (with its fdatasync) session after session: the same store without tierkv;
- ``raw LMDB values, no codec, a transaction per 2 blocks``: the same in transactions of two
  values (about 24 MiB of fp32 KV): does the size of a transaction matter? LMDB holds a
  transaction's new pages in memory it allocates until the commit writes them;
- ``raw LMDB values, no codec, a transaction per session, MDB_WRITEMAP``: LMDB writing the
  values straight into its map of the file, not into memory of its own that the commit then
  writes out; tierkv does not use this mode (a full disk becomes a crash, ``SIGBUS``), so the
  row asks what that costs it;
- ``file, buffered 4 MiB writes, then fdatasync``: the raw bytes in one file, through the page
  cache: the most a writer through the page cache can expect of this disk;
- ``file, buffered 4 MiB writes, then fdatasync``, over a file already written and cached: the
  same bytes again into the same file without truncating it, so every write lands on a page
  the page cache already holds (the first write, which fills it, is not timed). Set against
  the row above: what do new page-cache pages cost, beyond the copy into them?
- ``file, O_DIRECT 4 MiB writes from a huge-page buffer``: the disk's own sequential write rate.

Each row also gets its CPU time, user and system, from ``getrusage`` (the child's own for the
tierkv rows, every thread of it): a write through the page cache spends its time in the kernel.

The files and stores are deleted after each method, so each write starts on an empty file, as
a new store does. tierkv saves in a process of its own each time (the KV loaded before the clock
starts), so ``--a DIR`` can add a row for another version of tierkv (a checkout, or ``git
archive`` of a commit), side by side with this one: is a change to the write path faster?

    python bench/save_bound.py [--dtype fp32|bf16] [--codec zstd-planes|raw] [--a DIR]
                               [--rounds 5] [--dir /var/tmp] [--out bench/results/save_bound.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
if "--child" in sys.argv:  # a child saves with the tierkv under --child: first on the path, before any import of it
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--child") + 1]))
from common import (add_side_by_side_arguments, add_version_arguments, machine, run_child, side_by_side,  # noqa: E402
                    stats_of, tierkv_from, write_json)
from reload import TOKENS, huge_page_buffer, session_kv  # noqa: E402


CHUNK = 4 << 20
TIERKV = "tierkv save, write-through, then flush"
LMDB = "raw LMDB values, no codec, a transaction per session"
LMDB_SMALL = "raw LMDB values, no codec, a transaction per 2 blocks"
LMDB_WRITEMAP = "raw LMDB values, no codec, a transaction per session, MDB_WRITEMAP"
BUFFERED = "file, buffered 4 MiB writes, then fdatasync"
REWRITE = "file, buffered 4 MiB writes over its cached pages, then fdatasync"
DIRECT = "file, O_DIRECT 4 MiB writes from a huge-page buffer"


def direct_writes(where: str) -> bool:
    """Whether the file system under ``where`` takes O_DIRECT writes (tmpfs does not)."""
    probe = os.path.join(where, "odirect-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def cpu_now() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def cpu_since(then: resource.struct_rusage) -> dict[str, float]:
    """User and system CPU seconds this process (all its threads) spent since ``then``."""
    now = cpu_now()
    return {"user": now.ru_utime - then.ru_utime, "sys": now.ru_stime - then.ru_stime}


def child(root: str, target: str, args: argparse.Namespace) -> None:
    """Save every session into a new store at ``target`` with the tierkv found in ``root``,
    write-through, then flush; print the seconds that took and the writer's split as JSON."""
    tierkv = tierkv_from(root)
    spec, kv = session_kv(args.synthetic, args.cache_dir, args.dtype)  # the parent's --cache-dir
    n = args.sessions
    total = n * spec.bytes_per_token * TOKENS
    t, cpu = time.perf_counter(), cpu_now()
    with tierkv.TierKV(target, spec, device_bytes=0, host_bytes=2 * total + (1 << 30),
                       ssd_bytes=2 * total + (1 << 30), persist="write_through", ssd_codec=args.codec) as s:
        for i in range(n):
            s.save(list(range(i * 100_000, i * 100_000 + TOKENS)), kv, session=f"s{i}")
        s.flush()
        writes = s.stats().get("ssd_writes")  # None for a version from before session 31
        ratio = s.stats()["compression_ratio"]
    print(json.dumps({"seconds": time.perf_counter() - t, "writes": writes, "compression_ratio": ratio,
                      "cpu": cpu_since(cpu)}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=5, out="bench/results/save_bound.json")
    ap.add_argument("--sessions", type=int, default=None, help="default: about 1 GiB of KV")
    ap.add_argument("--codec", default="zstd-planes", help="tierkv's ssd_codec (its default: zstd-planes)")
    add_version_arguments(ap)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.target, args)
        return {}
    import lmdb
    import torch

    from tierkv.blocks import pack_block
    from tierkv.cli import default_cache_dir

    args.cache_dir = args.cache_dir or default_cache_dir()  # for the children: an older tierkv may lack it
    spec, kv = session_kv(args.synthetic, args.cache_dir, args.dtype)
    per = spec.bytes_per_token * TOKENS
    n = args.sessions = args.sessions or max(1, (1 << 30) // per)
    total = n * per
    # the raw bytes of one session, in tierkv's block layout: 256-token blocks, each block's
    # layers one after another (pack_block, the raw codec's payload)
    bt = 256
    session = torch.zeros(per, dtype=torch.uint8)
    for b in range(TOKENS // bt):
        pack_block(spec, kv, b * bt, bt, session[b * bt * spec.bytes_per_token:(b + 1) * bt * spec.bytes_per_token])
    raw = session.numpy()
    blocks = [raw[b * bt * spec.bytes_per_token:(b + 1) * bt * spec.bytes_per_token] for b in range(TOKENS // bt)]
    work = tempfile.mkdtemp(prefix="tierkv-save-", dir=args.dir)
    target = os.path.join(work, "target")
    children: dict[str, list[dict[str, Any]]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def tierkv_save(root: str, row: str) -> Any:
        def run() -> float:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", root, "--target", target,
                   "--dtype", args.dtype, "--sessions", str(n), "--codec", args.codec]
            cmd += ["--synthetic"] if args.synthetic else []
            cmd += ["--cache-dir", args.cache_dir]
            got = run_child(cmd, row)
            children.setdefault(row, []).append(got)
            if got.get("cpu"):  # a version from before session 32 does not report it
                cpu.setdefault(row, []).append(got["cpu"])
            return got["seconds"]  # the save itself, not the child's start
        return run

    def lmdb_save(per_txn: int, writemap: bool = False) -> None:
        env = lmdb.open(target, map_size=2 * total + (1 << 30), writemap=writemap)
        try:
            values = [(f"{i}:{j}".encode(), b) for i in range(n) for j, b in enumerate(blocks)]
            for at in range(0, len(values), per_txn):
                with env.begin(write=True) as txn:
                    for key, b in values[at:at + per_txn]:
                        txn.put(key, b)
        finally:
            env.close()

    def buffered_write(truncate: bool = True) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o600)
        try:
            view = memoryview(raw)
            for _ in range(n):
                for off in range(0, per, CHUNK):
                    os.write(fd, view[off:off + CHUNK])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    buf_map, buf = huge_page_buffer(per)
    np.frombuffer(buf, np.uint8)[:] = raw  # the session's bytes, in memory O_DIRECT can write from

    def direct_write() -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            at = 0
            for _ in range(n):
                for off in range(0, per, CHUNK):
                    at += os.pwritev(fd, [buf[off:off + CHUNK]], at)
            os.fdatasync(fd)  # the file's new size, and anything the disk still holds
        finally:
            os.close(fd)

    def fresh(write: Any, row: str | None = None, setup: Any = None) -> Any:
        """``write`` into a new file or store, deleted after it. A child reports its own time
        (``row`` None); otherwise ``write`` is timed here, with this process's CPU time, after
        ``setup`` (untimed)."""
        def run() -> float | None:
            try:
                if row is None:
                    return write()
                if setup is not None:
                    setup()
                then, t = cpu_now(), time.perf_counter()
                write()
                took = time.perf_counter() - t
                cpu.setdefault(row, []).append(cpu_since(then))
                return took
            finally:
                shutil.rmtree(target, ignore_errors=True)
                if os.path.exists(target):
                    os.unlink(target)
        return run

    try:
        methods = {TIERKV: fresh(tierkv_save(here, TIERKV))}
        if args.a:
            methods[f"{TIERKV}, version A ({args.a})"] = fresh(tierkv_save(args.a, f"{TIERKV}, version A ({args.a})"))
        methods |= {LMDB: fresh(lambda: lmdb_save(len(blocks)), LMDB),
                    LMDB_SMALL: fresh(lambda: lmdb_save(2), LMDB_SMALL),
                    LMDB_WRITEMAP: fresh(lambda: lmdb_save(len(blocks), writemap=True), LMDB_WRITEMAP),
                    BUFFERED: fresh(buffered_write, BUFFERED),
                    REWRITE: fresh(lambda: buffered_write(truncate=False), REWRITE, setup=buffered_write)}
        if direct_writes(work):
            methods[DIRECT] = fresh(direct_write, DIRECT)
        else:
            print(f"  ({DIRECT}: left out, O_DIRECT refused in {work})")
        rows, orders = side_by_side(methods, args.rounds, args.seed)
    finally:
        buf = None
        buf_map.close()
        shutil.rmtree(work, ignore_errors=True)
    gbps = {k: total / statistics.median(v) / 1e9 for k, v in rows.items()}
    writes = [c["writes"] for c in children[TIERKV]]
    split = {k: stats_of([w[k] for w in writes]) for k in ("encode_seconds", "transaction_seconds", "commit_seconds")}
    split["batches"] = stats_of([w["batches"] for w in writes])
    out: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "sessions": n, "bytes": total, "rounds": args.rounds, "seed": args.seed, "round_orders": orders,
        "seconds": {k: stats_of(v) for k, v in rows.items()}, "gbps": gbps,
        "vs_buffered_write": {k: gbps[k] / gbps[BUFFERED] for k in rows},
        "vs_buffered_write_paired": {k: statistics.median(b / a for a, b in zip(rows[k], rows[BUFFERED]))
                                     for k in rows},
        "cpu_seconds": {k: {part: stats_of([c[part] for c in v]) for part in ("user", "sys")} for k, v in cpu.items()},
        "codec": args.codec, "a": args.a, "tierkv_writer": split,
        "tierkv_children": children,
        "compression_ratios": {row: statistics.median(c["compression_ratio"] for c in got)
                               for row, got in children.items()},
    }
    print(f"{n} sessions x {TOKENS} tokens = {total / 2**30:.2f} GiB of {out['kv']} written, {args.rounds} rounds")
    for k in rows:
        used = out["cpu_seconds"].get(k)
        print(f"  {k:55s} {gbps[k]:5.2f} GB/s  {out['vs_buffered_write'][k]:.2f}x of the buffered write "
              f"(per round {out['vs_buffered_write_paired'][k]:.2f}x)"
              + (f"  CPU s: user {used['user']['median']:.2f}, sys {used['sys']['median']:.2f}" if used else ""))
    print("  tierkv's writer, medians: " + ", ".join(
        f"{k.replace('_seconds', '')} {split[k]['median']:.2f} s" for k in ("encode_seconds", "transaction_seconds",
                                                                             "commit_seconds"))
          + f" in {split['batches']['median']:.0f} batches")
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
