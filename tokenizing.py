"""Tokenizing a corpus at scale: batches of texts tokenized in worker processes, results in input order, token ids
streamed to a flat file on disk and read back by position, so memory stays flat whatever the corpus size.

- `make_encoder`: a private copy of a fast tokenizer's Rust backend that encodes special-token strings inside a
  document as plain text (a document containing "<|endoftext|>" must not produce a fake eos);
- `BatchTokenizer`: `num_proc` worker processes (or this process with the tokenizer's own threads), a bounded
  number of batches in flight, results in order;
- `TokenStore`: documents' token ids appended to one int32 file with their lengths and a caller's tag per
  document; `read(doc, start, end)` reads a piece back with a positioned read (no memory map).

Used by 01_prepare_data.py (pass 1: every source tokenized into a token store; pass 2 reads rows back from it).

Outside this repository (copy this file alone: it needs only NumPy and the tokenizer you pass):

    import numpy as np
    import tokenizing
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    store = tokenizing.TokenStore("tokens.bin")
    with tokenizing.BatchTokenizer(tok, num_proc=8) as bt:
        for k, (lengths, flat) in enumerate(bt.map(batches_of_texts)):   # lists of strings, in order
            store.append(lengths, flat, tags=np.full(len(lengths), k))
    store.finish()
    first_ten = store.read(0, 0, 10)     # token ids 0..9 of the first document
"""
from __future__ import annotations

import os
import signal
from array import array
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

_WORKER_ENCODER = None


def make_encoder(tokenizer):
    """What the workers call: a private copy of the fast tokenizer's Rust backend with special-token strings in
    documents encoded as plain text (a document that contains "<|endoftext|>" must not produce a fake eos), or
    the slow tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(backend.to_str())
    encoder.encode_special_tokens = True
    return encoder


def encode_texts(encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch without special tokens: (lengths int64 [n], flat ids int32 [sum(lengths)])."""
    from tokenizers import Tokenizer

    if isinstance(encoder, Tokenizer):
        fn = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
        ids = [e.ids for e in fn(list(texts), add_special_tokens=False)]
    else:
        ids = encoder(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum()))
    return lengths, flat


def _worker_init(encoder) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no thread pool inside each
    # a forked worker inherits its parent's Python signal handlers; Pool.terminate() stops workers with SIGTERM,
    # so one that caught it (a training loop's handler in the same process) would never exit
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_ENCODER = encoder


def _worker_encode(texts):
    return encode_texts(_WORKER_ENCODER, texts)


class BatchTokenizer:
    """Tokenize batches in `num_proc` worker processes, yielding results in input order. Batches in flight are
    bounded by `max_inflight_chars` (so reading a huge corpus never queues it all in memory) but are many more
    than the workers, so that one worker busy with a huge document does not leave the others idle while the
    results wait for it in order.

    With num_proc == 1 batches are tokenized in this process (a fast tokenizer then uses its own thread pool
    unless TOKENIZERS_PARALLELISM=false)."""

    def __init__(self, tokenizer, num_proc: int = 1, max_inflight_chars: int = 16 << 20):
        self.encoder = make_encoder(tokenizer)
        self.num_proc = max(1, int(num_proc))
        self.max_inflight_chars = max_inflight_chars
        self.pool = None
        if self.num_proc > 1:
            import multiprocessing as mp

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before forking: no warning, no deadlock
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.num_proc, initializer=_worker_init,
                                                    initargs=(self.encoder,))

    def map(self, batches: Iterable[Sequence[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.pool is None:
            for batch in batches:
                yield encode_texts(self.encoder, batch)
            return
        pending: deque = deque()
        inflight = 0
        for batch in batches:
            chars = sum(len(t) for t in batch)
            pending.append((self.pool.apply_async(_worker_encode, (list(batch),)), chars))
            inflight += chars
            while pending and (inflight > self.max_inflight_chars or len(pending) > 64 * self.num_proc):
                result, c = pending.popleft()
                inflight -= c
                yield result.get()
        while pending:
            yield pending.popleft()[0].get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TokenStore:
    """Documents' token ids in one flat int32 file plus per-document lengths: written append-only, read back
    with positioned reads (no memory map, so the resident memory of the reader stays small)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._lengths = array("q")
        self._tags = array("q")  # caller's per-document tag (01: the document's index in its source)
        self.lengths: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        self._fd: int | None = None

    def append(self, lengths: np.ndarray, flat: np.ndarray, tags: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(flat, dtype=np.int32).tobytes())
        self._lengths.extend(np.asarray(lengths, dtype=np.int64).tolist())
        self._tags.extend(np.asarray(tags, dtype=np.int64).tolist())

    def finish(self) -> "TokenStore":
        self._file.close()
        self.lengths = np.frombuffer(self._lengths, dtype=np.int64).copy()
        self.tags = np.frombuffer(self._tags, dtype=np.int64).copy()
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __len__(self) -> int:
        return len(self._lengths) if self.lengths is None else len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1]) if self.offsets is not None else 0

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of document `doc`."""
        if end <= start:
            return np.empty(0, dtype=np.int32)
        nbytes = (end - start) * 4
        data = os.pread(self._fd, nbytes, int(self.offsets[doc] + start) * 4)
        if len(data) != nbytes:
            raise OSError(f"short read from {self.path}")
        return np.frombuffer(data, dtype=np.int32)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
