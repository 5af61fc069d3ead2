"""Peak memory of a prefill at 1x and 4x the chunk on a CPU: with chunked prefill only the KV cache should grow.

Each measurement runs in a fresh process: load the model, run a short warm-up generation, then generate one token
after a random prompt of the given length (05's greedy_config, with or without --prefill-chunk) while a thread
samples the process's resident memory every millisecond. The table gives the peak above the memory held before
the prompt, beside long_inference's plan (KV cache, activations); the last lines compare the growth from 1x to 4x
the chunk with the KV cache's own growth.

Usage:
    python bench/prefill_memory.py --model .cache/smollm2-135m-instruct --chunk 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 ** 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("what to measure")
    g.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"),
                   help="HF model directory (default: the tests' SmolLM2-135M-Instruct in .cache)")
    g.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens; lengths are 1x and 4x it "
                                                          "(default: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default: 0)")
    g.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "LENGTH:CHUNK" for one measurement
    return parser.parse_args(argv)


def measure(model_dir: str, length: int, chunk: int, seed: int) -> dict:
    """One measurement in this process: peak resident bytes above the level before the prompt."""
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    import importlib.util

    import common

    spec = importlib.util.spec_from_file_location("eval05", ROOT / "05_eval.py")  # 05's generation config
    ev = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
    spec.loader.exec_module(ev)
    torch.manual_seed(seed)
    tok = common.load_tokenizer(model_dir)
    model = common.load_model(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(10, model.config.vocab_size - 10, (1, length))
    config, blank = ev.greedy_config(model, tok, 1, chunk or None)
    config.eos_token_id = None
    with torch.no_grad():
        model.generate(input_ids=ids[:, :64], attention_mask=torch.ones(1, 64, dtype=torch.long),
                       generation_config=config)  # warm-up: kernels and allocator caches
    proc, peak, running = psutil.Process(), [0], [True]
    base = proc.memory_info().rss

    def sample():
        while running[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    seconds = time.perf_counter() - t0
    running[0] = False
    thread.join()
    return {"peak_above_base": max(peak[0], proc.memory_info().rss) - base, "seconds": seconds}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        length, chunk = (int(x) for x in args.child.split(":"))
        print(json.dumps(measure(args.model, length, chunk, args.seed)))
        return
    import torch

    sys.path.insert(0, str(ROOT))
    import common
    import long_inference as li

    shape = li.model_shape(common.load_config(args.model))
    rows, growth = [], {}
    for mode, chunk in (("chunked", args.chunk), ("one forward", 0)):
        for length in (args.chunk, 4 * args.chunk):
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--seed", str(args.seed),
                                  "--child", f"{length}:{chunk}"], env=env, capture_output=True, text=True,
                                 check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            plan = li.memory_plan(shape, length, torch.float32, chunk, "sdpa", "cpu")
            growth.setdefault(mode, []).append((m["peak_above_base"], plan.kv_cache))
            rows.append(f"| {mode} | {length} | {min(chunk or length, length)} | {m['peak_above_base'] / MIB:.1f} | "
                        f"{plan.kv_cache / MIB:.1f} | {plan.activations / MIB:.1f} | {m['seconds']:.2f} |")
    print(f"prefill peak memory on CPU, {args.model}, float32, sdpa (one fresh process per row)\n")
    print("| mode | prompt tokens | chunk | peak above base (MiB) | planned KV cache (MiB) | planned activations "
          "(MiB) | seconds |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows) + "\n")
    for mode, ((p1, kv1), (p4, kv4)) in growth.items():
        print(f"{mode}: peak grows {(p4 - p1) / MIB:.1f} MiB from {args.chunk} to {4 * args.chunk} tokens; the KV "
              f"cache grows {(kv4 - kv1) / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
