"""The command-line flags 03 (continued pretraining) and 04 (SFT) share, in one place as torchtitan keeps its job
config: AdamW and the warmup + cosine schedule, the system (device, dtype, Liger, loss, attention backend,
activation checkpointing, offload), and --out with its checkpoints, resume, export and logging. Numbers are
checked as they are parsed (finite, in range: common.number), so a bad value is one argparse line, never a
traceback later. The defaults that differ between the stages (learning rate, warmup, loss chunk) are arguments,
each with the recipe it comes from.

Outside this repository (copy this file and common.py):

    import argparse, train_flags
    p = argparse.ArgumentParser()
    g = p.add_argument_group("schedule")
    train_flags.add_optimizer_args(g, 1e-5, "ProLong: 1e-5 at 64K", 0.1, "ProLong: 0.1")
    train_flags.add_system_args(p, "cross-entropy implementation", 4096, "tokens per chunk of the CE")
    train_flags.add_output_args(p, "")
    args = p.parse_args(["--out", "runs/x", "--lr", "2e-5"])
"""
from __future__ import annotations

import argparse

from common import add_common_args, number


def add_optimizer_args(g, lr: float, lr_note: str, warmup_ratio: float, warmup_note: str) -> None:
    """AdamW and the warmup + cosine schedule: --lr, --min-lr-ratio, --warmup-ratio/-steps, --weight-decay,
    --betas, --grad-clip."""
    g.add_argument("--lr", type=number(above=0), default=lr, help=f"peak learning rate ({lr_note})")
    g.add_argument("--min-lr-ratio", type=number(min=0, max=1), default=0.1,
                   help="cosine decays to lr * this (ProLong: 0.1)")
    g.add_argument("--warmup-ratio", type=number(min=0, max=1), default=warmup_ratio,
                   help=f"warmup fraction of the steps ({warmup_note})")
    g.add_argument("--warmup-steps", type=number(int, min=0), default=None,
                   help="warmup steps (overrides --warmup-ratio)")
    g.add_argument("--weight-decay", type=number(min=0), default=0.1, help="AdamW weight decay (ProLong: 0.1)")
    g.add_argument("--betas", type=number(min=0, below=1), nargs=2, default=(0.9, 0.95), help="AdamW betas")
    g.add_argument("--grad-clip", type=number(min=0), default=1.0, help="max global gradient norm (0: no clipping)")


def add_system_args(p, loss_help: str, loss_chunk: int | None, loss_chunk_help: str) -> None:
    """Device, dtype, kernels, loss implementation, attention backend, checkpointing and offload."""
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU); master weights stay fp32")
    g.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                   help="Liger RoPE/RMSNorm/SwiGLU + fused linear CE (default: on with CUDA for Llama/Qwen2/Mistral)")
    g.add_argument("--loss", choices=["auto", "liger", "chunked"], default="auto", help=loss_help)
    g.add_argument("--loss-chunk", type=number(int, min=1), default=loss_chunk, help=loss_chunk_help)
    g.add_argument("--attention-backend", choices=["auto", "flash_attn", "torch_varlen", "reference"],
                   default="auto", help="force the varlen kernel of rows of several documents (default: the best "
                                        "available); rows of one causal span always run PyTorch's SDPA")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer in the backward (default: on)")
    g.add_argument("--cpu-offload", action="store_true", help="keep parameters, gradients and optimizer on CPU")


def add_output_args(p, final_note: str):
    """--out and its checkpoints, resume, export and logging; returns the group (a stage adds its own)."""
    g = p.add_argument_group("output and checkpoints")
    add_common_args(g, "out", "overwrite", required=["out"], overwrite=dict(
        action="store_true", help="start afresh in an existing --out: the old run is moved aside, deleted once the "
                                  "new one ends in order and put back if it fails"))
    g.add_argument("--save-every", type=number(int, min=0), default=500,
                   help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep", type=number(int, min=0), default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--final-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also save a checkpoint after the last step{final_note}")
    g.add_argument("--resume", default=None,
                   help="'auto': continue the run in --out from its latest checkpoint (start if there is none, "
                        "from --init-from when given); or a checkpoint path of this run. A checkpoint whose files "
                        "do not match its SHA256SUMS is refused")
    g.add_argument("--resume-fallback", action="store_true",
                   help="with --resume auto: when the latest checkpoint does not verify, keep it as corrupt-step_N "
                        "and resume the latest one that does (it says which)")
    g.add_argument("--export-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of OUT/final (auto: the input model's dtype)")
    g.add_argument("--no-export", action="store_true", help="skip the final HF export")
    g.add_argument("--log-every", type=number(int, min=1), default=1, help="print a log line every N steps")
    g.add_argument("--debug-sleep", type=number(min=0), default=0.0,
                   help=argparse.SUPPRESS)  # tests: slow steps down
    return g


def check_resume_args(p, args) -> None:
    """Refuse the --resume / --resume-fallback / --init-from (the stage's flag) combinations that mean nothing,
    with an argparse error line."""
    if args.resume_fallback and args.resume != "auto":
        p.error("--resume-fallback goes with --resume auto")
    if args.resume not in (None, "auto") and args.init_from:
        p.error("--resume CHECKPOINT continues this run; --init-from starts a new one: give one of them (or "
                "--resume auto, which resumes --out's latest checkpoint and starts from --init-from when there is "
                "none)")
