"""long_inference.py and 05's chunked prefill: the KV cache and weights it plans equal what a model really holds, the
layers it places fit every device, and generation prefilled in chunks gives one full forward's logits and tokens."""
import pytest
import torch

import common
import long_inference as li
from lc_testutil import load_script

ev = load_script("05_eval")


def test_planned_kv_cache_and_weights_equal_what_the_model_holds(tiny_llama_dir):
    model = common.load_model(tiny_llama_dir, dtype=torch.float32)
    shape = li.model_shape(model.config)
    plan = li.memory_plan(shape, 100, torch.float32, 32, "sdpa", "cpu", rows=2)
    with torch.no_grad():
        out = model(torch.randint(5, 500, (2, 100)), use_cache=True)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert plan.kv_cache == held and plan.kv_layer * shape.layers == held
    assert plan.weights == sum(p.nbytes for p in model.parameters())
    assert plan.chunk == 32 and li.memory_plan(shape, 20, torch.float32, 32, "sdpa", "cpu").chunk == 20
    assert plan.total == plan.weights + plan.kv_cache + plan.activations


def test_layers_spread_over_gpus_fit_each_one_and_cover_the_model():
    shape = li.model_shape(common.config_from_init_spec("llama-3.1-8b"))
    gib = li.GIB
    plan = li.memory_plan(shape, 1 << 20, torch.bfloat16, 1024, "sdpa", "cuda")
    assert plan.kv_cache == 128 * gib  # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes x 1M tokens
    assert li.plan_layers(plan, [80 * gib]) is None  # one 80 GB GPU cannot hold 1M tokens
    for free in ([80 * gib] * 8, [80 * gib] * 4, [40 * gib, 80 * gib, 80 * gib, 24 * gib]):
        counts = li.plan_layers(plan, free)
        assert counts is not None and sum(counts) == 32
        for i, (n, f) in enumerate(zip(counts, free)):  # recomputed here: each device's load within its headroom
            load = n * (plan.layer_weights + plan.kv_layer) + plan.activations
            load += (plan.weights - 32 * plan.layer_weights) if i == 0 else 0
            assert load <= 0.9 * f, (free, counts)
    assert li.plan_layers(plan, [80 * gib] * 8) == [4] * 8  # equal devices: equal shares
    dmap = li.device_map(shape, [4] * 8)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(common.config_from_init_spec("llama-3.1-8b"))
    for name, _ in model.named_parameters():  # every weight has a device; layers in order over the GPUs
        assert any(name == k or name.startswith(k + ".") for k in dmap), name
    assert [dmap[f"model.layers.{i}"] for i in range(32)] == sorted(dmap[f"model.layers.{i}"] for i in range(32))


def test_default_prefill_chunk_shrinks_with_the_length_but_not_for_flash_attention():
    shape = li.model_shape(common.config_from_init_spec("llama-3.1-8b"))
    chunks = [li.default_prefill_chunk(shape, L, torch.bfloat16, "sdpa", "cuda") for L in (8192, 131072, 1 << 20)]
    assert chunks == sorted(chunks, reverse=True) and all(c & (c - 1) == 0 and 256 <= c <= 8192 for c in chunks)
    assert chunks[0] > chunks[-1]
    assert li.default_prefill_chunk(shape, 1 << 20, torch.bfloat16, "flash_attention_2", "cuda") == 8192


@pytest.mark.parametrize("chunk", [16])
def test_chunked_prefill_gives_the_full_forwards_logits_and_generation(tiny_llama_dir, chunk):
    """Two left-padded rows (45 and 30 tokens) prefilled in chunks of 16 tokens (3 chunks, the last one short)
    through the KV cache: every generated step's logits equal those of one full forward (fp32, 1e-5), and so do
    the greedy tokens; the model really saw no more than `chunk` tokens at once."""
    torch.manual_seed(0)
    tok = common.load_tokenizer(tiny_llama_dir)
    model = common.load_model(tiny_llama_dir, dtype=torch.float32)
    rows = [torch.randint(5, 1000, (45,)).tolist(), torch.randint(5, 1000, (30,)).tolist()]
    widths = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    ids = torch.tensor([[0] * 15 + rows[1], rows[0]][::-1])
    mask = torch.tensor([[1] * 45, [0] * 15 + [1] * 30])

    def run(prefill):
        config, blank = ev.greedy_config(model, tok, 6, prefill)
        config.eos_token_id = None  # six tokens each, whatever they are
        widths.clear()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                                 return_dict_in_generate=True)
        return out, list(widths)

    full, full_widths = run(None)
    chunked, chunk_widths = run(chunk)
    hook.remove()
    assert full_widths[0] == 45 and max(chunk_widths) == chunk and len(chunk_widths) > len(full_widths)
    for a, b in zip(full.logits, chunked.logits):
        assert (a - b).abs().max().item() < 1e-5
    assert torch.equal(full.sequences, chunked.sequences)
    # 05's own generation path gives the same text with and without chunks
    texts = [ev.generate_batch(model, tok, rows, 6, prefill_chunk=c) for c in (None, chunk)]
    assert texts[0] == texts[1]
