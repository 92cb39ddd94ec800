"""KV-cache arithmetic: bytes per token of a model's attention geometry, and tier planning.

Primitives:
    Geometry: a model's attention geometry in one of five families (gqa, mla, mla_dsa, v4_hybrid,
        and ``state`` for a model of state layers alone), from a preset, a transformers config or
        a config.json.
    Footprint: bytes of KV for a context, split into KV, indexer and sliding-window parts.
    load_presets / preset: the bundled presets (tierkv/data/geometry_presets.json).
    parse_tokens: "128k" -> 128_000, "1M" -> 1_000_000.
    plan: how many sessions fit in HBM, DRAM and SSD, and how long one takes to reload.

For gqa and mla models the per-token bytes come from the engine's own ``KVSpec`` (``Geometry.kvspec``):
the planner and the store can never disagree about what a token of KV weighs. A gqa config with
short-convolution layers (LFM2's ``conv`` layer type) counts each conv layer's per-token input,
as the transformers integration stores it. A gated delta net layer (Qwen3-Next's and Qwen3.5's
``linear_attention``) keeps a state instead, which tierkv stores at restore points, every
``restore_step`` tokens, spread over that many tokens: it counts that share per token. A
Mamba layer of a hybrid model (Bamba, Granite 4.0-H, Nemotron-H: Mamba-2; Jamba: Mamba-1) keeps
a conv state and a recurrent state too, stored the same way (Nemotron-H's MLP and MoE layers keep
nothing, and count nothing; Falcon-H1's layers, and Zamba2's "hybrid" ones, run attention and
Mamba side by side, and count both). Kimi Linear's and Bailing Hybrid's KDA layers beside MLA
count the same way, and MiniMax's lightning attention layers their one state (``[heads, head
dim, head dim]`` in the model's dtype). A model of Mamba layers alone (Mamba, Mamba-2, Falcon
Mamba: family ``state``) counts its states only, at restore points placed by a rule of its own
(``Geometry.restore_step``).
Other recurrent states (GLM-5-Next's beside MLA; linear-attention kinds tierkv does not know)
are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, cast

from .config import BLOCK_TOKENS
from .errors import ConfigError
from .spec import KVSpec, LayerSpec, TensorSpec

__all__ = ["Geometry", "Footprint", "load_presets", "preset", "parse_tokens", "plan", "FAMILIES", "BITS"]

FAMILIES = ("gqa", "mla", "mla_dsa", "v4_hybrid", "state")
BITS = (32, 16, 8, 4)
_REQUIRED = {
    "gqa": ("num_hidden_layers", "num_key_value_heads", "head_dim"),
    "mla": ("num_hidden_layers", "kv_lora_rank", "qk_rope_head_dim"),
    "mla_dsa": ("num_hidden_layers", "kv_lora_rank", "qk_rope_head_dim", "index_head_dim"),
    "v4_hybrid": ("num_hidden_layers", "head_dim", "sliding_window", "index_head_dim", "compress_ratios"),
    "state": ("num_hidden_layers", "linear_state"),
}
#: models of Mamba layers alone (no attention): their config names neither layer types (a
#: property of transformers' config, not in its config.json) nor a Mamba layer's fields as the
#: hybrids do; the names each gives its Mamba-1 (state size, conv kernel, inner dim) or Mamba-2
#: (heads, head dim, state size, groups, conv kernel) fields
_STATE_ONLY_MODELS = {"mamba": ("state_size", "conv_kernel", "intermediate_size"),
                      "falcon_mamba": ("state_size", "conv_kernel", "intermediate_size"),
                      "mamba2": ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel")}
#: a model of state layers alone has no attention layer to weigh its states against: its restore
#: points lie where one layer's state spreads to no more values per token than this (1,024
#: float32 values, 4 KiB: the bytes a layer of Llama 3 8B's layout, 8 KV heads of 128, keeps per
#: token in bf16)
STATE_ONLY_VALUES_PER_TOKEN = 1024
#: layer types whose cache is a recurrent state (Qwen3-Next, Qwen3.5, Mamba hybrids): no token's
#: own values give it back. Gated delta nets and Mamba layers (``linear_attention`` with the
#: fields below) are stored at restore points; the others are refused, as a footprint would be wrong
_STATE_LAYER_TYPES = ("linear_attention", "mamba", "mamba2", "ssm")
#: a layer that runs attention and a Mamba layer side by side (Falcon-H1's every layer): both kept
PARALLEL_TYPE = "hybrid"
#: the same over a sliding window (no model tierkv knows): refused
_PARALLEL_LAYER_TYPES = ("hybrid_sliding",)
#: the names transformers gives older layer types (``mamba`` is a Mamba layer, as ``linear_attention``)
_LEGACY_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
#: Nemotron-H's layer pattern, one character per layer
_PATTERN_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
#: layers that keep no cache at all (Nemotron-H's MLP and MoE layers): no tensors stored for them
NO_CACHE_TYPES = ("mlp", "moe")
#: a gated delta net layer's config fields (Qwen3-Next, Qwen3.5): conv kernel, heads and head dims
_GDN_FIELDS = ("linear_conv_kernel_dim", "linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads",
               "linear_value_head_dim")
#: a Mamba-2 layer's config fields, as each family names them: heads, head dim, state size,
#: groups, conv kernel (Bamba, Granite 4.0-H and Falcon-H1; Nemotron-H; Zamba2)
_MAMBA2_FIELDS = (("mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups", "mamba_d_conv"),
                  ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel"),
                  ("n_mamba_heads", "mamba_headdim", "mamba_d_state", "mamba_ngroups", "mamba_d_conv"))
#: a Mamba-1 layer's (Jamba's): state size, conv kernel, expansion of the hidden size
_MAMBA1_FIELDS = ("mamba_d_state", "mamba_d_conv", "mamba_expand")
#: restore points of a model with state layers lie on multiples of this (its kernels' chunk size)
GDN_MIN_STEP = 64
_TOKENS_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgG]?)\s*$")


def parse_tokens(text: str | int) -> int:
    """Token count from ``"4096"``, ``"128k"`` (128,000) or ``"1M"`` (1,000,000); decimal units."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _TOKENS_RE.match(str(text))
        if not m:
            raise ConfigError(f"token count {text!r} is not a number like 4096, 128k or 1M")
        n = int(float(m.group(1).replace("_", "")) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"token count must be positive, got {text!r}")
    return n


def is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def spread_width(elements: int, step: int) -> int:
    """Elements per token of a state of ``elements`` spread over ``step`` tokens, rounded up to 4
    (so every tensor of a layer starts 4-byte aligned, KVSpec's rule, whatever the dtype)."""
    return -(-elements // (4 * step)) * 4


def _layer_types(cfg: dict[str, Any], name: str) -> list[str] | None:
    """Each layer's cache type, as transformers names it, from whichever field a config gives it
    in (``layer_types``, ``layers_block_type``, Bamba's ``attn_layer_indices``, Jamba's
    ``attn_layer_period``/``attn_layer_offset``, Nemotron-H's ``hybrid_override_pattern``); None
    for a config with none. Layers whose cache tierkv does not store are refused here."""
    types = cfg.get("layer_types") or cfg.get("layers_block_type")
    layers: int = cfg["num_hidden_layers"] if is_positive_int(cfg.get("num_hidden_layers")) else 0
    if isinstance(cfg.get("hybrid_override_pattern"), str) and not isinstance(types, list):
        pattern = cfg["hybrid_override_pattern"]
        if set(pattern) - set(_PATTERN_TYPES):
            raise ConfigError(f"{name}: hybrid_override_pattern {pattern!r} holds layers other than {set(_PATTERN_TYPES)}")
        types = [_PATTERN_TYPES[c] for c in pattern]
    elif layers and not isinstance(types, list):
        if isinstance(cfg.get("attn_layer_indices"), list):
            types = ["full_attention" if i in cfg["attn_layer_indices"] else "linear_attention" for i in range(layers)]
        elif is_positive_int(cfg.get("attn_layer_period")) and isinstance(cfg.get("attn_layer_offset"), int):
            period, offset = int(cfg["attn_layer_period"]), int(cfg["attn_layer_offset"])
            types = ["full_attention" if i % period == offset else "linear_attention" for i in range(layers)]
    if not isinstance(types, list) and cfg.get("model_type") == "falcon_h1" and layers:
        types = [PARALLEL_TYPE] * layers  # attention and Mamba in every layer (its config's own layers_block_type)
    if not isinstance(types, list) and cfg.get("model_type") == "minimax" and layers:
        # transformers' MiniMax default where a config names none: attention, then lightning, alternating
        types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(layers)]
    if not isinstance(types, list):
        if any(k in cfg for k in ("mamba_d_state", "ssm_state_size", "mamba_n_heads", "mamba_num_heads")):
            raise ConfigError(f"{name}: a Mamba config that says nowhere which layers attend: tierkv cannot "
                              "tell what it stores")
        return None
    types = [_LEGACY_TYPES.get(t, t) for t in types]
    if not cfg.get("num_hidden_layers"):  # Nemotron-H: its pattern says how many layers there are
        cfg["num_hidden_layers"] = len(types)
    parallel = sorted({t for t in types if t in _PARALLEL_LAYER_TYPES})
    if parallel:
        raise ConfigError(f"{name}: layers of type {parallel} run sliding-window attention and a recurrent state "
                          "side by side: tierkv does not store them")
    state = sorted({t for t in types if t in _STATE_LAYER_TYPES and t != "linear_attention"})
    if state:
        raise ConfigError(f"{name}: layers of type {state} keep a recurrent state of a kind tierkv does not know")
    return types


def _linear_state(cfg: dict[str, Any], name: str) -> list[int]:
    """A state layer's shapes ``[conv dim, kernel, *recurrent state]``: a gated delta net's
    (recurrent ``[value heads, key dim, value dim]``), a Mamba-2 layer's (``[heads, head dim,
    state size]``) or a Mamba-1 layer's (``[inner dim, state size]``), from the config's fields."""
    if cfg.get("model_type") == "zaya":
        # ZAYA's CCA: a conv state of the queries' and keys' projections over two convolutions'
        # kernels, and the last token's delayed half of each value head (in the model's dtype)
        try:
            heads, kv, dim = (int(cfg[k]) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
            kernel = int(cfg["cca_time0"]) - 1 + int(cfg["cca_time1"]) - 1
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{name}: a ZAYA config lacks a field tierkv needs: {e}") from None
        return [(heads + kv) * dim, kernel, kv * dim // 2]
    if cfg.get("model_type") == "zamba" and all(is_positive_int(cfg.get(k)) for k in (
            "n_mamba_heads", "mamba_d_state", "mamba_d_conv", "mamba_expand", "hidden_size")):
        # Zamba (v1): Mamba-1 layers split into heads, recurrent state [heads, inner / heads, state size]
        inner, heads = int(cfg["mamba_expand"]) * int(cfg["hidden_size"]), int(cfg["n_mamba_heads"])
        return [inner, int(cfg["mamba_d_conv"]), heads, inner // heads, int(cfg["mamba_d_state"])]
    if all(is_positive_int(cfg.get(k)) for k in _GDN_FIELDS):
        kernel, nk, dk, nv, dv = (int(cfg[k]) for k in _GDN_FIELDS)
        return [2 * nk * dk + nv * dv, kernel, nv, dk, dv]
    for names in _MAMBA2_FIELDS:
        values: list[Any] = [cfg.get(k) for k in names]
        if values[1] == "auto" and is_positive_int(values[0]):  # Bamba: expand x hidden over the heads
            try:  # (Falcon-H1: its mamba_d_ssm, where set)
                inner = cfg.get("mamba_d_ssm") or int(cfg["mamba_expand"] * cfg["hidden_size"])
                values[1] = int(inner) // int(values[0])
            except (KeyError, TypeError) as e:
                raise ConfigError(f"{name}: mamba_d_head 'auto' needs mamba_expand and hidden_size: {e}") from None
        if all(is_positive_int(v) for v in values):
            heads, head_dim, d_state, groups, kernel = (int(v) for v in values)
            return [heads * head_dim + 2 * groups * d_state, kernel, heads, head_dim, d_state]
    if all(k in cfg for k in _MAMBA1_FIELDS) and not any(k in cfg for names in _MAMBA2_FIELDS for k in names[:2]):
        d_state, kernel = cfg["mamba_d_state"], cfg["mamba_d_conv"]
        inner = cfg["mamba_expand"] * cfg.get("hidden_size", 0)
        if all(is_positive_int(v) for v in (d_state, kernel, inner)):
            return [inner, kernel, inner, d_state]
    raise ConfigError(f"{name}: layers of type linear_attention (or mamba) keep a recurrent state, and the config "
                      f"has neither a gated delta net's fields {list(_GDN_FIELDS)} nor a Mamba layer's "
                      f"({[list(n) for n in _MAMBA2_FIELDS]} or {list(_MAMBA1_FIELDS)}): not a state tierkv knows")


def _state_only(cfg: dict[str, Any], name: str) -> tuple[list[str], list[int]]:
    """A model of Mamba layers alone: every layer's type (``linear_attention``, as transformers'
    config names them) and their states' shapes ``[conv dim, kernel, *recurrent state]``: Mamba-1
    (Mamba, Falcon Mamba) ``[inner, kernel, inner, state size]``, Mamba-2 ``[heads x head dim + 2 x
    groups x state size, kernel, heads, head dim, state size]``."""
    names = _STATE_ONLY_MODELS[cfg["model_type"]]
    values: list[Any] = [cfg.get(k) for k in names]
    if len(names) == 3 and values[2] is None and is_positive_int(cfg.get("hidden_size")):
        values[2] = int(cfg.get("expand", 2)) * int(cfg["hidden_size"])  # Mamba-1's inner dim, where unnamed
    if not is_positive_int(cfg.get("num_hidden_layers")) or not all(is_positive_int(v) for v in values):
        raise ConfigError(f"{name}: a {cfg['model_type']} config needs positive ints num_hidden_layers and "
                          f"{list(names)}, got {dict(zip(names, values))}")
    if len(names) == 3:
        d_state, kernel, inner = (int(v) for v in values)
        state = [inner, kernel, inner, d_state]
    else:
        heads, head_dim, d_state, groups, kernel = (int(v) for v in values)
        state = [heads * head_dim + 2 * groups * d_state, kernel, heads, head_dim, d_state]
    return ["linear_attention"] * int(cfg["num_hidden_layers"]), state


def _check_restore_step(cfg: dict[str, Any], name: str) -> None:
    step = cfg.get("tierkv_restore_step")
    if step is not None and not (is_positive_int(step) and step % GDN_MIN_STEP == 0 and step <= BLOCK_TOKENS[1]):
        raise ConfigError(f"{name}: tierkv_restore_step must be a positive multiple of {GDN_MIN_STEP} up to "
                          f"{BLOCK_TOKENS[1]} (a store's largest block, which it must divide), got {step!r}")


def _check_bits(bits: int, what: str) -> None:
    if bits not in BITS:
        raise ConfigError(f"{what} must be one of {BITS[1:]} (or 32 for fp32), got {bits}")


@dataclass(frozen=True)
class Footprint:
    """KV bytes of one context."""

    tokens: int
    kv: float         # per-token KV (gqa key/value, MLA latent) or V4's compressed entries
    indexer: float    # sparse-attention indexer keys
    window: float     # V4's sliding-window entries (independent of context beyond the window)

    @property
    def total(self) -> float:
        return self.kv + self.indexer + self.window

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "kv_bytes": self.kv, "indexer_bytes": self.indexer,
                "window_bytes": self.window, "total_bytes": self.total, "total_gib": self.total / 2**30}


@dataclass(frozen=True)
class Geometry:
    """A model's attention geometry.

    Attributes:
        name: preset name or model id.
        family: one of FAMILIES.
        fields: the config fields the family's formula reads (named as in config.json).
        source: where the fields come from.
    """

    name: str
    family: str
    fields: dict[str, Any] = field(hash=False)
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"{self.name}: unknown family {self.family!r}; known: {FAMILIES}")
        missing = [f for f in _REQUIRED[self.family] if f not in self.fields]
        if missing:
            raise ConfigError(f"{self.name}: a {self.family} geometry needs {missing}")
        for k, v in self.fields.items():
            if k == "compress_ratios":
                if not isinstance(v, list) or not all(isinstance(r, int) and r >= 0 for r in v):
                    raise ConfigError(f"{self.name}: compress_ratios must be a list of non-negative ints")
            elif k in _REQUIRED[self.family] and k != "linear_state" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"{self.name}: {k} must be a positive int, got {v!r}")
        if "conv_dim" in self.fields and not (
                isinstance(self.fields["conv_dim"], int) and self.fields["conv_dim"] > 0
                and isinstance(self.fields.get("layer_types"), list) and len(self.fields["layer_types"]) >= self.layers):
            raise ConfigError(f"{self.name}: conv_dim needs a positive int and one layer_types entry per layer")
        if "linear_state" in self.fields and not (
                isinstance(self.fields["linear_state"], list) and len(self.fields["linear_state"]) in (3, 4, 5)
                and all(is_positive_int(x) for x in self.fields["linear_state"])
                and isinstance(self.fields.get("layer_types"), list) and len(self.fields["layer_types"]) >= self.layers):
            raise ConfigError(f"{self.name}: linear_state needs three to five positive ints (conv dim, kernel, then "
                              "the recurrent state's shape) and one layer_types entry per layer")
        if "lightning_state" in self.fields and not (
                isinstance(self.fields["lightning_state"], list) and len(self.fields["lightning_state"]) == 2
                and all(is_positive_int(x) for x in self.fields["lightning_state"])
                and isinstance(self.fields.get("layer_types"), list) and len(self.fields["layer_types"]) >= self.layers):
            raise ConfigError(f"{self.name}: lightning_state needs two positive ints (heads, head dim) and one "
                              "layer_types entry per layer")
        if self.family == "v4_hybrid" and len(self.fields["compress_ratios"]) < self.layers:
            raise ConfigError(f"{self.name}: compress_ratios needs one entry per layer ({self.layers})")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], name: str = "", source: str = "") -> "Geometry":
        """Geometry of a config.json's fields; the family is inferred (GQA and MLA fields)."""
        cfg = dict(cfg.get("text_config") or cfg)
        name = name or cfg.get("_name_or_path") or cfg.get("model_type") or "model"
        if "family" in cfg:
            family = cfg["family"]
        elif cfg.get("model_type") in _STATE_ONLY_MODELS:
            family = "state"
            cfg["layer_types"], cfg["linear_state"] = _state_only(cfg, name)
            _check_restore_step(cfg, name)
        elif "compress_ratios" in cfg:
            family = "v4_hybrid"
        elif cfg.get("kv_lora_rank") and cfg.get("index_head_dim"):
            family = "mla_dsa"
        elif cfg.get("kv_lora_rank"):
            family = "mla"
        else:
            family = ""
        if family == "mla" and cfg.get("model_type") in ("kimi_linear", "bailing_hybrid"):
            # Kimi Linear and Bailing Hybrid (Ring-linear): MLA beside KDA layers, whose conv state
            # (q, k and v: 3 x heads x head dim, over the kernel) and float32 recurrent state
            # [heads, head dim, head dim] tierkv stores at restore points, as a gated delta net's
            kda = cfg.get("linear_attn_config") or {}  # Kimi's config.json's names (transformers' are flat)
            layers = int(cfg["num_hidden_layers"]) if is_positive_int(cfg.get("num_hidden_layers")) else 0
            if not isinstance(cfg.get("layer_types"), list) and kda.get("kda_layers") and kda.get("full_attn_layers"):
                full = set(kda["full_attn_layers"])  # 1-indexed there
                cfg["layer_types"] = ["full_attention" if i + 1 in full else "linear_attention" for i in range(layers)]
            if cfg["model_type"] == "bailing_hybrid":
                # its config.json's names: the KDA heads are the attention heads, of head_dim (which
                # transformers' config then sets to the rotary dim, keeping the KDA's flat, as Kimi's);
                # the last layer of each layer_group_size attends
                kda = {"num_heads": cfg.get("num_attention_heads"), "head_dim": cfg.get("head_dim"),
                       "short_conv_kernel_size": cfg.get("short_conv_kernel_size")}
                group: Any = cfg.get("layer_group_size")
                if not isinstance(cfg.get("layer_types"), list) and is_positive_int(group):
                    cfg["layer_types"] = ["full_attention" if (i + 1) % group == 0 else "linear_attention"
                                          for i in range(layers)]
            heads, dim, kernel = (cast(Any, cfg.get(k) or kda.get(j)) for k, j in (
                ("linear_num_heads", "num_heads"), ("linear_head_dim", "head_dim"),
                ("linear_conv_kernel_dim", "short_conv_kernel_size")))
            types = cfg.get("layer_types")
            if not (isinstance(types, list) and len(types) == cfg.get("num_hidden_layers")
                    and all(is_positive_int(x) for x in (heads, dim, kernel))):
                raise ConfigError(f"{name}: a {cfg['model_type']} config needs layer_types (or Kimi Linear's "
                                  "linear_attn_config kda_layers and full_attn_layers, Bailing Hybrid's "
                                  "layer_group_size) and its KDA heads, head dim and conv kernel")
            cfg["linear_state"] = [3 * heads * dim, kernel, heads, dim, dim]
        elif family in ("mla", "mla_dsa") and any(t in _STATE_LAYER_TYPES for t in cfg.get("layer_types") or ()):
            # MLA beside a recurrent state of another kind, which MLA's formula would count as latents
            raise ConfigError(f"{name}: MLA layers beside layers that keep a recurrent state of a kind tierkv "
                              "does not know: tierkv does not store such a model")
        if not family:
            family = "gqa"
            try:
                heads = int(cfg["num_attention_heads"])
                cfg.setdefault("num_key_value_heads", heads)
                if not cfg.get("head_dim") and cfg.get("model_type") in ("zamba", "zamba2"):
                    # Zamba2's shared attention runs over twice the hidden size: its own head dim
                    cfg["head_dim"] = int(cfg["attention_head_dim"])
                if not cfg.get("head_dim"):
                    cfg["head_dim"] = int(cfg["hidden_size"]) // heads
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                raise ConfigError(f"{name}: config lacks attention fields (num_attention_heads, hidden_size "
                                  f"or head_dim): {e}") from None
            types = _layer_types(cfg, name)
            if types is not None:
                kept = {"linear_attention", "conv", PARALLEL_TYPE, *NO_CACHE_TYPES} & set(types)
                if kept and len(types) != int(cfg.get("num_hidden_layers", -1)):
                    raise ConfigError(f"{name}: {len(types)} layer_types for {cfg.get('num_hidden_layers')} layers")
                cfg["layer_types"] = types
                if "linear_attention" in types and cfg.get("model_type") == "minimax":
                    # MiniMax's lightning attention: one state per layer, [heads, head dim, head
                    # dim] in the model's dtype (K^T V, decayed), no conv state
                    cfg["lightning_state"] = [heads, int(cfg["head_dim"])]
                    _check_restore_step(cfg, name)
                elif "linear_attention" in types or PARALLEL_TYPE in types:
                    # gated delta nets and Mamba layers: their conv state [conv_dim, kernel] and
                    # recurrent state, stored at restore points
                    cfg["linear_state"] = _linear_state(cfg, name)
                    _check_restore_step(cfg, name)
                if "conv" in types:  # LFM2-family short convolutions: tierkv stores each token's input
                    cfg["conv_dim"] = int(cfg["hidden_size"])
                elif not kept:
                    cfg.pop("layer_types")
        keep = set(_REQUIRED.get(family, ())) | {"mtp_layers", "num_key_value_heads", "max_position_embeddings",
                                                 "layer_types", "conv_dim", "linear_state", "lightning_state",
                                                 "tierkv_restore_step"}
        return cls(name, family, {k: cfg[k] for k in keep if k in cfg}, source)

    @classmethod
    def from_config_json(cls, path: str) -> "Geometry":
        """Geometry of a model's config.json (a file, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_config_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))), source=path)

    @classmethod
    def from_hf_config(cls, config: Any) -> "Geometry":
        """Geometry of a transformers config object."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        return cls.from_config_dict(d, source="transformers config")

    # -- arithmetic -----------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return int(self.fields["num_hidden_layers"])

    def layer_count(self, include_mtp: bool = False) -> int:
        """Layers that keep KV: the hidden layers but those that keep no cache (Nemotron-H's MLP
        and MoE layers), and with ``include_mtp`` the MTP layers too."""
        empty = sum(t in NO_CACHE_TYPES for t in self.fields.get("layer_types", ())[:self.layers])
        return self.layers - empty + (int(self.fields.get("mtp_layers", 0)) if include_mtp else 0)

    @property
    def restore_step(self) -> int:
        """Tokens between the points a cache of this model can be restored at: 1, or for a model
        with state layers (gated delta nets, Mamba) the smallest power of two, at least
        ``GDN_MIN_STEP``, over which one layer's state (conv and recurrent) spreads to no more
        elements per token than an attention layer's keys and values: 1,024 for Qwen3-Next-80B (a
        state of 557,056 elements against 1,024 per token), 512 for transformers' default Qwen3.5
        config, 2,048 for transformers' default Bamba config (attention at layers 9, 18 and 27: a
        Mamba-2 state of 2,131,968 elements against 2,048), 128 for its default Jamba config
        (Mamba-1). A model of state layers alone (family ``state``) has no attention layer to
        weigh against: its step spreads a state to no more than ``STATE_ONLY_VALUES_PER_TOKEN``
        values per token (64 for mamba-130m, 256 for Falcon Mamba 7B, 2,048 for Mamba-Codestral
        7B). Or the config's ``tierkv_restore_step`` (a multiple of 64), where set. A store's ``block_tokens`` must be a
        multiple of it, so it is never more than the largest block (4,096): a state that would
        want more spreads over 4,096 tokens, more values per token than the rule's."""
        values = self._state_values()
        if not values:
            return 1
        if self.fields.get("tierkv_restore_step"):
            return int(self.fields["tierkv_restore_step"])
        f = self.fields  # an attention layer's values per token: keys and values, or an MLA latent
        per_token = (int(f["kv_lora_rank"]) + int(f["qk_rope_head_dim"]) if self.family == "mla"
                     else STATE_ONLY_VALUES_PER_TOKEN if self.family == "state"
                     else 2 * int(f["num_key_value_heads"]) * int(f["head_dim"]))
        step = GDN_MIN_STEP
        while -(-values // step) > per_token and step < BLOCK_TOKENS[1]:
            step *= 2
        return step

    def _state_values(self) -> int:
        """Values of one state layer's states (conv and recurrent; MiniMax's lightning state), or 0."""
        if self.fields.get("lightning_state"):
            heads, dim = self.fields["lightning_state"]
            return int(heads) * int(dim) * int(dim)
        if self.fields.get("linear_state"):
            conv, kernel, *recurrent = self.fields["linear_state"]
            return int(conv) * int(kernel) + math.prod(recurrent)
        return 0

    def state_bytes_per_token(self, kv_bits: int = 16, include_mtp: bool = False) -> float:
        """Bytes per token of the states kept at restore points (conv states at ``kv_bits``,
        recurrent states float32): 0 for a model without state layers."""
        if not self._state_values():
            return 0.0
        _check_bits(kv_bits, "kv bits")
        spec = self.kvspec("uint8", include_mtp)  # one byte per element: elements per token
        return sum(t.bytes_per_token * (1 if t.dtype == "float32" else kv_bits / 8)
                   for layer in spec.layers for t in layer.tensors if t.name in ("conv_state", "recurrent_state"))

    def _state_layer(self, dtype: str) -> LayerSpec:
        """A state layer's stored tensors: its conv state (``dtype``) and recurrent state (float32),
        each spread over the ``restore_step`` tokens before a restore point."""
        conv, kernel, *recurrent = self.fields["linear_state"]
        step = self.restore_step
        return LayerSpec((TensorSpec("conv_state", (1, spread_width(conv * kernel, step)), 1, dtype),
                          TensorSpec("recurrent_state", (1, spread_width(math.prod(recurrent), step)), 1, "float32")))

    def kvspec(self, dtype: str = "bfloat16", include_mtp: bool = False) -> KVSpec:
        """The engine's KVSpec of the per-token part (gqa key/value; MLA latent; a conv layer's
        input; a gated delta net's or Mamba layer's states at restore points, spread over
        ``restore_step`` tokens, the recurrent one in float32 whatever ``dtype``; nothing for a
        layer that keeps no cache)."""
        f = self.fields
        if self.family == "gqa":
            d = (int(f["num_key_value_heads"]), int(f["head_dim"]))
            layer = LayerSpec((TensorSpec("key", d, 1, dtype), TensorSpec("value", d, 1, dtype)))
            by_kind = {"full_attention": layer}
            if f.get("conv_dim"):  # LFM2-family: a conv layer stores each token's convolution input
                by_kind["conv"] = LayerSpec((TensorSpec("conv_input", (1, int(f["conv_dim"])), 1, dtype),))
            elif f.get("lightning_state"):  # MiniMax: its lightning state, in the model's dtype, at restore points
                heads, dim = f["lightning_state"]
                by_kind["linear_attention"] = LayerSpec((TensorSpec(
                    "recurrent_state", (1, spread_width(int(heads) * int(dim) * int(dim), self.restore_step)), 1, dtype),))
            elif f.get("linear_state"):  # a gated delta net or Mamba layer: its states at each restore point
                states = by_kind["linear_attention"] = self._state_layer(dtype)
                # Falcon-H1: attention and Mamba side by side, keys and values then both states
                by_kind[PARALLEL_TYPE] = LayerSpec(layer.tensors + states.tensors)
            if f.get("layer_types"):  # a layer per kind; none for a layer that keeps no cache
                kinds = [k for k in list(f["layer_types"])[:self.layers] if k not in NO_CACHE_TYPES]
                kinds += ["full_attention"] * (self.layer_count(include_mtp) - len(kinds))  # MTP layers attend
                return KVSpec(self.name, tuple(by_kind.get(k, layer) for k in kinds))
        elif self.family == "state":  # Mamba layers alone: their states at each restore point
            layer = self._state_layer(dtype)
        elif self.family in ("mla", "mla_dsa"):
            layer = LayerSpec((TensorSpec("latent", (int(f["kv_lora_rank"]) + int(f["qk_rope_head_dim"]),), 0, dtype),))
            if f.get("linear_state"):  # Kimi Linear: its KDA layers' states at restore points
                kda = self._state_layer(dtype)
                return KVSpec(self.name, tuple(kda if k == "linear_attention" else layer
                                               for k in list(f["layer_types"])[:self.layers]))
        else:
            raise ConfigError(f"{self.name}: a {self.family} cache is not a per-token layout a KVSpec describes")
        return KVSpec(self.name, (layer,) * self.layer_count(include_mtp))

    def footprint(self, tokens: int, kv_bits: int = 16, indexer_bits: int = 16, include_mtp: bool = False) -> Footprint:
        """KV bytes of a ``tokens``-long context at ``kv_bits`` per element (indexer at ``indexer_bits``)."""
        _check_bits(kv_bits, "kv bits")
        _check_bits(indexer_bits, "indexer bits")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ConfigError(f"tokens must be a positive int, got {tokens!r}")
        b_kv, b_idx = kv_bits / 8, indexer_bits / 8
        f = self.fields
        if self.family in ("gqa", "mla", "mla_dsa", "state"):
            spec = self.kvspec("uint8", include_mtp)  # one byte per element: elements per token
            # a state layer's recurrent state is float32 whatever the KV's bits
            fixed = sum(t.bytes_per_token for layer in spec.layers for t in layer.tensors if t.dtype == "float32")
            kv = tokens * ((spec.bytes_per_token - fixed) * b_kv + fixed)
            idx = tokens * self.layer_count(include_mtp) * int(f["index_head_dim"]) * b_idx if self.family == "mla_dsa" else 0.0
            return Footprint(tokens, kv, idx, 0.0)
        ratios = list(f["compress_ratios"][:self.layers])
        if include_mtp:
            ratios += list(f["compress_ratios"][self.layers:])
        hd, idx_d = int(f["head_dim"]), int(f["index_head_dim"])
        window = len(ratios) * min(tokens, int(f["sliding_window"])) * hd * b_kv
        kv = sum((tokens // r) * hd * b_kv for r in ratios if r > 0)
        idx = sum((tokens // 4) * idx_d * b_idx for r in ratios if r == 4)
        return Footprint(tokens, kv, idx, window)


@lru_cache(maxsize=1)
def load_presets() -> dict[str, Geometry]:
    """Every bundled preset, by name."""
    raw = json.loads(resources.files("tierkv").joinpath("data/geometry_presets.json").read_text())
    out = {}
    for name, entry in raw["models"].items():
        entry = dict(entry)
        source = entry.pop("source", "")
        family = entry.pop("family")
        out[name] = Geometry(name, family, entry, source)
    return out


def preset(name: str) -> Geometry:
    """A preset by name, or a config.json path; ConfigError names the known presets otherwise."""
    presets = load_presets()
    if name in presets:
        return presets[name]
    if name.endswith(".json") or os.path.isdir(name):
        return Geometry.from_config_json(name)
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(presets))} (or a config.json path)")


def plan(geom: Geometry, tokens: int, sessions: int, hbm: int, dram: int, ssd: int, kv_bits: int = 16,
         indexer_bits: int = 16, ssd_gbps: float = 6.0, pcie_gbps: float = 50.0, codec_ratio: float = 1.4,
         include_mtp: bool = False) -> dict[str, Any]:
    """How ``sessions`` sessions of ``tokens`` tokens spread over HBM, DRAM and SSD.

    Sessions fill HBM first, then DRAM, then SSD (compressed by ``codec_ratio``). Reload times:
    DRAM -> HBM over PCIe; SSD -> DRAM -> HBM pipelined, so the slower of the SSD read (compressed
    bytes) and the PCIe copy (raw bytes) sets the pace. A model with state layers restores at its
    last restore point (``restore_point``), reading every token's KV before it but its states
    only there (a ``needed_only`` restore, blocks of ``restore_step`` tokens): ``reload_bytes``,
    what the reload times count. A model of state layers alone reads one point's states, whatever
    the context.
    """
    for name, v in (("sessions", sessions), ("ssd_gbps", ssd_gbps), ("pcie_gbps", pcie_gbps), ("codec_ratio", codec_ratio)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
    fp = geom.footprint(tokens, kv_bits, indexer_bits, include_mtp)
    per = fp.total
    per_ssd = per / codec_ratio
    fit = {"hbm": int(hbm // per), "dram": int(dram // per), "ssd": int(ssd // per_ssd)}
    left, placed = sessions, {}
    for tier in ("hbm", "dram", "ssd"):
        placed[tier] = min(left, fit[tier])
        left -= placed[tier]
    step, state = geom.restore_step, geom.state_bytes_per_token(kv_bits, include_mtp)
    point = tokens // step * step
    read = point * (per / tokens - state) + (step * state if point else 0.0)
    return {
        "model": geom.name, "family": geom.family, "tokens": tokens, "sessions": sessions,
        "session_bytes": per, "session_ssd_bytes": per_ssd, "footprint": fp.as_dict(),
        "fits": fit, "placed": placed, "unplaced": left,
        "total_bytes": per * sessions, "total_ssd_bytes_if_all_on_ssd": per_ssd * sessions,
        "restore_step": step, "restore_point": point, "reload_bytes": read,
        "reload_s": {"hbm": 0.0, "dram": read / (pcie_gbps * 1e9),
                     "ssd": max(read / codec_ratio / (ssd_gbps * 1e9), read / (pcie_gbps * 1e9))},
        "assumptions": {
            "kv_bits": kv_bits, "indexer_bits": indexer_bits, "include_mtp": include_mtp,
            "hbm_bytes": hbm, "dram_bytes": dram, "ssd_bytes": ssd, "ssd_gbps": ssd_gbps,
            "pcie_gbps": pcie_gbps, "codec_ratio": codec_ratio,
            "placement": "sessions fill HBM, then DRAM, then SSD; whole sessions only",
            "reload": "DRAM->HBM = raw bytes / PCIe; SSD->HBM = max(compressed bytes / SSD, raw bytes / PCIe), "
                      "pipelined; the bytes a restore reads (reload_bytes: states at the restore point only)",
            "not counted": "allocator and page overhead, model weights and activations in HBM",
        },
    }
