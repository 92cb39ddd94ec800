"""The ``tierkv`` command line.

Subcommands register themselves in ``COMMANDS``; each takes parsed arguments and returns an
exit code. Errors from tierkv's hierarchy print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import TierKVError

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
