"""Document-masked attention for packed rows: each token attends only to earlier tokens of its own document.

Packing documents into rows keeps every token useful, but plain causal attention then lets a document read the
documents packed before it. Here a micro-batch is flattened to ONE row [1, T] with explicit document boundaries
(cu_seqlens) and one attention function, registered with transformers, attends inside those boundaries only.
It takes one of two paths per micro-batch:
- dense causal: when every row of the micro-batch is one causal span (a single document, or any row under
  --no-doc-mask), followed at most by padding at its end, the rows need no boundaries at all: PyTorch's
  `scaled_dot_product_attention(is_causal=True)` runs on them as a batch [rows, heads, seq, dim] (cuDNN or flash
  on a GPU, the flash or math kernel on a CPU). Exact for every real token: causal attention never reaches the
  padding after it, and padding is never a target;
- varlen: rows of several documents: flash-attn's varlen kernel when installed, PyTorch's `varlen_attn` on CUDA
  otherwise, an exact per-document reference on CPU.
No dense [T, T] mask is ever built. Targets never cross a boundary (the first token of a document is never
predicted from the one before it) and padding is never a target. A start-up probe (`check_attention`) proves
that the model really attends through this function, on both paths, and that nothing leaks.

Used by 03_continued_pretrain.py and 04_sft.py (training), 05_eval.py (the attention name) and
context_parallel.py, which plugs in through one hook: a micro-batch's `cp` plan, whose `attention()` runs instead
of the local kernel when a row is split over several GPUs (a split row never takes the dense path here).

Outside this repository (copy this file and common.py), in your own Hugging Face training loop:

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    import varlen_attention as va

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=va.register_attention())
    va.check_attention(model, device, dtype, model.config.vocab_size)    # once: raises if anything leaks
    row = {"index": 0, "input_ids": ids, "doc_lens": [300, 200, 524], "num_pad": 0}   # 3 documents, 1024 tokens
    mb = va.build_micro_batch([row], seq_len=1024).to(device)             # mb.attn_path: "varlen" here
    hidden = va.forward_hidden(model, mb)                                  # [1, 1024, hidden]
    loss = F.cross_entropy(model.lm_head(hidden)[0], mb.targets[0], ignore_index=-100)
    va.count_attention_paths([mb])                                         # {"dense": 0, "varlen": 1}
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from common import IGNORE_INDEX, fail

ATTN_NAME = "longctx_varlen"


def row_segments(doc_lens, num_pad: int, seq_len: int, doc_mask: bool) -> tuple[list[int], bool]:
    """Attention segments of a packed row and whether the last one is padding.

    --doc-mask: the row's doc_lens (the padding is already its own last entry); --no-doc-mask: the real tokens
    form one segment, followed by the padding segment, if any."""
    if doc_mask:
        segs = [int(x) for x in doc_lens]
    else:
        segs = [seq_len - num_pad] + ([num_pad] if num_pad else [])
    if sum(segs) != seq_len or min(segs) <= 0:
        fail(f"a data row has doc_lens {list(doc_lens)[:8]}... (num_pad {num_pad}) that do not sum to seq_len "
             f"{seq_len}; the data directory is corrupt, re-run 01_prepare_data.py")
    return segs, num_pad > 0


def pose_position_ids(n: int, target_len: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE skip-wise position ids, the official 2-chunk form (docs/rope.md#pose): chunk 1 keeps 0..rt1-1 with
    rt1 ~ U{1, floor((n+1)/2)}; chunk 2 is shifted by a skip u ~ U{0, target_len - n}, so ids stay increasing
    and the largest is at most target_len - 1."""
    if target_len < n:
        raise ValueError(f"PoSE target length {target_len} is shorter than the row ({n})")
    rt1 = int(rng.integers(1, (n + 1) // 2 + 1))
    u = int(rng.integers(0, target_len - n + 1))
    pos = np.arange(n, dtype=np.int64)
    pos[rt1:] += u
    return pos


@dataclass
class MicroBatch:
    """One micro-batch flattened to a single row [1, T] with explicit segment boundaries."""
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    targets: torch.Tensor  # [1, T] int64: targets[t] is the token predicted at t, or -100
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32
    max_len: int
    seg_lens: list[int]
    n_tokens: int
    n_valid: int
    attn_sq: int  # sum of squared lengths of non-padding segments (document-aware attention FLOPs)
    row_ids: list[int] = field(default_factory=list)
    cp: object | None = None  # context_parallel.CPAttention: this rank's share of a row split over a cp group
    dense_rows: int = 0  # > 0: T is this many equal rows, each one causal span (then padding): dense causal path

    @property
    def attn_path(self) -> str:
        """Which attention this micro-batch takes: "dense" (SDPA, causal over each row), "varlen" (document
        boundaries), or "cp" (a row split over a context-parallel group: its plan's method)."""
        if self.cp is not None:
            return "cp"
        return "dense" if self.dense_rows else "varlen"

    def to(self, device, non_blocking: bool = True) -> "MicroBatch":
        if torch.device(device).type == "cuda":
            mv = lambda t: t.pin_memory().to(device, non_blocking=non_blocking)  # noqa: E731
        else:
            mv = lambda t: t.to(device)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets), mv(self.cu_seqlens),
                          self.max_len, self.seg_lens, self.n_tokens, self.n_valid, self.attn_sq, self.row_ids,
                          self.cp.to(device, mv) if self.cp is not None else None, self.dense_rows)

    def attention_kwargs(self) -> dict:
        """The forward kwargs our registered attention reads (transformers' flash-attention names)."""
        kwargs = {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                  "max_length_q": self.max_len, "max_length_k": self.max_len, "longctx_seg_lens": self.seg_lens}
        if self.cp is not None:
            kwargs["longctx_cp"] = self.cp
        elif self.dense_rows:
            kwargs["longctx_dense_rows"] = self.dense_rows
        return kwargs


def build_micro_batch(rows: list[dict], seq_len: int, doc_mask: bool = True, pose_target_len: int | None = None,
                      pose_seed: int | None = None, loss_masks: list[np.ndarray] | None = None) -> MicroBatch:
    """Flatten rows into one [1, sum(seq_len)] row.

    Targets: targets[t] = input_ids[t + 1] inside a segment; the last token of every segment has no target (so
    the first token of a document is never predicted from the previous one) and padding is never a target.
    `loss_masks` (SFT): per row, 1 where the token may be a target (assistant tokens), 0 elsewhere.
    Position ids: 0..seq_len-1 per row (not reset per document; RoPE is relative), or PoSE skip-wise ids.
    Attention path: dense causal when every row is one causal span (`dense_rows`), varlen otherwise."""
    ids, pos, tgt, segs = [], [], [], []
    n_valid, attn_sq, one_span = 0, 0, True
    for k, row in enumerate(rows):
        x = row["input_ids"]
        if len(x) != seq_len:
            fail(f"a data row has {len(x)} tokens, the manifest says seq_len {seq_len}; the data is corrupt")
        row_segs, has_pad = row_segments(row["doc_lens"], row["num_pad"], seq_len, doc_mask)
        t = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        t[:-1] = x[1:]
        ends = np.cumsum(row_segs)
        t[ends - 1] = IGNORE_INDEX
        if has_pad:
            t[seq_len - row["num_pad"]:] = IGNORE_INDEX
        if loss_masks is not None:
            m = np.asarray(loss_masks[k], dtype=bool)
            t[:-1][~m[1:]] = IGNORE_INDEX
        real = row_segs[:-1] if has_pad else row_segs
        one_span = one_span and len(real) <= 1  # padding sits at the end: causal attention never reaches it
        attn_sq += int(sum(s * s for s in real))
        n_valid += int((t != IGNORE_INDEX).sum())
        if pose_target_len:
            rng = np.random.default_rng([pose_seed or 0, row.get("epoch", 0), row["index"]])
            p = pose_position_ids(seq_len, pose_target_len, rng)
        else:
            p = np.arange(seq_len, dtype=np.int64)
        ids.append(x)
        pos.append(p)
        tgt.append(t)
        segs.extend(row_segs)
    cu = np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)
    return MicroBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)).view(1, -1),
        position_ids=torch.from_numpy(np.concatenate(pos)).view(1, -1),
        targets=torch.from_numpy(np.concatenate(tgt)).view(1, -1),
        cu_seqlens=torch.from_numpy(cu), max_len=int(max(segs)), seg_lens=segs,
        n_tokens=seq_len * len(rows), n_valid=n_valid, attn_sq=attn_sq, row_ids=[r["index"] for r in rows],
        dense_rows=len(rows) if one_span else 0)


def count_attention_paths(micro_batches) -> dict[str, int]:
    """How many of these micro-batches take each attention path: {"dense": n, "varlen": m}, and "cp": k when rows
    are split over a context-parallel group (their methods are counted by the stage). A step's metrics record it."""
    counts = {"dense": 0, "varlen": 0}
    for mb in micro_batches:
        counts[mb.attn_path] = counts.get(mb.attn_path, 0) + 1
    return counts


# -------------------------------------------------------------------------------------------------------------
# Attention: one function registered with transformers' AttentionInterface. It takes the document boundaries
# from the forward kwargs (cu_seq_lens_q / max_length_q, as transformers' flash-attention path names them) and
# never attends across them. Transformers builds no mask for an implementation its mask interface does not know
# (masking_utils._preprocess_mask_arguments returns None early), so no dense 4-D mask is ever created.

_ATTN = {"backend": None, "calls": {"dense": 0, "varlen": 0, "cp": 0}}  # the forced backend; calls per path
BACKEND_NAMES = {"flash_attn": "flash-attn varlen (flash_attn_varlen_func)",
                 "torch_varlen": "PyTorch varlen (torch.nn.attention.varlen.varlen_attn)",
                 "reference": "exact per-document reference (causal softmax attention per segment)"}


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func  # lazily: optional, compiled against the local CUDA
    except Exception:  # noqa: BLE001 - ImportError, or a broken build raising OSError/RuntimeError
        return None
    return flash_attn_varlen_func


def available_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The best exact varlen backend for this device and dtype: flash-attn > torch varlen > reference."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn() is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "reference"


def set_attention_backend(name: str | None) -> None:
    """Force a backend ("flash_attn", "torch_varlen", "reference") or None for automatic choice per call."""
    if name not in (None, "flash_attn", "torch_varlen", "reference"):
        raise ValueError(f"unknown attention backend {name!r}")
    _ATTN["backend"] = name


def reference_varlen_attention(q, k, v, seg_lens: list[int], scale: float | None,
                               seg_lens_k: list[int] | None = None) -> torch.Tensor:
    """Exact per-segment causal attention: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D].

    `seg_lens_k` (default: seg_lens) gives each segment's key count when it differs from its query count (the
    queries are then the LAST tokens of the segment's keys: causal aligned bottom-right, as flash-attn does)."""
    outs, start, start_k = [], 0, 0
    n_rep = q.shape[1] // k.shape[1]
    for n, m in zip(seg_lens, seg_lens if seg_lens_k is None else seg_lens_k):
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        ks, vs = (t[start_k:start_k + m].transpose(0, 1) for t in (k, v))
        if n_rep > 1:
            ks, vs = ks.repeat_interleave(n_rep, dim=0), vs.repeat_interleave(n_rep, dim=0)
        acc = torch.promote_types(qs.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        scores = (qs @ ks.transpose(-1, -2)).to(acc) * (scale if scale is not None else qs.shape[-1] ** -0.5)
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(vs.dtype)
        outs.append((probs @ vs).transpose(0, 1))
        start, start_k = start + n, start_k + m
    return torch.cat(outs, dim=0)


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset:
    import inspect

    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_kwargs() -> dict:
    params = _torch_varlen_params()  # the signature changed between torch 2.9, 2.10 and 2.12
    if "window_size" in params:  # torch >= 2.10: causal is window (-1, 0)
        return {"window_size": (-1, 0)}
    return {"is_causal": True}  # torch 2.9


@functools.lru_cache(maxsize=None)
def _torch_varlen_native_gqa(device: str) -> bool:
    """Does varlen_attn take fewer KV heads than query heads as they are? torch 2.11's does without saying so in
    its signature (measured on an H200: identical to repeating the heads); probed once, on a tiny input, so a
    torch that does not falls back to repeating them."""
    q = torch.randn(48, 4, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(48, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 16, 48], dtype=torch.int32, device=device)
    with torch.no_grad():
        want = _torch_varlen()(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 32, 32,
                               **_torch_varlen_kwargs())
        try:
            got = _torch_varlen()(q, k, v, cu, cu, 32, 32, **_torch_varlen_kwargs())
        except Exception:  # noqa: BLE001 - a kernel that refuses GQA raises some RuntimeError
            return False
    return got.shape == want.shape and bool(torch.equal(got, want))


def _torch_varlen_call(q, k, v, cu, max_len, scale, cu_k=None, max_len_k=None):
    fn = _torch_varlen()
    params = _torch_varlen_params()
    kwargs = _torch_varlen_kwargs()
    if "enable_gqa" in params:  # torch >= 2.12
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1] and not _torch_varlen_native_gqa(str(q.device)):
        n_rep = q.shape[1] // k.shape[1]  # expand KV heads ourselves (memory and copies: avoided where we can)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    cu_k, max_len_k = (cu, max_len) if cu_k is None else (cu_k, max_len_k)
    return fn(q, k, v, cu, cu_k, max_len, max_len_k, **kwargs)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, seg_lens: list[int] | None, scale: float | None,
                     backend: str | None = None, cu_seqlens_k=None, max_len_k: int | None = None,
                     seg_lens_k: list[int] | None = None) -> torch.Tensor:
    """Causal attention inside the segments of a flattened row. q [T, Hq, D], k/v [T, Hkv, D].

    With `cu_seqlens_k` (+ max_len_k, seg_lens_k) a segment may have more keys than queries: its queries are its
    last tokens (bottom-right causal; context parallelism's all-gather attention uses it)."""
    backend = backend or _ATTN["backend"] or available_backend(q.device, q.dtype)
    cu_k, max_k = (cu_seqlens, max_len) if cu_seqlens_k is None else (cu_seqlens_k, max_len_k)
    if backend == "flash_attn":
        return _flash_attn()(q, k, v, cu_seqlens, cu_k, max_len, max_k, dropout_p=0.0,
                             softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        return _torch_varlen_call(q, k, v, cu_seqlens, max_len, scale, cu_k, max_k)
    if seg_lens is None:
        seg_lens = cu_seqlens.diff().tolist()
    if cu_seqlens_k is not None and seg_lens_k is None:
        seg_lens_k = cu_seqlens_k.diff().tolist()
    return reference_varlen_attention(q, k, v, seg_lens, scale, seg_lens_k)


def dense_causal_attention(q, k, v, rows: int, scale: float | None) -> torch.Tensor:
    """Causal attention over each of `rows` equal rows of a flattened micro-batch, as one batched SDPA call.
    q [T, Hq, D], k/v [T, Hkv, D], T = rows * S -> [T, Hq, D]. Exact where every row is one causal span followed
    at most by padding (its real tokens never attend the padding after them); no copies of q, k, v."""
    total, hq, d = q.shape
    if total % rows:
        raise RuntimeError(f"dense causal attention: {total} tokens do not split into {rows} equal rows")
    qb, kb, vb = (t.view(rows, total // rows, t.shape[1], d).transpose(1, 2) for t in (q, k, v))  # [rows, H, S, D]
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=hq != k.shape[1])
    return out.transpose(1, 2).reshape(total, hq, d)


def sdpa_kernel_name(q, k, v, scale: float | None) -> str:
    """The kernel PyTorch's SDPA dispatcher picks for causal attention on these [rows, H, S, D] inputs (e.g.
    "cudnn_attention", "flash_attention"), through torch's own choice function; "chosen by PyTorch" where that
    private function is missing or has another signature."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return SDPBackend(choice).name.lower()
    except Exception:  # noqa: BLE001 - a private API: only the name in a log line depends on it
        return "chosen by PyTorch"


def longctx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None).
    The micro-batch's kwargs choose the path: `longctx_cp` (a split row), `longctx_dense_rows` (dense causal), or
    the varlen kernel over cu_seq_lens_q.

    Refuses to run without boundaries: a call without cu_seq_lens_q would silently attend across documents."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError(f"{ATTN_NAME} attention was called without cu_seq_lens_q: pass the micro-batch's "
                           "attention_kwargs() to the forward (it never falls back to attention across documents)")
    if query.shape[0] != 1:
        raise RuntimeError(f"{ATTN_NAME} expects flattened rows of batch size 1, got {query.shape[0]}")
    if attention_mask is not None:
        raise RuntimeError(f"{ATTN_NAME} got a dense attention mask; it must not be built (pass no attention_mask)")
    if dropout:
        raise RuntimeError(f"{ATTN_NAME} does not implement attention dropout ({dropout})")
    path = ("cp" if kwargs.get("longctx_cp") is not None else
            "dense" if kwargs.get("longctx_dense_rows") else "varlen")
    _ATTN["calls"][path] += 1
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if path == "cp":  # the hook: a row split over a context-parallel group
        return kwargs["longctx_cp"].attention(q, k, v, scaling).unsqueeze(0), None
    if path == "dense":  # every row one causal span: no boundaries needed
        return dense_causal_attention(q, k, v, kwargs["longctx_dense_rows"], scaling).unsqueeze(0), None
    out = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, kwargs.get("max_length_q"),
                           kwargs.get("longctx_seg_lens"), scaling)
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register `longctx_attention` with transformers under ATTN_NAME (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, longctx_attention)
    return ATTN_NAME


def _probe_tol(dtype: torch.dtype, fp32: float, low: float) -> float:
    return fp32 if dtype == torch.float32 else low


def _check_kernels(config, device: torch.device, dtype: torch.dtype, backend: str, g: torch.Generator) -> str:
    """Probe parts 1 and 2 on random q/k/v with the model's head layout: the varlen kernel over 3 documents, and
    the dense path over 2 rows of 8 tokens (the second ending in 3 padding tokens, whose outputs are not used),
    each against the per-document reference. Returns the SDPA kernel the dense path runs on."""
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    q, k, v = (torch.randn(16, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))

    def reference(segs: list[int]) -> torch.Tensor:  # the exact per-document attention, in fp32
        return reference_varlen_attention(q.float(), k.float(), v.float(), segs, 0.25)

    tol = _probe_tol(dtype, 1e-5, 3e-2)
    seg = [5, 9, 2]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32, device=device)
    got = varlen_attention(q, k, v, cu, max(seg), seg, 0.25, backend=backend).float()
    err = (got - reference(seg)).abs().max().item()
    if not err <= tol:
        raise RuntimeError(f"varlen attention ({BACKEND_NAMES[backend]}) disagrees with the per-document reference "
                           f"(max error {err:.2e} > {tol}); refusing to train")
    rows = [t.view(2, 8, t.shape[1], d).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]  # as trained
    kernel = sdpa_kernel_name(*rows, 0.25)
    got = dense_causal_attention(q, k, v, 2, 0.25).float()
    err = (got - reference([8, 5, 3]))[:13].abs().max().item()  # the 3 padding tokens' outputs are not used
    if not err <= tol:
        raise RuntimeError(f"dense causal attention (PyTorch SDPA, {kernel}) disagrees with the per-document "
                           f"reference on rows of one document (max error {err:.2e} > {tol}); refusing to train")
    return kernel


def _hidden_and_calls(model, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
    """Last hidden states [T, hidden] (float) of a probe micro-batch and the attention calls per path it made."""
    before = dict(_ATTN["calls"])
    hidden = forward_hidden(model, mb)[0].float()
    return hidden, {p: n - before[p] for p, n in _ATTN["calls"].items() if n != before[p]}


def _relative_change(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-6)).item()


def _check_model(model, device: torch.device, dtype: torch.dtype, vocab_size: int, g: torch.Generator) -> None:
    """Probe parts 3 to 5, through the model: every layer reaches our attention on the path the micro-batch
    names; a document's hidden states do not change when another is packed before it (varlen); rows of one
    document, one of them padded, give the same hidden states on the dense path as on the varlen path."""
    n_layers = model.config.num_hidden_layers
    n_a, n_b = 7, 11
    ids = torch.randint(3, vocab_size, (1, n_a + n_b), generator=g).to(device)
    packed = MicroBatch(ids, torch.arange(n_a + n_b).view(1, -1).to(device), ids, torch.tensor(
        [0, n_a, n_a + n_b], dtype=torch.int32, device=device), n_b, [n_a, n_b], n_a + n_b, 0, 0)
    alone = MicroBatch(ids[:, n_a:], torch.arange(n_b).view(1, -1).to(device), ids[:, n_a:], torch.tensor(
        [0, n_b], dtype=torch.int32, device=device), n_b, [n_b], n_b, 0, 0)
    rows = [{"index": i, "input_ids": ids[0, start:start + n_b].cpu().numpy(), "doc_lens": lens, "num_pad": pad}
            for i, (start, lens, pad) in enumerate([(0, [n_b], 0), (n_a, [n_b - 3, 3], 3)])]
    dense = build_micro_batch(rows, n_b).to(device)
    with torch.no_grad():
        h_packed, calls_packed = _hidden_and_calls(model, packed)
        h_alone, _ = _hidden_and_calls(model, alone)
        h_dense, calls_dense = _hidden_and_calls(model, dense)
        h_varlen, _ = _hidden_and_calls(model, dataclasses.replace(dense, dense_rows=0))
    for m in model.modules():  # FSDP2 leaves the root unsharded after a forward without backward; an optimizer
        if type(m).__name__.startswith("FSDP") and hasattr(m, "reshard"):  # built next needs sharded params
            m.reshard()
    for path, calls in (("varlen", calls_packed), ("dense", calls_dense)):
        if calls != {path: n_layers}:
            raise RuntimeError(f"a {path} micro-batch ran {ATTN_NAME} attention as {calls} in a model of {n_layers} "
                               "layers; some layers use another attention that ignores document boundaries")
    tol = _probe_tol(dtype, 1e-4, 5e-2)
    rel = _relative_change(h_packed[n_a:], h_alone)
    if not rel <= tol:
        raise RuntimeError(f"a document's hidden states change by {rel:.2e} (relative) when another document is "
                           f"packed before it: attention crosses document boundaries; refusing to train")
    rel = _relative_change(h_dense[:-3], h_varlen[:-3])  # the padding's own outputs are not used
    if not rel <= tol:
        raise RuntimeError(f"rows of one document change by {rel:.2e} (relative) between the dense causal and the "
                           "varlen attention path; refusing to train")


def check_attention(model, device: torch.device, dtype: torch.dtype, vocab_size: int, seed: int = 0) -> str:
    """Start-up probe; returns both paths' description ("dense causal: ...; varlen: ..."). Fails loudly if

    1. the varlen kernel disagrees with the exact per-segment reference on random q/k/v (3 segments), or
    2. the dense path (SDPA, causal per row) does on rows of one document, one of them ending in padding, or
    3. the model's forward does not reach our attention on the micro-batch's path in every layer, or
    4. a document's hidden states change when another document is packed before it (cross-document leakage), or
    5. the dense and varlen paths give a model different hidden states for the same rows.
    Every rank runs it (the forward is collective under FSDP)."""
    backend = _ATTN["backend"] or available_backend(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    kernel = _check_kernels(model.config, device, dtype, backend, g)
    _check_model(model, device, dtype, vocab_size, g)
    return (f"dense causal: PyTorch SDPA is_causal=True ({kernel}) for rows of one causal span; "
            f"varlen: {BACKEND_NAMES[backend]}")


def forward_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Last hidden states [1, T, hidden] (after the final norm) of a flattened micro-batch. A model sharded with
    fsdp_train runs through its registered root forward (`longctx_forward`), so FSDP gathers the weights; under
    no_grad, reshard it afterwards (fsdp_train.reshard) before an optimizer or a checkpoint reads it."""
    if hasattr(model, "longctx_forward"):
        return model.longctx_forward(mb.input_ids, mb.position_ids, **mb.attention_kwargs())
    return model.get_decoder()(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                               **mb.attention_kwargs()).last_hidden_state
