"""Every `tierkv bench reload` run kept in bench/results/, as the tables and tallies that
docs/benchmarks.md quotes: first the targets at a glance (per configuration and target, the
latest run, the lowest and highest ratio, how many runs met it), which its targets table quotes
as printed; then one row per run, each target ratio computed from the run's JSON (the ratio of
the two medians), bold where the target is met, and per target how many runs met it.

    python bench/reload_runs.py [--results bench/results] > /tmp/runs.md

Nothing is measured here; the runs are the JSON files `tierkv bench reload --out` wrote.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
from typing import Any

COLD, PRE, WARM = "tierkv cold", "tierkv cold, into preallocated tensors", "tierkv warm (page cache)"
ODIRECT, ODIRECT4 = "disk O_DIRECT sequential read", "disk O_DIRECT read, 4 requests in flight"
#: from run 36: the O_DIRECT read into huge pages, one 4 MiB request per read, the disk's limit
#: (the row above reads into 4 KiB pages, which split its requests: see bench/reload.py)
ODIRECT_HUGE = "disk O_DIRECT sequential read, huge-page buffer"
#: from run 39: the same read, each 4 MiB to its own place in a destination of the file's size
WHOLE = "disk O_DIRECT sequential read into a whole destination (huge pages)"
#: tierkv's store file read in the engine's pattern without the engine (bench/read_patterns.py)
PATTERN = "tierkv's read pattern without the engine (cold)"
#: from run 43: the restores with ``ssd_page_cache="bypass"`` (O_DIRECT; since session 71 into
#: bounce buffers on huge pages)
BYPASS, BYPASS_PRE = ("tierkv cold, bypassing the page cache",
                      "tierkv cold, bypassing the page cache, into preallocated tensors")
#: a bypass row whose requests number this many times its configuration's median went to the disk
#: in pieces: its 4 MiB reads landed in memory that was not on huge pages (session 73)
SPLIT_AT = 1.4
#: the first run per configuration whose bypassing restore into fresh tensors streamed through
#: bounce buffers (session 71); before, it read through the page cache, in requests of other sizes
STREAMED_FROM = {"fp32": 78, "bf16 raw": 26}
TORCH, LMDB, LMDB_PRE = ("torch.load per session (cold)", "raw LMDB values, no codec (cold)",
                         "raw LMDB values into a preallocated buffer (cold)")

#: the reload targets (issue 5): tierkv's cold restore at least as fast as an O_DIRECT read of
#: the same bytes, 1.5x torch.load of per-session files, 0.9x raw LMDB values without a codec
AT_LEAST = {"O_DIRECT": 1.0, "torch.load": 1.5, "raw LMDB": 0.9}

#: target name -> (tierkv row, baseline row, the ratio that meets it)
TARGETS = {
    "vs O_DIRECT": (COLD, ODIRECT, AT_LEAST["O_DIRECT"]),
    "vs O_DIRECT, preallocated": (PRE, ODIRECT, AT_LEAST["O_DIRECT"]),
    "vs O_DIRECT in huge pages": (COLD, ODIRECT_HUGE, AT_LEAST["O_DIRECT"]),
    "vs O_DIRECT in huge pages, preallocated": (PRE, ODIRECT_HUGE, AT_LEAST["O_DIRECT"]),
    "vs torch.load": (COLD, TORCH, AT_LEAST["torch.load"]),
    "vs torch.load, preallocated": (PRE, TORCH, AT_LEAST["torch.load"]),
    "vs raw LMDB": (COLD, LMDB, AT_LEAST["raw LMDB"]),
    "vs raw LMDB, both preallocated": (PRE, LMDB_PRE, AT_LEAST["raw LMDB"]),
}


def load_runs(results: str) -> list[dict[str, Any]]:
    """Every reload run in ``results``, each with its file, configuration and label, sorted by
    configuration and run number. ``reload.json`` is fp32 run 3 (its file kept the old name)."""
    runs = []
    for path in glob.glob(os.path.join(results, "reload*.json")):
        name = os.path.basename(path)
        m = re.fullmatch(r"reload(_bf16)?(_raw)?(?:_run(\d+))?(_store_last)?\.json", name)
        if m is None:
            continue
        with open(path) as f:
            r = json.load(f)
        if "logical_gbps" not in r:
            continue
        bf16, number = m.group(1) is not None, int(m.group(3) or (1 if m.group(1) else 3))
        config = "fp32" if not bf16 else ("bf16 raw" if r.get("codec") == "raw" else "bf16 zstd-planes")
        label = f"{number}, store last" if m.group(4) else str(number)
        machine = r.get("machine", {})
        cpu = ((machine["cpu_model"], tuple(machine.get("cpu_features", ())))
               if machine.get("cpu_model") else None)  # recorded from session 70 on
        runs.append({"file": name, "config": config, "number": number, "store_last": bool(m.group(4)),
                     "label": label, "gbps": r["logical_gbps"], "requests": r.get("disk_requests", {}),
                     "save_4096": r.get("save_4096", {}), "cpu": cpu})
    order = {"fp32": 0, "bf16 zstd-planes": 1, "bf16 raw": 2}
    return sorted(runs, key=lambda run: (order[run["config"]], run["number"], run["store_last"]))


def ratio(run: dict[str, Any], target: str) -> float | None:
    """The target's ratio in ``run`` (tierkv's median rate over the baseline's), or None when
    the run lacks either row."""
    mine, theirs, _ = TARGETS[target]
    g = run["gbps"]
    return g[mine] / g[theirs] if mine in g and theirs in g else None


def cell(value: float | None, meets: float | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.2f}x" if meets is not None else f"{value:.2f}"
    return f"**{text}**" if meets is not None and value >= meets else text


def rate(run: dict[str, Any], row: str) -> str:
    return cell(run["gbps"].get(row))


def table(runs: list[dict[str, Any]]) -> list[str]:
    """The markdown table of ``runs`` (one configuration)."""
    head = ["run", "tierkv cold", "preallocated", "warm", "O_DIRECT", "O_DIRECT, 4 in flight", "torch.load",
            "raw LMDB", "raw LMDB preallocated", "vs O_DIRECT (preallocated)",
            "vs torch.load (preallocated)", "vs raw LMDB", "preallocated vs raw LMDB preallocated",
            "vs O_DIRECT, 4 in flight", "O_DIRECT in huge pages", "vs it (preallocated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        pair = lambda a, b: f"{cell(ratio(run, a), TARGETS[a][2])} ({cell(ratio(run, b), TARGETS[b][2])})"  # noqa: E731
        g = run["gbps"]
        four = g[COLD] / g[ODIRECT4] if ODIRECT4 in g else None
        lines.append("| " + " | ".join([
            f"{run['label']} (`{run['file']}`)", rate(run, COLD), rate(run, PRE), rate(run, WARM), rate(run, ODIRECT), rate(run, ODIRECT4),
            rate(run, TORCH), rate(run, LMDB), rate(run, LMDB_PRE),
            pair("vs O_DIRECT", "vs O_DIRECT, preallocated"), pair("vs torch.load", "vs torch.load, preallocated"),
            cell(ratio(run, "vs raw LMDB"), AT_LEAST["raw LMDB"]),
            cell(ratio(run, "vs raw LMDB, both preallocated"), AT_LEAST["raw LMDB"]),
            cell(four, AT_LEAST["O_DIRECT"]), rate(run, ODIRECT_HUGE),
            pair("vs O_DIRECT in huge pages", "vs O_DIRECT in huge pages, preallocated")]) + " |")
    return lines


def tallies(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per target: how many of ``runs`` measured it and how many met it, in all and split by
    which was written last (``--store-last``: tierkv's store after the baselines' files)."""
    out = {}
    for target, (_, _, meets) in TARGETS.items():
        count: dict[str, int] = {}
        for tag, mine in (("", runs), ("store_first_", [r for r in runs if not r["store_last"]]),
                          ("store_last_", [r for r in runs if r["store_last"]])):
            values = [v for v in (ratio(run, target) for run in mine) if v is not None]
            count[tag + "runs"], count[tag + "met"] = len(values), sum(v >= meets for v in values)
        out[target] = count
    return out


def spans(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per method, the lowest and highest median over ``runs``: how far each rate moved."""
    out: dict[str, tuple[float, float]] = {}
    for row in (COLD, PRE, ODIRECT, ODIRECT_HUGE, TORCH, LMDB, LMDB_PRE):
        values = [run["gbps"][row] for run in runs if row in run["gbps"]]
        if values:
            out[row] = (min(values), max(values))
    return out


def row_ratios(runs: list[dict[str, Any]], mine: str, theirs: str) -> list[tuple[str, float]]:
    """Per run that timed both rows, ``mine``'s median rate over ``theirs``'s, with the run's
    label (e.g. PRE over PATTERN: the engine's own share of a gap)."""
    return [(run["label"], run["gbps"][mine] / run["gbps"][theirs]) for run in runs
            if mine in run["gbps"] and theirs in run["gbps"]]


def odirect_requests(runs: list[dict[str, Any]]) -> list[str]:
    """The O_DIRECT baselines' rate against the size of the requests the disk saw (runs that
    recorded ``disk_requests``), grouped by request size: the 4 KiB-page buffer's requests
    varied from run to run, and its rate with them."""
    groups: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for run in runs:
        for row, name in ((ODIRECT, "4 KiB pages"), (ODIRECT_HUGE, "huge pages")):
            req = run["requests"].get(row)
            if req is None or row not in run["gbps"]:
                continue
            kib = req["mean_kib"]
            size = "4 MiB" if kib >= 3500 else "2 MiB" if kib >= 1800 else "about 1 MiB" if kib >= 900 else "512–700 KiB"
            groups.setdefault((name, size), []).append((run["gbps"][row], f"{run['config']} {run['label']}"))
    lines = ["| O_DIRECT read into | requests the disk saw | runs | GB/s, lowest–highest median | runs (config, number) |",
             "|---|---|---|---|---|"]
    order = ["512–700 KiB", "about 1 MiB", "2 MiB", "4 MiB"]
    for (name, size), got in sorted(groups.items(), key=lambda kv: (kv[0][0] != "4 KiB pages", order.index(kv[0][1]))):
        rates = [g for g, _ in got]
        lines.append(f"| {name} | {size} | {len(got)} | {min(rates):.2f}–{max(rates):.2f} | "
                     + "; ".join(label for _, label in got) + " |")
    return lines


def bypass_requests(runs: list[dict[str, Any]]) -> list[str]:
    """The bypassing restores against the requests the disk saw (runs that recorded
    ``disk_requests``): per configuration and row, the runs whose requests number ``SPLIT_AT``
    times the median of that row or more (their reads went out in pieces) and the others. Only
    restores that read with O_DIRECT into memory meant to be on huge pages: into a reserved
    pool, every run; into fresh tensors, from ``STREAMED_FROM`` on."""
    groups: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for run in runs:
        for row, name in ((BYPASS, "fresh tensors"), (BYPASS_PRE, "preallocated")):
            if row == BYPASS and run["number"] < STREAMED_FROM.get(run["config"], 1 << 30):
                continue
            req = run["requests"].get(row)
            if req is not None and row in run["gbps"]:
                groups.setdefault((run["config"], name), []).append((req["requests"], run["gbps"][row], run["label"]))
    lines = ["| configuration | into | runs | median requests | runs in pieces (requests) | their GB/s | the others' requests | their GB/s |",
             "|---|---|---|---|---|---|---|---|"]

    def span(values: list[float], fmt: str) -> str:
        if not values:
            return "—"
        lo, hi = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
        return lo if lo == hi else f"{lo}–{hi}"

    for (config, name), got in groups.items():
        med = statistics.median(n for n, _, _ in got)
        split = [g for g in got if g[0] >= SPLIT_AT * med]
        rest = [g for g in got if g[0] < SPLIT_AT * med]
        lines.append(f"| {config} | {name} | {len(got)} | {med:.0f} | "
                     + (", ".join(f"{label} ({n})" for n, _, label in split) or "none") + " | "
                     f"{span([g for _, g, _ in split], '.2f')} | {span([n for n, _, _ in rest], 'd')} | "
                     f"{span([g for _, g, _ in rest], '.2f')} |")
    return lines


#: the targets as the table at a glance names them: (name, fresh, preallocated)
GLANCE = [
    ("cold ≥1.0x the disk's limit, an O_DIRECT read into huge pages", "vs O_DIRECT in huge pages", "vs O_DIRECT in huge pages, preallocated"),
    ("cold ≥1.5x torch.load of per-session files", "vs torch.load", "vs torch.load, preallocated"),
    ("cold ≥0.9x raw LMDB values (fresh buffers; both preallocated)", "vs raw LMDB", "vs raw LMDB, both preallocated"),
    ("cold ≥1.0x the old baseline, an O_DIRECT read into 4 KiB pages", "vs O_DIRECT", "vs O_DIRECT, preallocated"),
]
#: ``save`` of 4,096 tokens blocks its caller at most this long beyond its copy (issue 5)
SAVE_BEYOND_COPY_MS = 5.0


def glance(runs: list[dict[str, Any]]) -> list[str]:
    """The reload targets at a glance, one row per configuration and target: the latest run
    that measured it, the lowest and highest ratio over every run that did, and how many met
    it; fresh tensors first, preallocated in brackets. The targets table of docs/benchmarks.md
    quotes these rows as they are (tests/test_bench_smoke.py checks that it does)."""
    lines = ["| configuration: target | latest run | lowest–highest, every run that measured it | met in |",
             "|---|---|---|---|"]

    def span(values: list[float], unit: str = "x") -> str:
        if not values:
            return "—"
        lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
        return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"

    for config in ("fp32", "bf16 raw", "bf16 zstd-planes"):
        mine = [run for run in runs if run["config"] == config]
        for name, fresh, pre in GLANCE:
            got = [(run, ratio(run, fresh), ratio(run, pre)) for run in mine if ratio(run, fresh) is not None]
            if not got:
                continue
            meets = TARGETS[fresh][2]
            last, r_fresh, r_pre = got[-1]
            fresh_all = [f for _, f, _ in got]
            pre_all = [p for _, _, p in got if p is not None]
            latest = f"{cell(r_fresh, meets)} ({cell(r_pre, meets)}), run {last['label']}"
            lines.append(f"| {config}: {name} | {latest} | {span(fresh_all)} ({span(pre_all)}) | "
                         f"{sum(f >= meets for f in fresh_all)} of {len(fresh_all)} runs "
                         f"({sum(p >= meets for p in pre_all)} of {len(pre_all)}) |")
        saves = [(run, run["save_4096"]) for run in mine if "beyond_copy_s" in run["save_4096"]]
        if saves:
            beyond = [s["beyond_copy_s"]["median"] * 1e3 for _, s in saves]
            last, s = saves[-1]
            lines.append(f"| {config}: `save` of 4,096 tokens blocks ≤{SAVE_BEYOND_COPY_MS:g} ms beyond its copy | "
                         f"{beyond[-1]:.2f} ms (copy {s['copy_s']['median'] * 1e3:.1f} ms), run {last['label']} | "
                         f"{span(beyond, ' ms')} | "
                         f"{sum(b <= SAVE_BEYOND_COPY_MS for b in beyond)} of {len(beyond)} runs |")
    return lines


def cpus_of(runs: list[dict[str, Any]]) -> dict[tuple[str, tuple[str, ...]], list[str]]:
    """The labels of the runs whose JSON names their CPU, by (model, features): the same VM
    image has run on different CPUs from one session to another, at different speeds."""
    cpus: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for run in runs:
        if run["cpu"] is not None:
            cpus.setdefault(run["cpu"], []).append(run["label"])
    return cpus


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    runs = load_runs(args.results)
    report: dict[str, Any] = {"glance": glance(runs), "configs": {}}
    print("### The reload targets at a glance\n")
    print("\n".join(report["glance"]))
    print()
    for config in ("fp32", "bf16 zstd-planes", "bf16 raw"):
        mine = [run for run in runs if run["config"] == config]
        if not mine:
            continue
        print(f"### {config}: {len(mine)} runs\n")
        print("\n".join(table(mine)))
        t, s = tallies(mine), spans(mine)
        print()
        for target, n in t.items():
            if n["runs"]:
                print(f"- {target}: met in {n['met']} of {n['runs']} runs (store written first: "
                      f"{n['store_first_met']} of {n['store_first_runs']}; last: "
                      f"{n['store_last_met']} of {n['store_last_runs']})")
        for row, (lo, hi) in s.items():
            print(f"- {row}: medians {lo:.2f}–{hi:.2f} GB/s")
        whole = [v for _, v in row_ratios(mine, PRE, WHOLE)]
        if whole:
            print(f"- preallocated against the O_DIRECT read into a whole destination: {min(whole):.2f}–"
                  f"{max(whole):.2f}x over {len(whole)} runs")
        split = {True: [], False: []}
        for run in mine:
            r = ratio(run, "vs torch.load")
            if r is not None:
                split[r >= AT_LEAST["torch.load"]].append(run["gbps"][TORCH])
        for met, rates in split.items():
            if rates:
                print(f"- torch.load's files in the runs that {'met' if met else 'missed'} the torch.load target: "
                      f"{min(rates):.2f}–{max(rates):.2f} GB/s ({len(rates)} runs)")
        shares = row_ratios(mine, PRE, PATTERN)
        if shares:
            values = [v for _, v in shares]
            print(f"- the engine against its read pattern (preallocated / bare pattern): {min(values):.2f}–"
                  f"{max(values):.2f}x, median {statistics.median(values):.2f}x; by run: "
                  + ", ".join(f"{label} {v:.2f}" for label, v in shares))
        bare = [v for _, v in row_ratios(mine, PATTERN, LMDB_PRE)]
        if bare:
            print(f"- the bare read pattern against raw LMDB, preallocated: {min(bare):.2f}–{max(bare):.2f}x, "
                  f"median {statistics.median(bare):.2f}x over {len(bare)} runs")
        cpus = cpus_of(mine)
        for (model, features), labels in cpus.items():
            print(f"- runs that name their CPU (recorded from session 70 on): {', '.join(labels)} on {model}"
                  f" ({', '.join(features) or 'no AVX2'})")
        print()
        report["configs"][config] = {"runs": [run["file"] for run in mine], "tallies": t, "spans": s,
                                     "cpus": cpus}
    print("### The O_DIRECT baselines: rate against request size, every run that recorded it\n")
    print("\n".join(odirect_requests(runs)))
    print()
    report["bypass_requests"] = bypass_requests(runs)
    print("### The bypassing restores: the requests the disk saw, every run that recorded them\n")
    print("\n".join(report["bypass_requests"]))
    print()
    return report


if __name__ == "__main__":
    main()
