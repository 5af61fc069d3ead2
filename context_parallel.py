"""Context parallelism: one packed row split over the N GPUs of a group, for rows one GPU cannot hold.

Each row is split over the N ranks of a cp group (03's --cp N), for rows whose activations do
not fit one GPU (ProLong 512K, UltraLong 1M-4M). The ranks form a 2-D DeviceMesh ("dp", "cp"), cp innermost, so
a cp group is N consecutive ranks (one node: NVLink). FSDP2 still shards over ALL ranks (torchtitan's
"dp_shard_cp"): the cp ranks hold the same parameters, and the one reduce-scatter that sums gradients over the
data-parallel ranks also sums the cp ranks' partial gradients (sharding over dp only would leave an 8B model
replicated 8x at cp 8: 128 GB of weights, gradients and Adam state per GPU). The data order is planned over the
dp groups; every rank of a cp group builds the same micro-batch (targets, positions, segments of the whole row),
then keeps its own tokens, so the first-token-of-document rule, RoPE positions and the step's global count of
valid targets are exactly those of cp = 1.

Attention of a split row, chosen per micro-batch; every method is exact:
- "ulysses" (document-masked rows, ProLong): contiguous slices; an all-to-all turns [T/N tokens, all heads] into
  [T tokens, heads/N], the ordinary varlen attention runs over the whole row, an all-to-all turns it back.
  Needs the query heads divisible by N; KV heads are repeated up to lcm(H_kv, N) when N does not divide them.
- "local" (ProLong's shortcut): when every slice boundary is a document boundary, each rank attends to its own
  tokens without any collective. ProLong takes it whenever the longest document fits a slice, which truncates the
  documents that straddle a boundary; here it is taken only when none does.
- "torch_ring" (unmasked rows, UltraLong, CUDA): PyTorch's context_parallel (ring attention dispatched from
  SDPA; head-tail load balancing: of 2N chunks rank r holds r and 2N-1-r), entered around forward + backward.
- "allgather" (the ring on CPU/gloo and for masked rows): the same head-tail slices; K and V are all-gathered
  (backward: a reduce-scatter) and each local chunk attends to the prefix it needs with per-document,
  bottom-right-aligned causal varlen attention (ring-flash-attn's "llama3" form). PyTorch's ring cannot run on
  a CPU: its SDPA dispatch covers only the CUDA flash / efficient / cuDNN kernels.
Micro-batches are padded at the end to a multiple of N (Ulysses) or 2N (ring) tokens: a padding segment with
no targets, which no real token attends to.

Used by 03_continued_pretrain.py (--cp N) and bench/bench_train.py. It builds on varlen_attention.py (the
micro-batch and the per-document kernels) and plugs into it through the micro-batch's `cp` plan: the registered
attention calls `plan.attention(q, k, v, scale)` when the row is split.

Outside this repository (copy this file, varlen_attention.py and common.py), under torchrun:

    import context_parallel as cpar, varlen_attention as va
    cp = cpar.setup_context_parallel(4, model.config, device, doc_mask=True)  # a dp x cp mesh; shard over all ranks
    mb = cpar.shard_micro_batch(va.build_micro_batch(rows, seq_len), cp).to(device)   # this rank's tokens
    with cpar.cp_context(mb):                       # PyTorch's ring for unmasked rows on CUDA; else a no-op
        hidden = va.forward_hidden(model, mb)       # the loss of these tokens, summed, divided by the global count
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import IGNORE_INDEX, fail
from varlen_attention import MicroBatch, reference_varlen_attention, varlen_attention

CP_ATTENTION = ("auto", "ulysses", "ring")
CP_RING_IMPL = ("auto", "torch", "allgather")


@dataclass
class CPGroup:
    """This rank's place in the ("dp", "cp") mesh and how rows are split (made by setup_context_parallel)."""
    size: int = 1  # N: ranks sharing a row
    rank: int = 0  # this rank's index in its cp group
    dp_size: int = 1  # data-parallel groups (world / N): they read different rows
    dp_rank: int = 0
    attention: str = "none"  # "ulysses" | "ring" ("none" when size == 1)
    ring_impl: str = ""  # ring: "torch" (PyTorch's context_parallel, CUDA) | "allgather"
    kv_repeat: int = 1  # ulysses: each KV head repeated this many times so that N divides the KV heads
    group: Any = None  # the cp process group
    mesh: Any = None  # the 1-D "cp" DeviceMesh

    @property
    def multiple(self) -> int:
        """Micro-batches are padded to a multiple of this many tokens: N slices, or 2N head-tail chunks."""
        return self.size * (2 if self.attention == "ring" else 1)

    def tokens_per_rank(self, micro_tokens: int) -> int:
        """The tokens each rank holds of a micro-batch of `micro_tokens`, once padded to `multiple`."""
        return -(-micro_tokens // self.multiple) * self.multiple // self.size

    def describe(self) -> str:
        if self.size == 1:
            return "off"
        if self.attention == "ulysses":
            how = "Ulysses all-to-all over heads" + (f", KV heads repeated x{self.kv_repeat}" if self.kv_repeat > 1
                                                      else "")
        elif self.ring_impl == "torch":
            how = "ring attention, PyTorch context_parallel (SDPA ring, head-tail load balance)"
        else:
            how = "ring attention by all-gathered KV (exact, head-tail load balance)"
        return (f"{self.size} ranks per row ({how}; ProLong's local shortcut where no document straddles a slice), "
                f"{self.dp_size} data-parallel group(s)")


@dataclass
class CPPiece:
    """One contiguous piece of this rank's tokens, for the all-gather attention: its queries sit at
    [q_start, q_start + q_len) of the local tokens and read the keys [k_start, k_end) of the whole row."""
    q_start: int
    q_len: int
    k_start: int
    k_end: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    seg_q: list[int]
    seg_k: list[int]


@dataclass
class CPAttention:
    """How one micro-batch's attention runs over a cp group (made by shard_micro_batch, read by cp_attention)."""
    method: str  # "local" | "ulysses" | "allgather" | "torch_ring"
    group: Any
    size: int
    rank: int
    kv_repeat: int = 1
    cu: torch.Tensor | None = None  # ulysses: the whole row's cu_seqlens; local: this rank's
    max_len: int = 0
    seg_lens: list[int] = field(default_factory=list)
    pieces: list[CPPiece] = field(default_factory=list)  # allgather
    gather_index: torch.Tensor | None = None  # allgather: row position -> position in the all-gathered tensor
    mesh: Any = None  # torch_ring: the cp DeviceMesh
    row: tuple = ()  # torch_ring: the whole row's (input_ids, position_ids, targets) [1, T], for context_parallel

    def attention(self, q, k, v, scale: float | None) -> torch.Tensor:
        """The hook varlen_attention's registered attention calls for a split row."""
        return cp_attention(q, k, v, self, scale)

    def to(self, device, mv: Callable | None = None) -> "CPAttention":
        from dataclasses import replace

        mv = mv or (lambda t: t.to(device))
        opt = lambda t: None if t is None else mv(t)  # noqa: E731
        return replace(self, cu=opt(self.cu), gather_index=opt(self.gather_index), row=tuple(mv(t) for t in self.row),
                       pieces=[replace(p, cu_q=mv(p.cu_q), cu_k=mv(p.cu_k)) for p in self.pieces])


def setup_context_parallel(cp: int, config, device: torch.device, doc_mask: bool = True, attention: str = "auto",
                           ring_impl: str = "auto", rows_per_micro: int = 1) -> CPGroup:
    """Validate --cp against the world size and the model's heads, build the ("dp", "cp") DeviceMesh and return
    this rank's CPGroup. Collective (all ranks call it with the same arguments); fails with one clear line."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cp < 1:
        fail(f"--cp {cp}: the number of ranks sharing a row must be at least 1")
    if cp == 1:
        return CPGroup(dp_size=world, dp_rank=rank)
    # the model and flag checks first (they fail the same way at any world size), then the world size
    if attention not in CP_ATTENTION or ring_impl not in CP_RING_IMPL:
        raise ValueError(f"unknown cp attention {attention!r} / ring implementation {ring_impl!r}")
    attention = ("ulysses" if doc_mask else "ring") if attention == "auto" else attention
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    kv_repeat = 1
    if attention == "ulysses":
        if hq % cp:
            fail(f"--cp {cp} with Ulysses attention splits the model's {hq} query heads over {cp} ranks, and {cp} "
                 f"does not divide {hq}; choose a --cp that divides {hq}, or --cp-attention ring (any head count)")
        kv_repeat = math.lcm(hkv, cp) // hkv
        ring_impl = ""
    else:
        torch_ok = device.type == "cuda" and not doc_mask and rows_per_micro == 1
        if ring_impl == "torch" and not torch_ok:
            why = ("runs on CUDA only" if device.type != "cuda" else
                   "is causal over the whole row and cannot mask documents (use --no-doc-mask, or "
                   "--cp-ring-impl allgather)" if doc_mask else
                   "is causal over the whole flattened micro-batch: give one row per micro-batch "
                   "(--micro-batch-tokens = the rows' length)")
            fail(f"--cp-ring-impl torch: PyTorch's context_parallel ring attention {why}")
        if ring_impl == "auto":
            ring_impl = "torch" if torch_ok else "allgather"
    if world % cp:
        fail(f"--cp {cp} does not divide the world size {world}: the ranks must form whole groups of {cp}; launch a "
             f"multiple of {cp} processes (torchrun --nproc_per_node / --nnodes) or choose a --cp that divides {world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    cp_mesh = mesh["cp"]
    return CPGroup(size=cp, rank=cp_mesh.get_local_rank(), dp_size=world // cp, dp_rank=mesh.get_local_rank("dp"),
                   attention=attention, ring_impl=ring_impl, kv_repeat=kv_repeat, group=cp_mesh.get_group(),
                   mesh=cp_mesh)


def cp_layout(total: int, size: int, rank: int, head_tail: bool) -> list[tuple[int, int]]:
    """The pieces [start, end) of a row of `total` tokens that rank `rank` of a cp group of `size` holds:
    one contiguous slice (Ulysses), or chunks rank and 2*size-1-rank of 2*size (head-tail, ring)."""
    if not head_tail:
        n = total // size
        return [(rank * n, (rank + 1) * n)]
    c = total // (2 * size)
    return [(rank * c, (rank + 1) * c), ((2 * size - 1 - rank) * c, (2 * size - rank) * c)]


def _clip_segments(bounds: np.ndarray, start: int, end: int) -> tuple[list[int], list[int], int]:
    """For the segments (boundaries `bounds`) that meet [start, end): their query counts inside it, their key counts
    from each segment's own start up to min(its end, end), and the start of the first of them."""
    i = int(np.searchsorted(bounds, start, side="right")) - 1
    first, seg_q, seg_k = int(bounds[i]), [], []
    while i < len(bounds) - 1 and bounds[i] < end:
        a, b = int(bounds[i]), int(bounds[i + 1])
        seg_q.append(min(b, end) - max(a, start))
        seg_k.append(min(b, end) - a)
        i += 1
    return seg_q, seg_k, first


def _cu(lens: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))


def shard_micro_batch(mb: MicroBatch, cp: CPGroup, pad_id: int = 0) -> MicroBatch:
    """This rank's share of a micro-batch split over its cp group (`mb` itself when cp.size == 1). Every rank of
    the group passes the same micro-batch, built on the CPU. The result holds this rank's tokens (ids, positions,
    targets, n_valid counted over them) and, in `.cp`, how its attention runs; its cu_seqlens / seg_lens are the
    segments of the local tokens as they lie (attn_sq stays the whole micro-batch's)."""
    from dataclasses import replace

    if cp.size == 1:
        return mb
    ids, pos, tgt, segs = mb.input_ids[0], mb.position_ids[0], mb.targets[0], list(mb.seg_lens)
    pad = -ids.numel() % cp.multiple
    if pad:  # a trailing padding segment: no targets, attended by no real token, positions continuing
        ids = torch.cat([ids, ids.new_full((pad,), pad_id)])
        pos = torch.cat([pos, pos[-1] + 1 + torch.arange(pad, dtype=pos.dtype)])
        tgt = torch.cat([tgt, tgt.new_full((pad,), IGNORE_INDEX)])
        segs.append(pad)
    total, head_tail = ids.numel(), cp.attention == "ring"
    bounds = np.concatenate([[0], np.cumsum(segs)])
    pieces = cp_layout(total, cp.size, cp.rank, head_tail)
    index = torch.cat([torch.arange(s, e) for s, e in pieces])
    local_segs = [n for s, e in pieces for n in _clip_segments(bounds, s, e)[0]]
    plan = CPAttention("local", cp.group, cp.size, cp.rank, cu=_cu(local_segs), max_len=max(local_segs),
                       seg_lens=local_segs)
    aligned = set(range(0, total + 1, total // cp.multiple)) <= set(bounds.tolist())
    if aligned:
        pass
    elif cp.attention == "ulysses":
        plan = replace(plan, method="ulysses", kv_repeat=cp.kv_repeat, cu=_cu(segs), max_len=max(segs), seg_lens=segs)
    elif cp.ring_impl == "torch" and bool((tgt[segs[0]:] == IGNORE_INDEX).all()):
        # exact: every target lies in the first segment, and causal attention over the whole row gives the first
        # segment's tokens exactly their own prefix (what follows has no target and is seen by nothing that has)
        plan = replace(plan, method="torch_ring", mesh=cp.mesh,
                       row=(ids.clone().view(1, -1), pos.clone().view(1, -1), tgt.clone().view(1, -1)))
    else:
        order = torch.cat([torch.arange(s, e) for r in range(cp.size) for s, e in cp_layout(total, cp.size, r, True)])
        gather_index = torch.empty_like(order)
        gather_index[order] = torch.arange(total)
        parts, q0 = [], 0
        for s, e in pieces:
            seg_q, seg_k, first = _clip_segments(bounds, s, e)
            parts.append(CPPiece(q0, e - s, first, e, _cu(seg_q), _cu(seg_k), max(seg_q), max(seg_k), seg_q, seg_k))
            q0 += e - s
        plan = replace(plan, method="allgather", pieces=parts, gather_index=gather_index)
    local_tgt = tgt[index]
    return MicroBatch(ids[index].view(1, -1), pos[index].view(1, -1), local_tgt.view(1, -1), _cu(local_segs),
                      max(local_segs), local_segs, n_tokens=index.numel(),
                      n_valid=int((local_tgt != IGNORE_INDEX).sum()), attn_sq=mb.attn_sq, row_ids=mb.row_ids, cp=plan)


@contextlib.contextmanager
def cp_context(mb: MicroBatch):
    """Wrap a micro-batch's forward AND backward: enters PyTorch's context_parallel when the micro-batch uses its
    ring (it patches SDPA and must stay active for the backward); a no-op otherwise. PyTorch shards the whole
    row's buffers with its own head-tail balancer; they must equal the local tokens shard_micro_batch chose."""
    plan = mb.cp
    if plan is None or plan.method != "torch_ring":
        yield mb
        return
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [t.clone() for t in plan.row]
    with context_parallel(plan.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
        if not all(torch.equal(b, t) for b, t in zip(buffers, (mb.input_ids, mb.position_ids, mb.targets))):
            raise RuntimeError("PyTorch's context_parallel split the row differently from longctx's head-tail "
                               "layout (rank r: chunks r and 2N-1-r); refusing to train on mismatched tokens")
        yield mb


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single over dim 0 in equal blocks; its gradient is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # an incoming gradient may have any strides; the collective reads raw memory
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _ulysses_attention(q, k, v, plan: CPAttention, scale):
    n, (t_local, hq, d) = plan.size, q.shape
    if plan.kv_repeat > 1:  # N does not divide the KV heads: repeat them (GQA grouping is preserved)
        k, v = k.repeat_interleave(plan.kv_repeat, dim=1), v.repeat_interleave(plan.kv_repeat, dim=1)
    hk = k.shape[1]
    # [t, H, D] -> [N, t, H/N, D]: head group j goes to rank j; q, k and v travel in one all-to-all
    x = torch.cat([z.reshape(t_local, n, z.shape[1] // n, d) for z in (q, k, v)], dim=2).transpose(0, 1)
    x = _AllToAll.apply(x.contiguous(), plan.group).reshape(n * t_local, -1, d)  # the whole row, my heads
    qh, kh, vh = (z.contiguous() for z in x.split([hq // n, hk // n, hk // n], dim=1))
    out = varlen_attention(qh, kh, vh, plan.cu, plan.max_len, plan.seg_lens, scale)
    out = _AllToAll.apply(out.reshape(n, t_local, hq // n, d), plan.group)  # back: my tokens, head group j from j
    return out.transpose(0, 1).reshape(t_local, hq, d)


def _allgather_attention(q, k, v, plan: CPAttention, scale):
    hkv = k.shape[1]
    kv = torch.cat([k, v], dim=1)
    # all-gather = an all-to-all of N copies (gloo and nccl both have it); the backward sums the copies' gradients
    full = _AllToAll.apply(kv.unsqueeze(0).expand(plan.size, *kv.shape).contiguous(), plan.group).flatten(0, 1)
    full = full.index_select(0, plan.gather_index)  # rank-major -> row order
    outs = []
    for p in plan.pieces:
        ks, vs = (z.contiguous() for z in full[p.k_start:p.k_end].split(hkv, dim=1))
        outs.append(varlen_attention(q[p.q_start:p.q_start + p.q_len].contiguous(), ks, vs, p.cu_q, p.max_q,
                                     p.seg_q, scale, cu_seqlens_k=p.cu_k, max_len_k=p.max_k, seg_lens_k=p.seg_k))
    return torch.cat(outs, dim=0)


def _torch_ring_attention(q, k, v, scale):
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # the ring's SDPA kernels take equal head counts
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    q, k, v = (z.transpose(0, 1).unsqueeze(0) for z in (q, k, v))  # [1, H, t, D]
    # F.scaled_dot_product_attention is looked up at call time: inside cp_context it is PyTorch's ring
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def cp_attention(q, k, v, plan: CPAttention, scale: float | None) -> torch.Tensor:
    """Causal per-document attention of this rank's tokens of a row split over a cp group (collective over the
    group, except "local"). q [t, Hq, D], k/v [t, Hkv, D] -> [t, Hq, D], t = this rank's token count."""
    if plan.method == "local":
        return varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan.cu, plan.max_len, plan.seg_lens,
                                scale)
    if plan.method == "ulysses":
        return _ulysses_attention(q, k, v, plan, scale)
    if plan.method == "allgather":
        return _allgather_attention(q, k, v, plan, scale)
    if plan.method == "torch_ring":
        return _torch_ring_attention(q, k, v, scale)
    raise ValueError(f"unknown cp attention method {plan.method!r}")


def _probe_micro_batch(segs: list[int]) -> MicroBatch:
    """A row of len sum(segs): position i is token i, next-token targets inside each segment."""
    n = sum(segs)
    ids = torch.arange(n).view(1, -1)
    tgt = ids.roll(-1, dims=1)
    tgt[0, torch.from_numpy(np.cumsum(segs) - 1)] = IGNORE_INDEX
    return MicroBatch(ids, ids.clone(), tgt, _cu(segs), max(segs), list(segs), n, int((tgt != IGNORE_INDEX).sum()), 0)


def check_cp_attention(cp: CPGroup, device: torch.device, dtype: torch.dtype, config, seed: int = 0) -> str:
    """Start-up probe of the split attention on this device, dtype and head layout: for a row whose documents
    straddle the slices, a row that is one document, and a row whose documents align with the slices (ProLong's
    shortcut), this rank's outputs must equal its rows of the exact per-document reference on the whole row.
    Collective over the cp group; raises if any disagrees. Returns the methods probed and the largest error."""
    if cp.size == 1:
        return "off"
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    m = cp.multiple
    total = 4 * m
    g = torch.Generator().manual_seed(seed)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    worst, methods = 0.0, []
    for segs in ([1, m + 3, total - m - 4], [total], [total // m] * m):
        q = torch.randn(total, hq, 16, generator=g)
        k, v = torch.randn(total, hkv, 16, generator=g), torch.randn(total, hkv, 16, generator=g)
        ref = reference_varlen_attention(q, k, v, segs, 0.25)
        local = shard_micro_batch(_probe_micro_batch(segs), cp).to(device)
        idx = local.position_ids[0].cpu()  # the probe row's positions are its token indices
        with torch.no_grad(), cp_context(local):
            out = cp_attention(*(z[idx].to(device, dtype) for z in (q, k, v)), local.cp, 0.25)
        err = (out.float().cpu() - ref[idx]).abs().max().item()
        methods.append(local.cp.method)
        if not err <= tol:
            raise RuntimeError(f"context-parallel attention ({local.cp.method}, documents {segs}) disagrees with the "
                               f"per-document reference on the whole row (max error {err:.2e} > {tol}); refusing "
                               "to train")
        worst = max(worst, err)
    return f"probe exact for {', '.join(dict.fromkeys(methods))} (max error {worst:.1e})"
