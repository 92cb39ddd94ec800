"""Where a restore into GPU memory spends its time, side by side with the same restore into CPU memory.

On session 25's H200 machine, warm restores (the store in the page cache) ran at 2.03 GB/s into
GPU memory against 3.73 into CPU memory, and cold ones at 0.89x; that run measured totals
only. This script times the parts of every restore. It writes one store of real KV (2,048-token
sessions), then in each round, in a shuffled order, restores every session into each device:

- ``decode_s``: from the call until every layer is decoded (``LoadHandle.wait``): reads,
  checksums and copies into host buffers, with the uploads the decode threads queue;
- of which ``upload_launch_s``: the decode threads' time queueing uploads (``_upload``, summed
  over threads), and ``layer_buffer_s``: making each layer's host buffer and its views
  (``_targets``, summed over threads);
- ``result_s``: ``result()`` (copies of blocks found in memory; the waits it queues);
- ``device_tail_s``: from ``result()`` returning until the device has run every queued copy.

Sources: ``warm`` (page cache), ``cold`` (the store's pages dropped before each restore pass)
and ``host`` (every block in the host tier, pinned where CUDA is). Medians over the rounds, per
GiB of KV; one JSON.

    python bench/gpu_restore_split.py [--size 512MiB] [--rounds 5] [--dtype bf16] [--codec raw]
                                      [--device cuda] [--out bench/results/gpu_restore_split.json]

``--device cpu --staged`` runs the GPU path's logic on the CPU (the tests' "cpu-staged"), to
check the script where there is no GPU; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ab_reload import _tokens, write_store  # noqa: E402
from common import collected, int_at_least, machine, setup_frozen, stats_of, write_json  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402
import tierkv.engine  # noqa: E402
from tierkv.config import parse_size  # noqa: E402
from tierkv.handles import LoadHandle  # noqa: E402
from tierkv.pagecache import make_cold  # noqa: E402

PARTS = ("decode_s", "upload_launch_s", "layer_buffer_s", "result_s", "device_tail_s", "total_s")


class _Timed:
    """Sums the wall time of every call of a LoadHandle method, over all threads."""

    def __init__(self, name: str) -> None:
        self.name, self.total, self.lock = name, 0.0, threading.Lock()
        self.orig: Callable[..., Any] = getattr(LoadHandle, name)

    def __enter__(self) -> "_Timed":
        orig = self.orig

        def timed(handle: LoadHandle, *args: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(handle, *args)
            finally:
                with self.lock:
                    self.total += time.perf_counter() - t
        setattr(LoadHandle, self.name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(LoadHandle, self.name, self.orig)


def restore_all(s: Any, n: int, device: str) -> dict[str, float]:
    """Restore every session into ``device``; the parts' sums over the sessions."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    parts = dict.fromkeys(PARTS, 0.0)
    with _Timed("_upload") as up, _Timed("_targets") as tg:
        sync()
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            h = s.restore_async(_tokens(i, TOKENS), session=f"s{i}", device=device)
            h.wait()
            t1 = time.perf_counter()
            r = h.result()
            t2 = time.perf_counter()
            sync()
            t3 = time.perf_counter()
            if r.num_tokens != TOKENS:
                raise SystemExit(f"restored {r.num_tokens} of {TOKENS} tokens")
            parts["decode_s"] += t1 - t0
            parts["result_s"] += t2 - t1
            parts["device_tail_s"] += t3 - t2
            del r, h
        parts["total_s"] = time.perf_counter() - start
    parts["upload_launch_s"], parts["layer_buffer_s"] = up.total, tg.total
    return parts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB", help="raw KV bytes in total")
    ap.add_argument("--rounds", type=int_at_least(1), default=5)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--staged", action="store_true", help="the GPU path's logic on the CPU (a check, not a figure)")
    ap.add_argument("--sources", nargs="+", choices=("warm", "cold", "host"), default=["warm", "cold", "host"])
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--dir", default=None, help="working directory on the disk to test (default: a temp dir)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/gpu_restore_split.json")
    args = ap.parse_args(argv)
    if args.staged:
        tierkv.engine.via_host_staging = lambda device: True  # type: ignore[assignment]
    from tierkv.cli import default_cache_dir

    spec, kv = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    per = TOKENS * spec.bytes_per_token
    n = max(1, parse_size(args.size, "--size") // per)
    total = n * per
    work = tempfile.mkdtemp(prefix="tierkv-gpusplit-", dir=args.dir)
    store = os.path.join(work, "store")
    data = os.path.join(store, "data.mdb")
    ssd = dict(device_bytes=0, ssd_bytes=2 * total + (1 << 30), ssd_codec=args.codec)
    devices = ["cpu", args.device] if args.device != "cpu" else ["cpu"]
    labels = {"cpu": "into CPU memory", args.device: f"into {args.device} memory" + (" (staged)" if args.staged else "")}
    rows: dict[str, dict[str, list[float]]] = {}
    orders = []
    rng = random.Random(args.seed)
    try:
        write_store(tierkv, store, spec, kv, n, args.codec)
        for source in args.sources:
            host = source == "host"
            def opened() -> tierkv.TierKV:
                return tierkv.TierKV(store, spec, host_bytes=2 * total if host else 0, **ssd)
            s = opened()
            try:
                if host:
                    for i in range(n):
                        s.prefetch(_tokens(i, TOKENS), session=f"s{i}").wait()
                    if s.stats()["resident_bytes"]["host"] < total:
                        raise SystemExit("the host tier did not take every block")
                else:
                    restore_all(s, n, "cpu")  # the store's B-tree pages and (warm) values cached
                with setup_frozen():
                    for _ in range(args.rounds):
                        order = list(devices)
                        rng.shuffle(order)
                        orders.append([source] + order)
                        for dev in order:
                            if source == "cold":
                                # as after a restart: the store closed, every page of it dropped,
                                # B-tree pages included (an open store's map keeps the pages it has
                                # touched, and make_cold refused to call that cold),
                                # then opened again (untimed)
                                s.close()
                                make_cold(data)
                                s = opened()
                            collected()
                            row = rows.setdefault(f"{source}, {labels[dev]}", {})
                            for k, v in restore_all(s, n, dev).items():
                                row.setdefault(k, []).append(v)
                        print(f"  {source} round {len(orders)}: " + ", ".join(
                            f"{labels[d]} {total / rows[f'{source}, {labels[d]}']['total_s'][-1] / 1e9:.2f} GB/s"
                            for d in order), flush=True)
            finally:
                s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = total / (1 << 30)
    results: dict[str, Any] = {
        "machine": machine(), "sessions": n, "tokens_per_session": TOKENS, "raw_bytes": total,
        "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype, "codec": args.codec,
        "device": args.device, "staged": args.staged, "rounds": args.rounds, "seed": args.seed,
        "round_orders": orders,
        "rows": {name: {k: stats_of(v) for k, v in row.items()} for name, row in rows.items()},
        "gbps": {name: total / statistics.median(row["total_s"]) / 1e9 for name, row in rows.items()},
        "ms_per_gib": {name: {k: statistics.median(v) * 1e3 / gib for k, v in row.items()} for name, row in rows.items()},
    }
    print(f"{'ms per GiB of KV (medians)':<40}" + "".join(f"{p[:-2]:>15}" for p in PARTS) + f"{'GB/s':>8}")
    for name, parts in results["ms_per_gib"].items():
        print(f"{name:<40}" + "".join(f"{parts[p]:15.1f}" for p in PARTS) + f"{results['gbps'][name]:8.2f}")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
