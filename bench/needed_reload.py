"""Cold restores that need only part of a session's KV (``needed_from``), against the whole.

A server often holds the first tokens of a prompt in its own prefix cache, and a sliding-window
layer attends only to its window: with ``needed_from`` a restore reads, per layer, only the blocks
from the first token the caller needs. This times, side by side in an order shuffled per round,
each a cold restore (the store's pages dropped from the page cache first) into preallocated
tensors, of one 8,192-token session of SmolLM2's fp32 KV (its 2,048 tokens of stdlib source,
four times over; ``--synthetic`` for random KV):

- ``whole``: every layer from token 0;
- ``sliding 1024 in 2 layers of 3``: a Mistral / Gemma-style model's layers (two in three
  attending to the last 1,024 tokens) need those layers from token 7,168 only;
- ``server holds 6144``: every layer from token 6,144 (a server's own prefix cache holds the rest).

It reports each one's median seconds (min, max), the bytes it asked for (``ssd_read_bytes``)
and the bytes the disk read (``/proc/diskstats``, readahead included), and its speed-up and byte
ratio against ``whole``. Every needed row is checked exact once.

``--hint-ahead 4,8,64`` adds the sliding plan once per window (MiB) of ``reads.HINT_AHEAD_BYTES``,
the bytes of a block read with gaps asked of the disk ahead of the decode threads, side by side
with the rest (the plan's own row runs with the engine's default).

    python bench/needed_reload.py [--rounds 5] [--dir /var/tmp] [--hint-ahead MIB,...] [--out bench/results/needed_reload.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_side_by_side_arguments, cold, disk_read_counters, existing_dir, machine,  # noqa: E402
                    preallocated, side_by_side, stats_of, write_json)
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402
import tierkv.reads  # noqa: E402

REPEATS = 4   # the 2,048-token KV four times over: 8,192 tokens
WINDOW = 1024


def mib_list(text: str) -> list[int]:
    """``--hint-ahead``: comma-separated whole MiB, each at least 1."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole MiB") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each window is at least 1 MiB")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=5, out="bench/results/needed_reload.json")
    ap.add_argument("--dir", type=existing_dir, default=None, help="working directory on the disk to test")
    ap.add_argument("--hint-ahead", type=mib_list, default=[],
                    help="windows (MiB, comma-separated) of reads.HINT_AHEAD_BYTES to time the sliding plan with")
    args = ap.parse_args(argv)
    from tierkv.cli import default_cache_dir

    spec, kv1 = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    kv = [tuple(torch.cat([x] * REPEATS, dim=1) for x in layer) for layer in kv1]
    n = TOKENS * REPEATS
    L = spec.num_layers
    sliding = f"sliding {WINDOW} in 2 layers of 3"
    plans: dict[str, list[int] | None] = {
        "whole": None,
        sliding: [0 if i % 3 == 2 else n - WINDOW for i in range(L)],
        "server holds 6144": [6144] * L,
    }
    windows = {f"{sliding}, hint ahead {mib} MiB": mib << 20 for mib in args.hint_ahead}
    default_window = tierkv.reads.HINT_AHEAD_BYTES
    plans.update({name: plans[sliding] for name in windows})
    work = tempfile.mkdtemp(prefix="tierkv-needed-", dir=args.dir)
    read: dict[str, int] = {}
    skipped: dict[str, int] = {}
    disk: dict[str, list[int]] = {name: [] for name in plans}   # bytes the disk read, per round

    def counted(name: str, run: Callable[[], float]) -> Callable[[], float]:
        def timed() -> float:
            before = disk_read_counters(work)
            seconds = run()
            after = disk_read_counters(work)
            if before is not None and after is not None:
                disk[name].append((after[1] - before[1]) * 512)
            return seconds
        return timed

    try:
        with tierkv.TierKV(os.path.join(work, "store"), spec, device="cpu", device_bytes=0, host_bytes=0,
                           persist="write_through", ssd_bytes=2 * n * spec.bytes_per_token + (1 << 30)) as s:
            s.save(range(n), kv, session="s").wait()
            data = os.path.join(work, "store", "data.mdb")
            pool = preallocated(spec, n)

            def restore(needed: list[int] | None, window: int = default_window) -> Callable[[], Any]:
                def run() -> None:
                    tierkv.reads.HINT_AHEAD_BYTES = window
                    r = s.restore_async(range(n), session="s", allocate=pool, needed_from=needed).result()
                    if r.num_tokens != n:
                        raise SystemExit(f"restored {r.num_tokens} of {n} tokens")
                return run

            methods: dict[str, Callable[[], float | None]] = {}
            for name, needed in plans.items():
                if name in windows:   # the same reads as the plan's own row, another hint window
                    methods[name] = counted(name, cold(data, restore(needed, windows[name])))
                    read[name], skipped[name] = read[sliding], skipped[sliding]
                    continue
                before = s.stats()
                cold(data, restore(needed))()
                after = s.stats()
                read[name] = after["ssd_read_bytes"] - before["ssd_read_bytes"]
                skipped[name] = after["skipped_block_layers"] - before["skipped_block_layers"]
                r = s.restore_async(range(n), session="s", needed_from=needed).result()
                for i, (want, got) in enumerate(zip(kv, r.kv)):
                    start = 0 if needed is None else needed[i] // s.block_tokens * s.block_tokens
                    for x, y in zip(want, got):
                        if not torch.equal(x[:, start:].view(torch.int32 if x.dtype == torch.float32 else torch.int16),
                                           y[:, start:].view(torch.int32 if y.dtype == torch.float32 else torch.int16)):
                            raise SystemExit(f"{name}: layer {i} differs from token {start} on")
                methods[name] = counted(name, cold(data, restore(needed)))
            rows, orders = side_by_side(methods, args.rounds, args.seed)
    finally:
        tierkv.reads.HINT_AHEAD_BYTES = default_window
        shutil.rmtree(work, ignore_errors=True)
    whole = statistics.median(rows["whole"])
    results: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "tokens": n, "bytes": n * spec.bytes_per_token, "block_tokens": 256, "rounds": args.rounds,
        "seed": args.seed, "round_orders": orders, "needed_from": plans,
        "hint_ahead_bytes": {sliding: default_window, **windows},
        "seconds": {k: stats_of(v) for k, v in rows.items()},
        "ssd_read_bytes": read, "skipped_block_layers": skipped,
        # what the disk itself read per round (/proc/diskstats: device-wide, readahead included)
        "disk_read_bytes": {k: stats_of(v) if v else None for k, v in disk.items()},
        "speedup_vs_whole": {k: whole / statistics.median(v) for k, v in rows.items()},
        "speedup_vs_whole_paired": {k: statistics.median(w / x for w, x in zip(rows["whole"], v)) for k, v in rows.items()},
        "bytes_vs_whole": {k: read[k] / read["whole"] for k in read},
    }
    print(f"cold restores of {n} tokens ({n * spec.bytes_per_token / 1e6:.0f} MB), medians of {args.rounds}:")
    for k, v in rows.items():
        st = results["seconds"][k]
        print(f"  {k:<32} {st['median'] * 1e3:7.1f} ms ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f})  "
              f"read {read[k] / 1e6:6.1f} MB ({results['bytes_vs_whole'][k]:.2f} of whole; the disk "
              f"{statistics.median(disk[k]) / 1e6 if disk[k] else float('nan'):.1f})  "
              f"{results['speedup_vs_whole'][k]:.2f}x faster than whole (per round {results['speedup_vs_whole_paired'][k]:.2f}x)")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
