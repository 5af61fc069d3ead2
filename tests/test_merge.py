"""06_merge.py: soups equal the hand-computed weighted average, weight 1 reproduces its input bitwise, and
incompatible ingredients are refused with one clear line and no output."""
import json

import pytest
import torch
from safetensors.torch import load_file

import assets
import common
from lc_testutil import load_script, run_script, error_lines

merge = load_script("06_merge")


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory, tokenizer_dir):
    a = assets.build_tiny_model(tmp_path_factory.mktemp("a"), "llama", tokenizer_dir, seed=1)
    b = assets.build_tiny_model(tmp_path_factory.mktemp("b"), "llama", tokenizer_dir, seed=2)
    return a, b


def weights_of(path):
    return load_file(f"{path}/model.safetensors")


def test_weighted_soup_equals_hand_average(two_llamas, tmp_path):
    a, b = two_llamas
    merge.main(["--models", a, b, "--weights", "3", "1", "--out", str(tmp_path / "soup")])
    wa, wb, ws = weights_of(a), weights_of(b), weights_of(tmp_path / "soup")
    assert set(ws) == set(wa)
    for name in wa:
        expected = 0.75 * wa[name].double() + 0.25 * wb[name].double()
        torch.testing.assert_close(ws[name].double(), expected, rtol=1e-6, atol=1e-7)
    manifest = common.read_manifest(tmp_path / "soup")
    assert manifest["stage"] == "06_merge"
    assert [i["weight"] for i in manifest["recipe"]["ingredients"]] == [0.75, 0.25]
    assert "merge_method: linear" in (tmp_path / "soup" / "mergekit.yml").read_text()


def test_merged_model_loads_and_matches_average_logits(two_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = two_llamas
    merge.main(["--models", a, "--original", b, "--lam", "0.9", "--out", str(tmp_path / "interp")])
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "interp")
    reference = AutoModelForCausalLM.from_pretrained(a)
    wa, wb = weights_of(a), weights_of(b)
    reference.load_state_dict({k: 0.9 * wa[k] + 0.1 * wb[k] for k in wa}, strict=False)
    ids = torch.arange(1, 40)[None]
    torch.testing.assert_close(soup(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--weights", "1", "0"]])
def test_weight_one_reproduces_input_bitwise(two_llamas, tmp_path, extra):
    a, b = two_llamas
    models = [a] if not extra else [a, b]
    merge.main(["--models", *models, *extra, "--out", str(tmp_path / "same")])
    wa, ws = weights_of(a), weights_of(tmp_path / "same")
    assert all(torch.equal(wa[k], ws[k]) for k in wa)


def test_bf16_weight_one_is_bitwise_and_shards_stream(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    src = assets.build_tiny_model(tmp_path / "src", "llama", tokenizer_dir, seed=3)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    common.load_tokenizer(src).save_pretrained(tmp_path / "bf16")
    merge.main(["--models", str(tmp_path / "bf16"), "--max-shard-size", "0.00005",
                "--out", str(tmp_path / "sharded")])
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / "sharded" / f))
    original = weights_of(tmp_path / "bf16")
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], original[k]) for k in original)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert reloaded.dtype == torch.bfloat16


def test_config_and_rope_come_from_config_from(two_llamas, tmp_path, capsys):
    a, b = two_llamas
    patched = tmp_path / "patched"
    import shutil

    shutil.copytree(b, patched)
    config = json.loads((patched / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    (patched / "config.json").write_text(json.dumps(config))
    merge.main(["--models", a, str(patched), "--config-from", str(patched), "--out", str(tmp_path / "soup")])
    out_config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert out_config["rope_parameters"]["rope_type"] == "linear"
    assert "other RoPE settings" in capsys.readouterr().out


def test_mismatched_shapes_are_refused(two_llamas, tmp_path, tokenizer_dir):
    a, _ = two_llamas
    wide = assets.build_tiny_model(tmp_path / "wide", "llama", tokenizer_dir, intermediate_size=96)
    proc = run_script("06_merge", "--models", a, wide, "--out", tmp_path / "soup")
    assert proc.returncode != 0
    assert len(error_lines(proc)) == 1 and "shape" in error_lines(proc)[0]
    assert not (tmp_path / "soup").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wide"]  # no temporary directory left behind


@pytest.mark.parametrize("argv, message", [
    (["--weights", "1", "-1"], "sum to 0"),
    (["--weights", "1"], "one weight per model"),
    (["--lam", "0.5"], "go together"),
])
def test_bad_weights_are_refused(two_llamas, tmp_path, argv, message):
    a, b = two_llamas
    with pytest.raises(common.UserError, match=message):
        merge.main(["--models", a, b, *argv, "--out", str(tmp_path / "soup")])
    assert not (tmp_path / "soup").exists()


def test_different_tokenizer_is_refused(two_llamas, tmp_path):
    import shutil

    a, b = two_llamas
    other = tmp_path / "other"
    shutil.copytree(b, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[300], list(vocab)[301]  # same size, two ids swapped: a different tokenizer
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(common.UserError, match="different tokenizer"):
        merge.main(["--models", a, str(other), "--out", str(tmp_path / "soup")])
