"""Activation memory of a decoder for the longest rows: checkpoint every k-th layer (selective activation
checkpointing) and move the checkpointed layer inputs to pinned CPU memory until the backward needs them.

With full checkpointing (k = 1) a GPU keeps one input per layer, layers x tokens x hidden x 2 bytes: 16 GiB for
Llama-3-8B on a 64K row, 128 GiB on a 512K row. Two ways to trade it:
- `every=k`: only layers 0, k, 2k, ... are checkpointed; the others keep all their activations and skip the
  recompute (less time, more memory; the fit planner, memory_plan.py, says what fits);
- `offload=True`: the inputs the checkpoints keep are saved through `torch.autograd.graph.save_on_cpu`, copied to
  pinned host memory in the forward and back in the backward. torch.utils.checkpoint (non-reentrant) saves its
  inputs as saved tensors, so the hooks see exactly those inputs and nothing the recompute makes. On a CPU the
  same code runs with pageable memory, where the "copy" is the tensor itself (nothing moves, nothing is saved).
Both leave the arithmetic unchanged: losses and gradients equal full checkpointing's (tests/test_train.py).

Used by 03_continued_pretrain.py (--ac-every, --offload-activations).

Outside this repository (copy this file alone: it needs only torch), on any Hugging Face decoder (before or
after FSDP2):

    import activation_memory
    stats = activation_memory.checkpoint_layers(model.model.layers, every=2, offload=True)
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
