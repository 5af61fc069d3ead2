"""Stage 03: long-context continued pretraining, as ProLong (64K -> 512K) and UltraLong (1M+) did it, on any
number of GPUs with torchrun, and the same code on a CPU for tiny models.

Reads 01's packed rows (documents packed into rows of --seq-len tokens, boundaries kept) and trains a causal LM
with the next-token loss:
- each micro-batch is flattened to ONE row [1, tokens] with explicit document boundaries (cu_seqlens); attention
  stays inside each document (--doc-mask, ProLong) or inside each packed row (--no-doc-mask, UltraLong), never
  across rows, never onto padding; the first token of a document is never predicted from the previous one;
- one attention function registered with transformers: a micro-batch whose rows are each one causal span (one
  document, or any row with --no-doc-mask) runs PyTorch's SDPA causal per row (cuDNN or flash on a GPU); rows of
  several documents run flash-attn varlen when installed, PyTorch's varlen on CUDA otherwise, an exact
  per-document reference on CPU; a start-up probe proves both paths (and names them), metrics.jsonl counts them;
- the loss of a step is the sum of token cross-entropies over all micro-batches on all ranks divided by their
  global count (torchtitan's rule); logits for a whole row never exist (Liger fused linear CE on CUDA, chunked
  and checkpointed CE elsewhere);
- FSDP2 (a unit per decoder layer plus the root), bf16 compute with fp32 master weights and fp32 gradient
  reduction on GPU, per-layer activation checkpointing, optional CPU offload, Liger RoPE / RMSNorm / SwiGLU;
- AdamW (wd 0.1, betas 0.9/0.95), clipping 1.0, warmup then cosine to a minimum-LR ratio (ProLong: 10%, 0.1x);
- context parallelism (--cp N) for rows one GPU cannot hold: each row is split over N ranks (a 2-D mesh dp x cp,
  FSDP2 still sharding over all ranks); Ulysses all-to-all over heads for document-masked rows (ProLong 512K),
  ring attention with head-tail load balancing for unmasked rows (UltraLong 1M+: PyTorch's context_parallel on
  CUDA, an exact all-gather ring on CPU), ProLong's local shortcut only where no document straddles a slice;
  same loss and gradients as --cp 1 (context_parallel.py; derived H100 throughput in docs/benchmarks.md);
- sharded checkpoints every --save-every steps and on SIGTERM / SIGUSR1, `--resume auto` continues exactly (also
  with another --cp or world size); the final model is an ordinary HF directory in OUT/final.

Usage:
    # tiny CPU run (random init), 20 steps
    python 03_continued_pretrain.py --init-config tiny-llama --tokenizer TOK --data runs/data --out runs/cpt \\
        --batch-tokens 4096 --max-steps 20 --lr 1e-3
    # data prepared as shards on several machines (01 --num-shards): the folder holding them, or the shards
    python 03_continued_pretrain.py ... --data runs/data            # = --data runs/data/shard-0 ... shard-7
    # ProLong stage 1 (64K) on 8 GPUs: 4M tokens per step, 5000 steps, LR 1e-5
    torchrun --nproc_per_node=8 03_continued_pretrain.py --model runs/llama3-8b-theta8e6 \\
        --data runs/data-64k --out runs/prolong-64k --batch-tokens 4194304 --max-steps 5000 --lr 1e-5
    # ProLong stage 2 (512K): new RoPE config and data, weights AND optimizer state from stage 1, new schedule
    torchrun --nproc_per_node=8 03_continued_pretrain.py --model runs/llama3-8b-theta1.28e8 \\
        --init-from runs/prolong-64k/checkpoints/step_00005000 --keep-optimizer \\
        --data runs/data-512k --out runs/prolong-512k --batch-tokens 8388608 --max-steps 2500 --lr 5e-6
    # ProLong stage 2 as published: 512K rows, sequence parallelism 8 inside each 8-GPU node (Ulysses)
    torchrun --nnodes=4 --nproc_per_node=8 ... 03_continued_pretrain.py ... --data runs/data-512k --cp 8
    # UltraLong-style 1M rows without document masking: ring attention over 16 GPUs (2 nodes)
    torchrun --nnodes=2 --nproc_per_node=8 ... 03_continued_pretrain.py --model runs/llama31-8b-yarn128 \\
        --data runs/data-1m-sep --no-doc-mask --cp 16 --out runs/ultralong-1m --lr 3e-5
    # continue a preempted run exactly (with --init-from too: it starts from that checkpoint only while --out
    # holds none, so one command line serves the first launch and every relaunch)
    torchrun --nproc_per_node=8 03_continued_pretrain.py ...same flags... --resume auto
    # watched and planned: probes every 250 steps (needles, loss by position, short-context perplexity with an
    # alarm), TensorBoard, and the memory plan before renting the GPUs (prints, writes nothing)
    torchrun ... 03_continued_pretrain.py ... --eval-every 250 --report-to tensorboard
    python 03_continued_pretrain.py --model runs/llama3-8b-theta8e6 --data runs/data-512k --out x --plan
    # the longest rows on few GPUs: tiled MLP, checkpointed inputs in host memory (--plan says how far they go)
    python 03_continued_pretrain.py ... --tiled-mlp auto --offload-activations --cpu-offload
    # on a SLURM cluster: sbatch --nodes=4 recipes/slurm.sbatch recipes/prolong_512k.sh (README)

Outputs: OUT/run.json (the run's settings), OUT/metrics.jsonl (one record per step; with --eval-every the probe
results as probe/... fields, step 0 before training), OUT/tensorboard or OUT/wandb (--report-to),
OUT/checkpoints/step_N/ (torch.distributed.checkpoint shards + trainer_state.json + SHA256SUMS of every file,
checked before any resume; nothing in them is unpickled but plain data), OUT/final/ (HF model directory with
manifest.json).
MFU conventions in the log: "tt" = torchtitan's 6N + 12*L*H*d*S per token (non-causal, masks ignored);
"doc" = 6N + causal attention over the documents actually attended, 12*L*H*d*sum(len_i^2)/(2*sum(len_i)).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import torch

import activation_memory
import common
import context_parallel
import fsdp_train
import hf_export
import memory_plan
import packed_data
import probes
import tracking
import train_flags
import varlen_attention
from common import fail, print0

STAGE = "03_continued_pretrain"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    common.add_common_args(g, "model", "tokenizer")
    g.add_argument("--init-config", default=None,
                   help="random init instead of --model weights: a config.json (or a directory with one) or a "
                        f"shape name ({', '.join(common.KNOWN_SHAPES)}), optionally name:key=value,... overrides")
    g.add_argument("--init-from", default=None,
                   help="start a new stage from a checkpoint of another run (OUT/checkpoints/step_N): its weights "
                        "replace --model's (whose config, e.g. a new RoPE base, is kept); step, schedule and data "
                        "position start afresh; with --resume auto, only while --out holds no checkpoint yet")
    g.add_argument("--keep-optimizer", action="store_true",
                   help="with --init-from: also keep its optimizer state (ProLong's 64K -> 512K stage)")
    g = p.add_argument_group("data")
    common.add_common_args(g, "data", required=["data"], data=dict(nargs="+", help=(
        "the output directory of 01_prepare_data.py; several (shards prepared with --num-shards), or a directory "
        "holding them, are read as one dataset")))
    g.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="attend only inside each document (ProLong, default); --no-doc-mask: causal attention "
                        "over the whole packed row (UltraLong), still never across rows")
    g.add_argument("--pose-target-len", type=common.number(int, min=2), default=None,
                   help="PoSE: skip-wise position ids sampled over this target length (2-chunk official form)")
    g.add_argument("--ignore-max-positions", action="store_true",
                   help="allow rows longer than the config's max_position_embeddings (e.g. a RoPE base change "
                        "that did not update it)")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle rows each epoch (seeded); --no-shuffle keeps the data order")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--batch-tokens", type=common.number(int, min=1), default=None,
                   help="tokens per optimizer step over all ranks (ProLong 64K: 4194304); a multiple of the rows' "
                        "length (default: one row per rank)")
    g.add_argument("--micro-batch-tokens", type=common.number(int, min=1), default=None,
                   help="tokens per rank per forward/backward (default: one row); accumulation is derived")
    g.add_argument("--max-steps", type=common.number(int, min=1), default=None,
                   help="optimizer steps (default: one pass over the data)")
    g.add_argument("--num-tokens", type=common.number(above=0), default=None,
                   help="alternatively, tokens to train on (e.g. 20e9)")
    train_flags.add_optimizer_args(g, 1e-5, "ProLong: 1e-5 at 64K, 5e-6 at 512K", 0.1, "ProLong: 0.1")
    common.add_common_args(g, "seed")
    train_flags.add_system_args(p, "cross-entropy implementation (auto: Liger FLCE with --liger, else chunked)",
                                4096, "tokens per chunk of the chunked CE")
    g = train_flags.add_output_args(p, " (for --init-from of a next stage)")
    tracking.add_tracking_args(g)
    add_parallel_and_memory_args(p)
    probes.add_probe_args(p)
    args = p.parse_args(argv)
    if not args.activation_checkpointing and (args.ac_every != 1 or args.offload_activations):
        p.error("--ac-every and --offload-activations choose how layers are checkpointed: drop "
                "--no-activation-checkpointing")
    if (args.model is None) == (args.init_config is None):
        p.error("give exactly one of --model (a model directory) and --init-config (random init)")
    if args.keep_optimizer and not args.init_from:
        p.error("--keep-optimizer needs --init-from")
    train_flags.check_resume_args(p, args)
    return args


def add_parallel_and_memory_args(p) -> None:
    """Context parallelism, activation memory and the fit planner: the flags for rows one GPU cannot hold."""
    g = p.add_argument_group("context parallelism (rows longer than one GPU holds; docs/benchmarks.md)")
    g.add_argument("--cp", type=common.number(int, min=1), default=1,
                   help="split every row over N ranks (N divides the world size; ranks r..r+N-1 share a row, so "
                        "keep a cp group inside a node); FSDP2 keeps sharding over all ranks")
    g.add_argument("--cp-attention", choices=context_parallel.CP_ATTENTION, default="auto",
                   help="auto: ulysses with --doc-mask (ProLong), ring with --no-doc-mask (UltraLong); ulysses needs "
                        "N to divide the query heads (KV heads are repeated when N does not divide them); ring "
                        "works for any head count")
    g.add_argument("--cp-ring-impl", choices=context_parallel.CP_RING_IMPL, default="auto",
                   help="ring attention: torch = PyTorch's context_parallel (CUDA, unmasked rows, one row per "
                        "micro-batch), allgather = exact all-gathered-KV ring (any device, any mask); auto picks "
                        "torch where it applies")
    add_memory_args(p)


def add_memory_args(p) -> None:
    """The activation memory flags (activation_memory.py) and the fit planner's (memory_plan.py)."""
    g = p.add_argument_group("activation memory and the fit planner (activation_memory.py, memory_plan.py)")
    g.add_argument("--ac-every", type=common.number(int, min=1), default=1,
                   help="checkpoint only every k-th decoder layer (0, k, 2k, ...): less recompute, more memory")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep the checkpointed layer inputs in pinned host memory until the backward (the "
                        "longest rows); same losses and gradients")
    g.add_argument("--tiled-mlp", type=tiled_mlp_arg, default=0, metavar="N|auto",
                   help="run each layer's MLP over N slices of this rank's tokens, so that its [tokens x "
                        "intermediate] activations never exist for the whole row (Llama / Qwen2 / Mistral); auto: "
                        "one slice per hidden-size tokens (the planner's); same losses and gradients, one more MLP "
                        "forward per step")
    g.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory of this run's setting, the smallest setting (cp, micro-batch, "
                        "checkpointing, offload, tiled MLP) that fits and the longest row this setting trains, then "
                        "stop without writing anything; on CUDA after one measured step of this setting, predicted "
                        "beside measured peak memory")
    g.add_argument("--plan-gpu-gib", type=common.number(above=0), default=None,
                   help="GPU memory for --plan (default: this GPU's, else an 80 GB H100's)")


def tiled_mlp_arg(text: str) -> int:
    """--tiled-mlp: 'auto' (memory_plan.AUTO) or a number of slices >= 1."""
    if text == "auto":
        return memory_plan.AUTO
    try:
        return common.number(int, min=1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number of slices >= 1") from None


def resolve_tiled_mlp(args, config, micro_tokens: int, cp) -> int:
    """--tiled-mlp as slices of this rank's tokens (0: off; auto: the planner's rule), checked before anything is
    built: a family whose MLP the tiling supports, and no more slices than tokens."""
    if not args.tiled_mlp:
        return 0
    if config.model_type not in activation_memory.TILED_MLP_FAMILIES:
        fail(f"--tiled-mlp: the tiled MLP supports the SwiGLU MLPs of the "
             f"{' / '.join(activation_memory.TILED_MLP_FAMILIES)} families, not model type {config.model_type!r}; "
             "drop --tiled-mlp")
    tokens = cp.tokens_per_rank(micro_tokens)
    shape = memory_plan.Shape.from_config(config)
    chunks = memory_plan.tiled_mlp_chunks(shape, tokens) if args.tiled_mlp == memory_plan.AUTO else args.tiled_mlp
    if chunks > tokens:
        fail(f"--tiled-mlp {chunks}: more slices than the {tokens:,} tokens a rank holds per micro-batch; choose at "
             f"most {tokens}, or auto")
    return chunks


def run_signature(args, config, data, rows_per_step: int, max_steps: int, warmup: int) -> dict:
    """What must match for --resume to continue exactly (world size, kernels and logging may change)."""
    return {"model": fsdp_train.model_shape(config), "data": data.fingerprint(), "rows_per_step": rows_per_step,
            "max_steps": max_steps, "warmup_steps": warmup, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
            "seed": args.seed, "doc_mask": args.doc_mask, "pose_target_len": args.pose_target_len,
            "shuffle": args.shuffle, "weight_decay": args.weight_decay, "betas": list(args.betas),
            "grad_clip": args.grad_clip, "init": args.model or args.init_config, "init_from": args.init_from}


# =============================================================================================================
# The recipe's choices: schedule, optimizer, loss normalisation (published values: docs/recipes.md).


def learning_rate(step: int, args, max_steps: int, warmup: int) -> float:
    """The learning rate of `step` (from 0 within this stage): a linear warmup to --lr (step 1 of the warmup gets
    1/warmup of it), then a cosine from --lr down to --lr x --min-lr-ratio at the last step.

    ProLong, both stages: peak 1e-5 (its released 512K script: 5e-6), 10% warmup, cosine to 0.1 x the peak (HF's
    cosine schedule under ProLong's min_lr_bound: mult = min + (1 - min) * cos_mult), the schedule restarted for
    stage 2 while the optimizer state carries over (--init-from --keep-optimizer). UltraLong: 3e-5; its schedule
    is not published."""
    if warmup > 0 and step < warmup:
        multiplier = (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup - 1))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        multiplier = args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine
    return args.lr * multiplier


def build_optimizer(model, args) -> torch.optim.AdamW:
    """AdamW as ProLong trained (HF Trainer's adamw_torch): weight decay 0.1 (--weight-decay) on the weight
    matrices and embeddings, none on the 1-D parameters (RMSNorm weights, biases), betas 0.9 / 0.95, eps 1e-8;
    the loop clips the global gradient norm to 1.0 (--grad-clip; ProLong's scripts, not its paper)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trained if p.dim() >= 2]
    vectors = [p for p in trained if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return fsdp_train.adamw(groups, args.lr, args.betas)


def forward_backward(model, micro_batches, args, loss_impl: str, device) -> tuple[torch.Tensor, int]:
    """Forward and backward of this rank's micro-batches; returns (their summed token cross-entropy, the step's
    global count of valid targets).

    The loss of a step is torchtitan's: the sum of token cross-entropies over all micro-batches on all ranks
    divided by the global count of valid targets, so every token weighs the same whatever its rank, its
    micro-batch or its document's length. The count is all-reduced before the first backward; each micro-batch
    back-propagates its summed CE divided by it, the gradients add up over the micro-batches, and FSDP2 SUMS them
    over the ranks (fsdp_train.shard_model sets its divide factor to 1: its default mean would divide by the
    world size a second time). ProLong's continued pretraining keeps HF Trainer's per-device mean instead, which
    weighs a token by 1 / its micro-batch's count; on 01's full packed rows the counts, and so the two, differ
    little."""
    n_valid = fsdp_train.global_count(sum(mb.n_valid for mb in micro_batches), device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for mb in micro_batches:
        mb = mb.to(device)
        with context_parallel.cp_context(mb):  # PyTorch's context_parallel around forward and backward (torch ring)
            loss_fn = fsdp_train.ce_loss_fn(mb.targets, loss_impl, args.loss_chunk)
            loss = fsdp_train.forward_loss(model, mb, loss_fn)
            (loss / max(n_valid, 1)).backward()
        loss_sum += loss.detach()
    return loss_sum, n_valid


# =============================================================================================================
# Inputs, the model, the plan, the log lines.


def open_inputs(args):
    """(data, config): 01's packed rows and the model's config, after the checks that must fail before anything
    is written."""
    data = packed_data.PackedData.open(args.data)
    seq_len = data.seq_len
    if args.init_config:
        config = common.config_from_init_spec(args.init_config)
    else:
        config = common.load_config(args.model)
    longest = args.pose_target_len or seq_len
    if args.pose_target_len and args.pose_target_len < seq_len:
        fail(f"--pose-target-len {args.pose_target_len} is shorter than the data rows ({seq_len} tokens)")
    if longest > config.max_position_embeddings and not args.ignore_max_positions:
        fail(f"rows need positions up to {longest} but the model's max_position_embeddings is "
             f"{config.max_position_embeddings}; patch its RoPE for that length with 02_rope_scale.py first "
             "(or pass --ignore-max-positions)")
    if (data.manifest.get("vocab_size") or 0) > config.vocab_size:
        fail(f"the data was tokenized with a vocabulary of {data.manifest['vocab_size']} tokens, the model has "
             f"{config.vocab_size}; use the model's tokenizer in 01_prepare_data.py")
    return data, config


def build_model(args, config, mesh, opts):
    """fsdp_train.prepare_model; --ac-every / --offload-activations checkpoint through activation_memory, and
    --tiled-mlp (args.tiled_mlp_slices, from resolve_tiled_mlp) tiles each layer's MLP there."""
    custom = args.activation_checkpointing and (args.ac_every != 1 or args.offload_activations)
    opts = dataclasses.replace(opts, activation_checkpointing=opts.activation_checkpointing and not custom)
    model, info = fsdp_train.prepare_model(config, None if args.init_config else args.model, mesh, opts)
    if custom:
        activation_memory.checkpoint_layers(model.get_decoder().layers, args.ac_every, args.offload_activations)
    if args.tiled_mlp_slices:
        activation_memory.tile_mlp(model.get_decoder().layers, args.tiled_mlp_slices)
    return model, info


def plan_memory(args, config, data, mesh, cp, opts, loss_impl, rows_per_micro: int, world: int, pad_id: int) -> int:
    """--plan: the planner's table for this run's shape and rows, and on CUDA one measured step of this setting."""
    device, cuda = opts.device, opts.device.type == "cuda"
    setting = memory_plan.Setting(
        seq_len=data.seq_len, gpus=world, cp=cp.size, micro_rows=rows_per_micro,
        ac_every=args.ac_every if args.activation_checkpointing else 0, offload=args.offload_activations,
        cpu_offload=args.cpu_offload, tiled_mlp=args.tiled_mlp,
        compute_bytes=2 if opts.compute_dtype != torch.float32 else 4,
        liger=opts.liger, attention="flash" if cuda else "reference", loss_chunk=args.loss_chunk)
    if args.plan_gpu_gib:
        gpu_gib = args.plan_gpu_gib
    elif cuda:
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        gpu_gib = memory_plan.H100_GIB
    shape = memory_plan.Shape.from_config(config)
    best, table = memory_plan.choose(shape, gpu_gib=gpu_gib, base=dataclasses.replace(setting, cp=1))
    predicted = memory_plan.estimate(shape, setting)["total"] / 2**30
    print0(f"plan: {shape.params / 1e9:.3g}B parameters, rows of {data.seq_len:,} tokens, {world} GPU(s)")
    print0(memory_plan.format_table(table, best, gpu_gib))
    print0(f"plan: this run's setting ({setting.describe()}): {predicted:.2f} GiB per GPU predicted")
    print0(memory_plan.format_longest(shape, setting, gpu_gib))
    if not cuda:
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    model, _ = build_model(args, config, mesh, opts)
    optimizer = build_optimizer(model, args)
    rows = data.rows(list(range(rows_per_micro)))
    mb = varlen_attention.build_micro_batch(rows, data.seq_len, args.doc_mask, args.pose_target_len, args.seed)
    mb = context_parallel.shard_micro_batch(mb, cp, pad_id)
    for _ in range(2):  # the second step holds AdamW's moments, as every later one
        forward_backward(model, [mb], args, loss_impl, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = fsdp_train.peak_memory_gib(device)
    print0(f"plan: one step of this setting on {torch.cuda.get_device_name(device)}: predicted {predicted:.2f} GiB, "
           f"measured peak {measured:.2f} GiB ({predicted / measured - 1:+.1%})")
    return 0


def run_lines(args, backend: str, minfo: dict, loss_impl: str, cp, cp_probe: str, micro_tokens: int) -> list[str]:
    """The stage's own lines for fsdp_train.describe_run: attention, kernels, context parallelism."""
    mask = "document-masked" if args.doc_mask else "full causal per row (no doc mask)"
    pose = f", PoSE positions over {args.pose_target_len}" if args.pose_target_len else ""
    every = f" (every {args.ac_every} layers)" if args.ac_every > 1 else ""
    offloaded = ", inputs offloaded to host memory" if args.offload_activations else ""
    tiled = f", MLP tiled over {args.tiled_mlp_slices} slices" if args.tiled_mlp_slices else ""
    lines = [f"attention: {backend}, {mask}{pose}",
             f"kernels: liger {'+'.join(minfo['liger']) or 'off'}, loss {loss_impl} cross-entropy, "
             f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}{every}{offloaded}{tiled}, "
             f"cpu offload {'on' if args.cpu_offload else 'off'}"]
    if cp.size > 1:
        tokens_per_rank = cp.tokens_per_rank(micro_tokens)
        padded = tokens_per_rank * cp.size - micro_tokens
        pad_note = f"; micro-batches padded by {padded} token(s) to split evenly" if padded else ""
        lines.append(f"context parallel: {cp.describe()}; {tokens_per_rank:,} tokens per rank per micro-batch"
                     f"{pad_note}; {cp_probe}")
    return lines


def export(args, model, config, data, out, source_dtype, compute_dtype, stats: dict) -> None:
    """OUT/final: an ordinary HF directory (hf_export.py) with the tokenizer and a manifest of the run."""
    export_dtype = hf_export.export_dtype(args.export_dtype, source_dtype, compute_dtype)
    tokenizer_dir = args.tokenizer or args.model or data.manifest.get("tokenizer")
    if tokenizer_dir and not os.path.isdir(os.path.expanduser(str(tokenizer_dir))):
        tokenizer_dir = None
    manifest = {"stage": STAGE, "args": args,
                "inputs": [p for p in (args.model, *args.data) if p and os.path.isdir(p)],
                "stats": stats, "base_model": args.model or args.init_config,
                "recipe": {"doc_mask": args.doc_mask, "pose_target_len": args.pose_target_len}}
    final = hf_export.export_hf(model, config, out / "final", export_dtype, args.model, tokenizer_dir, manifest)
    print0(f"exported {final} ({str(export_dtype)[6:]})")


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = {"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data, "--init-from": args.init_from,
              "--init-config": (args.init_config or "").partition(":")[0] or None}
    with fsdp_train.run_dir(args, inputs) as run, fsdp_train.StopSignals() as signals:  # --out created by start_run
        return train(args, run, signals)


def train(args, run, signals: fsdp_train.StopSignals) -> int:
    # ---------------------------------------------------------------------------------------------------------
    # Processes, inputs, how a step's rows are dealt, and every check that must fail before anything is written
    dinfo, mesh, dtype = fsdp_train.start_processes(args)
    device, world = dinfo.device, dinfo.world_size
    data, config = open_inputs(args)
    seq_len = data.seq_len
    rows_per_micro = fsdp_train.micro_batch_rows(args.micro_batch_tokens, seq_len)
    # the ("dp", "cp") mesh: a row is split over the cp ranks; data-parallel groups read different rows
    cp = context_parallel.setup_context_parallel(args.cp, config, device, doc_mask=args.doc_mask,
                                                 attention=args.cp_attention, ring_impl=args.cp_ring_impl,
                                                 rows_per_micro=rows_per_micro)
    batch = fsdp_train.step_batch(args.batch_tokens, seq_len, rows_per_micro, cp.dp_size, cp.dp_rank)
    one_pass = max(1, data.num_rows // batch.rows_per_step)
    max_steps, warmup = fsdp_train.schedule_steps(args, batch.tokens, one_pass)
    signature = run_signature(args, config, data, batch.rows_per_step, max_steps, warmup)
    pad_id = int(data.manifest.get("pad_token_id") or 0)  # fills a micro-batch up to a multiple of the cp split
    varlen_attention.set_attention_backend(None if args.attention_backend == "auto" else args.attention_backend)
    opts, loss_impl = fsdp_train.model_options(args, config, device, dtype, varlen_attention.register_attention())
    args.tiled_mlp_slices = resolve_tiled_mlp(args, config, rows_per_micro * seq_len, cp)  # of this rank's tokens
    if args.plan:  # nothing is written
        return plan_memory(args, config, data, mesh, cp, opts, loss_impl, rows_per_micro, world, pad_id)
    tokenizer_dir = args.tokenizer or args.model or data.manifest.get("tokenizer")
    tokenizer = common.load_tokenizer(tokenizer_dir) if args.eval_every else None
    monitor = probes.monitor_from_args(args, tokenizer, seq_len // cp.size, device, run.out / "metrics.jsonl")
    resume_from = fsdp_train.open_run_dir(args, run, signature)

    # ---------------------------------------------------------------------------------------------------------
    # Model: meta device -> Liger -> activation checkpointing -> FSDP2 -> weights; attention probes
    source_dtype = hf_export.config_dtype(config)  # before build_model, which sets fp32
    model, minfo = build_model(args, config, mesh, opts)
    backend = varlen_attention.check_attention(model, device, dtype, config.vocab_size, args.seed)
    cp_probe = context_parallel.check_cp_attention(cp, device, dtype, config, args.seed)
    optimizer = build_optimizer(model, args)
    start_step = fsdp_train.starting_step(args, resume_from, model, optimizer, run.out / "metrics.jsonl",
                                          keep_optimizer=args.keep_optimizer)
    fsdp_train.start_run(args, run, signature, STAGE, resume_from)  # every check passed: --out now exists
    lines = run_lines(args, backend, minfo, loss_impl, cp, cp_probe, rows_per_micro * seq_len)
    fsdp_train.describe_run(STAGE, dinfo, dtype, config, minfo["params"], lines, batch, max_steps, warmup, args,
                            data.num_rows)

    # ---------------------------------------------------------------------------------------------------------
    # Training loop
    order = fsdp_train.DataOrder(data.num_rows, args.seed, args.shuffle)
    cost = data.attn_cost if args.doc_mask else (seq_len - data.num_pad) ** 2  # a row's attention work
    tracker = tracking.open_tracker(args.report_to, run.out, common.jsonable(vars(args)), start_step)
    bookkeeping = fsdp_train.Bookkeeping(args, run.out, model, optimizer, signature, signals, tracker, monitor,
                                         start_step, device, world)
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, args, max_steps, warmup)
        fsdp_train.set_lr(optimizer, lr)

        # the step's rows: the same for every rank; this data-parallel group's micro-batches balanced by attention
        # cost; every rank of a cp group builds the same micro-batches, then keeps its own slice of the tokens
        stream = order.take(step * batch.rows_per_step, batch.rows_per_step)
        micro_batches = []
        for rows in fsdp_train.step_micro_rows(data, stream, cost, batch):
            mb = varlen_attention.build_micro_batch(rows, seq_len, args.doc_mask, args.pose_target_len, args.seed)
            micro_batches.append(context_parallel.shard_micro_batch(mb, cp, pad_id))

        loss_sum, n_valid = forward_backward(model, micro_batches, args, loss_impl, device)
        grad_norm = fsdp_train.clip_grad_norm(model, args.grad_clip).item()
        (loss_total,), stop = bookkeeping.all_reduce(loss_sum)  # one collective: the loss and any stop signal
        loss = loss_total / max(n_valid, 1)
        bookkeeping.check_finite(loss, grad_norm, step + 1)  # before the update, never after it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # metrics (tokens processed, padding included; both MFU conventions), probes, checkpoints, signals
        attn_sq = int(sum(int(cost[r]) for _, r in stream))
        flops = fsdp_train.step_flops(minfo["params"], config, batch.tokens, seq_len, attn_sq)
        extra = {"attn_paths": varlen_attention.count_attention_paths(micro_batches)}  # this rank's, by path
        if cp.size > 1:  # how this rank's micro-batches attended (ProLong's shortcut shows up as "local")
            methods = [mb.cp.method for mb in micro_batches]
            extra["cp_methods"] = {m: methods.count(m) for m in sorted(set(methods))}
        exit_code = bookkeeping.after_step(step + 1, t0, stop, loss=loss, grad_norm=grad_norm, lr=lr,
                                           valid_tokens=n_valid, tokens=batch.tokens, flops=flops, **extra)
        if exit_code is not None:  # stopped by a signal, its checkpoint saved
            return exit_code
    bookkeeping.close()

    if not args.no_export:
        stats = {"steps": max_steps, "tokens": max_steps * batch.tokens,
                 "final_loss": fsdp_train.final_loss(run.out / "metrics.jsonl"), "attention": backend,
                 "world_size": world, "cp": cp.size}
        export(args, model, config, data, run.out, source_dtype, dtype, stats)
    return 0


if __name__ == "__main__":
    common.run_main(main)
