"""``tierkv demo``: an agent session on SmolLM2, parked on SSD and resumed in a fresh process.

Turn 1 (this process): the agent "reads" standard-library source files (``--context-tokens``
tokens) and answers a question; the session is saved, pushed out of the device and host tiers to
SSD, and the store file's pages are dropped from the page cache. The reference for turn 2 is
computed here too, by continuing from the original in-memory cache.

Turn 2 (a fresh process): restore from cold SSD, prefill only the new user message, generate;
then, for comparison, the same turn recomputed from scratch without tierkv. The child reports
TTFTs, bytes, the reload rate, and whether its tokens and logits equal the reference.

Primitives: run_demo (parent), child_main (turn 2), build_context (the prompt), DemoReport.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

__all__ = ["run_demo", "child_main", "build_context", "STDLIB_FILES"]

#: What the agent reads, in order (repeated if more context is asked for).
STDLIB_FILES = ["collections/__init__.py", "functools.py", "dataclasses.py", "contextlib.py",
                "json/decoder.py", "json/encoder.py", "pathlib.py", "shutil.py", "argparse.py"]
QUESTION_1 = "Question: in one sentence, what does the first file implement?"
QUESTION_2 = "Now name one class defined in these files and say what it is for."


class Progress:
    """A one-line progress display on stderr: a bar when the total is known, else a timer."""

    def __init__(self, label: str, total: int | None = None, quiet: bool = False) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self.done = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None
        if total is None and not quiet:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _line(self) -> str:
        el = time.perf_counter() - self.t0
        if self.total:
            w = 30
            f = int(w * self.done / self.total)
            return f"\r  {self.label:<34} [{'#' * f}{'.' * (w - f)}] {self.done}/{self.total}  {el:5.1f}s"
        return f"\r  {self.label:<34} {el:6.1f}s"

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def update(self, n: int) -> None:
        self.done += n
        if not self.quiet:
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def close(self) -> float:
        self._stop.set()
        if self._thread:
            self._thread.join()
        el = time.perf_counter() - self.t0
        if not self.quiet:
            sys.stderr.write(self._line() + "  done\n")
            sys.stderr.flush()
        return el


def freeze_startup_heap() -> int:
    """Collect once, then leave every object alive now (torch, transformers, the model) out of
    later full collections (``gc.freeze()``), as a server does once started: vLLM's engine core
    and workers, SGLang and Ray Serve freeze theirs after start-up. A full collection walks every
    object not frozen, holding the GIL, whenever the interpreter's thresholds say so, inside
    whatever call is running: with SmolLM2 loaded, 230 ms (``bench/gc_pause.py``, session 74).
    One landed in turn 1's ``save`` in every ``make demo`` of session 74 before this: blocked
    225-318 ms, against 62-77 ms frozen (docs/integration.md). Frozen, a full collection walks
    only what the turns made since. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def build_context(tok: Any, context_tokens: int) -> tuple[list[int], list[int]]:
    """Turn 1's prompt (chat-formatted, ``context_tokens`` tokens of source files plus a question)
    and turn 2's new user message, as token ids."""
    stdlib = sysconfig.get_paths()["stdlib"]
    file_ids: list[int] = []
    i = 0
    while len(file_ids) < context_tokens:
        name = STDLIB_FILES[i % len(STDLIB_FILES)]
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            file_ids += tok.encode(f"### File: Lib/{name}\n{f.read()}\n", add_special_tokens=False)
        i += 1
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    head = enc("<|im_start|>system\nYou are a helpful coding agent. You have read these files.<|im_end|>\n"
               "<|im_start|>user\n")
    tail = enc(f"\n{QUESTION_1}<|im_end|>\n<|im_start|>assistant\n")
    turn1 = head + file_ids[:context_tokens] + tail
    turn2 = enc(f"<|im_end|>\n<|im_start|>user\n{QUESTION_2}<|im_end|>\n<|im_start|>assistant\n")
    return turn1, turn2


def _chunked_prefill(model: Any, ids: list[int], progress: Progress, chunk: int = 512) -> tuple[torch.Tensor, Any]:
    from .integrations.hf import prefill

    cache, logits = None, None
    for s in range(0, len(ids), chunk):
        logits, cache = prefill(model, ids[s:s + chunk], cache)
        progress.update(len(ids[s:s + chunk]))
    return logits, cache


def run_demo(args: argparse.Namespace) -> int:
    """Parent process: turn 1, park the session on SSD, run turn 2 in a child, print the report."""
    from .engine import TierKV
    from .cli import default_cache_dir
    from .integrations.hf import cache_to_kv, greedy_decode, kv_to_cache, load_smollm2, prefill
    from .pagecache import drop_file_cache

    quiet = args.json
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    cache_dir = args.cache_dir or default_cache_dir()
    store_path = args.store or os.path.join(cache_dir, "demo-store")
    say(f"tierkv demo: SmolLM2-135M-Instruct, {args.context_tokens} context tokens, store {store_path}")
    p = Progress("loading model (first run converts GGUF)", quiet=quiet)
    model, tok, spec = load_smollm2(cache_dir)
    p.close()
    torch.set_num_threads(os.cpu_count() or 1)
    frozen = freeze_startup_heap()
    turn1, turn2 = build_context(tok, args.context_tokens)
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    p = Progress(f"turn 1: prefill {len(turn1)} tokens", total=len(turn1), quiet=quiet)
    logits, cache = _chunked_prefill(model, turn1, p)
    p.close()
    answer, _, cache = greedy_decode(model, logits, cache, args.answer_tokens, eos)
    seen = turn1 + answer[:-1]
    say(f"  turn 1 answer: {tok.decode(answer, skip_special_tokens=True).strip()[:120]!r}")

    session = "demo-agent"
    import shutil

    shutil.rmtree(store_path, ignore_errors=True)  # a fresh store: the demo's own, nothing else
    with TierKV(store_path, spec, device_bytes=args.device_bytes, host_bytes=args.host_bytes,
                ssd_bytes=args.ssd_bytes, persist="write_through", ssd_codec=args.codec,
                block_tokens=args.block_tokens) as kv:
        original = cache_to_kv(cache)
        t0 = time.perf_counter()
        kv.save(seen, original, session=session)
        save_block_s = time.perf_counter() - t0
        p = Progress("park: device -> host -> SSD", quiet=quiet)
        kv.offload(session)
        p.close()
        info = kv.session_info(session)
        st = kv.stats()
    assert info["blocks_by_tier"] == {"ssd": info["blocks"]}, info

    # Reference for turn 2: continue from the original in-memory cache, here.
    turn2_ids = [answer[-1]] + turn2
    p = Progress("turn 2 reference (original cache)", quiet=quiet)
    ref_cache = kv_to_cache([(k.clone(), v.clone()) for k, v in original], model.config)
    logits, ref_cache = prefill(model, turn2_ids, ref_cache)
    ref_tokens, ref_logits, _ = greedy_decode(model, logits, ref_cache, args.answer_tokens, eos)
    p.close()
    del cache, ref_cache, original

    drop_file_cache(os.path.join(store_path, "data.mdb"))
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = os.path.join(tmp, "ref.npz")
        np.savez(ref_file, seen=np.array(seen, dtype=np.int64), turn2=np.array(turn2_ids, dtype=np.int64),
                 ref_tokens=np.array(ref_tokens, dtype=np.int64),
                 ref_logits=torch.stack(ref_logits).numpy())
        cmd = [sys.executable, "-m", "tierkv.demo", "--child", "--store", store_path, "--ref", ref_file,
               "--cache-dir", cache_dir, "--session", session, "--answer-tokens", str(args.answer_tokens),
               "--codec", args.codec, "--block-tokens", str(args.block_tokens)]
        p = Progress("turn 2 in a fresh process", quiet=quiet)
        out = subprocess.run(cmd, capture_output=True, text=True)
        p.close()
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return 1
    child = json.loads(out.stdout.strip().splitlines()[-1])
    report = {
        "model": spec.model_id,
        "context_tokens": args.context_tokens,
        "turn1_tokens": len(turn1),
        "session_tokens": len(seen),
        "turn2_new_tokens": len(turn2_ids),
        **child,
        "kv_bytes": len(seen) * spec.bytes_per_token,
        "ssd_bytes": st["resident_bytes"]["ssd"],
        "compression_ratio": (len(seen) * spec.bytes_per_token) / st["resident_bytes"]["ssd"],
        "save_blocked_s": save_block_s,
        "turn1_frozen_objects": frozen,
        "store": store_path,
        "turn2_text": tok.decode(child.pop("restore_tokens"), skip_special_tokens=True).strip(),
    }
    report["speedup"] = report["recompute_ttft_s"] / report["restore_ttft_s"]
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0 if report["tokens_identical"] else 1


def _print_table(r: dict[str, Any]) -> None:
    from .config import format_size

    rows = [
        ("context tokens (turn 1 / session)", f"{r['turn1_tokens']} / {r['session_tokens']}"),
        ("turn 2 new tokens", f"{r['turn2_new_tokens']}"),
        ("recompute TTFT (no tierkv)", f"{r['recompute_ttft_s'] * 1000:9.1f} ms"),
        ("restore TTFT (cold SSD)", f"{r['restore_ttft_s'] * 1000:9.1f} ms"),
        ("speedup", f"{r['speedup']:9.1f} x"),
        ("  restore (overlapped with prefill)", f"{r['restore_s'] * 1000:9.1f} ms  ({r['restored_tokens']} tokens restored, {r['prefilled_tokens']} prefilled)"),
        ("restored from", r["restored_from"]),
        ("page cache before restore", f"{r['page_cache_resident'] * 100:.1f} % of the store file"),
        ("KV bytes (raw)", format_size(r["kv_bytes"])),
        ("bytes on SSD", f"{format_size(r['ssd_bytes'])}  (compression {r['compression_ratio']:.2f}x)"),
        ("bytes read from disk", format_size(r["ssd_read_bytes"])),
        ("reload rate", f"{r['reload_gbps']:.2f} GB/s of KV ({r['reload_disk_gbps']:.2f} GB/s from disk)"),
        ("device / host / SSD after turn 2", " / ".join(format_size(r["resident_after"][t])
                                                        for t in ("device", "host", "ssd"))),
        ("save blocked the caller", f"{r['save_blocked_s'] * 1000:.1f} ms"),
        ("turn 2 tokens identical", str(r["tokens_identical"])),
        ("max |logit diff| vs original", f"{r['max_abs_logit_diff']:.3g}"),
        ("recompute tokens identical", f"{r['recompute_tokens_identical']} (bf16/fp32 recompute may differ in low bits)"),
    ]
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print(f"\n  turn 2 answer: {r['turn2_text'][:160]!r}")


def child_main(argv: list[str]) -> int:
    """Turn 2 in a fresh process: restore TTFT from cold SSD, then recompute TTFT."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--store", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--session", required=True)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--codec", default="zstd-planes")
    ap.add_argument("--block-tokens", type=int, default=256)
    a = ap.parse_args(argv)
    from .engine import TierKV
    from .integrations.hf import SessionRunner, greedy_decode, kv_to_cache, load_smollm2, prefill
    from .pagecache import resident_fraction

    model, tok, spec = load_smollm2(a.cache_dir)
    torch.set_num_threads(os.cpu_count() or 1)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ref = np.load(a.ref)
    seen, turn2 = ref["seen"].tolist(), ref["turn2"].tolist()
    # Warm up as a running server would be: one prefill of a short message over a cache as long
    # as the session's (zeros, not from the store), so neither path pays first-call costs
    # (kernel set-up, allocator growth). The store's file stays cold.
    zeros = [(torch.zeros(t.shape(len(seen)), dtype=t.torch_dtype), torch.zeros(t.shape(len(seen)), dtype=t.torch_dtype))
             for t in (layer.tensors[0] for layer in spec.layers)]
    prefill(model, turn2, kv_to_cache(zeros, model.config))
    del zeros
    frozen = freeze_startup_heap()
    resident = resident_fraction(os.path.join(a.store, "data.mdb"))

    with TierKV(a.store, spec, ssd_codec=a.codec, block_tokens=a.block_tokens) as kv:
        # The loop an agent server runs: restore (layer by layer, overlapped with the prefill of
        # the new message), decode, save the grown session. Its KV buffers are sized at start-up,
        # as a server sizes its KV pool.
        runner = SessionRunner(kv, model, eos)
        runner.reserve(len(seen) + len(turn2) + a.answer_tokens)
        turn = runner.turn(a.session, seen + turn2, a.answer_tokens)
        kv.flush()
        st = kv.stats()
    tokens, all_logits = turn.tokens, turn.logits

    t0 = time.perf_counter()
    logits, cache = prefill(model, seen + turn2)
    recompute_ttft = time.perf_counter() - t0
    re_tokens, _, _ = greedy_decode(model, logits, cache, a.answer_tokens, eos)

    ref_tokens = ref["ref_tokens"].tolist()
    ref_logits = torch.from_numpy(ref["ref_logits"])
    n = min(len(all_logits), len(ref_logits))
    diff = float((torch.stack(all_logits[:n]) - ref_logits[:n]).abs().max()) if n else float("inf")
    kv_bytes = turn.restored_tokens * spec.bytes_per_token
    reload = st["moved"].get("ssd->caller") or st["moved"].get("ssd->host") or {"seconds": float("nan")}
    print(json.dumps({
        "recompute_ttft_s": recompute_ttft,
        "restore_ttft_s": turn.ttft_s,
        "restore_s": reload["seconds"],
        "restored_tokens": turn.restored_tokens,
        "prefilled_tokens": turn.prefilled_tokens,
        "restored_from": "+".join(sorted(turn.sources)),
        "page_cache_resident": resident,
        "ssd_read_bytes": st["ssd_read_bytes"],
        "reload_gbps": kv_bytes / reload["seconds"] / 1e9,
        "reload_disk_gbps": st["ssd_read_bytes"] / reload["seconds"] / 1e9,
        "resident_after": st["resident_bytes"],
        "tokens_identical": tokens == ref_tokens and turn.restored_tokens == len(seen),
        "max_abs_logit_diff": diff,
        "recompute_tokens_identical": re_tokens == ref_tokens,
        "restore_tokens": tokens,
        "turn2_frozen_objects": frozen,
    }))
    return 0


if __name__ == "__main__" and "--child" in sys.argv:
    sys.exit(child_main(sys.argv[1:]))
