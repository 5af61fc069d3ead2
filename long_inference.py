"""Generation at contexts longer than one GPU holds: plan the memory, spread the layers over every visible GPU,
prefill in chunks.

From 128K tokens on, the KV cache, not the weights, decides where a model fits: an 8B Llama (32 layers x 8 KV
heads x 128 dims, bf16) keeps 128 KiB per token, 16 GiB at 128K and 128 GiB at 1M. This module

- plans, per context length, the bytes of the weights, of the KV cache and of one prefill chunk's activations
  (`memory_plan`), from the model's config alone (weights counted on the meta device, nothing loaded);
- sizes the prefill chunk (`default_prefill_chunk`): generation then runs the prompt through the KV cache chunk by
  chunk (transformers' `prefill_chunk_size`), so that the activations stay bounded while the cache grows;
- places whole decoder layers on the visible GPUs so that each holds its layers' weights and KV cache plus one
  chunk's activations (`plan_layers`, `device_map`): a device map that transformers loads through accelerate.

docs/evaluation.md#memory-plan states the formulas. Used by 05_eval.py (--prefill-chunk, the device map, the plan it
prints and the lengths it refuses) and bench/prefill_memory.py.

Outside this repository (copy this file and common.py):

    import long_inference as li
    config = AutoConfig.from_pretrained("meta-llama/Llama-3.1-8B-Instruct")
    shape = li.model_shape(config)
    chunk = li.default_prefill_chunk(shape, 1_048_576, torch.bfloat16, "sdpa", "cuda")
    plan = li.memory_plan(shape, 1_048_576, torch.bfloat16, chunk, "sdpa", "cuda")
    print(li.describe(plan))                               # weights, KV cache, activations in GiB
    layers = li.plan_layers(plan, li.free_memory("cuda"))  # None: it does not fit the visible GPUs
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16,
                                                 device_map=li.device_map(shape, layers))
    out = model.generate(ids, max_new_tokens=32, prefill_chunk_size=chunk)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import common

GIB = 1024 ** 3
CHUNK_RANGE = (256, 8192)  # the default prefill chunk is a power of two in this range
ACTIVATION_BUDGET = GIB  # ... whose activations fit in this plus one layer's KV cache
HEADROOM = 0.9  # plan to fill at most this share of each device's free memory (allocator fragmentation)
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a model: its sizes, and where its decoder layers sit."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: int  # parameters of one decoder layer
    other_params: int  # embeddings, final norm, head (the head counted once when tied)
    layers_name: str  # the ModuleList of decoder layers, e.g. "model.layers"
    other_modules: tuple[str, ...]  # every other top-level piece, e.g. ("model.embed_tokens", "model.norm", "lm_head")


def model_shape(config) -> ModelShape:
    """The shape of a causal LM from its config, the parameters counted on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_layers = config.num_hidden_layers
    layers_name = next((name for name, m in model.named_modules()
                        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)
    if layers_name is None:
        common.fail(f"cannot find the {n_layers} decoder layers of this {type(model).__name__} to plan its memory")
    layers = model.get_submodule(layers_name)
    layer_params = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once

    def outside(prefix, module):  # the modules beside the layer list, from the top down
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers_name:
                continue
            if layers_name.startswith(full + "."):
                yield from outside(full + ".", child)
            else:
                yield full

    heads = config.num_attention_heads
    return ModelShape(layers=n_layers, hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      vocab=config.vocab_size, layer_params=layer_params, other_params=total - n_layers * layer_params,
                      layers_name=layers_name, other_modules=tuple(outside("", model)))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes planned for one context length (`rows` prompts of `length` tokens at once)."""
    length: int
    rows: int
    chunk: int  # prefill chunk in tokens (the whole prompt when it is longer)
    weights: int
    layer_weights: int
    kv_cache: int
    kv_layer: int  # one layer's share of the KV cache
    activations: int  # the peak of one chunk through one layer, plus the last position's logits

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def kv_bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one token: 2 x layers x KV heads x head_dim x bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype.itemsize


def activation_bytes(shape: ModelShape, length: int, chunk: int, rows: int, dtype: torch.dtype, attn: str,
                     device: str) -> int:
    """The activations of one prefill chunk (c tokens attending to the `length` tokens before them) through one
    layer: hidden states, q / k / v and the MLP's three wide tensors; the attention's own memory (none for flash
    attention; the boolean mask, converted to the dtype, for sdpa on CUDA; scores and probabilities for eager or
    sdpa on a CPU); the copy of one layer's keys and values the cache makes when it grows; the logits of the last
    position in float32."""
    c, b = min(chunk, length), dtype.itemsize
    per_token = 4 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * shape.intermediate
    hidden = rows * c * per_token * b
    if attn in FLASH_ATTENTION:
        attention = 0
    elif attn == "sdpa" and device == "cuda":
        attention = rows * c * length * (1 + b)
    else:
        attention = rows * c * length * (1 + 2 * shape.heads * b)
    kv_copy = rows * length * 2 * shape.kv_heads * shape.head_dim * b
    return hidden + attention + kv_copy + rows * shape.vocab * 4


def memory_plan(shape: ModelShape, length: int, dtype: torch.dtype, chunk: int, attn: str, device: str,
                rows: int = 1) -> MemoryPlan:
    b = dtype.itemsize
    kv = rows * length * kv_bytes_per_token(shape, dtype)
    return MemoryPlan(length=length, rows=rows, chunk=min(chunk, length) if chunk else length,
                      weights=(shape.layers * shape.layer_params + shape.other_params) * b,
                      layer_weights=shape.layer_params * b, kv_cache=kv, kv_layer=kv // shape.layers,
                      activations=activation_bytes(shape, length, chunk or length, rows, dtype, attn, device))


def default_prefill_chunk(shape: ModelShape, length: int, dtype: torch.dtype, attn: str, device: str) -> int:
    """The largest power of two in CHUNK_RANGE whose activations that grow with the chunk (all but the cache copy
    and the logits) fit in ACTIVATION_BUDGET plus one layer's KV cache at `length` (the cache's own growth already
    needs that much); the smallest one otherwise."""
    kv_layer = length * 2 * shape.kv_heads * shape.head_dim * dtype.itemsize
    fixed = activation_bytes(shape, length, 0, 1, dtype, attn, device)  # a chunk of 0 tokens: copy and logits

    def grows(chunk):
        return activation_bytes(shape, length, chunk, 1, dtype, attn, device) - fixed

    chunk = CHUNK_RANGE[1]
    while chunk > CHUNK_RANGE[0] and grows(chunk) > ACTIVATION_BUDGET + kv_layer:
        chunk //= 2
    return chunk


def free_memory(device: str) -> list[int]:
    """Free bytes of each visible GPU, or the available memory of this machine for "cpu"."""
    if device == "cuda":
        return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    import psutil

    return [psutil.virtual_memory().available]


def plan_layers(plan: MemoryPlan, free: list[int], layers: int | None = None) -> list[int] | None:
    """How many consecutive decoder layers each device holds (device 0 also holds embeddings, norm and head), each
    device keeping its layers' weights and KV cache plus one chunk's activations within HEADROOM of its free
    memory; spread in proportion to the room on each device. None when the layers do not fit."""
    layers = layers if layers is not None else plan.kv_cache // max(plan.kv_layer, 1)
    per_layer = plan.layer_weights + plan.kv_layer
    room = [int(f * HEADROOM) - plan.activations - (plan.weights - layers * plan.layer_weights if i == 0 else 0)
            for i, f in enumerate(free)]
    capacity = [max(r // per_layer, 0) if per_layer else layers for r in room]
    if sum(capacity) < layers:
        return None
    counts = [layers * c // sum(capacity) for c in capacity]  # proportional, then the rest where room is left
    for i in sorted(range(len(free)), key=lambda i: capacity[i] - counts[i], reverse=True):
        while sum(counts) < layers and counts[i] < capacity[i]:
            counts[i] += 1
    return counts


def device_map(shape: ModelShape, counts: list[int]) -> dict[str, int]:
    """transformers' device_map for `counts` layers per GPU: the layers in order, everything else on GPU 0 (a tied
    head stays with its embeddings)."""
    out = {name: 0 for name in shape.other_modules}
    layer = 0
    for gpu, n in enumerate(counts):
        for _ in range(n):
            out[f"{shape.layers_name}.{layer}"] = gpu
            layer += 1
    return out


def describe(plan: MemoryPlan) -> str:
    return (f"weights {plan.weights / GIB:.2f} GiB + KV cache {plan.kv_cache / GIB:.2f} GiB ({plan.rows} x "
            f"{plan.length} tokens) + activations {plan.activations / GIB:.2f} GiB (prefill chunk {plan.chunk}) = "
            f"{plan.total / GIB:.2f} GiB")
