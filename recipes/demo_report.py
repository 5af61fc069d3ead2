"""The embedded demo's report (runs/demo/report.md) and the base model's card (assets/demo_base/README.md).

    report     read 05's results.json and the demo's stage timings; write report.md with every target of the
               demo (measured value, PASS / MISS), plain statements about what the numbers show, the needle
               heatmaps and the loss-by-position curves (PNG)
    base-card  turn recipes/train_demo_base.sh's 03 run into the committed base directory: weights, config,
               tokenizer, manifest, the retrieval-vs-steps curve, README.md and SHA256SUMS

Usage:
    python recipes/demo_report.py report --eval runs/demo/eval --demo runs/demo --out runs/demo/report.md
    python recipes/demo_report.py base-card --train runs/demo_base/train --curve runs/demo_base/curve.jsonl \\
        --out assets/demo_base --command "bash recipes/train_demo_base.sh" --seconds 7200
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import safe_output  # noqa: E402
from common import fail  # noqa: E402
from demo_data import eval_module  # noqa: E402  (05_eval.py as a module)

# The models of the demo, in 05's order (tiny_demo.sh links them under these names), and how each was made.
MODELS = {
    "base": "the committed base model: {native}-token context, trained from scratch (recipes/train_demo_base.sh)",
    "patched": "02 only: the base with YaRN x{factor} in its config, no training",
    "trained": "patched + 03 continued pretraining at {long} tokens (corpus + key-value documents)",
    "distilled": "trained + 04 distillation from the base on {native}-token text (alpha 0.5, T 2)",
    "final": "06 soup: the mean of trained and distilled",
    "control": "the base + the same 03 run WITHOUT 02 (plain RoPE, positions past its window)",
}


# -------------------------------------------------------------------------------------------------------------
# Measurements derived from 05's results


def model_results(eval_dirs: list[Path]) -> dict[str, dict]:
    """The models of 05's results.json files, by their directory names (tiny_demo.sh's links), in MODELS order."""
    out = {}
    for eval_dir in eval_dirs:
        path = eval_dir / "results.json"
        if not path.is_file():
            fail(f"{path} is missing; run 05_eval.py first (recipes/tiny_demo.sh does)")
        with open(path) as f:
            res = json.load(f)
        for m in res["models"]:
            m["eval_dir"] = eval_dir.name
            out[Path(m["name"]).name] = m
    missing = [k for k in MODELS if k not in out]
    if missing:
        fail(f"{', '.join(str(d) for d in eval_dirs)} lack the model(s) {missing}; evaluate all of "
             f"{list(MODELS)} (as directories with these names)")
    return {k: out[k] for k in MODELS}


def window_losses(ppl: dict, native: int) -> dict:
    """Mean losses from 05's position buckets: `inside` = the last bucket inside the native window, `beyond` =
    each bucket starting at or past it, `short` = every position inside the window (token-weighted)."""
    buckets = ppl["buckets"]
    inside = [b for b in buckets if b["end"] <= native]
    beyond = [b for b in buckets if b["start"] >= native]
    if not inside or not beyond:
        fail(f"the loss buckets {[(b['start'], b['end']) for b in buckets]} do not split at the native length "
             f"{native}; evaluate 05 with --seq-len > {native} and log buckets")
    n = sum(b["tokens"] for b in inside)
    short = sum(b["loss"] * b["tokens"] for b in inside) / n
    return {"inside": inside[-1], "beyond": beyond, "short_loss": short, "short_ppl": math.exp(short),
            "last": buckets[-1]}


def niah_cell(m: dict, task: str, length: int) -> float:
    grid = m["niah"]["grid"][task][str(length)]
    return sum(grid.values()) / len(grid)


def niah_mean(m: dict, length: int) -> float:
    """Accuracy at one length, over every task, depth and sample (05's by_length)."""
    return m["niah"]["by_length"][str(length)]


def fmt_bucket(b: dict) -> str:
    return f"{b['start']}-{b['end'] - 1}"


def targets(r: dict[str, dict], native: int, factor: int) -> list[dict]:
    """Every target of the demo with its measured value and PASS / MISS."""
    long = native * factor
    w = {k: window_losses(v["ppl"], native) for k, v in r.items()}
    base, patched, trained, final = w["base"], w["patched"], w["trained"], w["final"]
    rows = []

    ratio = base["last"]["loss"] / base["inside"]["loss"]
    rows.append({"target": f"base: loss in the last bucket at {factor}x ({fmt_bucket(base['last'])}) >= 1.2x its "
                           f"loss inside the window ({fmt_bucket(base['inside'])})",
                 "measured": f"{ratio:.2f}x ({base['last']['loss']:.3f} vs {base['inside']['loss']:.3f})",
                 "pass": ratio >= 1.2})

    pairs = [(p["loss"], b["loss"], fmt_bucket(b)) for p, b in zip(patched["beyond"], base["beyond"])]
    rows.append({"target": "02 alone (patched, no training) already lower than the base beyond the window",
                 "measured": "; ".join(f"{s}: {p:.3f} vs {b:.3f}" for p, b, s in pairs),
                 "pass": all(p < b for p, b, _ in pairs)})

    worst = max(b["loss"] / trained["inside"]["loss"] for b in trained["beyond"])
    beyond = "; ".join(f"{fmt_bucket(b)}: {b['loss']:.3f}" for b in trained["beyond"])
    rows.append({"target": f"after 03 (trained): every bucket beyond the window <= 1.05x the inside one "
                           f"({fmt_bucket(trained['inside'])})",
                 "measured": f"worst {worst:.3f}x ({beyond}; inside {trained['inside']['loss']:.3f})",
                 "pass": worst <= 1.05})

    acc = niah_mean(r["base"], native)
    rows.append({"target": f"base retrieves >= 90% inside its window (NIAH at {native})",
                 "measured": f"{acc:.1f}%", "pass": acc >= 90})

    t_acc, b_acc = niah_mean(r["trained"], long), niah_mean(r["base"], long)
    rows.append({"target": f"trained retrieves >= 80% at {factor}x ({long}) where the unpatched base is <= 20%",
                 "measured": f"trained {t_acc:.1f}%, base {b_acc:.1f}%", "pass": t_acc >= 80 and b_acc <= 20})

    ratio = final["short_ppl"] / base["short_ppl"]
    rows.append({"target": f"final short-context perplexity (positions 1-{native - 1}) within 10% of the base",
                 "measured": f"{final['short_ppl']:.2f} vs {base['short_ppl']:.2f} ({ratio - 1:+.1%})",
                 "pass": ratio <= 1.10})
    return rows


def statements(r: dict[str, dict], native: int, factor: int) -> list[str]:
    """Plain sentences about what the numbers show, whichever way they came out."""
    long = native * factor
    w = {k: window_losses(v["ppl"], native) for k, v in r.items()}
    acc = {k: niah_mean(v, long) for k, v in r.items()}
    out = []
    inside = niah_mean(r["base"], native)
    cells = r["base"]["niah"]["by_length_cells"]
    out.append("The base retrieves " + ", ".join(
        f"{c['score']:.0f}% [{c['lo']:.0f}, {c['hi']:.0f}] at {L} tokens" for L, c in cells.items())
        + f" (its window: {native}); past the window the patched-only model {acc['patched']:.0f}%, the trained "
          f"{acc['trained']:.0f}%, the control {acc['control']:.0f}% at {long}.")
    if inside < 50:
        out.append(f"The base does not retrieve inside its own window ({inside:.0f}% at {native} tokens), so the "
                   f"retrieval rows say nothing about context extension: the skill was never there to extend. "
                   f"The base's training and what it measured are in its README (assets/demo_base/README.md); the "
                   f"loss-by-position and short-context rows do not depend on it.")
    d_acc = acc["control"] - acc["trained"]
    d_loss = w["control"]["last"]["loss"] / w["trained"]["last"]["loss"] - 1
    if abs(d_acc) <= 10 and abs(d_loss) <= 0.05:
        out.append(f"The control (the same continued pretraining without 02) matches the YaRN model after "
                   f"training: {acc['control']:.0f}% vs {acc['trained']:.0f}% retrieval at {long} tokens, loss at "
                   f"{fmt_bucket(w['trained']['last'])} {d_loss:+.1%}. At this scale the training, not the RoPE "
                   f"patch, does the work; YaRN's visible gain is the untrained starting point (patched vs base).")
    else:
        better = "YaRN model" if (acc["trained"] - acc["control"]) + 100 * (-d_loss) > 0 else "control"
        out.append(f"The control (the same continued pretraining without 02) does not match the YaRN model: "
                   f"{acc['control']:.0f}% vs {acc['trained']:.0f}% retrieval at {long} tokens, loss at "
                   f"{fmt_bucket(w['trained']['last'])} {d_loss:+.1%} against the YaRN model; the {better} "
                   f"is ahead.")
    if acc["patched"] >= 80 and acc["base"] <= 20:
        out.append(f"At this scale 02 alone brings retrieval back ({acc['base']:.0f}% -> {acc['patched']:.0f}% at "
                   f"{long} tokens, before any training): YaRN maps the longer window onto rotations the base was "
                   f"trained on, and its copying carries over. After it, 03 moves the loss at "
                   f"{fmt_bucket(w['trained']['last'])} from {w['patched']['last']['loss']:.3f} to "
                   f"{w['trained']['last']['loss']:.3f} and the short-context perplexity from "
                   f"{w['patched']['short_ppl']:.2f} to {w['trained']['short_ppl']:.2f} (the base: "
                   f"{w['base']['short_ppl']:.2f}); 04 and the soup bring the latter to "
                   f"{w['distilled']['short_ppl']:.2f} and {w['final']['short_ppl']:.2f}.")
    p, b = w["patched"]["last"]["loss"], w["base"]["last"]["loss"]
    out.append(f"02 alone (no training) changes the loss at {fmt_bucket(w['base']['last'])} from "
               f"{b:.3f} (base) to {p:.3f}, retrieval at {long} from {acc['base']:.0f}% to {acc['patched']:.0f}%, "
               f"and costs {w['patched']['short_ppl'] / w['base']['short_ppl'] - 1:+.1%} short-context "
               f"perplexity (YaRN interpolates the slow RoPE pairs and scales attention inside the window too).")
    out.append(f"Short-context perplexity (positions 1-{native - 1}): base {w['base']['short_ppl']:.2f}, trained "
               f"{w['trained']['short_ppl']:.2f}, distilled {w['distilled']['short_ppl']:.2f}, final (soup) "
               f"{w['final']['short_ppl']:.2f}, control {w['control']['short_ppl']:.2f}.")
    out.append(f"Retrieval at {long} tokens: " + ", ".join(f"{k} {acc[k]:.0f}%" for k in MODELS) + ".")
    return out


# -------------------------------------------------------------------------------------------------------------
# Figures


def plot_loss(path: Path, r: dict[str, dict], native: int) -> None:
    eval_module().plot_ppl(path, {k: m["ppl"] for k, m in r.items()}, spacing_log=True, window=native,
                           dashed=("control",), title="loss by position on held-out code (stdlib single-file modules)")


def plot_niah(path: Path, r: dict[str, dict]) -> None:
    """One heatmap per (task, model): needle depth x context length, accuracy in %."""
    plt = eval_module()._plt()
    names = list(r)
    tasks = r[names[0]]["niah"]["tasks"]
    fig, axes = plt.subplots(len(tasks), len(names), figsize=(2.1 * len(names) + 1, 2.3 * len(tasks) + 0.6),
                             squeeze=False)
    im = None
    for ti, task in enumerate(tasks):
        for mi, name in enumerate(names):
            s = r[name]["niah"]
            ax = axes[ti][mi]
            data = [[s["grid"][task][str(L)][str(d)] for L in s["lengths"]] for d in s["depths"]]
            im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(s["lengths"])), [str(L) for L in s["lengths"]], fontsize=7)
            ax.set_yticks(range(len(s["depths"])), [f"{d:g}" for d in s["depths"]], fontsize=7)
            for yi, row in enumerate(data):
                for xi, v in enumerate(row):
                    ax.text(xi, yi, f"{v:.0f}", ha="center", va="center", fontsize=7)
            if ti == 0:
                ax.set_title(name, fontsize=9)
            if mi == 0:
                ax.set_ylabel(f"{task}\nneedle depth (%)", fontsize=8)
            if ti == len(tasks) - 1:
                ax.set_xlabel("context (tokens)", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="retrieval accuracy (%)", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------
# report.md


def read_timings(path: Path) -> list[tuple[str, float]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        name, _, sec = line.rpartition("\t")
        if name:
            out.append((name, float(sec)))
    return out


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    import torch

    return (f"{platform.machine()} CPU, {cores} core(s), load average {load} (1/5/15 min) when the report was "
            f"written; torch {torch.__version__}, Python {platform.python_version()}")


def base_curve(base_dir: Path) -> list[dict]:
    path = base_dir / "curve.json"
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f).get("checkpoints", [])


def write_report(args) -> Path:
    """report.md beside its two plots: the targets, what the numbers show, the models, needle retrieval, loss by
    position, the base's training curve, wall times and the files."""
    native, factor = args.native, args.factor
    r = model_results([Path(e) for e in args.eval])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_loss(out.parent / "loss_by_position.png", r, native)
    plot_niah(out.parent / "niah_heatmaps.png", r)
    tgt = targets(r, native, factor)
    timings = read_timings(Path(args.demo) / "timings.tsv")
    lines = header_lines(args, timings)
    lines += target_lines(r, tgt, native, factor)
    lines += needle_lines(r, native)
    lines += position_lines(r, native, factor)
    lines += curve_lines(Path(args.base), native)
    lines += timing_lines(timings)
    eval_dirs = dict.fromkeys(m["eval_dir"] for m in r.values())
    lines += ["## Files", "",
              "- per model: `<eval>/<n>-<model>/niah.csv` (every prompt, generation and score), `niah_heatmap.png`, "
              "`ppl.json`; 05's own reports: " + ", ".join(f"`{e}/report.md`" for e in eval_dirs),
              "- training logs and metrics: `trained/metrics.jsonl`, `control/metrics.jsonl`, "
              "`distilled/metrics.jsonl`, `logs/`", ""]
    text = "\n".join(lines) + "\n"
    common.atomic_write_text(out, text)
    if not args.quiet:
        rows = [[t["target"], t["measured"], "PASS" if t["pass"] else "MISS"] for t in tgt]
        print(eval_module().md_table(["target", "measured", "result"], rows))
    return out


def header_lines(args, timings: list[tuple[str, float]]) -> list[str]:
    native, factor = args.native, args.factor
    lines = [f"# longctx demo: a {native}-token Llama extended to {native * factor} tokens (YaRN x{factor}), "
             "measured", ""]
    if args.scale != "full":
        lines += [f"> **DEMO_SCALE={args.scale}**: every stage ran with tiny sizes to prove the pipeline end to "
                  "end. These numbers say nothing about the recipe; run `make demo` for the real ones.", ""]
    total = dict(timings).get("total")
    after = f" after {total / 60:.1f} min" if total else ""
    return lines + [f"Written {time.strftime('%Y-%m-%d %H:%M')}{after}. Machine: {machine()}.", ""]


def target_lines(r: dict[str, dict], tgt: list[dict], native: int, factor: int) -> list[str]:
    """The targets (PASS / MISS), what the numbers show, and how each model was made."""
    em = eval_module()
    rows = [[t["target"], t["measured"], "PASS" if t["pass"] else "**MISS**"] for t in tgt]
    lines = ["## Targets", "", em.md_table(["target", "measured", "result"], rows), ""]
    missed = [t for t in tgt if not t["pass"]]
    summary = f"{len(tgt) - len(missed)} of {len(tgt)} targets met."
    if missed:
        summary += " Missed: " + "; ".join(t["target"] for t in missed) + "."
    lines.append(summary)
    lines += ["", "## What the numbers show", ""] + [f"- {s}" for s in statements(r, native, factor)] + [""]
    made = {k: v.format(native=native, long=native * factor, factor=factor) for k, v in MODELS.items()}
    rows = [[f"`{k}`", made[k], rope_text(r[k]["rope"])] for k in MODELS]
    return lines + ["## Models", "", em.md_table(["model", "how it was made", "RoPE (05's reading of the config)"],
                                                 rows), ""]


def needle_lines(r: dict[str, dict], native: int) -> list[str]:
    em = eval_module()
    s0 = r["base"]["niah"]
    tasks, lengths = s0["tasks"], s0["lengths"]
    depths = ", ".join(f"{d:g}%" for d in s0["depths"])
    per_cell = s0["prompts"] // (len(tasks) * len(lengths))
    lines = ["## Needle retrieval", "",
             f"05's `kv` NIAH variants: a needle `The special magic number for <key> <7 digits>.` hidden in KJV "
             f"text at depths {depths}, and the prompt ending in `The special "
             f"magic number for <key>`; `niah_multikey_kv` adds 3 distractor needles with other keys. Greedy "
             f"decoding, RULER's string match (accuracy in %), {per_cell} "
             f"prompts per task and length. The base was trained on documents in this form (within its "
             f"{native}-token window), so this measures whether the skill survives at longer distances.", ""]
    header = ["model"] + [f"{L} tokens ({L // native}x)" for L in lengths]
    rows = [[f"`{k}`"] + [em.cell_text(r[k]["niah"]["by_length_cells"][str(L)]) for L in lengths] for k in MODELS]
    lines += [em.md_table(header, rows), "",
              "Both tasks pooled: mean accuracy (%), 95% Wilson interval, prompts. Per task:", ""]
    header = ["model"] + [f"{t} @{L}" for t in tasks for L in lengths]
    rows = [[f"`{k}`"] + [f"{niah_cell(r[k], t, L):.0f}" for t in tasks for L in lengths] for k in MODELS]
    lines.append(em.md_table(header, rows))
    return lines + ["", "![needle heatmaps](niah_heatmaps.png)", ""]


def position_lines(r: dict[str, dict], native: int, factor: int) -> list[str]:
    lines = ["## Loss by position", "",
             f"Mean loss (nats/token) per position bucket over {len(r['base']['ppl']['documents'])} real documents "
             f"of {native * factor} tokens: single-file modules of Python's standard library "
             "(`corpus/heldout.jsonl`), "
             f"code that no model here was trained on (the corpus holds the library's packages and the KJV). "
             f"Positions {native} and beyond are past the base's window. "
             f"Short-context perplexity is exp(mean loss) over positions 1-{native - 1} of the same documents "
             f"(causal attention: exactly a {native}-token evaluation of their beginnings).", ""]
    rows = []
    for i, b in enumerate(r["base"]["ppl"]["buckets"]):
        beyond = " *" if b["start"] >= native else ""
        rows.append([fmt_bucket(b) + beyond] + [f"{r[k]['ppl']['buckets'][i]['loss']:.3f}" for k in MODELS])
    rows.append([f"**short ppl (1-{native - 1})**"]
                + [f"{window_losses(r[k]['ppl'], native)['short_ppl']:.2f}" for k in MODELS])
    return lines + [eval_module().md_table(["positions"] + list(MODELS), rows), "", "(* beyond the base's window)",
                    "", "![loss by position](loss_by_position.png)", ""]


def curve_lines(base: Path, native: int) -> list[str]:
    """The base model's retrieval at its training checkpoints, when its curve.json is there."""
    curve = base_curve(base)
    if not curve:
        return []
    keys = [k for k in curve[0] if k.startswith("niah_")]
    rows = [[c["step"]] + [f"{c[k]:.0f}" for k in keys] for c in curve]
    return ["## The base model's retrieval while it was trained", "",
            f"From `{os.path.relpath(base, ROOT)}/curve.json` (recipes/train_demo_base.sh: each "
            f"checkpoint on 05's kv prompts at "
            f"{native} tokens, teacher-forced exact match of the value, which is what greedy decoding "
            f"answers).", "",
            eval_module().md_table(["step"] + keys, rows), ""]


def timing_lines(timings: list[tuple[str, float]]) -> list[str]:
    if not timings:
        return []
    rows = [[n, f"{s:.0f}"] for n, s in timings]
    return ["## Wall time per stage", "", eval_module().md_table(["stage", "seconds"], rows), "",
            "Every stage runs on one thread; two chains run side by side (`(wall)` rows: their joint "
            "time), so the stage times add up to more than the total.", ""]


def rope_text(info: dict) -> str:
    parts = [info.get("rope_type") or "default"]
    if info.get("factor"):
        parts.append(f"factor {info['factor']:g} from {info.get('original_max_position_embeddings')}")
    parts.append(f"addresses {info.get('addressable')} positions")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------------------
# base-card: the committed base directory

BASE_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "manifest.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def phase_change_text(curve: list[dict], keys: list[str]) -> str:
    """Where retrieval appeared in the curve (the induction phase change), in words."""
    def first(level):  # the first checkpoint where every task reaches `level`
        return next((c["step"] for c in curve if keys and all(c[k] >= level for k in keys)), None)

    if first(50) is None:
        return ("No checkpoint retrieves half of the prompts: the induction phase change did not come within this "
                "schedule (bench/induction_plateau.py measures the plateau; the script resumes with a longer one).")
    before = max((c["step"] for c in curve if all(c[k] == 0 for k in keys)), default=0)
    hit = first(90)
    return (f"Retrieval comes abruptly, as induction heads do: 0% at step {before}, every task >= 50% by step "
            f"{first(50)}" + (f" and >= 90% by step {hit}." if hit else ", and no checkpoint has every task "
                              "at 90% yet."))


def write_base_card(args) -> Path:
    train = Path(args.train)
    final = train / "final"
    if not (final / "model.safetensors").is_file():
        fail(f"{final} holds no exported model; run 03 to the end first")
    with open(args.curve) as f:
        curve = [json.loads(line) for line in f if line.strip()]
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines() if line.strip()]
    with open(final / "config.json") as f:
        config = json.load(f)
    out = Path(args.out)
    with safe_output.output_dir(out, overwrite=True) as tmp:
        for name in BASE_FILES:
            if (final / name).is_file():
                shutil.copy(final / name, tmp / name)
        what = ("retrieval accuracy (%) of each checkpoint on 05's kv NIAH prompts at the native length, "
                "teacher-forced exact match of the value")
        common.atomic_write_text(tmp / "curve.json", json.dumps({"what": what, "checkpoints": curve}, indent=1) + "\n")
        n_params = sum(int(math.prod(v)) for v in param_shapes(tmp / "model.safetensors").values())
        every = max(1, len(metrics) // 20)
        loss_rows = [[m["step"], f"{m['loss']:.3f}"] for m in metrics[every - 1::every]]
        keys = [k for k in curve[0] if k.startswith("niah_")] if curve else []
        firsts = [k for k in curve[0] if k.startswith("first/")] if curve else []
        curve_rows = [[c["step"]] + [f"{c[k]:.0f}" for k in keys + firsts] for c in curve]
        card = [
            "# demo_base: the embedded demo's tiny base model", "",
            f"A {config['num_hidden_layers']}-layer Llama (hidden {config['hidden_size']}, "
            f"{config['num_attention_heads']} heads, {config['num_key_value_heads']} KV heads, vocabulary "
            f"{config['vocab_size']}, {n_params / 1e6:.2f}M "
            f"parameters, fp32) with a native context of {config['max_position_embeddings']} tokens, trained from a "
            f"random init by 03_continued_pretrain.py on the embedded corpus (Python standard-library packages, KJV "
            f"books) and key-value retrieval documents (recipes/demo_data.py). `make demo` extends it to 4x.", "",
            "Reproduce it (bit for bit on the same software and CPU type; check with `sha256sum -c SHA256SUMS`):", "",
            f"    {args.command}", "",
            f"Wall time: {args.seconds / 60:.0f} min on {machine()}.", "",
            "## Task design", "",
            "The data mix the real corpus with key-value documents (needles `The special magic number for KEY "
            "VALUE.`, each asked once or twice by repeating the needle's opening, real text between them) and "
            "induction drills (a random line of keys and values, then the same line again); the shares and lengths "
            "are in the command above (recipes/train_demo_base.sh documents each). 01 packs the documents into rows "
            "of the native length and 03 keeps attention inside each document, so a short document is a short "
            "context: the setting in which copying is learnt soonest (bench/induction_plateau.py, "
            "docs/benchmarks.md).", "",
            phase_change_text(curve, keys), "",
            "## Retrieval accuracy vs training steps", "",
            "Each checkpoint on 05's `kv` NIAH prompts at the native length (11 depths x 4 samples per task), "
            "teacher-forced exact match of the 7-digit value (= greedy decoding success):", "",
            eval_module().md_table(["step"] + keys + firsts, curve_rows), "",
            "(first/TASK: the value's first token alone right, i.e. the key was found.)", "",
            "## Training loss", "", eval_module().md_table(["step", "loss"], loss_rows), "",
        ]
        common.atomic_write_text(tmp / "README.md", "\n".join(card) + "\n")
        sums = "".join(f"{sha256(tmp / n)}  {n}\n" for n in ("model.safetensors", "tokenizer.json"))
        common.atomic_write_text(tmp / "SHA256SUMS", sums)
    return out


def param_shapes(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


# -------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("report", help="the demo's report.md")
    s.add_argument("--eval", nargs="+", required=True,
                   help="05's output directories (results.json), together holding every model of the demo")
    s.add_argument("--demo", required=True, help="the demo's output directory (timings.tsv)")
    s.add_argument("--base", default=str(ROOT / "assets" / "demo_base"), help="the base model directory (curve)")
    s.add_argument("--native", type=int, default=256, help="the base's native context (default: 256)")
    s.add_argument("--factor", type=int, default=4, help="the extension factor (default: 4)")
    s.add_argument("--scale", default="full", help="DEMO_SCALE the demo ran with (a banner when not full)")
    s.add_argument("--out", required=True, help="the report file")
    s.add_argument("--quiet", action="store_true", help="do not print the target table")
    s = sub.add_parser("base-card", help="the committed base model directory")
    s.add_argument("--train", required=True, help="03's output directory (final/, metrics.jsonl)")
    s.add_argument("--curve", required=True, help="the probe's jsonl (recipes/demo_data.py probe --out)")
    s.add_argument("--out", required=True, help="the directory to write (replaced)")
    s.add_argument("--command", required=True, help="the command that reproduces the model")
    s.add_argument("--seconds", type=float, required=True, help="its wall time")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "report":
        print(f"wrote {write_report(args)}")
    else:
        print(f"wrote {write_base_card(args)}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
