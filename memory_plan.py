"""A fit planner for long-context training: per-GPU memory of one training step from the model's shape, the row
length, the GPU count, context parallelism, the micro-batch, activation checkpointing and offload, and the
smallest setting that fits a GPU with a margin. Standard library only (a recipe's DRY_RUN stays instant).

The model counts what a step of 03_continued_pretrain.py holds at its peak, the backward of the first layer:
- states: fp32 master weights and AdamW's two moments, 12 bytes per parameter, sharded over all GPUs (FSDP2;
  --cpu-offload moves them to the host); the sharded fp32 gradients appear as the backward reaches each layer,
  after the peak;
- working weights: the root unit (embeddings, lm_head) and two decoder layers gathered in the compute dtype, and
  the root's gradients;
- checkpointed layer inputs: one per checkpointed layer, tokens x hidden x compute bytes (on the host with
  --offload-activations); a layer that is not checkpointed (--ac-every k > 1, or no checkpointing) keeps all the
  activations its backward needs instead;
- one layer's recompute and backward: its saved activations (norms, q/k/v, attention output, MLP) plus the
  gradients in flight, or the loss's backward if that needs more;
- attention workspace: flash / PyTorch varlen keep the log-sum-exp (Hq fp32 per token); the CPU reference keeps
  each document's probabilities (Hq x len^2 fp32);
- the loss: one chunk's logits (chunk x vocab, fp32, about three live copies in its backward), the final norm's
  output and the hidden states' gradient.
Tokens per GPU are row length x rows per micro-batch / cp. The counts follow the ops of a Hugging Face Llama layer
(with Liger: its RMSNorm and SwiGLU keep fewer tensors); bench/memory_plan_check.py compares them with measured
peaks (docs/benchmarks.md#fit-planner).

Used by 03_continued_pretrain.py (--plan) and recipes/plan.py (DRY_RUN=1).

Outside this repository (copy this file alone: it needs only the standard library):

    import memory_plan
    shape = memory_plan.Shape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                              vocab=128256)
    best, table = memory_plan.choose(shape, seq_len=524288, gpus=8, gpu_gib=79.6)
    print(memory_plan.format_table(table, best))          # best.cp == 8: ProLong's 512K setting
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

GIB = 2**30
H100_GIB = 81559 / 1024  # an 80 GB H100 as nvidia-smi reports it (81,559 MiB)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False

    @property
    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @classmethod
    def from_config(cls, config) -> "Shape":
        """From a transformers config (or anything with its attribute names)."""
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   ffn=config.intermediate_size, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


@dataclass(frozen=True)
class Setting:
    """One way to run a step: what the planner varies (cp, micro-batch, checkpointing, offload) and the rest."""
    seq_len: int
    gpus: int = 1
    cp: int = 1
    micro_rows: int = 1
    ac_every: int = 1  # 0: no activation checkpointing; k: layers 0, k, 2k, ... checkpointed
    offload: bool = False  # checkpointed layer inputs on the host
    cpu_offload: bool = False  # states on the host (03 --cpu-offload)
    compute_bytes: int = 2  # bf16 on GPUs; 4 for fp32 (CPU runs)
    liger: bool = True  # Liger RMSNorm / SwiGLU (and fused CE) on CUDA
    attention: str = "flash"  # flash | reference (the CPU per-document attention)
    doc_len: int = 0  # reference attention: the longest document (default: the whole row)
    loss_chunk: int = 4096

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_rows // self.cp

    def describe(self) -> str:
        ac = "no AC" if self.ac_every == 0 else "AC every layer" if self.ac_every == 1 else f"AC every {self.ac_every}"
        return (f"cp {self.cp}, {self.micro_rows} row(s)/micro-batch, {ac}"
                + (", offload" if self.offload else "") + (", cpu-offload" if self.cpu_offload else ""))


def layer_activation_bytes(s: Shape, st: Setting) -> float:
    """Bytes per token a layer's backward needs (what autograd saves), without attention probabilities."""
    b, h, kv, f = st.compute_bytes, s.hidden, s.kv_heads * s.head_dim, s.ffn
    q = s.heads * s.head_dim
    if st.liger:  # Liger RMSNorm keeps its input and output; SwiGLU keeps gate and up, recomputes the product
        norms, mlp = 3 * b * h, 3 * b * f
    else:  # HF RMSNorm: an fp32 copy of the input in bf16, the fp32 normalised tensor, the weighted output
        norm = 2 * b * h if b >= 4 else (8 + 2 * b) * h
        norms, mlp = 2 * norm + b * h, 4 * b * f  # the second norm keeps the residual sum it normalises too
    repeated = 2 * q if st.attention == "reference" and s.heads != s.kv_heads else 0  # GQA heads repeated
    attention = b * (2 * q + 2 * kv + repeated)  # q, k, v as the kernel takes them, and its output
    return norms + attention + mlp


def attention_workspace_bytes(s: Shape, st: Setting) -> float:
    """Bytes per token the attention keeps for its backward beyond q, k, v and output."""
    if st.attention == "reference":  # the softmax output of each document, fp32, and its causal mask
        return s.heads * (st.doc_len or st.seq_len) * 4 + (st.doc_len or st.seq_len)
    return s.heads * 4  # the log-sum-exp


def estimate(s: Shape, st: Setting) -> dict[str, float]:
    """Peak bytes per GPU of one step, by component (the sum is under "total"). The peak comes in the backward
    of the top layer (or of the loss, whichever needs more): by then the layers below that were not recomputed
    still hold their activations, and of the gradients only the root's exist."""
    b, t = st.compute_bytes, st.tokens
    act = (layer_activation_bytes(s, st) + attention_workspace_bytes(s, st)) * t
    n_ckpt = 0 if st.ac_every == 0 else len(range(0, s.layers, st.ac_every))
    kept = sum(1 for i in range(s.layers - 1) if st.ac_every == 0 or i % st.ac_every)
    # Liger's fused CE sizes its chunks to about tokens x hidden logits; the chunked CE holds --loss-chunk x
    # vocab fp32 logits, about three live copies in its backward (logits, softmax, their gradient)
    logits = t * s.hidden * 4 if st.liger else 3 * 4 * min(st.loss_chunk, t) * s.vocab
    parts = {
        "states": 0.0 if st.cpu_offload else 12 * s.params / st.gpus,  # fp32 weights + AdamW moments
        "weights": b * (2 * s.root_params + 2 * s.layer_params),  # gathered, and the root's gradients
        "ckpt inputs": 0.0 if st.offload else n_ckpt * t * s.hidden * b,
        "kept layers": kept * act,
        "backward": max(act + t * b * (s.ffn + 2 * s.hidden), logits),  # a layer's, or the loss's
        "hidden": t * s.hidden * (b + 4),  # the final norm's output, the hidden states' gradient
    }
    parts["total"] = sum(parts.values())
    return parts


def candidates(base: Setting, max_cp: int | None = None):
    """Settings from the cheapest to run to the most memory-thrifty: cp as low as possible (communication),
    then checkpointing as little as possible (recompute time), offload (host traffic) only when nothing else
    fits at any cp; the micro-batch as given, then halved."""
    cps = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= (max_cp or base.gpus) and base.gpus % c == 0]
    micro = sorted({m for m in (base.micro_rows, base.micro_rows // 2, base.micro_rows // 4, 1) if m >= 1},
                   reverse=True)
    for offload in (False, True):
        for cp, m in itertools.product(cps, micro):
            for ac in ((0, 4, 2, 1) if not offload else (1,)):
                yield replace(base, cp=cp, micro_rows=m, ac_every=ac, offload=offload)


def choose(shape: Shape, seq_len: int | None = None, gpus: int | None = None, gpu_gib: float = H100_GIB,
           margin: float = 0.1, base: Setting | None = None, max_cp: int | None = None):
    """(the first candidate that fits gpu_gib x (1 - margin), or None; [(setting, estimate)] of all tried)."""
    base = base or Setting(seq_len=seq_len, gpus=gpus or 1)
    table = []
    for st in candidates(base, max_cp):
        est = estimate(shape, st)
        table.append((st, est))
        if est["total"] <= gpu_gib * GIB * (1 - margin):
            return st, table
    return None, table


def format_table(table, best: Setting | None, gpu_gib: float = H100_GIB, margin: float = 0.1) -> str:
    """The settings tried, their memory by component (GiB per GPU), and the choice."""
    names = [k for k in table[0][1] if k != "total"]
    lines = ["  setting" + " " * 46 + "".join(f"{n:>12}" for n in names) + "       total"]
    for st, est in table:
        mark = " <- fits" if st == best else ""
        lines.append(f"  {st.describe():<53}" + "".join(f"{est[n] / GIB:>12.2f}" for n in names)
                     + f"{est['total'] / GIB:>12.2f}{mark}")
    limit = f"{gpu_gib:.1f} GiB per GPU with a {margin:.0%} margin"
    lines.append(f"  fit: {best.describe()} ({limit})" if best else
                 f"  fit: none of these settings fits {limit}; use more GPUs (states shard over them) or --cp")
    return "\n".join(lines)
