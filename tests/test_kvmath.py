"""KV-cache calculator and planner: reference figures, each family by hand, CLI errors."""

import json
import subprocess
import sys

import pytest
import torch

import tierkv
from tierkv.cli import main
from tierkv import ConfigError
from tierkv.kvmath import Geometry, load_presets, parse_tokens, plan, preset

GIB = 2**30


@pytest.mark.parametrize("model,gib", [("deepseek-v4-pro", 5.48), ("glm-5", 60.44), ("qwen3-235b-a22b", 89.65)])
def test_reference_figures(model, gib):
    fp = preset(model).footprint(1_000_000, kv_bits=8, indexer_bits=16)
    assert abs(fp.total / GIB - gib) < 0.01


def test_every_preset_computes_from_its_family():
    presets = load_presets()
    assert len(presets) == 11
    for name, g in presets.items():
        assert g.source.startswith("config.json of huggingface.co/")
        a = g.footprint(128_000, 16, 16).total
        b = g.footprint(128_000, 8, 16).total
        assert 0 < b < a


def test_gqa_by_hand():
    g = Geometry("t", "gqa", {"num_hidden_layers": 2, "num_key_value_heads": 3, "head_dim": 4})
    assert g.footprint(10, kv_bits=16).total == 10 * 2 * 2 * 3 * 4 * 2
    assert g.footprint(10, kv_bits=4).total == 10 * 2 * 2 * 3 * 4 * 0.5


def test_mla_and_dsa_by_hand():
    mla = Geometry("t", "mla", {"num_hidden_layers": 3, "kv_lora_rank": 8, "qk_rope_head_dim": 2})
    assert mla.footprint(5, kv_bits=8).total == 5 * 3 * 10
    dsa = Geometry("t", "mla_dsa", {"num_hidden_layers": 3, "kv_lora_rank": 8, "qk_rope_head_dim": 2,
                                     "index_head_dim": 4})
    fp = dsa.footprint(5, kv_bits=8, indexer_bits=16)
    assert (fp.kv, fp.indexer) == (5 * 3 * 10, 5 * 3 * 4 * 2)


def test_v4_hybrid_by_hand_and_mtp():
    g = Geometry("t", "v4_hybrid", {"num_hidden_layers": 3, "head_dim": 2, "sliding_window": 4,
                                    "index_head_dim": 3, "compress_ratios": [4, 8, 0, 0]})
    fp = g.footprint(10, kv_bits=8, indexer_bits=16)
    assert fp.window == 3 * 4 * 2                     # min(T, window) entries in every layer
    assert fp.kv == (10 // 4) * 2 + (10 // 8) * 2      # compressed entries where r > 0
    assert fp.indexer == (10 // 4) * 3 * 2            # indexer keys where r == 4
    with_mtp = g.footprint(10, kv_bits=8, indexer_bits=16, include_mtp=True)
    assert with_mtp.window == 4 * 4 * 2 and with_mtp.kv == fp.kv
    m2 = preset("minimax-m2")
    assert m2.footprint(100, include_mtp=True).total == m2.footprint(100).total * 65 / 62


def test_planner_bytes_equal_what_the_engine_stores(tmp_path):
    """Planner bytes per token (fp32) == raw payload bytes the engine stores for SmolLM2."""
    geom = preset("smollm2-135m")
    n = 300
    spec = geom.kvspec("float32")
    kv = [tuple(torch.randn(t.shape(n)) for t in layer.tensors) for layer in spec.layers]
    with tierkv.TierKV(str(tmp_path / "s"), spec, block_tokens=64, persist="write_through") as s:
        s.save(range(n), kv, session="x").wait()
        st = s.stats()
    assert st["ssd_raw_written"] == geom.footprint(n, kv_bits=32).total == n * 46_080
    assert st["resident_bytes"]["device"] == n * 46_080


def test_geometry_from_hf_config_and_config_json(tmp_path):
    from transformers import Qwen3Config

    cfg = Qwen3Config(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    g = Geometry.from_hf_config(cfg)
    assert g.footprint(10).total == 10 * 4 * 2 * 2 * 16 * 2
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                             "index_head_dim": 128, "model_type": "deepseek_v32"}))
    g2 = Geometry.from_config_json(str(p))
    assert g2.family == "mla_dsa"
    assert g2.footprint(1000).total == preset("deepseek-v3.2").footprint(1000).total


def test_short_convolution_and_recurrent_layers_from_a_config(tmp_path):
    """An LFM2-family config (conv layers beside attention): the footprint counts what tierkv
    stores for each layer, keys and values for attention and each token's convolution input for a
    conv layer (before session 64 every layer was counted as attention), and equals the engine's
    spec for the same config. Qwen3-Next's gated delta nets count the states tierkv stores at
    their restore points; a recurrent state of a kind tierkv does not know is refused, not
    counted as attention (Mamba layers: test_mamba_hybrids_count_their_states_at_restore_points)."""
    from transformers import Lfm2Config, Qwen3NextConfig

    from tierkv.integrations.hf import spec_for_config

    kinds = ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)]
    cfg = Lfm2Config(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     layer_types=kinds)
    g = Geometry.from_hf_config(cfg)
    per_token = 6 * 2 * 8 * 64 * 2 + 10 * 2048 * 2  # bf16
    assert g.footprint(1000).total == 1000 * per_token
    assert spec_for_config(cfg, torch.bfloat16).bytes_per_token == per_token == g.kvspec().bytes_per_token
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert Geometry.from_config_json(str(p)).footprint(10).total == 10 * per_token
    with pytest.raises(ConfigError, match="layer_types for"):
        Geometry.from_config_dict({**cfg.to_dict(), "layer_types": kinds[:4]})
    # Qwen3-Next-80B (transformers' defaults): 12 attention layers, 36 gated delta nets whose
    # states (a conv state of 8,192 x 4, a float32 recurrent state of 32 x 128 x 128) tierkv
    # stores every 1,024 tokens, spread over them; counted as attention before session 65, then
    # refused
    nxt = Qwen3NextConfig()
    g = Geometry.from_hf_config(nxt)
    assert g.restore_step == 1024 and nxt.layer_types.count("linear_attention") == 36
    per_token = 12 * 2 * 2 * 256 * 2 + 36 * (8192 * 4 // 1024 * 2 + 32 * 128 * 128 // 1024 * 4)
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 100_608
    assert spec_for_config(nxt, torch.bfloat16).bytes_per_token == per_token == g.kvspec().bytes_per_token
    # at 8 bits the keys, values and conv states halve; the recurrent state stays float32
    assert g.footprint(1000, kv_bits=8).total == 1000 * (per_token - (12 * 2048 + 36 * 64) // 2)
    # restore points twice as far apart (the config's tierkv_restore_step): half the state per token
    nxt.tierkv_restore_step = 2048
    g = Geometry.from_hf_config(nxt)
    assert g.restore_step == 2048 and g.footprint(1000).total == 1000 * (per_token - 36 * 2112 // 2)
    # a Mamba or linear-attention layer without a gated delta net's or a Mamba layer's fields is not
    # one tierkv knows: refused, not counted as attention
    for kind in ("mamba", "linear_attention"):
        with pytest.raises(ConfigError, match="neither a gated delta net's fields"):
            Geometry.from_config_dict({**cfg.to_dict(), "layer_types": [kind] * 15 + ["full_attention"]})


def test_mamba_hybrids_count_their_states_at_restore_points():
    """Bamba's, Granite 4.0-H's, Nemotron-H's and Falcon-H1's Mamba-2 layers and Jamba's Mamba-1 layers keep a
    conv state and a float32 recurrent state, which tierkv stores at restore points as it does a gated delta net's
    (refused before session 66), whichever field a config names its layers in; models whose
    layers tierkv does not store are refused, never counted as attention."""
    pytest.importorskip("transformers")
    from transformers import (BailingHybridConfig, BambaConfig, FalconH1Config, JambaConfig, KimiLinearConfig,
                              NemotronHConfig, Zamba2Config, ZambaConfig, ZayaConfig)

    from tierkv.integrations.hf import spec_for_config

    # transformers' default Bamba (32 layers, attention at 9, 18 and 27: 8 KV heads of 128): a
    # Mamba-2 state of 128 heads x 64 x 256 (float32) and a conv state of 8,704 x 4, every 2,048 tokens
    bamba = BambaConfig(attn_layer_indices=[9, 18, 27])
    g = Geometry.from_hf_config(bamba)
    assert g.fields["linear_state"] == [8704, 4, 128, 64, 256] and g.restore_step == 2048
    per_token = 3 * 2 * 8 * 128 * 2 + 29 * (20 * 2 + 128 * 64 * 256 // 2048 * 4)  # conv 17 -> 20 (rounded up to 4)
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 132_232
    assert spec_for_config(bamba, torch.bfloat16).bytes_per_token == per_token == g.kvspec().bytes_per_token
    # the same model as its config.json says it: head dim "auto", or Granite 4.0's layer_types names
    raw = {k: v for k, v in bamba.to_dict().items() if k != "attn_layer_indices"}
    assert Geometry.from_config_dict({**raw, "attn_layer_indices": [9, 18, 27], "mamba_d_head": "auto"}).footprint(
        1000).total == 1000 * per_token
    # restore points never further apart than a store's largest block (4,096 tokens), which must be
    # a multiple of the step: a state that wants more (one KV head: 256 values a token) spreads
    # over 4,096 tokens; a tierkv_restore_step beyond it is refused
    assert Geometry.from_config_dict({**bamba.to_dict(), "num_key_value_heads": 1}).restore_step == 4096
    with pytest.raises(ConfigError, match="up to 4096"):
        Geometry.from_config_dict({**bamba.to_dict(), "tierkv_restore_step": 8192})
    kinds = ["attention" if i in (9, 18, 27) else "mamba" for i in range(32)]
    assert Geometry.from_config_dict({**raw, "model_type": "granitemoehybrid", "layer_types": kinds}).footprint(
        1000).total == 1000 * per_token
    # Jamba (Mamba-1: an inner dim of 8,192, state 16; attention every 8th layer from the 4th)
    jamba = JambaConfig()
    g = Geometry.from_hf_config(jamba)
    assert g.fields["linear_state"] == [8192, 4, 8192, 16] and g.restore_step == 128
    assert g.fields["layer_types"].count("full_attention") == 4
    per_token = 4 * 2 * 8 * 128 * 2 + 28 * (8192 * 4 // 128 * 2 + 8192 * 16 // 128 * 4)
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 145_408
    assert spec_for_config(jamba, torch.bfloat16).bytes_per_token == per_token
    # Nemotron-H (transformers' default: Mamba-2 with 8 groups, then MoE, attention, MLP): its MLP
    # and MoE layers keep no cache and count nothing; its pattern names the layers in a config.json
    nemotron = NemotronHConfig()
    g = Geometry.from_hf_config(nemotron)
    assert g.fields["linear_state"] == [128 * 64 + 2 * 8 * 128, 4, 128, 64, 128] and g.restore_step == 1024
    per_token = 2 * 8 * 128 * 2 + (10240 * 4 // 1024 * 2 + 128 * 64 * 128 // 1024 * 4)
    assert g.layer_count() == 2 and g.footprint(1000).total == 1000 * per_token == 1000 * 8_272
    assert spec_for_config(nemotron, torch.bfloat16).bytes_per_token == per_token
    raw_nemotron = {k: v for k, v in nemotron.to_dict().items() if k not in ("layers_block_type", "layer_types")}
    g = Geometry.from_config_dict({**raw_nemotron, "hybrid_override_pattern": "M-M*EM-"})
    assert g.layers == 7 and g.layer_count() == 4 and g.footprint(1000).total == 1000 * (per_token + 2 * 4176)
    # Falcon-H1 (transformers' default) runs attention and Mamba-2 side by side in every layer (its
    # config names no layer kinds): each layer stores its keys and values and both states
    falcon = FalconH1Config()
    g = Geometry.from_hf_config(falcon)
    assert g.fields["layer_types"] == ["hybrid"] * 32 and g.fields["linear_state"] == [1024 + 2 * 256, 4, 128, 8, 256]
    per_token = 32 * (2 * 8 * 128 * 2 + 1536 * 4 // 256 * 2 + 128 * 8 * 256 // 256 * 4)
    assert g.restore_step == 256 and g.footprint(1000).total == 1000 * per_token == 1000 * 263_680
    assert spec_for_config(falcon, torch.bfloat16).bytes_per_token == per_token
    # Zamba2: Mamba-2 layers (its own field names), and "hybrid" ones that run its shared attention
    # block, over heads of 2 x hidden size / heads, beside Mamba-2
    zamba = Zamba2Config()
    g = Geometry.from_hf_config(zamba)
    assert g.fields["head_dim"] == 2 * zamba.hidden_size // zamba.num_attention_heads
    assert g.fields["linear_state"][2:] == [zamba.n_mamba_heads, zamba.mamba_headdim, zamba.mamba_d_state]
    assert g.fields["layer_types"].count("hybrid") == len(zamba.hybrid_layer_ids) > 0
    assert spec_for_config(zamba, torch.bfloat16).bytes_per_token == g.footprint(1).total
    # Zamba (v1, since session 67): Mamba-1 split into heads ([heads, inner / heads, state size]),
    # "hybrid" layers as Zamba2's
    zamba1 = ZambaConfig()
    g = Geometry.from_hf_config(zamba1)
    assert g.fields["linear_state"] == [7424, 4, 2, 3712, 16] and g.fields["head_dim"] == 464 and g.restore_step == 64
    assert g.fields["layer_types"].count("hybrid") == zamba1.layers_block_type.count("hybrid") > 0
    assert spec_for_config(zamba1, torch.bfloat16).bytes_per_token == g.footprint(1).total
    # refused: a Mamba config that names no layer kinds (but Falcon-H1's), sliding windows beside a
    # state, MLA beside a state (Kimi Linear)
    with pytest.raises(ConfigError, match="says nowhere which layers attend"):
        Geometry.from_config_dict({**raw, "model_type": "bamba"})
    with pytest.raises(ConfigError, match="side by side"):
        Geometry.from_config_dict({**raw, "layer_types": ["hybrid_sliding"] * 32})
    with pytest.raises(ConfigError, match="recurrent state of a kind tierkv does not know"):
        Geometry.from_config_dict({**raw, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                   "layer_types": ["linear_attention", "full_attention"] * 16})
    # Kimi Linear (transformers' default: 27 layers, MLA at every fourth from the fourth and the
    # last, KDA elsewhere: 32 heads of 128, kernel 4): MLA latents per token, KDA states (q, k and
    # v convs; [32, 128, 128] float32) every 1,024 tokens; from its config.json's
    # linear_attn_config too (1-indexed layer lists; before session 66 the MLA formula counted
    # every layer as a latent)
    kimi = KimiLinearConfig()
    g = Geometry.from_hf_config(kimi)
    assert g.family == "mla" and g.fields["linear_state"] == [3 * 32 * 128, 4, 32, 128, 128] and g.restore_step == 1024
    mla = kimi.layer_types.count("full_attention")
    per_token = mla * 576 * 2 + (27 - mla) * (12288 * 4 // 1024 * 2 + 32 * 128 * 128 // 1024 * 4)
    assert mla == 6 and g.footprint(1000).total == 1000 * per_token == 1000 * 51_936
    assert spec_for_config(kimi, torch.bfloat16).bytes_per_token == per_token
    flat = ("layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim")
    kda = {"num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4,
           "full_attn_layers": [i + 1 for i, t in enumerate(kimi.layer_types) if t == "full_attention"],
           "kda_layers": [i + 1 for i, t in enumerate(kimi.layer_types) if t == "linear_attention"]}
    as_json = {**{k: v for k, v in kimi.to_dict().items() if k not in flat}, "linear_attn_config": kda}
    assert Geometry.from_config_dict(as_json).footprint(1000).total == 1000 * per_token
    # Bailing Hybrid (Ring-linear; transformers' default: 42 layers, the last of every 6 MLA, KDA
    # elsewhere: 32 heads of 128, kernel 4), counted the same way since session 67 (refused before);
    # its config.json names the KDA heads num_attention_heads and head_dim, and no layer_types
    bailing = BailingHybridConfig()
    g = Geometry.from_hf_config(bailing)
    assert g.family == "mla" and g.fields["linear_state"] == [3 * 32 * 128, 4, 32, 128, 128] and g.restore_step == 1024
    per_token = 7 * 576 * 2 + 35 * (12288 * 4 // 1024 * 2 + 32 * 128 * 128 // 1024 * 4)
    assert g.fields["layer_types"].count("full_attention") == 7 and g.footprint(1000).total == 1000 * per_token
    assert per_token == 83_104 and spec_for_config(bailing, torch.bfloat16).bytes_per_token == per_token
    flat = ("layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim")
    as_json = {**{k: v for k, v in bailing.to_dict().items() if k not in flat}, "head_dim": 128}
    assert Geometry.from_config_dict(as_json).footprint(1000).total == 1000 * per_token
    # ZAYA (transformers' default: 40 layers of CCA attention, 8 heads and 2 KV heads of 128, conv
    # kernels 2 and 2): keys and values per token, a conv state of 1,280 x 2 and a delayed value
    # of 128 (stored float32) every 64 tokens (since session 67; refused before)
    zaya = ZayaConfig()
    g = Geometry.from_hf_config(zaya)
    assert g.fields["linear_state"] == [1280, 2, 128] and g.restore_step == 64
    per_token = 40 * (2 * 2 * 128 * 2 + 2560 // 64 * 2 + 4 * 4)  # the delayed value: 2 values a token, rounded to 4
    assert per_token == 44_800 and g.footprint(1000).total == 1000 * per_token
    assert spec_for_config(zaya, torch.bfloat16).bytes_per_token == per_token
    with pytest.raises(ConfigError, match="side by side"):
        Geometry.from_config_dict({**zaya.to_dict(), "layer_types": ["hybrid_sliding"] * 40})
    with pytest.raises(ConfigError, match="layer_group_size"):
        Geometry.from_config_dict({k: v for k, v in as_json.items() if k != "layer_group_size"})


def test_mamba_models_alone_count_their_states_at_restore_points(tmp_path, capsys):
    """Mamba, Falcon Mamba and Mamba-2 have Mamba layers alone (refused before session 67: their
    configs name no attention fields, and no layer types in a config.json): family ``state``,
    each layer's states stored at restore points where they spread to no more than 1,024 values
    per token (there is no attention layer to weigh them against), or the config's
    tierkv_restore_step; from a config.json as from transformers' config, calc included."""
    pytest.importorskip("transformers")
    from transformers import BambaConfig, FalconMambaConfig, Mamba2Config, MambaConfig

    from tierkv.integrations.hf import spec_for_config

    # mamba-130m's layout (24 layers, inner dim 1,536, state 16): 30,720 values a layer, every 64 tokens
    small = MambaConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=24)
    g = Geometry.from_hf_config(small)
    assert g.family == "state" and g.fields["linear_state"] == [1536, 4, 1536, 16] and g.restore_step == 64
    per_token = 24 * (1536 * 4 // 64 * 2 + 1536 * 16 // 64 * 4)
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 41_472
    assert spec_for_config(small, torch.bfloat16).bytes_per_token == per_token == g.kvspec().bytes_per_token
    assert g.footprint(1000, kv_bits=8).total == 1000 * (per_token - 24 * 96)  # the recurrent state stays float32
    # Falcon Mamba 7B's layout (64 layers, inner 8,192, state 16): every 256 tokens
    falcon = FalconMambaConfig(hidden_size=4096, intermediate_size=8192, num_hidden_layers=64)
    g = Geometry.from_hf_config(falcon)
    assert g.restore_step == 256 and g.footprint(1).total == 64 * (8192 * 4 // 256 * 2 + 8192 * 16 // 256 * 4)
    # transformers' default Mamba-2 (Mamba-Codestral 7B's layout: 128 heads of 64, state 128, 8
    # groups): 1,089,536 values a layer, every 2,048 tokens
    codestral = Mamba2Config()
    g = Geometry.from_hf_config(codestral)
    assert g.fields["linear_state"] == [128 * 64 + 2 * 8 * 128, 4, 128, 64, 128] and g.restore_step == 2048
    per_token = 64 * (10240 * 4 // 2048 * 2 + 128 * 64 * 128 // 2048 * 4)
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 133_632
    assert spec_for_config(codestral, torch.bfloat16).bytes_per_token == per_token
    # a config.json names neither layer types nor attention fields: the same geometry from it,
    # and from Mamba-1's expand where it names no intermediate_size; tierkv_restore_step honoured
    raw = {k: v for k, v in small.to_dict().items() if k != "intermediate_size"}
    assert Geometry.from_config_dict(raw).fields == Geometry.from_hf_config(small).fields
    assert Geometry.from_config_dict({**raw, "tierkv_restore_step": 1024}).restore_step == 1024
    with pytest.raises(ConfigError, match="multiple of 64"):
        Geometry.from_config_dict({**raw, "tierkv_restore_step": 100})
    with pytest.raises(ConfigError, match="needs positive ints"):
        Geometry.from_config_dict({k: v for k, v in codestral.to_dict().items() if k != "n_groups"})
    # a restore reads one restore point's states, whatever the context: 2,048 tokens' share at 128K
    r = plan(g, 128_000, 10, hbm=0, dram=0, ssd=1 << 50)
    assert r["restore_point"] == 126_976 and r["reload_bytes"] == 2048 * per_token
    assert r["session_bytes"] == 128_000 * per_token and r["reload_s"]["ssd"] == 2048 * per_token / 1.4 / 6e9
    assert plan(g, 2000, 1, hbm=0, dram=0, ssd=1 << 40)["reload_bytes"] == 0  # before the first restore point
    # a hybrid reads every token's keys and values before the point, its states only there
    bamba = Geometry.from_hf_config(BambaConfig(attn_layer_indices=[9, 18, 27]))
    state = bamba.state_bytes_per_token()
    assert state == 29 * (20 * 2 + 1024 * 4)
    assert plan(bamba, 5000, 1, hbm=0, dram=0, ssd=1 << 40)["reload_bytes"] == 4096 * (132_232 - state) + 2048 * state
    p = tmp_path / "config.json"
    p.write_text(json.dumps(codestral.to_dict()))
    assert main(["calc", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "state" and out["restore_step"] == 2048
    assert out["bytes_per_token"] == out["state_bytes_per_token"] == 133_632
    assert main(["calc", str(p), "--block-tokens", "1024"]) == 2
    assert "multiples of 2048 tokens" in capsys.readouterr().err


def test_minimax_counts_its_lightning_states_at_restore_points():
    """MiniMax's lightning attention layers keep one state each, ``[heads, head dim, head dim]``
    in the model's dtype (no conv state), which tierkv stores at restore points (refused before
    session 67), from transformers' config or a config.json that names no layer kinds
    (transformers' default alternation: attention first)."""
    pytest.importorskip("transformers")
    from transformers import MiniMaxConfig

    from tierkv.integrations.hf import spec_for_config

    # transformers' default: 32 layers alternating, 32 heads of 128 (state 524,288 values) against
    # 8 KV heads of 128 (2,048 values per token): every 256 tokens
    default = MiniMaxConfig()
    g = Geometry.from_hf_config(default)
    assert g.fields["lightning_state"] == [32, 128] and g.restore_step == 256
    per_token = 16 * 2 * 8 * 128 * 2 + 16 * (32 * 128 * 128 // 256) * 2
    assert g.footprint(1000).total == 1000 * per_token == 1000 * 131_072
    assert g.state_bytes_per_token() == 16 * 2048 * 2 and g.footprint(1000, kv_bits=8).total == 1000 * per_token // 2
    assert spec_for_config(default, torch.bfloat16).bytes_per_token == per_token
    assert Geometry.from_config_dict({k: v for k, v in default.to_dict().items() if k != "layer_types"}).fields == g.fields
    # MiniMax-Text-01's layout (80 layers, seven lightning then one attention, 64 heads of 128):
    # every 512 tokens
    text01 = MiniMaxConfig(num_hidden_layers=80, hidden_size=6144, num_attention_heads=64, num_key_value_heads=8,
                           head_dim=128, layer_types=["full_attention" if i % 8 == 7 else "linear_attention"
                                                      for i in range(80)])
    g = Geometry.from_hf_config(text01)
    assert g.restore_step == 512
    assert g.footprint(1).total == 10 * 2 * 8 * 128 * 2 + 70 * (64 * 128 * 128 // 512) * 2 == 327_680
    with pytest.raises(ConfigError, match="multiple of 64"):
        Geometry.from_config_dict({**text01.to_dict(), "tierkv_restore_step": 500})


def test_plan_cascades_and_reports_assumptions():
    r = plan(preset("qwen3-8b"), 128_000, 100, hbm=40 * GIB, dram=400 * GIB, ssd=4000 * GIB)
    per = r["session_bytes"]
    assert per == 128_000 * 36 * 2 * 8 * 128 * 2
    assert r["placed"]["hbm"] == int(40 * GIB // per)
    assert sum(r["placed"].values()) + r["unplaced"] == 100
    assert r["reload_s"]["ssd"] >= r["reload_s"]["dram"] > 0
    assert r["restore_point"] == 128_000 and r["reload_bytes"] == per  # every token's KV
    assert set(r["assumptions"]) >= {"ssd_gbps", "pcie_gbps", "codec_ratio", "kv_bits"}


@pytest.mark.parametrize("text,n", [("4096", 4096), ("128k", 128_000), ("1M", 1_000_000), ("1.5k", 1500)])
def test_parse_tokens(text, n):
    assert parse_tokens(text) == n


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tierkv.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,msg", [
    (["calc", "no-such-model"], "unknown model"),
    (["calc", "glm-5", "--tokens", "0"], "positive"),
    (["calc", "glm-5", "--tokens", "-3"], "not a number"),
    (["calc", "glm-5", "--kv-bits", "3"], "invalid choice"),
    (["plan", "glm-5", "--sessions", "0"], "sessions"),
    (["plan", "glm-5", "--hbm", "lots"], "--hbm"),
])
def test_cli_bad_input_exit_2(args, msg):
    r = run_cli(*args)
    assert r.returncode == 2 and msg in r.stderr


def test_cli_malformed_config_json(tmp_path, capsys):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    assert main(["calc", str(p)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    p.write_text(json.dumps({"num_hidden_layers": 4}))
    assert main(["calc", str(p)]) == 2
    assert "attention fields" in capsys.readouterr().err


def test_cli_calc_json_list_and_help(capsys):
    assert main(["calc", "glm-5", "--tokens", "1M", "--kv-bits", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total_gib"], 2) == 60.44 and out["indexer_bytes"] > 0
    assert main(["calc", "--list"]) == 0
    assert "deepseek-v4-pro" in capsys.readouterr().out
    assert "1M = 1,000,000" in run_cli("calc", "--help").stdout
    assert main(["plan", "deepseek-v4-pro", "--tokens", "1M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"]["hbm"] >= 1


def test_cli_calc_block_size(capsys):
    """``--block-tokens``: one stored block's bytes and each layer's (what a restore reads per
    request), pointing at the block-size measurements where a layer is under 512 KiB; DeepSeek
    V4 (not a per-token layout) and sizes outside the store's range are refused."""
    assert main(["calc", "qwen3-8b", "--block-tokens", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["block_bytes"], out["block_layer_bytes"]) == (128 * 144 * 1024, 512 * 1024)  # 36 layers, 144 KiB a token
    assert main(["calc", "qwen3-8b", "--block-tokens", "256"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "  a block of 256 tokens: 36.00 MiB, 1.00 MiB per layer"
    assert main(["calc", "qwen3-8b", "--block-tokens", "64"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "9.00 MiB, 256.00 KiB per layer" in line and "Choosing a block size" in line
    assert main(["calc", "smollm2-135m", "--block-tokens", "1024"]) == 0
    assert "Choosing" not in capsys.readouterr().out                    # 768 KiB a layer
    assert main(["calc", "deepseek-v3.2", "--block-tokens", "256", "--kv-bits", "8", "--json"]) == 0
    dsa = json.loads(capsys.readouterr().out)
    assert dsa["block_bytes"] == pytest.approx(256 * dsa["bytes_per_token"])  # its indexer's keys too, as tierkv stores them
    assert main(["calc", "qwen3-8b", "--json"]) == 0
    assert "block_bytes" not in json.loads(capsys.readouterr().out)
    assert main(["calc", "deepseek-v4-flash", "--block-tokens", "1024"]) == 2
    assert "not a per-token layout" in capsys.readouterr().err
    assert main(["calc", "qwen3-8b", "--block-tokens", "8"]) == 2
    assert "16..4096" in capsys.readouterr().err


def test_cli_calc_restore_points(tmp_path, capsys):
    """A model with state layers (here transformers' default Bamba config, attention at layers 9,
    18 and 27) restores at restore points: calc says how far apart and what share of each token's
    bytes their states take, and refuses a block that is not a multiple of the step (the store
    would refuse it)."""
    pytest.importorskip("transformers")
    from transformers import BambaConfig

    p = tmp_path / "config.json"
    p.write_text(json.dumps(BambaConfig(attn_layer_indices=[9, 18, 27]).to_dict()))
    assert main(["calc", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # 29 Mamba layers: a bf16 conv state of 20 values and a float32 recurrent state of 1,024 per token
    assert out["restore_step"] == 2048 and out["state_bytes_per_token"] == 29 * (20 * 2 + 1024 * 4) == 119_944
    assert out["bytes_per_token"] == 132_232
    assert main(["calc", str(p), "--kv-bits", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state_bytes_per_token"] == 29 * (20 + 1024 * 4)
    assert main(["calc", str(p)]) == 0
    assert "restore points every 2,048 tokens" in capsys.readouterr().out
    assert main(["calc", str(p), "--block-tokens", "1024"]) == 2
    assert "multiples of 2048 tokens" in capsys.readouterr().err
    assert main(["calc", str(p), "--block-tokens", "2048"]) == 0
    capsys.readouterr()
    assert main(["calc", "qwen3-8b", "--json"]) == 0
    assert "restore_step" not in json.loads(capsys.readouterr().out)
