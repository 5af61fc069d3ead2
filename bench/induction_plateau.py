"""How many steps before the demo's base model shape learns to copy (the induction plateau), on CPU.

Needle retrieval is induction: find the earlier occurrence of the current token and copy the token after it.
A first demo base (256-token rows) never learnt it in 2,500 steps; the committed one (assets/demo_base) learnt it
after ~3,250 steps of short documents (docs/benchmarks.md). This measures the skill in its purest form, on the
same model shape, before a long training is spent: rows of random tokens in which a random span is repeated
once; every token of the repeat after its first is predictable only by copying. Copy accuracy (argmax == the
copied token) on held-out rows, at several row lengths, every --eval-every steps.

A schedule `32:800,128:600` trains 800 steps on 32-token rows, then 600 on 128-token rows (a length
curriculum); `16+32+64:2000` alternates the three lengths step after step; the tokens per step stay
--batch-tokens. Chance is 1/--vocab. --init-std and --set change the shape's init scale and sizes.

Usage:
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 32:600          # rows of 32 tokens
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 128:600 --vocab 1500
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 32:800,128:600 --vocab 200
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 16+32+64:2000 --vocab 200
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 64:400 --vocab 200 --init-std 0.08
    OMP_NUM_THREADS=1 python bench/induction_plateau.py --schedule 32:400 --vocab 200 \\
        --set num_attention_heads=2 --set num_key_value_heads=2 --set head_dim=64
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def shape_override(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    if not key or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=INT, e.g. hidden_size=256")
    return key, int(value)


def schedule(text: str) -> list[tuple[list[int], int]]:
    """LEN:STEPS[,...]; a LEN may be LEN+LEN+... for rows of those lengths in turn, step after step."""
    try:
        phases = [([int(v) for v in lens.split("+")], int(steps))
                  for lens, _, steps in (p.partition(":") for p in text.split(","))]
    except ValueError:
        phases = []
    if not phases or any(n < 1 or min(lens) < 2 for lens, n in phases):
        raise argparse.ArgumentTypeError(f"{text!r} is not LEN:STEPS[,LEN:STEPS...], e.g. 32:600 or 16+32:600")
    return phases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--shape", default=str(ROOT / "assets/demo_base/config.json"),
                   help="config.json whose shape is trained from scratch (default: the demo base's)")
    g.add_argument("--arch", choices=["llama", "qwen2"], default="llama",
                   help="llama (no biases) or qwen2 (the same shape with q/k/v biases)")
    g.add_argument("--layers", type=int, default=None, help="override the number of layers")
    g.add_argument("--tie", action="store_true", help="tie the input and output embeddings")
    g.add_argument("--init-std", type=float, default=None,
                   help="initializer_range of the weights (default: the shape's, 0.02 for Llama)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=INT", type=shape_override,
                   help="override one integer of the shape, e.g. hidden_size=256 (repeatable)")
    g = p.add_argument_group("task")
    g.add_argument("--schedule", default="32:600", type=schedule,
                   help="LEN:STEPS[,LEN:STEPS...] row length per phase; LEN+LEN:STEPS alternates lengths")
    g.add_argument("--vocab", type=int, default=100, help="distinct random tokens (default: 100)")
    g.add_argument("--copies-only", action="store_true", help="loss on the copied tokens only")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (default: 4096)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default: 3e-3)")
    g.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default: 50)")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (default: 100)")
    g.add_argument("--eval-lens", default="32,128,256", help="row lengths evaluated (default: 32,128,256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init and the data (default: 0)")
    return p.parse_args(argv)


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = json.loads(Path(args.shape).read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta")
    kw = {k: shape[k] for k in keep if k in shape}
    kw.update(max_position_embeddings=max(512, shape.get("max_position_embeddings", 0)), tie_word_embeddings=args.tie)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    if args.init_std:
        kw["initializer_range"] = args.init_std
    kw.update(args.set)
    config = AutoConfig.for_model(args.arch, **kw)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), config.vocab_size


def repeat_rows(n: int, seq: int, vocab: int, gen: torch.Generator):
    """n rows of `seq` random tokens (ids 3..vocab+2) in which a span of 8..seq/2 tokens is repeated once.
    Returns the ids and the mask of the positions predictable only by copying (the repeat minus its first)."""
    x = torch.randint(3, 3 + vocab, (n, seq), generator=gen)
    mask = torch.zeros(n, seq, dtype=torch.bool)
    spans = torch.randint(min(8, seq // 2), seq // 2 + 1, (n,), generator=gen)
    for i, span in enumerate(spans.tolist()):
        off = int(torch.randint(0, seq - 2 * span + 1, (1,), generator=gen))
        x[i, off + span:off + 2 * span] = x[i, off:off + span]
        mask[i, off + span + 1:off + 2 * span] = True
    return x, mask


def main(argv=None) -> int:
    args = parse_args(argv)
    phases = args.schedule
    model, vocab_size = build_model(args)
    if args.vocab + 3 > vocab_size:
        sys.exit(f"error: --vocab {args.vocab} needs a vocabulary of {args.vocab + 3}; the shape has {vocab_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = {L: repeat_rows(32, L, args.vocab, torch.Generator().manual_seed(10_000 + L))
                for L in map(int, args.eval_lens.split(","))}
    ends = list(itertools.accumulate(n for _, n in phases))
    plan = ",".join("+".join(map(str, lens)) + f":{n}" for lens, n in phases)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.arch}, schedule {plan}, vocab "
          f"{args.vocab}, {args.batch_tokens} tokens/step, lr {args.lr}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows, t0 = [], time.perf_counter()
    for step in range(1, ends[-1] + 1):
        lens = next(lens for (lens, _), end in zip(phases, ends) if step <= end)
        seq = lens[step % len(lens)]
        x, mask = repeat_rows(max(1, args.batch_tokens // seq), seq, args.vocab, gen)
        targets = x[:, 1:].clone()
        if args.copies_only:
            targets[~mask[:, 1:]] = -100
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        logits = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                acc = {L: (model(input_ids=hx).logits[:, :-1].argmax(-1) == hx[:, 1:])[hm[:, 1:]].float().mean()
                       .item() for L, (hx, hm) in held_out.items()}
            rows.append((step, seq, loss.item(), acc, time.perf_counter() - t0))
            print(json.dumps({"step": step, "seq": seq, "loss": round(loss.item(), 3),
                              "copy_acc": {L: round(a, 3) for L, a in acc.items()}}), flush=True)
    lens = list(held_out)
    print("\n| step | training rows | loss | " + " | ".join(f"copy acc @{L}" for L in lens) + " | time |")
    print("|---|---|---|" + "---|" * len(lens) + "---|")
    for step, seq, loss, acc, t in rows:
        print(f"| {step} | {seq} | {loss:.3f} | " + " | ".join(f"{100 * acc[L]:.1f}%" for L in lens)
              + f" | {t / 60:.1f} min |")
    print(f"(chance {100 / args.vocab:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
