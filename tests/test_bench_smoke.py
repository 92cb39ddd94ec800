"""The benchmark scripts run (tiny sizes): they must not rot. Their numbers are not checked here."""

import errno
import importlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture
def bench(monkeypatch):
    """``bench(name, *args)`` runs bench/<name>.py's ``main(args)`` in this process, from the
    repository root. A process per script spent about 3 s importing torch before its first line
    (7 s with transformers), which made this file most of the suite's time. Scripts that patch
    the engine (gpu_restore_split.py) or that the CLI runs (``tierkv bench ...``) still run in
    processes of their own; those that time other processes start them themselves."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "bench"), *sys.path])
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])

    def run(name, *args):
        return importlib.import_module(name).main([str(a) for a in args])
    return run


def test_reload_bench_refuses_a_directory_it_cannot_read_cold(tmp_path):
    """On tmpfs the page cache cannot drop a file: every "cold" row would time memory. The bench
    stops with a clear error before writing anything, and leaves nothing behind."""
    shm = "/dev/shm"
    if not sys.platform.startswith("linux") or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm here")
    with open("/proc/mounts") as f:
        if not any(line.split()[1:3] == [shm, "tmpfs"] for line in f):
            pytest.skip("/dev/shm is not tmpfs here")
    before = set(os.listdir(shm))
    out = tmp_path / "reload.json"
    r = subprocess.run([sys.executable, "-m", "tierkv.cli", "bench", "reload", "--size", "8MiB", "--repeats", "1",
                        "--synthetic", "--gpu", "none", "--out", str(out), "--dir", shm],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert "stayed in the page cache" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert not {n for n in set(os.listdir(shm)) - before if n.startswith("tierkv-reload-")}


@pytest.mark.parametrize("args,message", [
    (["reload", "--repeats", "0"], "--repeats: 0 is less than 1"),
    (["reload", "--repeats", "many"], "--repeats: 'many' is not an int"),
    (["reload", "--dir", "/nonexistent/tierkv"], "--dir: '/nonexistent/tierkv' is not a directory"),
    (["reload", "--block-tokens", "8"], "--block-tokens: 8 is less than 16"),
    (["reload", "--block-tokens", "300"], "--block-tokens must divide the 2048 tokens of a session"),
    (["ttft", "--sizes", "512", "1"], "--sizes: 1 is less than 2"),
    (["ttft", "--repeats", "0"], "--repeats: 0 is less than 1"),
    (["ops", "--sessions", "0"], "--sessions: 0 is less than 1"),
])
def test_bench_commands_refuse_bad_counts_at_the_command_line(tmp_path, monkeypatch, capsys, args, message):
    """A count below what a bench can run stops at the command line (exit 2, argparse's message),
    not as a traceback minutes in: --repeats 0 died in statistics.median, --sizes -5 ran on,
    --dir of a missing directory died in mkdtemp. Run in this process (``tierkv bench`` runs the
    script in its own): a process each spent its seconds importing torch."""
    from tierkv.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))   # the bench scripts put bench/ on it
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as stopped:
        main(["bench", *args, "--out", str(out)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.real_devices
@pytest.mark.parametrize("store_last", [False, True])
def test_reload_bench_runs(tmp_path, store_last, bench):
    out = tmp_path / "reload.json"
    # the GPU rows run on the CPU where no GPU is (store first: one run is enough)
    # (store last: without the O_DIRECT rows, as where the file system refuses them)
    # (store last: in DeepSeek V4-Flash's layout, tensors of many widths per layer)
    # (store first: in 512-token blocks, tierkv's and the raw LMDB rows' alike)
    extra = (["--store-last", "--no-o-direct", "--model", "deepseek-v4-flash", "--dtype", "bf16"] if store_last
             else ["--block-tokens", "512"] + ([] if torch.cuda.is_available() else ["--gpu", "cpu"]))
    bench("reload", "--size", "40MiB", "--repeats", "2", "--synthetic", "--out", out, "--dir", tmp_path, *extra)
    res = json.loads(out.read_text())
    assert res["written"].startswith("baselines" if store_last else "tierkv")
    assert (res["kv"], res["block_tokens"], res["bytes_per_token"]) == (
        ("synthetic-deepseek-v4-flash-bf16", 1024, 12888) if store_last else ("synthetic-fp32", 512, 46080))
    # every round ran every method once, in an order of its own
    assert len(res["round_orders"]) == 2
    assert all(sorted(order) == sorted(res["logical_gbps"]) for order in res["round_orders"])
    assert res["sessions"] >= 1 and res["save"]["compression_ratio"] > 0.9
    assert {"tierkv cold", "torch.load per session (cold)",
            "LMDB get on tierkv's store file (cold)", "tierkv cold, into preallocated tensors",
            "raw LMDB values into a preallocated buffer (cold)",
            "tierkv cold, values read through LMDB's map"} <= set(res["logical_gbps"])
    direct_rows = {"disk O_DIRECT sequential read", "disk O_DIRECT read, 4 requests in flight",
                   "disk O_DIRECT sequential read, huge-page buffer", "disk O_DIRECT read of tierkv's store file",
                   "disk O_DIRECT read of tierkv's store file, huge-page buffer",
                   "disk O_DIRECT sequential read into a whole destination (huge pages)"}
    assert res["o_direct"] is not store_last
    if store_last:  # left out, with every ratio and target that needs them
        assert not direct_rows & set(res["logical_gbps"])
        assert not [k for k in res["ratios"] if "odirect" in k] and len(res["targets"]) == 4
    else:
        assert direct_rows <= set(res["logical_gbps"])
        assert res["ratios"]["tierkv_preallocated_cold_vs_odirect_whole_destination"] > 0
        assert res["ratios"]["tierkv_cold_vs_odirect_4_in_flight"] > 0
        assert res["ratios"]["tierkv_cold_vs_odirect_same_file_huge_page_buffer"] > 0
        assert len(res["targets"]) == 8
        assert res["targets"]["tierkv_cold_vs_odirect_huge_page_buffer"]["at_least"] == 1.0
    assert res["map_reads_vs_pread"] > 0
    # cold and warm, prefetch on and off, in KV delivered (logical) and store bytes read (physical)
    both = {"tierkv cold", "tierkv cold + prefetch", "tierkv warm (page cache)", "tierkv warm (page cache) + prefetch"}
    assert both <= set(res["logical_gbps"]) and both <= set(res["physical_gbps"])
    assert all(res["physical_gbps"][k] > 0 for k in both)
    if sys.platform.startswith("linux"):  # the store read without the engine (its checksums held)
        assert res["engine_vs_its_read_pattern"] > 0 and res["one_stream_vs_read_pattern"] > 0
    for row in res.get("disk_requests", {}).values():  # only where /proc/diskstats names the disk
        assert row["requests"] >= 0 and row["mean_kib"] >= 0 and row["in_flight"] >= 0
    assert res["ratios"]["tierkv_preallocated_cold_vs_raw_lmdb_preallocated"] > 0
    # every ratio also per round (median of the rounds' ratios), from every round's time kept
    assert set(res["ratios_paired"]) == set(res["ratios"]) and all(v > 0 for v in res["ratios_paired"].values())
    # each target judged on its ratio of medians, met exactly when it reaches the threshold
    assert set(res["targets"]) <= set(res["ratios"])
    assert all(t["met"] == (t["ratio"] >= t["at_least"]) for t in res["targets"].values())
    cold = res["timings_s"]["tierkv cold"]
    assert len(cold["runs"]) == cold["n"] and min(cold["runs"]) == cold["min"]
    if not store_last or torch.cuda.is_available():
        on = "GPU" if torch.cuda.is_available() else "cpu (as the GPU)"
        assert res["gpu_rows"] == ("cuda" if torch.cuda.is_available() else "cpu")
        assert {f"tierkv cold, into {on} memory", f"tierkv cold, into preallocated {on} tensors",
                f"tierkv warm (page cache), into {on} memory", f"tierkv host tier (pinned DRAM), into {on} memory",
                f"torch.load per session (cold), onto the {on}", f"pinned host memory to {on} memory, one copy",
                } <= set(res["logical_gbps"])
        assert all(res["ratios"][k] > 0 for k in ("tierkv_cold_gpu_vs_odirect_huge_page_buffer",
                                                  "tierkv_cold_gpu_vs_torch_load_gpu", "tierkv_cold_gpu_vs_cpu",
                                                  "tierkv_host_tier_gpu_vs_pinned_copy"))
    else:
        assert res["gpu_rows"] is None and not any("GPU" in k for k in res["logical_gbps"])


def test_ops_bench_runs(tmp_path, bench):
    out = tmp_path / "ops.json"
    bench("ops", "--sessions", "200", "--long-tokens", "20000", "--out", out)
    res = json.loads(out.read_text())
    assert res["open_s"]["sessions"] == 200 and res["lookup_in_many"]["p99_ms"] > 0
    assert res["lease_grant_1M"]["blocks"] == -(-20000 // 256) and res["lease_grant_1M"]["p50_ms"] > 0


def test_lease_race_bench_runs(tmp_path, bench):
    out = tmp_path / "lease_race.json"
    bench("lease_race", "--keys", "16", "--seconds", "0.3", "--out", out)
    (run,) = json.loads(out.read_text())["runs"]
    assert run["keys"] == 16 and run["checked"] > 0 and run["lost"] == 0


def test_soak_watchdog_reports_a_hang():
    """The soak's watchdog stays quiet while calls finish, and reports every thread's stack once
    none has for its limit (a run of session 39 hung with no word of it)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import soak
    churn = soak.Churn([(torch.zeros(1, soak.TOKENS, 2), torch.zeros(1, soak.TOKENS, 2))], None, 4, 0)
    fired = []
    dog = soak.Watchdog(churn, 1.5, fired.append).start()
    for _ in range(15):   # 3 s of calls finishing
        churn.bump("lookup")
        time.sleep(0.2)
    assert not fired
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.1)
    dog.stop()
    assert len(fired) == 1 and "test_soak_watchdog_reports_a_hang" in fired[0]


def test_soak_bench_runs(tmp_path):
    """A short soak with a second process on the store, killed once and replaced: every check it
    makes passes."""
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--minutes", "0.3",
                        "--processes", "1", "--kill-every", "10", "--reopen-every", "4", "--sample-every", "2",
                        "--synthetic", "--dir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["problems"] == [] and res["summary"]["corrupt_blocks"] == 0
    # four reopens are due in its 18 s; on a loaded machine a reopen (a close that writes back,
    # then an open) and the kill's replacement process can take seconds, so two are asked for
    # (with reopens due every 6 s, a CI run beside other work made only one)
    assert res["reopens"] >= 2 and res["kills"] == 1
    assert [p["killed"] for p in res["processes"]] == [True, False]
    assert res["ops"]["save"] > 0 and res["ops"]["restore"] > 0
    assert res["after_close"]["fds"] < res["summary"]["fds_max"]
    # the store as verify finds it once every process has closed it: no damage, and no block a
    # killed process left unwritten once the repair has cut its sessions back
    found = res["verify"]["found"]
    assert found["blocks_checked"] > 0 and found["bad_blocks"] == found["stray_index_entries"] == 0
    assert found["open_elsewhere"] is False
    if found["unwritten_left_behind"]:
        assert res["verify"]["after_repair"]["blocks_without_values"] == 0


@pytest.mark.model  # SmolLM2's tokenizer
@pytest.mark.parametrize("arch", ["lfm2", "qwen3_5", "granite4", "gemma3", "mamba2"])
def test_hybrid_restore_bench_runs(tmp_path, arch, bench):
    """bench/hybrid_restore.py on a toy LFM2, Qwen3.5, Granite 4.0-H, Gemma 3 and Mamba-2: restored
    from cold SSD, the logits equal continuing the original cache from the point restored, and
    what the conv layers (LFM2) or the state layers' restore points (Qwen3.5, Granite 4.0-H,
    Mamba-2) take is counted in the stored bytes. The Qwen3.5, Granite and Mamba-2 sessions of 200
    tokens restore up to their restore point at 192. Reading only what each layer needs
    (``needed_only``) reads less (Mamba-2: one block of three), and gives the same logits."""
    out = tmp_path / f"{arch}.json"
    tokens, block = {"lfm2": (120, 16), "qwen3_5": (200, 64), "granite4": (200, 64), "gemma3": (100, 16),
                     "mamba2": (200, 64)}[arch]
    bench("hybrid_restore", "--arch", arch, "--small", "--tokens", tokens, "--block-tokens", block, "--rounds", "1",
          "--out", out)
    res = json.loads(out.read_text())
    assert res["logits_identical"] is True and res["context_tokens"] == tokens and res["arch"] == arch
    if arch == "lfm2":
        assert res["restored_tokens"] == 120 and res["restore_step"] == 1
        assert res["state_bytes_per_token"] == 2 * 64 * 4 and res["bytes_per_token"] == 2 * 64 * 4 + 2 * 2 * 2 * 16 * 4
    elif arch == "qwen3_5":  # three layers' conv state (8 values per token), recurrent state (16); one K and V
        assert res["restored_tokens"] == 192 and res["restore_step"] == 64
        assert res["state_bytes_per_token"] == 3 * (8 + 16) * 4 and res["bytes_per_token"] == 3 * 24 * 4 + 2 * 16 * 4
    elif arch == "granite4":  # three Mamba-2 layers' conv state (144 x 4 over 64: 12 values), state 8 x 16 x 8 (16)
        assert res["restored_tokens"] == 192 and res["restore_step"] == 64
        assert res["state_bytes_per_token"] == 3 * (12 + 16) * 4 and res["bytes_per_token"] == 3 * 28 * 4 + 2 * 16 * 4
    elif arch == "mamba2":  # four Mamba-2 layers alone, the same states: one 64-token block read of three
        assert res["restored_tokens"] == 192 and res["restore_step"] == 64
        assert res["state_bytes_per_token"] == res["bytes_per_token"] == 4 * 28 * 4
        assert res["ssd_read_bytes"]["cold_ssd_needed"] * 3 <= res["ssd_read_bytes"]["cold_ssd"]
    else:  # three window layers of 16 tokens and a full one, K and V of one head of 16
        assert res["restored_tokens"] == 100 and res["state_bytes_per_token"] == 0
        assert res["bytes_per_token"] == 4 * 2 * 16 * 4
    assert set(res["ttft_s"]) == {"recompute", "cold_ssd", "cold_ssd_needed"}
    # each conv layer reads its last inputs only, each state layer its restore point's state
    assert 0 < res["ssd_read_bytes"]["cold_ssd_needed"] < res["ssd_read_bytes"]["cold_ssd"]


@pytest.mark.model  # loads SmolLM2
def test_gc_pause_bench_runs(tmp_path, bench):
    """bench/gc_pause.py: a full collection's pause, as is and with the objects alive frozen, then
    turns alternating hold_gc, each with the full collections that ran in its window (none where
    the runner holds the collector off)."""
    out = tmp_path / "gc.json"
    bench("gc_pause", "--tokens", "300", "--rounds", "1", "--out", out)
    res = json.loads(out.read_text())
    assert res["full_collect_pause_s"]["n"] == 5 and res["full_collect_pause_s"]["median"] > 0
    # frozen, a full collection skips the model's and pytest's objects: a fraction of the time
    assert res["frozen_objects"] > 100_000
    assert res["full_collect_pause_frozen_s"]["median"] < res["full_collect_pause_s"]["median"] / 4
    assert [x["hold_gc"] for x in res["rounds"]] == [True, False]
    assert all(x["restored_tokens"] > 0 for x in res["rounds"])
    assert res["rounds_with_a_full_collection"]["hold_gc=True"] == 0


@pytest.mark.model  # loads SmolLM2 (or KV captured from it)
def test_ttft_parts_bench_runs(tmp_path, bench):
    out = tmp_path / "ttft_parts.json"
    bench("ttft_parts", "--tokens", "600", "--rounds", "1", "--out", out)
    res = json.loads(out.read_text())
    assert len(res["ttft"]) == 7 and "overlapped, I/O threads not spread" in res["ttft"]
    assert 0 <= res["overlapped_timeline"]["layers_prefilled_by_then"] <= 30


@pytest.mark.model  # loads SmolLM2 (or KV captured from it)
def test_thread_exactness_bench_runs(tmp_path, bench):
    out = tmp_path / "thread_exactness.json"
    bench("thread_exactness", "--contexts", "40", "--messages", "1", "3", "--out", out)
    res = json.loads(out.read_text())
    assert len(res["results"]) == 2 and isinstance(res["identical"], bool)


@pytest.mark.model  # loads SmolLM2
def test_adapter_overhead_bench_runs(tmp_path, bench):
    pytest.importorskip("peft")
    out = tmp_path / "adapter_overhead.json"
    bench("adapter_overhead", "--adapters", "none", "r8 k,v", "--context", "300", "--new", "4", "--decode", "1",
          "--rounds", "1", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [x["adapter"] for x in rows] == ["none", "r8 k,v"] and rows[0]["adapter_bytes"] == 0 < rows[1]["adapter_bytes"]
    assert all(x["restored_tokens"] == 256 and x["tenant_ms"]["median"] > 0 for x in rows)


@pytest.mark.model  # loads SmolLM2 (or KV captured from it)
def test_ttft_bench_runs(tmp_path):
    out = tmp_path / "ttft.json"
    r = subprocess.run([sys.executable, "-m", "tierkv.cli", "bench", "ttft", "--sizes", "64", "--repeats", "1",
                        "--server-work-ms", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"recompute", "cold_ssd", "warm_ssd+prefetch"} <= set(res["rows"][0]["ttft_s"])


@pytest.mark.parametrize("own_stores", [False, True])
def test_ab_reload_bench_runs(tmp_path, own_stores, bench):
    """Two versions side by side (here the same one twice): both restore every session, from one
    store or (``--own-stores``) each from a store it wrote, taking turns at running first; B/A is
    also reported per round. One mode each (a fresh process per version, mode and round): the
    two together took 72 s of the suite.

    With its own stores, B writes with another SSD codec (``--codec-b``, which implies
    ``--own-stores``): bf16 KV's byte planes compress, so B's zstd-planes store is smaller than
    A's raw one (one run for both: each was a test of its own, 12 s more of the suite). The
    other run's children free large buffers before they restore (``--freed-first``)."""
    out = tmp_path / "ab.json"
    mode = "cold" if own_stores else "warm"
    bench("ab_reload", "--a", ROOT, "--size", "20MiB", "--rounds", "2", "--synthetic", "--mode", mode, "--out", out,
          "--dir", tmp_path, *(["--preallocated", "--dtype", "bf16", "--codec", "raw", "--codec-b", "zstd-planes"]
                               if own_stores else ["--freed-first"]))
    res = json.loads(out.read_text())
    assert res["preallocated"] is own_stores   # into a reserved CachePool, or fresh tensors
    assert res["freed_first"] is not own_stores
    assert set(res["gbps"]) == {f"{mode} A", f"{mode} B"} and set(res["b_over_a"]) == {mode}
    assert all(v["median"] > 0 and len(v["runs"]) == 2 for v in res["gbps"].values())
    assert res["round_orders"] == [["A", "B"], ["B", "A"]]
    paired = [b / a for a, b in zip(res["gbps"][f"{mode} A"]["runs"], res["gbps"][f"{mode} B"]["runs"])]
    assert res["b_over_a_paired"][mode]["runs"] == pytest.approx(paired)
    assert res["own_stores"] is own_stores and all(n > 0 for n in res["store_file_bytes"].values())
    if own_stores:
        assert (res["codec"], res["codec_b"]) == ("raw", "zstd-planes")
        assert res["store_file_bytes"]["B"] < 0.9 * res["store_file_bytes"]["A"]


def test_ab_reload_bench_compares_block_sizes(tmp_path, bench):
    """``--model`` restores random KV in a preset's layout; ``--block-tokens-b`` gives B's store
    another block size (each version writes its own store): each restores every session whole,
    in blocks of its own size. ``--page-cache-b bypass``: B restores with
    ``ssd_page_cache="bypass"``, reading its cold values with O_DIRECT where the disk allows it."""
    from tierkv.pagecache import direct_io_supported

    out = tmp_path / "ab.json"
    bench("ab_reload", "--a", ROOT, "--size", "20MiB", "--rounds", "2", "--model", "smollm2-135m", "--dtype", "bf16",
          "--codec", "raw", "--block-tokens", "128", "--block-tokens-b", "512", "--mode", "cold", "--out", out,
          "--dir", tmp_path, "--page-cache-b", "bypass")
    res = json.loads(out.read_text())
    assert res["page_cache"] == {"A": "use", "B": "bypass"}
    assert res["direct_read_bytes"]["A"] == 0
    if direct_io_supported(str(tmp_path)):
        assert res["direct_read_bytes"]["B"] > 0.9 * res["raw_bytes"]
    assert res["kv"] == "smollm2-135m-random-bf16" and res["own_stores"] is True
    assert res["block_tokens"] == {"A": 128, "B": 512}
    tokens = res["tokens_per_session"]
    assert res["restored_blocks"] == {"A": res["sessions"] * tokens // 128, "B": res["sessions"] * tokens // 512}
    assert all(len(v["runs"]) == 2 and v["median"] > 0 for v in res["gbps"].values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tierkv's pread reader is Linux-only")
def test_reload_timeline_bench_runs(tmp_path, bench):
    """The engine and its bare read pattern, read by read: every timed run accounts for its reads,
    and no part of a run is counted longer than the run."""
    out = tmp_path / "timeline.json"
    bench("reload_timeline", "--size", "20MiB", "--rounds", "1", "--synthetic", "--out", out, "--dir", tmp_path)
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {f"{m} {mode}" for m in ("engine", "read pattern", "engine, threads not spread")
                                for mode in ("cold", "warm")}
    for row in res["rows"].values():
        for i, seconds in enumerate(row["seconds"]["runs"]):
            assert row["reads"]["runs"][i] >= 4 * res["sessions"]   # every layer of every session read
            assert 0 <= row["no_read_in_flight_s"]["runs"][i] <= seconds
            assert 0 <= row["before_first_read_s"]["runs"][i] <= seconds
            assert 0 <= row["after_last_read_s"]["runs"][i] <= seconds
    assert res["engine_vs_pattern_cold"] > 0 and res["engine_vs_pattern_warm_paired"] > 0
    assert res["spread_vs_not_spread_cold"] > 0 and res["spread_vs_not_spread_warm_paired"] > 0


def test_gpu_restore_split_bench_runs(tmp_path):
    """The GPU restore split, with the GPU path's logic on the CPU: every source and part is
    there, the parts add up to no more than the run, and the SSD sources made layer buffers."""
    out = tmp_path / "split.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_restore_split.py"), "--size", "20MiB",
                        "--rounds", "1", "--synthetic", "--device", "cpu", "--staged", "--out", str(out),
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {f"{src}, into cpu memory (staged)" for src in ("warm", "cold", "host")}
    for name, row in res["rows"].items():
        med = {k: v["median"] for k, v in row.items()}
        assert med["decode_s"] + med["result_s"] + med["device_tail_s"] <= med["total_s"]
        # summed over the two decode threads: at most twice the wall time they ran in
        assert med["upload_launch_s"] <= 2 * med["decode_s"] and med["layer_buffer_s"] <= 2 * med["decode_s"]
        assert (med["upload_launch_s"] > 0) == (not name.startswith("host"))


def test_pack_blocks_bench_runs(tmp_path, bench):
    out = tmp_path / "pack.json"
    bench("pack_blocks", "--tokens", "2048", "--rounds", "2", "--synthetic", "--out", out)
    res = json.loads(out.read_text())
    assert res["copies"] == res["blocks"] * 60 and res["blocks"] == 8
    assert set(res["seconds"]) == {"one by one", "batched", "save() copy", "serial, split per copy", "serial"}
    assert all(len(v["runs"]) == 2 and v["min"] > 0 for v in res["seconds"].values())
    assert res["serial_vs_split_per_copy_paired"] > 0


def test_memory_restore_bench_runs(tmp_path, bench):
    out = tmp_path / "memrestore.json"
    bench("memory_restore", "--rounds", "2", "--synthetic", "--out", out)
    res = json.loads(out.read_text())
    assert set(res["seconds"]) == {"restore", "restore into preallocated tensors", "one copy per tensor"}
    assert res["vs_floor"]["one copy per tensor"] == 1.0 and res["vs_floor"]["restore"] > 0


def test_needed_reload_bench_runs(tmp_path, bench):
    out = tmp_path / "needed.json"
    from tierkv import ColdReadError

    try:
        bench("needed_reload", "--rounds", "1", "--synthetic", "--hint-ahead", "2", "--dir", tmp_path, "--out", out)
    except ColdReadError:
        pytest.skip("this file system keeps files in memory")
    res = json.loads(out.read_text())
    assert set(res["seconds"]) == {"whole", "sliding 1024 in 2 layers of 3", "server holds 6144",
                                   "sliding 1024 in 2 layers of 3, hint ahead 2 MiB"}
    assert res["hint_ahead_bytes"]["sliding 1024 in 2 layers of 3, hint ahead 2 MiB"] == 2 << 20
    # what each plan reads follows from the plan (the timings are not checked here)
    assert res["bytes_vs_whole"]["server holds 6144"] < 0.3 and res["skipped_block_layers"]["whole"] == 0


def test_direct_ceiling_bench_runs(tmp_path, bench):
    """bench/direct_ceiling.py reads its file with each pattern and checks, before timing them,
    that every pattern put the KV's bytes in their places (it exits otherwise)."""
    out = tmp_path / "direct_ceiling.json"
    try:
        bench("direct_ceiling", "--size", "40MiB", "--rounds", "1", "--synthetic", "--dtype", "bf16", "--block-tokens",
              "512", "--group", "7", "--out", out, "--dir", tmp_path)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip("O_DIRECT refused by this file system")   # tmpfs
    res = json.loads(out.read_text())
    assert len(res["gbps"]) == 10 and all(v > 0 for v in res["gbps"].values())
    assert res["vs_odirect_reused_buffer"]["O_DIRECT sequential, reused huge-page buffer"] == 1.0
    assert res["round_orders"] and sorted(res["round_orders"][0]) == sorted(res["gbps"])


def test_compressed_ceiling_bench_runs(tmp_path, bench):
    """bench/compressed_ceiling.py (needs blosc2, not a tierkv dependency) checks every decoded
    block against the KV before timing, and reports each row, one per codec asked for, against
    the O_DIRECT baseline."""
    pytest.importorskip("blosc2")
    out = tmp_path / "compressed_ceiling.json"
    try:
        bench("compressed_ceiling", "--size", "40MiB", "--rounds", "1", "--synthetic", "--block-tokens", "512",
              "--codecs", "shuffle-zstd1,shuffle-lz4", "--out", out, "--dir", tmp_path)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip("O_DIRECT refused by this file system")
    res = json.loads(out.read_text())
    assert len(res["gbps"]) == 4 and all(v > 0 for v in res["gbps"].values())
    assert res["vs_odirect_reused_buffer"]["O_DIRECT sequential, reused huge-page buffer"] == 1.0
    assert sorted(res["compression_ratios"]) == sorted(k for k in res["gbps"] if k.startswith("blosc2"))
    assert all(r > 0.9 for r in res["compression_ratios"].values())


def test_save_bound_bench_runs(tmp_path, bench):
    """bench/save_bound.py times tierkv's write-through saves (in a process of their own, and
    with ``--a`` another version's: here this checkout again) next to raw LMDB and plain file
    writes, and keeps the writer's split of its time."""
    out = tmp_path / "save_bound.json"
    bench("save_bound", "--sessions", "1", "--rounds", "1", "--synthetic", "--a", ROOT, "--out", out, "--dir", tmp_path)
    res = json.loads(out.read_text())
    assert len(res["gbps"]) >= 7 and all(v > 0 for v in res["gbps"].values())
    assert res["vs_buffered_write"]["file, buffered 4 MiB writes, then fdatasync"] == 1.0
    assert "file, buffered 4 MiB writes over its cached pages, then fdatasync" in res["gbps"]
    # every row's CPU time, the tierkv children's included; writes through the page cache take system time
    assert sorted(res["cpu_seconds"]) == sorted(res["gbps"])
    assert all(c["user"]["median"] >= 0 and c["sys"]["median"] >= 0 for c in res["cpu_seconds"].values())
    assert res["cpu_seconds"]["file, buffered 4 MiB writes, then fdatasync"]["sys"]["median"] > 0
    writer = res["tierkv_writer"]
    assert writer["batches"]["median"] >= 1
    assert 0 < writer["commit_seconds"]["median"] <= writer["transaction_seconds"]["median"]
    # both versions stored the same session: random fp32 KV, every layer as it is
    assert len(res["compression_ratios"]) == 2 and all(0.99 < x < 1.01 for x in res["compression_ratios"].values())


@pytest.mark.parametrize("burst", [False, True])
def test_save_block_bench_runs(tmp_path, burst, bench):
    """bench/save_block.py times each save of two versions (here this checkout twice), in
    processes of their own, split into the host tier's growing and full phases; with the
    writer flushed before each save, or not (``--burst``)."""
    out = tmp_path / "save_block.json"
    bench("save_block", "--synthetic", "--tokens", "512", "--sessions", "3", "--host-sessions", "1", "--rounds", "1",
          "--a", ROOT, "--out", out, "--dir", tmp_path, *(["--burst"] if burst else []))
    res = json.loads(out.read_text())
    assert res["bytes_per_save"] == 512 * 30 * 2 * 3 * 64 * 4 and res["burst"] is burst
    for name in ("this version", f"version A ({ROOT})"):
        assert res["blocked_s"][name]["growing"]["n"] == 1 and res["blocked_s"][name]["full"]["n"] == 2
        for phase in ("growing", "full"):
            assert 0 < res["copy_s"][name][phase]["median"] <= res["blocked_s"][name][phase]["median"]
            assert res["beyond_copy_s"][name][phase]["min"] >= 0
            assert res["blocked_p90_s"][name][phase] <= res["blocked_s"][name][phase]["max"]
        (child,) = res["children"][name]
        assert child["host_pool"]["pinned"] is False
        if not burst:  # flushed before each save: the pool's thread had time to make places ready
            assert child["host_pool"]["taken"] > 0
        total = sum(x["blocked"] for p in ("growing", "full") for x in child["saves"][p])
        assert res["blocked_per_run_s"][name]["median"] == pytest.approx(total)
        assert res["backpressure_s"][name]["n"] == 1
        # the child's peak memory: more than the KV it saves
        assert res["max_rss_bytes"][name]["median"] == child["max_rss_bytes"] > res["bytes_per_save"]
    assert set(res["this_vs_a_per_round"]) == set(res["this_vs_a_copy_per_round"]) == {"growing", "full"}
    assert res["this_vs_a_per_run_total"]["n"] == 1
    assert res["this_vs_a_until_flushed"]["n"] == 1


def test_save_block_bench_in_another_models_layout(tmp_path, bench):
    """``--model`` saves random KV in a preset's layout (DeepSeek V4's: blocks of its restore
    step), with ``--codec`` and, in a burst, ``--gap`` seconds between saves; each run reports
    the time until its last flush returned and the writer's split."""
    out = tmp_path / "save_block.json"
    bench("save_block", "--model", "deepseek-v4-flash", "--dtype", "bf16", "--codec", "raw", "--tokens", "1024",
          "--sessions", "3", "--host-sessions", "1", "--burst", "--gap", "0.05", "--rounds", "1", "--out", out,
          "--dir", tmp_path)
    res = json.loads(out.read_text())
    assert res["kv"] == "deepseek-v4-flash-random-bf16" and res["codec"] == "raw" and res["gap_s"] == 0.05
    assert res["bytes_per_save"] == 1024 * 12_888                     # its bytes per token (tierkv calc)
    (child,) = res["children"]["this version"]
    assert child["ssd_writes"]["batches"] >= 1
    saves = [x["blocked"] for p in ("growing", "full") for x in child["saves"][p]]
    assert len(saves) == 3 and child["until_flushed_s"] > sum(saves) + 2 * 0.05
    assert res["until_flushed_s"]["this version"]["median"] == child["until_flushed_s"]


def test_save_block_bench_compares_block_sizes(tmp_path, bench):
    """``--a-block-tokens`` without ``--a``: version A is this version with blocks of another
    size, side by side with ``--block-tokens``; each child's host tier ends holding its last
    session in blocks of its own size."""
    out = tmp_path / "save_block.json"
    bench("save_block", "--model", "smollm2-135m", "--dtype", "bf16", "--codec", "raw", "--tokens", "256",
          "--sessions", "2", "--host-sessions", "1", "--block-tokens", "32", "--a-block-tokens", "64", "--rounds", "1",
          "--out", out, "--dir", tmp_path)
    res = json.loads(out.read_text())
    a = "version A (this version, 64-token blocks)"
    assert res["block_tokens"] == {"this version": 32, a: 64}
    assert res["children"]["this version"][0]["resident_blocks"]["host"] == 256 // 32
    assert res["children"][a][0]["resident_blocks"]["host"] == 256 // 64
    assert res["this_vs_a_per_run_total"]["median"] > 0

def test_setup_frozen_keeps_setup_out_of_collections_until_its_block_ends(monkeypatch):
    """bench/common.py's setup_frozen(): what was alive when the block began is frozen (left out
    of every collection inside it), what the block makes is not; an inner block leaves the
    unfreezing to the outer one; and the end of the block unfreezes, also when it raises."""
    import gc

    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "bench"), *sys.path])
    import common

    assert gc.get_freeze_count() == 0
    setup = [object()]
    with common.setup_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        made = [[] for _ in range(1000)]     # tracked containers made inside the block
        assert gc.get_freeze_count() == frozen
        with common.setup_frozen():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen   # still frozen: the outer block has not ended
        common.collected()
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), common.setup_frozen():
        raise RuntimeError
    assert gc.get_freeze_count() == 0 and setup and made


def test_machine_records_the_cpu_model_and_its_kernel_features(tmp_path, monkeypatch):
    """bench/common.py's cpu_model(): the first model name and which of the features that pick
    torch's kernels the flags list, from a cpuinfo file; nothing where there is no such file."""
    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "bench"), *sys.path])
    import common

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu amx_tile\n")
    assert common.cpu_model(str(info)) == ("AMD EPYC 9R14", ["avx2", "avx512f", "avx512_bf16"])
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2\n")
    assert common.cpu_model(str(info)) == (None, ["avx2"])
    assert common.cpu_model(str(tmp_path / "missing")) == (None, [])
    m = common.machine()
    assert set(m) >= {"cpu_model", "cpu_features", "cores"} and isinstance(m["cpu_features"], list)


def test_ring_read_delivers_every_chunk_in_order_and_checks_it(tmp_path):
    """The O_DIRECT read ring of bench/common.py (compressed_ceiling.py's and direct_ceiling.py's
    bounce rows): each chunk is handed over in order with its index, also when it ends mid-page
    and when requests are smaller than a chunk, and a chunk whose CRC32C does not match stops the
    run."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import common
    import compressed_ceiling as cc

    rng = np.random.default_rng(3)
    block = 3 * cc.PAGE + 100                       # chunks that end mid-page, as compressed ones do
    chunks = [rng.integers(0, 256, block, dtype=np.uint8).tobytes() for _ in range(5)]
    path = str(tmp_path / "chunks.bin")
    index = cc.write_compressed(path, chunks, sessions=3)
    result = bytearray(len(index) * block)

    def copy(i, chunk):
        result[i * block:(i + 1) * block] = chunk

    try:
        common.ring_read(path, index, copy, cc.HUGE_PAGE, request=2 * cc.PAGE)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("O_DIRECT refused by this file system")
        raise
    assert bytes(result) == b"".join(chunks * 3)
    bad = list(index)
    bad[7] = (bad[7][0], bad[7][1], bad[7][2] ^ 1)
    with pytest.raises(SystemExit, match="chunk 7: checksum mismatch"):
        common.ring_read(path, bad, copy, cc.HUGE_PAGE)


def test_timeline_counts_time_with_no_read_in_flight():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import reload_timeline as tl

    reads = [(1, 1.0, 2.0), (2, 1.5, 3.0), (1, 4.0, 5.0)]   # (thread, start, end)
    assert tl.no_read_in_flight(reads, 0.0, 6.0) == pytest.approx(1.0 + 1.0 + 1.0)
    assert tl.between_reads(reads) == pytest.approx(2.0)   # thread 1: 2.0 -> 4.0
    assert tl.first_read_after(reads, 1.2) == 1.5
    # sessions start at 0.5 and 3.5: the first one's reads end at 3.0, the second's at 5.0
    assert tl.after_last_read(reads, [0.5, 3.5], 6.0) == pytest.approx((3.5 - 3.0) + (6.0 - 5.0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tierkv's pread reader is Linux-only")
def test_read_patterns_check_what_they_read(tmp_path):
    """The reload bench's bare read pattern verifies each stored layer: a value read from the wrong
    place fails the run instead of being timed as if it were KV."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import read_patterns
    import torch

    import tierkv

    spec = tierkv.KVSpec.gqa("t", 4, 2, 16, torch.float32)
    kv = [(torch.randn(2, 512, 16), torch.randn(2, 512, 16)) for _ in range(4)]
    settings = dict(device_bytes=0, host_bytes=1 << 28, ssd_bytes=1 << 30)
    with tierkv.TierKV(str(tmp_path), spec, persist="write_through", **settings) as s:
        s.save(list(range(512)), kv, session="s0")
        s.flush()
    layout = read_patterns.value_layout(str(tmp_path), spec, ["s0"], **settings)
    data = str(tmp_path / "data.mdb")
    read_patterns.layer_major(data, layout)
    read_patterns.whole_values(data, layout)
    layout[0][0].offset += 4096
    with pytest.raises(OSError, match="checksum"):
        read_patterns.layer_major(data, layout)


@pytest.mark.parametrize("model,layers,tensors,block_tokens", [
    ("kimi-k2.5", 61, [("latent", (576,), 0)], 256),   # MLA: one latent per token, tokens first
    ("qwen3-8b", 36, [("key", (8, 128), 1), ("value", (8, 128), 1)], 256),
    ("deepseek-v4-flash", 43, None, 1024)])             # V4: its restore step
def test_reload_bench_model_layouts(model, layers, tensors, block_tokens, capsys):
    """``bench/reload.py --model``: a preset's layout, random KV in it, and the raw LMDB
    baseline's value of a block holding the same bytes as tierkv's own payload of that block."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import reload

    from tierkv.blocks import pack_block

    spec, bt = reload.model_spec(model, "bf16")
    assert (spec.num_layers, bt) == (layers, block_tokens)
    if tensors is not None:
        assert all([(t.name, t.dims, t.seq_axis) for t in layer.tensors] == tensors for layer in spec.layers)
    kv = reload.random_kv(spec, 2 * bt)
    spec.check_kv(kv, 2 * bt)
    payload = torch.empty(bt * spec.bytes_per_token, dtype=torch.uint8)
    pack_block(spec, kv, bt, bt, payload)
    assert reload.block_bytes(spec, kv, bt, bt) == payload.numpy().tobytes()
    with pytest.raises(SystemExit) as stopped:
        reload.main(["--model", "no-such-model"])
    assert stopped.value.code == 2 and "unknown model 'no-such-model'; known: deepseek-v3.2" in capsys.readouterr().err


def test_reload_bench_state_model_layout(tmp_path):
    """``bench/reload.py --model config.json`` of a Mamba hybrid (transformers' default Bamba
    config, attention at layers 9, 18 and 27): its layout as tierkv stores it, states at restore
    points, in blocks of its restore step (2,048 tokens), which its store's blocks must divide."""
    pytest.importorskip("transformers")
    from transformers import BambaConfig

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import reload

    path = tmp_path / "config.json"
    path.write_text(json.dumps(BambaConfig(attn_layer_indices=[9, 18, 27]).to_dict()))
    spec, bt = reload.model_spec(str(path), "bf16")
    assert (spec.num_layers, bt, spec.bytes_per_token) == (32, 2048, 132_232)
    assert [t.name for t in spec.layers[0].tensors] == ["conv_state", "recurrent_state"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is not available here")
@pytest.mark.parametrize("threads,huge", [(1, False), (3, False), (4, False), (1, True), (2, True)])
def test_odirect_read_covers_the_file(tmp_path, threads, huge):
    """The disk-limit rows read every chunk of the file once, with one request or several in
    flight, into 4 KiB pages or huge pages, including a last chunk shorter than the others."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import reload

    path = tmp_path / "raw.bin"
    path.write_bytes(os.urandom(10 * 64 * 1024 + 8192))
    try:
        assert reload.odirect_read(str(path), chunk=64 * 1024, threads=threads, huge=huge) == path.stat().st_size
    except OSError as e:  # a file system without O_DIRECT (tmpfs): nothing to measure there
        if e.errno != errno.EINVAL:
            raise
        pytest.skip("O_DIRECT refused by this file system")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is not available here")
def test_odirect_read_into_a_whole_destination_puts_every_byte_in_its_place(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import numpy as np
    import reload

    path = tmp_path / "raw.bin"
    data = os.urandom(10 * 64 * 1024 + 8192)
    path.write_bytes(data)
    m, dest = reload.huge_page_buffer(len(data) + 64 * 1024)
    try:
        assert reload.odirect_read(str(path), chunk=64 * 1024, into=dest) == len(data)
        assert np.frombuffer(dest, np.uint8)[:len(data)].tobytes() == data
    except OSError as e:  # a file system without O_DIRECT (tmpfs): nothing to measure there
        if e.errno != errno.EINVAL:
            raise
        pytest.skip("O_DIRECT refused by this file system")
    finally:
        dest.release()
        m.close()


def test_huge_page_buffer_is_aligned_for_huge_pages():
    """The huge-page baseline's buffer starts on a 2 MiB boundary (else the kernel cannot back
    it with huge pages) and is exactly as long as asked."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import ctypes

    import reload

    m, view = reload.huge_page_buffer(3 << 20)
    try:
        assert len(view) == 3 << 20
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        assert addr % (2 << 20) == 0
        view[-1] = 7  # writable, to its last byte
    finally:
        view.release()
        m.close()


def test_reload_runs_tables_match_the_runs_own_ratios(capsys):
    """The tables and tallies in docs/benchmarks.md come from bench/reload_runs.py: every kept
    reload run is in them, and each ratio it computes agrees with the one the run itself stored."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import glob

    import reload_runs

    results = os.path.join(ROOT, "bench", "results")
    report = reload_runs.main(["--results", results])
    listed = {f for config in report["configs"].values() for f in config["runs"]}
    kept = {os.path.basename(p) for p in glob.glob(os.path.join(results, "reload*.json"))}
    assert listed == kept
    out = capsys.readouterr().out
    checked = 0
    for run in reload_runs.load_runs(results):
        assert f"(`{run['file']}`)" in out
        with open(os.path.join(results, run["file"])) as f:
            stored = json.load(f).get("ratios", {})
        for name, target in (("tierkv_cold_vs_odirect", "vs O_DIRECT"), ("tierkv_cold_vs_torch_load", "vs torch.load"),
                             ("tierkv_cold_vs_raw_lmdb", "vs raw LMDB")):
            if name in stored:
                assert reload_runs.ratio(run, target) == pytest.approx(stored[name], rel=1e-9)
                checked += 1
    assert checked > 0
    # the targets table of docs/benchmarks.md quotes the table at a glance as it is printed:
    # a run added to bench/results/ without it fails here
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        doc = f.read().splitlines()
    glance = report["glance"]
    assert len(glance) > 2 and glance[0] in out
    start = doc.index(glance[0])
    assert doc[start:start + len(glance)] == glance
    assert doc[start + len(glance)].strip() == ""  # no row the script no longer prints
    # a tally counts the runs at or above the target's ratio, and only runs that measured it
    fp32 = report["configs"]["fp32"]["tallies"]["vs O_DIRECT"]
    assert 0 <= fp32["met"] <= fp32["runs"] <= len(report["configs"]["fp32"]["runs"])
    # runs that name their CPU are listed under it, and no run twice
    for config in report["configs"].values():
        labels = [label for labels in config["cpus"].values() for label in labels]
        assert len(labels) == len(set(labels)) <= len(config["runs"])
    assert "76" in report["configs"]["fp32"]["cpus"].get(("AMD EPYC", ("avx2", "avx512f", "avx512_bf16")), [])
    # so does the table of the bypassing restores' requests, and it names run 81, whose bounce
    # buffers were not on huge pages (session 73)
    bypass = report["bypass_requests"]
    start = doc.index(bypass[0])
    assert doc[start:start + len(bypass)] == bypass and doc[start + len(bypass)].strip() == ""
    assert any(line.startswith("| fp32 | fresh tensors |") and "81 (1186)" in line for line in bypass)


def test_demo_block_sizes_script(tmp_path):
    """bench/demo_block_sizes.sh: ``tierkv demo --json`` per block size, alternating, each on a
    fresh store, one JSON object per run; the demo's own options pass through after ``--``."""
    r = subprocess.run(["bash", "bench/demo_block_sizes.sh", str(tmp_path / "out"), "1", "64", "128", "--",
                        "--context-tokens", "200", "--answer-tokens", "2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["demo_128_run1.json", "demo_64_run1.json"]
    for bt in (64, 128):
        res = json.loads((tmp_path / "out" / f"demo_{bt}_run1.json").read_text())
        assert res["tokens_identical"] is True and res["restored_from"] == "ssd"
        assert res["context_tokens"] >= 200
    assert r.stdout.count("tokens identical True") == 2
