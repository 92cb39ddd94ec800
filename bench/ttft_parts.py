"""Where a restored turn's time goes: one long session restored from cold SSD, under variants.

A session of ``--tokens`` (default 8,064, the demo's 8K session) of SmolLM2 fp32 KV is saved to
SSD (real KV of 2,048 tokens of stdlib source, repeated: the timing does not depend on the
values). Then, round after round, each variant runs once (pages dropped before each):

- prefill only: the KV fully restored first, then only the prefill of the 27-token message is
  timed — the floor with no reload at all;
- overlapped: restore layer by layer into a ``CachePool`` while prefilling (what the demo does);
- overlapped, fresh buffers: the same with new tensors for the restore (no pool);
- overlapped, sdpa: the same with transformers' "sdpa" attention (repeats KV heads) instead of
  ``use_grouped_attention``;
- overlapped, 4 I/O threads: the same with ``io_threads=4`` (the default is 2);
- overlapped, I/O threads not spread: the same with ``io_affinity="inherit"`` (the default,
  "spread", gives each I/O thread CPUs of its own; here they may run on any, as torch's do);
- overlapped, one shared descriptor: the same with every value read through data.mdb's one
  descriptor, as before tierkv gave each value being read a descriptor of its own
  (``ValueReader.read_at``).

For the overlapped variant it also records a timeline: when layer 0 of the restore was ready,
when the whole restore was done, and how many layers the prefill had reached by then.

    python bench/ttft_parts.py [--tokens 8064] [--rounds 6]     # -> bench/results/ttft_parts.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import collected, int_at_least, machine, setup_frozen, write_json  # noqa: E402
from reload import session_kv  # noqa: E402

import tierkv  # noqa: E402
from tierkv.integrations.hf import (GROUPED_ATTENTION, HEADROOM, CachePool, load_smollm2, prefill,  # noqa: E402
                                    restore_cache)
from tierkv.pagecache import make_cold  # noqa: E402
from tierkv.valuereader import ValueReader  # noqa: E402

MESSAGE = 27  # the demo's turn-2 message length


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int_at_least(2), default=8064)
    ap.add_argument("--rounds", type=int_at_least(1), default=6)
    ap.add_argument("--out", default="bench/results/ttft_parts.json")
    args = ap.parse_args(argv)
    model, _, spec = load_smollm2()
    torch.set_num_threads(os.cpu_count() or 1)
    _, kv2k = session_kv(False, os.path.join(os.path.expanduser("~"), ".cache", "tierkv"))
    n = args.tokens
    reps = -(-n // kv2k[0][0].shape[1])
    kv = [(torch.cat([k] * reps, 1)[:, :n].contiguous(), torch.cat([v] * reps, 1)[:, :n].contiguous())
          for k, v in kv2k]
    toks = np.random.default_rng(0).integers(0, 49_000, n).tolist()
    msg = list(range(1000, 1000 + MESSAGE))
    work = tempfile.mkdtemp(prefix="tierkv-ttft-parts-")
    path = os.path.join(work, "store")
    big = 2 * n * spec.bytes_per_token + (64 << 20)
    with tierkv.TierKV(path, spec, ssd_bytes=4 * big, persist="write_through") as s:
        s.save(toks, kv, session="a").wait()
    del kv
    pool = CachePool()
    pool.reserve(spec, n + HEADROOM)
    prefill(model, msg, None)  # warm-up

    timeline: list[dict[str, float]] = []
    default_fds = ValueReader.MAX_OWN_FDS

    def turn(use_pool: bool, attention: str, overlap: bool, trace: bool = False, io_threads: int = 2,
             own_fds: bool = True, io_affinity: str = "spread") -> float:
        make_cold(os.path.join(path, "data.mdb"))
        ValueReader.MAX_OWN_FDS = default_fds if own_fds else 0
        model.set_attn_implementation(attention)
        with tierkv.TierKV(path, spec, ssd_bytes=4 * big, device_bytes=0, host_bytes=0, io_threads=io_threads,
                        io_affinity=io_affinity) as s:
            collected()
            t0 = time.perf_counter()
            cache, h = restore_cache(s, toks, model.config, session="a", pool=pool if use_pool else None)
            assert h.num_tokens == n
            if trace:
                ready: list[float] = []   # when the prefill got each layer
                done: list[float] = []
                waiter = threading.Thread(target=lambda: (h.wait(), done.append(time.perf_counter())))
                waiter.start()
                layer = h.layer
                h.layer = lambda i: (layer(i), ready.append(time.perf_counter()))[0]
            if not overlap:
                h.result()
                t0 = time.perf_counter()
            prefill(model, msg, cache)
            t = time.perf_counter() - t0
            h.result()
            if trace:
                waiter.join()
                timeline.append({"layer0_ready_ms": (ready[0] - t0) * 1e3, "restore_done_ms": (done[0] - t0) * 1e3,
                                 "layers_prefilled_by_then": sum(r <= done[0] for r in ready)})
        model.set_attn_implementation(GROUPED_ATTENTION)
        ValueReader.MAX_OWN_FDS = default_fds
        return t

    variants = {
        "prefill only (KV restored first)": lambda: turn(True, GROUPED_ATTENTION, False),
        "overlapped restore + prefill": lambda: turn(True, GROUPED_ATTENTION, True, trace=True),
        "overlapped, fresh buffers (no pool)": lambda: turn(False, GROUPED_ATTENTION, True),
        "overlapped, sdpa attention": lambda: turn(True, "sdpa", True),
        "overlapped, 4 I/O threads": lambda: turn(True, GROUPED_ATTENTION, True, io_threads=4),
        "overlapped, I/O threads not spread": lambda: turn(True, GROUPED_ATTENTION, True, io_affinity="inherit"),
        "overlapped, one shared descriptor": lambda: turn(True, GROUPED_ATTENTION, True, own_fds=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        with setup_frozen():
            for r in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(fn())
                print(f"  round {r + 1}/{args.rounds}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {name: {"median_s": statistics.median(x), "min_s": min(x), "max_s": max(x), "n": len(x)}
           for name, x in times.items()}
    for name, st in out.items():
        print(f"  {name:<38} {st['median_s'] * 1000:6.0f} ms ({st['min_s'] * 1000:.0f}-{st['max_s'] * 1000:.0f})")
    trace = {k: statistics.median(t[k] for t in timeline) for k in timeline[0]}
    print(f"  overlapped: layer 0 ready at {trace['layer0_ready_ms']:.0f} ms, restore done at "
          f"{trace['restore_done_ms']:.0f} ms, {trace['layers_prefilled_by_then']:.0f} of {spec.num_layers} "
          "layers prefilled by then (medians)")
    write_json(args.out, {"machine": machine(), "tokens": n, "message_tokens": MESSAGE,
                          "kv_bytes": n * spec.bytes_per_token, "rounds": args.rounds, "ttft": out,
                          "overlapped_timeline": trace})


if __name__ == "__main__":
    main()
