"""Markdown tables for docs/kv-math.md: every preset's KV at 128K and 1M tokens, and the
reload-versus-recompute break-even. Pure arithmetic from tierkv.kvmath (nothing measured).

    python bench/kv_table.py > /tmp/tables.md
"""

from __future__ import annotations

from tierkv.kvmath import load_presets

GIB = 2**30


def main() -> None:
    presets = load_presets()
    print("| model | family | 128K bf16 | 128K 8-bit | 1M bf16 | 1M 8-bit | bytes/token (8-bit, 1M) |")
    print("|---|---|---|---|---|---|---|")
    for name, g in presets.items():
        cells = [f"{g.footprint(t, kv, 16).total / GIB:,.2f} GiB" for t in (128_000, 1_000_000) for kv in (16, 8)]
        per = g.footprint(1_000_000, 8, 16).total / 1_000_000
        print(f"| {name} | {g.family} | " + " | ".join(cells) + f" | {per:,.0f} |")
    print()
    ssd, tput = 6e9, 400e12
    print(f"Break-even at 1M tokens, 8-bit KV, 16-bit indexer; SSD {ssd / 1e9:.0f} GB/s, "
          f"accelerator {tput / 1e12:.0f} TFLOP/s sustained:")
    print()
    print("| model | reload µs/token | recompute µs/token per 1B active params | break-even active params |")
    print("|---|---|---|---|")
    for name, g in presets.items():
        per = g.footprint(1_000_000, 8, 16).total / 1_000_000
        reload_us = per / ssd * 1e6
        per_b = 2e9 / tput * 1e6
        breakeven = per / ssd * tput / 2
        print(f"| {name} | {reload_us:.3f} | {per_b:.3f} | {breakeven / 1e6:,.1f} M |")


if __name__ == "__main__":
    main()
