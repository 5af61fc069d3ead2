"""Reading MosaicML streaming (MDS) datasets with NumPy alone: ProLong's released training data.

ProLong released its packed training data (the hub datasets princeton-nlp/prolong-data-64K and -512K, one folder
per domain such as book-65536 or fineweb-edu) as MDS folders. Each sample is one training row: `input_ids` (the
row's uint32 token ids) and `indices`, the [start, end) token spans of the documents in it, which ProLong's
collator turns into attention segments (a document attends and is predicted only inside its span). This module
reads such a folder: its `index.json` (one entry per shard file; datatools' merged indexes point into
sub-folders) and the uncompressed shard files, in the layout of docs/data-format.md#mds-shards. The
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
from pathlib import Path

import numpy as np

from common import fail

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
    """One column's value. Pickled and image columns are refused, never decoded."""
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


class MDSDataset:
    """An MDS folder's samples by index, read from its shard files with positioned reads (nothing is loaded up
    front but the index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        index = self.path / "index.json"
        if not index.is_file():
            fail(f"{self.path} has no index.json, so it is not an MDS dataset folder (streaming's MDSWriter "
                 f"writes one beside the shard files; ProLong's data has one per domain folder, e.g. "
                 f"prolong-data-64K/book-65536)")
        try:
            entries = json.loads(index.read_text())["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            fail(f"{index} is not an MDS index ({type(exc).__name__}: {exc}); download the folder again")
        self.shards = []
        for e in entries:
            where = f"{index}: shard {e.get('raw_data', {}).get('basename')}"
            if (e.get("format"), e.get("version")) != ("mds", 2):
                fail(f"{where} is format {e.get('format')} version {e.get('version')}; only MDS version 2 is read")
            if e.get("compression"):
                fail(f"{where} is compressed ({e['compression']}); decompress its shards first (ProLong released "
                     f"uncompressed shards)")
            file = self.path / e["raw_data"]["basename"]
            if not file.is_file():
                fail(f"{where}: the file {file} is missing; download the whole folder")
            self.shards.append({"file": file, "samples": int(e["samples"]), "names": e["column_names"],
                                "encodings": e["column_encodings"], "sizes": e["column_sizes"]})
        if not self.shards or not sum(s["samples"] for s in self.shards):
            fail(f"{index} lists no samples; download the whole folder")
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
        data = os.pread(self._fds[k], size, offset)
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
        return int(np.prod(array_header(encoding, head)[1]))

    def doc_lens(self, i: int) -> list[int]:
        """The lengths of row i's documents, from its `indices` spans (the whole row when it has none). The spans
        must tile the row, in order, as ProLong's packer writes them."""
        n = self.length(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        if "indices" not in self.shards[k]["names"]:
            return [n]
        spans = np.asarray(self.value(i, "indices"), dtype=np.int64).reshape(-1, 2)
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
