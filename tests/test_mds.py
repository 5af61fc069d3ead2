"""ProLong's released data: MDS folders written here with mosaicml-streaming's own MDSWriter, in the format ProLong's
training/dataset.py reads (columns domain / indices / input_ids / length; `indices` the [start, end) document
spans of the row; per-process sub-folders under one merged index.json, as datatools writes them). mds.py reads
them back value for value, and 01_prepare_data.py converts them to packed rows whose documents are the fixture's,
token for token, boundaries included. Bad MDS input gets one line and no output."""
import functools
import importlib.util
import json
import os
import sys
import types
from collections import Counter

import numpy as np
import pytest

import common
import mds
from lc_testutil import load_script

prep = load_script("01_prepare_data")
PROLONG_COLUMNS = {"domain": "str", "indices": "ndarray:uint32", "input_ids": "ndarray:uint32", "length": "uint64"}


@functools.lru_cache(maxsize=1)
def streaming_mds_writer():
    """streaming's MDSWriter class. `import streaming` also imports its vision and cloud modules (torchvision, ...),
    which its declared pins keep out of this environment (requirements-assets.txt): its two package __init__
    files are skipped so that only the MDS writer and the modules it needs are imported, and the compression
    libraries it imports but uncompressed shards never call stand in as empty modules when absent."""
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        pytest.fail("mosaicml-streaming is not installed: pip install --no-deps -r requirements-assets.txt")
    root = os.path.dirname(spec.origin)
    for name, path in (("streaming", root), ("streaming.base", os.path.join(root, "base"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    stand_ins = [name for name in ("brotli", "snappy", "zstd") if importlib.util.find_spec(name) is None]
    for name in stand_ins:
        sys.modules[name] = types.ModuleType(name)
    try:
        from streaming.base.format.mds.writer import MDSWriter
    finally:
        for name in stand_ins:  # only for this import: other libraries (urllib3) probe for the real ones
            del sys.modules[name]
    return MDSWriter


def prolong_rows(n, seq_len, vocab, seed, domain):
    """`n` rows as ProLong's packer writes them: seq_len uint32 ids, spans tiling the row."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(0, 6)), replace=False))
        bounds = np.concatenate([[0], cuts, [seq_len]])
        rows.append({"domain": domain, "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32),
                     "input_ids": rng.integers(3, vocab, size=seq_len).astype(np.uint32), "length": seq_len})
    return rows


def write_prolong_folder(path, rows, procs=2):
    """Rows split over `procs` sub-folders, each written by MDSWriter (small shards, so there are several), under
    one index.json listing every shard with its sub-folder in the basename, as datatools' merge_index does."""
    writer = streaming_mds_writer()
    shards = []
    for p in range(procs):
        sub = path / f"proc{p:02d}-{procs}"
        with writer(out=str(sub), columns=PROLONG_COLUMNS, size_limit=1 << 10) as w:
            for row in rows[p::procs]:
                w.write(row)
        for shard in json.loads((sub / "index.json").read_text())["shards"]:
            shard["raw_data"]["basename"] = f"{sub.name}/{shard['raw_data']['basename']}"
            shards.append(shard)
    (path / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    return [r for p in range(procs) for r in rows[p::procs]]  # in the merged index's order


@pytest.fixture(scope="module")
def prolong(tmp_path_factory, tokenizer):
    """Two domains of 64-token rows: `book` (12 rows) and `web` (36 rows)."""
    root = tmp_path_factory.mktemp("prolong-data-64")
    vocab = len(tokenizer)
    return {name: (root / name, write_prolong_folder(root / name, prolong_rows(n, 64, vocab, seed, name)))
            for name, n, seed in (("book", 12, 1), ("web", 36, 2))}


def test_reader_returns_what_streaming_wrote(prolong):
    path, rows = prolong["web"]
    data = mds.MDSDataset(path)
    assert len(data) == len(rows) and len(data.shards) > 2 and data.columns == PROLONG_COLUMNS
    for i, row in enumerate(rows):
        got = data.sample(i)
        assert got["domain"] == row["domain"] and got["length"] == row["length"]
        assert got["input_ids"].dtype == np.uint32 and np.array_equal(got["input_ids"], row["input_ids"])
        assert np.array_equal(got["indices"], row["indices"])  # [n, 2]: the shape travels in the value
        assert np.array_equal(data.tokens(i), row["input_ids"]) and data.length(i) == 64
        assert data.doc_lens(i) == np.diff(row["indices"], axis=1).ravel().tolist()
    data.close()


def test_conversion_keeps_every_row_token_for_token_with_its_documents(prolong, tmp_path, tokenizer_dir):
    path, rows = prolong["book"]
    out = tmp_path / "out"
    argv = ["--data", f"prolong=mds:{path}", "--seq-len", "64", "--tokenizer", tokenizer_dir, "--out", str(out)]
    assert common.call_main(prep.main, argv) == 0
    import datasets

    got = datasets.load_from_disk(str(out))
    assert got["num_pad"] == [0] * len(rows) and set(got["source"]) == {"prolong"}
    want = Counter((tuple(r["input_ids"].tolist()), tuple(np.diff(r["indices"], axis=1).ravel().tolist()))
                   for r in rows)
    assert Counter((tuple(ids), tuple(lens)) for ids, lens in zip(got["input_ids"], got["doc_lens"])) == want
    assert got["attn_cost"] == [sum(n * n for n in lens) for lens in got["doc_lens"]]
    stats = common.read_manifest(out)["stats"]["sources"]["prolong"]
    assert stats["rows"] == len(rows) and stats["docs_out"] == sum(len(r["indices"]) for r in rows)


def test_mixture_of_domains_takes_whole_rows_by_share(prolong, tmp_path, tokenizer_dir):
    """ProLong's domain@proportion: a 1:3 mix of 16 rows drawn from the two folders, each row whole."""
    out = tmp_path / "mix"
    argv = ["--data", f"book=mds:{prolong['book'][0]}@0.25", f"web=mds:{prolong['web'][0]}@0.75", "--seq-len",
            "64", "--max-tokens", str(16 * 64), "--tokenizer", tokenizer_dir, "--out", str(out)]
    assert common.call_main(prep.main, argv) == 0
    import datasets

    got = datasets.load_from_disk(str(out))
    assert Counter(got["source"]) == {"book": 4, "web": 12}
    originals = {name: {tuple(r["input_ids"].tolist()) for r in rows} for name, (_, rows) in prolong.items()}
    assert all(tuple(ids) in originals[src] for ids, src in zip(got["input_ids"], got["source"]))
    assert len(set(map(tuple, got["input_ids"]))) == 16  # a subset: no row twice


def bad_mds(tmp_path, capsys, *argv, match):
    out = tmp_path / "bad-out"
    code = common.call_main(prep.main, [*map(str, argv), "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and match in lines[0], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad-out")]


def test_bad_mds_input_fails_with_one_line_and_writes_nothing(prolong, tmp_path, tokenizer_dir, capsys):
    tok = ["--tokenizer", tokenizer_dir]
    (tmp_path / "no-index").mkdir()
    (tmp_path / "no-index" / "shard.00000.mds").write_bytes(b"\0" * 16)
    bad_mds(tmp_path, capsys, "--data", f"mds:{tmp_path / 'no-index'}", "--seq-len", 64, *tok, match="no index.json")
    book = prolong["book"][0]
    bad_mds(tmp_path, capsys, "--data", f"mds:{book}", "--seq-len", 32, *tok, match="pass --seq-len 64")
    bad_mds(tmp_path, capsys, "--data", f"mds:{book}@1:min=100", "--seq-len", 64, *tok, match="packed already")
    small = tmp_path / "small-vocab"
    write_prolong_folder(small, [dict(r, input_ids=r["input_ids"] + 5000) for r in prolong_rows(2, 64, 10, 0, "x")])
    bad_mds(tmp_path, capsys, "--data", f"mds:{small}", "--seq-len", 64, *tok, match="outside the tokenizer's")
