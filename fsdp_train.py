"""FSDP2 training machinery for long packed rows: the pieces 03 (continued pretraining) and 04 (SFT) compose.

Each stage keeps its own loop, readable top to bottom; this module holds what both use, torchtitan's way:
- processes: torchrun's group (nccl on CUDA, gloo on CPU) or a 1-rank group for a plain `python` run, so the same
  FSDP2 code runs everywhere; a deterministic epoch-wise row order and a step's rows dealt to ranks by cost;
- the model: built on the meta device, Liger kernels, per-layer activation checkpointing, FSDP2 (a unit per
  layer plus the root; bf16 compute, fp32 master weights and reduction), each rank reading only its shard of
  the safetensors weights, or a deterministic random init of any shape;
- the loss: summed token cross-entropy from hidden states and the lm_head weight, never logits for the whole
  row (chunked and checkpointed, or Liger's fused linear cross-entropy), inside the root FSDP forward, divided
  by the step's GLOBAL count of valid targets: every token weighs the same, whatever its rank or micro-batch;
- AdamW (no weight decay on 1-D parameters), warmup then cosine to a minimum LR, clipping of sharded gradients;
- sharded atomic checkpoints loadable at any world size, the run directory and its resume rules, SIGTERM /
  SIGUSR1, metrics with two MFU conventions, and the export to an ordinary Hugging Face directory.

A training step (03_continued_pretrain.py shows the whole composition):

    dinfo, mesh = setup_distributed(device)                  # torchrun's group, or a 1-rank group
    model, info = prepare_model(config, weights_dir, mesh, ModelOptions(device, torch.bfloat16, liger=True,
                                attn_implementation=varlen_attention.register_attention()))
    optimizer = build_optimizer(model, lr)
    n = global_count(sum(mb.n_valid for mb in micro_batches), device)     # before any backward of the step
    for mb in micro_batches:
        (forward_loss(model, mb, ce_loss_fn(mb.targets, "liger")) / n).backward()
    clip_grad_norm(model, 1.0); optimizer.step(); optimizer.zero_grad()

Outside this repository (copy this file and common.py) the same lines train any Hugging Face causal LM; a
micro-batch is any object with input_ids, position_ids, targets (-100: no loss) and `attention_kwargs()`
(varlen_attention.MicroBatch, or yours returning {}). For a distillation term (04), `loss_fn(hidden, lm_head_weight)`
may add a KL term chunk by chunk with `chunked_token_loss(..., chunk_loss=fn, extra=[teacher_hidden])`.
"""
from __future__ import annotations

import functools
import json
import math
import os
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
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (IGNORE_INDEX, append_jsonl, atomic_output_dir, atomic_write_text, fail, init_distributed, jsonable,
                    load_tokenizer, print0, versions, write_manifest)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype / --export-dtype names

# -------------------------------------------------------------------------------------------------------------
# Processes (torchrun's group, or a 1-rank group: the same FSDP2 code everywhere) and the order of the rows.


def setup_distributed(device: str | None = None):
    """Join torchrun's process group, or create a 1-process group for a plain `python script.py` run.
    Returns (DistInfo, DeviceMesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    info = init_distributed(device)
    if not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        info.backend = backend
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    return info, mesh


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
            fail(f"--model {directory} has no model.safetensors (nor an index); save the model with safetensors")
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
# Optimizer, schedule, clipping.


def build_optimizer(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; no weight decay on 1-D parameters (norm weights, biases), as HF Trainer and ProLong."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True if on_cuda else None,
                             foreach=None if on_cuda else False)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup (step 1 of warmup gets 1/warmup) then cosine from 1 to min_lr_ratio at the last step
    (ProLong's min_lr_bound: mult = min + (1 - min) * cos_mult). `step` counts from 0 within the stage."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
# every rank has finished: a checkpoint directory is either complete or absent.

CKPT_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def read_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
        fail(f"{path} is not a complete longctx checkpoint (no {TRAINER_STATE} or DCP .metadata)")
    with open(path / TRAINER_STATE) as f:
        return json.load(f)


def _rng_state() -> dict:
    """Every generator's state as tensors and numbers only, so that loading it needs no pickle."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                          has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Sharded checkpoint at root/step_XXXXXXXX (model, optimizer, per-rank RNG, trainer_state.json with step,
    data position and schedule). Atomic: written under a temporary name, renamed once all ranks are done.
    Keeps the last `keep` checkpoints (0 = keep all). Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                     saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(jsonable(state), indent=2) + "\n")
        old = root / f".old-step_{step:08d}"  # the same step saved again (a signal right after a periodic save)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep and keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, restore_rng: bool = True) -> dict:
    """Load model (and optimizer, when given) state from a checkpoint written by save_checkpoint, resharding to
    the current world size. Returns its trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = read_trainer_state(path)
    sd = _state_dicts(model, optimizer)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng_rank{rank}.pt"
    if restore_rng and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


class StopSignals:
    """SIGTERM / SIGUSR1 (cluster preemption) set a flag; the loop saves a checkpoint at the end of the step."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners): no handler
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)


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


def open_run_dir(args, out: Path, signature: dict, stage: str) -> Path | None:
    """Check --out against --resume / --overwrite / --init-from on every rank before anything is written, then
    create it with run.json. Returns the checkpoint to resume from, or None. `--resume auto` resumes OUT's latest
    checkpoint or starts afresh: one command line serves the first launch and every relaunch."""
    ckpt_root, run_file = out / "checkpoints", out / "run.json"
    resume_from = None
    holds_run = out.is_dir() and any(out.iterdir())
    if holds_run and not args.overwrite:
        if not args.resume:
            fail(f"--out {out} already holds a run ({len(list_checkpoints(ckpt_root))} checkpoint(s)); pass "
                 "--resume auto to continue it, --overwrite to replace it, or choose another --out")
        if not run_file.is_file():
            fail(f"--out {out} is not empty and holds no longctx run (no run.json); choose another --out")
        with open(run_file) as f:
            diff = signature_diff(json.load(f)["signature"], signature)
        if diff:
            fail(f"cannot resume the run in {out}: its settings differ ({'; '.join(diff)}); start a new stage "
                 "with --init-from CHECKPOINT and another --out")
    if args.resume == "auto":
        found = list_checkpoints(ckpt_root) if holds_run and not args.overwrite else []
        resume_from = found[-1] if found else None
        if args.init_from:
            print0(f"--resume auto: resuming {resume_from} (--init-from is not loaded)" if resume_from else
                   f"--resume auto: no checkpoint in {out} yet; starting from --init-from {args.init_from}")
    elif args.resume:
        resume_from = Path(args.resume)
        diff = signature_diff(read_trainer_state(resume_from).get("signature", {}), signature)
        if diff:
            fail(f"checkpoint {resume_from} is incompatible with this run ({'; '.join(diff)})")
    if args.init_from and resume_from is None:
        diff = signature_diff(read_trainer_state(args.init_from).get("signature", {}).get("model", {}),
                              signature["model"])
        if diff:
            fail(f"--init-from {args.init_from} holds another model shape ({'; '.join(diff)})")
    barrier()  # every rank has checked before rank 0 touches --out
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None and (out / "metrics.jsonl").is_file():  # a start before any checkpoint: redo
            (out / "metrics.jsonl").unlink()
        if not run_file.is_file():
            atomic_write_text(run_file, json.dumps(jsonable(
                {"stage": stage, "signature": signature, "args": vars(args), "versions": versions()}),
                indent=2) + "\n")
    barrier()
    return resume_from


def resume_checkpoint(path: Path, model, optimizer, metrics_path: Path) -> int:
    """Load a checkpoint of this run (model, optimizer, RNG) and return its step. Records of later steps (a hard
    kill leaves them) are dropped from metrics.jsonl: the resumed run writes them again."""
    step = int(load_checkpoint(path, model, optimizer)["step"])
    if (dist.get_rank() if dist.is_initialized() else 0) == 0 and metrics_path.is_file():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
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
    if bar is not None:
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
    """End a run stopped by SIGTERM / SIGUSR1 once its checkpoint is saved: close the bar, restore the handlers,
    and return 128 + signum, the exit code of death by that signal, so a scheduler sees a preemption."""
    bar.close()
    signum = signals.received or 15
    print0(f"stopped by signal {signum} after step {done}; checkpoint saved, continue with --resume auto")
    signals.restore()
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
    L = config.num_hidden_layers
    H = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    n = params["non_embedding"]
    return {"torchtitan": n_tokens * (6 * n + 12 * L * H * d * seq_len),
            "causal_doc": 6 * n * n_tokens + 12 * L * H * d * attn_sq / 2}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def progress_bar(total: int, initial: int):
    """tqdm on stderr, rank 0 only, so that stdout holds just the log lines."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=(dist.get_rank() if dist.is_initialized() else 0) != 0,
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
    if (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return
    append_jsonl(metrics_path, record)
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
# Export: an ordinary Hugging Face directory (safetensors, config.json, tokenizer).


def config_dtype(config) -> torch.dtype | None:
    """The dtype the input model's config declares (None for a random init or an unusual one). Read it before
    prepare_model, which turns the model into fp32 master weights."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def export_dtype(flag: str, source: torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """OUT/final's dtype: --export-dtype, or for "auto" the input model's own dtype (a fine-tuned model ships as
    it came), else the compute dtype."""
    return DTYPES[flag] if flag != "auto" else (source or compute)


def export_config_dict(config, model_dir: str | None, dtype: torch.dtype) -> dict:
    """config.json for the export: the model directory's own config.json (rope parameters exactly as 02 wrote
    them) when there is one, else the config's own dict; the dtype set to the export's."""
    dtype_name = str(dtype).replace("torch.", "")
    src = Path(model_dir) / "config.json" if model_dir else None
    if src is not None and src.is_file():
        with open(src) as f:
            d = json.load(f)
    else:
        d = config.to_dict()
        d.pop("_attn_implementation", None)
    d.pop("attn_implementation", None)
    d.pop("_attn_implementation_autoset", None)
    d["dtype"] = dtype_name
    if "torch_dtype" in d:
        d["torch_dtype"] = dtype_name
    return d


def gather_full_state_dict(model, dtype: torch.dtype) -> dict:
    """Full tensors on rank 0 (CPU, `dtype`), gathered one parameter at a time (collective; other ranks get {})."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            out[name] = full.detach().to("cpu", dtype=dtype if full.is_floating_point() else full.dtype).clone()
    return out


def save_safetensors(state: dict, out: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name in sorted(state):
        t = state[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def export_hf(model, config, out: str | os.PathLike, dtype: torch.dtype, model_dir: str | None,
              tokenizer_dir: str | None, manifest: dict, rewrite_config: Callable[[dict], dict] = dict) -> Path:
    """Write `out` as an HF model directory that transformers, 04, 05 and vLLM load as is. Collective.
    `rewrite_config` edits config.json on its way out (03/04: rope.both_forms, for transformers 4.x readers)."""
    state = gather_full_state_dict(model, dtype)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out)
    if rank == 0:
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        with atomic_output_dir(out, overwrite=True) as tmp:
            save_safetensors(state, tmp)
            atomic_write_text(tmp / "config.json", json.dumps(
                rewrite_config(export_config_dict(config, model_dir, dtype)), indent=2, sort_keys=True) + "\n")
            if model_dir and (Path(model_dir) / "generation_config.json").is_file():
                shutil.copy(Path(model_dir) / "generation_config.json", tmp / "generation_config.json")
            if tokenizer_dir:
                tok = load_tokenizer(tokenizer_dir)
                tok.save_pretrained(str(tmp))
            write_manifest(tmp, manifest.pop("stage"), manifest.pop("args"), **manifest)
    barrier()
    return out
