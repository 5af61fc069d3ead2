"""The embedded demo end to end: `DEMO_SCALE=ci bash recipes/tiny_demo.sh` runs every stage (01 at 1x and 4x,
02, 03 with and without 02, 04 distillation, 06 soup, 05 on six models, the report) from the committed base
model, in a couple of minutes on 2 cores. The checks are independent of the stages' own code: the soup is
recomputed from the two checkpoints' tensors, the patched RoPE is read from the config, and the report's
numbers are recomputed from 05's results.json."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lc_testutil import ROOT, load_script

BASE = ROOT / "assets" / "demo_base"
NATIVE = 128  # the committed base's context (recipes/train_demo_base.sh SEQ); the demo extends it 4x
STAGES = ["data_long", "data_short", "patched", "trained", "distilled", "final", "control",
          "eval_base", "eval_yarn"]


def demo(out, **env) -> subprocess.CompletedProcess:
    full = {k: os.environ[k] for k in ("PATH", "HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                        "HF_HUB_DISABLE_TELEMETRY") if k in os.environ}
    full.update(PY=sys.executable, OUT=str(out), **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(ROOT / "recipes" / "tiny_demo.sh")], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ci_demo(tmp_path_factory):
    if not (BASE / "model.safetensors").is_file():
        pytest.fail(f"{BASE} is missing: the demo's base model is committed (recipes/train_demo_base.sh makes it)")
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = demo(out, DEMO_SCALE="ci")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_base_model_is_small_and_checksummed():
    size = sum(p.stat().st_size for p in BASE.iterdir())
    assert size <= 10 * 2**20
    sums = dict(reversed(line.split()) for line in (BASE / "SHA256SUMS").read_text().splitlines())
    import hashlib
    for name, digest in sums.items():
        assert hashlib.sha256((BASE / name).read_bytes()).hexdigest() == digest, name
    config = json.loads((BASE / "config.json").read_text())
    assert config["max_position_embeddings"] == NATIVE


def graph(out) -> dict:
    """recipes/tiny_demo.sh's pipeline, written out here: each output, the stage that must have written it and the
    inputs its manifest must name (relative names are as the script passes them: BASE is assets/demo_base)."""
    o = lambda *parts: str(out.joinpath(*parts))  # noqa: E731
    corpus = {o("corpus", "code.jsonl"), o("corpus", "books.jsonl")}
    return {
        "data_long": ("01_prepare_data", corpus | {o("corpus", "kv_long.jsonl")}),
        "data_short": ("01_prepare_data", corpus | {o("corpus", "kv_short.jsonl")}),
        "patched": ("02_rope_scale", {"assets/demo_base"}),
        "trained/final": ("03_continued_pretrain", {o("patched"), o("data_long")}),
        "control/final": ("03_continued_pretrain", {"assets/demo_base", o("data_long")}),
        "distilled/final": ("04_sft", {o("trained", "final"), "assets/demo_base", o("data_short")}),
        "final": ("06_merge", {o("trained", "final"), o("distilled", "final")}),
        "eval_base": ("05_eval", {o("models", m) for m in ("base", "patched", "control")}),
        "eval_yarn": ("05_eval", {o("models", m) for m in ("trained", "distilled", "final")}),
    }


# DEMO_SCALE=ci's sizes (recipes/tiny_demo.sh): 03 runs 3 steps of 2 rows of 4x tokens, 04 2 steps of 4 rows of 1x
CI_STEPS = {"trained": (3, 2 * 4 * NATIVE), "control": (3, 2 * 4 * NATIVE), "distilled": (2, 4 * NATIVE)}


@pytest.mark.slow
def test_ci_demo_runs_every_stage_on_the_inputs_of_the_pipeline(ci_demo):
    """Every output was written by the stage the pipeline names, from the inputs it names; the models 05 compares
    are links to those outputs; the rows have the lengths and the runs the steps and tokens of DEMO_SCALE=ci."""
    import datasets

    out, proc = ci_demo
    for name, (stage, inputs) in graph(out).items():
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["stage"] == stage and set(manifest["inputs"]) == inputs, name
    for model, target in (("base", BASE), ("patched", out / "patched"), ("control", out / "control" / "final"),
                          ("trained", out / "trained" / "final"), ("distilled", out / "distilled" / "final"),
                          ("final", out / "final")):
        assert os.path.realpath(out / "models" / model) == os.path.realpath(target), model
    for name, length in (("data_long", 4 * NATIVE), ("data_short", NATIVE)):  # counted from the rows themselves
        rows = datasets.load_from_disk(str(out / name))
        assert {len(ids) for ids in rows["input_ids"]} == {length}, name
    for run, (steps, tokens) in CI_STEPS.items():
        records = [r for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert [(r["step"], r["tokens"]) for r in records] == [(s, tokens) for s in range(1, steps + 1)], run
    for e in ("eval_base", "eval_yarn"):
        for m in json.loads((out / e / "results.json").read_text())["models"]:
            assert m["niah"]["lengths"] == [NATIVE, 2 * NATIVE, 4 * NATIVE] and m["ppl"]["seq_len"] == 4 * NATIVE
    report = (out / "report.md").read_text()
    assert "DEMO_SCALE=ci" in report and "## Targets" in report
    import matplotlib.image

    for plot in ("loss_by_position.png", "niah_heatmaps.png"):  # pictures that decode, not empty files
        height, width, _ = matplotlib.image.imread(out / plot).shape
        assert height >= 200 and width >= 300, plot
    assert "demo done in" in proc.stdout


@pytest.mark.slow
def test_ci_demo_soup_is_the_mean_and_yarn_is_patched(ci_demo):
    out, _ = ci_demo
    a = load_file(out / "trained" / "final" / "model.safetensors")
    b = load_file(out / "distilled" / "final" / "model.safetensors")
    soup = load_file(out / "final" / "model.safetensors")
    assert soup.keys() == a.keys()
    for k in a:
        want = (a[k].double() + b[k].double()) / 2
        assert torch.allclose(soup[k].double(), want, atol=1e-6), k
    config = json.loads((out / "patched" / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4
    assert rope.get("original_max_position_embeddings", NATIVE) == NATIVE
    for model in ("trained", "distilled"):  # the YaRN settings travel through training and distillation
        cfg = json.loads((out / model / "final" / "config.json").read_text())
        assert (cfg.get("rope_parameters") or cfg["rope_scaling"])["rope_type"] == "yarn"
    control = json.loads((out / "control" / "final" / "config.json").read_text())
    assert (control.get("rope_parameters") or {}).get("rope_type", "default") == "default"


@pytest.mark.slow
def test_ci_demo_report_numbers_come_from_the_results(ci_demo):
    out, _ = ci_demo
    models = {}
    for e in ("eval_base", "eval_yarn"):
        for m in json.loads((out / e / "results.json").read_text())["models"]:
            models[os.path.basename(m["name"])] = m
    assert set(models) == {"base", "patched", "trained", "distilled", "final", "control"}
    report = (out / "report.md").read_text()

    def mean_acc(m, length):  # over every task, depth and sample, from the grid
        cells = [v for t in m["niah"]["grid"].values() for v in t[str(length)].values()]
        return sum(cells) / len(cells)

    base_acc = mean_acc(models["base"], NATIVE)
    row = re.search(rf"\| base retrieves >= 90% inside its window \(NIAH at {NATIVE}\) \| ([\d.]+)%", report)
    assert row and abs(float(row.group(1)) - base_acc) < 0.051

    # retrieval by length with its 95% Wilson interval, the formula written out here
    z = 1.959964
    section = report[report.index("## Needle retrieval"):]
    for name, m in models.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        cells = re.findall(r"([\d.]+) \[(\d+), (\d+)\] n=(\d+)", row)
        lengths = m["niah"]["lengths"]
        assert len(cells) == len(lengths), row
        for (score, lo, hi, n), length in zip(cells, lengths):
            p, n = mean_acc(m, length) / 100, int(n)
            assert n == m["niah"]["prompts"] // len(lengths)
            centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
            want = [100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)]
            assert abs(float(score) - 100 * p) < 0.051, (name, length)
            assert abs(int(lo) - max(0.0, want[0])) <= 0.5 + 1e-9 and abs(int(hi) - min(100.0, want[1])) <= 0.5 + 1e-9

    def short_ppl(m):  # token-weighted mean loss over the buckets inside the window
        inside = [b for b in m["ppl"]["buckets"] if b["end"] <= NATIVE]
        return math.exp(sum(b["loss"] * b["tokens"] for b in inside) / sum(b["tokens"] for b in inside))

    row = re.search(r"within 10% of the base \| ([\d.]+) vs ([\d.]+)", report)
    assert row and abs(float(row.group(1)) - short_ppl(models["final"])) < 0.006
    assert abs(float(row.group(2)) - short_ppl(models["base"])) < 0.006


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path):
    proc = demo(tmp_path / "dry", DRY_RUN=1)
    assert proc.returncode == 0, proc.stderr
    for script in ("01_prepare_data.py", "02_rope_scale.py", "03_continued_pretrain.py", "04_sft.py",
                   "06_merge.py", "05_eval.py", "demo_report.py"):
        assert script in proc.stdout, script
    assert "--ignore-max-positions" in proc.stdout  # the control: 03 without 02
    assert not (tmp_path / "dry").exists()


def test_unknown_scale_is_one_error_line(tmp_path):
    proc = demo(tmp_path / "bad", DEMO_SCALE="huge")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: DEMO_SCALE=huge is neither full nor ci"]
    assert not (tmp_path / "bad").exists()


def test_kv_documents_drawn_from_a_length_range_fit_and_ask_what_they_hold(tmp_path):
    demo_data = load_script("recipes/demo_data")
    corpus, out = tmp_path / "corpus", tmp_path / "kv.jsonl"
    demo_data.write_corpus(corpus, max_chars=200_000)
    # heldout.jsonl: single-file modules of the standard library, none of them in the corpus the models train on
    ids = {name: [json.loads(x)["id"] for x in (corpus / f"{name}.jsonl").read_text().splitlines()]
           for name in ("code", "books", "heldout")}
    trained_on = {d["id"] for d in demo_data.common.code_repo_documents()} | {
        d["id"] for d in demo_data.common.book_documents()}
    assert len(ids["heldout"]) >= 16 and not set(ids["heldout"]) & trained_on
    assert "stdlib/argparse.py" in ids["heldout"]
    assert demo_data.main(["kv", "--tokenizer", str(BASE), "--corpus", str(corpus), "--out", str(out),
                           "--num-docs", "60", "--doc-tokens", "40-127", "--pairs", "1-4", "--seed", "3"]) == 0
    tok = demo_data.common.load_tokenizer(str(BASE))
    lengths, pairs = [], []
    for line in out.read_text().splitlines():
        text = json.loads(line)["text"]
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n <= 127
        lengths.append(n)
        needles = re.findall(r"The special magic number for (\S+) (\d{7})\.", text)
        first = {}
        for key, value in needles:  # a key's later lines repeat its first: the value is the same
            assert first.setdefault(key, value) == value
        assert needles[-1] in needles[:-1]  # the document ends on a question about an earlier needle
        pairs.append(len(first))
    assert min(lengths) < 70 and max(lengths) > 110  # lengths spread over the range
    assert min(pairs) == 1 and max(pairs) >= 3  # short documents hold fewer pairs


def test_word_drills_repeat_a_line_of_whole_word_tokens():
    demo_data = load_script("recipes/demo_data")
    tok = demo_data.common.load_tokenizer(str(BASE))
    words = demo_data.word_tokens(tok)
    assert len(words) > 200
    ids_of_words = {tok.encode(" " + w)[0] for w in words}
    rng = demo_data.random.Random(0)
    for _ in range(20):
        d = demo_data.repeat_document(rng, tok, (8, 64), words)
        line = d["text"][:len(d["text"]) // 2]
        assert d["text"] == line + line and line.endswith("\n")
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(line.split()) + 1 <= 32  # one token per word, then the newline
        assert set(ids[:-1]) <= ids_of_words
        assert d["tokens"] == len(tok(d["text"], add_special_tokens=False)["input_ids"]) <= 64
