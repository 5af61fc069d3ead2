"""Activation memory of a decoder for the longest rows: checkpoint every k-th layer (selective activation
checkpointing), move the checkpointed layer inputs to pinned CPU memory until the backward needs them, and run
each layer's MLP over chunks of the row's tokens (a sequence-tiled MLP, as Arctic Long Sequence Training does).

With full checkpointing (k = 1) a GPU keeps one input per layer, layers x tokens x hidden x 2 bytes: 16 GiB for
Llama-3-8B on a 64K row, 128 GiB on a 512K row. Three ways to trade it:
- `every=k`: only layers 0, k, 2k, ... are checkpointed; the others keep all their activations and skip the
  recompute (less time, more memory; the fit planner, memory_plan.py, says what fits);
- `offload=True`: the inputs the checkpoints keep are saved through `torch.autograd.graph.save_on_cpu`, copied to
  pinned host memory in the forward and back in the backward. torch.utils.checkpoint (non-reentrant) saves its
  inputs as saved tensors, so the hooks see exactly those inputs and nothing the recompute makes. On a CPU the
  same code runs with pageable memory, where the "copy" is the tensor itself (nothing moves, nothing is saved).
- `tile_mlp(layers, chunks)`: the MLP (gate, up, SiLU, product, down: 3-4 tensors of tokens x intermediate, the
  largest activations of a layer, 3.5-4x the hidden size) runs over `chunks` slices of the tokens. Its forward
  keeps only its input; its backward recomputes one slice at a time and returns the input's gradient and the
  weights' gradients summed over the slices (in fp32 when the weights are bf16, so that hundreds of slices
  round once). The MLP acts on each token alone, so the result is that of one call over the whole row. Each
  layer's backward then holds one slice's MLP activations instead of the whole row's; the price is one more
  forward of the MLP per step.
All three leave the arithmetic unchanged: losses and gradients equal full checkpointing's (tests/test_watch.py,
tests/test_tiled_mlp.py).

The tiled MLP is an autograd Function over the MLP module's own forward (transformers' LlamaMLP / Qwen2MLP /
MistralMLP, or Liger's SwiGLU bound to them), with the module's parameters as its inputs: their gradients reach
autograd like any layer's, so it works unchanged under FSDP2 (the parameters it reads are the ones the layer's
pre-forward hook gathered, and FSDP reduces their gradients after the layer's backward), inside activation
checkpointing, with offloaded checkpoints and with context parallelism (each rank tiles its own tokens).

Used by 03_continued_pretrain.py (--ac-every, --offload-activations, --tiled-mlp).

Outside this repository (copy this file alone: it needs only torch), on any Hugging Face Llama / Qwen2 / Mistral
decoder (before or after FSDP2, before or after Liger):

    import activation_memory
    stats = activation_memory.checkpoint_layers(model.model.layers, every=2, offload=True)
    activation_memory.tile_mlp(model.model.layers, chunks=16)   # 16 slices of the row's tokens
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    print(stats.offloaded_bytes)           # bytes of layer inputs that went to host memory (since reset())
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class OffloadStats:
    saved_bytes: int = 0  # since the last reset(): bytes of the inputs the checkpoints saved through the hooks
    offloaded_bytes: int = 0  # of which sent to host memory (0 on a CPU: they are already there)

    def reset(self) -> None:
        self.saved_bytes = self.offloaded_bytes = 0


def checkpointed(index: int, every: int) -> bool:
    """Whether layer `index` is checkpointed when every `every`-th layer is (0, k, 2k, ...)."""
    return every > 0 and index % every == 0


class _SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
    """save_on_cpu with a byte count: pinned host copies of the saved tensors of a CUDA forward, copied back in the
    backward; on a CPU the tensor itself (the same hooks, no copy)."""

    def __init__(self, stats: OffloadStats):
        def pack(t: torch.Tensor):
            stats.saved_bytes += t.numel() * t.element_size()
            if t.device.type == "cpu":
                return t.device, t
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t, non_blocking=True)
            stats.offloaded_bytes += t.numel() * t.element_size()
            return t.device, host

        def unpack(packed):
            device, t = packed
            return t.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def checkpoint_layers(layers, every: int = 1, offload: bool = False) -> OffloadStats:
    """Wrap the forward of every `every`-th layer in non-reentrant activation checkpointing, its saved inputs on
    the host when `offload`. Module names and state-dict keys are unchanged. Returns the offload byte count."""
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    stats = OffloadStats()
    for i, layer in enumerate(layers):
        if not checkpointed(i, every):
            continue
        inner = layer.forward

        def fwd(*args, _inner=inner, **kwargs):
            with _SaveOnHost(stats) if offload else contextlib.nullcontext():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = fwd
    return stats


# -------------------------------------------------------------------------------------------------------------
# The sequence-tiled MLP.

TILED_MLP_FAMILIES = ("llama", "qwen2", "mistral")  # model_type of the configs whose MLP tile_mlp accepts
TILED_MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "MistralMLP")  # transformers' SwiGLU MLPs (Liger binds its forward)


def unsupported_mlp(module) -> str | None:
    """Why `tile_mlp` refuses this MLP module, or None: only the SwiGLU MLPs of the Llama / Qwen2 / Mistral
    families (gate_proj, up_proj, down_proj acting on each token alone) are known to be safe to slice."""
    name = type(module).__name__
    if name in TILED_MLP_CLASSES and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    return (f"the tiled MLP supports the SwiGLU MLPs of the {' / '.join(TILED_MLP_FAMILIES)} families "
            f"({', '.join(TILED_MLP_CLASSES)}), not {name}")


def _spans(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of `chunks` slices of `tokens` as even as possible (the first ones one token longer)."""
    size, extra = divmod(tokens, chunks)
    bounds = [0]
    for i in range(chunks):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def _trainable(module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


class TiledMLP(torch.autograd.Function):
    """y = mlp_forward(x) over `chunks` slices of the tokens (dim -2), `module` the MLP whose trainable
    parameters are `params` (passed in so that autograd routes their gradients like any layer's). Saves x only;
    the backward recomputes each slice with the module's parameters as they are then (under FSDP2 the same
    tensors, gathered again by the layer's pre-backward hook) and returns the gradients of x and of `params`,
    the latter summed over the slices in fp32 and returned in their dtype."""

    @staticmethod
    def forward(ctx, mlp_forward, module, chunks: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp_forward, ctx.module, ctx.chunks = mlp_forward, module, chunks
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for start, end in _spans(x.shape[-2], chunks):
                piece = mlp_forward(x.narrow(-2, start, end - start))
                if out is None:  # the output's size along the tokens is known once the first slice ran
                    out = piece.new_empty(*x.shape[:-1], piece.shape[-1])
                out.narrow(-2, start, end - start).copy_(piece)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = _trainable(ctx.module)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        for start, end in _spans(x.shape[-2], ctx.chunks):
            piece = x.narrow(-2, start, end - start).detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                out = ctx.mlp_forward(piece)
            inputs = ([piece] if grad_x is not None else []) + params
            grads = torch.autograd.grad(out, inputs, grad_out.narrow(-2, start, end - start), allow_unused=True)
            if grad_x is not None:
                grad_x.narrow(-2, start, end - start).copy_(grads[0])
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g.float() if sums[i] is None else sums[i].add_(g)
        grad_params = [None if s is None else s.to(p.dtype) for s, p in zip(sums, params)]
        return (None, None, None, grad_x, *grad_params)


def tile_mlp(layers, chunks: int) -> None:
    """Run the MLP of every decoder layer in `layers` over `chunks` slices of its tokens (fewer when a call has
    fewer tokens, e.g. a short probe). Wraps whatever forward the MLP has (transformers' or Liger's); module
    names and state-dict keys are unchanged. Raises ValueError for chunks < 1 or an MLP it does not support."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    for layer in layers:
        problem = unsupported_mlp(layer.mlp)
        if problem:
            raise ValueError(problem)
    for layer in layers:
        mlp = layer.mlp
        inner = mlp.forward

        def fwd(x, _inner=inner, _mlp=mlp):
            n = min(chunks, x.shape[-2])
            if n <= 1:
                return _inner(x)
            # the parameters as they are now: under FSDP2, the ones this layer's pre-forward hook gathered
            return TiledMLP.apply(_inner, _mlp, n, x, *_trainable(_mlp))

        mlp.forward = fwd
