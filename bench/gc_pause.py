"""What a cyclic garbage collection costs a restore, with and without ``SessionRunner(hold_gc=...)``.

A full collection walks every tracked object of the process; with a transformers model loaded
that holds the GIL for a while, and the restore's reader threads wait. Whether one lands inside
a turn's restore depends on how many objects the process allocated before (``tierkv demo``
restored at half its rate after an unrelated change moved one there, session 67). This script
measures both parts on SmolLM2 (fp32, 256-token blocks, zstd-planes): the pause of a full
``gc.collect()`` in the process holding the model (and again with the objects alive then frozen,
``gc.freeze()``, as a server does once started: ``tierkv.demo.freeze_startup_heap``), and runner turns restoring a ``--tokens``
session from cold SSD, alternating ``hold_gc`` True and False, each with the number of full
collections that ran inside its restore-to-first-token window (``gc.callbacks``). A round
without a collection in its window says nothing about the hold; its TTFT is reported as is.

    python bench/gc_pause.py [--tokens 4096] [--rounds 6]      # -> bench/results/gc_pause.json
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, setup_frozen, stats_of, write_json  # noqa: E402

from tierkv import TierKV  # noqa: E402
from tierkv.demo import build_context  # noqa: E402
from tierkv.integrations.hf import SessionRunner, load_smollm2  # noqa: E402
from tierkv.pagecache import make_cold  # noqa: E402


def full_collect_pauses(n: int = 5) -> list[float]:
    """Seconds of ``n`` full collections, one after another."""
    pauses = []
    for _ in range(n):
        t0 = time.perf_counter()
        gc.collect()
        pauses.append(time.perf_counter() - t0)
    return pauses


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int_at_least(256), default=4096)
    ap.add_argument("--rounds", type=int_at_least(1), default=6, help="turns for each of hold_gc True and False")
    ap.add_argument("--out", default="bench/results/gc_pause.json")
    args = ap.parse_args(argv)
    model, tok, spec = load_smollm2()
    torch.set_num_threads(os.cpu_count() or 1)
    turn1, turn2 = build_context(tok, args.tokens)
    pauses = full_collect_pauses()
    # as a server does once started (tierkv.demo.freeze_startup_heap): later full collections
    # walk only what was made since
    with setup_frozen():
        frozen_objects = gc.get_freeze_count()
        frozen_pauses = full_collect_pauses()
    full: list[float] = []  # durations of generation-2 collections since the last reset
    started: list[float] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                full.append(time.perf_counter() - started.pop())

    work = tempfile.mkdtemp(prefix="tierkv-gc-")
    rounds: list[dict[str, Any]] = []
    try:
        path = os.path.join(work, "store")
        with TierKV(path, spec) as kv:
            SessionRunner(kv, model).turn("s", turn1, max_new_tokens=1)
            kv.flush()
        gc.callbacks.append(watch)
        for r in range(2 * args.rounds):
            hold = r % 2 == 0
            make_cold(os.path.join(path, "data.mdb"))
            with TierKV(path, spec) as kv:
                runner = SessionRunner(kv, model, hold_gc=hold)
                full.clear()
                t = runner.turn(f"r{r}", turn1 + turn2, max_new_tokens=1)  # its one token ends the window
                rounds.append({"hold_gc": hold, "ttft_s": t.ttft_s, "restored_tokens": t.restored_tokens,
                               "full_collections": len(full), "full_collection_s": sum(full)})
    finally:
        if watch in gc.callbacks:
            gc.callbacks.remove(watch)
        shutil.rmtree(work, ignore_errors=True)
    by = {h: [x for x in rounds if x["hold_gc"] is h] for h in (True, False)}
    result = {"machine": machine(), "tokens": len(turn1) + len(turn2), "rounds": rounds,
              "full_collect_pause_s": stats_of(pauses),
              "full_collect_pause_frozen_s": stats_of(frozen_pauses), "frozen_objects": frozen_objects,
              "ttft_s": {f"hold_gc={h}": stats_of([x["ttft_s"] for x in xs]) for h, xs in by.items()},
              "rounds_with_a_full_collection": {f"hold_gc={h}": sum(x["full_collections"] > 0 for x in xs)
                                                for h, xs in by.items()}}
    write_json(args.out, result)
    print(f"a full gc.collect() with the model loaded: {result['full_collect_pause_s']['median'] * 1000:.1f} ms "
          "(median of 5); after gc.freeze() of its "
          f"{frozen_objects} objects: {result['full_collect_pause_frozen_s']['median'] * 1000:.2f} ms")
    for x in rounds:
        print(f"  hold_gc={x['hold_gc']!s:<5}  TTFT {x['ttft_s'] * 1000:7.1f} ms  full collections in the window: "
              f"{x['full_collections']} ({x['full_collection_s'] * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
