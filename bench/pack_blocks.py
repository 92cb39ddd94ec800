"""What `save` pays to pack a session's KV into block payloads: block by block against batched.

`save` copies the new blocks of a session into the first memory tier before it returns: per
block, one copy per layer and tensor (a 4,096-token SmolLM2 session in 256-token blocks is 960
copies). This times, side by side in a shuffled order per round, on the same KV into the same
(already written) payloads:

- ``one by one``: ``blocks.pack_block`` per block: a view per tensor (``tensor_view``) and a
  ``copy_`` each, from Python;
- ``batched``: ``blocks.pack_blocks``, what `save` calls since session 26: the views from one
  split (or reshape) per payload and one ``torch._foreach_copy_`` for the whole save;

and ``save()`` of a whole session into an empty host tier (the copy it reports in
``stats()["moved"]["caller->host"]``), new payload memory included. Two more rows copy on the
calling thread alone, in pieces under torch's grain, as ``save`` does while the SSD writer
works (session 33):

- ``serial, split per copy``: the batched views, each cut with ``Tensor.split``
  (``blocks.serial_pieces``; session 33's way for every block);
- ``serial``: ``pack_blocks(serial=True)``, whose full blocks of a uniform layout are cut a few
  tensor ops per block (session 34).

Medians of ``--rounds``.

    python bench/pack_blocks.py [--dtype fp32] [--tokens 4096] [--rounds 15] [--out ...]
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
from common import add_side_by_side_arguments, int_at_least, machine, side_by_side, stats_of, write_json  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402
from tierkv.blocks import _block_copies, pack_block, pack_blocks, serial_pieces  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=15, out="bench/results/pack_blocks.json")
    ap.add_argument("--tokens", type=int_at_least(1), default=2 * TOKENS,
                    help="a multiple of the bench's 2,048-token session")
    ap.add_argument("--block-tokens", type=int_at_least(1), default=256)
    args = ap.parse_args(argv)
    from tierkv.cli import default_cache_dir

    spec, base = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    reps = max(1, args.tokens // TOKENS)
    kv = [tuple(torch.cat([x] * reps, 1) for x in layer) for layer in base]
    n, B = reps * TOKENS, args.block_tokens
    blocks = -(-n // B)
    payloads = {i: torch.ones(min(B, n - i * B) * spec.bytes_per_token, dtype=torch.uint8) for i in range(blocks)}
    work = tempfile.mkdtemp(prefix="tierkv-pack-")
    saves = [0]

    def one_by_one() -> None:
        for i, p in payloads.items():
            pack_block(spec, kv, i * B, min(B, n - i * B), p)

    def batched() -> None:
        pack_blocks(spec, kv, B, payloads)

    def serial_split_per_copy() -> None:
        dsts, srcs = serial_pieces(spec, *_block_copies(spec, kv, B, payloads))
        torch._foreach_copy_(dsts, srcs, non_blocking=True)

    def serial() -> None:
        pack_blocks(spec, kv, B, payloads, serial=True)

    def save() -> float:
        store = os.path.join(work, f"s{saves[0]}")
        saves[0] += 1
        with tierkv.TierKV(store, spec, device="cpu", device_bytes=0, host_bytes=4 * n * spec.bytes_per_token,
                           ssd_bytes=8 * n * spec.bytes_per_token + (1 << 30), block_tokens=B) as s:
            s.save(range(n), kv, session="s")
            copied = s.stats()["moved"]["caller->host"]["seconds"]
        shutil.rmtree(store, ignore_errors=True)
        return copied

    methods: dict[str, Callable[[], float | None]] = {
        "one by one": one_by_one, "batched": batched, "save() copy": save,
        "serial, split per copy": serial_split_per_copy, "serial": serial}
    try:
        one_by_one()
        check = {i: p.clone() for i, p in payloads.items()}
        for name, way in (("batched", batched), ("serial, split per copy", serial_split_per_copy), ("serial", serial)):
            for p in payloads.values():
                p.fill_(1)
            way()
            if any(not torch.equal(check[i], payloads[i]) for i in payloads):
                raise SystemExit(f"{name} packing wrote other bytes than packing block by block")
        rows, orders = side_by_side(methods, args.rounds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    nbytes = n * spec.bytes_per_token
    results: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "tokens": n, "block_tokens": B, "blocks": blocks, "bytes": nbytes,
        "copies": blocks * sum(len(layer.tensors) for layer in spec.layers), "rounds": args.rounds,
        "seed": args.seed, "round_orders": orders, "torch_threads": torch.get_num_threads(),
        "seconds": {k: stats_of(v) for k, v in rows.items()},
        "gbps": {k: nbytes / statistics.median(v) / 1e9 for k, v in rows.items()},
        "batched_vs_one_by_one": statistics.median(rows["one by one"]) / statistics.median(rows["batched"]),
        "batched_vs_one_by_one_paired": statistics.median(a / b for a, b in zip(rows["one by one"], rows["batched"])),
        "serial_vs_split_per_copy_paired": statistics.median(
            a / b for a, b in zip(rows["serial, split per copy"], rows["serial"])),
    }
    print(f"{n} tokens ({nbytes / 1e6:.0f} MB, {results['copies']} copies), medians of {args.rounds}:")
    for k, v in rows.items():
        print(f"  {k:<14} {statistics.median(v) * 1e3:8.2f} ms  ({min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})"
              f"  {results['gbps'][k]:6.2f} GB/s")
    print(f"  batched is {results['batched_vs_one_by_one']:.2f}x as fast (per round "
          f"{results['batched_vs_one_by_one_paired']:.2f}x); serial {results['serial_vs_split_per_copy_paired']:.2f}x "
          f"as fast as serial, split per copy (per round)")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
