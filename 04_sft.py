"""Stage 04: win back short-context quality after a context extension, by short instruction tuning (ProLong:
UltraChat; UltraLong: conversations under 8K tokens, a few hundred steps) and/or distillation from the original
short-context model (Arcee AFM-4.5B, LongReD's restoration distillation; DistillKit's loss).

SFT on chat data (`messages` records: [{"role": ..., "content": ...}, ...]):
- conversations come from .jsonl / .json / .parquet files, folders of them, `datasets` save_to_disk folders or
  hub datasets (hf:NAME[:CONFIG[:SPLIT]], e.g. hf:HuggingFaceH4/ultrachat_200k::train_sft), are rendered with the
  tokenizer's chat template (or --chat-template; a tokenizer without one gets DEFAULT_CHAT_TEMPLATE, ChatML
  with generation markers, which is then saved with the exported tokenizer);
- the loss is on assistant tokens only. The mask comes from the template's {% generation %} markers when it has
  them, else from rendering each conversation incrementally: an assistant turn is the text between the
  rendering of the turns before it (with the generation prompt) and the rendering up to it, trailing
  whitespace excluded (the end-of-turn token is trained, the template's newline after it is not);
- conversations longer than --max-tokens are dropped and counted, never truncated; the rest are bin-packed
  whole (best-fit) into rows of --seq-len tokens, each conversation its own attention segment (document mask);
- the loss of a step is the sum of token losses over all micro-batches on all ranks divided by their global
  count of assistant tokens (ProLong's reason: instruction masks make per-device counts very uneven).

Distillation (--teacher DIR, the original model with its original RoPE; same tokenizer and vocabulary):
    loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)       per trained token, token mean
with softmax temperature T on both sides (DistillKit: T = 2, alpha = 0.5). On chat data the KL is taken on the
assistant tokens; on a directory written by 01_prepare_data.py (plain short text: restoration distillation, as
Arcee and LongReD did) on every token. The teacher runs without gradients, sharded like the student (FSDP2),
and neither model's logits ever exist for a whole row: the CE and KL are computed chunk by chunk (--loss-chunk
tokens, only the trained positions), each chunk recomputed in the backward.

Launch, checkpoints (--save-every, SIGTERM/SIGUSR1, --resume auto), metrics line, progress bar, tracking
(--report-to), probes of the long/short trade-off (--eval-every) and export are those of 03_continued_pretrain.py.

Usage:
    # UltraLong-style short SFT of an extended model on 8 GPUs: 1M tokens/step, LR 5e-6, conversations < 8K
    torchrun --nproc_per_node=8 04_sft.py --model runs/llama-1m/final \\
        --data hf:HuggingFaceH4/ultrachat_200k::train_sft --max-tokens 8192 --seq-len 8192 \\
        --batch-tokens 1048576 --max-steps 480 --lr 5e-6 --out runs/llama-1m-sft
    # ProLong-style: conversations packed into 64K rows, LR 2e-5, 5% warmup
    torchrun --nproc_per_node=8 04_sft.py --model runs/prolong-512k/final --data ultrachat.jsonl \\
        --seq-len 65536 --batch-tokens 4194304 --max-steps 250 --lr 2e-5 --out runs/prolong-sft
    # restoration distillation on short text prepared by 01 (4K rows), teacher = the original model
    torchrun --nproc_per_node=8 04_sft.py --model runs/afm-64k-soup --teacher arcee-ai/AFM-4.5B-Base \\
        --data runs/short-4k --alpha 1.0 --temperature 2 --lr 1e-5 --max-steps 1000 --out runs/afm-distilled
    # tiny CPU run
    python 04_sft.py --model TINY_MODEL_DIR --data chats.jsonl --seq-len 256 --max-steps 10 --lr 1e-3 \\
        --device cpu --out runs/sft

Outputs: OUT/run.json, OUT/metrics.jsonl (one record per step: loss, and with a teacher its ce and kl parts),
OUT/checkpoints/step_N/, OUT/final/ (HF model directory with manifest.json, stage "04_sft").
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import fsdp_train
import hf_export
import packed_data
import packing
import probes
import tracking
import train_flags
import varlen_attention
from common import fail, print0

STAGE = "04_sft"

# ChatML, the most common open convention (Qwen, SmolLM, OLMo), with generation markers around what the
# assistant writes (its content and <|im_end|>), for tokenizers that ship no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    common.add_common_args(g, "model", "tokenizer", required=["model"],
                           model=dict(help="the (context-extended) model to tune: an HF directory or hub name"))
    g.add_argument("--init-from", default=None,
                   help="start from the weights of a training checkpoint (OUT/checkpoints/step_N of 03 or 04) "
                        "instead of --model's (whose config is kept); optimizer, step and schedule start afresh; "
                        "with --resume auto, only while --out holds no checkpoint yet")
    add_data_args(p)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None,
                   help="the original short-context model (its own RoPE), same tokenizer and vocabulary: adds "
                        "alpha * T^2 * KL(teacher || student) to (1 - alpha) * CE")
    g.add_argument("--alpha", type=common.number(min=0, max=1), default=None,
                   help="weight of the KL term, in [0, 1] (default with --teacher: 0.5, DistillKit)")
    g.add_argument("--temperature", type=common.number(above=0), default=None,
                   help="softmax temperature T of the KL term, > 0 (default with --teacher: 2.0, DistillKit)")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--batch-tokens", type=common.number(int, min=1), default=None,
                   help="tokens per optimizer step over all ranks, a multiple of --seq-len (default: one row per "
                        "rank; UltraLong: 128 conversations per step)")
    g.add_argument("--micro-batch-tokens", type=common.number(int, min=1), default=None,
                   help="tokens per rank per forward/backward (default: one row); accumulation is derived")
    g.add_argument("--max-steps", type=common.number(int, min=1), default=None,
                   help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--num-tokens", type=common.number(above=0), default=None, help="alternatively, tokens to train on")
    g.add_argument("--epochs", type=common.number(above=0), default=1.0,
                   help="passes over the data when neither --max-steps nor --num-tokens is given (default: 1)")
    train_flags.add_optimizer_args(g, 2e-5, "ProLong SFT: 2e-5; UltraLong: 5e-6", 0.05, "ProLong SFT: 5%%")
    common.add_common_args(g, "seed")
    train_flags.add_system_args(p, "cross-entropy implementation without a teacher (auto: Liger FLCE with --liger, "
                                "else chunked); with a teacher the loss is always chunked", None,
                                "tokens per chunk of the chunked loss (default: 4096; 1024 with a teacher, whose "
                                "chunks hold several [chunk, vocab] fp32 tensors)")
    g = train_flags.add_output_args(p, "")
    tracking.add_tracking_args(g)
    probes.add_probe_args(p)
    args = p.parse_args(argv)
    if args.teacher is None and (args.alpha is not None or args.temperature is not None):
        p.error("--alpha and --temperature weight the distillation term: they need --teacher")
    if args.teacher is not None:
        args.alpha = 0.5 if args.alpha is None else args.alpha
        args.temperature = 2.0 if args.temperature is None else args.temperature
        if args.loss == "liger":
            p.error("--loss liger fuses the CE only; with --teacher the CE + KL loss is chunked")
    train_flags.check_resume_args(p, args)
    args.max_tokens = args.max_tokens or args.seq_len or 8192
    args.seq_len = args.seq_len or args.max_tokens
    if args.max_tokens < 2:
        p.error("--max-tokens must be at least 2")
    import psutil

    if 3 * 5 * args.seq_len > psutil.virtual_memory().available:  # a row: int32 ids + a uint8 mask, ~3 copies
        p.error(f"--seq-len {args.seq_len} does not fit in this machine's available memory; use a shorter one")
    if args.seq_len < args.max_tokens:
        p.error(f"--seq-len {args.seq_len} is shorter than --max-tokens {args.max_tokens}: a kept conversation "
                "would not fit a row")
    return args


def add_data_args(p) -> None:
    """The data group: chat data (or 01's plain text), its template and masks, the row length."""
    g = p.add_argument_group("data")
    common.add_common_args(g, "data", required=["data"], data=dict(nargs="+", help=(
        "chat data: one or more .jsonl/.json/.parquet files, folders of them, `datasets` save_to_disk folders or "
        "hub datasets (hf:NAME[:CONFIG[:SPLIT]]), each record holding a --messages-field list; or directories "
        "written by 01_prepare_data.py (plain text, with --teacher: restoration distillation; several shards, or "
        "a directory of them, are read as one dataset)")))
    common.add_common_args(g, "encoding-errors")
    g.add_argument("--messages-field", default="messages",
                   help="the field holding a conversation: a list of {role, content} (default: messages)")
    g.add_argument("--chat-template", default="auto",
                   help="'auto': the tokenizer's template, or the built-in ChatML one when it has none; 'default': "
                        "the built-in ChatML template; or a path to a .jinja file")
    g.add_argument("--assistant-mask", choices=["auto", "markers", "prefix"], default="auto",
                   help="how assistant tokens are found: the template's {%% generation %%} markers, or incremental "
                        "rendering of the turns (auto: markers when the template has them)")
    g.add_argument("--max-tokens", type=common.number(int, min=2), default=None,
                   help="chat data: drop (and count) conversations longer than this many tokens, never truncate "
                        "them (default: --seq-len, else 8192 as UltraLong)")
    common.add_common_args(g, "seq-len", seq_len=dict(
        help="chat data: tokens per packed row of conversations (default: --max-tokens, else 8192; ProLong: "
             "65536); 01's plain text keeps its own row length"))
    g.add_argument("--max-conversations", type=common.number(int, min=1), default=None,
                   help="read at most this many conversations (in order, over all --data sources)")
    g.add_argument("--ignore-max-positions", action="store_true",
                   help="allow rows (or, for the teacher, conversations) longer than the config's "
                        "max_position_embeddings")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle rows each epoch (seeded); --no-shuffle keeps the packed order")


# =============================================================================================================
# Chat data: reading `messages` records, rendering with an assistant-token mask, packing into rows.


CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def resolve_chat_source(spec: str) -> tuple[str, object]:
    """("hub", (name, config, split)), ("datasets", path) or ("files", [paths]) for one --data entry."""
    local = os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~"))
    hub_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not spec.endswith(CHAT_SUFFIXES)
    if spec.startswith("hf:") or (not local and hub_name):
        parts = spec.removeprefix("hf:").split(":")
        if len(parts) > 3 or not parts[0]:
            fail(f"--data {spec!r}: write a hub dataset as hf:NAME[:CONFIG[:SPLIT]]")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        return "hub", (name, config, split)
    path = Path(spec).expanduser()
    if not path.exists():
        fail(f"--data {spec} does not exist (for a hub dataset write hf:NAME[:CONFIG[:SPLIT]])")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():  # a DatasetDict: its train split
            path = path / "train"
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "datasets", path
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(CHAT_SUFFIXES)
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            fail(f"--data {spec} holds no {'/'.join(CHAT_SUFFIXES)} files nor a `datasets` save_to_disk folder")
        return "files", files
    if not path.name.endswith(CHAT_SUFFIXES):
        fail(f"--data {spec}: cannot read chat records from this file; use .jsonl, .json or .parquet")
    return "files", [path]


def iter_records(kind: str, loc, errors: str = "strict"):
    """(where, record) for every record of a resolved source, in order (errors: common.decode's)."""
    if kind == "hub":
        name, config, split = loc
        try:
            import datasets

            it = iter(datasets.load_dataset(name, config, split=split, streaming=True))
            first = next(it, None)
        except Exception as exc:  # noqa: BLE001 - offline, unknown dataset, no access, bad config/split
            fail(f"cannot stream hub dataset {name!r} (config {config}, split {split}): {type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''}; pass a local copy instead")
        if first is not None:
            yield f"{name}[0]", first
            for i, record in enumerate(it, 1):
                yield f"{name}[{i}]", record
        return
    if kind == "datasets":
        import datasets

        for i, record in enumerate(datasets.load_from_disk(str(loc))):
            yield f"{loc}[{i}]", record
        return
    for f in loc:
        if f.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                for record in batch.to_pylist():
                    yield f"{f}[{n}]", record
                    n += 1
            continue
        lines = common.text_lines(f, errors)
        if next((line for _, line in lines if line.strip()), "").lstrip().startswith("["):  # a JSON array, whole
            try:
                records = json.loads(common.read_text(f, errors))
            except json.JSONDecodeError as exc:
                fail(f"{f} is not valid JSON ({exc.msg} at line {exc.lineno})")
            for i, record in enumerate(records):
                yield f"{f}[{i}]", record
            continue
        for lineno, line in common.text_lines(f, errors):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    fail(f"{f}:{lineno} is not valid JSON ({exc.msg}); fix the line or the file")
                yield f"{f}:{lineno}", record


def conversation_of(record, field_name: str, where: str) -> list[dict]:
    """The record's messages, checked: a list of {role: str, content: str or None, ...}."""
    if not isinstance(record, dict):
        fail(f"{where} holds a {type(record).__name__}, not a record with a {field_name!r} field")
    if field_name not in record:
        fail(f"{where} has no {field_name!r} field (its fields: {', '.join(map(str, record)) or 'none'}); chat "
             "data needs a list of {role, content} messages per record (see --messages-field)")
    messages = record[field_name]
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        fail(f"{where}: {field_name!r} holds a {type(messages).__name__}, not a list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), (str, type(None))):
            fail(f"{where}: a message {str(m)[:80]!r} lacks a string role or has non-text content")
    return list(messages)


def resolve_chat_template(tokenizer, spec: str) -> tuple[str, str]:
    """(template, where it comes from)."""
    if spec == "default":
        return DEFAULT_CHAT_TEMPLATE, "built-in ChatML (--chat-template default)"
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            fail(f"--chat-template {spec} is not a file; give a .jinja file, 'auto' or 'default'")
        return common.read_text(path), str(path)
    try:
        return tokenizer.get_chat_template(), "the tokenizer's"
    except ValueError:  # no template
        return DEFAULT_CHAT_TEMPLATE, "built-in ChatML (the tokenizer has no chat template)"


def render(tokenizer, messages, template: str, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, found by rendering prefixes:
    a turn is what rendering it appends after the generation prompt, without trailing whitespace."""
    text = render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[:i + 1], template)
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            fail("the chat template does not render conversations incrementally (the first turns render "
                 "differently inside the whole conversation), so assistant tokens cannot be located by prefixes; "
                 "use a template with {% generation %} markers (--chat-template FILE)")
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def render_conversation(tokenizer, messages, template: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32, loss_mask uint8: 1 on the assistant's tokens) of one conversation."""
    if method == "markers":
        enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["assistant_masks"], np.uint8)
    text, spans = assistant_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), np.uint8)
    for s, e in spans:  # tokens overlapping the span (as transformers' generation-marker masks do)
        mask |= ((offsets[:, 0] < e) & (offsets[:, 1] > s)).astype(np.uint8)
    return np.asarray(enc["input_ids"], np.int32), mask


def encode_conversation(tokenizer, messages, template: str, method: str, max_tokens: int):
    """("kept", (input_ids, loss_mask)); or why the conversation is dropped: ("no_assistant" | "too_long", None),
    or ("template_error", message) when the template refuses it (jinja's raise_exception, e.g. "roles must
    alternate")."""
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant", None
    try:
        ids, mask = render_conversation(tokenizer, messages, template, method)
    except common.UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the template raises, the conversation is not usable
        return "template_error", f"{type(exc).__name__}: {exc}"
    if len(ids) > max_tokens:
        return "too_long", None
    if not mask[1:].any():  # the first token of a segment is never a target
        return "no_assistant", None
    return "kept", (ids, mask)


@dataclass
class ChatRows:
    """Packed conversations in memory, read like packed_data.PackedData; rows also carry their `loss_mask`."""
    input_ids: np.ndarray  # [rows, seq_len] int32
    loss_mask: np.ndarray  # [rows, seq_len] uint8
    doc_lens: list
    num_pad: np.ndarray
    attn_cost: np.ndarray
    seq_len: int
    manifest: dict
    stats: dict

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    def rows(self, indices) -> list[dict]:
        return [{"index": int(i), "input_ids": self.input_ids[i].astype(np.int64),
                 "doc_lens": np.asarray(self.doc_lens[i], np.int64), "num_pad": int(self.num_pad[i]),
                 "loss_mask": self.loss_mask[i]} for i in indices]

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for a in (self.input_ids, self.loss_mask, self.num_pad):
            h.update(np.ascontiguousarray(a).tobytes())
        return {"sources": self.manifest["sources"], "num_rows": self.num_rows, "seq_len": self.seq_len,
                "sha256": h.hexdigest()[:16]}


def load_chat_data(args, tokenizer, template: str, method: str) -> ChatRows:
    """Read, render, filter and pack every conversation (each rank does the same, deterministically)."""
    if not tokenizer.is_fast:
        fail("the tokenizer has no fast (Rust) version; assistant masks need its character offsets")
    sources = [resolve_chat_source(spec) for spec in args.data]
    stats = {"read": 0, "kept": 0, "too_long": 0, "no_assistant": 0, "template_error": 0, "tokens": 0,
             "assistant_tokens": 0, "roles": {}, "first_template_error": None, "longest": 0}
    docs = []
    records = itertools.chain.from_iterable(iter_records(kind, loc, args.encoding_errors) for kind, loc in sources)
    with tqdm(desc="render", unit=" conv", disable=not common.is_main_process(), leave=False,
              file=sys.stderr) as bar:
        for where, record in itertools.islice(records, args.max_conversations):
            messages = conversation_of(record, args.messages_field, where)
            bar.update(1)
            stats["read"] += 1
            for m in messages:
                stats["roles"][m["role"]] = stats["roles"].get(m["role"], 0) + 1
            outcome, result = encode_conversation(tokenizer, messages, template, method, args.max_tokens)
            stats[outcome] += 1
            if outcome == "template_error":
                stats["first_template_error"] = stats["first_template_error"] or f"{where}: {result}"
            if outcome != "kept":
                continue
            ids, mask = result
            stats["tokens"] += len(ids)
            stats["assistant_tokens"] += int(mask[1:].sum())
            stats["longest"] = max(stats["longest"], len(ids))
            docs.append({"input_ids": ids, "loss_mask": mask})
    where = ", ".join(args.data)
    if stats["read"] == 0:
        fail(f"--data {where} holds no conversations")
    if stats["kept"] == 0:
        if stats["no_assistant"] == stats["read"]:
            roles = ", ".join(f"{r} ({n})" for r, n in stats["roles"].items()) or "none"
            fail(f"--data {where}: none of its {stats['read']} conversation(s) has an assistant turn (roles seen: "
                 f"{roles}); SFT trains on the assistant's replies only")
        if stats["template_error"] == stats["read"]:
            fail(f"the chat template rejected every conversation, e.g. {stats['first_template_error']}")
        fail(f"no conversation is left to train on: {stats['too_long']} of {stats['read']} are longer than "
             f"--max-tokens {args.max_tokens}, {stats['no_assistant']} have no assistant tokens, "
             f"{stats['template_error']} were rejected by the chat template")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rng = np.random.default_rng(args.seed)
    rows = list(packing.pack_documents(docs, args.seq_len, "best-fit", pad_values={"loss_mask": 0}, pad_id=pad_id,
                                       rng=rng))
    data = ChatRows(input_ids=np.stack([r["input_ids"] for r in rows]).astype(np.int32),
                    loss_mask=np.stack([r["loss_mask"] for r in rows]).astype(np.uint8),
                    doc_lens=[list(r["doc_lens"]) for r in rows],
                    num_pad=np.array([r["num_pad"] for r in rows], np.int64),
                    attn_cost=np.array([r["attn_cost"] for r in rows], np.int64), seq_len=args.seq_len,
                    manifest={"vocab_size": len(tokenizer), "sources": [
                        str(Path(d).expanduser().resolve()) if os.path.exists(os.path.expanduser(d)) else d
                        for d in args.data]}, stats=stats)
    stats["rows"] = data.num_rows
    stats["padding_fraction"] = float(data.num_pad.sum() / (data.num_rows * args.seq_len))
    return data


# =============================================================================================================
# The data part: chat conversations, or 01's plain text for restoration distillation.


@dataclass
class SftData:
    """What 04 trains on: packed rows (ChatRows, or 01's packed_data.PackedData when `plain`), the tokenizer
    (None for plain text without one), the chat template and how assistant tokens are found, and the longest
    sequence (a conversation, or 01's row) the teacher must hold."""
    data: object
    plain: bool
    tokenizer: object
    template: str | None
    template_src: str | None
    method: str | None
    longest: int


def load_data(args, config) -> SftData:
    """Read --data (every rank the same) and refuse what cannot train, before anything is written."""
    first = Path(os.path.expanduser(args.data[0]))
    plain = all(packed_data.packed_dirs(d) for d in args.data)
    if not plain and any(packed_data.packed_dirs(d) for d in args.data):
        fail("--data mixes directories written by 01_prepare_data.py with chat data; train on one kind at a time")
    tokenizer_name = args.tokenizer or args.model
    if plain:
        if args.teacher is None:
            fail(f"--data {first} is plain text packed by 01_prepare_data.py: pass --teacher for restoration "
                 "distillation, or train on it with 03_continued_pretrain.py")
        data = packed_data.PackedData.open(args.data)
        tokenizer = None
        if os.path.isdir(os.path.expanduser(tokenizer_name)):
            tokenizer = common.load_tokenizer(tokenizer_name)
        sft = SftData(data, True, tokenizer, None, None, None, longest=data.seq_len)
    else:
        tokenizer = common.load_tokenizer(tokenizer_name)
        template, template_src = resolve_chat_template(tokenizer, args.chat_template)
        has_markers = GENERATION_TAG.search(template) is not None
        method = args.assistant_mask
        if method == "auto":
            method = "markers" if has_markers else "prefix"
        if method == "markers" and not has_markers:
            fail("--assistant-mask markers: the chat template has no {% generation %} markers; use "
                 "--assistant-mask prefix or a template with markers (--chat-template FILE)")
        data = load_chat_data(args, tokenizer, template, method)
        sft = SftData(data, False, tokenizer, template, template_src, method, longest=data.stats["longest"])
    if data.seq_len > config.max_position_embeddings and not args.ignore_max_positions:
        fail(f"rows of {data.seq_len} tokens need positions beyond the model's max_position_embeddings "
             f"{config.max_position_embeddings}; use a shorter --seq-len (or pass --ignore-max-positions)")
    if (data.manifest.get("vocab_size") or 0) > config.vocab_size:
        fail(f"the data was tokenized with a vocabulary of {data.manifest['vocab_size']} tokens, the model has "
             f"{config.vocab_size}; use the model's tokenizer")
    return sft


def data_lines(args, sft: SftData) -> list[str]:
    """What the data holds, for the lines printed before the first step."""
    data = sft.data
    if sft.plain:
        first = Path(os.path.expanduser(args.data[0]))
        return [f"data: {data.num_rows} rows x {data.seq_len:,} tokens of plain text from {first} "
                "(01_prepare_data); every token is trained"]
    st = data.stats
    first_error = f" (first: {st['first_template_error']})" if st["template_error"] else ""
    masking = "generation markers" if sft.method == "markers" else "prefix rendering"
    return [f"data: {st['read']} conversation(s) read, {st['kept']} kept, {st['too_long']} dropped as longer than "
            f"{args.max_tokens} tokens, {st['no_assistant']} without assistant tokens, {st['template_error']} "
            f"rejected by the template{first_error}",
            f"chat: template {sft.template_src}, assistant mask by {masking}; {st['tokens']:,} tokens, "
            f"{st['assistant_tokens']:,} trained ({st['assistant_tokens'] / st['tokens']:.1%}); packed best-fit "
            f"into {data.num_rows} rows of {data.seq_len:,} ({st['padding_fraction']:.1%} padding)"]


# =============================================================================================================
# The teacher part: its checks, the model, the chunked CE + KL loss.


def check_teacher(args, config, tokenizer, longest: int):
    """The teacher's config, after refusing one that does not share the student's vocabulary and tokenizer."""
    tconfig = common.load_config(args.teacher, flag="--teacher")
    if tconfig.vocab_size != config.vocab_size:
        fail(f"--teacher {args.teacher} has a vocabulary of {tconfig.vocab_size} tokens, the student "
             f"{config.vocab_size}; distillation compares token distributions, so both need the same vocabulary")
    tdir = Path(os.path.expanduser(args.teacher))
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    has_tok = tdir.is_dir() and any((tdir / f).is_file() for f in tokenizer_files)
    if not has_tok and tdir.is_dir():
        print0(f"note: --teacher {args.teacher} holds no tokenizer; its vocabulary size matches the student's")
    elif tokenizer is not None:
        ttok = common.load_tokenizer(args.teacher)
        if ttok.get_vocab() != tokenizer.get_vocab():
            diff = len(set(ttok.get_vocab().items()) ^ set(tokenizer.get_vocab().items()))
            fail(f"--teacher {args.teacher} has another tokenizer than the student ({len(ttok)} vs {len(tokenizer)} "
                 f"tokens, {diff} differing entries); distillation needs the same tokenizer")
    if longest > tconfig.max_position_embeddings and not args.ignore_max_positions:
        fail(f"the teacher's max_position_embeddings is {tconfig.max_position_embeddings} but the data has "
             f"sequences of {longest} tokens; distil on shorter text (or pass --ignore-max-positions)")
    return tconfig


def kd_loss_fn(targets, teacher_hidden, teacher_weight, temperature: float, chunk_size: int):
    """A loss_fn(hidden, weight) for fsdp_train.forward_loss returning [CE sum, KL sum] over the trained positions:
    KL(softmax(z_t / T) || softmax(z_s / T)) per token. Chunked and checkpointed: one chunk's logits at a time,
    and only for positions with a target."""
    def chunk(h, w, t, th):
        keep = (t != common.IGNORE_INDEX).nonzero().squeeze(-1)
        h, t, th = h[keep], t[keep], th[keep]
        logits = F.linear(h, w).float()
        ce = F.cross_entropy(logits, t, reduction="sum")
        log_q = F.log_softmax(logits / temperature, dim=-1)
        with torch.no_grad():
            log_p = F.log_softmax(F.linear(th, teacher_weight).float() / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        return torch.stack([ce, kl])

    def loss_fn(hidden, weight):
        return fsdp_train.chunked_token_loss(hidden, weight, targets, chunk_size, chunk_loss=chunk,
                                             extra=[teacher_hidden])

    return loss_fn


@dataclass
class Teacher:
    """The original short-context model, sharded like the student, without gradients or checkpointing."""
    model: object
    weight: torch.Tensor  # its lm_head, gathered once (constant)
    config: object
    info: dict  # prepare_model's: parameter counts (for the FLOPs), Liger kernels


def build_teacher(args, tconfig, mesh, opts: fsdp_train.ModelOptions) -> Teacher:
    """--teacher's model, built as the student's options say (Liger where its family has it), never trained."""
    liger = opts.liger and tconfig.model_type in fsdp_train.LIGER_FAMILIES
    topts = dataclasses.replace(opts, liger=liger, activation_checkpointing=False)
    model, info = fsdp_train.prepare_model(tconfig, args.teacher, mesh, topts)
    model.requires_grad_(False)
    model.eval()
    varlen_attention.check_attention(model, opts.device, opts.compute_dtype, tconfig.vocab_size, args.seed)
    weight = fsdp_train.full_weight(model).to(opts.device, opts.compute_dtype)
    return Teacher(model, weight, tconfig, info)


def distillation_loss(ce, kl, args):
    """DistillKit's mix (docs/training.md#distillkit-logit-distillation): (1 - alpha) * CE + alpha * T^2 * KL,
    with alpha 0.5 and T = 2 by default; T^2 keeps the KL's gradient on the CE's scale as T grows."""
    return (1 - args.alpha) * ce + args.alpha * args.temperature ** 2 * kl


# =============================================================================================================
# The recipe's choices: schedule, optimizer, loss normalisation (published values: docs/recipes.md).


def learning_rate(step: int, args, max_steps: int, warmup: int) -> float:
    """The learning rate of `step` (from 0): a linear warmup to --lr (step 1 of the warmup gets 1/warmup of it),
    then a cosine from --lr down to --lr x --min-lr-ratio at the last step.

    ProLong's SFT: peak 2e-5, 5% warmup, cosine down to 2e-6 (0.1 x the peak), 250 steps of 4M tokens.
    UltraLong's SFT: 5e-6, 128 conversations per step, 480 / 140 / 150 steps for its 1M / 2M / 4M models (its
    schedule's shape is not published)."""
    if warmup > 0 and step < warmup:
        multiplier = (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup - 1))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        multiplier = args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine
    return args.lr * multiplier


def build_optimizer(model, args) -> torch.optim.AdamW:
    """AdamW as ProLong's SFT ("AdamW same" as its pretraining: HF Trainer's adamw_torch): weight decay 0.1
    (--weight-decay) on the weight matrices and embeddings, none on the 1-D parameters (RMSNorm weights,
    biases), betas 0.9 / 0.95, eps 1e-8, the global gradient norm clipped to 1.0 (--grad-clip)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trained if p.dim() >= 2]
    vectors = [p for p in trained if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return fsdp_train.adamw(groups, args.lr, args.betas)


def forward_backward(model, micro_batches, args, loss_impl: str, loss_chunk: int, teacher: Teacher | None,
                     device) -> tuple[torch.Tensor, int]:
    """Forward and backward of this rank's micro-batches; returns ([summed CE, summed KL] of its trained
    tokens, the step's global count of trained tokens).

    The loss of a step is the sum of token losses over all micro-batches on all ranks divided by their global
    count of trained tokens (torchtitan's rule, as in 03): the count is all-reduced before the first backward,
    each micro-batch back-propagates its sum divided by it, and FSDP2 SUMS the gradients over the ranks
    (fsdp_train.shard_model sets its divide factor to 1). ProLong's SFT reason for a global count: instruction
    masks make the per-device counts of assistant tokens very uneven, and a per-device mean would weigh a token
    by 1 / its device's count (its --token_scaled_loss approximates the global count with a running mean). With
    a teacher, each token's loss is distillation_loss(CE, KL)."""
    n_valid = fsdp_train.global_count(sum(mb.n_valid for mb in micro_batches), device)
    parts = torch.zeros(2, dtype=torch.float32, device=device)  # summed CE and KL of this rank's tokens
    for mb in micro_batches:
        mb = mb.to(device)
        if teacher is None:
            ce = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, loss_impl, loss_chunk))
            loss, kl = ce, torch.zeros_like(ce)
        else:
            with torch.no_grad():
                teacher_hidden = varlen_attention.forward_hidden(teacher.model, mb)
            fsdp_train.reshard(teacher.model)
            loss_fn = kd_loss_fn(mb.targets, teacher_hidden, teacher.weight, args.temperature, loss_chunk)
            ce, kl = fsdp_train.forward_loss(model, mb, loss_fn).unbind()
            loss = distillation_loss(ce, kl, args)
        (loss / max(n_valid, 1)).backward()
        parts += torch.stack([ce.detach(), kl.detach()])
    return parts, n_valid


# =============================================================================================================
# The run: its signature (what --resume must match), the lines it prints, the export, the loop.


def run_signature(args, config, data, rows_per_step: int, max_steps: int, warmup: int) -> dict:
    """What must match for --resume to continue exactly (world size, kernels and logging may change)."""
    return {"model": fsdp_train.model_shape(config), "data": data.fingerprint(), "rows_per_step": rows_per_step,
            "max_steps": max_steps, "warmup_steps": warmup, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
            "seed": args.seed, "shuffle": args.shuffle, "weight_decay": args.weight_decay, "betas": list(args.betas),
            "grad_clip": args.grad_clip, "init": args.model, "init_from": args.init_from, "teacher": args.teacher,
            "alpha": args.alpha, "temperature": args.temperature}


def run_lines(args, sft: SftData, teacher: Teacher | None, backend: str, minfo: dict, loss_impl: str,
              loss_chunk: int) -> list[str]:
    """The stage's own lines for fsdp_train.describe_run: data, distillation, attention, kernels."""
    lines = data_lines(args, sft)
    if teacher is not None:
        trained = "every token" if sft.plain else "the assistant tokens"
        lines.append(f"distillation: teacher {args.teacher} ({teacher.config.model_type}, "
                     f"{teacher.info['params']['total'] / 1e6:.1f}M parameters), loss = {1 - args.alpha:g} * CE + "
                     f"{args.alpha:g} * {args.temperature:g}^2 * KL(teacher || student) at T = {args.temperature:g}, "
                     f"on {trained}")
    lines.append(f"attention: {backend}, document-masked")
    lines.append(f"kernels: liger {'+'.join(minfo['liger']) or 'off'}, loss {loss_impl} "
                 f"{'CE + KL' if teacher is not None else 'cross-entropy'} ({loss_chunk} tokens per chunk), "
                 f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, "
                 f"cpu offload {'on' if args.cpu_offload else 'off'}")
    return lines


def export(args, model, config, sft: SftData, out, source_dtype, compute_dtype, stats: dict) -> None:
    """OUT/final: an ordinary HF directory (hf_export.py) with the tokenizer, the chat template trained on, and
    a manifest of the run."""
    export_dtype = hf_export.export_dtype(args.export_dtype, source_dtype, compute_dtype)
    tok_dir = None
    if common.is_main_process() and sft.tokenizer is not None:
        tok_dir = tempfile.mkdtemp(prefix="longctx-04-tokenizer-")
        if sft.template is not None:
            sft.tokenizer.chat_template = sft.template
        sft.tokenizer.save_pretrained(tok_dir)
    if not sft.plain:
        stats["conversations"] = {k: v for k, v in sft.data.stats.items() if k != "first_template_error"}
    if sft.plain:
        mode = "restoration-distillation"
    else:
        mode = "distillation" if args.teacher else "sft"
    recipe = {"mode": mode, "teacher": args.teacher, "alpha": args.alpha, "temperature": args.temperature,
              "max_tokens": None if sft.plain else args.max_tokens, "seq_len": sft.data.seq_len,
              "chat_template": sft.template_src, "assistant_mask": sft.method}
    inputs = [p for p in (args.model, *args.data, args.teacher) if p and os.path.isdir(os.path.expanduser(p))]
    manifest = {"stage": STAGE, "args": args, "inputs": inputs, "stats": stats, "base_model": args.model,
                "recipe": recipe}
    try:
        final = hf_export.export_hf(model, config, out / "final", export_dtype, args.model, tok_dir, manifest)
    finally:
        if tok_dir:
            shutil.rmtree(tok_dir, ignore_errors=True)
    print0(f"exported {final} ({str(export_dtype)[6:]})")


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = {"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data, "--teacher": args.teacher,
              "--init-from": args.init_from, "--chat-template": args.chat_template}
    with fsdp_train.run_dir(args, inputs) as run, fsdp_train.StopSignals() as signals:  # --out created by start_run
        return train(args, run, signals)


def train(args, run, signals: fsdp_train.StopSignals) -> int:
    # ---------------------------------------------------------------------------------------------------------
    # Processes, inputs (the model's config, the data, the teacher's config), how a step's rows are dealt, and
    # every check that must fail before anything is written
    dinfo, mesh, dtype = fsdp_train.start_processes(args)
    device, world = dinfo.device, dinfo.world_size
    config = common.load_config(args.model)
    sft = load_data(args, config)
    data, seq_len = sft.data, sft.data.seq_len
    tconfig = check_teacher(args, config, sft.tokenizer, sft.longest) if args.teacher else None
    rows_per_micro = fsdp_train.micro_batch_rows(args.micro_batch_tokens, seq_len)
    batch = fsdp_train.step_batch(args.batch_tokens, seq_len, rows_per_micro, world, dinfo.rank)
    epoch_steps = max(1, round(args.epochs * data.num_rows / batch.rows_per_step))  # the steps of --epochs passes
    max_steps, warmup = fsdp_train.schedule_steps(args, batch.tokens, epoch_steps)
    signature = run_signature(args, config, data, batch.rows_per_step, max_steps, warmup)
    monitor = probes.monitor_from_args(args, sft.tokenizer, seq_len, device, run.out / "metrics.jsonl")
    resume_from = fsdp_train.open_run_dir(args, run, signature)

    # ---------------------------------------------------------------------------------------------------------
    # Models: the student as in 03; the teacher sharded the same way, without gradients or checkpointing
    varlen_attention.set_attention_backend(None if args.attention_backend == "auto" else args.attention_backend)
    opts, loss_impl = fsdp_train.model_options(args, config, device, dtype, varlen_attention.register_attention())
    if args.teacher:
        loss_impl = "chunked"  # Liger fuses the CE only: the CE + KL loss is computed chunk by chunk
    loss_chunk = args.loss_chunk or (1024 if args.teacher else 4096)
    source_dtype = hf_export.config_dtype(config)  # before prepare_model, which sets fp32
    model, minfo = fsdp_train.prepare_model(config, args.model, mesh, opts)
    backend = varlen_attention.check_attention(model, device, dtype, config.vocab_size, args.seed)
    optimizer = build_optimizer(model, args)
    teacher = build_teacher(args, tconfig, mesh, opts) if args.teacher else None
    start_step = fsdp_train.starting_step(args, resume_from, model, optimizer, run.out / "metrics.jsonl")
    fsdp_train.start_run(args, run, signature, STAGE, resume_from)  # every check passed: --out now exists
    lines = run_lines(args, sft, teacher, backend, minfo, loss_impl, loss_chunk)
    fsdp_train.describe_run(STAGE, dinfo, dtype, config, minfo["params"], lines, batch, max_steps, warmup, args,
                            data.num_rows)

    # ---------------------------------------------------------------------------------------------------------
    # Training loop
    order = fsdp_train.DataOrder(data.num_rows, args.seed, args.shuffle)
    tracker = tracking.open_tracker(args.report_to, run.out, common.jsonable(vars(args)), start_step)
    bookkeeping = fsdp_train.Bookkeeping(args, run.out, model, optimizer, signature, signals, tracker, monitor,
                                         start_step, device, world)
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, args, max_steps, warmup)
        fsdp_train.set_lr(optimizer, lr)

        # the step's rows: the same for every rank; this rank's micro-batches balanced by attention cost; on chat
        # data only the assistant's tokens are targets
        stream = order.take(step * batch.rows_per_step, batch.rows_per_step)
        micro_batches = []
        for rows in fsdp_train.step_micro_rows(data, stream, data.attn_cost, batch):
            masks = None if sft.plain else [row["loss_mask"] for row in rows]
            mb = varlen_attention.build_micro_batch(rows, seq_len, True, None, args.seed, loss_masks=masks)
            micro_batches.append(mb)

        parts, n_valid = forward_backward(model, micro_batches, args, loss_impl, loss_chunk, teacher, device)
        grad_norm = fsdp_train.clip_grad_norm(model, args.grad_clip).item()
        (ce_sum, kl_sum), stop = bookkeeping.all_reduce(parts)  # one collective: the sums and any stop signal
        ce, kl = ce_sum / max(n_valid, 1), kl_sum / max(n_valid, 1)
        loss = ce if teacher is None else distillation_loss(ce, kl, args)
        bookkeeping.check_finite(loss, grad_norm, step + 1)  # before the update, never after it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # metrics (tokens processed, padding included; both MFU conventions, a teacher adding its forward, a
        # third of its training FLOPs), probes, checkpoints, signals
        attn_sq = int(sum(int(data.attn_cost[r]) for _, r in stream))
        flops = fsdp_train.step_flops(minfo["params"], config, batch.tokens, seq_len, attn_sq)
        extra = {"attn_paths": varlen_attention.count_attention_paths(micro_batches)}  # this rank's, by path
        if teacher is not None:
            teacher_flops = fsdp_train.step_flops(teacher.info["params"], teacher.config, batch.tokens, seq_len,
                                                  attn_sq)
            flops = {k: v + teacher_flops[k] / 3 for k, v in flops.items()}
            extra.update(ce=ce, kl=kl)  # write_step shows them after the loss
        exit_code = bookkeeping.after_step(step + 1, t0, stop, loss=loss, grad_norm=grad_norm, lr=lr,
                                           valid_tokens=n_valid, tokens=batch.tokens, flops=flops, **extra)
        if exit_code is not None:  # stopped by a signal, its checkpoint saved
            return exit_code
    bookkeeping.close()

    if not args.no_export:
        stats = {"steps": max_steps, "tokens": max_steps * batch.tokens,
                 "final_loss": fsdp_train.final_loss(run.out / "metrics.jsonl"), "attention": backend,
                 "world_size": world}
        export(args, model, config, sft, run.out, source_dtype, dtype, stats)
    return 0


if __name__ == "__main__":
    common.run_main(main)
