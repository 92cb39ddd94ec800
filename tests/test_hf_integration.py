"""transformers integration on the real SmolLM2 model and a second, random-weight architecture.

Bit-exact means: continuing from the restored cache gives the same tokens and bit-identical
logits as continuing from the original in-memory cache.
"""

import copy
import json
import os
import subprocess
import sys
import sysconfig
import warnings
from typing import Any

import lmdb
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import tierkv.keys  # noqa: E402
from tierkv import ConfigError, ForeignStoreError, KVSpec, SpecMismatchError, TierKV  # noqa: E402
from tierkv.integrations.hf import (GROUPED_ATTENTION, SessionRunner, adapter_tenant, cache_len, cache_to_kv,  # noqa: E402
                                    greedy_decode, kv_to_cache, load_smollm2, prefill, restore_cache,
                                    restore_step, session_cache, spec_for_config, spec_for_model, use_grouped_attention)
from tierkv.integrations.hf import SlidingHistoryLayer, save_cache  # noqa: E402
from tierkv.kvmath import Geometry  # noqa: E402
from transformers import DynamicCache  # noqa: E402

pytestmark = pytest.mark.model
STEPS = 32


@pytest.fixture(scope="session")
def smol():
    torch.manual_seed(0)
    model, tok, spec = load_smollm2()
    return model, tok, spec


def stdlib_tokens(tok, n, name="functools.py"):
    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as f:
        return tok.encode(f.read(), add_special_tokens=False)[:n]


def continue_from(model, kv, new_tokens, steps=STEPS):
    cache = kv_to_cache([(k.clone(), v.clone()) for k, v in kv], model.config)
    logits, cache = prefill(model, new_tokens, cache)
    toks, logits, _ = greedy_decode(model, logits, cache, steps)
    return toks, torch.stack(logits)


def assert_same_continuation(a, b):
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1]), float((a[1] - b[1]).abs().max())


def test_spec_matches_the_real_cache(smol):
    model, tok, spec = smol
    assert spec.bytes_per_token == 46_080 and spec.num_layers == 30  # fp32: 30 * 2 * 3 * 64 * 4
    _, cache = prefill(model, stdlib_tokens(tok, 40))
    spec.check_kv(cache_to_kv(cache), 40)


def test_restore_in_fresh_handle_and_subprocess_is_bit_exact(smol, tmp_path):
    model, tok, spec = smol
    ctx = stdlib_tokens(tok, 700)
    new = tok.encode("\n# Question: what does lru_cache do?\n", add_special_tokens=False)
    _, cache = prefill(model, ctx)
    original = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
    reference = continue_from(model, original, new)
    store = str(tmp_path / "store")
    with TierKV(store, spec) as kv:
        kv.save(ctx, original, session="agent")
    with TierKV(store, spec) as kv:  # a fresh handle: everything comes from SSD
        r = kv.restore(ctx, session="agent")
        assert r.num_tokens == len(ctx) and r.sources == {"ssd": 3}
        assert_same_continuation(continue_from(model, r.kv, new), reference)
        # the layer-by-layer path that SessionRunner uses
        cache2, handle = restore_cache(kv, ctx, model.config, session="agent")
        logits, cache2 = prefill(model, new, cache2)
        toks, lg, _ = greedy_decode(model, logits, cache2, STEPS)
        assert_same_continuation((toks, torch.stack(lg)), reference)
    # and in a fresh process
    ref_file = tmp_path / "ref.pt"
    torch.save({"tokens": torch.tensor(reference[0]), "logits": reference[1]}, ref_file)
    code = f"""
import torch, json
from tierkv import TierKV
from tierkv.integrations.hf import load_smollm2, kv_to_cache, prefill, greedy_decode
model, tok, spec = load_smollm2()
ref = torch.load({str(ref_file)!r}, weights_only=True)
with TierKV({store!r}, spec) as kv:
    r = kv.restore({ctx!r}, session="agent")
logits, cache = prefill(model, {new!r}, kv_to_cache(r.kv, model.config))
toks, lg, _ = greedy_decode(model, logits, cache, {STEPS})
print(json.dumps({{"n": r.num_tokens, "tokens": toks == ref["tokens"].tolist(),
                   "logits": bool(torch.equal(torch.stack(lg), ref["logits"]))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"n": len(ctx), "tokens": True, "logits": True}


def test_shared_prefix_two_sessions(smol, tmp_path):
    model, tok, spec = smol
    prefix = stdlib_tokens(tok, 600, "contextlib.py")
    sfx_a = tok.encode("\n# Explain ExitStack.", add_special_tokens=False)
    sfx_b = tok.encode("\n# Explain suppress and redirect_stdout briefly.", add_special_tokens=False)
    refs, kvs = {}, {}
    for name, sfx in (("a", sfx_a), ("b", sfx_b)):
        _, cache = prefill(model, prefix + sfx)
        kvs[name] = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
        refs[name] = continue_from(model, kvs[name], [13])
    store = str(tmp_path / "store")
    with TierKV(store, spec, block_tokens=128) as kv:
        kv.save(prefix + sfx_a, kvs["a"], session="a")
        kv.save(prefix + sfx_b, kvs["b"], session="b")
        kv.flush()
        shared_blocks = len(prefix) // 128
        assert kv.stats()["resident_blocks"]["device"] == 2 * (len(prefix + sfx_a) // 128 + 1) - shared_blocks
    with TierKV(store, spec, block_tokens=128) as kv:
        for name, sfx in (("a", sfx_a), ("b", sfx_b)):
            r = kv.restore(prefix + sfx, session=name)
            assert r.num_tokens == len(prefix + sfx)
            assert_same_continuation(continue_from(model, r.kv, [13]), refs[name])
        kv.drop_session("a")
        r = kv.restore(prefix + sfx_b, session="b")
        assert_same_continuation(continue_from(model, r.kv, [13]), refs["b"])


def test_session_runner_turns(smol, tmp_path):
    model, tok, spec = smol
    with TierKV(str(tmp_path / "store"), spec) as kv:
        runner = SessionRunner(kv, model)
        turn1 = stdlib_tokens(tok, 300)
        t1 = runner.turn("s", turn1, max_new_tokens=8)
        assert t1.restored_tokens == 0 and t1.prefilled_tokens == len(turn1)
        turn2 = turn1 + t1.tokens + tok.encode(" And then?", add_special_tokens=False)
        t2 = runner.turn("s", turn2, max_new_tokens=8)
        assert t2.restored_tokens == len(turn1) + len(t1.tokens) - 1
        # same as running turn 2 from scratch (fp32 on one machine: identical tokens)
        logits, cache = prefill(model, turn2)
        toks, _, _ = greedy_decode(model, logits, cache, 8)
        assert toks == t2.tokens


def test_session_runner_refuses_a_bad_turn_and_keeps_the_session(smol, tmp_path):
    """Token ids outside the vocabulary (the embedding's IndexError, mid-turn, before) and a
    turn that asks for no new tokens are refused up front; the session is untouched."""
    model, tok, spec = smol
    with TierKV(str(tmp_path / "store"), spec) as kv:
        runner = SessionRunner(kv, model)
        turn1 = stdlib_tokens(tok, 100)
        t1 = runner.turn("s", turn1, max_new_tokens=4)
        before = kv.session_info("s")["tokens"]
        for bad in ([model.config.vocab_size], [-1], [1.5], ["a"], [True]):
            with pytest.raises(SpecMismatchError, match="vocabulary"):
                runner.turn("s", turn1 + bad, max_new_tokens=4)
        for n in (0, -3, True, 2.0):
            with pytest.raises(ConfigError, match="max_new_tokens"):
                runner.turn("s", turn1, max_new_tokens=n)
        assert kv.session_info("s")["tokens"] == before
        more = turn1 + t1.tokens + tok.encode(" Why?", add_special_tokens=False)
        # numpy and torch ids are ids too
        assert runner.turn("s", np.array(more), max_new_tokens=4).restored_tokens == before
        assert runner.turn("s", torch.tensor(more), max_new_tokens=4).restored_tokens == len(more) - 1
    # a store of another layout or dtype is refused when the runner is made, not mid-turn
    for i, other in enumerate((KVSpec.from_hf_config(model.config, torch.bfloat16, "m"),
                               KVSpec.gqa("m", 30, 3, 32, torch.float32), KVSpec.gqa("m", 29, 3, 64, torch.float32))):
        with TierKV(str(tmp_path / f"other{i}"), other) as kv:
            with pytest.raises(SpecMismatchError, match="open a store for it"):
                SessionRunner(kv, model)


def test_peft_adapters_keep_their_own_kv(smol, tmp_path):
    """PEFT adapters change a model's KV but not its config or its name, which its store's spec is
    made from. Each adapter state the model runs at a turn (which adapters, enabled or not, merged
    or not, their weights now) keys its KV apart: an adapted turn never restores the base model's
    KV nor another adapter's, nor its own adapter's from before its weights changed; a disabled
    adapter runs, and is served, as the base model. Every turn equals the same turn without tierkv."""
    peft = pytest.importorskip("peft")
    _, tok, spec = smol
    model, _, _ = load_smollm2()  # a copy of its own: PEFT injects its layers into the model in place
    tokens = stdlib_tokens(tok, 300)  # more than a block: prefixes are shared across sessions by whole blocks
    why = tok.encode(" Why?", add_special_tokens=False)

    def alone(m, toks):  # the same turn without tierkv
        logits, cache = prefill(m, toks)
        return greedy_decode(m, logits, cache, 2)[0]

    def lora():
        return peft.LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False)

    with TierKV(str(tmp_path / "store"), spec) as kv:
        runner = SessionRunner(kv, model)
        base = runner.turn("base", tokens, max_new_tokens=2)
        base_spec = spec_for_model(model)
        torch.manual_seed(1)
        adapted = peft.get_peft_model(model, lora())  # now also runs in the model the runner holds
        assert spec_for_model(adapted) == base_spec  # the store of its base model
        # adapter "default": the base model's KV for these tokens is not its own
        a = runner.turn("a", tokens, max_new_tokens=2)
        assert a.restored_tokens == 0 and a.tokens == alone(adapted, tokens)
        more = tokens + a.tokens + why
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = SessionRunner(kv, adapted).turn("a", more, max_new_tokens=2)  # a PeftModel runs the same tenant
        # its cache goes to the wrapped model under the name that model's forward takes (transformers
        # 5.24 deprecates past_key_values and drops it in 5.40)
        assert not [w for w in caught if "past_key_values" in str(w.message)]
        assert a.restored_tokens == len(tokens) + 1 and a.tokens == alone(adapted, more)
        with pytest.raises(ConfigError, match="other PEFT adapters"):
            runner.turn("base", tokens + base.tokens + why, max_new_tokens=2)  # a session keeps its adapters
        with adapted.disable_adapter():  # the base model, served the base model's KV
            b = runner.turn("base", tokens + base.tokens + why, max_new_tokens=2)
            assert b.restored_tokens == len(tokens) + 1 and b.tokens == alone(model, tokens + base.tokens + why)
        torch.manual_seed(2)
        adapted.add_adapter("b", lora())
        adapted.set_adapter("b")
        b = runner.turn("b", more, max_new_tokens=2)
        assert b.restored_tokens == 0 and b.tokens == alone(adapted, more)
        adapted.set_adapter("default")
        even_more = more + a.tokens + why
        a = runner.turn("a", even_more, max_new_tokens=2)
        assert a.restored_tokens == len(more) + 1 and a.tokens == alone(adapted, even_more)
        assert runner.turn("a2", more, max_new_tokens=2).restored_tokens > 0  # its prefixes are shared
        adapted.merge_adapter()  # merged weights round differently: kept apart
        m = runner.turn("m", more, max_new_tokens=2)
        assert m.restored_tokens == 0 and m.tokens == alone(adapted, more)
        adapted.unmerge_adapter()
        # weights changed in place under the same name (trained, reloaded), through .data, which
        # no autograd version counter sees: the old KV is no longer this adapter's
        adapted.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight.data.mul_(2)
        a = runner.turn("a3", more, max_new_tokens=2)
        assert a.restored_tokens == 0 and a.tokens == alone(adapted, more)
        before = kv.session_info("a")
        prefix = peft.get_peft_model(load_smollm2()[0], peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=4))
        with pytest.raises(ConfigError, match="prompt-learning"):
            SessionRunner(kv, prefix)  # its virtual tokens are KV outside the session's cache
        assert kv.session_info("a") == before


def test_remembered_adapter_digests_follow_torch_version_counters(smol, tmp_path):
    """SessionRunner(rehash_adapters=False) hashes an adapter tensor again only when torch's
    version counter (or the tensor) changed: an in-place op still gives a new tenant, a write
    through .data does not (as documented). Turns run as with hashing every turn."""
    peft = pytest.importorskip("peft")
    _, tok, spec = smol
    torch.manual_seed(4)
    adapted = peft.get_peft_model(load_smollm2()[0], peft.LoraConfig(r=4, target_modules=["k_proj", "v_proj"],
                                                                      init_lora_weights=False))
    memo: dict = {}
    first = adapter_tenant(adapted, memo)
    assert memo and adapter_tenant(adapted, memo) == first == adapter_tenant(adapted)
    weight = adapted.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step, a load_state_dict: the version counter moves
    second = adapter_tenant(adapted, memo)
    assert second != first and second == adapter_tenant(adapted)
    weight.data.mul_(2)  # no version counter sees this: only hashing every turn does
    assert adapter_tenant(adapted, memo) == second != adapter_tenant(adapted)
    tokens = stdlib_tokens(tok, 100)
    with TierKV(str(tmp_path / "store"), spec) as kv:
        runner = SessionRunner(kv, adapted, rehash_adapters=False)
        t = runner.turn("s", tokens, max_new_tokens=2)
        more = tokens + t.tokens + tok.encode(" Why?", add_special_tokens=False)
        assert runner.turn("s", more, max_new_tokens=2).restored_tokens == len(tokens) + 1


RESTARTED_ADAPTER = """
import json, sys
import peft
from tierkv import TierKV
from tierkv.integrations.hf import SessionRunner, load_smollm2
where, tokens = sys.argv[1], json.loads(sys.argv[2])
model, _, spec = load_smollm2()
adapted = peft.PeftModel.from_pretrained(model, where + "/adapter")
with TierKV(where + "/store", spec) as kv:
    t = SessionRunner(kv, adapted).turn("a", tokens, max_new_tokens=2)
print(json.dumps({"order": list(adapted.peft_config["default"].to_dict()["target_modules"]),
                  "restored": t.restored_tokens, "tokens": t.tokens}))
"""


def test_peft_adapter_sessions_survive_a_restart(smol, tmp_path):
    """A server restarts and loads its adapter from disk (PeftModel.from_pretrained, so in
    inference mode, and under another string hash seed, which orders the config's target_modules
    set differently): the adapter keys the same tenant as the process that trained it, so its
    session is restored, and the turn equals the same turn without tierkv."""
    peft = pytest.importorskip("peft")
    _, tok, spec = smol
    model, _, _ = load_smollm2()
    torch.manual_seed(3)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["k_proj", "v_proj"],
                                                          init_lora_weights=False))
    adapted.save_pretrained(str(tmp_path / "adapter"))
    conf = tmp_path / "adapter" / "adapter_config.json"  # the set saved in one order, whatever this seed gave
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "target_modules": ["k_proj", "v_proj"]}))
    tokens = stdlib_tokens(tok, 120, "dataclasses.py")
    with TierKV(str(tmp_path / "store"), spec) as kv:
        first = SessionRunner(kv, adapted).turn("a", tokens, max_new_tokens=2)
    more = tokens + first.tokens + tok.encode(" Why?", add_special_tokens=False)
    logits, cache = prefill(adapted, more)
    alone = greedy_decode(adapted, logits, cache, 2)[0]
    runs = []
    for seed in ("0", "2"):
        out = subprocess.run([sys.executable, "-c", RESTARTED_ADAPTER, str(tmp_path), json.dumps(more)],
                             env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["order"] != runs[1]["order"]  # these two seeds do order the set apart (CPython 3.11+)
    assert runs[0]["restored"] == len(tokens) + 1 and runs[1]["restored"] == len(more) - 1
    assert runs[0]["tokens"] == runs[1]["tokens"] == alone


def test_config_overrides_get_a_store_of_their_own(smol, tmp_path):
    """A model loaded with a config override that changes its KV (here RoPE's base frequency, as
    a long-context override changes RoPE) gets a spec of its own: its base model's store refuses to
    open for it (ForeignStoreError), instead of serving keys rotated the other way, and keeps what
    it holds. Two loads of one model get one spec."""
    from transformers import AutoModelForCausalLM

    model, tok, _ = smol
    spec = spec_for_model(model)
    assert spec_for_model(load_smollm2()[0]) == spec
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": cfg.rope_parameters["rope_theta"] / 10}
    longer = AutoModelForCausalLM.from_pretrained(model.name_or_path, config=cfg, dtype=torch.float32)
    tokens = stdlib_tokens(tok, 64)
    keys = [cache_to_kv(prefill(m, tokens)[1])[0][0] for m in (model, longer)]
    assert not torch.equal(*keys)  # the same weights and tokens, other keys from the first layer on
    other = spec_for_model(longer)
    assert other.fingerprint() != spec.fingerprint() and other.model_id == spec.model_id
    # the config alone, before any weights load, names the same stores (not in another dtype)
    assert spec_for_config(model.config, torch.float32) == spec and spec_for_config(cfg, "float32") == other
    assert spec_for_config(model.config, torch.bfloat16).fingerprint() != spec.fingerprint()
    with TierKV(str(tmp_path / "store"), spec) as kv:
        SessionRunner(kv, model).turn("s", tokens, max_new_tokens=2)
    with pytest.raises(ForeignStoreError, match="another model"):
        TierKV(str(tmp_path / "store"), other)
    with TierKV(str(tmp_path / "store"), spec) as kv:
        assert kv.session_info("s")["tokens"] == len(tokens) + 1


def test_session_runner_reuses_its_pool_and_stays_exact(smol, tmp_path):
    """reserve() sizes the restore buffers once; later turns restore into the same (dirty)
    memory and still equal a from-scratch run."""
    model, tok, spec = smol
    with TierKV(str(tmp_path / "store"), spec, device_bytes=0, host_bytes=0) as kv:
        runner = SessionRunner(kv, model)
        runner.reserve(600)
        ptrs = {k: b.data_ptr() for k, b in runner.pool._bufs.items()}
        assert len(ptrs) == 2 * spec.num_layers
        tokens = stdlib_tokens(tok, 250, "dataclasses.py")
        for question in (" Why?", " And then?", " Summarise."):
            t = runner.turn("p", tokens, max_new_tokens=6)
            logits, cache = prefill(model, tokens)
            assert greedy_decode(model, logits, cache, 6)[0] == t.tokens
            tokens = tokens + t.tokens + tok.encode(question, add_special_tokens=False)
        assert t.restored_tokens > 250
        assert {k: b.data_ptr() for k, b in runner.pool._bufs.items()} == ptrs


def test_grouped_attention_matches_sdpa():
    """use_grouped_attention changes the kernel, not the math: a prefill over a cache (masked)
    and a decode step agree with transformers' sdpa to float rounding."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    ctx, new = list(range(5, 405)), [7, 8, 9, 10, 11]
    _, cache = prefill(model, ctx)
    kv = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
    ref = continue_from(model, kv, new, steps=4)
    use_grouped_attention(model)
    assert model.config._attn_implementation == GROUPED_ATTENTION
    got = continue_from(model, kv, new, steps=4)
    assert got[0] == ref[0]
    assert torch.allclose(got[1], ref[1], atol=1e-4, rtol=1e-4)
    _, full = prefill(model, ctx)  # unmasked: handed to sdpa unchanged
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cache_to_kv(full), kv))


def test_second_architecture_qwen3_random_weights(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    spec = spec_for_model(model, model_id="test/qwen3-random")
    assert [t.dims for t in spec.layers[0].tensors] == [(2, 16), (2, 16)]
    ctx = list(range(5, 305))
    _, cache = prefill(model, ctx)
    original = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
    reference = continue_from(model, original, [7, 8, 9])
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        kv.save(ctx, original, session="q")
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        r = kv.restore(ctx, session="q")
        assert r.num_tokens == len(ctx)
        assert_same_continuation(continue_from(model, r.kv, [7, 8, 9]), reference)


def tiny_deepseek(config_class, **extra):
    """A DeepSeek-style model with random weights: MLA attention, a few experts, 3 layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config_class(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                       q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                       num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                       max_position_embeddings=1024, **extra)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def runner_turns_match_memory(model, spec, path, turns):
    """``turns`` runner turns of one session against the same turns continuing an in-memory
    cache without tierkv: tokens and logits equal to the bit. Returns the last turn, the
    context and the in-memory cache."""
    from transformers import DynamicCache

    ctx, cache = list(range(5, 205)), DynamicCache(config=model.config)  # transformers' own layers
    with TierKV(path, spec, block_tokens=64) as kv:
        runner = SessionRunner(kv, model)
        for _ in range(turns):
            t = runner.turn("s", ctx, max_new_tokens=4)
            logits, cache = prefill(model, ctx[cache_len(cache):], cache)
            toks, all_logits, cache = greedy_decode(model, logits, cache, 4)
            assert t.tokens == toks and all(torch.equal(a, b) for a, b in zip(t.logits, all_logits))
            ctx = ctx + t.tokens + [7, 8]
    return t, ctx, cache


def test_mla_model_random_weights(tmp_path):
    """An MLA model (DeepSeek V3's attention, random weights): transformers caches its compressed
    latent and its rotary key per layer, and spec_for_model describes exactly that, so a runner
    saves and restores it and each turn equals the same turn without tierkv, to the bit. Before
    session 52 spec_for_model gave tierkv's one-latent layout, and every save was refused."""
    from transformers import DeepseekV3Config

    model = tiny_deepseek(DeepseekV3Config)
    spec = spec_for_model(model, model_id="test/mla-random")
    assert [(t.name, t.dims) for t in spec.layers[0].tensors] == [("latent", (1, 32)), ("rope_key", (1, 8))]
    assert spec.bytes_per_token == KVSpec.from_hf_config(model.config, torch.float32, "m").bytes_per_token
    last, _, _ = runner_turns_match_memory(model, spec, str(tmp_path / "store"), 2)
    assert last.restored_tokens == 203


def test_dsa_model_random_weights(tmp_path):
    """A DSA model (DeepSeek V3.2's attention, random weights): each layer caches its MLA latent,
    its rotary key and its indexer's keys, which pick the tokens a query attends to. The spec
    has all three, and a runner restores all three: each turn equals the same turn without
    tierkv, to the bit. Before session 52 cache_to_kv dropped the indexer's keys."""
    from transformers import DeepseekV32Config

    # index_topk below the context: the indexer does choose
    model = tiny_deepseek(DeepseekV32Config, index_topk=16, index_head_dim=16, index_n_heads=2)
    spec = spec_for_model(model, model_id="test/dsa-random")
    assert [(t.name, t.dims) for t in spec.layers[0].tensors] == [
        ("latent", (1, 32)), ("rope_key", (1, 8)), ("indexer_key", (1, 16))]
    last, ctx, cache = runner_turns_match_memory(model, spec, str(tmp_path / "store"), 3)
    assert last.restored_tokens == 209
    # a restore without the runner, through kv_to_cache, holds the same three tensors
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        back = cache_to_kv(kv_to_cache(kv.restore(ctx[:209], session="s").kv, model.config))
    assert all(len(p) == 3 for p in back)
    assert all(torch.equal(x, y[:, :209]) for p, q in zip(back, cache_to_kv(cache)) for x, y in zip(p, q))


def test_gemma3_sliding_window_random_weights(tmp_path):
    """Gemma 3's attention (random weights): five sliding-window layers (16 tokens, a RoPE of
    their own) to one full-attention layer. Three runner turns equal the same turns on
    transformers' own cache, to the bit."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert cfg.layer_types.count("sliding_attention") == 5
    last, _, cache = runner_turns_match_memory(model, spec_for_model(model, model_id="test/gemma3-random"),
                                               str(tmp_path / "store"), 3)
    assert last.restored_tokens == 209 and type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"


def test_llama4_chunked_attention_random_weights(tmp_path):
    """Llama 4's chunked attention (random weights): three layers attend only within their
    16-token chunk (transformers caches them in its sliding-window layer, under another mask),
    one to everything. session_cache keeps every token of them as of sliding-window layers;
    three runner turns, each restoring a prefix that ends inside a chunk, equal the same turns on
    transformers' own cache, to the bit. Before session 54 a runner refused the model."""
    from transformers import AutoModelForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=16,
                           max_position_embeddings=1024, no_rope_layers=[1, 1, 1, 0], interleave_moe_layer_step=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert cfg.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert [type(layer).__name__ for layer in session_cache(cfg).layers] == ["SlidingHistoryLayer"] * 3 + ["DynamicLayer"]
    last, _, cache = runner_turns_match_memory(model, spec_for_model(model, model_id="test/llama4-random"),
                                               str(tmp_path / "store"), 3)
    assert last.restored_tokens == 209 and type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"


def test_caches_holding_more_than_keys_and_values_are_refused(tmp_path):
    """Cache layers that keep state besides their keys and values (and a DSA indexer's keys),
    which a save would drop and a restore would lack, are refused: a linear-attention state
    beside full attention, a DSA indexer with positions of its own, transformers' own DeepSeek V4
    layers (a session_cache's are saved), a convolution state. Before session 52 every
    non-sliding DynamicLayer subclass was saved as its keys and values."""
    from transformers.cache_utils import Cache, DynamicIndexedLayer, LinearAttentionAndFullAttentionLayer

    indexed = Cache(layers=[DynamicIndexedLayer()])
    indexed.update(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 8), 0)
    indexed.update_indexer(torch.zeros(1, 4, 8), 0)
    assert [len(p) for p in cache_to_kv(indexed)] == [3]
    indexed.layers[0].indexer_position_ids = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(SpecMismatchError, match="indexer positions"):
        cache_to_kv(indexed)
    hybrid = Cache(layers=[LinearAttentionAndFullAttentionLayer()])
    hybrid.update(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), 0)
    with pytest.raises(SpecMismatchError, match="LinearAttentionAndFullAttentionLayer"):
        cache_to_kv(hybrid)
    # DeepSeek V4's own layers (a sliding window of recent tokens plus compressor state); a
    # session_cache saves what its restore points need instead (test_deepseek_v4_*)
    v4 = tiny_deepseek_v4(["compressed_sparse_attention", "heavily_compressed_attention"])
    with pytest.raises(SpecMismatchError, match="DeepseekV4CSACache"):
        cache_to_kv(prefill(v4, list(range(1, 40)), DynamicCache(config=v4.config))[1])
    # a runner refuses a model it cannot save when it is made, not after a turn's work: ZAYA's
    # sliding-window layers run its CCA beside a window (hybrid_sliding), which tierkv does not
    # store (which tierkv calc refuses too); its full-attention ones are saved since session 67
    # (test_zaya_*). LFM2's convolution state was refused this way before session 64, Qwen3-Next's
    # gated delta nets before session 65, the Mamba hybrids (Bamba, Falcon-H1, ...) and Kimi
    # Linear before session 66, Bailing Hybrid and Mamba alone before session 67 (test_lfm2_*,
    # test_gated_delta_net_*, test_mamba_hybrid_*, test_kda_*)
    zaya = tiny_zaya(["hybrid", "hybrid_sliding"])
    with TierKV(str(tmp_path / "store"), KVSpec.gqa("m", 2, 1, 16, torch.float32)) as kv:
        with pytest.raises(ConfigError, match="side by side"):
            SessionRunner(kv, zaya)
    with pytest.raises(ConfigError, match="side by side"):
        Geometry.from_hf_config(zaya.config)


def tiny_zaya(layer_types: list[str], dtype: torch.dtype = torch.float32) -> Any:
    """ZAYA's architecture at toy size, random weights: CCA attention (4 query and 2 KV heads of
    16; conv kernels of 2 and 2) in every layer, over a sliding window of 24 in ``hybrid_sliding``
    layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("zaya", vocab_size=256, hidden_size=64, num_hidden_layers=len(layer_types),
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                               num_experts=4, router_hidden_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.2, layer_types=layer_types,
                               sliding_window=24 if "hybrid_sliding" in layer_types else None)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zaya_cca_sessions_restore_at_restore_points(tmp_path, dtype):
    """ZAYA's CCA attention keeps every token's keys and values, a conv state of its queries' and
    keys' projections and the last token's delayed value, in the model's dtype (refused before
    session 67): a ``ParallelStateLayer`` keeps the keys and values and both states at each
    restore point (every 64 tokens here), its delayed value stored as float32, exactly, and given
    back in the model's dtype. The runner turns of
    test_gated_delta_net_sessions_restore_at_restore_points, each equal to the same turn on
    transformers' own cache from the same point, tokens and logits to the bit; and the states kept
    at a restore point reached one decode step at a time are transformers' own there."""
    zaya = tiny_zaya(["hybrid"] * 3, dtype)
    cfg = zaya.config
    assert restore_step(cfg) == 64  # a conv state of 96 x 2 and a delayed value of 16 against 64 values per token
    spec = spec_for_model(zaya, model_id="test/zaya")
    dt = tierkv.spec.dtype_name(dtype)
    assert [[(t.name, t.dims, t.dtype) for t in layer.tensors] for layer in spec.layers] == [[
        ("key", (2, 16), dt), ("value", (2, 16), dt), ("conv_state", (1, 4), dt),
        ("recurrent_state", (1, 4), "float32")]] * 3
    ids = torch.randint(1, 256, (140,), generator=torch.Generator().manual_seed(3)).tolist()
    _, mine = prefill(zaya, ids[:120])
    _, ref = prefill(zaya, ids[:120], DynamicCache(config=cfg))
    mine, ref, at128 = decode_alike(zaya, ids[120:130], mine, ref, 128)
    back = kv_to_cache([[x[:, :128] for x in p] for p in cache_to_kv(mine)], cfg)
    assert_same_states(back, at128, range(3))
    assert back.layers[0].recurrent_states[0].dtype == dtype
    restore_point_turns(zaya, spec, str(tmp_path))


def damage_block(store: str, fingerprint: bytes, tokens: list[int], block_tokens: int, index: int) -> None:
    """Flip a byte near the end of the stored value of block ``index`` of ``tokens`` (no tenant),
    in the LMDB store at ``store``, closed: the block then fails its checksum."""
    seed = tierkv.keys.chain_seed(fingerprint, None)
    key = tierkv.keys.block_keys(seed, tierkv.keys.as_tokens(tokens), block_tokens, partial=False)[index]
    env = lmdb.open(store, subdir=True, max_dbs=8)
    with env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        value = bytearray(txn.get(key, db=blocks))
        value[-5] ^= 0x40
        txn.put(key, bytes(value), db=blocks)
    env.close()


def tiny_lfm(kind: str, dtype: torch.dtype = torch.float32) -> Any:
    """LFM2's architecture (or LFM2-MoE's, or LFM3's) at toy size, random weights: convolution
    layers and attention, interleaved (LFM3: kernel 7 and a sliding-window layer of 8 tokens)."""
    from transformers import AutoModelForCausalLM, Lfm2Config, Lfm2MoeConfig, Lfm3Config

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "full_attention"],
              max_position_embeddings=1024, initializer_range=0.2)
    if kind == "lfm3":
        kw.update(num_hidden_layers=6, head_dim=16, sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  layer_types=None)
    cfg = {"lfm2": Lfm2Config, "lfm3": Lfm3Config,
           "lfm2_moe": lambda **k: Lfm2MoeConfig(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                  num_dense_layers=1, **k)}[kind](**kw)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("kind,dtype", [("lfm2", torch.float32), ("lfm2", torch.bfloat16), ("lfm2_moe", torch.float32),
                                        ("lfm3", torch.float32)],
                         ids=["lfm2-fp32", "lfm2-bf16", "lfm2_moe-fp32", "lfm3-fp32"])
def test_lfm2_conv_layers_restore_at_any_token(tmp_path, kind, dtype):
    """LFM2's convolution layers keep a state, not keys and values: their last 3 tokens' inputs
    to the convolution (refused before session 64). A session_cache's conv layers keep every
    token's input, so a conv layer restores at any token like an attention layer. Three runner
    turns, the later ones restoring the whole previous turn from the store (the third from SSD,
    in a fresh handle); each equals the same turn on transformers' own cache continued from the
    previous turn, tokens and logits to the bit. Then a second session of its own, prefilled in
    two passes so that transformers' own cache exists at 37: restored at 37, inside a block, it
    continues as that cache does (its own tokens: see the comment there). Last, a damaged block:
    the turn restarts from the block before it. LFM2-MoE and LFM3 (kernel 7, with a
    sliding-window layer) the same."""
    lfm = tiny_lfm(kind, dtype)
    cfg = lfm.config
    spec = spec_for_model(lfm, model_id="test/lfm2")
    assert [len(layer.tensors) for layer in spec.layers] == [1 if k == "conv" else 2 for k in cfg.layer_types]
    assert spec.layers[0].tensors[0].name == "conv_input" and spec.layers[0].tensors[0].dims == (1, 64)
    # transformers' own cache keeps only the last inputs: refused, naming the cache that works
    with pytest.raises(SpecMismatchError, match="0 is a LinearAttentionLayer.*session_cache"):
        cache_to_kv(prefill(lfm, list(range(1, 20)), DynamicCache(config=cfg))[1])
    gen = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(1, 256, (n,), generator=gen).tolist()  # noqa: E731
    store, ctx = str(tmp_path / "store"), rand(50)
    own = DynamicCache(config=cfg)  # transformers' own cache, continued turn after turn

    def same_turn(t, tokens, start):
        nonlocal own
        logits, own = prefill(lfm, tokens[start:], own)
        toks, all_logits, own = greedy_decode(lfm, logits, own, 5)
        assert t.restored_tokens == start and t.tokens == toks
        assert all(torch.equal(a, b) for a, b in zip(t.logits, all_logits))

    start = 0
    with TierKV(store, spec, block_tokens=16) as kv:
        runner = SessionRunner(kv, lfm)
        runner.reserve(256)  # the restore buffers from its pool, conv layers' too
        for _ in range(2):
            t = runner.turn("s", ctx, max_new_tokens=5)
            same_turn(t, ctx, start)
            start = len(ctx) + 4  # the turn's tokens but the last were saved
            ctx = ctx + t.tokens + rand(9)
    with TierKV(store, spec, block_tokens=16) as kv:  # a fresh handle: from SSD
        t = SessionRunner(kv, lfm).turn("s", ctx, max_new_tokens=5)
        assert t.sources.get("ssd", 0) >= 1 and set(t.sources) == {"ssd"}
        same_turn(t, ctx, start)
        # the conv layers read only the blocks of their last inputs (the runner's needed_only)
        assert kv.stats()["skipped_block_layers"] >= 3
        # such a cache's unread rows are no KV: cache_to_kv refuses it, save_cache tells the store
        c, _ = restore_cache(kv, ctx, cfg, session="s", needed_only=True)
        with pytest.raises(SpecMismatchError, match="save_cache"):
            cache_to_kv(c)
        save_cache(kv, ctx, c, session="copy").wait()
        assert all(torch.equal(a, b) for p, q in zip(kv.restore(ctx, session="copy").kv, kv.restore(ctx, session="s").kv)
                   for a, b in zip(p, q))
        # the same through the engine's own restore: RestoredKV.known_from marks kv_to_cache's cache
        needed = getattr(c, "_tierkv_known_from")
        r = kv.restore(ctx, session="s", needed_from=needed)
        assert r.known_from == needed and kv.restore(ctx, session="s").known_from is None
        marked = kv_to_cache(r.kv, cfg, known_from=r.known_from)
        with pytest.raises(SpecMismatchError, match="save_cache"):
            cache_to_kv(marked)
        with pytest.raises(SpecMismatchError, match="one token index"):
            kv_to_cache(r.kv, cfg, known_from=needed[:-1])
        save_cache(kv, ctx, marked, session="copy2").wait()
        assert all(torch.equal(a, b) for p, q in zip(kv.restore(ctx, session="copy2").kv, kv.restore(ctx, session="s").kv)
                   for a, b in zip(p, q))
        assert kv.stats()["saves_cut_unknown"] == 0
    # a prefix inside another session: transformers' own cache at 37 exists after two passes.
    # Not ctx[:37]: its first two blocks would be s's, computed in a pass over 50 tokens. On
    # some CPUs (session 70's, an AMD EPYC with AVX-512) torch gives LFM2's rows in such a pass
    # other last bits than in a pass over 37, so only a pass of the same length is a reference.
    other = rand(37) + rand(12)
    _, own37 = prefill(lfm, other[:37], DynamicCache(config=cfg))
    with TierKV(store, spec, block_tokens=16) as kv:
        _, mine = prefill(lfm, other[:37])
        _, mine = prefill(lfm, other[37:], mine)
        kv.save(other, cache_to_kv(mine), session="o")  # a session of 49 tokens, whose first 37 ...
        r = kv.restore(other[:37], session="o")
    back = kv_to_cache(r.kv, cfg)
    assert cache_len(back) == 37 and [type(x).__name__ for x in back.layers][0] == "ConvHistoryLayer"
    a, b = prefill(lfm, other[37:], back), prefill(lfm, other[37:], own37)
    assert torch.equal(a[0], b[0])
    assert greedy_decode(lfm, a[0], a[1], 4)[0] == greedy_decode(lfm, b[0], b[1], 4)[0]
    # session s's second block (tokens 16..31) fails its checksum, in its last layer: the next
    # turn meets it mid-forward (a conv layer's state is read) and restarts from the first block,
    # never from wrong state; it equals that block's restored cache continued by hand. LFM3's
    # last layer is a conv layer, which reads only its last 7 tokens' blocks (needed_only): the
    # damage is never read, and the turn restores the whole prefix, equal to transformers' cache
    seen, nxt = ctx + t.tokens[:-1], ctx + t.tokens + rand(5)
    with TierKV(store, spec, block_tokens=16) as kv:
        first = kv.restore(seen[:16], session="s")
        fingerprint = kv.fingerprint
    damage_block(store, fingerprint, seen[:32], 16, 1)
    with TierKV(store, spec, block_tokens=16) as kv:
        t = SessionRunner(kv, lfm).turn("s", nxt, max_new_tokens=5)
        corrupt = kv.stats()["corrupt_blocks"]
    if cfg.layer_types[-1] == "conv":
        assert corrupt == 0
        same_turn(t, nxt, len(seen))
        return
    assert corrupt >= 1
    logits, cache = prefill(lfm, nxt[16:], kv_to_cache(first.kv, cfg))
    toks, all_logits, _ = greedy_decode(lfm, logits, cache, 5)
    assert t.restored_tokens == 16 and t.tokens == toks
    assert all(torch.equal(x, y) for x, y in zip(t.logits, all_logits))


def tiny_deepseek_v4(layer_types: list[str], dtype: torch.dtype = torch.float32) -> Any:
    """DeepSeek V4's architecture at toy size, random weights: a window of 8 tokens, CSA every 4
    tokens (with its indexer), HCA every 16."""
    from transformers import AutoModelForCausalLM, DeepseekV4Config

    torch.manual_seed(0)
    cfg = DeepseekV4Config(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                           n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, o_groups=2, o_lora_rank=16,
                           index_n_heads=2, index_head_dim=16, index_topk=4, num_nextn_predict_layers=0,
                           max_position_embeddings=1024, layer_types=layer_types,
                           compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def restore_point_turns(model: Any, spec: KVSpec, tmp: str, reserve: int | None = None, own: Any = None) -> None:
    """Runner turns of a model restored at restore points every 64 tokens (DeepSeek V4, gated
    delta nets), each equal to the same turn on transformers' own cache from the same point, tokens
    and logits to the bit: a store whose blocks are not a multiple of 64 refused; three turns, each
    restoring the last restore point of the turn before (the runner's pool ``reserve``d first,
    where given); in a fresh handle, a second session sharing 150 tokens, restored from SSD up to
    128; then a turn whose second block (tokens 128..255) fails its checksum: it asks for the
    restore point at 256, meets the damaged block mid-forward and restarts from the restore point
    before it (the first block), never from wrong state. ``own`` makes transformers' own cache
    for the model (default ``DynamicCache(config=...)``)."""
    cfg, step = model.config, restore_step(model.config)
    own = own or (lambda: DynamicCache(config=cfg))
    assert step == 64
    gen = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(1, 256, (n,), generator=gen).tolist()  # noqa: E731
    store, ctx, points = os.path.join(tmp, "store"), rand(128), {}

    def same_turn(t, tokens, start):
        # transformers' own cache from the state it had at ``start`` (a copy: V4 layers cannot crop),
        # through the same prefill
        logits, cache = prefill(model, tokens[start:], copy.deepcopy(points[start]) if start else own())
        points[len(tokens)] = copy.deepcopy(cache)
        toks, all_logits, cache = greedy_decode(model, logits, cache, 6)
        assert t.restored_tokens == start and t.tokens == toks
        assert all(torch.equal(a, b) for a, b in zip(t.logits, all_logits))

    with TierKV(os.path.join(tmp, "small"), spec, block_tokens=32) as small:
        with pytest.raises(ConfigError, match="multiple of 64"):
            SessionRunner(small, model)
    with TierKV(store, spec, block_tokens=2 * step) as kv:
        runner = SessionRunner(kv, model)
        if reserve:
            runner.reserve(reserve)
        for start in (0, 128, 192):  # the turn before saved 133 and 197 tokens
            t = runner.turn("s", ctx, max_new_tokens=6)
            same_turn(t, ctx, start)
            ctx = ctx + t.tokens + rand(58)
    with TierKV(store, spec, block_tokens=2 * step) as kv:
        other = ctx[:150] + rand(20)
        t = SessionRunner(kv, model).turn("other", other, max_new_tokens=6)
        assert t.sources == {"ssd": 1}
        same_turn(t, other, 128)
        fingerprint = kv.fingerprint
    damage_block(store, fingerprint, ctx[:256], 2 * step, 1)
    with TierKV(store, spec, block_tokens=2 * step) as kv:
        t = SessionRunner(kv, model).turn("s", ctx, max_new_tokens=6)
        assert kv.stats()["corrupt_blocks"] >= 1
        same_turn(t, ctx, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_v4_sessions_restore_at_restore_points(tmp_path, dtype):
    """DeepSeek V4's compressed attention (a window of recent keys, CSA with its indexer, HCA):
    refused before session 54. Its caches restore every ``restore_step`` tokens (64 here), from
    what is stored per token there: three runner turns (each restoring the last restore point
    of the previous turn's 5 answer tokens), then, in a fresh handle, a second session sharing
    150 tokens (restored from SSD up to 128), then a turn whose second block fails its checksum
    (restarted from the restore point before it), each equal the same turn on transformers' own
    cache from the same point, tokens and logits to the bit."""
    v4 = tiny_deepseek_v4(["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                           "compressed_sparse_attention"], dtype)
    assert restore_step(v4.config) == 64  # rates 4 and 16, eight windows of 7 keys
    restore_point_turns(v4, spec_for_model(v4, model_id="test/v4"), str(tmp_path))


def test_deepseek_v4_layers_round_trip():
    """What a V4 session_cache saves, kv_to_cache restores at a restore point and nowhere else,
    and saves back unchanged. Saved at 133 tokens, a cache holds the state of its 128-token
    restore point (window keys, entries, overlaps): restored there, it continues as transformers'
    own cache at 128 does, to the bit."""
    v4 = tiny_deepseek_v4(["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"])
    ids = torch.randint(1, 256, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    _, cache = prefill(v4, ids[:128])
    _, ref = prefill(v4, ids[:128], DynamicCache(config=v4.config))
    _, cache = prefill(v4, ids[128:133], cache)
    kv = cache_to_kv(cache)
    assert [[x.shape[:2] for x in p] for p in kv] == [[(1, 133)] * 4, [(1, 133)] * 2, [(1, 133)]]
    with pytest.raises(SpecMismatchError, match="multiple of 64"):
        kv_to_cache(kv, v4.config)
    point = [[x[:, :128] for x in p] for p in kv]
    back = kv_to_cache(point, v4.config)
    assert cache_len(back) == 128
    # saved again, a restored cache gives back what it was given
    assert all(torch.equal(a, b) for p, q in zip(cache_to_kv(back), point) for a, b in zip(p, q))
    assert torch.equal(prefill(v4, ids[128:], back)[0], prefill(v4, ids[128:], ref)[0])
    # a restore point inside one forward pass holds what that pass computed: the entries of
    # transformers' own cache after the same 150-token pass
    _, whole = prefill(v4, ids[:150])
    _, own = prefill(v4, ids[:150], DynamicCache(config=v4.config))
    inside = kv_to_cache([[x[:, :128] for x in p] for p in cache_to_kv(whole)], v4.config)
    for mine, theirs in zip(inside.layers[:2], own.layers[:2]):
        for name, entries in mine.compressed_kv.items():
            assert entries.shape[1] == 128 // mine.compress_rate
            assert torch.equal(entries, theirs.compressed_kv[name][:, :entries.shape[1]])


def test_deepseek_v4_sliding_layers_read_only_their_restore_point(tmp_path):
    """A V4 sliding-window layer stores only its window's keys at each restore point, spread over
    the ``step`` tokens before it: a needed_only restore reads only that block for it (since
    session 66; every row before), while its compressed layers read every entry. Restored at 192
    tokens in 64-token blocks, the sliding layer skips blocks 0 and 1, and the cache continues
    as one restored whole does, to the bit."""
    v4 = tiny_deepseek_v4(["compressed_sparse_attention", "sliding_attention", "heavily_compressed_attention"])
    ids = torch.randint(1, 256, (220,), generator=torch.Generator().manual_seed(4)).tolist()
    _, cache = prefill(v4, ids[:192])
    with TierKV(str(tmp_path / "store"), spec_for_model(v4), block_tokens=64) as kv:
        kv.save(ids[:192], cache_to_kv(cache), session="s").wait()
        kv.flush()
        outs = []
        for needed_only in (False, True):
            before = kv.stats()["skipped_block_layers"]
            c, h = restore_cache(kv, ids[:192], v4.config, session="s", needed_only=needed_only)
            outs.append(prefill(v4, ids[192:], c)[0])
            assert h.result().num_tokens == 192 and kv.stats()["skipped_block_layers"] - before == 2 * needed_only
        assert torch.equal(outs[0], outs[1])


def decode_alike(model: Any, ids: list[int], mine: Any, ref: Any, keep_at: int) -> tuple[Any, Any, Any]:
    """Decode ``ids`` one token a pass on both caches, each step's logits equal to the bit; returns
    both caches and a copy of ``ref`` as it was when it held ``keep_at`` tokens."""
    kept = None
    for x in ids:
        a, mine = prefill(model, [x], mine)
        b, ref = prefill(model, [x], ref)
        assert torch.equal(a, b)
        if cache_len(ref) == keep_at:
            kept = copy.deepcopy(ref)
    return mine, ref, kept


def assert_same_states(mine: Any, theirs: Any, layers: Any) -> None:
    """The conv and recurrent states of ``layers`` are the same in both caches, to the bit."""
    for i in layers:
        for name in ("conv_states", "recurrent_states"):
            assert torch.equal(getattr(mine.layers[i], name)[0], getattr(theirs.layers[i], name)[0]), (i, name)


def tiny_gdn(kind: str, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen3-Next's architecture (or Qwen3.5's, dense or MoE, or OLMo Hybrid's) at toy size, random
    weights: three gated delta net layers (kernel 4, 2 key and 4 value heads of 16) and an
    attention layer; LaRA Mini's: two gated delta nets, a sliding-window layer (24 tokens) and an
    attention layer, MoE."""
    from transformers import (AutoModelForCausalLM, LaraMiniConfig, OlmoHybridConfig, Qwen3_5MoeTextConfig,
                              Qwen3_5TextConfig, Qwen3NextConfig)

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=16, linear_value_head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
              layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    cfg = {"qwen3_next": lambda: Qwen3NextConfig(**kw, **moe), "qwen3_5": lambda: Qwen3_5TextConfig(**kw),
           "qwen3_5_moe": lambda: Qwen3_5MoeTextConfig(**kw, **moe),
           "olmo_hybrid": lambda: OlmoHybridConfig(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "lara_mini": lambda: LaraMiniConfig(
               **{**kw, "layer_types": ["linear_attention", "sliding_attention", "full_attention", "linear_attention"]},
               sliding_window=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)}[kind]()
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("kind,dtype", [("qwen3_next", torch.float32), ("qwen3_next", torch.bfloat16),
                                        ("qwen3_5", torch.float32), ("qwen3_5_moe", torch.float32),
                                        ("olmo_hybrid", torch.float32), ("lara_mini", torch.float32)],
                         ids=["qwen3_next-fp32", "qwen3_next-bf16", "qwen3_5-fp32", "qwen3_5_moe-fp32",
                              "olmo_hybrid-fp32", "lara_mini-fp32"])
def test_gated_delta_net_sessions_restore_at_restore_points(tmp_path, kind, dtype):
    """Qwen3-Next's and Qwen3.5's gated delta nets keep a conv state and a recurrent state, no
    per-token KV (refused before session 65; OLMo Hybrid's and LaRA Mini's, the same layer, before
    session 66; LaRA Mini's sliding-window layer restores beside them). A session_cache keeps both states at each restore
    point (every 64 tokens here), where prefill stops its passes, and restores there: three
    runner turns (each restoring the last restore point of the turn before), then, in a fresh
    handle, a second session sharing 150 tokens (restored from SSD up to 128), then a turn whose
    second block fails its checksum (restarted from the restore point before it), each equal to
    the same turn on transformers' own cache from the same point, tokens and logits to the bit."""
    qwen = tiny_gdn(kind, dtype)
    assert restore_step(qwen.config) == 64  # 896 elements of state per layer against 32 of keys and values per token
    spec = spec_for_model(qwen, model_id="test/gdn")
    names = [[(t.name, t.dims, t.dtype) for t in layer.tensors] for layer in spec.layers]
    dt = tierkv.spec.dtype_name(dtype)
    assert names[0] == [("conv_state", (1, 8), dt), ("recurrent_state", (1, 16), "float32")]  # 128 x 4, 4 x 16 x 16
    assert names[2] == [("key", (1, 16), dt), ("value", (1, 16), dt)]
    restore_point_turns(qwen, spec, str(tmp_path), reserve=256)


def test_gated_delta_net_layers_round_trip():
    """What a gated delta net session_cache saves, kv_to_cache restores at a restore point and
    nowhere else, and saves back unchanged. Saved at 150 tokens, a cache holds the states of its
    64- and 128-token restore points: restored at 128, it continues as transformers' own cache at
    128 does, to the bit, and the states it keeps at 192, reached one decode step at a time, are
    those of transformers' own cache there. A pass that runs past a restore point leaves it
    without a state: such a cache is refused at save, never stored with zeros there."""
    qwen = tiny_gdn("qwen3_next")
    cfg = qwen.config
    ids = torch.randint(1, 256, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    _, cache = prefill(qwen, ids[:150])
    _, ref = prefill(qwen, ids[:128], DynamicCache(config=cfg))
    kv = cache_to_kv(cache)
    assert [[tuple(x.shape) for x in p] for p in kv] == [[(1, 150, 8), (1, 150, 16)]] * 2 + [[(1, 150, 16)] * 2] + \
        [[(1, 150, 8), (1, 150, 16)]]
    with pytest.raises(SpecMismatchError, match="multiple of 64"):
        kv_to_cache(kv, cfg)
    point = [[x[:, :128] for x in p] for p in kv]
    back = kv_to_cache(point, cfg)
    assert cache_len(back) == 128 and type(back.layers[0]).__name__ == "StateSnapshotLayer"
    # saved again, a restored cache gives back what it was given
    assert all(torch.equal(a, b) for p, q in zip(cache_to_kv(back), point) for a, b in zip(p, q))
    back, ref, at192 = decode_alike(qwen, ids[128:200], back, ref, 192)
    assert_same_states(kv_to_cache([[x[:, :192] for x in p] for p in cache_to_kv(back)], cfg), at192, (0, 1, 3))
    # transformers' own cache keeps only the last state: refused, naming the cache that works
    with pytest.raises(SpecMismatchError, match="0 is a LinearAttentionLayer.*restore points"):
        cache_to_kv(ref)
    # restore points further apart, where the config says so (tierkv_restore_step): the states
    # spread over twice the tokens, restored at 128 and not at 64; a step that is not a multiple
    # of 64 is refused
    cfg.tierkv_restore_step = 128
    assert restore_step(cfg) == 128 and spec_for_model(qwen).layers[0].tensors[1].dims == (1, 8)
    _, wide = prefill(qwen, ids[:150])
    kv = cache_to_kv(wide)
    with pytest.raises(SpecMismatchError, match="multiple of 128"):
        kv_to_cache([[x[:, :64] for x in p] for p in kv], cfg)
    at128 = kv_to_cache([[x[:, :128] for x in p] for p in kv], cfg)
    _, ref_wide = prefill(qwen, ids[:128], DynamicCache(config=cfg))  # one pass to 128, as the session's
    assert torch.equal(prefill(qwen, ids[128:], at128)[0], prefill(qwen, ids[128:], ref_wide)[0])
    cfg.tierkv_restore_step = 96
    with pytest.raises(ConfigError, match="multiple of 64"):
        restore_step(cfg)
    del cfg.tierkv_restore_step
    # one pass of 150 tokens runs past 64 and 128 without seeing the states there
    run_past = session_cache(cfg)
    with torch.inference_mode():
        qwen(input_ids=torch.tensor([ids[:150]]), cache=run_past, use_cache=True)
    with pytest.raises(SpecMismatchError, match="past restore point 64"):
        cache_to_kv(run_past)


def tiny_mamba(kind: str, dtype: torch.dtype = torch.float32) -> Any:
    """A Mamba hybrid at toy size, random weights: Bamba's, Granite 4.0-H's or Nemotron-H's
    architecture (Mamba-2 layers: 8 heads of 16, state 8, kernel 4) or Jamba's (Mamba-1: inner dim
    128, state 8): two Mamba layers, an attention layer, one more Mamba layer (Nemotron-H: with an
    MLP layer and a MoE layer between them, which keep no cache); or Falcon-H1's, four layers each
    running attention and Mamba-2 side by side; or Zamba2's, whose third layer runs its shared
    attention block (heads of 32) beside Mamba-2; or Zamba's, six layers, whose third and sixth run
    its shared attention block beside Mamba-1 split into two heads; or four Mamba layers alone
    (Mamba's and Falcon Mamba's Mamba-1, Mamba-2's), no attention at all."""
    from transformers import (AutoModelForCausalLM, BambaConfig, FalconH1Config, FalconMambaConfig,
                              GraniteMoeHybridConfig, JambaConfig, Mamba2Config, MambaConfig, NemotronHConfig,
                              Zamba2Config, ZambaConfig)

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, max_position_embeddings=1024, initializer_range=0.2)
    mamba2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16)
    alone = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, state_size=8, initializer_range=0.2)
    cfg = {"bamba": lambda: BambaConfig(**kw, **mamba2, attn_layer_indices=[2]),
           "granite4": lambda: GraniteMoeHybridConfig(
               **kw, **mamba2, layer_types=["mamba", "mamba", "attention", "mamba"], num_local_experts=4,
               num_experts_per_tok=2, shared_intermediate_size=32),
           "jamba": lambda: JambaConfig(**kw, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                                        num_experts=2, mamba_d_state=8, mamba_dt_rank=8),
           "nemotron_h": lambda: NemotronHConfig(
               **{k: v for k, v in kw.items() if k != "num_hidden_layers"}, head_dim=16, mamba_num_heads=8,
               mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16, n_routed_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
               layers_block_type=["mamba", "mlp", "mamba", "attention", "moe", "mamba"]),
           "falcon_h1": lambda: FalconH1Config(**kw, **mamba2, mamba_d_ssm=128),
           "zamba2": lambda: Zamba2Config(
               **kw, n_mamba_heads=8, mamba_headdim=16, mamba_d_state=8, mamba_ngroups=1, chunk_size=16,
               num_mem_blocks=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               layers_block_type=["mamba", "mamba", "hybrid", "mamba"]),
           "zamba": lambda: ZambaConfig(
               **{**kw, "num_hidden_layers": 6}, n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=8,
               attn_layer_period=3, attn_layer_offset=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
           "mamba": lambda: MambaConfig(**alone, intermediate_size=128, time_step_rank=8),
           "falcon_mamba": lambda: FalconMambaConfig(**alone, intermediate_size=128, time_step_rank=8),
           "mamba2": lambda: Mamba2Config(**alone, num_heads=8, head_dim=16, n_groups=1, chunk_size=16)}[kind]()
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("kind,dtype", [("bamba", torch.float32), ("bamba", torch.bfloat16),
                                        ("granite4", torch.float32), ("jamba", torch.float32),
                                        ("nemotron_h", torch.float32), ("falcon_h1", torch.float32),
                                        ("falcon_h1", torch.bfloat16), ("zamba2", torch.float32), ("zamba", torch.float32),
                                        ("mamba", torch.float32), ("mamba", torch.bfloat16),
                                        ("falcon_mamba", torch.float32), ("mamba2", torch.float32)],
                         ids=["bamba-fp32", "bamba-bf16", "granite4-fp32", "jamba-fp32", "nemotron_h-fp32",
                              "falcon_h1-fp32", "falcon_h1-bf16", "zamba2-fp32", "zamba-fp32", "mamba-fp32", "mamba-bf16",
                              "falcon_mamba-fp32", "mamba2-fp32"])
def test_mamba_hybrid_sessions_restore_at_restore_points(tmp_path, kind, dtype):
    """Bamba's, Granite 4.0-H's and Nemotron-H's Mamba-2 layers and Jamba's Mamba-1 layers keep a
    conv state and a float32 recurrent state, as a gated delta net does (refused before session
    66): a session_cache keeps both at each restore point (every 64 tokens here) and restores
    there; Nemotron-H's MLP and MoE layers keep nothing and have no layer in the store; a Falcon-H1
    layer (and Zamba2's attention layer) keeps every token's keys and values beside its states;
    Mamba, Falcon Mamba and Mamba-2 (refused before session 67) have Mamba layers alone. The
    runner turns of test_gated_delta_net_sessions_restore_at_restore_points, each equal to the same
    turn on transformers' own cache from the same point, tokens and logits to the bit; and the
    states a cache keeps at a restore point reached one decode step at a time are those of
    transformers' own cache there."""
    model = tiny_mamba(kind, dtype)
    cfg = model.config
    assert restore_step(cfg) == 64
    spec = spec_for_model(model, model_id="test/mamba")
    dt = tierkv.spec.dtype_name(dtype)
    # conv [144, 4] over 64 tokens, rounded up to 4; recurrent [8, 16, 8] (Mamba-1: conv [128, 4], [128, 8])
    widths = [(1, 8), (1, 16)] if kind in ("jamba", "mamba", "falcon_mamba", "zamba") else [(1, 12), (1, 16)]
    state = [("conv_state", widths[0], dt), ("recurrent_state", widths[1], "float32")]
    head = {"zamba2": (1, 32), "zamba": (1, 32)}.get(kind, (1, 16))
    attention = [("key", head, dt), ("value", head, dt)]
    assert [[(t.name, t.dims, t.dtype) for t in layer.tensors] for layer in spec.layers] == \
        {"falcon_h1": [attention + state] * 4, "zamba2": [state, state, attention + state, state],
         "zamba": [state, state, attention + state] * 2,
         "mamba": [state] * 4, "falcon_mamba": [state] * 4, "mamba2": [state] * 4}.get(kind, [state, state, attention, state])
    ids = torch.randint(1, 256, (140,), generator=torch.Generator().manual_seed(3)).tolist()
    _, mine = prefill(model, ids[:120])
    _, ref = prefill(model, ids[:120], DynamicCache(config=cfg))
    mine, ref, at128 = decode_alike(model, ids[120:130], mine, ref, 128)  # past the restore point at 128
    back = kv_to_cache([[x[:, :128] for x in p] for p in cache_to_kv(mine)], cfg)
    states = [i for i, layer in enumerate(back.layers) if type(layer).__name__ in ("StateSnapshotLayer", "ParallelStateLayer")]
    assert len(states) == {"bamba": 3, "granite4": 3, "jamba": 3, "nemotron_h": 3, "zamba": 6}.get(kind, 4)
    assert len(back.layers) == cfg.num_hidden_layers
    assert_same_states(back, at128, states)
    restore_point_turns(model, spec, str(tmp_path))
    # a layer whose states are not of the config's shape is refused at the restore point, never
    # stored in another form
    odd = session_cache(cfg)
    odd.layers[0]._state = (16,) + odd.layers[0]._state[1:]  # a conv dim the model does not have
    with pytest.raises(SpecMismatchError, match="not a layout tierkv knows"):
        prefill(model, ids[:64], odd)


def test_mamba_alone_restores_read_one_restore_point(tmp_path):
    """A model of Mamba layers alone restores from the states of its last restore point, and a
    needed_only restore (the runner's) reads only the block holding them: at 256 tokens in
    64-token blocks, blocks 0..2 of every layer go unread, the bytes read are those of one block
    (``plan``'s reload_bytes), and the cache continues as a restore of every block does, and as
    transformers' own cache at 256 does, to the bit."""
    from tierkv.kvmath import plan

    model = tiny_mamba("mamba2")
    cfg, spec = model.config, spec_for_model(model)
    ids = torch.randint(1, 256, (280,), generator=torch.Generator().manual_seed(6)).tolist()
    _, cache = prefill(model, ids[:256])
    _, ref = prefill(model, ids[:256], DynamicCache(config=cfg))
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        kv.save(ids[:256], cache_to_kv(cache), session="s").wait()
        kv.flush()
    outs = []
    for needed_only in (False, True):
        with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:  # cold: every block from SSD
            c, h = restore_cache(kv, ids[:256], cfg, session="s", needed_only=needed_only)
            outs.append(prefill(model, ids[256:], c)[0])
            stats = kv.stats()
            assert h.result().num_tokens == 256 and stats["skipped_block_layers"] == 12 * needed_only
            read = sum(m["bytes"] for d, m in stats["moved"].items() if d.startswith("ssd->"))  # raw bytes
            assert read == (64 if needed_only else 256) * spec.bytes_per_token
    r = plan(Geometry.from_hf_config(cfg), 256, 1, hbm=1, dram=1, ssd=1 << 30, kv_bits=32)
    assert r["restore_point"] == 256 and r["reload_bytes"] == read
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], prefill(model, ids[256:], ref)[0])


def tiny_minimax(first: str, dtype: torch.dtype = torch.float32) -> Any:
    """MiniMax's architecture at toy size, random weights: lightning attention (4 heads of 16,
    blocks of 16) and attention layers alternating, the first of kind ``first``."""
    from transformers import AutoModelForCausalLM, MiniMaxConfig

    torch.manual_seed(0)
    other = {"full_attention": "linear_attention", "linear_attention": "full_attention"}[first]
    cfg = MiniMaxConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2, layer_types=[first, other] * 2, block_size=16, initializer_range=0.2,
                        max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_minimax_lightning_sessions_restore_at_restore_points(tmp_path, dtype):
    """MiniMax's lightning attention keeps one state per layer (``[heads, head dim, head dim]``,
    in the model's dtype), which transformers' ``MiniMaxCache`` holds in a list beside its layers
    (refused before session 67). ``session_cache`` makes a ``LightningCache`` (a MiniMaxCache,
    as MiniMax's forward demands) whose ``LightningStateLayer``s keep the state at each restore
    point (every 64 tokens here) and restore there: the runner turns of
    test_gated_delta_net_sessions_restore_at_restore_points, each equal to the same turn on
    transformers' own cache from the same point, tokens and logits to the bit; and the states kept
    at a restore point reached one decode step at a time are transformers' own there."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    model = tiny_minimax("full_attention", dtype)
    cfg = model.config
    assert restore_step(cfg) == 64  # a state of 4 x 16 x 16 values against 32 of keys and values per token
    spec = spec_for_model(model, model_id="test/minimax")
    dt = tierkv.spec.dtype_name(dtype)
    attention, state = [("key", (1, 16), dt), ("value", (1, 16), dt)], [("recurrent_state", (1, 16), dt)]
    assert [[(t.name, t.dims, t.dtype) for t in layer.tensors] for layer in spec.layers] == [attention, state] * 2
    ids = torch.randint(1, 256, (140,), generator=torch.Generator().manual_seed(3)).tolist()
    _, mine = prefill(model, ids[:120])
    _, ref = prefill(model, ids[:120], MiniMaxCache())
    assert type(mine).__name__ == "LightningCache" and isinstance(mine, MiniMaxCache)
    mine, ref, at128 = decode_alike(model, ids[120:130], mine, ref, 128)
    back = kv_to_cache([[x[:, :128] for x in p] for p in cache_to_kv(mine)], cfg)
    for i in (1, 3):
        assert torch.equal(back.layers[i].get(), at128.linear_cache[i])
    restore_point_turns(model, spec, str(tmp_path), own=MiniMaxCache)
    # a state of another shape is refused where it would be kept, never stored in another form
    odd = session_cache(cfg)
    odd.layers[1]._state = (4, 16, 8)
    with pytest.raises(SpecMismatchError, match="not a layout tierkv knows"):
        prefill(model, ids[:64], odd)


def test_minimax_lightning_first_layer_counts_its_tokens(tmp_path):
    """MiniMax-Text-01's layout starts with lightning attention layers. transformers'
    ``MiniMaxCache`` then reports 0 cached tokens (its first layer never takes keys), so a pass
    without position ids restarts its positions at 0; tierkv's ``LightningCache`` counts them (a
    state set before the pass's first attention layer is placed when that layer tells the pass's
    length). Restored from SSD at a restore point, such a cache continues as the unsaved one
    does, to the bit."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    model = tiny_minimax("linear_attention")
    cfg, spec = model.config, spec_for_model(model)
    ids = torch.randint(1, 256, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    _, theirs = prefill(model, ids[:120], MiniMaxCache())
    _, mine = prefill(model, ids[:128])
    assert theirs.get_seq_length() == 0 and mine.get_seq_length() == 128
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        kv.save(ids[:128], cache_to_kv(mine), session="s").wait()
        kv.flush()
    with TierKV(str(tmp_path / "store"), spec, block_tokens=64) as kv:
        c, h = restore_cache(kv, ids, cfg, session="s", needed_only=True)
        assert h.result().num_tokens == 128 and kv.stats()["skipped_block_layers"] == 2  # block 0 of each state layer
        assert torch.equal(prefill(model, ids[128:], c)[0], prefill(model, ids[128:], copy.deepcopy(mine))[0])
        assert c.get_seq_length() == 150


@pytest.mark.parametrize("kind", ["kimi_linear", "bailing_hybrid"])
def test_kda_sessions_restore_at_restore_points(tmp_path, kind):
    """Kimi Linear's and Bailing Hybrid's (Ring-linear's) KDA layers keep a conv state (q, k and v)
    and a float32 recurrent state through the same cache calls as a gated delta net, beside MLA
    layers (refused before session 66; Bailing Hybrid before session 67): a session_cache keeps
    the states at each restore point (every 64 tokens here), the MLA layers their latent and
    rotary key per token. The runner turns of
    test_gated_delta_net_sessions_restore_at_restore_points, each equal to the same turn on
    transformers' own cache from the same point, tokens and logits to the bit; and the states kept
    at a restore point reached one decode step at a time are transformers' own there."""
    from transformers import AutoModelForCausalLM, BailingHybridConfig, KimiLinearConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, kv_lora_rank=32,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, num_experts=4,
              num_experts_per_token=2, initializer_range=0.2,
              layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])
    cfg = (KimiLinearConfig(**kw, linear_head_dim=16, linear_num_heads=4) if kind == "kimi_linear" else
           BailingHybridConfig(**kw, head_dim=16, num_shared_experts=1, num_nextn_predict_layers=0, n_group=1,
                               topk_group=1, first_k_dense_replace=1))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert restore_step(cfg) == 64  # 1,792 state values against a latent and rotary key of 40
    spec = spec_for_model(model, model_id=f"test/{kind}")
    state = [("conv_state", (1, 12), "float32"), ("recurrent_state", (1, 16), "float32")]  # 192 x 4, 4 x 16 x 16
    assert [[(t.name, t.dims, t.dtype) for t in layer.tensors] for layer in spec.layers] == \
        [state, state, [("latent", (1, 32), "float32"), ("rope_key", (1, 8), "float32")], state]
    ids = torch.randint(1, 256, (140,), generator=torch.Generator().manual_seed(3)).tolist()
    _, mine = prefill(model, ids[:120])
    _, ref = prefill(model, ids[:120], DynamicCache(config=cfg))
    mine, ref, at128 = decode_alike(model, ids[120:130], mine, ref, 128)
    assert_same_states(kv_to_cache([[x[:, :128] for x in p] for p in cache_to_kv(mine)], cfg), at128, (0, 1, 3))
    restore_point_turns(model, spec, str(tmp_path))


def test_a_restore_whose_prefix_shrinks_starts_again_at_a_restore_point(tmp_path):
    """restore_cache looks the prefix up, then restores it; blocks that go in between (another
    thread's drop, an eviction) leave a shorter prefix, which may end off a restore point (or need
    rows its needed_from left unread). The restore then starts again from the prefix found: here
    the first read finds 100 of 150 tokens, and the cache comes back at 64, the restore point
    before, equal to transformers' own cache there."""
    qwen = tiny_gdn("qwen3_next")
    cfg = qwen.config
    ids = torch.randint(1, 256, (160,), generator=torch.Generator().manual_seed(5)).tolist()
    _, whole = prefill(qwen, ids[:150])
    with TierKV(str(tmp_path / "store"), spec_for_model(qwen), block_tokens=64) as kv:
        kv.save(ids[:150], cache_to_kv(whole), session="s").wait()
        real, calls = kv.restore_async, []

        def shrinking(tokens, *args, **kw):  # the first read finds only 100 tokens
            calls.append(len(tokens))
            return real(tokens[:100] if len(calls) == 1 else tokens, *args, **kw)

        kv.restore_async = shrinking
        for needed_only in (False, True):
            calls.clear()
            cache, handle = restore_cache(kv, ids[:150], cfg, session="s", needed_only=needed_only)
            assert calls == [128, 64] and handle.num_tokens == 64 and cache_len(cache) == 64
            _, own = prefill(qwen, ids[:64], DynamicCache(config=cfg))
            assert torch.equal(prefill(qwen, ids[64:], cache)[0], prefill(qwen, ids[64:], own)[0])


def test_sliding_window_layers_are_saved_only_whole():
    """transformers' own sliding-window layer keeps only its window: refused, with the way out.
    session_cache's layers keep every token, so cache_to_kv saves them all, and kv_to_cache gives
    them back the same way (attending to the window: ``keys`` is the last 15 tokens)."""
    from transformers import DynamicCache, MistralConfig

    cfg = MistralConfig(num_hidden_layers=2, sliding_window=16, hidden_size=32, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64, vocab_size=100)
    plain, whole = DynamicCache(config=cfg), session_cache(cfg)
    data = [torch.randn(1, 1, 40, 16) for _ in range(4)]
    for cache in (plain, whole):
        cache.update(data[0], data[1], 0)
        cache.update(data[2], data[3], 1)
    with pytest.raises(SpecMismatchError, match="DynamicSlidingWindowLayer.*session_cache"):
        cache_to_kv(plain)
    kv = cache_to_kv(whole)
    assert all(torch.equal(x, y[0]) for x, y in zip(kv[0] + kv[1], data))
    back = kv_to_cache(kv, cfg)
    assert all(type(layer) is SlidingHistoryLayer for layer in back.layers)
    assert torch.equal(back.layers[1].keys, plain.layers[1].keys) and back.get_seq_length() == 40
    assert all(torch.equal(x, y) for x, y in zip(cache_to_kv(back)[1], kv[1]))


def smollm2_with_sliding_layers(model, window):
    """SmolLM2's real weights in Ministral's architecture (Llama's, with sliding-window attention
    per layer): two layers in three attend only to the last ``window`` tokens."""
    from transformers import MinistralConfig, MinistralForCausalLM

    c = model.config
    cfg = MinistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                          max_position_embeddings=c.max_position_embeddings,
                          rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                          tie_word_embeddings=c.tie_word_embeddings, sliding_window=window,
                          layer_types=["full_attention" if i % 3 == 2 else "sliding_attention"
                                       for i in range(c.num_hidden_layers)])
    m = MinistralForCausalLM(cfg).eval()
    m.load_state_dict(model.state_dict(), strict=True)
    return m


def test_sliding_window_model_real_weights(smol, tmp_path):
    """A model whose layers mostly attend to a sliding window (SmolLM2's weights, two layers in
    three seeing the last 80 tokens). transformers' own cache keeps only each window, so before
    session 53 every runner save of such a model was refused. The runner's caches keep every
    token while attention sees the same windows: three turns of a session, then, in a fresh
    handle (from SSD), a second session sharing only the first 192 tokens (its windows start
    inside an earlier block) each equal the same turns on transformers' own cache without
    tierkv, tokens and logits to the bit."""
    from transformers import DynamicCache

    model, tok, _ = smol
    m = smollm2_with_sliding_layers(model, 80)
    spec = spec_for_model(m, model_id="test/smollm2-sliding")
    assert spec.bytes_per_token == 46_080  # every layer stores every token
    store, ctx, ref = str(tmp_path / "store"), stdlib_tokens(tok, 300, "json/decoder.py"), None
    more = tok.encode("\n# and then\n", add_special_tokens=False)

    def same_turn(t, tokens, cache):
        logits, cache = prefill(m, tokens[cache_len(cache):], cache)
        toks, all_logits, cache = greedy_decode(m, logits, cache, 6)
        assert t.tokens == toks and all(torch.equal(a, b) for a, b in zip(t.logits, all_logits))
        return cache

    with TierKV(store, spec, block_tokens=64) as kv:
        runner = SessionRunner(kv, m)
        for restored in (0, 305, 316):
            t = runner.turn("s", ctx, max_new_tokens=6)
            assert t.restored_tokens == restored
            ref = same_turn(t, ctx, ref if ref is not None else DynamicCache(config=m.config))
            ctx = ctx + t.tokens + more
    assert [type(layer).__name__ for layer in ref.layers[:3]] == ["DynamicSlidingWindowLayer"] * 2 + ["DynamicLayer"]
    # the first turn's prefill again (session_cache by default: every token), its first 192
    # tokens put into transformers' own cache, which keeps the windows
    first = cache_to_kv(prefill(m, ctx[:300])[1])
    shared = DynamicCache(config=m.config)
    for i, (k, v) in enumerate(first):
        shared.update(k[None, :, :192], v[None, :, :192], i)
    other = ctx[:200] + tok.encode("\n# something else\n", add_special_tokens=False)
    with TierKV(store, spec, block_tokens=64) as kv:
        t = SessionRunner(kv, m).turn("other", other, max_new_tokens=6)
        assert t.restored_tokens == 192 and t.sources == {"ssd": 3}
        same_turn(t, other, shared)


def tiny_llama_config(layers: int = 2) -> Any:
    """A Llama config of a few thousand weights: one KV head of 16, a vocabulary of 100."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=64, vocab_size=100)


def test_runner_holds_the_garbage_collector_off_until_the_first_token(tmp_path):
    """A full collection of Python's cyclic garbage collector in a process holding a model holds
    the GIL for the whole heap (192 ms with SmolLM2 loaded on this machine, bench/gc_pause.py;
    ``tierkv demo``'s restore reads took 255-309 ms where one landed in them, 126-141 ms
    without). ``SessionRunner.turn`` holds it off
    from the restore to the first token (``hold_gc``, default True), and leaves it as it found it
    after the turn, an error's included; ``hold_gc=False`` leaves it alone."""
    import gc

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32).eval()
    seen: list[bool] = []
    boom: list[bool] = []

    def pre(module: Any, args: Any) -> None:
        seen.append(gc.isenabled())
        if boom:
            raise RuntimeError("a forward pass that fails")

    hook = model.register_forward_pre_hook(pre)
    ids = list(range(1, 40))
    try:
        with TierKV(str(tmp_path / "store"), spec_for_model(model), block_tokens=16) as kv:
            assert gc.isenabled()
            SessionRunner(kv, model).turn("s", ids, max_new_tokens=3)  # a prefill, then 2 decode steps
            assert seen == [False, True, True] and gc.isenabled()
            seen.clear()
            SessionRunner(kv, model).turn("s", ids + [5, 6, 7], max_new_tokens=2)  # restored from the store
            assert seen == [False, True] and gc.isenabled()
            seen.clear()
            SessionRunner(kv, model, hold_gc=False).turn("t", ids, max_new_tokens=2)
            assert seen == [True, True]
            gc.disable()  # a process that runs without it keeps running without it
            seen.clear()
            SessionRunner(kv, model).turn("u", ids, max_new_tokens=2)
            assert seen == [False, False] and not gc.isenabled()
            gc.enable()
            boom.append(True)
            with pytest.raises(RuntimeError, match="fails"):  # a prefill that fails: the collector is back on
                SessionRunner(kv, model).turn("v", ids, max_new_tokens=1)
            assert seen[-1] is False and gc.isenabled()
    finally:
        gc.enable()
        hook.remove()


def test_a_compiled_model_gets_its_cache_under_the_name_its_model_takes(tmp_path):
    """``torch.compile`` wraps a model in a module whose forward takes ``*args, **kwargs`` and
    hands them to the model's own. Asked of the wrapper, ``prefill`` passed the cache as
    ``past_key_values``, which transformers 5.24 deprecates and 5.40 drops (no warning says so
    under dynamo's tracing); it asks the wrapped model now, through PEFT's wrapper too. A
    compiled model's turns, saved and restored, equal the same turns without tierkv."""
    from transformers import AutoModelForCausalLM

    from tierkv.integrations.hf import _cache_argument

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(1), dtype=torch.float32).eval()
    compiled = torch.compile(model, backend="eager")   # dynamo's tracing, no compiler needed
    assert _cache_argument(compiled) == _cache_argument(model)
    try:
        import peft
    except ImportError:
        pass
    else:
        adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["k_proj"]))
        assert _cache_argument(torch.compile(adapted, backend="eager")) == _cache_argument(model)
        # the model its adapters are injected into, compiled, keys their KV as it does uncompiled
        # (its layers' names carried the wrapper's prefix, a tenant of its own: a miss every turn)
        assert adapter_tenant(torch.compile(adapted.get_base_model(), backend="eager")) == adapter_tenant(adapted)
    ids = list(range(1, 40))

    def alone(toks: list[int]) -> list[int]:
        logits, cache = prefill(model, toks)
        return greedy_decode(model, logits, cache, 1)[0]

    with TierKV(str(tmp_path / "store"), spec_for_model(compiled), block_tokens=16) as kv:
        first = SessionRunner(kv, compiled).turn("s", ids, max_new_tokens=1)   # prefills only: each new
        more = ids + first.tokens + [7, 8]                                      # shape is traced again
        second = SessionRunner(kv, compiled).turn("s", more, max_new_tokens=1)
    assert first.tokens == alone(ids)
    assert second.restored_tokens == len(ids) and second.tokens == alone(more)


def test_cache_helpers_refuse_what_is_not_a_cache():
    """A legacy tuple cache, None or a list went to ``cache.layers`` or tuple unpacking and raised
    AttributeError or TypeError; they are SpecMismatchErrors that say what is expected."""
    cfg = tiny_llama_config()
    pair = (torch.zeros(1, 4, 16), torch.zeros(1, 4, 16))
    for cache in (None, [], ((pair[0][None], pair[1][None]),) * 2):
        with pytest.raises(SpecMismatchError, match="transformers Cache"):
            cache_to_kv(cache)
    for kv in (None, [pair[0]], [(pair[0],)], [(pair[0], "v")]):
        with pytest.raises(SpecMismatchError, match="key, value"):
            kv_to_cache(kv, cfg)
    back = cache_to_kv(kv_to_cache([pair, pair], cfg))
    assert len(back) == 2 and all(torch.equal(k, pair[0]) and torch.equal(v, pair[1]) for k, v in back)


def test_demo_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tierkv.cli", "demo", "--context-tokens", "300",
                          "--answer-tokens", "6", "--store", str(tmp_path / "demo"), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["tokens_identical"] is True and r["restored_from"] == "ssd"
    assert r["max_abs_logit_diff"] == 0.0
    assert r["page_cache_resident"] < 0.05
    assert r["kv_bytes"] == r["session_tokens"] * 46_080
    # fp32 KV: planes would save < 1.3x, so layers are stored unsplit (codec.py); headers cost a little
    assert 0.99 < r["compression_ratio"] < 2.0
    for key in ("context_tokens", "recompute_ttft_s", "restore_ttft_s", "speedup", "ssd_bytes", "reload_gbps"):
        assert key in r
    # both processes froze what their start-up made (torch, transformers, the model), as a
    # server does: no full collection of it lands in a save or a restore
    assert r["turn1_frozen_objects"] > 100_000 and r["turn2_frozen_objects"] > 100_000
