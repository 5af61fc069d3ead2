"""Reading 01's packed training set as 03 and 04 train on it: rows by index as NumPy arrays, from one directory
or from several shard directories read as one dataset.

01_prepare_data.py writes a `datasets` directory of packed rows (docs/data-format.md); a corpus prepared on N
machines (`01_prepare_data.py --num-shards N --shard-index i`) is N such directories. `PackedData.open` takes one
directory, several, or a directory whose sub-folders are all shards, and numbers the rows across the shards in
the order given (a directory's shards in name order). The data order, the resume position and the fingerprint
then cover the whole set, and training on the shards equals training on one directory holding the same rows in
that order. Shards that cannot be one dataset are refused with one line: another row length or tokenizer, or a
missing or repeated shard of one preparation.

Used by 03_continued_pretrain.py and 04_sft.py (restoration distillation on plain text).

Outside this repository (copy this file and common.py):

    import packed_data
    data = packed_data.PackedData.open(["runs/data/shard-0", "runs/data/shard-1"])   # or just "runs/data"
    print(data.num_rows, data.seq_len)
    rows = data.rows(range(8))   # [{"index", "input_ids", "doc_lens", "num_pad"}]: varlen_attention's rows
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common import fail, read_manifest

REQUIRED_COLUMNS = ("input_ids", "doc_lens", "num_pad", "attn_cost")
# manifest fields every shard of one dataset shares: (field, what it is, the 01 flag that sets it)
SHARED_FIELDS = (("seq_len", "row length", "--seq-len"), ("vocab_size", "tokenizer", "--tokenizer"),
                 ("tokenizer_vocab_sha256", "tokenizer", "--tokenizer"), ("eos_token_id", "tokenizer", "--tokenizer"),
                 ("pad_token_id", "tokenizer", "--tokenizer"), ("boundary_token_ids", "boundary tokens", "--boundary"))


def packed_dirs(path: str | os.PathLike, stage: str = "01_prepare_data") -> list[Path] | None:
    """The data directories `path` stands for: itself when `stage` wrote it, its sub-folders when `stage` wrote
    every one of them (a directory of shards; hidden folders, such as a shard still being written, skipped),
    else None."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / "manifest.json").is_file():
        return [path] if (read_manifest(path) or {}).get("stage") == stage else None
    subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return subs if subs and all((read_manifest(p) or {}).get("stage") == stage for p in subs) else None


class PackedData:
    """A packed training set written by 01_prepare_data.py, one directory or several shards read as one. Rows are
    read by index (numbered across the shards in order) as NumPy arrays."""

    def __init__(self, paths: list[Path], parts: list, manifests: list[dict]):
        import datasets

        self.paths, self.manifests, self.manifest = paths, manifests, manifests[0]
        self.seq_len = int(self.manifest["seq_len"])
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)  # no copy: tables chained
        self.num_rows = len(ds)
        self._ds = ds.with_format("numpy", columns=["input_ids", "doc_lens", "num_pad"])
        self.attn_cost = np.asarray(ds.data.column("attn_cost").to_numpy(), dtype=np.int64)
        self.num_pad = np.asarray(ds.data.column("num_pad").to_numpy(), dtype=np.int64)

    @classmethod
    def open(cls, paths: str | os.PathLike | Sequence, expected_stage: str = "01_prepare_data") -> "PackedData":
        """One data directory, several (the shards of one dataset), or a directory of shard directories."""
        dirs: list[Path] = []
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            found = packed_dirs(path, expected_stage)
            if found is None:
                path = Path(path).expanduser()
                if not path.is_dir():
                    fail(f"--data {path} is not a directory; pass the output directory of {expected_stage}.py "
                         f"(or several shard directories)")
                manifest = read_manifest(path)
                why = ("no manifest.json, nor sub-folders that are all its shards" if manifest is None
                       else f"a manifest of stage {manifest.get('stage')!r}")
                fail(f"--data {path} was not written by {expected_stage}.py ({why}); prepare it with "
                     f"{expected_stage}.py first")
            dirs += found
        resolved = [d.resolve() for d in dirs]
        for d, r in zip(dirs, resolved):
            if resolved.count(r) > 1:
                fail(f"--data names {d} twice; give each shard directory once")
        manifests = [read_manifest(d) for d in dirs]
        check_shards(dirs, manifests)
        return cls(dirs, [load_rows(d) for d in dirs], manifests)

    def rows(self, indices: Iterable[int]) -> list[dict]:
        """Rows as dicts of NumPy arrays: input_ids (int64), doc_lens (int64), num_pad (int)."""
        return [{"index": int(i), "input_ids": np.asarray(r["input_ids"], dtype=np.int64),
                 "doc_lens": np.asarray(r["doc_lens"], dtype=np.int64), "num_pad": int(r["num_pad"])}
                for i, r in ((i, self._ds[int(i)]) for i in indices)]

    def fingerprint(self) -> dict:
        """What --resume compares: the path(s) and creation time(s), the rows and their length."""
        if len(self.paths) == 1:
            m = self.manifest
            return {"path": str(self.paths[0].resolve()), "num_rows": self.num_rows, "seq_len": self.seq_len,
                    "num_tokens": m.get("num_tokens"), "created": m.get("created")}
        return {"path": [str(p.resolve()) for p in self.paths], "num_rows": self.num_rows, "seq_len": self.seq_len,
                "num_tokens": sum(m.get("num_tokens") or 0 for m in self.manifests),
                "created": [m.get("created") for m in self.manifests]}


def load_rows(path: Path):
    """One data directory's rows (a memory-mapped `datasets.Dataset`), checked for the packed columns."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader error means the same to the user
        fail(f"--data {path} has a manifest but no readable dataset ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0] if str(exc) else ''})")
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        fail(f"--data {path} lacks the column(s) {missing} of 01's packed format; re-run 01_prepare_data.py")
    if len(ds) == 0:
        fail(f"--data {path} holds no rows")
    return ds


def check_shards(dirs: Sequence[Path], manifests: Sequence[dict]) -> None:
    """Refuse directories that cannot be one dataset: another row length or tokenizer (a field one manifest
    lacks is not compared), or an incomplete or repeated set of the shards of one preparation (the same shard
    count, source names and weights, and seed)."""
    for key, what, flag in SHARED_FIELDS:
        values = [m.get(key) for m in manifests]
        first = next((i for i, v in enumerate(values) if v is not None), 0)
        k = next((i for i, v in enumerate(values) if v is not None and v != values[first]), None)
        if k is not None:
            fail(f"the shards differ in {what}: {dirs[first]} has {key} {values[first]}, {dirs[k]} has "
                 f"{values[k]}; prepare every shard with the same {flag}")
    runs: dict[str, list[int]] = {}
    for m in manifests:
        shard = m.get("shard") or {}
        if shard.get("count", 1) > 1:
            sources = [(x.get("name"), x.get("weight")) for x in m.get("sources") or []]  # paths differ by machine
            key = json.dumps([shard["count"], sources, (m.get("args") or {}).get("seed")])
            runs.setdefault(key, []).append(int(shard["index"]))
    for key, got in runs.items():
        count = json.loads(key)[0]
        twice = sorted({i for i in got if got.count(i) > 1})
        missing = sorted(set(range(count)) - set(got))
        if twice or missing:
            fail(f"the directories hold shards {sorted(got)} of a corpus prepared in {count} shards ("
                 + (f"shard {twice[0]} twice" if twice else f"shard(s) {missing} missing")
                 + "); pass each of its shard directories once")
