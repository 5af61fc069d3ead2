"""Training throughput of 03_continued_pretrain.py's path against the baseline users would write, on synthetic
data and random-init model shapes (no weights needed).

  ours      FSDP2 (bf16 compute, fp32 master + reduce), per-layer activation checkpointing, flattened packed rows
            with document-masked varlen attention (flash-attn or PyTorch varlen), Liger RoPE/RMSNorm/SwiGLU and
            fused linear cross-entropy (the exact building blocks of 03: varlen_attention.py, fsdp_train.py)
  baseline  the same FSDP2 sharding, mixed precision and HF gradient checkpointing, but the HF model's own
            forward with labels (full logits), sdpa attention (plain causal over the row), no Liger, no packing

Each configuration runs in its own subprocess (clean memory; an OOM is caught and marked), with a time limit.
Reports tokens/s, MFU in two conventions (torchtitan 6N + 12*L*H*d*S; causal document-aware), peak memory,
and the longest trainable row length per shape and mode.

Context parallelism (--cp N, "ours" only): each configuration runs under torchrun with --nproc processes
(default N), every row split over N ranks exactly as 03_continued_pretrain.py --cp N does (Ulysses for
document-masked rows, ring for --no-doc-mask); tokens/s is per GPU (all ranks), so compare it with --cp 1 runs
and with docs/benchmarks.md (bench/cp_estimate.py). On a CPU it is a gloo smoke run of the code path, not a speed measurement.

Usage:
    python bench/bench_train.py                                   # CUDA: the full grid; CPU: a tiny smoke run
    python bench/bench_train.py --shapes llama-3.2-1b --seq-lens 65536 --modes ours --steps 4
    python bench/bench_train.py --shapes llama-3.2-1b --max-len-search --modes ours baseline
    python bench/bench_train.py --one '{"shape": "llama-3.2-1b", "seq_len": 16384, "mode": "ours"}'  # one config
    python bench/bench_train.py --shapes llama-3.1-8b --seq-lens 65536 524288 --modes ours --cp 8   # 8 GPUs
    python bench/bench_train.py --shapes llama-3.1-8b --seq-lens 1048576 --modes ours --cp 8 --no-doc-mask
    python bench/bench_train.py --shapes tiny-llama --seq-lens 256 --modes ours --cp 2      # CPU smoke (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_SHAPES = ["llama-3.2-1b", "qwen2.5-1.5b", "llama-3.2-3b", "llama-3.1-8b:num_hidden_layers=4"]
GPU_SEQ_LENS = [8192, 16384, 32768, 65536, 131072, 262144, 524288]


def synthetic_rows(seq_len: int, n_rows: int, vocab: int, docs: str, seed: int):
    """Rows in 01's format. docs="prolong": 60% single-document rows (long code/books), 40% packed short
    documents (exponential lengths, mean 2K); "single": one document per row; "short": all packed short docs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        if docs == "single" or (docs == "prolong" and rng.random() < 0.6):
            lens = [seq_len]
        else:
            lens, left = [], seq_len
            while left > 0:
                n = int(min(left, max(16, rng.exponential(2048))))
                lens.append(n)
                left -= n
        rows.append({"index": i, "input_ids": rng.integers(0, vocab, size=seq_len), "doc_lens": np.array(lens),
                     "num_pad": 0})
    return rows


def build_model(cfg: dict, config, mesh, device, dtype, cp, result: dict):
    """(model, parameter counts, loss implementation) of the configuration's mode; notes the attention path (and
    the cp setting) in `result`."""
    import torch

    import common
    import context_parallel
    import fsdp_train
    import varlen_attention

    cuda = device.type == "cuda"
    if cp.size > 1 and cfg["mode"] != "ours":
        common.fail("the baseline has no context parallelism")
    if cfg["mode"] == "ours":
        liger = cuda and config.model_type in fsdp_train.LIGER_FAMILIES and not cfg.get("no_liger")
        opts = fsdp_train.ModelOptions(attn_implementation=varlen_attention.register_attention(), device=device,
                                       compute_dtype=dtype, liger=liger, activation_checkpointing=cfg.get("ac", True),
                                       seed=0)
        model, info = fsdp_train.prepare_model(config, None, mesh, opts)
        result["attention"] = varlen_attention.check_attention(model, device, dtype, config.vocab_size)
        if cp.size > 1:
            result["cp"] = f"{cp.describe()}; {context_parallel.check_cp_attention(cp, device, dtype, config)}"
        return model, info["params"], "liger" if liger else "chunked"
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    params = fsdp_train.count_params(model)
    if cfg.get("ac", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    fsdp_train.shard_model(model, mesh, fsdp_train.ModelOptions(device=device, compute_dtype=dtype))
    fsdp_train.materialize(model, device, None, seed=0)
    model.train()
    result["attention"] = "sdpa, causal over the whole row"
    return model, params, None


def make_step(cfg: dict, model, optimizer, cp, loss_impl: str | None, device):
    """One optimizer step on one row: ours as 03 runs it (packed row, summed loss over the global token count),
    the baseline as HF computes it (the model's own loss over full logits). Returns the row's attention work."""
    import context_parallel
    import fsdp_train
    import varlen_attention

    doc_mask = cfg.get("doc_mask", True)

    def step(row):
        full = varlen_attention.build_micro_batch([row], cfg["seq_len"], doc_mask=doc_mask)
        mb = context_parallel.shard_micro_batch(full, cp).to(device)
        if cfg["mode"] == "ours":
            with context_parallel.cp_context(mb):
                loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, loss_impl))
                (loss / max(fsdp_train.global_count(mb.n_valid, device), 1)).backward()
        else:
            model(input_ids=mb.input_ids, labels=mb.input_ids, use_cache=False).loss.backward()
        fsdp_train.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return full.attn_sq

    return step


def run_one(cfg: dict) -> dict:
    """One configuration in this process: build, warm up, time `steps` optimizer steps."""
    import torch

    import common
    import context_parallel
    import fsdp_train

    dinfo, mesh = fsdp_train.setup_distributed(None)
    device = dinfo.device
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    seq_len, mode = cfg["seq_len"], cfg["mode"]
    doc_mask = cfg.get("doc_mask", True)
    config = common.config_from_init_spec(cfg["shape"], {"max_position_embeddings": max(seq_len, 8192)})
    result = dict(cfg, device=torch.cuda.get_device_name(device) if cuda else "cpu", ok=False,
                  world_size=dinfo.world_size)
    try:
        cp = context_parallel.setup_context_parallel(cfg.get("cp", 1), config, device, doc_mask=doc_mask,
                                                     attention=cfg.get("cp_attention", "auto"))
        model, params, loss_impl = build_model(cfg, config, mesh, device, dtype, cp, result)
        # AdamW's cost does not depend on which parameters decay: one group
        optimizer = fsdp_train.adamw([{"params": list(model.parameters())}], 1e-5)
        # every data-parallel group gets its own rows; the ranks of a cp group share theirs
        n_rows = cfg["steps"] + cfg["warmup"]
        rows = synthetic_rows(seq_len, n_rows * cp.dp_size, config.vocab_size, cfg["docs"], seed=0)
        rows = rows[cp.dp_rank * n_rows:(cp.dp_rank + 1) * n_rows]
        step = make_step(cfg, model, optimizer, cp, loss_impl, device)
        for row in rows[:cfg["warmup"]]:
            step(row)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        attn_sq = sum(step(row) for row in rows[cfg["warmup"]:])
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cfg.get("profile"):  # the first timed row once more, under the profiler: where the time goes
            result["profile"] = profile_step(lambda: step(rows[cfg["warmup"]]), cuda)
            result["profile"]["docs_in_row"] = len(rows[cfg["warmup"]]["doc_lens"])
        tokens = seq_len * cfg["steps"]  # per data-parallel group; a cp group of N GPUs shares them
        if mode == "baseline" or not doc_mask:  # attention over the whole row
            attn_sq = seq_len * seq_len * cfg["steps"]
        flops = fsdp_train.step_flops(params, config, tokens, seq_len, attn_sq)
        peak = fsdp_train.peak_flops(device)
        per_gpu = cp.size  # GPUs sharing the tokens counted above
        result.update(ok=True, tokens_per_s=tokens / dt / per_gpu, step_time_s=dt / cfg["steps"],
                      mfu_torchtitan=flops["torchtitan"] / dt / per_gpu / peak if peak else None,
                      mfu_causal_doc=flops["causal_doc"] / dt / per_gpu / peak if peak else None,
                      peak_mem_gib=fsdp_train.peak_memory_gib(device), params_m=params["total"] / 1e6)
    except common.UserError as exc:  # e.g. a --cp the heads or the world size cannot take
        result.update(error="refused", detail=str(exc)[:300])
    except torch.cuda.OutOfMemoryError as exc:
        result.update(error="OOM", detail=str(exc).splitlines()[0][:200])
    except RuntimeError as exc:
        msg = str(exc)
        result.update(error="OOM" if "out of memory" in msg.lower() else "error", detail=msg.splitlines()[0][:300])
    return result


KERNEL_KINDS = [  # (kind, substrings of a kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa")),
    ("communication", ("nccl", "allgather", "all_gather", "reduce_scatter", "all_reduce")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("optimizer", ("optimizer", "adam", "multi_tensor_apply")),
    ("copy/cast", ("copy_kernel", "aten::copy", "to_copy", "memcpy", "memset", "catarray", "aten::cat")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    # Triton kernels (Liger's) carry their Python function's name; CUDA C++ kernels a C++ signature
    if not any(c in name for c in " <:("):
        return "triton (liger)"
    return "other elementwise"


def profile_step(run_step, cuda: bool, top: int = 12) -> dict:
    """Run one step under torch.profiler; the top kernels (device time, or CPU ops on a CPU) and the share
    of each kind of kernel in the step's total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run_step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    rows, cpu_ops = [], []
    for e in prof.key_averages():
        on_gpu = "CUDA" in str(getattr(e, "device_type", ""))
        if cuda and not on_gpu:  # host side: the operators that cost the most CPU time themselves
            cpu_ops.append((e.key, e.self_cpu_time_total / 1e3, e.count))
            continue
        if cuda:  # kernels: device time of events that ran on the GPU
            t = getattr(e, "self_device_time_total", None)
            t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append((e.key, t / 1e3, e.count))
    cpu_ops.sort(key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": total, "wall_ms": wall_ms,
            "cpu_top": [{"name": n[:80], "ms": ms, "calls": c} for n, ms, c in cpu_ops[:8]],
            "by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:110], "ms": ms, "calls": c, "share": ms / total} for n, ms, c in rows[:top]]}


def fmt_profile(r: dict) -> str:
    prof = r["profile"]
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof["by_kind"].items())
    lines = [f"profile {r['shape']} @ {r['seq_len']:,} {r['mode']} ({prof.get('docs_in_row', '?')} documents in the "
             f"row): {prof['wall_ms']:.0f} ms wall (profiled), {prof['total_ms']:.0f} ms of kernels; {kinds}"]
    lines += [f"  {k['share']:6.1%} {k['ms']:9.1f} ms {k['calls']:6d}x  {k['name']}" for k in prof["top"]]
    lines += [f"  host {k['ms']:9.1f} ms {k['calls']:6d}x  {k['name']}" for k in prof.get("cpu_top", [])]
    return "\n".join(lines)


def fmt(r: dict) -> str:
    mode = r["mode"]
    if r.get("cp_size", 1) > 1:
        mode += f" cp{r['cp_size']}"
    if not r.get("doc_mask", True):
        mode += " nomask"
    if not r.get("ac", True):
        mode += " noAC"
    if not r.get("ok"):
        return (f"| {r['shape']} | {r['seq_len']:,} | {mode} | {r.get('error', 'failed')} | | | | |")
    mfu = lambda x: f"{x:.1%}" if x is not None else "n/a"  # noqa: E731
    return (f"| {r['shape']} | {r['seq_len']:,} | {mode} | {r['tokens_per_s']:,.0f} | "
            f"{mfu(r['mfu_torchtitan'])} | {mfu(r['mfu_causal_doc'])} | {r['peak_mem_gib']:.1f} | "
            f"{r['step_time_s']:.2f} |")


HEADER = ("| shape | seq len | mode | tokens/s/GPU | MFU (torchtitan) | MFU (causal doc) | peak GiB | s/step |\n"
          "|---|---|---|---|---|---|---|---|")


def spawn(cfg: dict, time_limit: float) -> dict:
    nproc = cfg.get("nproc", 1)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, __file__, "--one", json.dumps(cfg)]
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                  "expandable_segments:True"))
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(cfg, ok=False, error=f"timeout {time_limit:.0f}s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "out of memory" in (proc.stderr or "").lower()
    return dict(cfg, ok=False, error="OOM" if oom else f"exit {proc.returncode}", detail=" / ".join(tail)[:300])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="shape names (common.KNOWN_SHAPES, :k=v)")
    p.add_argument("--seq-lens", nargs="+", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=["ours", "baseline"], choices=["ours", "baseline"])
    p.add_argument("--docs", default="prolong", choices=["prolong", "single", "short"],
                   help="document lengths inside the synthetic rows")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--no-liger", action="store_true", help="ours without Liger (chunked CE)")
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="document-masked attention (ProLong); --no-doc-mask: causal over the whole row (UltraLong)")
    p.add_argument("--cp", type=int, default=1,
                   help="context parallelism: split each row over N ranks (ours only; runs under torchrun)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (GPUs) per configuration under torchrun (default: --cp); a multiple of --cp")
    p.add_argument("--cp-attention", choices=["auto", "ulysses", "ring"], default="auto",
                   help="auto: ulysses with document masking, ring without")
    p.add_argument("--time-limit", type=float, default=900, help="seconds per configuration")
    p.add_argument("--max-len-search", action="store_true",
                   help="per shape and mode, stop at the first failing length (the longest trainable length)")
    p.add_argument("--no-ac", action="store_true",
                   help="no activation checkpointing (both modes): what recomputation costs where memory allows")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step of each configuration and print its top kernels")
    p.add_argument("--json", default=None, help="append results as JSON lines to this file")
    p.add_argument("--md", default=None, help="append the markdown table to this file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print RESULT
    args = p.parse_args(argv)
    args.nproc = args.nproc or args.cp
    if args.cp < 1 or args.nproc % args.cp:
        p.error(f"--nproc {args.nproc} must be a multiple of --cp {args.cp}")
    if args.cp > 1 and "baseline" in args.modes and not args.one:
        p.error("--cp applies to ours only: pass --modes ours")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        result = run_one(json.loads(args.one))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    nproc = args.nproc

    import torch

    cuda = torch.cuda.is_available()
    shapes = args.shapes or (GPU_SHAPES if cuda else ["tiny-llama"])
    seq_lens = args.seq_lens or (GPU_SEQ_LENS if cuda else [256, 512])
    print(f"# bench_train: {'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU smoke run'}, torch "
          f"{torch.__version__}; docs={args.docs}, doc mask {'on' if args.doc_mask else 'off'}, {args.steps} timed "
          f"steps after {args.warmup}; {nproc} process(es), cp {args.cp}")
    print(HEADER, flush=True)
    results = []
    for shape in shapes:
        for mode in args.modes:
            longest = None
            for seq_len in sorted(seq_lens):
                cfg = {"shape": shape, "seq_len": seq_len, "mode": mode, "steps": args.steps,
                       "warmup": args.warmup, "docs": args.docs, "no_liger": args.no_liger,
                       "doc_mask": args.doc_mask, "cp": args.cp, "cp_size": args.cp, "nproc": nproc,
                       "cp_attention": args.cp_attention, "profile": args.profile,
                       "ac": not args.no_ac}
                r = spawn(cfg, args.time_limit)
                results.append(r)
                print(fmt(r), flush=True)
                if r.get("profile"):
                    print(fmt_profile(r), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
                if r.get("ok"):
                    longest = seq_len
                elif args.max_len_search:
                    break
            print(f"<!-- {shape} {mode}: longest trainable row {longest if longest else 'none'} -->", flush=True)
    # side by side: ours / baseline speed-up per shape and length
    by = {(r["shape"], r["seq_len"], r["mode"]): r for r in results if r.get("ok")}
    lines = []
    for (shape, n, mode), r in sorted(by.items()):
        b = by.get((shape, n, "baseline"))
        if mode == "ours" and b:
            lines.append(f"{shape} @ {n:,}: ours/baseline tokens/s = {r['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    for ln in lines:
        print(ln)
    if args.md:
        with open(args.md, "a") as f:
            f.write(HEADER + "\n" + "\n".join(fmt(r) for r in results) + "\n\n" + "\n".join(lines) + "\n")
    return 0 if any(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
