"""The fit planner (memory_plan.py) against measured peak memory, and what --ac-every, --offload-activations,
--tiled-mlp and --cp change, on CPU runs of 03's training step (fp32, the CPU reference attention, chunked
cross-entropy).

Each configuration runs in its own process (two under torchrun for --cp 2, rank 0 reported): the model and
optimizer of 03 (fsdp_train.prepare_model, FSDP2; activation_memory.checkpoint_layers for the checkpointing
variants, activation_memory.tile_mlp for the tiled MLP; context_parallel's Ulysses split for cp 2), two optimizer
steps on rows of packed 256-token documents (512-token ones for the long rows), under torch.profiler with memory
profiling from before the model is built. The measured peak is the largest "Total Allocated" the profiler
reports (every tensor byte torch allocated and not yet freed), so Python, libraries and memory-mapped data are not
counted. The planner's prediction for the same setting is printed beside it.

Offload on a CPU: the checkpointed layer inputs are copied into numpy arrays, memory torch's allocator does not
own, as a GPU run copies them into host memory its device allocator does not own; so the measured peak shows what
the offload saves on a GPU (the same hooks, activation_memory's, with another destination), and the bytes the
hooks saw are printed.

Usage:
    OMP_NUM_THREADS=1 python bench/memory_plan_check.py               # the planner table in docs/benchmarks.md
    OMP_NUM_THREADS=1 nice python bench/memory_plan_check.py --grid long   # 16K / 64K rows, each option alone
    python bench/memory_plan_check.py --one '{"shape": "a", "seq_len": 2048, "ac_every": 1, "offload": false}'
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory_plan  # noqa: E402

# tiny Llama shapes: a with grouped-query attention, b tied and without; c for long rows, its MLP 4x the hidden
# size as in Llama-3.2-1B, two layers to keep a 64K-token step short. Vocabularies small enough that the layers,
# not the logits, decide the peak, as they do at long lengths on real models
SHAPES = {
    "a": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=704, vocab_size=2048, tie_word_embeddings=False),
    "b": dict(num_hidden_layers=3, hidden_size=384, num_attention_heads=6, num_key_value_heads=6, head_dim=64,
              intermediate_size=1024, vocab_size=4096, tie_word_embeddings=True),
    "c": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
              intermediate_size=512, vocab_size=2048, tie_word_embeddings=False),
}
LOSS_CHUNK = 1024
DEFAULTS = {"ac_every": 1, "offload": False, "tiled": 0, "cp": 1, "doc_len": 256}
GRIDS = {
    # the planner's components: checkpointing every layer, every 2, none, and offload
    "fit": [dict(shape=shape, seq_len=seq_len, ac_every=ac, offload=offload) for shape in ("a", "b")
            for seq_len in (2048, 8192) for ac, offload in ((1, False), (2, False), (0, False), (1, True))],
    # the longest rows: every layer checkpointed, then each option alone and all together
    # (documents of 512 tokens, so that the reference attention's probabilities stay below the MLP's activations
    # as flash attention's do on a GPU; 16 slices, where auto would cut this tiny hidden size's rows into 128-
    # to 512-token slices, far more calls than the memory needs)
    "long": [dict(shape="c", seq_len=seq_len, doc_len=512, **options) for seq_len in (16384, 65536)
             for options in ({}, {"tiled": 16}, {"offload": True}, {"cp": 2}, {"tiled": 16, "offload": True, "cp": 2})],
}


def config_for(shape: str, seq_len: int):
    import common

    spec = ",".join(f"{k}={json.dumps(v)}" for k, v in SHAPES[shape].items())
    return common.config_from_init_spec(f"tiny-llama:{spec}", {"max_position_embeddings": seq_len})


def numpy_host_hooks(stats):
    """activation_memory's offload hooks with numpy arrays as the host: memory outside torch's allocator."""
    import numpy as np
    import torch

    import activation_memory

    class NumpyHost(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, stats_=stats):
            def pack(t):
                stats_.saved_bytes += t.numel() * t.element_size()
                stats_.offloaded_bytes += t.numel() * t.element_size()
                return np.array(t.detach().numpy(), copy=True)

            super().__init__(pack, torch.from_numpy)

    activation_memory._SaveOnHost = NumpyHost


def build(cfg: dict, config, mesh):
    """03's model for this configuration: (model, offload stats)."""
    import torch

    import activation_memory
    import fsdp_train
    import varlen_attention

    opts = fsdp_train.ModelOptions(device=torch.device("cpu"), activation_checkpointing=False,
                                   attn_implementation=varlen_attention.register_attention())
    model, _ = fsdp_train.prepare_model(config, None, mesh, opts)
    stats = activation_memory.OffloadStats()
    if cfg["ac_every"]:
        stats = activation_memory.checkpoint_layers(model.get_decoder().layers, cfg["ac_every"], cfg["offload"])
        if cfg["offload"]:
            numpy_host_hooks(stats)
    if cfg["tiled"]:
        activation_memory.tile_mlp(model.get_decoder().layers, setting_for(cfg).chunks(shape_for(cfg)))
    return model, stats


def measure(cfg: dict) -> dict:
    """One configuration in this process: two steps under the profiler; the peak of torch's allocations."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import context_parallel
    import fsdp_train
    import varlen_attention

    seq_len = cfg["seq_len"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, mesh = fsdp_train.setup_distributed("cpu")
        config = config_for(cfg["shape"], seq_len)
        cp = context_parallel.setup_context_parallel(cfg["cp"], config, torch.device("cpu"))
        model, stats = build(cfg, config, mesh)
        optimizer = fsdp_train.adamw([{"params": list(model.parameters())}], 1e-4)  # states as 03's, one group
        rng = np.random.default_rng(0)
        for step in range(2):
            stats.reset()
            row = {"index": step, "input_ids": rng.integers(0, config.vocab_size, seq_len),
                   "doc_lens": [cfg["doc_len"]] * (seq_len // cfg["doc_len"]), "num_pad": 0}
            mb = context_parallel.shard_micro_batch(varlen_attention.build_micro_batch([row], seq_len), cp)
            loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, "chunked", LOSS_CHUNK))
            (loss / mb.n_valid).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {**cfg, "measured": profiled_peak(prof), "saved_bytes": stats.saved_bytes}


def profiled_peak(prof) -> int:
    """The largest "Total Allocated" of a CPU memory profile: the running sum of the sizes of its memory events
    (a free is negative; the profiler reports only blocks allocated while it runs), in time order, read from the
    raw events: building the profiler's event tree for a 64K-token step would take gigabytes."""
    import torch

    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def shape_for(cfg: dict) -> memory_plan.Shape:
    s = SHAPES[cfg["shape"]]
    return memory_plan.Shape(layers=s["num_hidden_layers"], hidden=s["hidden_size"],
                             heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"],
                             head_dim=s["head_dim"], ffn=s["intermediate_size"], vocab=s["vocab_size"],
                             tied=s["tie_word_embeddings"])


def setting_for(cfg: dict) -> memory_plan.Setting:
    """The planner's setting of a CPU run: fp32, HF's norm and MLP, the reference attention, chunked CE."""
    return memory_plan.Setting(seq_len=cfg["seq_len"], gpus=cfg["cp"], cp=cfg["cp"], ac_every=cfg["ac_every"],
                               offload=cfg["offload"], tiled_mlp=cfg["tiled"], compute_bytes=4, liger=False,
                               attention="reference", doc_len=cfg["doc_len"], loss_chunk=LOSS_CHUNK)


def predict(cfg: dict) -> float:
    return memory_plan.estimate(shape_for(cfg), setting_for(cfg))["total"]


def describe(cfg: dict) -> str:
    ac = cfg["ac_every"]
    words = ["no AC" if ac == 0 else "AC every layer" if ac == 1 else f"AC every {ac}"]
    if cfg["tiled"]:
        words.append(f"tiled MLP {setting_for(cfg).chunks(shape_for(cfg))}")
    if cfg["offload"]:
        words.append("offload")
    if cfg["cp"] > 1:
        words.append(f"cp {cfg['cp']}")
    return " + ".join(words)


def run_one(cfg: dict, env: dict) -> dict | str:
    """Measure one configuration in a fresh process (torchrun for cp > 1): its result, or why it failed. Blocks
    of 128 KiB and more come straight from mmap and go back on free: the profiler's records, scattered through
    the heap, otherwise keep freed blocks resident (20 GB for a 64K-token row whose tensors peak at 1.6 GB)."""
    one = [__file__, "--one", json.dumps(cfg)]
    env = dict(env, MALLOC_MMAP_THRESHOLD_="131072")
    if cfg["cp"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg['cp']}", *one]
    else:
        cmd = [sys.executable, *one]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else f"failed: {proc.stderr.strip().splitlines()[-1:]}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default="fit",
                   help="fit: the planner's components at 2K / 8K; long: 16K / 64K rows, each option alone and all")
    p.add_argument("--one", default=None, help="run one configuration (JSON) in this process and print its result")
    args = p.parse_args()
    if args.one:
        result = measure({**DEFAULTS, **json.loads(args.one)})
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    print("| shape | seq len | setting | predicted MiB | measured MiB | error | saved vs every layer checkpointed "
          "| layer inputs the offload hooks saw, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    worst, base = 0.0, {}
    for cfg in (dict(DEFAULTS, **c) for c in GRIDS[args.grid]):
        r = run_one(cfg, env)
        if isinstance(r, str):
            print(f"| {cfg['shape']} | {cfg['seq_len']:,} | {describe(cfg)}: {r} | | | | | |")
            continue
        pred = predict(cfg)
        err = pred / r["measured"] - 1
        worst = max(worst, abs(err))
        key = (cfg["shape"], cfg["seq_len"])
        plain = cfg["ac_every"] == 1 and not (cfg["tiled"] or cfg["offload"] or cfg["cp"] > 1)
        base.setdefault(key, r["measured"] if plain else None)
        saved = ""
        if not plain and base[key]:  # against every layer checkpointed, the same shape and row length
            saved = f"{(base[key] - r['measured']) / 2**20:,.1f} MiB ({1 - r['measured'] / base[key]:.0%})"
        seen = f"{r['saved_bytes'] / 2**20:,.1f}" if cfg["offload"] else ""
        print(f"| {cfg['shape']} | {cfg['seq_len']:,} | {describe(cfg)} | {pred / 2**20:,.1f} | "
              f"{r['measured'] / 2**20:,.1f} | {err:+.1%} | {saved} | {seen} |", flush=True)
    print(f"\nlargest error: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
