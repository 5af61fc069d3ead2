"""Packing documents into fixed-length rows that keep their boundaries, and the packed-row dataset.

Long-context training reads rows of exactly `seq_len` tokens. Concatenating documents and cutting every
`seq_len` tokens (the usual `run_clm` recipe) loses where documents start; here every row records its
attention segments, so training can mask attention per document (ProLong) or per row (UltraLong):
- row plans computed from document lengths alone (`plan_concat`: in order, carrying remainders;
  `plan_best_fit`: best-fit decreasing, long documents split or kept whole), so a corpus of any size is planned
  with a few integers per document; rows are then assembled from any token source (`assemble_row`), with
  optional parallel per-token arrays (a loss mask, say); `pack_documents` does both for in-memory documents;
- the packed-row `datasets` directory (`PackedDatasetWriter`, streamed file by file; packed_data.py reads it).
  The format (docs/data-format.md): every row has exactly `seq_len` `input_ids`; `doc_lens`
  lists its attention segments (whole documents, pieces of split documents, and a last padding segment of
  `num_pad` tokens); `attn_cost` is the sum of squared non-padding segment lengths; `source` names the mixture
  source.

Used by 01_prepare_data.py (plans, assembles, writes) and 04_sft.py (packs conversations with their loss
masks).

Outside this repository (copy this file alone: it needs only NumPy):

    import packing
    docs = [tokenizer(t)["input_ids"] for t in texts]                 # lists of token ids
    for row in packing.pack_documents(docs, seq_len=8192, packing="best-fit", pad_id=tokenizer.pad_token_id):
        row["input_ids"], row["doc_lens"], row["num_pad"]    # NumPy arrays: varlen_attention.build_micro_batch
"""
from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np


# -------------------------------------------------------------------------------------------------------------
# Packing. A RowPlan says which pieces of which documents ("items") fill each row, from lengths alone; rows are
# assembled from it afterwards, reading tokens (and parallel per-token arrays) from wherever they live.


@dataclass
class RowPlan:
    """Rows as a CSR list of pieces: row r holds pieces row_ptr[r]:row_ptr[r+1]; piece p is tokens
    [start[p], end[p]) of item[p]. Pieces of a row are concatenated in order; the rest of the row is padding."""
    seq_len: int
    row_ptr: np.ndarray  # int64 [num_rows + 1]
    item: np.ndarray  # int64 [num_pieces]
    start: np.ndarray  # int64 [num_pieces]
    end: np.ndarray  # int64 [num_pieces]
    fill_used: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # see plan_best_fit

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def pieces(self, row: int) -> range:
        return range(int(self.row_ptr[row]), int(self.row_ptr[row + 1]))

    def row_tokens(self) -> np.ndarray:
        """Real (non-padding) tokens per row."""
        per_piece = self.end - self.start
        if not len(per_piece):
            return np.zeros(self.num_rows, np.int64)
        return np.add.reduceat(per_piece, self.row_ptr[:-1])

    def num_pad(self) -> np.ndarray:
        return self.seq_len - self.row_tokens()

    def pieces_per_item(self, num_items: int) -> np.ndarray:
        return np.bincount(self.item, minlength=num_items)

    def permuted(self, order: np.ndarray) -> "RowPlan":
        """The same rows in another order."""
        counts = np.diff(self.row_ptr)[order]
        idx = np.concatenate([np.arange(self.row_ptr[r], self.row_ptr[r + 1]) for r in order]) if len(order) \
            else np.zeros(0, np.int64)
        row_ptr = np.zeros(len(order) + 1, np.int64)
        np.cumsum(counts, out=row_ptr[1:])
        return RowPlan(self.seq_len, row_ptr, self.item[idx], self.start[idx], self.end[idx])


def _plan_from_rows(seq_len: int, rows: list[list[tuple[int, int, int]]]) -> RowPlan:
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    row_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    flat = np.array([p for r in rows for p in r], dtype=np.int64).reshape(-1, 3)
    return RowPlan(seq_len, row_ptr, flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].copy())


def plan_concat(lengths: Sequence[int] | np.ndarray, seq_len: int, carry: bool = True,
                drop_last: bool = False) -> RowPlan:
    """Concatenate items in order and cut every `seq_len` tokens (ProLong's short data, run_clm's group_texts,
    but keeping where each document starts and ends).

    carry=True: the part of an item that does not fit a row starts the next row (no token lost).
    carry=False: it is discarded, and the next row starts with the next item (ProLong's SFT packing).
    drop_last=False pads the final partial row; True drops it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    if not carry:
        rows, row, used = [], [], 0
        for i, n in enumerate(lengths.tolist()):
            if n <= 0:
                continue
            take = min(n, seq_len - used)
            row.append((i, 0, take))
            used += take
            if used == seq_len:
                rows.append(row)
                row, used = [], 0
        if row and not drop_last:
            rows.append(row)
        return _plan_from_rows(seq_len, rows)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    num_rows = total // seq_len if drop_last else -(-total // seq_len)
    limit = num_rows * seq_len
    valid = (lengths > 0) & (starts < limit)
    idx = np.nonzero(valid)[0]
    first = starts[idx] // seq_len
    last = (np.minimum(ends[idx], limit) - 1) // seq_len
    counts = last - first + 1
    item = np.repeat(idx, counts)
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    row = np.repeat(first, counts) + k
    abs_start = np.maximum(starts[item], row * seq_len)
    abs_end = np.minimum(np.minimum(ends[item], (row + 1) * seq_len), limit)
    row_ptr = np.searchsorted(row, np.arange(num_rows + 1), side="left").astype(np.int64)
    return RowPlan(seq_len, row_ptr, item, abs_start - starts[item], abs_end - starts[item])


class _CapacityIndex:
    """Counts of open bins by remaining capacity (0..n) in a segment tree: `smallest_at_least(x)` finds the
    tightest bin an item of size x fits in, in O(log n) (best-fit decreasing on millions of items)."""

    def __init__(self, n: int):
        size = 1
        while size < n + 1:
            size *= 2
        self.size = size
        self.tree = array("i", bytes(4 * 2 * size))

    def add(self, cap: int, delta: int) -> None:
        i = cap + self.size
        tree = self.tree
        while i:
            tree[i] += delta
            i //= 2

    def smallest_at_least(self, x: int) -> int:
        tree, size = self.tree, self.size
        i = x + size
        if tree[i] > 0:
            return x
        while i > 1:
            if i % 2 == 0 and tree[i + 1] > 0:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
                return i - size
            i //= 2
        return -1


def plan_best_fit(lengths: Sequence[int] | np.ndarray, seq_len: int, long_docs: str = "split",
                  rng: np.random.Generator | None = None, fill_lengths: Sequence[int] | None = None,
                  fill_cut_max: Sequence[int] | None = None, max_rows: int | None = None) -> RowPlan:
    """Whole items bin-packed into rows with best-fit decreasing (the tightest row that still fits, largest item
    first); the rest of each row is padding. An item longer than a row is split into row-sized pieces (each a
    full row of its own) and its remainder is packed like any other item (long_docs="split"), or cut to one row
    (long_docs="truncate"). With `rng` the rows come out in a random order, else full rows first, then bins.

    `fill_lengths`: spare items (of a source that is being subsampled anyway) that fill the gaps BFD leaves, in
    order: whole when they fit, else cut to the gap (at most `fill_cut_max[j]` tokens, e.g. to cut before an
    item's boundary tokens). Spare item j is item len(lengths) + j in the plan; `plan.fill_used[j]` is how many
    of its tokens were used (only the first len(plan.fill_used) spare items are used).

    `max_rows`: drop the emptiest packed rows beyond this many (their items are left out; a subsampled source
    then fills the remaining gaps and lands exactly on max_rows full rows)."""
    if long_docs not in ("split", "truncate"):
        raise ValueError("long_docs must be 'split' or 'truncate'")
    lengths = np.asarray(lengths, dtype=np.int64)
    rows, sizes, starts = _full_rows_and_items(lengths, seq_len, long_docs)
    if sizes:
        bins = _best_fit_bins(sizes, starts, seq_len)
        if max_rows is not None and len(rows) + len(bins) > max_rows:
            bins = _without_emptiest(bins, min(len(rows) + len(bins) - max_rows, len(bins)))
        rows.extend(bins)
    fill_used: list[int] = []
    if fill_lengths is not None and len(fill_lengths):
        cut_max = fill_cut_max if fill_cut_max is not None else fill_lengths
        fill_used = _fill_gaps(rows, seq_len, len(lengths), fill_lengths, cut_max)
    plan = _plan_from_rows(seq_len, rows)
    if rng is not None and plan.num_rows > 1:
        plan = plan.permuted(rng.permutation(plan.num_rows))
    plan.fill_used = np.asarray(fill_used, dtype=np.int64)  # per spare item, so the row order does not change it
    return plan


def _full_rows_and_items(lengths: np.ndarray, seq_len: int, long_docs: str):
    """(rows of one full piece each, sizes of the items left to pack, their (item, start)): an item longer than
    a row gives full rows of its pieces and a remainder (or its first row only, for long_docs="truncate")."""
    rows: list[list[tuple[int, int, int]]] = []
    sizes, starts = [], []
    for i, n in enumerate(lengths.tolist()):
        if n <= 0:
            continue
        if n > seq_len:
            if long_docs == "truncate":
                rows.append([(i, 0, seq_len)])
                continue
            full = n // seq_len
            for k in range(full):
                rows.append([(i, k * seq_len, (k + 1) * seq_len)])
            rem = n - full * seq_len
            if rem:
                sizes.append(rem)
                starts.append((i, full * seq_len))
        else:
            sizes.append(n)
            starts.append((i, 0))
    return rows, sizes, starts


def _best_fit_bins(sizes: list[int], starts: list[tuple[int, int]], seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Best-fit decreasing: the largest item first, each into the tightest open bin that still holds it."""
    size_arr = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(-size_arr, kind="stable")
    smallest = int(size_arr.min())
    index = _CapacityIndex(seq_len)
    by_cap: dict[int, list[int]] = {}
    bins: list[list[tuple[int, int, int]]] = []
    for j in order.tolist():
        n = sizes[j]
        item, s = starts[j]
        cap = index.smallest_at_least(n)
        if cap < 0:
            b = len(bins)
            bins.append([])
            left = seq_len - n
        else:
            b = by_cap[cap].pop()
            index.add(cap, -1)
            left = cap - n
        bins[b].append((item, s, s + n))
        if left >= smallest:  # a bin that no remaining item can fit is closed
            index.add(left, 1)
            by_cap.setdefault(left, []).append(b)
    return bins


def _without_emptiest(bins: list[list[tuple[int, int, int]]], excess: int) -> list[list[tuple[int, int, int]]]:
    """`bins` less the `excess` emptiest ones (ties: the later ones kept)."""
    fill = [sum(e - s for _, s, e in b) for b in bins]
    dropped = set(sorted(range(len(bins)), key=lambda b: (fill[b], b))[:excess])
    return [b for k, b in enumerate(bins) if k not in dropped]


def _fill_gaps(rows, seq_len: int, n_items: int, fill_lengths, cut_max) -> list[int]:
    """Fill each row's gap with spare items in order (item n_items + j), whole when they fit, else cut to the gap
    (at most cut_max[j] tokens); returns how many tokens of each spare item were used."""
    fill_used, j = [], 0
    for row in rows:
        gap = seq_len - sum(e - s for _, s, e in row)
        while gap > 0 and j < len(fill_lengths):
            n = int(fill_lengths[j])
            take = n if n <= gap else min(gap, int(cut_max[j]))
            if take > 0:
                row.append((n_items + j, 0, take))
                gap -= take
            fill_used.append(take)
            j += 1
            if take < n:  # cut: the gap is closed (or only a boundary's worth is left)
                break
    return fill_used


def plan_rows(lengths, seq_len: int, packing: str, rng: np.random.Generator | None = None, **kwargs) -> RowPlan:
    if packing == "concat":
        return plan_concat(lengths, seq_len, **kwargs)
    if packing == "best-fit":
        return plan_best_fit(lengths, seq_len, rng=rng, **kwargs)
    raise ValueError(f"unknown packing {packing!r}; choose concat or best-fit")


def segment_lengths(piece_lens: Sequence[int], seq_len: int, one_segment: bool = False) -> tuple[list[int], int]:
    """(doc_lens, num_pad) of a row whose pieces have these lengths (docs/data-format.md#invariants)."""
    used = int(sum(piece_lens))
    num_pad = seq_len - used
    if num_pad < 0:
        raise ValueError("pieces longer than the row")
    doc_lens = ([used] if used else []) if one_segment else [int(n) for n in piece_lens if n > 0]
    if num_pad:
        doc_lens.append(num_pad)
    return doc_lens, num_pad


def attn_cost(doc_lens: Sequence[int], num_pad: int) -> int:
    """Sum of squared non-padding segment lengths (ProLong's -sum(len^2) ordering key)."""
    real = doc_lens[:-1] if num_pad else doc_lens
    return int(sum(int(n) * int(n) for n in real))


def assemble_row(plan: RowPlan, row: int, fetch: Callable[[int, int, int], Mapping[str, np.ndarray]],
                 pad_values: Mapping[str, int], one_segment: bool = False,
                 out: Mapping[str, np.ndarray] | None = None) -> dict:
    """Build one row: every key of `pad_values` becomes a [seq_len] array (fetched pieces, then padding), plus
    doc_lens, num_pad and attn_cost. `fetch(item, start, end)` returns {key: array of end - start values}.
    `out` (optional) gives preallocated [seq_len] arrays to fill."""
    seq_len = plan.seq_len
    arrays = {k: (out[k] if out is not None else np.empty(seq_len, dtype=np.int32)) for k in pad_values}
    pos = 0
    lens = []
    for p in plan.pieces(row):
        item, s, e = int(plan.item[p]), int(plan.start[p]), int(plan.end[p])
        got = fetch(item, s, e)
        for k, arr in arrays.items():
            values = got[k]
            if len(values) != e - s:
                raise ValueError(f"fetch returned {len(values)} values of {k!r} for a piece of {e - s}")
            arr[pos:pos + e - s] = values
        pos += e - s
        lens.append(e - s)
    for k, arr in arrays.items():
        arr[pos:] = pad_values[k]
    doc_lens, num_pad = segment_lengths(lens, seq_len, one_segment)
    return dict(arrays, doc_lens=doc_lens, num_pad=num_pad, attn_cost=attn_cost(doc_lens, num_pad))


def pack_documents(docs: Sequence[np.ndarray | Sequence[int] | Mapping[str, Any]], seq_len: int,
                   packing: str = "best-fit", pad_values: Mapping[str, int] | None = None, *,
                   pad_id: int = 0, one_segment: bool = False, rng: np.random.Generator | None = None,
                   **plan_kwargs) -> Iterator[dict]:
    """Pack in-memory documents into rows (the packer 04_sft.py reuses).

    Each document is a token array, or a dict of equal-length per-token arrays that must include "input_ids"
    (for example {"input_ids": ids, "loss_mask": mask}); every array is carried through packing alongside the
    tokens and padded with `pad_values[key]` (input_ids with `pad_id`, anything else with 0 unless given).
    Yields dicts with those arrays ([seq_len] each) plus doc_lens, num_pad, attn_cost. `plan_kwargs` go to
    plan_concat (carry, drop_last) or plan_best_fit (long_docs)."""
    normalized = []
    keys = None
    for d in docs:
        d = {"input_ids": d} if not isinstance(d, Mapping) else d
        d = {k: np.asarray(v) for k, v in d.items()}
        if "input_ids" not in d:
            raise ValueError("each document needs input_ids")
        n = len(d["input_ids"])
        if any(len(v) != n for v in d.values()):
            raise ValueError("per-token arrays of a document must all have the length of its input_ids")
        if keys is None:
            keys = list(d)
        elif set(keys) != set(d):
            raise ValueError(f"documents carry different arrays: {sorted(keys)} vs {sorted(d)}")
        normalized.append(d)
    keys = keys or ["input_ids"]
    pads = {k: 0 for k in keys}
    pads["input_ids"] = pad_id
    pads.update(pad_values or {})
    pads = {k: pads[k] for k in keys}
    plan = plan_rows([len(d["input_ids"]) for d in normalized], seq_len, packing, rng=rng, **plan_kwargs)
    dtypes = {k: (np.int32 if k == "input_ids" else normalized[0][k].dtype if normalized else np.int32)
              for k in keys}

    def fetch(item, s, e):
        return {k: v[s:e] for k, v in normalized[item].items()}

    for r in range(plan.num_rows):
        out = {k: np.empty(seq_len, dtype=dtypes[k]) for k in keys}
        yield assemble_row(plan, r, fetch, pads, one_segment=one_segment, out=out)


# -------------------------------------------------------------------------------------------------------------
# Output: packed rows as a `datasets` directory, streamed file by file.

MAX_SHARD_BYTES = 500 * 1024 * 1024  # datasets' default max_shard_size for save_to_disk


def packed_features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "doc_lens": datasets.List(datasets.Value("int32")),
        "num_pad": datasets.Value("int32"),
        "source": datasets.Value("string"),
        "attn_cost": datasets.Value("int64"),
    })


def rows_table(input_ids: np.ndarray, doc_lens: Sequence[Sequence[int]], num_pad: Sequence[int],
               source: Sequence[str], cost: Sequence[int]):
    """A pyarrow table of packed rows (input_ids: [n, seq_len] int32)."""
    import pyarrow as pa

    n, seq_len = input_ids.shape
    ids = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32)),
                                   pa.array(np.ascontiguousarray(input_ids).reshape(-1)))
    lens_flat = np.fromiter((x for row in doc_lens for x in row), dtype=np.int32)
    lens_off = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([len(r) for r in doc_lens], out=lens_off[1:])
    lens = pa.ListArray.from_arrays(pa.array(lens_off), pa.array(lens_flat))
    return pa.table({"input_ids": ids, "doc_lens": lens, "num_pad": pa.array(np.asarray(num_pad, np.int32)),
                     "source": pa.array(list(source), pa.string()),
                     "attn_cost": pa.array(np.asarray(cost, np.int64))})


class PackedDatasetWriter:
    """Write packed rows into `out` in the layout `Dataset.save_to_disk` produces (data-XXXXX-of-YYYYY.arrow
    written by datasets' ArrowWriter, state.json, dataset_info.json), streaming: rows go to disk batch by batch
    and are never read back, so memory does not grow with the dataset. `load_from_disk(out)` reads it."""

    def __init__(self, out: str | os.PathLike, num_rows: int, seq_len: int, fingerprint: str):
        self.out = Path(out)
        self.num_rows = num_rows
        self.fingerprint = fingerprint
        est_bytes = num_rows * (4 * seq_len + 64)
        num_shards = max(1, min(num_rows, int(est_bytes / MAX_SHARD_BYTES) + 1))
        div, mod = divmod(num_rows, num_shards)
        self.shard_rows = [div + (1 if i < mod else 0) for i in range(num_shards)]
        self.features = packed_features()
        self._shard = -1
        self._left = 0
        self._writer = None
        self.num_shards = num_shards

    def _open_next(self):
        from datasets.arrow_writer import ArrowWriter

        self._close_current()
        self._shard += 1
        name = f"data-{self._shard:05d}-of-{self.num_shards:05d}.arrow"
        self._writer = ArrowWriter(features=self.features, path=str(self.out / name))
        self._left = self.shard_rows[self._shard]

    def _close_current(self):
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def write(self, table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._left == 0:
                self._open_next()
            n = min(self._left, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, n))
            self._left -= n
            offset += n

    def close(self) -> None:
        import datasets
        from datasets.utils.py_utils import asdict  # what save_to_disk uses (drops fields left at default)

        while self._shard + 1 < self.num_shards:  # an empty dataset still gets its one (empty) file
            self._open_next()
        self._close_current()
        state = {"_data_files": [{"filename": f"data-{i:05d}-of-{self.num_shards:05d}.arrow"}
                                 for i in range(self.num_shards)],
                 "_fingerprint": self.fingerprint, "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        (self.out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(datasets.DatasetInfo(features=self.features))
        (self.out / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
