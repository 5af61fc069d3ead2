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

from lc_testutil import ROOT

BASE = ROOT / "assets" / "demo_base"
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
    assert config["max_position_embeddings"] == 256


@pytest.mark.slow
def test_ci_demo_runs_every_stage_with_manifests(ci_demo):
    out, proc = ci_demo
    for stage in STAGES:
        trained = stage in ("trained", "distilled", "control")  # 03 and 04 write OUT/final/ beside checkpoints
        assert (out / stage / ("final" if trained else "") / "manifest.json").is_file(), stage
    report = (out / "report.md").read_text()
    assert "DEMO_SCALE=ci" in report and "## Targets" in report
    assert (out / "loss_by_position.png").stat().st_size > 1000 and (out / "niah_heatmaps.png").stat().st_size > 1000
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
    assert rope.get("original_max_position_embeddings", 256) == 256
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

    base_acc = mean_acc(models["base"], 256)
    row = re.search(r"\| base retrieves >= 90% inside its window \(NIAH at 256\) \| ([\d.]+)%", report)
    assert row and abs(float(row.group(1)) - base_acc) < 0.051

    def short_ppl(m):  # token-weighted mean loss over the buckets inside the window
        inside = [b for b in m["ppl"]["buckets"] if b["end"] <= 256]
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
