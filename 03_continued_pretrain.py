"""Stage 03: long-context continued pretraining, as ProLong (64K -> 512K) and UltraLong (1M+) did it, on any
number of GPUs with torchrun, and the same code on a CPU for tiny models.

Reads 01's packed rows (documents packed into rows of --seq-len tokens, boundaries kept) and trains a causal LM
with the next-token loss:
- each micro-batch is flattened to ONE row [1, tokens] with explicit document boundaries (cu_seqlens); attention
  stays inside each document (--doc-mask, ProLong) or inside each packed row (--no-doc-mask, UltraLong), never
  across rows, never onto padding; the first token of a document is never predicted from the previous one;
- one attention function registered with transformers: flash-attn varlen when installed, PyTorch's varlen on
  CUDA otherwise, an exact per-document reference on CPU; a start-up probe proves it (and names the backend);
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
    torchrun --nnodes=2 --nproc_per_node=8 ... 03_continued_pretrain.py --model runs/llama31-8b-yarn128 \
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
OUT/checkpoints/step_N/ (torch.distributed.checkpoint shards + trainer_state.json + SHA256SUMS, checked before any
resume: never resume a checkpoint from an untrusted source, its metadata is a pickle), OUT/final/ (HF model
directory with manifest.json).
MFU conventions in the log: "tt" = torchtitan's 6N + 12*L*H*d*S per token (non-causal, masks ignored);
"doc" = 6N + causal attention over the documents actually attended, 12*L*H*d*sum(len_i^2)/(2*sum(len_i)).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
import rope
import ruler
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
    g = train_flags.add_output_args(p, " (for --init-from of a next stage)")
    tracking.add_tracking_args(g)
    add_memory_args(p)
    probes.add_probe_args(p)
    args = p.parse_args(argv)
    if not args.activation_checkpointing and (args.ac_every != 1 or args.offload_activations):
        p.error("--ac-every and --offload-activations choose how layers are checkpointed: drop "
                "--no-activation-checkpointing")
    if (args.model is None) == (args.init_config is None):
        p.error("give exactly one of --model (a model directory) and --init-config (random init)")
    if args.keep_optimizer and not args.init_from:
        p.error("--keep-optimizer needs --init-from")
    if args.resume_fallback and args.resume != "auto":
        p.error("--resume-fallback goes with --resume auto")
    if args.resume not in (None, "auto") and args.init_from:
        p.error("--resume CHECKPOINT continues this run; --init-from starts a new one: give one of them (or "
                "--resume auto, which resumes --out's latest checkpoint and starts from --init-from when there is "
                "none)")
    return args


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
    tokens = -(-micro_tokens // cp.multiple) * cp.multiple // cp.size  # this rank's share of a micro-batch
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


def model_options(args, config, device, dtype):
    """(ModelOptions, loss implementation): Liger and the fused CE on CUDA for the families it patches."""
    liger = args.liger if args.liger is not None else (device.type == "cuda"
                                                       and config.model_type in fsdp_train.LIGER_FAMILIES)
    loss_impl = args.loss if args.loss != "auto" else ("liger" if liger and device.type == "cuda" else "chunked")
    varlen_attention.set_attention_backend(None if args.attention_backend == "auto" else args.attention_backend)
    opts = fsdp_train.ModelOptions(attn_implementation=varlen_attention.register_attention(),
                                   device=device, compute_dtype=dtype, liger=liger and device.type == "cuda",
                           activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload,
                           seed=args.seed)
    return opts, loss_impl


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
    gpu_gib = args.plan_gpu_gib or (torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda
                                    else memory_plan.H100_GIB)
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
    optimizer = fsdp_train.build_optimizer(model, args.lr, args.weight_decay, args.betas)
    rows = data.rows(list(range(rows_per_micro)))
    mb = varlen_attention.build_micro_batch(rows, data.seq_len, args.doc_mask, args.pose_target_len, args.seed)
    mb = context_parallel.shard_micro_batch(mb, cp, pad_id).to(device)
    for _ in range(2):  # the second step holds AdamW's moments, as every later one
        with context_parallel.cp_context(mb):
            loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, loss_impl, args.loss_chunk))
            (loss / max(mb.n_valid, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = fsdp_train.peak_memory_gib(device)
    print0(f"plan: one step of this setting on {torch.cuda.get_device_name(device)}: predicted {predicted:.2f} GiB, "
           f"measured peak {measured:.2f} GiB ({predicted / measured - 1:+.1%})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = {"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data, "--init-from": args.init_from,
              "--init-config": (args.init_config or "").partition(":")[0] or None}
    with fsdp_train.run_dir(args, inputs) as run, fsdp_train.StopSignals() as signals:  # --out created by start_run
        return train(args, run, signals)


def train(args, run, signals: fsdp_train.StopSignals) -> int:
    # ---------------------------------------------------------------------------------------------------------
    # Processes and devices
    dinfo, mesh = fsdp_train.setup_distributed(args.device)
    device, world, rank = dinfo.device, dinfo.world_size, dinfo.rank
    dtype = fsdp_train.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    common.seed_everything(args.seed)

    # ---------------------------------------------------------------------------------------------------------
    # Inputs: data made by 01, a config, and the checks that must fail before anything is written
    data = packed_data.PackedData.open(args.data)
    seq_len = data.seq_len
    config = common.config_from_init_spec(args.init_config) if args.init_config else common.load_config(args.model)
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
    micro_tokens = args.micro_batch_tokens or seq_len
    if micro_tokens % seq_len:
        fail(f"--micro-batch-tokens {micro_tokens} must be a multiple of the rows' length {seq_len}")
    rows_per_micro = micro_tokens // seq_len
    # the ("dp", "cp") mesh: a row is split over the cp ranks; data-parallel groups read different rows
    cp = context_parallel.setup_context_parallel(args.cp, config, device, doc_mask=args.doc_mask,
                                                 attention=args.cp_attention, ring_impl=args.cp_ring_impl,
                                                 rows_per_micro=rows_per_micro)
    dp = cp.dp_size
    batch_tokens = args.batch_tokens or seq_len * dp
    if batch_tokens % seq_len:
        fail(f"--batch-tokens {batch_tokens} must be a multiple of the rows' length {seq_len}")
    rows_per_step = batch_tokens // seq_len
    if rows_per_step % (dp * rows_per_micro):
        fail(f"a step of {rows_per_step} rows does not divide across {dp} data-parallel group(s) x {rows_per_micro} "
             f"row(s) per micro-batch; choose --batch-tokens as a multiple of {dp * rows_per_micro * seq_len}")
    grad_accum = rows_per_step // (dp * rows_per_micro)
    pad_id = int(data.manifest.get("pad_token_id") or 0)  # fills a micro-batch up to a multiple of the cp split
    max_steps, warmup = fsdp_train.schedule_steps(args, batch_tokens, max(1, data.num_rows // rows_per_step))
    signature = run_signature(args, config, data, rows_per_step, max_steps, warmup)
    opts, loss_impl = model_options(args, config, device, dtype)
    args.tiled_mlp_slices = resolve_tiled_mlp(args, config, micro_tokens, cp)  # of this rank's tokens
    if args.plan:  # nothing is written
        return plan_memory(args, config, data, mesh, cp, opts, loss_impl, rows_per_micro, world, pad_id)

    out, ckpt_root = run.out, run.out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    tokenizer_dir = args.tokenizer or args.model or data.manifest.get("tokenizer")
    monitor = probes.monitor_from_args(args, common.load_tokenizer(tokenizer_dir) if args.eval_every else None,
                                       seq_len // cp.size, device, metrics_path, ruler)  # (probes.py)
    resume_from = fsdp_train.open_run_dir(args, run, signature)

    # ---------------------------------------------------------------------------------------------------------
    # Model: meta device -> Liger -> activation checkpointing -> FSDP2 -> weights; attention probe
    source_dtype = hf_export.config_dtype(config)
    model, minfo = build_model(args, config, mesh, opts)  # sets fp32
    backend = varlen_attention.check_attention(model, device, dtype, config.vocab_size, args.seed)
    cp_probe = context_parallel.check_cp_attention(cp, device, dtype, config, args.seed)
    optimizer = fsdp_train.build_optimizer(model, args.lr, args.weight_decay, args.betas)

    start_step = 0
    if resume_from is not None:
        start_step = fsdp_train.resume_checkpoint(resume_from, model, optimizer, metrics_path)
    elif args.init_from:
        fsdp_train.load_checkpoint(args.init_from, model, optimizer if args.keep_optimizer else None, restore_rng=False,
                                   verified=True)
        print0(f"initialised from {args.init_from} (weights{' + optimizer state' if args.keep_optimizer else ''}); "
               "step, schedule and data position start afresh")
    fsdp_train.start_run(args, run, signature, STAGE, resume_from)  # every check passed: --out now exists

    n_params = minfo["params"]
    peak = fsdp_train.peak_flops(device)
    print0(f"{STAGE}: {world} rank(s) on {device.type} ({dinfo.backend}), compute {str(dtype)[6:]}, "
           f"{n_params['total'] / 1e6:.1f}M parameters ({config.model_type}, {config.num_hidden_layers} layers)")
    print0(f"attention: {backend}, {'document-masked' if args.doc_mask else 'full causal per row (no doc mask)'}"
           f"{f', PoSE positions over {args.pose_target_len}' if args.pose_target_len else ''}")
    print0(f"kernels: liger {'+'.join(minfo['liger']) or 'off'}, loss {loss_impl} cross-entropy, "
           f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
           f"{f' (every {args.ac_every} layers)' if args.ac_every > 1 else ''}"
           f"{', inputs offloaded to host memory' if args.offload_activations else ''}"
           f"{f', MLP tiled over {args.tiled_mlp_slices} slices' if args.tiled_mlp_slices else ''}, "
           f"cpu offload {'on' if args.cpu_offload else 'off'}")
    print0(f"batch: {batch_tokens:,} tokens/step = {rows_per_step} rows x {seq_len:,} tokens; "
           f"{rows_per_micro} row(s)/micro-batch x {dp} data-parallel group(s) x {grad_accum} accumulation step(s)")
    if cp.size > 1:
        tokens_per_rank = -(-micro_tokens // cp.multiple) * cp.multiple // cp.size
        pad_note = (f"; micro-batches padded by {tokens_per_rank * cp.size - micro_tokens} token(s) to split evenly"
                    if tokens_per_rank * cp.size != micro_tokens else "")
        print0(f"context parallel: {cp.describe()}; {tokens_per_rank:,} tokens per rank per micro-batch{pad_note}; "
               f"{cp_probe}")
    print0(f"schedule: {max_steps} steps ({max_steps * batch_tokens / 1e9:.3g}B tokens), lr {args.lr:g}, warmup "
           f"{warmup}, cosine to {args.min_lr_ratio:g}x; data: {data.num_rows} rows "
           f"({max_steps * rows_per_step / data.num_rows:.2f} epochs)")
    if peak is None:
        print0("MFU: n/a (no peak FLOP/s known for this device)")

    # ---------------------------------------------------------------------------------------------------------
    # Training loop
    order = fsdp_train.DataOrder(data.num_rows, args.seed, args.shuffle)
    signals.install()
    def trainer_state(step):  # what a checkpoint records besides model, optimizer and RNG
        return {"signature": signature, "step": step, "rows_consumed": step * rows_per_step,
                "max_steps": max_steps, "warmup_steps": warmup, "lr": args.lr}

    # tracking; the first probe (the alarm's reference) runs before the first step of a fresh run
    tracker = tracking.open_tracker(args.report_to, out, common.jsonable(vars(args)), start_step)
    if monitor is not None and start_step == 0:
        monitor.run_first(model, metrics_path, tracker)

    step_times = []
    bar = fsdp_train.progress_bar(max_steps, start_step)
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        lr = args.lr * fsdp_train.lr_multiplier(step, max_steps, warmup, args.min_lr_ratio)
        fsdp_train.set_lr(optimizer, lr)

        # the step's rows: the same for every rank; this rank's micro-batches balanced by attention cost
        stream = order.take(step * rows_per_step, rows_per_step)
        cost = data.attn_cost if args.doc_mask else (seq_len - data.num_pad) ** 2
        # (plan[dp group]: every rank of a cp group builds the same micro-batches, then keeps its own tokens)
        plan = fsdp_train.plan_step(list(range(rows_per_step)), [int(cost[r]) for _, r in stream], dp, rows_per_micro)
        micro_batches = []
        for positions in plan[cp.dp_rank]:
            rows = data.rows([stream[i][1] for i in positions])
            for i, row in zip(positions, rows):
                row["epoch"] = stream[i][0]
            mb = varlen_attention.build_micro_batch(rows, seq_len, args.doc_mask, args.pose_target_len, args.seed)
            micro_batches.append(context_parallel.shard_micro_batch(mb, cp, pad_id))
        n_valid = fsdp_train.global_count(sum(mb.n_valid for mb in micro_batches), device)

        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for mb in micro_batches:
            mb = mb.to(device)
            with context_parallel.cp_context(mb):  # PyTorch's context_parallel around forward and backward (torch ring)
                loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, loss_impl, args.loss_chunk))
                (loss / max(n_valid, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = fsdp_train.clip_grad_norm(model, args.grad_clip)

        if args.debug_sleep:  # tests: a signal sent during the sleep stops this very step
            time.sleep(args.debug_sleep)
        (loss_total,), stop = fsdp_train.reduce_step(loss_sum, signals)
        loss_val, gnorm_val = loss_total / max(n_valid, 1), grad_norm.item()
        fsdp_train.check_finite(loss_val, gnorm_val, step + 1, ckpt_root, bar)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # metrics: tokens processed (padding included), both MFU conventions, memory, ETA
        dt = time.perf_counter() - t0
        if step > start_step:
            step_times.append(dt)
        tokens = rows_per_step * seq_len
        attn_sq = int(sum(int(cost[r]) for _, r in stream))
        flops = fsdp_train.step_flops(n_params, config, tokens, seq_len, attn_sq)
        record = fsdp_train.step_record(step + 1, max_steps, loss=loss_val, grad_norm=gnorm_val, lr=lr,
                                    valid_tokens=n_valid, tokens=tokens, flops=flops, dt=dt, step_times=step_times,
                                    world=world, peak=peak, device=device)
        if cp.size > 1:  # how this rank's micro-batches attended (ProLong's shortcut shows up as "local")
            record["cp_methods"] = {m: sum(mb.cp.method == m for mb in micro_batches)
                                    for m in sorted({mb.cp.method for mb in micro_batches})}
        if monitor is not None and monitor.due(step + 1):
            record.update(monitor.run(step + 1, model))
        fsdp_train.write_step(metrics_path, record, max_steps, args.log_every, device)
        tracker.log(record)
        bar.update(1)

        # checkpoints: periodic, at the end, and when a stop signal arrived on any rank
        fsdp_train.save_if_due(ckpt_root, step + 1, max_steps, stop, args, model, optimizer, trainer_state)
        if stop:
            tracker.close()
            return fsdp_train.stop_on_signal(signals, bar, step + 1)
    bar.close()
    tracker.close()

    # ---------------------------------------------------------------------------------------------------------
    # Export: an ordinary HF directory in OUT/final
    if not args.no_export:
        export_dtype = hf_export.export_dtype(args.export_dtype, source_dtype, dtype)
        tokenizer_dir = args.tokenizer or args.model or data.manifest.get("tokenizer")
        if tokenizer_dir and not os.path.isdir(os.path.expanduser(str(tokenizer_dir))):
            tokenizer_dir = None
        last = json.loads(metrics_path.read_text().splitlines()[-1]) if rank == 0 and metrics_path.is_file() else {}
        manifest = {"stage": STAGE, "args": args, "inputs": [p for p in (args.model, *args.data) if p and
                                                               os.path.isdir(p)],
                    "stats": {"steps": max_steps, "tokens": max_steps * batch_tokens, "final_loss": last.get("loss"),
                              "attention": backend, "world_size": world, "cp": cp.size},
                    "base_model": args.model or args.init_config, "recipe": {"doc_mask": args.doc_mask,
                                                                           "pose_target_len": args.pose_target_len}}
        final = hf_export.export_hf(model, config, out / "final", export_dtype, args.model, tokenizer_dir, manifest,
                    rope.both_forms)
        print0(f"exported {final} ({str(export_dtype)[6:]})")
    return 0


if __name__ == "__main__":
    common.run_main(main)
