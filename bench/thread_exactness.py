"""Does torch's CPU forward pass give the same bits on 1 and on 2 intra-op threads?

Restored turns are compared bit for bit with turns continued from the original cache, so anything
that changes the computation between the two (here: the torch thread count) must be ruled out.
For SmolLM2 caches of several lengths (random KV: the arithmetic, not the values, matters) and
messages of several lengths, it runs the same prefill on 1 and on 2 threads and records the
largest absolute difference of the last position's logits.

    python bench/thread_exactness.py       # -> bench/results/thread_exactness.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, write_json  # noqa: E402

from tierkv.integrations.hf import kv_to_cache, load_smollm2, prefill  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int_at_least(1), nargs="+", default=[100, 1000, 4100])
    ap.add_argument("--messages", type=int_at_least(1), nargs="+", default=[1, 2, 7, 27, 64, 300])
    ap.add_argument("--out", default="bench/results/thread_exactness.json")
    args = ap.parse_args(argv)
    model, _, spec = load_smollm2()
    g = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    rows = []
    try:
        for n in args.contexts:
            kv = [tuple(torch.randn(t.shape(n), generator=g) for t in layer.tensors) for layer in spec.layers]
            for m in args.messages:
                msg = list(range(1000, 1000 + m))
                logits = {}
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    logits[threads] = prefill(model, msg, kv_to_cache(kv, model.config))[0]
                diff = float((logits[1] - logits[2]).abs().max())
                rows.append({"context_tokens": n, "message_tokens": m, "max_abs_logit_diff": diff})
                print(f"  context {n:>5}, message {m:>3}: max |logit diff| 1 vs 2 threads = {diff:.3g}", flush=True)
    finally:
        torch.set_num_threads(saved)
    write_json(args.out, {"machine": machine(), "results": rows,
                          "identical": all(r["max_abs_logit_diff"] == 0.0 for r in rows)})


if __name__ == "__main__":
    main()
