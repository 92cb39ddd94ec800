"""What keying a PEFT model's KV costs a SessionRunner turn: ``adapter_tenant`` against the turn.

A runner reads the adapters its model runs at every turn and hashes their weights (read, not
remembered, so an adapter trained or reloaded in place is seen). For SmolLM2 (fp32) without an
adapter and with LoRA adapters of several sizes, this times ``adapter_tenant`` alone and a whole
warm turn in the same rounds: a new session whose ``--context`` tokens are restored from memory
(a prefix another session saved), ``--new`` more tokens prefilled and ``--decode`` decoded. It
reports medians and the tenant's share of the turn (the turn includes it). It also times the
tenant with remembered digests (``SessionRunner(rehash_adapters=False)``: a tensor is hashed
again only when torch's version counter says it changed).

    python bench/adapter_overhead.py     # -> bench/results/adapter_overhead.json
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import collected, int_at_least, machine, setup_frozen, stats_of, write_json  # noqa: E402

from tierkv import TierKV  # noqa: E402
from tierkv.integrations.hf import SessionRunner, adapter_tenant, load_smollm2  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"none": None, "r8 k,v": (8, ["k_proj", "v_proj"]), "r16 all linear": (16, ALL_LINEAR),
            "r64 all linear": (64, ALL_LINEAR)}


def main(argv: list[str] | None = None) -> None:
    import peft

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    ap.add_argument("--context", type=int_at_least(1), default=1024)
    ap.add_argument("--new", type=int_at_least(1), default=16)
    ap.add_argument("--decode", type=int_at_least(1), default=8)
    ap.add_argument("--rounds", type=int_at_least(1), default=7)
    ap.add_argument("--out", default="bench/results/adapter_overhead.json")
    args = ap.parse_args(argv)
    _, tok, spec = load_smollm2()
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "functools.py"), encoding="utf-8") as f:
        text = tok.encode(f.read(), add_special_tokens=False)
    context, new = text[:args.context], text[args.context:args.context + args.new]
    rows = []
    for name in args.adapters:
        model, _, _ = load_smollm2()  # a copy of its own: PEFT injects its layers in place
        if ADAPTERS[name] is not None:
            rank, targets = ADAPTERS[name]
            torch.manual_seed(0)
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules=targets,
                                                                init_lora_weights=False))
        adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
        tenant_s, remembered_s, turn_s = [], [], []
        memo: dict = {}
        adapter_tenant(model, memo)
        with tempfile.TemporaryDirectory() as d, TierKV(os.path.join(d, "store"), spec) as kv:
            runner = SessionRunner(kv, model)
            runner.turn("warm", context + [new[0]], max_new_tokens=1)  # the prefix every round restores
            with setup_frozen():
                for i in range(args.rounds):
                    collected()
                    t = time.perf_counter()
                    adapter_tenant(model)
                    tenant_s.append(time.perf_counter() - t)
                    collected()
                    t = time.perf_counter()
                    adapter_tenant(model, memo)
                    remembered_s.append(time.perf_counter() - t)
                    collected()
                    t = time.perf_counter()
                    turn = runner.turn(f"round{i}", context + new, max_new_tokens=args.decode)
                    turn_s.append(time.perf_counter() - t)
        share = [a / b for a, b in zip(tenant_s, turn_s)]
        rows.append({"adapter": name, "adapter_bytes": adapter_bytes, "restored_tokens": turn.restored_tokens,
                     "tenant_ms": stats_of([x * 1e3 for x in tenant_s]),
                     "tenant_remembered_ms": stats_of([x * 1e3 for x in remembered_s]),
                     "turn_ms": stats_of([x * 1e3 for x in turn_s]),
                     "tenant_share_of_turn": stats_of(share)})
        r = rows[-1]
        print(f"  {name:>15}: adapter {adapter_bytes / 2**20:7.2f} MiB, tenant {r['tenant_ms']['median']:8.2f} ms, "
              f"remembered {r['tenant_remembered_ms']['median']:6.2f} ms, "
              f"turn {r['turn_ms']['median']:8.1f} ms ({r['restored_tokens']} tokens restored), "
              f"share {100 * r['tenant_share_of_turn']['median']:.2f} %", flush=True)
    write_json(args.out, {"machine": machine(), "context_tokens": args.context, "new_tokens": args.new,
                          "decode_tokens": args.decode, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
