"""Reading MosaicML streaming (MDS) datasets with NumPy alone: ProLong's released training data.

ProLong released its packed training data (the hub datasets princeton-nlp/prolong-data-64K and -512K, one folder
per domain such as book-65536 or fineweb-edu) as MDS folders. Each sample is one training row: `input_ids` (the
row's uint32 token ids) and `indices`, the [start, end) token spans of the documents in it, which ProLong's
collator turns into attention segments (a document attends and is predicted only inside its span). This module
reads such a folder: its `index.json` (one entry per shard file; datatools' merged indexes point into
sub-folders) and the uncompressed shard files, in the layout of docs/data-format.md#mds-shards. A folder from
someone else is read only inside itself: every shard name must resolve inside the folder (no absolute path, no
`..`, no link out), every shard must hold the first one's columns, and sample counts are checked against the
file sizes before anything is read; a malformed index or shard is one error line. The
`mosaicml-streaming` package itself is not needed: its declared pins (transformers < 5, numpy < 2.2) conflict with
this toolkit's and importing it needs torchvision; tests/test_mds.py checks this reader against streaming's own
MDSWriter.

Used by 01_prepare_data.py (`mds:` sources: each sample becomes one packed row, its spans the row's doc_lens).

Outside this repository (copy this file and common.py):

    import mds
    data = mds.MDSDataset("prolong-data-64K/book-65536")
    print(len(data), data.columns)     # samples; {"domain": "str", "indices": "ndarray:uint32", ...}
    ids = data.tokens(0)               # the row's token ids (NumPy uint32)
    doc_lens = data.doc_lens(0)        # its documents' lengths in order (they sum to len(ids))
    row = data.sample(0)               # every column, decoded
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from common import fail, is_count, read_json

# MDS value encodings (streaming's format/mds/encodings.py): fixed-size scalars, and NumPy arrays whose dtype and
# shape are written in the encoding name or, when absent there, in a small header in front of the values.
SCALARS = {"int": "<i8", "uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "int8": "<i1",
           "int16": "<i2", "int32": "<i4", "int64": "<i8", "float16": "<f2", "float32": "<f4", "float64": "<f8"}
ARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")  # header byte & 3 -> dtype of the shape entries


def array_header(encoding: str, data: bytes) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, where the values start) of an `ndarray[:DTYPE[:SHAPE]]` value, laid out as [dtype code:
    1 byte, unless in the encoding] [ndim << 2 | shape dtype code: 1 byte, then the shape, unless in the encoding]
    [the values]. Only the header of `data` is read."""
    _, dtype, shape = (encoding.split(":") + [None, None])[:3]
    pos = 0
    if not dtype:
        dtype, pos = ARRAY_DTYPES[data[0]], 1
    if shape:
        shape = tuple(int(x) for x in shape.split(","))
    else:
        ndim, shape_dtype = data[pos] >> 2, np.dtype(SHAPE_DTYPES[data[pos] & 3])
        shape = tuple(np.frombuffer(data, shape_dtype, ndim, pos + 1).tolist())
        pos += 1 + ndim * shape_dtype.itemsize
    return np.dtype(dtype).newbyteorder("<"), shape, pos


def decode(encoding: str, data: bytes, where: str):
    """One column's value. Pickled and image columns are refused, never decoded; a damaged value is one line."""
    return _valid(where, encoding, _decode, encoding, data, where)


def _valid(where: str, encoding: str, read, *args):
    """read(*args), with a value the shard's bytes do not make (a short value, an unknown dtype code, text that is
    not UTF-8) as one error line."""
    try:
        return read(*args)
    except (ValueError, IndexError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSON errors included
        fail(f"{where} is not a valid {encoding!r} value ({type(exc).__name__}); the shard is damaged, download it "
             "again")


def _decode(encoding: str, data: bytes, where: str):
    if encoding == "str":
        return data.decode("utf-8")
    if encoding == "bytes":
        return bytes(data)
    if encoding == "json":
        return json.loads(data)
    if encoding in SCALARS:
        return np.frombuffer(data, SCALARS[encoding], 1)[0].item()
    if encoding.split(":")[0] == "ndarray":
        dtype, shape, pos = array_header(encoding, data)
        return np.frombuffer(data, dtype, offset=pos).reshape(shape)
    fail(f"{where} is encoded as {encoding!r}, which this reader does not decode (pickled columns are never "
         f"loaded); read only the token columns")


def _columns_ok(names, encodings, sizes) -> bool:
    """One name, encoding and size (a byte count, or null for a variable-size column) per column."""
    return (isinstance(names, list) and isinstance(encodings, list) and isinstance(sizes, list)
            and len(names) == len(encodings) == len(sizes) > 0 and len(set(map(str, names))) == len(names)
            and all(isinstance(x, str) for x in names + encodings) and all(s is None or is_count(s) for s in sizes))


def _array_encoding_ok(encoding: str) -> bool:
    """`ndarray`, `ndarray:DTYPE` or `ndarray:DTYPE:SHAPE` with a dtype streaming writes and a shape of counts."""
    _, *rest = encoding.split(":")
    dtype, shape = (rest + [None, None])[:2]
    return (len(rest) <= 2 and (not rest or dtype in ARRAY_DTYPES.values())
            and (shape is None or all(x.isdigit() for x in shape.split(","))))


def shard_file(folder: Path, name, where: str) -> Path:
    """The shard file `name` names, refused unless it is a regular file inside `folder`: no absolute path, no
    `..`, no link that leads out (a folder from someone else must not make 01 read elsewhere)."""
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        fail(f"{where}: the shard name {name!r} leaves the folder (absolute or ..); an MDS index names its shard "
             "files relative to its folder")
    file = folder / name
    real, root = os.path.realpath(file), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        fail(f"{where}: {file} leads to {real}, outside {folder}; copy the shard into the folder")
    if not file.exists():
        fail(f"{where}: the file {file} is missing; download the whole folder")
    if not stat.S_ISREG(os.stat(file).st_mode):
        fail(f"{where}: {file} is not a regular file; download the whole folder")
    return file


def shard_entry(folder: Path, index: Path, k: int, entry) -> dict:
    """Index entry k, checked before its shard is read: format, columns, the file, and its sample count against the
    file's size and header (a huge, negative or non-numeric count is refused before anything is allocated)."""
    raw = entry.get("raw_data") if isinstance(entry, dict) else None
    if not isinstance(raw, dict) or "basename" not in raw:
        fail(f"{index}: shard {k} has no raw_data.basename, so this is not an MDS index; download the folder again")
    where = f"{index}: shard {raw['basename']}"
    if (entry.get("format"), entry.get("version")) != ("mds", 2):
        fail(f"{where} is format {entry.get('format')} version {entry.get('version')}; only MDS version 2 is read")
    if entry.get("compression"):
        fail(f"{where} is compressed ({entry['compression']}); decompress its shards first (ProLong released "
             f"uncompressed shards)")
    names, encodings, sizes = (entry.get(f"column_{x}") for x in ("names", "encodings", "sizes"))
    if not _columns_ok(names, encodings, sizes):
        fail(f"{where}: column_names, column_encodings and column_sizes must be lists with one entry per column "
             "(unique names; a size is a byte count or null); the index is malformed, download the folder again")
    bad = next((x for x in encodings if x.split(":")[0] == "ndarray" and not _array_encoding_ok(x)), None)
    if bad:
        fail(f"{where}: the array encoding {bad!r} is unknown (dtypes: {', '.join(ARRAY_DTYPES.values())})")
    file = shard_file(folder, raw["basename"], where)
    samples, size = entry.get("samples"), file.stat().st_size
    if not is_count(samples) or 4 * (samples + 2) > size:
        fail(f"{where} says it holds {samples!r} samples; a file of {size} bytes holds at most {max(size // 4 - 2, 0)}"
             f" (the index or the file is damaged: download the folder again)")
    with open(file, "rb") as f:
        written = int.from_bytes(f.read(4), "little")
    if written != samples or raw.get("bytes", size) != size:
        fail(f"{where}: {file} ({size} bytes, {written} samples) is not the file the index describes "
             f"({raw.get('bytes', size)} bytes, {samples} samples); download it again")
    return {"file": file, "samples": samples, "names": names, "encodings": encodings, "sizes": sizes, "bytes": size,
            "where": where}


def read_index(folder: Path) -> list[dict]:
    """The shards of an MDS folder's index.json, each checked by shard_entry, all with the first one's columns."""
    index = folder / "index.json"
    if not index.is_file():
        fail(f"{folder} has no index.json, so it is not an MDS dataset folder (streaming's MDSWriter writes one "
             f"beside the shard files; ProLong's data has one per domain folder, e.g. prolong-data-64K/book-65536)")
    entries = read_json(index)
    entries = entries.get("shards") if isinstance(entries, dict) else None
    if not isinstance(entries, list) or not entries:
        fail(f"{index} has no list of shards, so it is not an MDS index; download the folder again")
    shards = [shard_entry(folder, index, k, e) for k, e in enumerate(entries)]
    for s in shards[1:]:
        if [s[k] for k in ("names", "encodings", "sizes")] != [shards[0][k] for k in ("names", "encodings", "sizes")]:
            fail(f"{s['where']} holds columns {dict(zip(s['names'], s['encodings']))}, the first shard "
                 f"{dict(zip(shards[0]['names'], shards[0]['encodings']))}; one folder holds one dataset's shards")
    if not sum(s["samples"] for s in shards):
        fail(f"{index} lists no samples; download the whole folder")
    return shards


class MDSDataset:
    """An MDS folder's samples by index, read from its shard files with positioned reads (nothing is loaded up
    front but the index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.shards = read_index(self.path)
        self.columns = dict(zip(self.shards[0]["names"], self.shards[0]["encodings"]))
        self._ends = np.cumsum([s["samples"] for s in self.shards])
        self._fds: dict[int, int] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._last: tuple[int, np.ndarray | None] = (-1, None)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _read(self, k: int, offset: int, size: int) -> bytes:
        if k not in self._fds:
            self._fds[k] = os.open(self.shards[k]["file"], os.O_RDONLY)
        data = os.pread(self._fds[k], size, offset) if offset + size <= self.shards[k]["bytes"] else b""
        if len(data) != size:
            fail(f"{self.shards[k]['file']} is shorter than its index says; download it again")
        return data

    def _column(self, i: int, name: str, head: int | None = None) -> tuple[str, bytes, str]:
        """(encoding, bytes, where) of one column of sample i: all its bytes, or only the first `head`."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        shard, j = self.shards[k], i - (int(self._ends[k - 1]) if k else 0)
        if k not in self._offsets:  # [samples][offsets of samples 0..n][config][sample data]
            self._offsets[k] = np.frombuffer(self._read(k, 4, 4 * (shard["samples"] + 1)), "<u4").astype(np.int64)
        begin = int(self._offsets[k][j])
        where = f"column {name!r} of sample {i} of {self.path}"
        if name not in shard["names"]:
            fail(f"{where} does not exist (columns: {', '.join(shard['names'])}); ProLong's rows have input_ids")
        var = [n for n, s in zip(shard["names"], shard["sizes"]) if s is None]  # sizes up front, in column order
        var_sizes = dict(zip(var, np.frombuffer(self._read(k, begin, 4 * len(var)), "<u4").tolist()))
        sizes = [var_sizes.get(n, s) for n, s in zip(shard["names"], shard["sizes"])]
        c = shard["names"].index(name)
        start = begin + 4 * len(var) + sum(sizes[:c])
        return shard["encodings"][c], self._read(k, start, sizes[c] if head is None else min(head, sizes[c])), where

    def value(self, i: int, name: str):
        return decode(*self._column(i, name))

    def sample(self, i: int) -> dict:
        k = int(np.searchsorted(self._ends, i, side="right"))
        return {name: self.value(i, name) for name in self.shards[k]["names"]}

    def tokens(self, i: int) -> np.ndarray:
        """The row's token ids (`input_ids`, 1-D); the last row read is kept, so its spans read it once."""
        if self._last[0] != i:
            ids = self.value(i, "input_ids")
            if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
                fail(f"input_ids of sample {i} of {self.path} is not a 1-D integer array")
            self._last = (i, ids)
        return self._last[1]

    def length(self, i: int) -> int:
        """Tokens in row i, from the array's header alone."""
        encoding, head, where = self._column(i, "input_ids", head=64)
        if encoding.split(":")[0] != "ndarray":
            fail(f"{where} is encoded as {encoding!r}, not as a NumPy array of token ids")
        return int(np.prod(_valid(where, encoding, array_header, encoding, head)[1]))

    def doc_lens(self, i: int) -> list[int]:
        """The lengths of row i's documents, from its `indices` spans (the whole row when it has none). The spans
        must tile the row, in order, as ProLong's packer writes them."""
        n = self.length(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        if "indices" not in self.shards[k]["names"]:
            return [n]
        spans = self.value(i, "indices")
        if not isinstance(spans, np.ndarray) or spans.dtype.kind not in "iu" or spans.size % 2:
            fail(f"the indices of sample {i} of {self.path} are not [start, end) pairs of token positions; it is "
                 "not ProLong's packed format")
        spans = spans.astype(np.int64).reshape(-1, 2)
        lens = (spans[:, 1] - spans[:, 0]).tolist()
        if len(spans) == 0 or spans[0, 0] != 0 or spans[-1, 1] != n or (spans[1:, 0] != spans[:-1, 1]).any() \
                or min(lens) <= 0:
            fail(f"the indices of sample {i} of {self.path} do not tile its {n} tokens in order "
                 f"({spans[:4].tolist()}...); it is not ProLong's packed format")
        return lens

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
