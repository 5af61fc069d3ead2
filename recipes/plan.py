"""Print the plan of one training stage of a recipe: tokens per step, steps, gradient accumulation per GPU count,
a derived memory floor, and GPU-hours from measured throughput (docs/benchmarks.md) or from the recipe's
published compute, each labelled by where it comes from, and with the full shape (--heads ... --vocab) the fit
planner's table (memory_plan.py: per-GPU memory of each setting, the smallest that fits) and the longest row the
recipe's setting trains, alone and with 03's memory options. Standard library only, so DRY_RUN=1 is instant.

Called by recipes/*.sh (through `plan` in recipes/lib.sh), e.g.:
    python recipes/plan.py --title "03 continued pretraining, ProLong 64K" --seq-len 65536 \\
        --batch-tokens 4194304 --steps 5000 --shape llama-3.1-8b --layers 32 --hidden 4096 --params 8.03e9 \\
        --published-hours 2200 --published-tokens 20e9 --published-source "ProLong Table 9, H100"

Accumulation follows 03_continued_pretrain.py / 04_sft.py exactly: GPUs / cp data-parallel groups, and rows per
step / (groups x rows per micro-batch); a GPU count the trainer would refuse is marked as such. The measured
figure is the `ours` row of a `| shape | seq len | mode | tokens/s | ...` table in docs/benchmarks.md
(bench/bench_train.py's format, one GPU) for exactly this shape and row length, used for --cp 1 only; GPU-hours
from it assume linear scaling over GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory_plan  # noqa: E402  (standard library only, as this file)
NO_MEASUREMENT = "no measured throughput for this shape yet"


def parse_count(text: str) -> float:
    """'4M', '20e9', '1B', '65536' -> a number (K/M/B as powers of ten, as 01's --max-tokens)."""
    t = str(text).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    if t and t[-1] in scale:
        return float(t[:-1]) * scale[t[-1]]
    return float(t)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:g}"


def measured_tokens_per_s(path: Path, shape: str, seq_len: int) -> float | None:
    """tokens/s of the last `ours` row for (shape, seq_len) in any markdown table with those columns."""
    if not path.is_file():
        return None
    found, cols = None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            cols = None
            continue
        cells = [c.strip().lower() for c in line.strip().strip("|").split("|")]
        if {"shape", "seq len", "mode", "tokens/s"} <= set(cells):
            cols = {name: cells.index(name) for name in ("shape", "seq len", "mode", "tokens/s")}
            continue
        if cols is None or len(cells) <= max(cols.values()):
            continue
        try:
            row_len = int(cells[cols["seq len"]].replace(",", ""))
            tps = float(cells[cols["tokens/s"]].replace(",", ""))
        except ValueError:  # separator row, OOM / error rows
            continue
        if cells[cols["shape"]] == shape.lower() and row_len == seq_len and cells[cols["mode"]] == "ours":
            found = tps
    return found


def refusal(rows: int, gpus: int, cp: int, micro_rows: int) -> str | None:
    """Why the trainer (03 / 04) would refuse this step on `gpus` GPUs, or None: the GPUs form gpus / cp
    data-parallel groups, and the step's rows must divide over them in micro-batches of micro_rows."""
    if gpus % cp:
        return f"not a multiple of --cp {cp}"
    if rows % (gpus // cp * micro_rows):
        return f"{rows} rows per step do not divide over {gpus // cp} data-parallel group(s) x {micro_rows} row(s)"
    return None


def line(label: str, text: str) -> None:
    print(f"  {label:<22}{text}")


# What each training stage has flags for, so that the fit plan offers nothing else: its memory options
# (memory_plan.OPTIONS), the largest --cp, and the checkpointing intervals (03 --ac-every; 04 checkpoints every
# layer or none).
STAGE_SETTINGS = {"03": {"options": tuple(memory_plan.OPTIONS), "max_cp": None, "ac_every": (0, 4, 2, 1)},
                  "04": {"options": ("cpu-offload",), "max_cp": 1, "ac_every": (0, 1)}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the stage")
    g.add_argument("--title", required=True, help="what the stage is, printed as the heading")
    g.add_argument("--stage", choices=sorted(STAGE_SETTINGS), default="03",
                   help="the training stage planned, so that the fit plan offers only its flags (03: --cp, "
                        "--ac-every, --tiled-mlp, --offload-activations, --cpu-offload; 04: --cpu-offload)")
    g.add_argument("--seq-len", type=int, required=True, help="tokens per packed row")
    g.add_argument("--batch-tokens", type=int, required=True, help="tokens per optimizer step over all GPUs")
    g.add_argument("--micro-rows", type=int, default=1, help="rows per micro-batch (default 1)")
    g.add_argument("--cp", type=int, default=1, help="context parallelism: GPUs sharing each row (03 --cp)")
    g.add_argument("--steps", type=int, required=True, help="optimizer steps")
    g.add_argument("--runs", type=int, default=1, help="independent runs of this stage (soup ingredients)")
    g = p.add_argument_group("hardware")
    g.add_argument("--gpus", type=int, nargs="+", default=None,
                   help="GPU counts to tabulate (default: powers of two up to 128 that --cp divides, <= 64 groups)")
    g.add_argument("--gpus-now", type=int, default=None, help="the GPU count of this launch (marked)")
    g.add_argument("--check", action="store_true",
                   help="exit 2 if the step does not divide over --gpus-now (the trainer would refuse it)")
    g = p.add_argument_group("model shape (memory floor and the benchmark lookup)")
    g.add_argument("--shape", default=None, help="shape name as bench/bench_train.py writes it (llama-3.1-8b)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers")
    g.add_argument("--hidden", type=int, default=None, help="hidden size")
    g.add_argument("--params", type=parse_count, default=None, help="parameters (e.g. 8.03e9)")
    g.add_argument("--heads", type=int, default=None, help="heads (with --kv-heads ... --vocab: the fit plan)")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads")
    g.add_argument("--head-dim", type=int, default=None, help="head dimension")
    g.add_argument("--ffn", type=int, default=None, help="MLP intermediate size")
    g.add_argument("--vocab", type=int, default=None, help="vocabulary size")
    g.add_argument("--gpu-gib", type=float, default=memory_plan.H100_GIB,
                   help=f"memory per GPU for the fit plan (default {memory_plan.H100_GIB:.1f}: an 80 GB H100)")
    g.add_argument("--benchmarks", default=os.environ.get("BENCHMARKS", str(ROOT / "docs" / "benchmarks.md")),
                   help="file holding measured throughput tables (default: docs/benchmarks.md, or $BENCHMARKS)")
    g = p.add_argument_group("published compute (printed as such)")
    g.add_argument("--published-hours", type=parse_count, default=None, help="GPU-hours the recipe reported")
    g.add_argument("--published-tokens", type=parse_count, default=None, help="for this many tokens")
    g.add_argument("--published-source", default="", help="where the figure comes from")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_tokens % args.seq_len:
        print(f"error: batch tokens {args.batch_tokens} are not a multiple of the row length {args.seq_len}",
              file=sys.stderr)
        return 2

    if args.gpus is None:
        args.gpus = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n % args.cp == 0 and n // args.cp <= 64]
    rows = args.batch_tokens // args.seq_len
    total = args.batch_tokens * args.steps * args.runs
    print(f"plan: {args.title}")
    line("row length", f"{args.seq_len:,} tokens, {args.micro_rows} row(s) per micro-batch"
                       + (f", each split over {args.cp} GPUs (--cp)" if args.cp > 1 else ""))
    line("tokens per step", f"{args.batch_tokens:,} = {rows} rows")
    line("steps", f"{args.steps:,}" + (f" x {args.runs} runs" if args.runs > 1 else ""))
    line("tokens in total", f"{total:,} ({human(total)})")

    states = args.params * 16 if args.params else None  # fp32 master weights + fp32 grads + AdamW m and v
    print("  GPUs  accumulation" + ("  weights+grads+AdamW per GPU (16 B/param, FSDP)" if states else ""))
    for n in sorted(set(args.gpus + ([args.gpus_now] if args.gpus_now else []))):
        why = refusal(rows, n, args.cp, args.micro_rows)
        cells = [f"  {n:>4}", "     refused" if why else f"{rows // (n // args.cp * args.micro_rows):>12}"]
        if states:
            cells.append(f"{states / n / 2**30:>10.1f} GiB")
        if why:
            cells.append(f"({why})")
        if n == args.gpus_now:
            cells.append(" <- this launch")
        print("  ".join(cells))
    if args.layers and args.hidden:
        tokens = args.seq_len * args.micro_rows // args.cp
        act = args.layers * tokens * args.hidden * 2
        line("memory floor", f"checkpointed layer inputs {args.layers} x {tokens:,} x {args.hidden:,} x 2 B = "
                             f"{act / 2**30:.1f} GiB per GPU (derived, not measured)")

    shape_flags = (args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim, args.ffn, args.vocab)
    if all(shape_flags):
        shape = memory_plan.Shape(*shape_flags)
        base = memory_plan.Setting(seq_len=args.seq_len, gpus=args.gpus_now or 8, micro_rows=args.micro_rows)
        stage = STAGE_SETTINGS[args.stage]
        best, table = memory_plan.choose(shape, gpu_gib=args.gpu_gib, base=base, **stage)
        print(f"  fit plan on {base.gpus} GPUs (memory_plan.py: bf16, Liger, varlen attention; derived, GiB per GPU)")
        print(memory_plan.format_table(table, best, args.gpu_gib))
        if best and best.cp != args.cp:
            line("note", f"the recipe uses --cp {args.cp}; the planner's smallest fitting setting has cp {best.cp}")
        # how far this recipe's setting goes, and with each memory option the stage has a flag for
        print(memory_plan.format_longest(shape, dataclasses.replace(base, cp=args.cp), args.gpu_gib,
                                         options=stage["options"]))

    bench = Path(args.benchmarks)
    # the benchmark table holds one-GPU runs, so it speaks for --cp 1 only
    tps = measured_tokens_per_s(bench, args.shape, args.seq_len) if args.shape and args.cp == 1 else None
    if tps:
        line("GPU-hours, measured", f"{total / tps / 3600:,.0f} at {tps:,.0f} tokens/s/GPU ({args.shape} at "
                                    f"{args.seq_len:,} in {bench.name}; one-GPU figure, linear scaling assumed)")
    else:
        cp = f" with --cp {args.cp}" if args.cp > 1 else ""
        where = f" ({args.shape} at {args.seq_len:,} tokens{cp} in {bench.name})" if args.shape else ""
        line("GPU-hours, measured", NO_MEASUREMENT + where)
    if args.published_hours and args.published_tokens:
        hours = args.published_hours * total / args.published_tokens
        line("GPU-hours, published", f"{hours:,.0f} = {human(args.published_hours)} GPU-hours per "
                                     f"{human(args.published_tokens)} tokens ({args.published_source}), "
                                     f"scaled to {human(total)} tokens")
    elif args.published_hours:
        line("GPU-hours, published", f"{args.published_hours:,.0f} in total ({args.published_source})")
    else:
        line("GPU-hours, published", "none for this stage")
    why = refusal(rows, args.gpus_now, args.cp, args.micro_rows) if args.check and args.gpus_now else None
    if why:
        print(f"error: {args.gpus_now} GPUs cannot run this step ({why}); set GPUS_PER_NODE / NNODES (and LAUNCH), "
              "BATCH_TOKENS or CP", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
