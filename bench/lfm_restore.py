"""An LFM2-shaped model (short convolutions beside attention): restore from cold SSD vs recompute.

LFM2's convolution layers keep a state, not keys and values; tierkv stores every token's
convolution input for them (``ConvHistoryLayer``), as much per token as ``hidden_size`` values
per conv layer. This measures what that costs and buys at a realistic size: a model of the
geometry below (about LFM2-350M's size) (random weights: the time of a forward pass does not depend on their values;
no LFM2 checkpoint is on this machine) prefills ``--tokens`` tokens of standard-library source
(SmolLM2's tokenizer), the session is saved, pushed to SSD and its pages dropped, then a
16-token message arrives: first token by recompute (prefill everything) against restore from
cold SSD (``restore_cache`` layer by layer, then prefill the message). Each restore's logits are
checked against continuing from the original in-memory cache: they must be equal, bit for bit.
Rounds alternate the two, ``--rounds`` each.

    python bench/lfm_restore.py [--tokens 2048] [--rounds 3]   # -> bench/results/lfm_restore.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import collected, int_at_least, machine, stats_of, write_json  # noqa: E402

import tierkv  # noqa: E402
from tierkv.integrations.hf import (HEADROOM, CachePool, cache_to_kv, load_smollm2, prefill,  # noqa: E402
                                    restore_cache, spec_for_model)
from tierkv.pagecache import make_cold  # noqa: E402

#: A shape of LFM2-350M's size, as this script sets it (no published config is on this machine):
#: 16 layers, 6 of them attention (16 heads, 8 KV heads of 64), the rest convolutions of kernel 3
#: over 1,024 channels. ``--small``: a toy for tests.
GEOMETRY = dict(hidden_size=1024, intermediate_size=6656, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, conv_L_cache=3,
                layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)])
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             conv_L_cache=3, layer_types=["conv", "full_attention", "conv", "full_attention"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int_at_least(32), default=2048)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    ap.add_argument("--small", action="store_true", help="a toy geometry (for tests)")
    ap.add_argument("--out", default="bench/results/lfm_restore.json")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, Lfm2Config

    _, tok, _ = load_smollm2()
    geometry = SMALL if args.small else GEOMETRY
    torch.manual_seed(0)
    cfg = Lfm2Config(vocab_size=len(tok), max_position_embeddings=max(4096, 2 * args.tokens),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                     **geometry)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count() or 1)
    spec = spec_for_model(model, model_id="bench/lfm2-random")
    conv_bytes = sum(t.bytes_per_token for layer in spec.layers for t in layer.tensors if t.name == "conv_input")
    text = "".join(open(os.path.join(os.path.dirname(os.__file__), n), encoding="utf-8").read()
                   for n in ("argparse.py", "functools.py", "dataclasses.py"))
    ids = tok.encode(text, add_special_tokens=False)
    ctx, message = ids[:args.tokens], tok.encode("\n# Question: what does this file do?\n",
                                                 add_special_tokens=False)[:16]
    _, cache = prefill(model, ctx)
    kv = [tuple(t.clone() for t in p) for p in cache_to_kv(cache)]
    want, _ = prefill(model, message, copy.deepcopy(cache))  # continuing the original cache
    del cache
    pool = CachePool()
    pool.reserve(spec, args.tokens + HEADROOM)
    work = tempfile.mkdtemp(prefix="tierkv-lfm-")
    times: dict[str, list[float]] = {"recompute": [], "cold_ssd": []}
    exact = True
    try:
        path = os.path.join(work, "store")
        big = int(2 * args.tokens * spec.bytes_per_token) + (64 << 20)
        with tierkv.TierKV(path, spec, ssd_bytes=4 * big, device_bytes=big, host_bytes=big) as s:
            s.save(ctx, kv, session="s").wait()
            s.flush()
        for _ in range(args.rounds):
            collected()
            t0 = time.perf_counter()
            prefill(model, ctx + message)
            times["recompute"].append(time.perf_counter() - t0)
            make_cold(os.path.join(path, "data.mdb"))
            with tierkv.TierKV(path, spec, ssd_bytes=4 * big, device_bytes=big, host_bytes=big) as s:
                collected()
                t0 = time.perf_counter()
                c, h = restore_cache(s, ctx, model.config, session="s", pool=pool)
                got, _ = prefill(model, message, c)
                times["cold_ssd"].append(time.perf_counter() - t0)
                assert h.num_tokens == args.tokens and set(h.result().sources) == {"ssd"}
            exact = exact and torch.equal(got, want)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = {k: stats_of(v) for k, v in times.items()}
    results = {"machine": machine(), "geometry": {k: v for k, v in geometry.items() if k != "layer_types"},
               "layer_types": geometry["layer_types"], "context_tokens": args.tokens, "new_tokens": len(message),
               "bytes_per_token": spec.bytes_per_token, "conv_input_bytes_per_token": conv_bytes,
               "ttft_s": stats, "speedup": stats["recompute"]["median"] / stats["cold_ssd"]["median"],
               "logits_identical": exact}
    write_json(args.out, results)
    print(f"{args.tokens} tokens, {spec.bytes_per_token} B/token stored ({conv_bytes} of them conv inputs): "
          f"recompute {stats['recompute']['median'] * 1000:.0f} ms, restore from cold SSD "
          f"{stats['cold_ssd']['median'] * 1000:.0f} ms ({results['speedup']:.1f}x); logits identical {exact}")
    if args.json:
        print(json.dumps(results))
    if not exact:
        raise SystemExit("a restored cache gave other logits than the original cache")


if __name__ == "__main__":
    main()
