"""``tierkv verify``: scan a store, report damaged blocks, and optionally repair it.

Primitives:
    verify_store: check every block value (header, fingerprint, every plane's checksum), every
        session's references and the eviction indexes; with ``repair=True`` drop bad blocks and
        the sessions using them, and the index entries that name nothing to evict. Block records
        with no value are counted; where no other process holds the store open they were left
        by one that stopped before writing them back, and a repair cuts each session using one
        back to the blocks before it.

Opens the store with the spec it records, so no model is needed. A scan reads every value: it is
a maintenance tool, never run on a hot path.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .codec import CorruptValueError, iter_layer_planes, make_codec, parse_block
from .spec import KVSpec
from .records import BlockMeta, SessionRecord
from .store import SSDStore, describe_store

__all__ = ["verify_store"]


def verify_store(path: str, repair: bool = False) -> dict[str, Any]:
    """Check every block and session of the store at ``path``; see the module docstring."""
    info = describe_store(path)
    import lmdb

    env = lmdb.open(os.path.abspath(path), subdir=True, max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            desc = json.loads(txn.get(b"spec", db=env.open_db(b"meta", txn=txn, create=False)))
    finally:
        env.close()
    spec = KVSpec.from_description(desc)
    codec = make_codec(desc.get("codec", "zstd-planes"))
    ident = {"block_tokens": desc["block_tokens"], "codec": codec.name, "device_codec": desc.get("device_codec", "raw")}
    fingerprint = spec.fingerprint(**ident)
    store = SSDStore(path, fingerprint, desc, max(info["ssd_bytes_used"] * 2, 1 << 30))
    bad: dict[bytes, str] = {}
    checked = 0
    try:
        with store.reader() as txn:
            for key, raw in txn.cursor(db=store.blocks):
                key = bytes(key)
                checked += 1
                meta_raw = txn.get(key, db=store.bmeta)
                try:
                    if meta_raw is None:
                        raise CorruptValueError("no bookkeeping record")
                    meta = BlockMeta.unpack(meta_raw)
                    parsed = parse_block(raw, fingerprint, spec, codec, desc["block_tokens"], key=key)
                    if parsed.n_tokens != meta.n_tokens:
                        raise CorruptValueError("token count differs from its record")
                    for layer in range(spec.num_layers):
                        a, b = spec.layer_span(layer, parsed.n_tokens)
                        for _ in iter_layer_planes(codec, parsed, layer, b - a):
                            pass
                except CorruptValueError as e:
                    bad[key] = str(e)
            unwritten = {bytes(k) for k, raw in txn.cursor(db=store.bmeta) if BlockMeta.unpack(raw).enc_bytes == 0}
            dependent: list[str] = []
            missing: list[str] = []
            waiting: dict[str, int] = {}  # session -> tokens it holds before its first unwritten block
            for sid, raw in txn.cursor(db=store.sessions):
                name = bytes(sid).decode("utf-8", "surrogatepass")
                try:
                    rec = SessionRecord.decode(name, raw)
                except Exception:  # noqa: BLE001 - a damaged record is reported, not raised
                    missing.append(name)
                    continue
                if any(k in bad for k in rec.keys):
                    dependent.append(name)
                elif any(txn.get(k, db=store.bmeta) is None for k in rec.keys):
                    missing.append(name)
                elif unwritten:
                    first = next((i for i, k in enumerate(rec.keys) if k in unwritten), None)
                    if first is not None:
                        waiting[name] = first * desc["block_tokens"]
            stray = store.stray_index_entries(txn)
        with store.alone() as alone:
            # Block records with no value: in a store another process holds open, most likely
            # values its write-back still keeps in memory; with none, left by a process that
            # stopped before writing them back (nothing will write them now)
            left_behind = bool(unwritten) and alone is True
            report = {"path": info["path"], "model_id": spec.model_id, "blocks_checked": checked,
                      "bad_blocks": len(bad), "bad": {k.hex(): why for k, why in bad.items()},
                      "sessions_using_bad_blocks": dependent, "sessions_with_missing_blocks": missing,
                      "stray_index_entries": len(stray), "blocks_without_values": len(unwritten),
                      "sessions_with_unwritten_blocks": waiting, "open_elsewhere": None if alone is None else not alone,
                      "unwritten_left_behind": left_behind, "repaired": False}
            if repair and (bad or dependent or missing or stray or left_behind):
                with store.batch() as batch:
                    for index, k in stray:  # before the drops below, which may account for them
                        batch.txn.delete(k, db=store.lru if index == "lru" else store.expiry)
                    for sid in dependent + missing:
                        try:
                            batch.drop_session(sid)
                        except Exception:  # noqa: BLE001 - damaged record: delete it raw
                            from .records import check_session_id

                            batch.txn.delete(check_session_id(sid), db=store.sessions)
                    for key in bad:
                        batch.delete_block(key)
                    if left_behind:
                        # rechecked in the batch's own transaction: the scan ran before this
                        # process held the store alone, and another may have written since
                        for sid in waiting:
                            batch.cut_before_unwritten(sid, desc["block_tokens"])
                        batch.delete_unreferenced_unwritten()
                report["repaired"] = True
        return report
    finally:
        store.close()
