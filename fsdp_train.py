"""FSDP2 training machinery for long packed rows: the pieces 03 (continued pretraining) and 04 (SFT) compose.

Each stage keeps its own loop and its recipe's choices (schedule, optimizer groups, loss normalisation, written
out beside the published values); this module holds the mechanics both use, torchtitan's way:
- processes: torchrun's group (nccl on CUDA, gloo on CPU) or a 1-rank group for a plain `python` run, so the same
  FSDP2 code runs everywhere; a deterministic epoch-wise row order and a step's rows dealt to ranks by cost;
- the model: built on the meta device, Liger kernels, per-layer activation checkpointing, FSDP2 (a unit per
  layer plus the root; bf16 compute, fp32 master weights and reduction, gradients SUMMED over ranks because the
  stage's loss is already divided by the global token count), each rank reading only its shard of the
  safetensors weights, or a deterministic random init of any shape;
- the loss: summed token cross-entropy from hidden states and the lm_head weight, never logits for the whole
  row (chunked and checkpointed, or Liger's fused linear cross-entropy), inside the root FSDP forward, and the
  step's GLOBAL count of valid targets to divide it by;
- AdamW over a stage's parameter groups, clipping of sharded gradients;
- sharded atomic checkpoints loadable at any world size, verified against their SHA256SUMS (which lists every
  file) before anything in them is read, and read without unpickling anything but plain data (DCP's metadata
  through a restricted unpickler, every value with weights_only=True); the run directory and its resume rules
  (safe_output.RunDir); SIGTERM / SIGUSR1; metrics with two MFU conventions, and the bookkeeping after each step
  behind one call (Bookkeeping.after_step). The export to an ordinary Hugging Face directory: hf_export.py.

A training step (03_continued_pretrain.py shows the whole composition):

    dinfo, mesh = setup_distributed(device)                  # torchrun's group, or a 1-rank group
    model, info = prepare_model(config, weights_dir, mesh, ModelOptions(device, torch.bfloat16, liger=True,
                                attn_implementation=varlen_attention.register_attention()))
    optimizer = adamw([{"params": list(model.parameters()), "weight_decay": 0.1}], lr)
    n = global_count(sum(mb.n_valid for mb in micro_batches), device)     # before any backward of the step
    for mb in micro_batches:
        loss = forward_loss(model, mb, ce_loss_fn(mb.targets, "liger"))   # summed over the valid targets
        (loss / n).backward()
    clip_grad_norm(model, 1.0)
    optimizer.step()
    optimizer.zero_grad()

Outside this repository (copy this file, safe_output.py and common.py) the same lines train any Hugging Face
causal LM; a micro-batch is any object with input_ids, position_ids, targets (-100: no loss) and
`attention_kwargs()` (varlen_attention.MicroBatch, or yours returning {}). For a distillation term (04),
`loss_fn(hidden, lm_head_weight)` may add a KL term chunk by chunk with `chunked_token_loss(..., chunk_loss=fn,
extra=[teacher_hidden])`.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import sys
import time
import types
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import safe_output
from common import (IGNORE_INDEX, UserError, atomic_write_text, fail, is_count, is_finite_number, jsonable,
                    print0, read_json, seed_everything, versions)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names


# -------------------------------------------------------------------------------------------------------------
# Processes (torchrun's group, or a 1-rank group: the same FSDP2 code everywhere) and the order of the rows.


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # nccl on CUDA, gloo on CPU


def setup_distributed(device: str | None = None):
    """Join the process group torchrun set up, or create a 1-process group for a plain `python script.py` run;
    `device` forces "cpu" or "cuda" (default: CUDA when available). Returns (DistInfo, DeviceMesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device; drop the flag to run on the CPU")
    env = os.environ
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    info = DistInfo(rank, local_rank, world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
                    "nccl" if use_cuda else "gloo")
    if not dist.is_initialized() and "RANK" in env and "WORLD_SIZE" in env:  # torchrun (even with one process)
        dist.init_process_group(backend=info.backend, timeout=datetime.timedelta(minutes=30),
                                device_id=info.device if use_cuda else None)
    elif not dist.is_initialized():
        dist.init_process_group(info.backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    return info, mesh


def process_rank() -> int:
    """This process's rank in the initialised group (0 for a plain `python` run before setup_distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class DataOrder:
    """A deterministic infinite stream of row indices: epoch e is a permutation seeded by (seed, e). The data
    position is just the number of rows consumed, so resuming needs no iterator state."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle

    @functools.lru_cache(maxsize=2)
    def _perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, row index) for stream positions start .. start + count - 1."""
        return [(pos // self.num_rows, int(self._perm(pos // self.num_rows)[pos % self.num_rows]))
                for pos in range(start, start + count)]


def plan_step(rows: list[int], costs: list[int], world_size: int, rows_per_micro: int) -> list[list[list[int]]]:
    """Split one optimizer step's rows into plan[rank][micro_step] = [row ids], balancing attention cost.

    Rows are sorted by decreasing attention cost (ProLong's length-sorted accumulation, +11.7% throughput) and
    dealt in blocks of world_size * rows_per_micro, snake order inside a block, so that the ranks doing a
    micro-step together (FSDP synchronises them) get rows of similar cost."""
    per_block = world_size * rows_per_micro
    if len(rows) % per_block:
        raise ValueError(f"{len(rows)} rows do not split into blocks of {per_block}")
    order = sorted(range(len(rows)), key=lambda i: (-costs[i], i))
    plan = [[] for _ in range(world_size)]
    for b in range(0, len(order), per_block):
        block = order[b:b + per_block]
        micro = [[] for _ in range(world_size)]
        for j, i in enumerate(block):
            lap, pos = divmod(j, world_size)
            micro[pos if lap % 2 == 0 else world_size - 1 - pos].append(rows[i])
        for r, rows_of_rank in enumerate(micro):
            plan[r].append(rows_of_rank)
    return plan


# -------------------------------------------------------------------------------------------------------------
# Forward and loss. The loss runs inside the root module's forward (a method registered with FSDP), so the
# lm_head weight stays in the root FSDP unit, unsharded while the loss reads it (docs/training.md, "Liger").


def _longctx_forward(self, input_ids, position_ids, loss_fn=None, **attn_kwargs):
    hidden = self.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                **attn_kwargs).last_hidden_state
    if loss_fn is None:
        return hidden
    return loss_fn(hidden, self.get_output_embeddings().weight)


def attach_forward(model) -> None:
    """Give `model` the method `longctx_forward(input_ids, position_ids, loss_fn=None, **attn_kwargs)` and make
    FSDP treat it as a forward (all-gather before, reshard / gradient hooks after)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.longctx_forward = types.MethodType(_longctx_forward, model)
    register_fsdp_forward_method(model, "longctx_forward")


def reshard(model) -> None:
    """Reshard every FSDP unit after a forward without backward (evaluation, a teacher, a probe): FSDP2 keeps
    the root unsharded until a backward, and model.parameters() would return the unsharded tensors."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_weight(model) -> torch.Tensor:
    """The lm_head weight as one plain tensor (all-gathered when sharded; collective), e.g. a teacher's for a
    chunked KL term whose chunks are recomputed in the student's backward."""
    from torch.distributed.tensor import DTensor

    w = model.get_output_embeddings().weight
    return (w.full_tensor() if isinstance(w, DTensor) else w).detach()


def forward_loss(model, mb, loss_fn: Callable) -> Any:
    """Run the decoder and `loss_fn(hidden [1, T, H], lm_head_weight)` inside the root FSDP forward."""
    return model.longctx_forward(mb.input_ids, mb.position_ids, loss_fn=loss_fn, **mb.attention_kwargs())


def _ce_chunk(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss(hidden, weight, targets, chunk_size: int = 4096, chunk_loss: Callable = _ce_chunk,
                       extra: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Sum over chunks of `chunk_loss(hidden_chunk, weight, targets_chunk, *extra_chunks)`, each chunk
    checkpointed: one chunk's logits exist at a time. hidden [(1,) T, H]; targets [(1,) T]; `extra` tensors are
    sliced the same way (04: the teacher's hidden states); `chunk_loss` may return a 1-D tensor of summed terms."""
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    extra = [e.reshape(-1, *e.shape[-1:]) if e.dim() > 1 else e.reshape(-1) for e in extra]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        e = s + chunk_size
        total = total + checkpoint(chunk_loss, hidden[s:e], weight, targets[s:e], *[x[s:e] for x in extra],
                                   use_reentrant=False)
    return total


def liger_token_loss(hidden, weight, targets) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed (reduction="sum"; never "none": docs/training.md)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32, reduction="sum", ignore_index=IGNORE_INDEX)
    return fn(weight, hidden, targets).float()


def ce_loss_fn(targets: torch.Tensor, impl: str = "chunked", chunk_size: int = 4096) -> Callable:
    """A `loss_fn(hidden, weight)` for forward_loss: summed next-token CE over valid targets."""
    if impl == "liger":
        return lambda hidden, weight: liger_token_loss(hidden, weight, targets)
    return lambda hidden, weight: chunked_token_loss(hidden, weight, targets, chunk_size)


def global_count(local: int, device: torch.device) -> int:
    """Sum of a per-rank count over all ranks (the step's number of valid targets, torchtitan's divisor)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(local)
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


# -------------------------------------------------------------------------------------------------------------
# The model: meta device -> Liger -> activation checkpointing -> FSDP2 -> each rank's shard of the weights.

def count_params(model) -> dict:
    """Parameter counts for the FLOP conventions (on a meta or real model, before sharding)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight  # lm_head: real work anyway
    return {"total": total, "embedding": embed, "non_embedding": total - embed + (lm_head if tied else 0),
            "tied": tied}


@dataclass
class ModelOptions:
    device: torch.device
    compute_dtype: torch.dtype = torch.float32  # bf16 on CUDA (FSDP2 MixedPrecisionPolicy), fp32 master params
    liger: bool = False  # Liger RoPE / RMSNorm / SwiGLU (CUDA); the fused CE is chosen in the loss
    activation_checkpointing: bool = True
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    seed: int = 0
    attn_implementation: str = "sdpa"  # a name transformers knows: varlen_attention.register_attention() in 03/04


LIGER_FAMILIES = ("llama", "qwen2", "mistral")


def apply_liger(model) -> list[str]:
    """Liger RoPE, RMSNorm and SwiGLU for Llama / Qwen2 / Mistral (not its CE: the loss is ours). Note that the
    RoPE patch replaces the family's `apply_rotary_pos_emb` globally, for every model of that family."""
    mt = model.config.model_type
    if mt not in LIGER_FAMILIES:
        return []
    import liger_kernel.transformers as lk

    fn = getattr(lk, f"apply_liger_kernel_to_{mt}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return ["rope", "rms_norm", "swiglu"]


def apply_activation_checkpointing(model) -> None:
    """Per-decoder-layer checkpointing, inside each layer's FSDP unit (the layer's forward recomputes in the
    backward without another all-gather). Module names and state-dict keys are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.get_decoder().layers:
        inner = layer.forward

        def fwd(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = fwd


def shard_model(model, mesh, opts: ModelOptions) -> None:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, lm_head stay in the root unit)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=opts.compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=opts.device.type == "cuda") if opts.cpu_offload else OffloadPolicy()
    layers = list(model.get_decoder().layers)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again right at the start of the backward.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=opts.reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    # Our loss is already divided by the global token count: gradients must be SUMMED over ranks, not averaged
    # (FSDP2 divides by the world size by default). Plain SUM collectives: gloo has no PREMUL_SUM.
    for m in [*layers, model]:
        m.set_gradient_divide_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor for a (possibly DTensor-sharded) parameter."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    local = param.to_local()
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = math.ceil(full.shape[0] / world) if full.dim() else 0
    start = min(rank * chunk, full.shape[0])
    part = full[start:start + local.shape[0]]
    if part.shape != local.shape:
        raise RuntimeError(f"shard shape {tuple(part.shape)} != local shape {tuple(local.shape)}")
    return part


class SafetensorsSource:
    """Full tensors by name from an HF directory (model.safetensors or sharded with an index), memory-mapped."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.files = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            fail(f"{directory} has no model.safetensors (nor an index); save the model with safetensors")
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path].get_tensor(name)


def random_init_tensor(name: str, shape, std: float, seed: int, device="cpu") -> torch.Tensor:
    """Deterministic init by parameter name (independent of world size; generated on `device`, so CPU and
    CUDA runs differ): N(0, std) for matrices and embeddings, ones for norm weights, zeros for biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1:
        return torch.ones(shape, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=g, device=device) * std


def materialize(model, device: torch.device, source: SafetensorsSource | None, seed: int = 0) -> None:
    """Allocate the (sharded) parameters on `device` and fill them: from `source` (each rank copies only its
    shard of each full tensor) or by deterministic random init. Then recompute the rotary buffers, which a
    meta-device construction leaves empty."""
    model.to_empty(device=device)
    std = getattr(model.config, "initializer_range", 0.02)
    init_device = device if device.type == "cuda" else "cpu"
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if source is not None:
                if name not in source:
                    missing.append(name)
                    continue
                full = source.get(name)
            else:
                full = random_init_tensor(name, tuple(p.shape), std, seed, init_device)
            if tuple(full.shape) != tuple(p.shape):
                fail(f"weight {name} has shape {tuple(full.shape)} in the checkpoint, the config says "
                     f"{tuple(p.shape)}; the config and weights do not match")
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(_local_slice(p, full).to(device=device, dtype=local.dtype))
    if missing:
        fail(f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}")
    reset_rotary_buffers(model, device)


def reset_rotary_buffers(model, device: torch.device) -> None:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            try:
                fresh = type(module)(config=module.config, device=device)
            except TypeError:
                fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling


def prepare_model(config, weights_dir: str | None, mesh, opts: ModelOptions):
    """Build (on the meta device: no memory yet), patch, shard and load a causal LM for training.
    Returns (model, info dict)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = opts.attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=opts.attn_implementation,
                                                 dtype=torch.float32)
    params = count_params(model)
    liger = apply_liger(model) if opts.liger else []
    if opts.activation_checkpointing:
        apply_activation_checkpointing(model)
    shard_model(model, mesh, opts)
    source = SafetensorsSource(weights_dir) if weights_dir else None
    materialize(model, torch.device("cpu") if opts.cpu_offload else opts.device, source, opts.seed)
    if opts.cpu_offload:
        reset_rotary_buffers(model, opts.device)
    attach_forward(model)
    model.train()
    return model, {"params": params, "liger": liger}


# -------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, clipping. Which parameters decay and how the learning rate moves are a recipe's choices:
# 03 and 04 write theirs out beside the published values. What follows does not depend on the recipe.


def adamw(param_groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """torch's AdamW over a stage's parameter groups: fused (one kernel per step) when the parameters are on a
    GPU, the plain per-tensor loop when they are on the CPU (a CPU run, or --cpu-offload)."""
    on_cuda = next(p for group in param_groups for p in group["params"]).device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=True if on_cuda else None,
                             foreach=None if on_cuda else False)


def schedule_steps(args, batch_tokens: int, default_steps: int) -> tuple[int, int]:
    """(max_steps, warmup_steps) from --max-steps, else --num-tokens, else the stage's default (a pass over its
    data); warmup from --warmup-steps, else --warmup-ratio of the steps."""
    if args.max_steps:
        max_steps = args.max_steps
    elif args.num_tokens:
        max_steps = math.ceil(args.num_tokens / batch_tokens)
    else:
        max_steps = default_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * max_steps)
    return max_steps, warmup


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Total gradient norm over sharded (DTensor) gradients, then clip; returns the norm (a plain tensor)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, None)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, None)
    return norm


# -------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (sharded, loadable at any world size), renamed into place once
# every rank has finished and SHA256SUMS (written last) covers every file: a checkpoint is complete or absent.
# Before anything in one is used, SHA256SUMS must list every file of it and only files inside it, and each must
# match; trainer_state.json must pass its schema. Nothing in a checkpoint can run code when read: DCP's .metadata
# is a pickle, read here by an unpickler that admits only the classes DCP metadata consists of; tensors, the
# optimizer's plain values and the RNG state are read with torch.load(weights_only=True) (docs/training.md).

CKPT_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
DCP_SHARD_RE = re.compile(r"^__\d+_\d+\.distcp$")  # the files DCP's FileSystemWriter stores items in


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoints under root (step_N), oldest first, complete or not: one that lacks its SHA256SUMS (only
    damage does that: a save renames it into place after writing it) is refused by name, never passed over."""
    root = Path(root)
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


# trainer_state.json's fields: (required, check). save_checkpoint writes step and world_size, 03/04 the rest.
TRAINER_STATE_FIELDS = {
    "step": (True, is_count), "world_size": (True, lambda v: is_count(v, 1)),
    "signature": (True, lambda v: isinstance(v, dict)), "rows_consumed": (False, is_count),
    "max_steps": (False, lambda v: is_count(v, 1)), "warmup_steps": (False, is_count),
    "lr": (False, is_finite_number),
}


def read_trainer_state(path: str | os.PathLike) -> dict:
    """A checkpoint's trainer_state.json, checked against TRAINER_STATE_FIELDS and its folder's step: a damaged
    or forged one (a step of 10^15, NaN, a negative count) is one error line, never trusted."""
    path = Path(path)
    file = path / TRAINER_STATE
    if not file.is_file() or not (path / DCP_METADATA).is_file():
        fail(f"{path} is not a complete longctx checkpoint (no {TRAINER_STATE} or DCP {DCP_METADATA})")
    state = read_json(file)
    if not isinstance(state, dict):
        fail(f"{file} is not a JSON object, so it is not a longctx trainer state")
    bad = [k for k, (required, ok) in TRAINER_STATE_FIELDS.items() if (k in state and not ok(state[k]))
           or (required and k not in state)]
    if bad:
        fail(f"{file} is not a valid trainer state (missing or malformed: {', '.join(bad)})")
    folder = CKPT_RE.match(path.name)
    if folder and int(folder.group(1)) != state["step"]:
        fail(f"{file} says step {state['step']}, but its folder is {path.name}")
    if state["step"] > state.get("max_steps", state["step"]):
        fail(f"{file} says step {state['step']}, past its max_steps {state['max_steps']}")
    return state


# -------------------------------------------------------------------------------------------------------------
# DCP metadata without pickle's reach: a restricted unpickler, then a check of what it built.


def _layout_named(name: str) -> torch.layout:
    """torch.serialization._get_layout's job (a layout from its name) without its cache of torch's namespace."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return layouts[name]


@functools.lru_cache(maxsize=1)
def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    """Everything a DCP .metadata pickle may name (torch 2.x's FileSystemWriter): DCP's metadata classes,
    torch.Size, dtypes, layouts and memory formats, and the checkpoint's path, read as a pure path (nothing on
    disk is touched). Calling any of these with any arguments only builds a value."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.metadata", name): getattr(metadata, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed.update({("torch", name): value for name, value in vars(torch).items()
                    if isinstance(value, (torch.dtype, torch.memory_format))})
    allowed[("torch.serialization", "_get_layout")] = _layout_named
    allowed.update({("pathlib", name): PurePosixPath for name in ("Path", "PosixPath", "PurePosixPath")})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only _dcp_metadata_globals(): any other class or function a pickle names
    (os.system, builtins.eval, ...) is refused before it is looked up, so nothing in the file can run."""

    def find_class(self, module: str, name: str):
        found = _dcp_metadata_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")
        return found


def _tensor_entry_ok(entry) -> bool:
    """A tensor's entry as DCP writes it: its properties, a shape, and chunks of that many dimensions."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    if type(entry) is not TensorStorageMetadata or type(entry.properties) is not TensorProperties:
        return False
    ndim = len(entry.size) if type(entry.size) is torch.Size else -1

    def shape_ok(s) -> bool:
        return type(s) is torch.Size and len(s) == ndim and all(n >= 0 for n in s)

    return (isinstance(entry.properties.dtype, torch.dtype) and shape_ok(entry.size)
            and isinstance(entry.chunks, list)
            and all(type(c) is ChunkStorageMetadata and shape_ok(c.offsets) and shape_ok(c.sizes)
                    for c in entry.chunks))


def _metadata_problem(md, directory: Path) -> str | None:
    """What in unpickled DCP metadata is not what DCP writes, or None: every entry of DCP's classes, every stored
    item inside one of the checkpoint's own shard files (a name SHA256SUMS lists, within its size), no stream
    transforms (longctx writes none)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta

    if type(md) is not Metadata:
        return "does not hold DCP checkpoint metadata"
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        return "does not hold DCP checkpoint metadata (its tables are not dictionaries)"
    if md.storage_meta is not None and type(md.storage_meta) is not StorageMeta:
        return "does not hold DCP checkpoint metadata (storage_meta)"
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str) or not (type(entry) is BytesStorageMetadata or _tensor_entry_ok(entry)):
            return f"describes {fqn!r} in a form DCP does not write"
    shards = {name: (directory / name).stat().st_size for name in safe_output.read_checksums(directory) or {}
              if DCP_SHARD_RE.match(name)}
    for key, info in md.storage_data.items():
        if type(key) is not MetadataIndex or not isinstance(key.fqn, str) or type(info) is not _StorageInfo:
            return "holds a storage entry DCP does not write"
        where = f"stores {key.fqn!r} in {info.relative_path!r}"
        if info.relative_path not in shards:
            return f"{where}, which is not one of the checkpoint's own shard files"
        size = shards[info.relative_path]
        if not (is_count(info.offset) and is_count(info.length) and info.offset + info.length <= size):
            return f"{where} at bytes {info.offset}..+{info.length}, outside that file"
        if info.transform_descriptors:
            return f"{where} through stream transforms ({info.transform_descriptors}), which longctx never writes"
    return None


def dcp_metadata(path: str | os.PathLike):
    """A checkpoint's DCP metadata (torch.distributed.checkpoint.metadata.Metadata), read with _MetadataUnpickler and
    checked by _metadata_problem: a crafted or damaged file is one error line and runs nothing."""
    file = Path(path) / DCP_METADATA
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - whatever a malformed pickle raises means the same here
        fail(f"{file} is not DCP metadata longctx reads ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
             "nothing in it was run")
    try:
        problem = _metadata_problem(md, Path(path))
    except (AttributeError, TypeError, ValueError) as exc:  # an object of the right class built with odd fields
        problem = f"does not hold DCP checkpoint metadata ({type(exc).__name__})"
    if problem:
        fail(f"{file} {problem}")
    return md


def _gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def checkpoint_problem(path: str | os.PathLike, signature: dict | None = None) -> str | None:
    """What makes a checkpoint unusable, naming the file, or None. SHA256SUMS must list every file in it and only
    files inside it, each matching (each rank hashes a share: collective); trainer_state.json must pass its
    schema; the DCP metadata must read with the restricted unpickler and point only into the checkpoint's shard
    files. With a run's `signature` (resuming), the checkpoint must be of that run and not past its last step."""
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = f"{path} is not a directory" if not path.is_dir() else (
        safe_output.coverage_problem(path)
        or safe_output.verify_checksums(path, sorted(safe_output.read_checksums(path))[rank::world]))
    problem = next((p for p in _gather([problem]) if p), None)
    if problem:
        return problem
    try:
        state = read_trainer_state(path)
        dcp_metadata(path)
    except UserError as exc:
        return str(exc)
    if signature is None:
        return None
    diff = signature_diff(state["signature"], signature)
    if diff:
        return f"it is incompatible with this run ({'; '.join(diff)})"
    if state["step"] > signature.get("max_steps", state["step"]):
        return f"{path / TRAINER_STATE} says step {state['step']}, past this run's last step {signature['max_steps']}"
    return None


def verified_checkpoint(path: str | os.PathLike, flag: str, signature: dict | None = None) -> Path:
    """`path`, after refusing (one line) a checkpoint that checkpoint_problem finds fault with."""
    problem = checkpoint_problem(path, signature)
    if problem:
        fail(f"{flag} {path} cannot be used: {problem}; choose another checkpoint")
    return Path(path)


def _rng_state() -> dict:
    """Every generator's state as tensors and numbers only, so that loading it needs no pickle."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                          has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(path: Path) -> None:
    """Restore the generators from rng_rank{N}.pt, read with weights_only=True: tensors and plain values only,
    nothing in the file can run code."""
    try:
        state = torch.load(path, weights_only=True)
        version, internal, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except Exception as exc:  # noqa: BLE001 - any refusal of the unpickler or odd content means the same
        fail(f"{path} is not a longctx RNG state ({type(exc).__name__}); it was not loaded")


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = {"optim": get_optimizer_state_dict(model, optimizer)} if optimizer is not None else {}
    return {"model": get_model_state_dict(model), **optim}


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Sharded checkpoint at root/step_XXXXXXXX (model, optimizer, per-rank RNG, trainer_state.json with step,
    data position and schedule, SHA256SUMS last). Atomic: written under a temporary name (removed if the save
    fails), renamed once all ranks are done. Keeps the last `keep` checkpoints (0 = keep all). Collective."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            state = dict(trainer_state, step=step, world_size=world, saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(jsonable(state), indent=2) + "\n")
        barrier()
        lines = _gather(safe_output.checksum_lines(tmp, safe_output.checksum_files(tmp)[rank::world]))
        if rank == 0:
            safe_output.write_checksums(tmp, lines)
            old = root / f".old-step_{step:08d}"  # the same step saved again (a signal right after a periodic save)
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if rank == 0:  # a save that failed (a full disk) must not leave a half-written copy filling it further
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0 and keep and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            trash = root / f".old-{old.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(old, trash)  # never a half-deleted step_N, should a kill land while deleting
            shutil.rmtree(trash, ignore_errors=True)
    barrier()
    return final


def dcp_load(state_dict: dict, path: str | os.PathLike) -> None:
    """dcp.load(state_dict) from `path` with nothing unpickled but plain data: the metadata is dcp_metadata's
    (restricted unpickler, checked), and the stored non-tensor values (the optimizer's param_groups) are read with
    weights_only=True, where DCP's own planner uses weights_only=False. What DCP refuses is one error line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = dcp_metadata(path)

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, or a damaged value
                raise ValueError(f"the stored value {read_item.dest_index.fqn!r} is not plain data (a tensor, number, "
                                 "string or list); nothing in it was run") from exc
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state_dict, storage_reader=Reader(str(path)), planner=Planner())
    except (CheckpointException, Exception) as exc:  # CheckpointException is a BaseException
        cause = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
        fail(f"{path} cannot be loaded: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}")


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, restore_rng: bool = True,
                    verified: bool = False) -> dict:
    """Load model (and optimizer, when given) state from a checkpoint written by save_checkpoint, resharding to
    the current world size, after checkpoint_problem found nothing wrong (unless `verified` already). Returns its
    trainer_state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path) if verified else verified_checkpoint(path, "checkpoint")
    state = read_trainer_state(path)
    sd = _state_dicts(model, optimizer)
    dcp_load(sd, path)
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    rng = path / f"rng_rank{process_rank()}.pt"
    if restore_rng and rng.is_file():
        _set_rng_state(rng)
    return state


class StopSignals:
    """Once `install()`ed (as the loop starts), SIGTERM / SIGUSR1 (preemption) set a flag: the loop saves a checkpoint
    at the end of the step. As a context manager it puts the previous handlers back however the run ends."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self.signals = signals
        self._previous = {}

    def install(self) -> "StopSignals":
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        return self

    __exit__ = restore


# -------------------------------------------------------------------------------------------------------------
# The run directory (03, 04): OUT/run.json records what a resume must match; OUT holds one run, never a mix.

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def model_shape(config) -> dict:
    """The config fields a checkpoint's tensors depend on: part of a run's signature, and what --init-from's
    checkpoint must match."""
    return {k: getattr(config, k, None) for k in SHAPE_KEYS}


def signature_diff(old: dict, new: dict) -> list[str]:
    """One 'key: old -> new' line per differing key, compared as JSON (a tuple equals its list, as in run.json),
    so that a refused resume names exactly what changed."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def run_dir(args, inputs: dict) -> safe_output.RunDir:
    """03/04's --out (safe_output.RunDir): locked, checked against `inputs` (flag: path); a failed fresh start is
    removed unless it saved a checkpoint, a failed --overwrite puts the old run back."""
    return safe_output.RunDir(args.out, inputs, args.overwrite,
                              keep_if=lambda out: bool(list_checkpoints(out / "checkpoints")))


def open_run_dir(args, run: safe_output.RunDir, signature: dict) -> Path | None:
    """Check --out against --resume / --overwrite / --init-from on every rank, and verify the checkpoint to
    start from (checkpoint_problem: before anything in it is loaded). Writes nothing (`start_run` does, once the
    model is built). Returns the checkpoint to resume from, or None. `--resume auto` resumes OUT's latest
    verified checkpoint or starts afresh: one command line serves the first launch and every relaunch."""
    out, resume_from = run.out, None
    ckpt_root, run_file = out / "checkpoints", out / "run.json"
    holds_run = out.is_dir() and any(out.iterdir())
    if holds_run and not args.overwrite:
        if not args.resume:
            fail(f"--out {out} already holds a run ({len(list_checkpoints(ckpt_root))} checkpoint(s)); pass "
                 "--resume auto to continue it, --overwrite to replace it, or choose another --out")
        if not run_file.is_file():
            fail(f"--out {out} is not empty and holds no longctx run (no run.json); choose another --out")
        recorded = read_json(run_file)
        diff = signature_diff(recorded.get("signature", {}) if isinstance(recorded, dict) else {}, signature)
        if diff:
            fail(f"cannot resume the run in {out}: its settings differ ({'; '.join(diff)}); start a new stage "
                 "with --init-from CHECKPOINT and another --out")
    if args.resume == "auto":
        resume_from = (latest_verified(ckpt_root, args.resume_fallback, signature) if holds_run and not args.overwrite
                       else None)
        if args.init_from:
            print0(f"--resume auto: resuming {resume_from} (--init-from is not loaded)" if resume_from else
                   f"--resume auto: no checkpoint in {out} yet; starting from --init-from {args.init_from}")
    elif args.resume:
        resume_from = verified_checkpoint(args.resume, "--resume", signature)
    if args.init_from and resume_from is None:
        shape = read_trainer_state(verified_checkpoint(args.init_from, "--init-from"))["signature"].get("model")
        diff = signature_diff(shape if isinstance(shape, dict) else {}, signature["model"])
        if diff:
            fail(f"--init-from {args.init_from} holds another model shape ({'; '.join(diff)})")
    return resume_from


def latest_verified(ckpt_root: Path, fallback: bool, signature: dict | None = None) -> Path | None:
    """--resume auto's checkpoint: the latest one, refused when checkpoint_problem finds fault with it (a missing
    SHA256SUMS included: a run's progress is never passed over); with `fallback` (--resume-fallback) such a one
    is renamed corrupt-step_N (kept, never resumed) and the one before it is tried. None only when the run never
    saved a checkpoint."""
    found = list_checkpoints(ckpt_root)
    for path in reversed(found):
        problem = checkpoint_problem(path, signature)
        if problem is None:
            return path
        if not fallback:
            fail(f"--resume auto: the latest checkpoint {path} cannot be used: {problem}; pass --resume-fallback "
                 "to continue from the latest checkpoint that verifies, or choose another --out")
        print0(f"--resume auto: skipping {path} ({problem}); it is kept as corrupt-{path.name}")
        if process_rank() == 0:
            os.rename(path, path.parent / f"corrupt-{path.name}")
        barrier()
    refused = sorted(ckpt_root.glob("corrupt-step_*")) if ckpt_root.is_dir() else []
    if found or refused:
        fail(f"--resume auto: none of the {len(refused)} checkpoint(s) in {ckpt_root} verifies (kept as "
             "corrupt-step_N); start afresh with --overwrite or choose another --out")
    return None


def start_run(args, run: safe_output.RunDir, signature: dict, stage: str, resume_from: Path | None) -> None:
    """Create --out with run.json once every check passed (the model built, the checkpoint loaded); a fresh
    start drops the records of an earlier start that saved no checkpoint. Collective."""
    barrier()
    if process_rank() == 0:
        run.create({"run.json": json.dumps(jsonable({"stage": stage, "signature": signature, "args": vars(args),
                                                     "versions": versions()}), indent=2) + "\n"})
        if resume_from is None and (run.out / "metrics.jsonl").is_file():
            (run.out / "metrics.jsonl").unlink()
        for leftover in (run.out / "checkpoints").glob(".*-step_*"):  # a save a killed process left half done
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line a hard kill cut short (it is written again)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and is_count(record.get("step")) else None


def resume_checkpoint(path: Path, model, optimizer, metrics_path: Path) -> int:
    """Load a (verified) checkpoint of this run (model, optimizer, RNG) and return its step. Records of later
    steps (a hard kill leaves them) are dropped from metrics.jsonl: the resumed run writes them again."""
    step = load_checkpoint(path, model, optimizer, verified=True)["step"]
    if process_rank() == 0 and metrics_path.is_file():
        kept = []
        for line in metrics_path.read_bytes().decode(errors="replace").splitlines():
            done = _record_step(line)
            if done is not None and done <= step:
                kept.append(line)
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
    print0(f"resumed from {path} at step {step}")
    return step


# -------------------------------------------------------------------------------------------------------------
# The end of a training step (03, 04): global sums, the finite check, checkpoints, stopping on a signal.


def reduce_step(sums: torch.Tensor, signals: StopSignals) -> tuple[list[float], bool]:
    """All-reduce a step's local loss sums (1-D) together with a stop flag in ONE collective: every rank gets the
    global sums, and all ranks stop after the same step when any of them received a signal."""
    stats = torch.cat([sums.reshape(-1), torch.tensor([float(signals.received is not None)], device=sums.device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    *values, stop = stats.tolist()
    return values, stop > 0


def check_finite(loss: float, grad_norm: float, done: int, ckpt_root: Path, bar=None) -> None:
    """Stop with one error line BEFORE the optimizer applies a non-finite update, naming the last good checkpoint
    (which is left as it is) to resume from."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    if bar is not None:  # the error line on a line of its own
        bar.close()
    last = list_checkpoints(ckpt_root)
    fail(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} ({loss:g}, grad norm {grad_norm:g}) "
         f"at step {done}; stopped before the optimizer step. Last good checkpoint: {last[-1] if last else 'none'} "
         "(resume with --resume auto, e.g. with a lower --lr)")


def save_if_due(ckpt_root: Path, done: int, max_steps: int, stop: bool, args, model, optimizer,
                trainer_state: Callable[[int], dict]) -> None:
    """Checkpoint after step `done` every --save-every steps, after the last step (--final-checkpoint), and when
    a stop signal arrived on any rank (a preempted run then loses nothing). Collective."""
    if stop or (args.save_every and done % args.save_every == 0) or (done == max_steps and args.final_checkpoint):
        path = save_checkpoint(ckpt_root, done, model, optimizer, trainer_state(done), args.keep)
        print0(f"saved checkpoint {path}")


def stop_on_signal(signals: StopSignals, bar, done: int) -> int:
    """End a run stopped by SIGTERM / SIGUSR1 once its checkpoint is saved: close the bar and return 128 + signum,
    the exit code of death by that signal, so a scheduler sees a preemption."""
    bar.close()
    signum = signals.received or 15
    print0(f"stopped by signal {signum} after step {done}; checkpoint saved, continue with --resume auto")
    return 128 + signum


# -------------------------------------------------------------------------------------------------------------
# Metrics: throughput, MFU in two stated conventions, memory.

PEAK_BF16_FLOPS = [  # dense bf16 tensor-core peak, by substring of torch.cuda.get_device_name()
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None (CPU, unknown GPU): MFU is then reported as n/a."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((value for key, value in PEAK_BF16_FLOPS if key in name), None)


def step_flops(params: dict, config, n_tokens: int, seq_len: int, attn_sq: int) -> dict:
    """Model FLOPs of one step's tokens in two conventions (no recomputation counted):
    - torchtitan: (6 N + 12 L H d S) per token, non-causal attention over the whole row S, masks ignored;
    - causal_doc: 6 N per token + 12 L H d * sum(len_i^2) / 2 over the documents actually attended."""
    L, H, n = config.num_hidden_layers, config.num_attention_heads, params["non_embedding"]
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    return {"torchtitan": n_tokens * (6 * n + 12 * L * H * d * seq_len),
            "causal_doc": 6 * n * n_tokens + 12 * L * H * d * attn_sq / 2}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def progress_bar(total: int, initial: int):
    """tqdm on stderr, rank 0 only, so that stdout holds just the log lines."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=process_rank() != 0,
                desc="train", dynamic_ncols=True, leave=False, file=sys.stderr)


def step_record(done: int, max_steps: int, *, loss: float, grad_norm: float, lr: float, valid_tokens: int,
                tokens: int, flops: dict, dt: float, step_times: list[float], world: int, peak: float | None,
                device: torch.device) -> dict:
    """One metrics.jsonl record: loss, schedule, throughput (padding included), MFU in both conventions (None
    without a known peak), peak memory, and an ETA from the mean time of the steps after the first (warm-up)."""
    mfu = {k: (v / dt / world / peak if peak else None) for k, v in flops.items()}
    avg = sum(step_times) / len(step_times) if step_times else dt
    return {"step": done, "loss": loss, "grad_norm": grad_norm, "lr": lr, "valid_tokens": valid_tokens,
            "tokens": tokens, "step_time_s": dt, "tokens_per_s": tokens / dt,
            "tokens_per_s_per_gpu": tokens / dt / world, "mfu_torchtitan": mfu["torchtitan"],
            "mfu_causal_doc": mfu["causal_doc"], "peak_mem_gib": peak_memory_gib(device),
            "eta_s": avg * (max_steps - done)}


def write_step(metrics_path: Path, record: dict, max_steps: int, log_every: int, device: torch.device) -> None:
    """Rank 0 appends the record to metrics.jsonl and, every --log-every steps and after the last, prints the
    one-line log through tqdm (which keeps the bar intact); a distillation record's ce and kl follow its loss."""
    if process_rank() != 0:
        return
    with open(metrics_path, "a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
    done = record["step"]
    if done % log_every and done != max_steps:
        return
    from tqdm import tqdm

    r = record
    mfu_txt = (f"mfu {r['mfu_torchtitan']:.1%} tt / {r['mfu_causal_doc']:.1%} doc" if r["mfu_torchtitan"] is not None
               else "mfu n/a")
    kd_txt = f" (ce {r['ce']:.4f}, kl {r['kl']:.4f})" if "ce" in r else ""
    unit = "gpu" if device.type == "cuda" else "rank"
    tqdm.write(f"step {done}/{max_steps} | loss {r['loss']:.4f}{kd_txt} | gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e}"
               f" | tok/s {r['tokens_per_s']:,.0f} ({r['tokens_per_s_per_gpu']:,.0f}/{unit}) | {mfu_txt} | "
               f"mem {r['peak_mem_gib']:.1f} GiB | eta {format_duration(r['eta_s'])}", file=sys.stdout)
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, m, s = int(seconds) // 3600, int(seconds) % 3600 // 60, int(seconds) % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -------------------------------------------------------------------------------------------------------------
# A stage's run around its training step (03, 04): processes, model options, how a step's rows are dealt, where
# training starts, the lines that describe the run, and the bookkeeping after each step.


def start_processes(args) -> tuple[DistInfo, Any, torch.dtype]:
    """(DistInfo, DeviceMesh, compute dtype) for train_flags' --device / --dtype (bf16 on CUDA, fp32 on a CPU),
    with every generator seeded from --seed."""
    dinfo, mesh = setup_distributed(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if dinfo.device.type == "cuda" else "fp32")]
    seed_everything(args.seed)
    return dinfo, mesh, dtype


def model_options(args, config, device: torch.device, dtype: torch.dtype,
                  attn_implementation: str) -> tuple[ModelOptions, str]:
    """(ModelOptions, loss implementation) from train_flags' system flags: Liger's kernels and its fused linear
    cross-entropy on CUDA for the families it patches, unless --liger / --loss say otherwise."""
    if args.liger is not None:
        liger = args.liger
    else:
        liger = device.type == "cuda" and config.model_type in LIGER_FAMILIES
    if args.loss != "auto":
        loss_impl = args.loss
    else:
        loss_impl = "liger" if liger and device.type == "cuda" else "chunked"
    opts = ModelOptions(device=device, compute_dtype=dtype, liger=liger and device.type == "cuda",
                        activation_checkpointing=args.activation_checkpointing, cpu_offload=args.cpu_offload,
                        seed=args.seed, attn_implementation=attn_implementation)
    return opts, loss_impl


@dataclass(frozen=True)
class Batch:
    """How a step's rows are dealt: `rows_per_step` rows of `seq_len` tokens over all ranks, `rows_per_micro`
    rows per forward / backward in each of `dp` data-parallel groups (the ranks, or the ranks / --cp), and the
    accumulation steps in between."""
    seq_len: int
    rows_per_step: int
    rows_per_micro: int
    dp: int
    dp_rank: int

    @property
    def tokens(self) -> int:
        return self.rows_per_step * self.seq_len

    @property
    def grad_accum(self) -> int:
        return self.rows_per_step // (self.dp * self.rows_per_micro)


def micro_batch_rows(micro_batch_tokens: int | None, seq_len: int) -> int:
    """Rows per micro-batch from --micro-batch-tokens (default: one row)."""
    micro_tokens = micro_batch_tokens or seq_len
    if micro_tokens % seq_len:
        fail(f"--micro-batch-tokens {micro_tokens} must be a multiple of the rows' length {seq_len}")
    return micro_tokens // seq_len


def step_batch(batch_tokens: int | None, seq_len: int, rows_per_micro: int, dp: int, dp_rank: int) -> Batch:
    """The Batch of --batch-tokens (default: one row per data-parallel group), refused unless it divides into
    whole micro-batches on every group."""
    batch_tokens = batch_tokens or seq_len * dp
    if batch_tokens % seq_len:
        fail(f"--batch-tokens {batch_tokens} must be a multiple of the rows' length {seq_len}")
    rows_per_step = batch_tokens // seq_len
    if rows_per_step % (dp * rows_per_micro):
        fail(f"a step of {rows_per_step} rows does not divide across {dp} data-parallel group(s) x {rows_per_micro} "
             f"row(s) per micro-batch; choose --batch-tokens as a multiple of {dp * rows_per_micro * seq_len}")
    return Batch(seq_len, rows_per_step, rows_per_micro, dp, dp_rank)


def step_micro_rows(data, stream: list[tuple[int, int]], costs, batch: Batch) -> list[list[dict]]:
    """This data-parallel group's rows of one step, micro-batch by micro-batch. `stream` holds the step's
    (epoch, row index) pairs, the same on every rank; plan_step deals them by attention cost (`costs[row]`), and
    each row read from `data` carries its epoch (PoSE draws its positions from it)."""
    plan = plan_step(list(range(len(stream))), [int(costs[r]) for _, r in stream], batch.dp, batch.rows_per_micro)
    micro_rows = []
    for positions in plan[batch.dp_rank]:
        rows = data.rows([stream[i][1] for i in positions])
        for i, row in zip(positions, rows):
            row["epoch"] = stream[i][0]
        micro_rows.append(rows)
    return micro_rows


def starting_step(args, resume_from: Path | None, model, optimizer, metrics_path: Path,
                  keep_optimizer: bool = False) -> int:
    """The step training starts from: a resumed checkpoint's (model, optimizer, RNG), else 0, from --init-from's
    weights when given (and its optimizer state with `keep_optimizer`). Collective."""
    if resume_from is not None:
        return resume_checkpoint(resume_from, model, optimizer, metrics_path)
    if args.init_from:
        load_checkpoint(args.init_from, model, optimizer if keep_optimizer else None, restore_rng=False,
                        verified=True)
        kept = "weights + optimizer state" if keep_optimizer else "weights"
        afresh = "step, schedule and data position" if keep_optimizer else "optimizer, step, schedule and data position"
        print0(f"initialised from {args.init_from} ({kept}); {afresh} start afresh")
    return 0


def describe_run(stage: str, dinfo: DistInfo, dtype: torch.dtype, config, params: dict, stage_lines: list[str],
                 batch: Batch, max_steps: int, warmup: int, args, num_rows: int) -> None:
    """What a training stage prints before its first step: processes and model, the stage's own lines (data,
    attention, kernels), the batch and the schedule."""
    device = dinfo.device
    print0(f"{stage}: {dinfo.world_size} rank(s) on {device.type} ({dinfo.backend}), compute {str(dtype)[6:]}, "
           f"{params['total'] / 1e6:.1f}M parameters ({config.model_type}, {config.num_hidden_layers} layers)")
    for line in stage_lines:
        print0(line)
    print0(f"batch: {batch.tokens:,} tokens/step = {batch.rows_per_step} rows x {batch.seq_len:,} tokens; "
           f"{batch.rows_per_micro} row(s)/micro-batch x {batch.dp} data-parallel group(s) x {batch.grad_accum} "
           "accumulation step(s)")
    print0(f"schedule: {max_steps} steps ({max_steps * batch.tokens / 1e9:.3g}B tokens), lr {args.lr:g}, warmup "
           f"{warmup}, cosine to {args.min_lr_ratio:g}x; data: {num_rows} rows "
           f"({max_steps * batch.rows_per_step / num_rows:.2f} epochs)")
    if peak_flops(device) is None:
        print0("MFU: n/a (no peak FLOP/s known for this device)")


def final_loss(metrics_path: Path) -> float | None:
    """The loss of the last record in metrics.jsonl (rank 0; None elsewhere), for the export's manifest."""
    if process_rank() != 0 or not metrics_path.is_file():
        return None
    return json.loads(metrics_path.read_text().splitlines()[-1]).get("loss")


class Bookkeeping:
    """Everything around a training step of 03 and 04 that is not the step itself.

    Created as the loop starts: it installs the stop-signal handlers, runs the first probe of a fresh run (the
    short-context alarm's reference, step 0 of metrics.jsonl) and opens the progress bar. Within a step,
    `all_reduce` sums the step's losses over the ranks together with a stop flag, and `check_finite` stops before
    a non-finite update. After the optimizer step, ONE call, `after_step`, does the rest in order: the metrics
    record, the probes when due, metrics.jsonl and the status line, the tracker, the progress bar, the checkpoint
    when due, and the end of a run stopped by a signal. The tracker (tracking.py) and the probe monitor
    (probes.py, or None) are built by the stage; anything with their `log` / `close` and `due` / `run` /
    `run_first` methods works."""

    def __init__(self, args, out: Path, model, optimizer, signature: dict, signals: StopSignals, tracker, monitor,
                 start_step: int, device: torch.device, world: int):
        self.args = args
        self.model = model
        self.optimizer = optimizer
        self.signature = signature  # what --resume must match; it holds the schedule a checkpoint records
        self.max_steps = signature["max_steps"]
        self.signals = signals
        self.tracker = tracker
        self.monitor = monitor
        self.start_step = start_step
        self.device = device
        self.world = world
        self.peak = peak_flops(device)
        self.metrics_path = out / "metrics.jsonl"
        self.ckpt_root = out / "checkpoints"
        self.step_times: list[float] = []  # the steps after the first (warm-up) give the ETA
        signals.install()
        if monitor is not None and start_step == 0:
            monitor.run_first(model, self.metrics_path, tracker)
        self.bar = progress_bar(self.max_steps, start_step)

    def trainer_state(self, done: int) -> dict:
        """What a checkpoint records besides model, optimizer and RNG: the data position and the schedule."""
        s = self.signature
        return {"signature": s, "step": done, "rows_consumed": done * s["rows_per_step"],
                "max_steps": s["max_steps"], "warmup_steps": s["warmup_steps"], "lr": s["lr"]}

    def all_reduce(self, sums: torch.Tensor) -> tuple[list[float], bool]:
        """reduce_step: the step's summed losses over all ranks, and whether any rank received a stop signal."""
        if self.args.debug_sleep:  # tests: a signal sent during the sleep stops this very step
            time.sleep(self.args.debug_sleep)
        return reduce_step(sums, self.signals)

    def check_finite(self, loss: float, grad_norm: float, done: int) -> None:
        check_finite(loss, grad_norm, done, self.ckpt_root, self.bar)

    def after_step(self, done: int, t0: float, stop: bool, *, loss: float, grad_norm: float, lr: float,
                   valid_tokens: int, tokens: int, flops: dict, **extra) -> int | None:
        """Record step `done` (begun at perf_counter() `t0`): step_record's fields, then the stage's `extra`
        ones (03 and 04: attn_paths; 03 under --cp: cp_methods; 04 with a teacher: ce and kl), then the probe
        results when one is due. Then write, log, advance the bar and checkpoint. Returns None to go on, or the
        exit code of a run stopped by a signal (its checkpoint saved). Collective."""
        dt = time.perf_counter() - t0
        if done - 1 > self.start_step:
            self.step_times.append(dt)
        record = step_record(done, self.max_steps, loss=loss, grad_norm=grad_norm, lr=lr,
                             valid_tokens=valid_tokens, tokens=tokens, flops=flops, dt=dt,
                             step_times=self.step_times, world=self.world, peak=self.peak, device=self.device)
        record.update(extra)
        if self.monitor is not None and self.monitor.due(done):
            record.update(self.monitor.run(done, self.model))
        write_step(self.metrics_path, record, self.max_steps, self.args.log_every, self.device)
        self.tracker.log(record)
        self.bar.update(1)
        save_if_due(self.ckpt_root, done, self.max_steps, stop, self.args, self.model, self.optimizer,
                    self.trainer_state)
        if stop:
            self.tracker.close()
            return stop_on_signal(self.signals, self.bar, done)
        return None

    def close(self) -> None:
        self.bar.close()
        self.tracker.close()
