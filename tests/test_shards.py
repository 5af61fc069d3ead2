"""A corpus prepared as shards (01_prepare_data.py --num-shards 3) and read as one dataset (packed_data.py; 03's
--data with several directories or the directory holding them): the same data order, losses and resume
behaviour as one directory holding the same rows (built here with `datasets` itself); mismatched, incomplete or
repeated shards refused with one line; 01 --merge-report combines the shards' statistics into one report."""
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

import assets
import common
import fsdp_train
import packed_data
from lc_testutil import load_script
from test_prepare_data import code_docs, kjv_docs, write_jsonl
from test_train_runs import trajectory

prep = load_script("01_prepare_data")
cpt = load_script("03_continued_pretrain")


def prepare(out, sources, tokenizer_dir, *extra):
    argv = ["--data", *map(str, sources), "--tokenizer", tokenizer_dir, "--seq-len", "64", "--num-proc", "1",
            "--seed", "5", "--out", str(out), *map(str, extra)]
    assert common.call_main(prep.main, argv) == 0
    return out


def one_directory(shards, out):
    """The shards' rows concatenated in order into one directory, by `datasets` itself, with shard 0's manifest
    (as one preparation)."""
    import datasets

    ds = datasets.concatenate_datasets([datasets.load_from_disk(str(d)) for d in shards])
    ds.save_to_disk(str(out))
    manifest = common.read_manifest(shards[0])
    manifest.update(num_rows=len(ds), shard={"index": 0, "count": 1},
                    num_tokens=sum(common.read_manifest(d)["num_tokens"] for d in shards))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("corpus")
    sources = [f"books={write_jsonl(root / 'books.jsonl', kjv_docs(45, (2, 12), seed=3))}@2",
               f"code={write_jsonl(root / 'code.jsonl', code_docs(30, max_chars=1500))}@1"]
    shards = [prepare(root / "data" / f"shard-{k}", sources, tokenizer_dir, "--num-shards", 3, "--shard-index", k)
              for k in range(3)]
    return {"root": root, "sources": sources, "shards": shards, "single": one_directory(shards, root / "single")}


def test_shards_read_as_one_dataset_in_the_order_given(corpus):
    shards, single = corpus["shards"], corpus["single"]
    one = packed_data.PackedData.open(single)
    for data in (packed_data.PackedData.open(corpus["root"] / "data"), packed_data.PackedData.open(shards)):
        assert data.num_rows == one.num_rows == sum(common.read_manifest(d)["num_rows"] for d in shards)
        assert np.array_equal(data.attn_cost, one.attn_cost) and np.array_equal(data.num_pad, one.num_pad)
        stream = fsdp_train.DataOrder(data.num_rows, seed=7).take(0, 2 * data.num_rows)  # two epochs
        rows, ref = data.rows(r for _, r in stream), one.rows(r for _, r in stream)
        for a, b in zip(rows, ref):
            assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["doc_lens"], b["doc_lens"])
        assert data.fingerprint()["path"] == [str(d.resolve()) for d in shards]
    reverse = packed_data.PackedData.open(shards[::-1])  # rows are numbered in the order the shards are given
    assert not np.array_equal(reverse.rows([0])[0]["input_ids"], one.rows([0])[0]["input_ids"])


def train_args(data, tokenizer_dir, out, *extra):
    data = [data] if isinstance(data, (str, os.PathLike)) else data
    return ["--init-config", "tiny-llama", "--tokenizer", tokenizer_dir, "--data", *map(str, data), "--out",
            str(out), "--device", "cpu", "--batch-tokens", "256", "--micro-batch-tokens", "128", "--max-steps", "4",
            "--lr", "1e-3", "--save-every", "0", "--no-export", "--seed", "3", *map(str, extra)]


def test_training_on_shards_equals_one_directory_and_resumes_exactly(corpus, tokenizer_dir, tmp_path, capsys):
    ref = tmp_path / "one"
    assert common.call_main(cpt.main, train_args(corpus["single"], tokenizer_dir, ref)) == 0
    out = tmp_path / "shards"
    shards_dir = corpus["root"] / "data"
    assert common.call_main(cpt.main, train_args(shards_dir, tokenizer_dir, out, "--save-every", 2)) == 0
    assert trajectory(out) == trajectory(ref)  # same rows in the same order: bitwise the same losses
    # resumed from step 2 (as after a kill before step 4's checkpoint; the kill itself: test_train_runs.py), the
    # shards' data order continues where it stopped
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert common.call_main(cpt.main, train_args(shards_dir, tokenizer_dir, out, "--save-every", 2, "--resume",
                                                 "auto")) == 0
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out
    assert trajectory(out) == trajectory(ref)
    # the fingerprint covers the set and its order: the same shards in another order are another run
    code = common.call_main(cpt.main, train_args(corpus["shards"][::-1], tokenizer_dir, out, "--resume", "auto"))
    assert code == 2 and "settings differ" in capsys.readouterr().err


def one_error_line(capsys, main, argv) -> str:
    code = common.call_main(main, [str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_mismatched_incomplete_or_repeated_shards_are_refused(corpus, tokenizer_dir, tmp_path, capsys):
    s0, s1, s2 = corpus["shards"]
    other_len = prepare(tmp_path / "len", corpus["sources"], tokenizer_dir, "--seq-len", 32)
    other_tok = prepare(tmp_path / "tok", corpus["sources"], assets.build_bpe_tokenizer(tmp_path / "t2", 700))
    out = tmp_path / "run"
    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    for data, match in (([s0, s1, s2, other_len], "differ in row length"), ([s0, s1, s2, other_tok], "tokenizer"),
                        ([s0, s2], "shard(s) [1] missing"), ([s0, s1, s2, s1], f"names {s1} twice"),
                        ([s0, tmp_path / "missing", s2], "is not a directory"),
                        ([tmp_path / "mixed"], "nor sub-folders that are all its shards")):
        assert match in one_error_line(capsys, cpt.main, train_args(data, tokenizer_dir, out))
        assert not out.exists()
    # the same shard of the same preparation twice (a copy of it under another name)
    copy = tmp_path / "copy"
    one_directory([s1], copy)
    (copy / "manifest.json").write_text((s1 / "manifest.json").read_text())
    assert "shard 1 twice" in one_error_line(capsys, cpt.main, train_args([s0, s1, s2, copy], tokenizer_dir, out))


def test_merge_report_combines_the_shards_statistics(corpus, tmp_path, capsys):
    import datasets

    out = tmp_path / "report"
    assert common.call_main(prep.main, ["--merge-report", str(corpus["root"] / "data"), "--out", str(out)]) == 0
    assert "3 shards" in capsys.readouterr().out
    report = common.read_manifest(out)
    stats = report["stats"]
    rows = datasets.load_from_disk(str(corpus["single"]))  # counted from the rows themselves
    real = Counter()
    for source, num_pad in zip(rows["source"], rows["num_pad"]):
        real[source] += 64 - num_pad
    assert report["stage"] == "01_merge_report" and stats["num_rows"] == len(rows)
    assert {n: s["tokens_out"] for n, s in stats["sources"].items()} == dict(real)
    assert stats["num_tokens"] == sum(real.values())
    for name, s in stats["sources"].items():
        assert s["achieved_share"] == pytest.approx(real[name] / sum(real.values()))
        assert s["docs_in_shard"] == (45 if name == "books" else 30)  # every document in exactly one shard
        assert sum(h["docs"] for h in s["length_histogram"]) == s["docs_out"]
    assert stats["max_share_error"] < 0.05
    assert "neither" in one_error_line(capsys, prep.main, ["--merge-report", tmp_path, "--out", tmp_path / "r2"])
    assert not (tmp_path / "r2").exists()
