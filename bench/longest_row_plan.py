"""The longest row the fit planner (memory_plan.py) says one training step of 03 holds, for the Llama-3.2-1B and
Llama-3.1-8B shapes on one 80 GB H100, one 141 GB H200 and eight H100s (--cp 8), with each memory option of 03
(--tiled-mlp auto, --offload-activations, --cpu-offload) alone and together, beside the longest rows Arctic Long
Sequence Training (ALST, arXiv 2506.13996) published for Llama-3.1-8B. Derived, not measured: bf16 with fp32
master weights, Liger, flash / PyTorch varlen attention, every layer checkpointed, a 10% margin under the GPU's
memory. Standard library only.

ALST's runs (ArcticTraining `projects/sequence-parallelism`, the max_length of each recipe file) used DeepSpeed
ZeRO-3 with the optimizer on the host in every run, the parameters too on one GPU, Liger, FlashAttention and
Ulysses sequence parallelism 8 on eight GPUs; they sit in the rows of 03's nearest setting (--cpu-offload moves
parameters, gradients and optimizer states).

Usage:
    python bench/longest_row_plan.py          # the table in docs/benchmarks.md
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memory_plan  # noqa: E402

SHAPES = {
    "Llama-3.2-1B": memory_plan.Shape(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192,
                                      vocab=128256, tied=True),
    "Llama-3.1-8B": memory_plan.Shape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                                      vocab=128256),
}
H200_GIB = 143771 / 1024  # a 141 GB H200 as nvidia-smi reports it (143,771 MiB)
# (shape, label, GPUs, GiB per GPU, cp)
MACHINES = [("Llama-3.2-1B", "1 x H100", 1, memory_plan.H100_GIB, 1),
            ("Llama-3.2-1B", "1 x H200", 1, H200_GIB, 1),
            ("Llama-3.1-8B", "1 x H100", 1, memory_plan.H100_GIB, 1),
            ("Llama-3.1-8B", "1 x H200", 1, H200_GIB, 1),
            ("Llama-3.1-8B", "8 x H100, cp 8", 8, memory_plan.H100_GIB, 8)]
TILED, OFFLOAD, CPU = {"tiled_mlp": memory_plan.AUTO}, {"offload": True}, {"cpu_offload": True}
SETTINGS = [("every layer checkpointed", {}), ("+ tiled MLP", TILED), ("+ offload", OFFLOAD),
            ("+ tiled MLP + offload", {**TILED, **OFFLOAD}), ("+ cpu-offload", CPU),
            ("+ cpu-offload + tiled MLP", {**CPU, **TILED}), ("+ cpu-offload + offload", {**CPU, **OFFLOAD}),
            ("+ all three", {**CPU, **TILED, **OFFLOAD})]
# ALST's published longest rows, Llama-3.1-8B, by the setting of 03 nearest to theirs
ALST = {"+ cpu-offload": "1 x H200: 300K; 8 x H100: 1.1M",
        "+ cpu-offload + tiled MLP": "8 x H100: 1.2M",
        "+ cpu-offload + offload": "1 x H200: 650K; 8 x H100: 2.4M",
        "+ all three": "1 x H100: 500K; 1 x H200: 1.2M; 8 x H100: 3.7M"}


def human(tokens: int) -> str:
    if not tokens:
        return "does not fit"
    return f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}K"


def main() -> int:
    head = " | ".join(f"{shape}, {label}" for shape, label, *_ in MACHINES)
    print(f"| setting | {head} | ALST, Llama-3.1-8B (measured) |")
    print("|---" * (len(MACHINES) + 2) + "|")
    for name, options in SETTINGS:
        cells = []
        for shape, _, gpus, gib, cp in MACHINES:
            setting = replace(memory_plan.Setting(seq_len=0, gpus=gpus, cp=cp), **options)
            cells.append(human(memory_plan.longest_row(SHAPES[shape], setting, gib)))
        print(f"| {name} | {' | '.join(cells)} | {ALST.get(name, '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
