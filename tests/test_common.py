"""The foundation in common.py: atomic outputs, manifests, clear failures, loading by path."""
import json
import subprocess
import sys

import pytest

import common


def test_atomic_output_dir_success_and_failure(tmp_path):
    out = tmp_path / "out"
    with common.atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not out.exists()  # nothing visible until complete
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(common.UserError):
        with common.atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half-written")
            common.fail("boom")
    assert (out / "a.txt").read_text() == "first"  # the previous output survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind

    with common.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_refused_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(common.UserError, match="--overwrite"):
        with common.atomic_output_dir(tmp_path / "out"):
            pass


def test_run_main_gives_one_error_line_and_exit_2(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import common\n"
            "def main(argv): common.fail('the input is bad; pass a good one')\n"
            "common.run_main(main)\n") % str(common.__file__.rsplit("/", 1)[0])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: the input is bad; pass a good one"]


def test_manifest_records_lineage_and_versions(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    common.write_manifest(first, "01_prepare_data", {"seq_len": 64}, stats={"rows": 3})
    second = tmp_path / "second"
    second.mkdir()
    m = common.write_manifest(second, "02_rope_scale", {"factor": 4.0}, inputs=[first])
    on_disk = json.loads((second / "manifest.json").read_text())
    assert on_disk == m
    assert on_disk["inputs"][str(first)]["stats"] == {"rows": 3}
    assert on_disk["versions"]["torch"].startswith("2.")


def test_load_tokenizer_and_model_by_path(tiny_llama_dir, tokenizer):
    tok = common.load_tokenizer(tiny_llama_dir)
    assert tok.eos_token_id == tokenizer.eos_token_id and tok.pad_token_id is not None
    text = "In the beginning God created the heaven and the earth.\ndef f(x):\n    return x"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE round-trips
    model = common.load_model(tiny_llama_dir)
    assert model.config.num_hidden_layers == 2 and not model.training


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_model(str(tmp_path / "nope"))
    with pytest.raises(common.UserError, match="HF_HUB_OFFLINE"):
        common.load_tokenizer("some-org/some-model-that-is-not-cached")
