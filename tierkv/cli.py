"""The ``tierkv`` command line.

Subcommands register themselves in ``COMMANDS``; each takes parsed arguments and returns an
exit code. Errors from tierkv's hierarchy print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from .errors import ConfigError, TierKVError

__all__ = ["main", "COMMANDS", "default_cache_dir"]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/tierkv`` or ``~/.cache/tierkv``: where the CLI, the demo and the benches
    keep converted model weights and captured KV (the engine itself reads no environment)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tierkv")


#: name -> (configure parser, run)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, run)
        return run
    return register


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("info", _info_args)
def _info(args: argparse.Namespace) -> int:
    """Describe a store without knowing its spec: model, layout, sessions, bytes."""
    from .store import describe_store

    desc = describe_store(args.store)
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        for k, v in desc.items():
            print(f"{k:>16}: {v}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store directory")
    p.add_argument("--repair", action="store_true", help="drop bad blocks and the sessions that use them; "
                   "where no other process has the store open, cut sessions back before blocks left unwritten")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("verify", _verify_args)
def _verify(args: argparse.Namespace) -> int:
    """Check every stored block's checksums and every session's blocks; --repair drops bad ones."""
    from .verify import verify_store

    r = verify_store(args.store, repair=args.repair)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['path']}: {r['blocks_checked']} blocks checked, {r['bad_blocks']} bad; "
              f"{len(r['sessions_using_bad_blocks'])} sessions use bad blocks, "
              f"{len(r['sessions_with_missing_blocks'])} miss blocks, "
              f"{r['stray_index_entries']} stray eviction index entries" + ("; repaired" if r["repaired"] else ""))
        for key, why in list(r["bad"].items())[:20]:
            print(f"  bad block {key}: {why}")
        if r["blocks_without_values"]:
            n, cut = r["blocks_without_values"], len(r["sessions_with_unwritten_blocks"])
            if r["unwritten_left_behind"]:
                print(f"  {n} blocks have no value, and no other process has the store open: left by one that "
                      f"stopped before writing them back; {cut} sessions " +
                      ("were cut back to the blocks before them" if r["repaired"] else "restore only up to them "
                       "(--repair cuts them back)"))
            else:
                why = ("another process has the store open: most likely values its write-back still holds in "
                       "memory" if r["open_elsewhere"] else "whether another process has the store open is "
                       "unknown here")
                print(f"  {n} blocks have no value yet ({cut} sessions use them); {why}; left as they are")
    return 0 if r["repaired"] or not (r["bad_blocks"] or r["sessions_using_bad_blocks"]
                                      or r["sessions_with_missing_blocks"] or r["stray_index_entries"]
                                      or r["unwritten_left_behind"]) else 1


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context-tokens", type=int, default=4096, help="tokens of source files the agent reads (default 4096)")
    p.add_argument("--answer-tokens", type=int, default=24, help="tokens generated per turn (default 24)")
    p.add_argument("--store", help="store directory (default: <cache dir>/demo-store)")
    p.add_argument("--cache-dir", help="where converted weights and the store live (default ~/.cache/tierkv)")
    p.add_argument("--device-bytes", default="1GiB")
    p.add_argument("--host-bytes", default="4GiB")
    p.add_argument("--ssd-bytes", default="8GiB")
    p.add_argument("--codec", default="zstd-planes", choices=["zstd-planes", "raw"], help="SSD codec")
    p.add_argument("--block-tokens", type=int, default=256, help="tokens per block (16..4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


@command("demo", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """An agent session on SmolLM2: saved, parked on SSD, resumed in a fresh process."""
    from .demo import run_demo

    if not 16 <= args.context_tokens <= 8000:
        raise ConfigError("--context-tokens must be in 16..8000 (SmolLM2's context is 8192)")
    if not 1 <= args.answer_tokens <= 128:
        raise ConfigError("--answer-tokens must be in 1..128")
    return run_demo(args)


_TOKENS_HELP = "context length: an int or k/M/G with decimal meaning (128k = 128,000; 1M = 1,000,000)"


def _geometry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=int, default=16, choices=[16, 8, 4], help="bits per KV element (default 16)")
    p.add_argument("--indexer-bits", type=int, default=16, choices=[16, 8, 4],
                   help="bits per sparse-attention indexer element (default 16)")
    p.add_argument("--include-mtp", action="store_true", help="count the multi-token-prediction layer(s) too")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _calc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="preset name (see --list) or a config.json path")
    p.add_argument("--tokens", default="128k", help=_TOKENS_HELP)
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--block-tokens", type=int, default=None,
                   help="also the size of one stored block of this many tokens, and of each of its layers "
                        "(what a restore reads per request; docs/benchmarks.md, \"Choosing a block size\")")
    _geometry_args(p)


@command("calc", _calc_args)
def _calc(args: argparse.Namespace) -> int:
    """KV-cache bytes of a model at a context length, with a breakdown."""
    from .config import format_size
    from .kvmath import load_presets, parse_tokens, preset

    if args.list:
        presets = load_presets()
        if args.json:
            print(json.dumps({n: {"family": g.family, **g.fields, "source": g.source} for n, g in presets.items()}))
        else:
            for n, g in sorted(presets.items()):
                print(f"{n:<20} {g.family:<10} {g.fields['num_hidden_layers']:>3} layers  {g.source}")
        return 0
    if not args.model:
        raise ConfigError("name a model (tierkv calc --list shows the presets) or pass --list")
    geom = preset(args.model)
    tokens = parse_tokens(args.tokens)
    fp = geom.footprint(tokens, args.kv_bits, args.indexer_bits, args.include_mtp)
    out = {"model": geom.name, "family": geom.family, "kv_bits": args.kv_bits, "indexer_bits": args.indexer_bits,
           "include_mtp": args.include_mtp, **fp.as_dict(), "bytes_per_token": fp.total / tokens, "source": geom.source}
    step = geom.restore_step  # a model with state layers (gated delta nets, Mamba): where a restore can land
    if step > 1:
        out |= {"restore_step": step, "state_bytes_per_token": geom.state_bytes_per_token(args.kv_bits, args.include_mtp)}
    if args.block_tokens is not None:
        out |= _block_size(geom, args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{geom.name} ({geom.family}), {tokens:,} tokens, {args.kv_bits}-bit KV"
          + (f", {args.indexer_bits}-bit indexer" if fp.indexer else "")
          + (", MTP layer included" if args.include_mtp else ""))
    for label, v in (("KV", fp.kv), ("indexer", fp.indexer), ("sliding window", fp.window)):
        if v or label == "KV":
            print(f"  {label:<15} {v:>20,.0f} B  {v / 2**30:>10.2f} GiB")
    print(f"  {'total':<15} {fp.total:>20,.0f} B  {fp.total / 2**30:>10.2f} GiB  ({format_size(fp.total / tokens)} per token)")
    if step > 1:
        print(f"  restore points every {step:,} tokens; their states are {format_size(out['state_bytes_per_token'])} "
              "of each token's bytes (a config's tierkv_restore_step sets the step: docs/kv-math.md)")
    if args.block_tokens is not None:
        print(f"  a block of {args.block_tokens:,} tokens: {format_size(out['block_bytes'])}, "
              f"{format_size(out['block_layer_bytes'])} per layer"
              + (" (reads under 512 KiB restored slower: docs/benchmarks.md, \"Choosing a block size\")"
                 if out["block_layer_bytes"] < 512 << 10 else ""))
    return 0


def _block_size(geom: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``calc --block-tokens``: the bytes of one stored block and of each of its layers (a
    restore reads a block layer by layer). Per-token layouts only: what tierkv stores of
    DeepSeek V4's compressed attention depends on where a block falls in its compression."""
    from .config import BLOCK_TOKENS

    if not BLOCK_TOKENS[0] <= args.block_tokens <= BLOCK_TOKENS[1]:
        raise ConfigError(f"--block-tokens must be in {BLOCK_TOKENS[0]}..{BLOCK_TOKENS[1]}, got {args.block_tokens}")
    if geom.family == "v4_hybrid":
        raise ConfigError("--block-tokens: what tierkv stores of DeepSeek V4's compressed attention is not a "
                          "per-token layout; tierkv bench reload --model NAME stores and measures it")
    if args.block_tokens % geom.restore_step:
        raise ConfigError(f"--block-tokens: a store of this model restores at multiples of {geom.restore_step} tokens "
                          f"(restore_step), so its block_tokens must be a multiple of it, not {args.block_tokens}")
    per_token = geom.footprint(1, args.kv_bits, args.indexer_bits, args.include_mtp).total
    block = per_token * args.block_tokens
    return {"block_tokens": args.block_tokens, "block_bytes": block,
            "block_layer_bytes": block / geom.layer_count(args.include_mtp)}


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name (see tierkv calc --list) or a config.json path")
    p.add_argument("--tokens", default="128k", help=_TOKENS_HELP)
    p.add_argument("--sessions", type=int, default=1000, help="sessions to place (default 1000)")
    p.add_argument("--hbm", default="80GiB", help="GPU memory for KV (default 80GiB)")
    p.add_argument("--dram", default="1TiB", help="host memory for KV (default 1TiB)")
    p.add_argument("--ssd", default="8TiB", help="SSD space for KV (default 8TiB)")
    p.add_argument("--ssd-gbps", type=float, default=6.0,
                   help="SSD read GB/s (default 6; tierkv bench reload --model MODEL measures a restore of its layout)")
    p.add_argument("--pcie-gbps", type=float, default=50.0, help="host-to-device GB/s (default 50)")
    p.add_argument("--codec-ratio", type=float, default=1.4, help="SSD compression ratio (default 1.4; measure yours)")
    _geometry_args(p)


@command("plan", _plan_args)
def _plan(args: argparse.Namespace) -> int:
    """How many long-context sessions fit in HBM, DRAM and SSD, and how fast one reloads."""
    from .config import format_size, parse_size
    from .kvmath import parse_tokens, plan, preset

    r = plan(preset(args.model), parse_tokens(args.tokens), args.sessions, parse_size(args.hbm, "--hbm"),
             parse_size(args.dram, "--dram"), parse_size(args.ssd, "--ssd"), args.kv_bits, args.indexer_bits,
             args.ssd_gbps, args.pcie_gbps, args.codec_ratio, args.include_mtp)
    if args.json:
        print(json.dumps(r))
        return 0
    a = r["assumptions"]
    print(f"{r['model']} ({r['family']}): {r['sessions']:,} sessions x {r['tokens']:,} tokens")
    print(f"  one session      {format_size(r['session_bytes'])} raw, {format_size(r['session_ssd_bytes'])} on SSD")
    print(f"  all sessions     {format_size(r['total_bytes'])} raw")
    print(f"  {'tier':<6} {'capacity':>12} {'fits':>10} {'placed':>10} {'reload one':>12}")
    for tier, cap in (("hbm", a["hbm_bytes"]), ("dram", a["dram_bytes"]), ("ssd", a["ssd_bytes"])):
        print(f"  {tier:<6} {format_size(cap):>12} {r['fits'][tier]:>10,} {r['placed'][tier]:>10,} "
              f"{r['reload_s'][tier] * 1000:>10.1f} ms")
    if r["restore_step"] > 1:
        print(f"  a restore lands on the restore point at {r['restore_point']:,} tokens (every {r['restore_step']:,}) "
              f"and reads {format_size(r['reload_bytes'])}: its states there, not at every point before")
    if r["unplaced"]:
        print(f"  {r['unplaced']:,} sessions do not fit anywhere")
    print("  assumptions:")
    for k, v in a.items():
        print(f"    {k}: {v}")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["reload", "ttft", "ops"], help="reload: SSD reload throughput vs disk and "
                   "baselines; ttft: real-model TTFT per tier vs recompute; ops: lookup latency, open time, "
                   "per-block overhead")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of bench/<which>.py (e.g. --size 1GiB --json)")


@command("bench", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark from bench/ (a source checkout): reload, ttft or ops."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "bench", f"{args.which}.py")
    if not os.path.isfile(script):
        raise ConfigError(f"{script} not found: tierkv bench runs from a source checkout of tierkv")
    sys.argv = [script, *args.rest]
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierkv", description="Tiered KV-cache store: tools and demos.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        configure(p)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TierKVError as e:
        print(f"tierkv {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
