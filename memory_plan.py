"""A fit planner for long-context training: per-GPU memory of one training step from the model's shape, the row
length, the GPU count, context parallelism, the micro-batch, activation checkpointing, activation offload, the
tiled MLP and CPU offload of the states; the smallest setting that fits a GPU with a margin, and the longest row
a setting trains. Standard library only (a recipe's DRY_RUN stays instant).

The model counts what a step of 03_continued_pretrain.py holds at its peak. Held throughout:
- states: fp32 master weights and AdamW's two moments, 12 bytes per parameter, sharded over all GPUs (FSDP2;
  --cpu-offload moves them, and the sharded gradients, to the host);
- working weights: the root unit (embeddings, lm_head) and two decoder layers gathered in the compute dtype, and
  the root's gradients;
- checkpointed layer inputs: one per checkpointed layer, tokens x hidden x compute bytes (on the host with
  --offload-activations); a layer that is not checkpointed (--ac-every k > 1, or no checkpointing) keeps its
  input and all the activations its backward needs instead;
- RoPE: the cos and sin tables of every position, shared by the layers.
On top of these, the largest of three moments of the top layer (the first backward, every checkpointed input
still held) and of the loss:
- the MLP's backward: the layer's saved activations (norms, q/k/v, attention output, the MLP's intermediates)
  and the gradients in flight; with --tiled-mlp the MLP keeps only its input, and its backward holds one slice's
  intermediates and the weights' gradients summed in fp32;
- the attention's backward: its saved tensors, the gradients of q/k/v and output, flash's fp32 dq accumulator
  and dk/dv for every query head under GQA (the CPU reference keeps each document's probabilities instead,
  Hq x len^2 fp32); Ulysses (--cp) all-to-alls them into further tensors;
- the loss: the final norm (HF's keeps an fp32 copy of the whole row in bf16; Liger's does not), the hidden
  states' gradient, one chunk's logits (chunk x vocab fp32, three live copies) or Liger's fused CE (an fp32
  weight gradient and logits chunks of about tokens x hidden);
or, for short rows, the end of the backward (every sharded fp32 gradient, the embedding's gradient).
Tokens per GPU are row length x rows per micro-batch / cp. The counts follow the ops of a Hugging Face Llama layer
(with Liger: its RMSNorm and SwiGLU keep fewer tensors); bench/memory_plan_check.py compares them with measured
peaks (docs/benchmarks.md#fit-planner).

Used by 03_continued_pretrain.py (--plan, --tiled-mlp auto) and recipes/plan.py (DRY_RUN=1).

Outside this repository (copy this file alone: it needs only the standard library):

    import memory_plan
    shape = memory_plan.Shape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                              vocab=128256)
    best, table = memory_plan.choose(shape, seq_len=524288, gpus=8, gpu_gib=79.6)
    print(memory_plan.format_table(table, best))          # the cheapest setting that fits: cp 4
    base = memory_plan.Setting(seq_len=0, gpus=8, cp=8)
    print(memory_plan.format_longest(shape, base))         # how far cp 8 goes, and with each memory option
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


AUTO = -1  # Setting.tiled_mlp: as many slices as the row has `hidden`-sized pieces (tiled_mlp_chunks)


def tiled_mlp_chunks(shape: Shape, tokens: int) -> int:
    """--tiled-mlp auto: one slice per `hidden` tokens on this GPU (Arctic Long Sequence Training's rule), so
    that a slice's MLP activations (slice x intermediate) are about the size of one MLP weight matrix."""
    return max(1, min(tokens, -(-tokens // shape.hidden)))


@dataclass(frozen=True)
class Setting:
    """One way to run a step: what the planner varies (cp, micro-batch, checkpointing, offload, tiled MLP) and
    the rest."""
    seq_len: int
    gpus: int = 1
    cp: int = 1
    micro_rows: int = 1
    ac_every: int = 1  # 0: no activation checkpointing; k: layers 0, k, 2k, ... checkpointed
    offload: bool = False  # checkpointed layer inputs on the host (03 --offload-activations)
    cpu_offload: bool = False  # parameters, gradients and optimizer states on the host (03 --cpu-offload)
    tiled_mlp: int = 0  # 0: off; N: the MLP over N slices of the tokens (03 --tiled-mlp); AUTO
    compute_bytes: int = 2  # bf16 on GPUs; 4 for fp32 (CPU runs)
    liger: bool = True  # Liger RMSNorm / SwiGLU (and fused CE) on CUDA
    attention: str = "flash"  # flash | reference (the CPU per-document attention)
    doc_len: int = 0  # reference attention: the longest document (default: the whole row)
    loss_chunk: int = 4096

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_rows // self.cp

    def chunks(self, shape: Shape) -> int:
        """The tiled MLP's slices on this GPU (0: not tiled)."""
        return tiled_mlp_chunks(shape, self.tokens) if self.tiled_mlp == AUTO else self.tiled_mlp

    def describe(self) -> str:
        if self.ac_every == 0:
            words = ["no AC"]
        elif self.ac_every == 1:
            words = ["AC every layer"]
        else:
            words = [f"AC every {self.ac_every}"]
        if self.tiled_mlp:
            words.append("tiled MLP auto" if self.tiled_mlp == AUTO else f"tiled MLP {self.tiled_mlp}")
        if self.offload:
            words.append("offload")
        if self.cpu_offload:
            words.append("cpu-offload")
        return f"cp {self.cp}, {self.micro_rows} row(s)/micro-batch, " + ", ".join(words)


def _norm_bytes(s: Shape, st: Setting) -> float:
    """Bytes per token an RMSNorm keeps beyond its input: its output (read by the next matmul), and in HF's
    norm the normalised tensor, plus in bf16 the fp32 copy of the input it normalises."""
    b, h = st.compute_bytes, s.hidden
    if st.liger:  # Liger RMSNorm keeps its input and one fp32 scalar per token
        return b * h
    return 2 * b * h if b >= 4 else (4 + 2 * b) * h


def _mlp_bytes(s: Shape, st: Setting) -> float:
    """Bytes per token an untiled MLP keeps: gate and up outputs and their product (Liger's SwiGLU recomputes
    the SiLU), plus the SiLU output in HF's MLP."""
    return (3 if st.liger else 4) * st.compute_bytes * s.ffn


def layer_activation_bytes(s: Shape, st: Setting) -> tuple[float, float]:
    """(attention half, MLP half): bytes per token a decoder layer's backward needs (what autograd saves)
    beyond the layer's input. The attention half: the first norm, q, k, v as the kernel takes them and its
    output, the kernel's own (log-sum-exp, or the reference's probabilities); the MLP half: the residual sum,
    the second norm, and the MLP's intermediates (none when tiled: the tiled MLP keeps only its input, the
    second norm's output)."""
    b, q, kv = st.compute_bytes, s.heads * s.head_dim, s.kv_heads * s.head_dim
    repeated = 2 * b * q if st.attention == "reference" and s.heads != s.kv_heads else 0  # GQA heads repeated
    # Ulysses (cp > 1): the kernel's output, all-to-all'd back into another tensor for the output projection
    ulysses = b * q if st.cp > 1 and st.attention != "reference" else 0
    attention = _norm_bytes(s, st) + b * (2 * q + 2 * kv) + repeated + ulysses + attention_workspace_bytes(s, st)
    mlp = b * s.hidden + _norm_bytes(s, st) + (0 if st.tiled_mlp else _mlp_bytes(s, st))
    return attention, mlp


def attention_workspace_bytes(s: Shape, st: Setting) -> float:
    """Bytes per token the attention keeps for its backward beyond q, k, v and output."""
    if st.attention == "reference":  # the softmax output of each document, fp32, and its causal mask
        return s.heads * (st.doc_len or st.seq_len) * 4 + (st.doc_len or st.seq_len)
    return s.heads * 4  # the log-sum-exp


def phase_bytes(s: Shape, st: Setting) -> dict[str, float]:
    """What each moment of the step adds to the parts every moment holds (states, weights, checkpointed inputs,
    layers not recomputed, RoPE tables), for the top layer (the first backward, all checkpointed inputs still
    held): its MLP's backward, its attention's backward, and the loss (forward and backward)."""
    b, h, f, t = st.compute_bytes, s.hidden, s.ffn, st.tokens
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention, mlp = layer_activation_bytes(s, st)
    grad = b * h * t  # the gradient flowing down the residual stream
    restored = b * h * t if st.offload else 0  # the top layer's input, back from the host
    if st.tiled_mlp:
        # the slice's recompute and its gradients, the input's gradient, and the weights' gradients of all
        # slices summed in fp32 beside one slice's
        piece = -(-t // st.chunks(s)) * (_mlp_bytes(s, st) + b * f)
        mlp_backward = (attention + mlp) * t + grad + b * h * t + piece + 3 * h * f * (4 + b)
    else:
        mlp_backward = (attention + mlp) * t + grad + b * (f + h) * t
    # the attention's backward: its saved tensors, the gradients of its output and of q, k, v, and the flash
    # kernel's fp32 accumulator of dq, with dk / dv for every query head when there are fewer KV heads
    workspace = 0 if st.attention == "reference" else 4 * q + (2 * b * q if s.heads != s.kv_heads else 0)
    if st.cp > 1:  # Ulysses: the gradients of q, k, v and of the output all-to-all'd into new tensors
        workspace += b * (2 * q + 2 * kv)
    attention_backward = attention * t + grad + b * (2 * q + 2 * kv) * t + workspace * t
    # the loss: the final norm (input and what it keeps), the hidden states' gradient, and one chunk's logits
    # (chunked CE: chunk x vocab fp32, three live copies; Liger's fused CE: an fp32 weight gradient and logits
    # chunks of about tokens x hidden)
    final = (b * h + _norm_bytes(s, st)) * t + grad
    if st.liger:
        loss = final + (b + 4) * h * t + 4 * s.vocab * h
    else:
        loss = final + grad + 3 * 4 * min(st.loss_chunk, t) * s.vocab
    return {"MLP backward": mlp_backward + restored, "attention backward": attention_backward + restored,
            "loss": loss}


def estimate(s: Shape, st: Setting) -> dict[str, float | str]:
    """Peak bytes per GPU of one step, by component (the sum is under "total"; "peak at" names the moment).
    The peak comes in the backward of the top layer or in the loss, whichever needs more: then the layers
    below that were not recomputed still hold their activations, and of the gradients only the root's exist;
    or, for short rows, at the end of the backward, when every sharded fp32 gradient exists."""
    b, t = st.compute_bytes, st.tokens
    attention, mlp = layer_activation_bytes(s, st)
    n_ckpt = 0 if st.ac_every == 0 else len(range(0, s.layers, st.ac_every))
    kept = sum(1 for i in range(s.layers - 1) if st.ac_every == 0 or i % st.ac_every)
    phases = phase_bytes(s, st)
    moment = max(phases, key=phases.get)
    parts = {
        "states": 0.0 if st.cpu_offload else 12 * s.params / st.gpus,  # fp32 weights + AdamW moments
        "weights": b * (2 * s.root_params + 2 * s.layer_params),  # gathered, and the root's gradients
        "ckpt inputs": 0.0 if st.offload else n_ckpt * t * s.hidden * b,
        "kept layers": kept * (attention + mlp + b * s.hidden) * t,  # with its input
        "rope": 2 * s.head_dim * b * t,  # cos and sin of every position, shared by the layers
        "working": phases[moment],
    }
    layer_peak = sum(parts.values())
    # the end of the backward: every sharded fp32 gradient (on the host with cpu offload) and the embedding's
    end = parts["states"] + parts["weights"] + (0.0 if st.cpu_offload else 4 * s.params / st.gpus) + b * s.hidden * t
    parts["total"] = max(layer_peak, end)
    parts["peak at"] = moment if layer_peak >= end else "end of backward"
    return parts


def longest_row(s: Shape, st: Setting, gpu_gib: float = H100_GIB, margin: float = 0.1, step: int = 1024) -> int:
    """The longest row (tokens, a multiple of `step` x cp) whose step fits gpu_gib x (1 - margin) in setting
    `st` (its seq_len is ignored); 0 if not even one step does. Memory grows with the row, so a bisection."""
    limit = gpu_gib * GIB * (1 - margin)
    unit = step * st.cp  # whole steps on every rank of a cp group

    def fits(n: int) -> bool:
        return estimate(s, replace(st, seq_len=n * unit))["total"] <= limit

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 2**30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit


OPTIONS = {"tiled MLP": {"tiled_mlp": AUTO}, "offload": {"offload": True}, "cpu-offload": {"cpu_offload": True}}


def format_longest(s: Shape, st: Setting, gpu_gib: float = H100_GIB, margin: float = 0.1,
                   options=tuple(OPTIONS)) -> str:
    """The longest row this setting trains, then with each memory option it lacks added alone and all together
    (of `options`, the names in OPTIONS the stage offers: tiled MLP, activation offload, CPU offload of the
    states), from the planner's estimate."""
    rows = [("this setting", st)]
    missing = {name: OPTIONS[name] for name in options if not any(getattr(st, k) for k in OPTIONS[name])}
    rows += [(f"with {name}", replace(st, **o)) for name, o in missing.items()]
    if len(missing) > 1:
        together = {k: v for o in missing.values() for k, v in o.items()}
        rows.append(("with " + ", ".join(missing), replace(st, **together)))
    lines = [f"  longest row, the planner's estimate ({st.gpus} GPU(s) of {gpu_gib:.1f} GiB less a {margin:.0%} "
             f"margin)", f"  of this setting: {st.describe()}"]
    for label, setting in rows:
        n = longest_row(s, setting, gpu_gib, margin)
        lines.append(f"    {label:<40}{n:>14,} tokens" if n else f"    {label:<40}{'does not fit':>14}")
    return "\n".join(lines)


def candidates(base: Setting, max_cp: int | None = None, options=tuple(OPTIONS), ac_every=(0, 4, 2, 1)):
    """Settings from the cheapest to run to the most memory-thrifty: cp as low as possible (communication),
    then checkpointing as little as possible (recompute time); only when nothing else fits at any cp: the
    tiled MLP (one more MLP forward), then offload (host traffic), then both, then both with the states on the
    host (CPU offload: the optimizer step runs there), each only where `options` (names in OPTIONS: what the
    stage offers) has it. `ac_every`: the checkpointing intervals the stage offers (0: none). The micro-batch as
    given, then halved."""
    cps = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= (max_cp or base.gpus) and base.gpus % c == 0]
    micro = sorted({m for m in (base.micro_rows, base.micro_rows // 2, base.micro_rows // 4, 1) if m >= 1},
                   reverse=True)
    tiled = (base.tiled_mlp or AUTO) if "tiled MLP" in options else base.tiled_mlp
    offload = "offload" in options
    host = base.cpu_offload  # the states on the host: as asked, else only as the last resort
    levels = [((0, False, host), tuple(ac_every))]
    if tiled:
        levels.append(((tiled, False, host), (1,)))
    if offload:
        levels.append(((0, True, host), (1,)))
    if tiled and offload:
        levels.append(((tiled, True, host), (1,)))
    if not host and "cpu-offload" in options:
        levels.append(((tiled, offload, True), (1,)))
    for (tiled_mlp, offload, cpu_offload), acs in levels:
        for cp, m in itertools.product(cps, micro):
            for ac in acs:
                yield replace(base, cp=cp, micro_rows=m, ac_every=ac, tiled_mlp=tiled_mlp, offload=offload,
                              cpu_offload=cpu_offload)


def choose(shape: Shape, seq_len: int | None = None, gpus: int | None = None, gpu_gib: float = H100_GIB,
           margin: float = 0.1, base: Setting | None = None, max_cp: int | None = None,
           options=tuple(OPTIONS), ac_every=(0, 4, 2, 1)):
    """(the first candidate that fits gpu_gib x (1 - margin), or None; [(setting, estimate)] of all tried)."""
    base = base or Setting(seq_len=seq_len, gpus=gpus or 1)
    table = []
    for st in candidates(base, max_cp, options, ac_every):
        est = estimate(shape, st)
        table.append((st, est))
        if est["total"] <= gpu_gib * GIB * (1 - margin):
            return st, table
    return None, table


def format_table(table, best: Setting | None, gpu_gib: float = H100_GIB, margin: float = 0.1) -> str:
    """The settings tried, their memory by component (GiB per GPU), the moment of the peak, and the choice."""
    names = [k for k, v in table[0][1].items() if k != "total" and not isinstance(v, str)]
    width = max(53, *(len(st.describe()) + 2 for st, _ in table))
    lines = ["  setting" + " " * (width - 7) + "".join(f"{n:>12}" for n in names) + "       total  peak at"]
    for st, est in table:
        mark = " <- fits" if st == best else ""
        lines.append(f"  {st.describe():<{width}}" + "".join(f"{est[n] / GIB:>12.2f}" for n in names)
                     + f"{est['total'] / GIB:>12.2f}  {est['peak at']}{mark}")
    limit = f"{gpu_gib:.1f} GiB per GPU with a {margin:.0%} margin"
    lines.append(f"  fit: {best.describe()} ({limit})" if best else
                 f"  fit: none of these settings fits {limit}; use more GPUs (states shard over them) or --cp")
    return "\n".join(lines)
