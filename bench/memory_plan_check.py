"""The fit planner (memory_plan.py) against measured peak memory, and what --ac-every and --offload-activations
change, on CPU runs of 03's training step (fp32, the CPU reference attention, chunked cross-entropy).

Each configuration runs in its own process: the model and optimizer of 03 (fsdp_train.prepare_model, FSDP2 on one
rank; activation_memory.checkpoint_layers for the checkpointing variants), two optimizer steps on rows of packed
256-token documents, under torch.profiler with memory profiling from before the model is built. The measured peak
is the largest "Total Allocated" the profiler reports (every tensor byte torch allocated and not yet freed), so
Python, libraries and memory-mapped data are not counted. The planner's prediction for the same setting is
printed beside it, with the bytes of layer inputs the offload hooks saw (what --offload-activations moves off a
GPU; on a CPU nothing moves).

Usage:
    OMP_NUM_THREADS=1 python bench/memory_plan_check.py                 # the table in docs/benchmarks.md
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

# two tiny Llama shapes (one with grouped-query attention, one tied and without); vocabularies small enough that
# the layers, not the logits, decide the peak, as they do at long lengths on real models
SHAPES = {
    "a": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              intermediate_size=704, vocab_size=2048, tie_word_embeddings=False),
    "b": dict(num_hidden_layers=3, hidden_size=384, num_attention_heads=6, num_key_value_heads=6, head_dim=64,
              intermediate_size=1024, vocab_size=4096, tie_word_embeddings=True),
}
DOC_LEN = 256
LOSS_CHUNK = 1024
GRID = [(shape, seq_len, ac, offload) for shape in SHAPES for seq_len in (2048, 8192)
        for ac, offload in ((1, False), (2, False), (0, False), (1, True))]


def config_for(shape: str, seq_len: int):
    import common

    spec = ",".join(f"{k}={json.dumps(v)}" for k, v in SHAPES[shape].items())
    return common.config_from_init_spec(f"tiny-llama:{spec}", {"max_position_embeddings": seq_len})


def measure(cfg: dict) -> dict:
    """One configuration in this process: two steps under the profiler; the peak of torch's allocations."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    import activation_memory
    import fsdp_train
    import varlen_attention

    seq_len = cfg["seq_len"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, mesh = fsdp_train.setup_distributed("cpu")
        config = config_for(cfg["shape"], seq_len)
        opts = fsdp_train.ModelOptions(device=torch.device("cpu"), activation_checkpointing=False,
                                       attn_implementation=varlen_attention.register_attention())
        model, _ = fsdp_train.prepare_model(config, None, mesh, opts)
        stats = activation_memory.OffloadStats()
        if cfg["ac_every"]:
            stats = activation_memory.checkpoint_layers(model.get_decoder().layers, cfg["ac_every"], cfg["offload"])
        optimizer = fsdp_train.adamw([{"params": list(model.parameters())}], 1e-4)  # states as 03's, one group
        rng = np.random.default_rng(0)
        for step in range(2):
            stats.reset()
            row = {"index": step, "input_ids": rng.integers(0, config.vocab_size, seq_len),
                   "doc_lens": [DOC_LEN] * (seq_len // DOC_LEN), "num_pad": 0}
            mb = varlen_attention.build_micro_batch([row], seq_len)
            loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, "chunked", LOSS_CHUNK))
            (loss / mb.n_valid).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = 0
    for event in prof.events():
        if event.name == "[memory]" and event.device_type == torch.autograd.DeviceType.CPU:
            peak = max(peak, getattr(event, "total_allocated", 0) or 0)
    if not peak:  # older profilers: the chrome trace has it
        trace = Path(f"/tmp/memory_plan_check_{os.getpid()}.json")
        prof.export_chrome_trace(str(trace))
        peak = max(e["args"].get("Total Allocated", 0) for e in json.loads(trace.read_text())["traceEvents"]
                   if e.get("name") == "[memory]")
        trace.unlink()
    return {**cfg, "measured": peak, "saved_bytes": stats.saved_bytes}


def predict(cfg: dict) -> float:
    s = SHAPES[cfg["shape"]]
    shape = memory_plan.Shape(layers=s["num_hidden_layers"], hidden=s["hidden_size"],
                              heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"],
                              head_dim=s["head_dim"], ffn=s["intermediate_size"], vocab=s["vocab_size"],
                              tied=s["tie_word_embeddings"])
    # offload on a CPU: the hooks run, nothing leaves the device (it IS host memory), so predict without it
    setting = memory_plan.Setting(seq_len=cfg["seq_len"], ac_every=cfg["ac_every"], offload=False,
                                  compute_bytes=4, liger=False, attention="reference", doc_len=DOC_LEN,
                                  loss_chunk=LOSS_CHUNK)
    return memory_plan.estimate(shape, setting)["total"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", default=None, help="run one configuration (JSON) in this process and print its result")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one))), flush=True)
        return 0
    print("| shape | seq len | setting | predicted MiB | measured MiB | error | checkpointed inputs seen by the "
          "offload hooks, MiB |")
    print("|---|---|---|---|---|---|---|")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    worst = 0.0
    for shape, seq_len, ac, offload in GRID:
        cfg = {"shape": shape, "seq_len": seq_len, "ac_every": ac, "offload": offload}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"| {shape} | {seq_len:,} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        r = json.loads(line[7:])
        pred = predict(cfg)
        err = pred / r["measured"] - 1
        worst = max(worst, abs(err))
        setting = ("no AC" if ac == 0 else "AC every layer" if ac == 1 else f"AC every {ac}") + \
            (" + offload" if offload else "")
        print(f"| {shape} | {seq_len:,} | {setting} | {pred / 2**20:,.1f} | {r['measured'] / 2**20:,.1f} | "
              f"{err:+.1%} | {r['saved_bytes'] / 2**20:,.1f} |", flush=True)
    print(f"\nlargest error: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
