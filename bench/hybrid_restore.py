"""Hybrid models (attention beside layers that keep a state): restore from cold SSD vs recompute.

``--arch lfm2``: LFM2's convolution layers keep a state, not keys and values; tierkv stores every
token's convolution input for them (``ConvHistoryLayer``), ``hidden_size`` values per token per
conv layer, and restores at any token. ``--arch qwen3_5``: Qwen3.5's (and Qwen3-Next's) gated
delta nets keep a conv state and a float32 recurrent state; tierkv stores both at restore points
(``StateSnapshotLayer``), every ``restore_step`` tokens, and restores at the last one cached.
``--arch granite4``: Granite 4.0-H's Mamba-2 layers keep the same two states, stored the same way.
``--arch mamba2``: Mamba-2 layers alone, no attention: a restore reads the states of one restore
point, however long the context (``needed_only``), or every point's (every row).
``--arch gemma3``: most of Gemma 3's layers attend to a sliding window; tierkv stores every
token's keys and values for them too (``SlidingHistoryLayer``). Each restore runs twice: reading
every row, and reading only what each layer needs (``needed_only``, as ``SessionRunner`` does:
a window, a conv layer's last inputs, a restore point's state), with the bytes each read.

This measures what that costs and buys at a realistic size: a model of the geometry below
(random weights: the time of a forward pass does not depend on their values; no checkpoint of
either family is on this machine) prefills ``--tokens`` tokens of standard-library source
(SmolLM2's tokenizer), the session is saved, pushed to SSD and its pages dropped, then a
16-token message arrives: first token by recompute (prefill everything) against restore from
cold SSD (``restore_cache`` layer by layer, then prefill the rest: the message, and for a gated
delta net the tokens after the last restore point). Each restore's logits are checked against
continuing, through the same passes, from the original in-memory cache at the point restored:
they must be equal, bit for bit. Rounds alternate the two, ``--rounds`` each.

    python bench/hybrid_restore.py [--arch lfm2] [--tokens 2048] [--rounds 3]   # -> bench/results/lfm_restore.json
    python bench/hybrid_restore.py --arch qwen3_5 [--tokens 2048]              # -> bench/results/qwen3_5_restore.json
    python bench/hybrid_restore.py --arch granite4 [--tokens 2048]             # -> bench/results/granite4_restore.json
    python bench/hybrid_restore.py --arch mamba2 [--tokens 2048]               # -> bench/results/mamba2_restore.json
    python bench/hybrid_restore.py --arch gemma3 --tokens 8192                 # -> bench/results/gemma3_restore.json

(Named ``bench/lfm_restore.py`` in session 64, before ``--arch``.)
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
from common import collected, int_at_least, machine, setup_frozen, stats_of, write_json  # noqa: E402

import tierkv  # noqa: E402
from tierkv.integrations.hf import (HEADROOM, CachePool, cache_to_kv, load_smollm2, prefill,  # noqa: E402
                                    restore_cache, restore_step, spec_for_model)
from tierkv.pagecache import make_cold  # noqa: E402

#: A shape of LFM2-350M's size, as this script sets it (no published config is on this machine):
#: 16 layers, 6 of them attention (16 heads, 8 KV heads of 64), the rest convolutions of kernel 3
#: over 1,024 channels. ``--small``: a toy for tests.
GEOMETRY = dict(hidden_size=1024, intermediate_size=6656, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, conv_L_cache=3,
                layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)])
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             conv_L_cache=3, layer_types=["conv", "full_attention", "conv", "full_attention"])
#: A Qwen3.5-architecture shape of about 0.6B parameters, as this script sets it (not a published
#: config): 24 layers, every fourth attention (8 heads, 2 KV heads of 256), the rest gated delta
#: nets (16 key and 16 value heads of 128, kernel 4) over a hidden size of 1,024.
QWEN_GEOMETRY = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                     linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                     layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)])
#: A Gemma 3 architecture shape of about 270M parameters, as this script sets it (not a published
#: config): 18 layers, five in six attending to a window of the last 512 tokens (4 heads, 1 KV
#: head of 256), over a hidden size of 640.
GEMMA_GEOMETRY = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, sliding_window=512,
                      layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)])
GEMMA_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=16, sliding_window=16,
                   layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
#: A Granite 4.0-H architecture shape of about 240M parameters, dense, as this script sets it (not
#: a published config): 20 layers, attention at 9 and 19 (12 heads, 4 KV heads of 64; Granite
#: 4.0-H's one in ten), the rest Mamba-2 (24 heads of 64, state 128, one group, kernel 4) over a
#: hidden size of 768.
GRANITE_GEOMETRY = dict(hidden_size=768, intermediate_size=2048, shared_intermediate_size=2048, num_local_experts=0,
                        num_experts_per_tok=0, num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=4,
                        mamba_n_heads=24, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4,
                        mamba_expand=2, layer_types=["attention" if i in (9, 19) else "mamba" for i in range(20)])
GRANITE_SMALL = dict(hidden_size=64, intermediate_size=64, shared_intermediate_size=64, num_local_experts=0,
                     num_experts_per_tok=0, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                     mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4,
                     mamba_expand=2, layer_types=["mamba", "mamba", "attention", "mamba"])
#: A Mamba-2 shape of about 130M parameters, as this script sets it (not a published config): 24
#: Mamba-2 layers (24 heads of 64, state 128, one group, kernel 4) over a hidden size of 768, no
#: attention.
MAMBA2_GEOMETRY = dict(hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128, n_groups=1,
                       conv_kernel=4, expand=2, chunk_size=256)
MAMBA2_SMALL = dict(hidden_size=64, num_hidden_layers=4, num_heads=8, head_dim=16, state_size=8, n_groups=1,
                    conv_kernel=4, expand=2, chunk_size=16)
QWEN_SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int_at_least(32), default=2048)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    ap.add_argument("--arch", choices=("lfm2", "qwen3_5", "granite4", "gemma3", "mamba2"), default="lfm2")
    ap.add_argument("--small", action="store_true", help="a toy geometry (for tests)")
    ap.add_argument("--block-tokens", type=int_at_least(1), default=None,
                    help="the store's block (default 256, or the smallest multiple of restore_step above it)")
    ap.add_argument("--out", default=None, help="default bench/results/{lfm,qwen3_5,granite4,gemma3,mamba2}_restore.json")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    args = ap.parse_args(argv)
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GraniteMoeHybridConfig, Lfm2Config, Mamba2Config,
                              Qwen3_5TextConfig)

    _, tok, _ = load_smollm2()
    geometry = {"lfm2": (GEOMETRY, SMALL), "qwen3_5": (QWEN_GEOMETRY, QWEN_SMALL), "granite4": (GRANITE_GEOMETRY, GRANITE_SMALL),
                "gemma3": (GEMMA_GEOMETRY, GEMMA_SMALL), "mamba2": (MAMBA2_GEOMETRY, MAMBA2_SMALL)}[args.arch][bool(args.small)]
    out_path = args.out or f"bench/results/{'lfm' if args.arch == 'lfm2' else args.arch}_restore.json"
    torch.manual_seed(0)
    cfg = {"lfm2": Lfm2Config, "qwen3_5": Qwen3_5TextConfig, "granite4": GraniteMoeHybridConfig,
           "gemma3": Gemma3TextConfig, "mamba2": Mamba2Config}[args.arch](
        vocab_size=len(tok), max_position_embeddings=max(4096, 2 * args.tokens), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **geometry)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count() or 1)
    spec = spec_for_model(model, model_id=f"bench/{args.arch}-random")
    # what the non-attention layers store per token: conv inputs, or states spread over restore points
    state_bytes = sum(t.bytes_per_token for layer in spec.layers for t in layer.tensors
                      if t.name in ("conv_input", "conv_state", "recurrent_state"))
    step = restore_step(model.config)
    point = args.tokens - args.tokens % step  # the restore point a restore of the context reaches
    if not point:
        raise SystemExit(f"--tokens must be at least restore_step ({step}) for --arch {args.arch}")
    text = "".join(open(os.path.join(os.path.dirname(os.__file__), n), encoding="utf-8").read()
                   for n in ("argparse.py", "functools.py", "dataclasses.py"))
    ids = tok.encode(text, add_special_tokens=False)
    ctx, message = ids[:args.tokens], tok.encode("\n# Question: what does this file do?\n",
                                                 add_special_tokens=False)[:16]
    _, cache = prefill(model, ctx[:point])
    # continuing the original cache from the point a restore reaches, through the same passes
    want, _ = prefill(model, ctx[point:] + message, copy.deepcopy(cache))
    if point < len(ctx):
        _, cache = prefill(model, ctx[point:], cache)
    kv = [tuple(t.clone() for t in p) for p in cache_to_kv(cache)]
    del cache
    pool = CachePool()
    pool.reserve(spec, args.tokens + HEADROOM)
    work = tempfile.mkdtemp(prefix=f"tierkv-{args.arch}-")
    block = args.block_tokens or step * -(-256 // step)  # tierkv's default, or a multiple of restore_step
    if block % step:
        raise SystemExit(f"--block-tokens must be a multiple of restore_step ({step})")
    # cold_ssd: every row of every layer read; cold_ssd_needed: each layer only the blocks it
    # needs (restore_cache's needed_only, as SessionRunner restores)
    times: dict[str, list[float]] = {"recompute": [], "cold_ssd": [], "cold_ssd_needed": []}
    read: dict[str, list[int]] = {"cold_ssd": [], "cold_ssd_needed": []}
    exact = True
    try:
        path = os.path.join(work, "store")
        big = int(2 * args.tokens * spec.bytes_per_token) + (64 << 20)
        opts = dict(ssd_bytes=4 * big, device_bytes=big, host_bytes=big, block_tokens=block)
        with tierkv.TierKV(path, spec, **opts) as s:
            s.save(ctx, kv, session="s").wait()
            s.flush()
        with setup_frozen():
            for _ in range(args.rounds):
                collected()
                t0 = time.perf_counter()
                prefill(model, ctx + message)
                times["recompute"].append(time.perf_counter() - t0)
                for way in ("cold_ssd", "cold_ssd_needed"):
                    make_cold(os.path.join(path, "data.mdb"))
                    with tierkv.TierKV(path, spec, **opts) as s:
                        collected()
                        t0 = time.perf_counter()
                        c, h = restore_cache(s, ctx, model.config, session="s", pool=pool,
                                             needed_only=way == "cold_ssd_needed")
                        got, _ = prefill(model, ctx[h.num_tokens:] + message, c)
                        times[way].append(time.perf_counter() - t0)
                        assert h.num_tokens == point and set(h.result().sources) == {"ssd"}
                        read[way].append(s.stats()["ssd_read_bytes"])
                    exact = exact and torch.equal(got, want)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = {k: stats_of(v) for k, v in times.items()}
    results = {"machine": machine(), "arch": args.arch,
               "geometry": {k: v for k, v in geometry.items() if k != "layer_types"},
               "layer_types": model.config.layer_types, "context_tokens": args.tokens, "new_tokens": len(message),
               "restore_step": step, "restored_tokens": point, "block_tokens": block,
               "bytes_per_token": spec.bytes_per_token, "state_bytes_per_token": state_bytes,
               "ttft_s": stats, "speedup": stats["recompute"]["median"] / stats["cold_ssd"]["median"],
               "speedup_needed": stats["recompute"]["median"] / stats["cold_ssd_needed"]["median"],
               "ssd_read_bytes": {k: max(v) for k, v in read.items()}, "logits_identical": exact}
    write_json(out_path, results)
    print(f"{args.arch}: {args.tokens} tokens (restored {point}), {spec.bytes_per_token} B/token stored "
          f"({state_bytes} of them conv inputs or states): "
          f"recompute {stats['recompute']['median'] * 1000:.0f} ms, restore from cold SSD "
          f"{stats['cold_ssd']['median'] * 1000:.0f} ms ({results['speedup']:.1f}x; {read['cold_ssd'][0]} B read), "
          f"reading only what each layer needs {stats['cold_ssd_needed']['median'] * 1000:.0f} ms "
          f"({results['speedup_needed']:.1f}x; {read['cold_ssd_needed'][0]} B read); logits identical {exact}")
    if args.json:
        print(json.dumps(results))
    if not exact:
        raise SystemExit("a restored cache gave other logits than the original cache")


if __name__ == "__main__":
    main()
