"""The ``tierkv`` command line.

Subcommands register themselves in ``COMMANDS``; each takes parsed arguments and returns an
exit code. Errors from tierkv's hierarchy print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import ConfigError, TierKVError

__all__ = ["main", "COMMANDS"]

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
