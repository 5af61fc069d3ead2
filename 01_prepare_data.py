"""Stage 01: turn raw corpora into packed training rows that keep document boundaries.

Both families of long-context recipes are served (RECIPES.md §5.2, §8.11):
- ProLong: `--boundary mask` puts an eos after every document and stores each row's attention segments
  (`doc_lens`) so that training masks attention across documents (varlen attention);
- UltraLong: `--boundary separator --separator "<s>"` puts a literal separator between documents and trains with
  full attention over the row (one segment per row).

Pipeline:
  1. read every source (SPEC@WEIGHT: files, folders, code repositories, `datasets` folders, hub datasets), or the
     built-in corpus (Python standard-library packages as code repositories + KJV books, 1:1 by tokens);
  2. tokenize in batches with --num-proc worker processes, streaming token ids to disk (memory stays flat);
  3. shape lengths: drop documents under --min-doc-tokens; optionally downsample short and upsample long
     documents per source (Fu et al. 2024 / UltraLong) to --long-token-share, keeping each source's size;
  4. mix: each source gives WEIGHT / sum(WEIGHTS) of the output tokens (a subset, or repeats under --max-tokens);
  5. pack each source into --seq-len rows: `concat` (concatenate and cut, remainder carried to the next row) or
     `best-fit` (whole documents bin-packed, longer ones split into row-sized pieces, the rest padded);
  6. write a `datasets` directory (input_ids, doc_lens, num_pad, source, attn_cost; CONTRACTS.md) and
     manifest.json, then print the statistics.

Usage:
    # the built-in corpus, ProLong style, 64K rows
    python 01_prepare_data.py --tokenizer meta-llama/Meta-Llama-3-8B-Instruct --seq-len 65536 --out runs/data
    # your sources, UltraLong style, with length upsampling and a 1B-token budget
    python 01_prepare_data.py --data data/books.jsonl@0.3 code=repo:data/repos@0.3 hf:HuggingFaceFW/fineweb-edu@0.4 \\
        --tokenizer meta-llama/Llama-3.1-8B-Instruct --boundary separator --separator "<s>" \\
        --long-token-share 0.7 --max-tokens 1B --seq-len 131072 --out runs/data
    # one of 8 machines preparing the same corpus
    python 01_prepare_data.py ... --num-shards 8 --shard-index 3 --out runs/data-3
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np

import common

ROWS_BATCH_BYTES = 16 << 20  # rows are assembled and written in batches of about this many bytes


def default_num_proc() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _count(text: str) -> int:
    try:
        return common.parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("sources")
    common.add_common_args(g, "data", data=dict(
        nargs="+", metavar="SPEC@WEIGHT", default=None,
        help=common.SPEC_HELP + ". Default: the built-in corpus (stdlib code repositories and KJV books, 1:1)"))
    g.add_argument("--text-field", default="text", help="field holding the text in json/jsonl/parquet/datasets "
                                                        "sources (default: text)")
    g.add_argument("--txt-unit", choices=["file", "line", "paragraph"], default="file",
                   help="what one document is in a .txt source: the whole file (default), a line, or a paragraph")
    g.add_argument("--max-docs", type=int, default=None,
                   help="read at most this many documents per source (quick trials)")
    g = parser.add_argument_group("tokenizer")
    common.add_common_args(g, "tokenizer", "model", "trust-remote-code",
                           model=dict(help="model directory or hub name whose tokenizer to use (if no --tokenizer)"))
    g.add_argument("--num-proc", type=int, default=default_num_proc(),
                   help="tokenizer worker processes (default: CPUs available, at most 8); 1 tokenizes in this "
                        "process with the tokenizer's own threads")
    g = parser.add_argument_group("boundaries and packing")
    g.add_argument("--boundary", choices=["mask", "separator"], default="mask",
                   help="mask: eos after each document and per-document attention segments (ProLong); separator: "
                        "--separator text between documents, one segment per row (UltraLong). Default: mask")
    g.add_argument("--separator", default=None,
                   help='text put between documents with --boundary separator (default: "<s>", UltraLong\'s)')
    g.add_argument("--packing", choices=["concat", "best-fit"], default="concat",
                   help="concat: concatenate and cut, the remainder starts the next row (default); best-fit: whole "
                        "documents bin-packed, longer ones split into row-sized pieces, rows padded")
    common.add_common_args(g, "seq-len", required=["seq-len"],
                           seq_len=dict(type=int, help="tokens per packed row, e.g. 65536 (required)"))
    g = parser.add_argument_group("length shaping and mixture")
    g.add_argument("--min-doc-tokens", type=int, default=0,
                   help="drop documents shorter than this many tokens (ProLong's long data: 65536)")
    g.add_argument("--long-token-share", type=float, default=None,
                   help="per-source length upsampling (Fu et al. 2024, UltraLong): raise the share of tokens in "
                        "documents longer than --long-doc-tokens to this (e.g. 0.7) by downsampling documents "
                        "shorter than --short-doc-tokens and repeating long ones, each source keeping its size")
    g.add_argument("--short-doc-tokens", type=int, default=4096,
                   help="documents shorter than this are downsampled by --long-token-share (default: 4096)")
    g.add_argument("--long-doc-tokens", type=int, default=8192,
                   help="documents longer than this are upsampled by --long-token-share (default: 8192)")
    g.add_argument("--max-tokens", type=_count, default=None,
                   help="total token budget of the output, e.g. 1B (split evenly across --num-shards); sources "
                        "with fewer tokens than their share are repeated. Default: no budget, the largest mixture "
                        "in which no document repeats")
    g = parser.add_argument_group("output")
    common.add_common_args(g, "out", "seed", "overwrite", required=["out"])
    g.add_argument("--num-shards", type=int, default=1,
                   help="prepare the corpus on this many machines: each takes a disjoint share of every source's "
                        "documents (document i goes to shard i %% num_shards)")
    g.add_argument("--shard-index", type=int, default=0, help="this machine's shard, 0 .. num-shards - 1")
    return parser.parse_args(argv)


def validate(args) -> None:
    if args.seq_len < 2:
        common.fail(f"--seq-len must be at least 2 (got {args.seq_len}): a row needs a token to predict and one "
                    f"to predict it from")
    if args.num_proc < 1:
        common.fail(f"--num-proc must be at least 1 (got {args.num_proc})")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        common.fail(f"--shard-index must be in 0..{args.num_shards - 1} and --num-shards >= 1 "
                    f"(got {args.shard_index} of {args.num_shards})")
    if args.min_doc_tokens < 0:
        common.fail(f"--min-doc-tokens must be >= 0 (got {args.min_doc_tokens})")
    if args.max_docs is not None and args.max_docs < 1:
        common.fail(f"--max-docs must be >= 1 (got {args.max_docs})")
    if args.max_tokens is not None and args.max_tokens < 1:
        common.fail(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    if args.long_token_share is not None and not 0 < args.long_token_share < 1:
        common.fail(f"--long-token-share must be between 0 and 1, e.g. 0.7 (got {args.long_token_share})")
    if not 0 <= args.short_doc_tokens <= args.long_doc_tokens:
        common.fail(f"need 0 <= --short-doc-tokens <= --long-doc-tokens (got {args.short_doc_tokens} and "
                    f"{args.long_doc_tokens})")
    if args.separator is not None and args.boundary != "separator":
        common.fail("--separator only applies with --boundary separator; add --boundary separator or drop it")
    if args.boundary == "separator" and args.separator is None:
        args.separator = "<s>"
    if args.separator == "":
        common.fail('--separator must not be empty; UltraLong used "<s>"')
    if not args.tokenizer and not args.model:
        common.fail("pass --tokenizer (or --model, whose tokenizer is used)")


def load_tokenizer(args):
    name = args.tokenizer or args.model
    tok = common.load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    if tok.eos_token_id is None:
        common.fail(f"tokenizer {name} has no eos token; documents need an end marker (set eos_token in its "
                    f"tokenizer_config.json or choose another tokenizer)")
    return name, tok


# -------------------------------------------------------------------------------------------------------------
# Pass 1: read and tokenize every source into a token store on disk.


def tokenize_source(src: common.Source, store: common.TokenStore, bt: common.BatchTokenizer, args) -> dict:
    """Stream the source's documents (this shard's share) through the tokenizer workers into `store`."""
    counts = {"docs_read": 0, "docs_in_shard": 0, "docs_too_short": 0, "chars": 0, "text_tokens_read": 0}
    index_queue: deque = deque()

    # in-process: big batches keep the tokenizer's thread pool busy; workers: small ones balance the load
    max_chars = (1 << 21) if args.num_proc == 1 else (1 << 18)

    def batches():
        idx, texts, chars = [], [], 0
        for i, text in enumerate(src.iter_texts()):
            if args.max_docs is not None and i >= args.max_docs:
                break
            counts["docs_read"] += 1
            if i % args.num_shards != args.shard_index:
                continue
            idx.append(i)
            texts.append(text)
            chars += len(text)
            if chars >= max_chars or len(texts) >= 512:
                index_queue.append(np.asarray(idx, dtype=np.int64))
                yield texts
                idx, texts, chars = [], [], 0
        if texts:
            index_queue.append(np.asarray(idx, dtype=np.int64))
            yield texts

    min_tokens = max(1, args.min_doc_tokens)
    for lengths, flat in bt.map(batches()):
        idx = index_queue.popleft()
        counts["docs_in_shard"] += len(lengths)
        counts["text_tokens_read"] += int(lengths.sum())
        keep = lengths >= min_tokens
        if not keep.all():
            counts["docs_too_short"] += int((~keep).sum())
            flat = flat[np.repeat(keep, lengths)]
            lengths, idx = lengths[keep], idx[keep]
        store.append(lengths, flat, idx)
    store.finish()
    if counts["docs_read"] == 0:
        common.fail(f"source {src.spec.describe()!r} has no documents")
    if counts["docs_in_shard"] == 0:
        common.fail(f"source {src.spec.describe()!r} has {counts['docs_read']} documents, none of them in shard "
                    f"{args.shard_index} of {args.num_shards}; use fewer shards")
    if len(store) == 0:
        common.fail(f"source {src.spec.describe()!r}: all {counts['docs_in_shard']} documents are shorter than "
                    f"--min-doc-tokens {args.min_doc_tokens}; lower it")
    return counts


# -------------------------------------------------------------------------------------------------------------
# Pass 2: plan (shaping, mixture, packing) from document lengths, then write rows reading tokens back from disk.


def shape_lengths(sources, stores, nb: int, args) -> tuple[list[np.ndarray], list]:
    """Copies of each stored document after per-source length shaping (all ones without --long-token-share)."""
    copies, shaping = [], []
    for src, store in zip(sources, stores):
        if args.long_token_share is None:
            copies.append(np.ones(len(store), dtype=np.int64))
            shaping.append(None)
            continue
        u = common.doc_uniforms(args.seed, src.name, store.tags)
        c, info = common.length_shaping(store.lengths, store.lengths + nb, u, args.short_doc_tokens,
                                    args.long_doc_tokens, args.long_token_share)
        if info.note:
            common.print0(f"  length shaping {src.name}: {info.note}")
        copies.append(c)
        shaping.append(info)
    return copies, shaping


def plan_source(name: str, store: common.TokenStore, copies: np.ndarray, quota: int, nb: int, args):
    """Which documents (in which order) fill the source's quota, and how they are packed into rows."""
    sel = common.select_items(store.lengths, copies, nb, quota, source_rng(args, name, 1))
    if args.packing == "concat":
        return sel, common.plan_concat(sel.cost, args.seq_len)
    # best-fit: a subsampled source fills the gaps with the documents it would have skipped, landing on its
    # quota in full rows; a source that gives all it has keeps its (few) padded gaps
    spare = store.lengths[sel.spare]
    plan = common.plan_best_fit(sel.cost, args.seq_len, rng=source_rng(args, name, 2), fill_lengths=spare + nb,
                            fill_cut_max=spare, max_rows=-(-quota // args.seq_len) if len(spare) else None)
    return common.add_fill(sel, store.lengths, plan.fill_used), plan


def source_rng(args, name: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([args.seed, args.shard_index, common.stable_hash(name) & 0xFFFFFFFF, purpose])


def interleave(row_counts: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """All rows of all sources, each source's rows in their own order, spread evenly through the output
    (row j of a source with R rows sits near position (j + u) / R, u uniform)."""
    keys, ids = [], []
    for s, r in enumerate(row_counts):
        keys.append((np.arange(r) + rng.random(r)) / max(r, 1))
        ids.append(np.stack([np.full(r, s), np.arange(r)], axis=1))
    if not keys:
        return []
    order = np.argsort(np.concatenate(keys), kind="stable")
    return [tuple(x) for x in np.concatenate(ids)[order].tolist()]


def make_fetch(store: common.TokenStore, sel: common.Selection, boundary: np.ndarray):
    docs, ntexts = sel.doc.tolist(), sel.ntext.tolist()

    def fetch(item: int, s: int, e: int):
        doc, nt = docs[item], ntexts[item]
        if e <= nt:
            return {"input_ids": store.read(doc, s, e)}
        parts = [store.read(doc, s, nt)] if s < nt else []
        parts.append(boundary[max(s, nt) - nt:e - nt])
        return {"input_ids": np.concatenate(parts) if len(parts) > 1 else parts[0]}

    return fetch


def write_rows(out: Path, plans, fetches, names, order, args, pad_id: int) -> dict:
    seq_len = args.seq_len
    writer = common.PackedDatasetWriter(out, len(order), seq_len, fingerprint="")
    hasher = hashlib.blake2b(digest_size=8)
    per_batch = max(1, min(1024, ROWS_BATCH_BYTES // (4 * seq_len)))
    one_segment = args.boundary == "separator"
    pads = {"input_ids": pad_id}
    for b0 in range(0, len(order), per_batch):
        chunk = order[b0:b0 + per_batch]
        buf = np.empty((len(chunk), seq_len), dtype=np.int32)
        doc_lens, num_pad, cost, source = [], [], [], []
        for i, (s, r) in enumerate(chunk):
            row = common.assemble_row(plans[s], r, fetches[s], pads, one_segment=one_segment,
                                  out={"input_ids": buf[i]})
            doc_lens.append(row["doc_lens"])
            num_pad.append(row["num_pad"])
            cost.append(row["attn_cost"])
            source.append(names[s])
        hasher.update(buf.data)  # no copy
        hasher.update(np.asarray([x for d in doc_lens for x in d], dtype=np.int64).tobytes())
        writer.write(common.rows_table(buf, doc_lens, num_pad, source, cost))
    writer.fingerprint = hasher.hexdigest()
    writer.close()
    return {"files": writer.num_shards, "fingerprint": writer.fingerprint}


# -------------------------------------------------------------------------------------------------------------
# Statistics.


def collect_stats(sources, stores, counts, copies, shaping, quotas, sels, plans, shares, nb: int, args) -> dict:
    per_source, used_all = {}, []
    total_real = sum(int(p.row_tokens().sum()) for p in plans)
    for src, st, cnt, c, info, q, sel, plan, share in zip(sources, stores, counts, copies, shaping, quotas, sels,
                                                           plans, shares):
        real = int(plan.row_tokens().sum())
        pad = int(plan.num_pad().sum())
        pieces = plan.pieces_per_item(len(sel.ntext))
        used = np.bincount(plan.item, weights=plan.end - plan.start, minlength=len(sel.ntext))
        cut = (used > 0) & (used < st.lengths[sel.doc] + nb)  # documents that do not end in the output
        used = used[used > 0].astype(np.int64)
        used_all.append(used)
        per_source[src.name] = {
            "spec": src.spec.describe(), "kind": src.kind,
            "location": str(src.path) if src.path is not None else src.spec.location,
            "weight": src.spec.weight, **cnt, "docs_kept": len(st), "text_tokens_kept": int(st.lengths.sum()),
            "tokens_available": int((c * (st.lengths + nb)).sum()),
            "shaping": None if info is None else vars(info),
            "long_share_before": info.long_share_before if info else None,
            "long_share_after": info.long_share_after if info else None,
            "docs_repeated": int((c > 1).sum()), "docs_dropped_by_shaping": int((c == 0).sum()),
            "quota": q, "epochs": sel.epochs, "docs_out": len(used), "docs_cut": int(cut.sum()),
            "docs_split": int((pieces > 1).sum()), "tokens_out": real, "rows": plan.num_rows,
            "pad_tokens": pad, "padding_fraction": pad / max(plan.num_rows * args.seq_len, 1),
            "target_share": float(share), "achieved_share": real / max(total_real, 1),
            "length_histogram": common.length_histogram(used),
        }
    num_rows = sum(p.num_rows for p in plans)
    num_pad = sum(s["pad_tokens"] for s in per_source.values())
    return {
        "sources": per_source, "num_rows": num_rows, "num_tokens": total_real, "num_pad_tokens": num_pad,
        "padding_fraction": num_pad / max(num_rows * args.seq_len, 1),
        "docs_out": sum(s["docs_out"] for s in per_source.values()),
        "docs_split": sum(s["docs_split"] for s in per_source.values()),
        "length_histogram": common.length_histogram(np.concatenate(used_all)),
        "max_share_error": max(abs(s["achieved_share"] - s["target_share"]) for s in per_source.values()),
    }


def print_stats(stats: dict, args, out: Path) -> None:
    rows = []
    for name, s in stats["sources"].items():
        rows.append([name, s["kind"], s["docs_in_shard"], s["docs_kept"], common.human(s["tokens_available"]),
                     f"{s['long_share_before']:.0%}->{s['long_share_after']:.0%}" if s.get("shaping") else "-",
                     f"{s['target_share']:.1%}", f"{s['achieved_share']:.1%}", common.human(s["tokens_out"]),
                     s["rows"], f"{s['padding_fraction']:.2%}", s["docs_out"], s["docs_split"], s["docs_cut"],
                     f"{s['epochs']:.2f}"])
    t = stats
    rows.append(["total", "", sum(s["docs_in_shard"] for s in t["sources"].values()),
                 sum(s["docs_kept"] for s in t["sources"].values()),
                 common.human(sum(s["tokens_available"] for s in t["sources"].values())), "", "100%", "100%",
                 common.human(t["num_tokens"]), t["num_rows"], f"{t['padding_fraction']:.2%}", t["docs_out"],
                 t["docs_split"], sum(s["docs_cut"] for s in t["sources"].values()), ""])
    common.print0("\n" + common.format_table(
        ["source", "kind", "docs", "kept", "tokens avail", "long share", "target", "achieved", "tokens out", "rows",
         "padding", "docs out", "split", "cut", "epochs"], rows))
    hist = [[h["bin"], h["docs"], common.human(h["tokens"]), f"{h['token_share']:.1%}"]
            for h in t["length_histogram"]]
    common.print0("\ndocument lengths (tokens) in the output\n" + common.format_table(
        ["length", "docs", "tokens", "share"], hist))
    common.print0(f"\nwrote {t['num_rows']} rows x {args.seq_len} tokens ({args.boundary} boundaries, {args.packing} "
                  f"packing, padding {t['padding_fraction']:.2%}, {t['docs_split']} documents split) to {out} in "
                  f"{t['seconds_total']:.1f} s ({common.human(t['tokens_per_second'])} tokens/s)")


# -------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    validate(args)
    specs = common.parse_source_specs(args.data) if args.data else common.embedded_specs()
    out = common.check_output_dir(args.out, args.overwrite)
    sources = [common.resolve_source(s, args.text_field, args.txt_unit) for s in specs]
    tok_name, tok = load_tokenizer(args)
    eos_id = int(tok.eos_token_id)
    pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else eos_id
    if args.boundary == "mask":
        boundary = [eos_id]
    else:
        boundary = list(tok.encode(args.separator, add_special_tokens=False))
        if not boundary:
            common.fail(f"--separator {args.separator!r} tokenizes to nothing with {tok_name}; choose another text")
    boundary_arr = np.asarray(boundary, dtype=np.int32)
    for src in sources:
        src.check()
    weights = [s.spec.weight for s in sources]
    shares = np.asarray(weights) / sum(weights)
    common.print0(f"01_prepare_data: {len(sources)} source(s): "
                  + ", ".join(f"{s.name} ({s.kind}) {w:.1%}" for s, w in zip(sources, shares))
                  + f"; tokenizer {tok_name}; {args.num_proc} worker(s)")

    t_start = time.time()
    with common.atomic_output_dir(out, args.overwrite) as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        stores, counts = [], []
        try:
            with common.BatchTokenizer(tok, args.num_proc) as bt:
                for k, src in enumerate(sources):
                    t0 = time.time()
                    store = common.TokenStore(scratch / f"{k}.bin")
                    stores.append(store)
                    counts.append(tokenize_source(src, store, bt, args))
                    dt = time.time() - t0
                    common.print0(f"  tokenized {src.name}: {counts[-1]['docs_in_shard']} docs, "
                                  f"{common.human(counts[-1]['text_tokens_read'])} tokens in {dt:.1f} s "
                                  f"({common.human(counts[-1]['text_tokens_read'] / max(dt, 1e-9))} tokens/s)")
            t_tok = time.time() - t_start

            nb = len(boundary)
            copies, shaping = shape_lengths(sources, stores, nb, args)
            available = [int((c * (st.lengths + nb)).sum()) for c, st in zip(copies, stores)]
            budget = None if args.max_tokens is None else -(-args.max_tokens // args.num_shards)
            quotas = common.mixture_quotas(available, weights, args.seq_len, budget)
            sels, plans, fetches = [], [], []
            for src, store, c, q in zip(sources, stores, copies, quotas):
                sel, plan = plan_source(src.name, store, c, q, nb, args)
                sels.append(sel)
                plans.append(plan)
                fetches.append(make_fetch(store, sel, boundary_arr))
            order = interleave([p.num_rows for p in plans], source_rng(args, "<interleave>", 3))
            written = write_rows(tmp, plans, fetches, [s.name for s in sources], order, args, pad_id)
        finally:
            for store in stores:
                store.close()
            shutil.rmtree(scratch, ignore_errors=True)

        stats = collect_stats(sources, stores, counts, copies, shaping, quotas, sels, plans, shares, nb, args)
        stats.update(seconds_tokenize=t_tok, seconds_total=time.time() - t_start, output_files=written["files"])
        stats["tokens_per_second"] = sum(c["text_tokens_read"] for c in counts) / max(stats["seconds_total"], 1e-9)
        local_inputs = [str(s.path) for s in sources if s.path is not None]
        common.write_manifest(
            tmp, "01_prepare_data", args, inputs=local_inputs, stats=stats,
            seq_len=args.seq_len, boundary=args.boundary, separator=args.separator, packing=args.packing,
            tokenizer=tok_name, vocab_size=len(tok), eos_token_id=eos_id, pad_token_id=pad_id,
            boundary_token_ids=boundary, num_rows=stats["num_rows"], num_tokens=stats["num_tokens"],
            sources=[{"name": s.name, "spec": s.spec.describe(), "kind": s.kind, "weight": s.spec.weight,
                      "target_share": float(w)} for s, w in zip(sources, shares)],
            shard={"index": args.shard_index, "count": args.num_shards}, fingerprint=written["fingerprint"])
    print_stats(stats, args, out)
    return stats


if __name__ == "__main__":
    common.run_main(main)
