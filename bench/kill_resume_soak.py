"""Kill-and-resume soak of 03_continued_pretrain.py: random kills of a small CPU run (some while a checkpoint is
being written, some followed by 4 KiB of random bytes written into a shard of the latest checkpoint), each
trial relaunched with `--resume auto` until it ends. Every trial must end with the uninterrupted run's losses
and gradient norms (every step) and its exported weights, bit for bit, or refuse with exactly one `error:`
line; a refused trial (a corrupted checkpoint) is then relaunched with `--resume-fallback`, which must reach the
same result from the previous checkpoint. Prints one table row per trial and a summary (docs/benchmarks.md).

The model is the committed demo base (assets/demo_base, 1.3M parameters, real weights), trained on rows of 64
tokens of the embedded corpus that 01 packs here first; every launch is a fresh process, as on a cluster.

Usage:
    python bench/kill_resume_soak.py                      # 20 trials, seed 0 (about 15 minutes on 2 CPU cores)
    python bench/kill_resume_soak.py --trials 5 --seed 1 --workdir /tmp/soak
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
KINDS = ["kill", "kill during a save", "sigterm", "kill, then a corrupted shard"]


def stage(script: str, *args, wait: bool = True):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)


def train_args(data: Path, out: Path, steps: int, *extra) -> list:
    return ["--model", ROOT / "assets" / "demo_base", "--data", data, "--out", out, "--device", "cpu",
            "--batch-tokens", 256, "--max-steps", steps, "--save-every", 2, "--keep", 2, "--lr", "1e-3",
            "--warmup-steps", 2, "--log-every", 100, "--debug-sleep", 0.2, *extra]


def trajectory(out: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, (out / "metrics.jsonl").open())]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_at_random(proc, out: Path, rng: random.Random, during_save: bool, sig: int, limit: float) -> str:
    """Kill `proc` at a random moment, or while it writes its 1st to 3rd checkpoint; say where the kill landed."""
    deadline, saves_to_skip, seen = time.time() + rng.uniform(0.5, limit), rng.randint(0, 2), set()
    ckpts = out / "checkpoints"
    while proc.poll() is None:
        saving = {p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step_")} if ckpts.is_dir() else set()
        seen |= saving
        if (during_save and saving and len(seen) > saves_to_skip) or (not during_save and time.time() >= deadline):
            proc.send_signal(sig)
            proc.wait()
            done = len(trajectory(out)) if (out / "metrics.jsonl").is_file() else 0
            return f"{'during a save' if saving else 'mid-step' if done else 'during start-up'} after step {done}"
        time.sleep(0.002)
    return "after the run had ended"


def corrupt_latest(out: Path, rng: random.Random) -> str | None:
    found = sorted((out / "checkpoints").glob("step_*"))
    if not found:
        return None
    shard = found[-1] / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(rng.randrange(0, max(1, shard.stat().st_size - 4096)))
        f.write(os.urandom(4096))
    return f"{found[-1].name}/{shard.name}"


def run_trial(i: int, kind: str, data: Path, work: Path, steps: int, ref: tuple, rng: random.Random,
              duration: float) -> dict:
    out = work / f"trial_{i:02d}"
    kills, events, refusals = rng.randint(1, 3), [], []
    for _ in range(kills):
        proc = stage("03_continued_pretrain.py", *train_args(data, out, steps, "--resume", "auto"), wait=False)
        sig = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
        events.append(kill_at_random(proc, out, rng, kind == "kill during a save", sig, duration))
    shard = corrupt_latest(out, rng) if kind.endswith("corrupted shard") else None
    if shard:  # the relaunch must refuse it in one line, naming the file
        events[-1] += f"; corrupted {shard}"
        proc = stage("03_continued_pretrain.py", *train_args(data, out, steps, "--resume", "auto"))
        errors = [line for line in proc.stderr.split("\n") if line.startswith("error:")]
        refusals.append(proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr
                        and "__0_0.distcp does not match" in errors[0])
    last = stage("03_continued_pretrain.py", *train_args(data, out, steps, "--resume", "auto", "--resume-fallback"))
    ok = last.returncode == 0 and (out / "final").is_dir()
    result = {"trial": i, "kind": kind, "kills": kills, "events": events, "refusals": refusals,
              "exit": last.returncode, "losses_equal": ok and trajectory(out) == ref[0],
              "weights_equal": ok and same_weights(weights(out), ref[1])}
    if not ok:
        result["stderr"] = last.stderr[-2000:]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="number of killed runs (default: 20)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of each run (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times and kinds (default: 0)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="longctx-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.is_dir():
        proc = stage("01_prepare_data.py", "--model", ROOT / "assets" / "demo_base", "--seq-len", 64, "--max-tokens",
                     64 * 64, "--num-proc", 1, "--out", data)
        if proc.returncode:
            sys.exit(f"error: 01 failed: {proc.stderr[-1000:]}")
    ref_out = work / "reference"
    if not (ref_out / "final").is_dir():
        t0 = time.time()
        proc = stage("03_continued_pretrain.py", *train_args(data, ref_out, args.steps))
        if proc.returncode:
            sys.exit(f"error: the uninterrupted run failed: {proc.stderr[-2000:]}")
        (work / "reference_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    duration = float((work / "reference_seconds.txt").read_text())  # kills land anywhere from start-up to the end
    ref = (trajectory(ref_out), weights(ref_out))
    print(f"reference: {args.steps} steps, uninterrupted, {duration:.0f} s; final loss {ref[0][-1][1]:.6f}", flush=True)
    rng = random.Random(args.seed)
    rows = []
    print("| trial | kind | launches killed | where the kills landed | refused (one line) | losses = reference | "
          "weights = reference |\n|---|---|---|---|---|---|---|", flush=True)
    for i in range(args.trials):
        r = run_trial(i, KINDS[i % len(KINDS)], data, work, args.steps, ref, rng, duration)
        rows.append(r)
        refused = ", ".join("yes" if ok else "NO" for ok in r["refusals"]) or "-"
        print(f"| {i} | {r['kind']} | {r['kills']} | {'; '.join(r['events'])} | {refused} | "
              f"{'yes' if r['losses_equal'] else 'NO'} | {'yes' if r['weights_equal'] else 'NO'} |", flush=True)
        if "stderr" in r:
            print(r["stderr"], file=sys.stderr)
    good = sum(r["losses_equal"] and r["weights_equal"] for r in rows)
    refusals = [ok for r in rows for ok in r["refusals"]]
    print(f"\n{good}/{len(rows)} trials ended with the reference losses and weights; {sum(refusals)}/{len(refusals)} "
          f"refusals of a corrupted checkpoint were one `error:` line; "
          f"{sum('during a save' in e for r in rows for e in r['events'])} kills landed during a save")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if good == len(rows) and all(refusals) else 1


if __name__ == "__main__":
    sys.exit(main())
