"""HELMET's recall, RAG, re-rank and ICL categories: its data files read, its examples selected, its prompts built
and truncated in a model's own tokens, and its outputs scored, as HELMET's code does them.

HELMET (Yen et al., 2025; github.com/princeton-nlp/HELMET) is the long-context benchmark ProLong is judged by. Of
its seven categories, four are scored without a model judge and are built here exactly as HELMET's `data.py`,
`model_utils.py` and `utils.py` build and score them, with the settings of its `configs/*.yaml` (lengths 8K to
128K, `max_test_samples`, shots, generation lengths, stopping at a newline):

  Recall   RULER MK needle / MK UUID / MV (ruler_recall) and JSON KV (substring exact match, SubEM)
  RAG      KILT NQ, TriviaQA, HotpotQA, PopQA with HELMET's retrieved passages, 2 shots (SubEM)
  Re-rank  MS MARCO passages, 2 shots (nDCG@10 of the ranked IDs, trec_eval's definition)
  ICL      TREC coarse / fine, Banking77, Clinc150, NLU, many-shot with class-balanced demonstrations and labels
           mapped to shuffled integers (exact match)

QA (NarrativeQA, InfiniteBench) and summarisation (Multi-LexSum, InfiniteBench) are judged by GPT-4o in HELMET and
are not here; Cite (ALCE) is not in ProLong's average. docs/evaluation.md#helmet-as-used-by-prolong gives the
definitions, the data layout and where longctx departs from HELMET.

The data is HELMET's release (the `data/` folder of the hub dataset princeton-nlp/HELMET's data.tar.gz: ruler/,
json_kv/, kilt/, msmarco/), plus the ICL datasets HELMET reads from the hub, exported once as JSON lines into
icl/ (see `ICL_SOURCES`). Nothing is downloaded here. The recall tasks can also be generated (RULER's needles
from ruler.py, a JSON object of UUID pairs), sized to any length in the model's tokens, in HELMET's record format.

Outside this repository (copy this file, ruler.py and common.py):

    import helmet
    data = helmet.data_root("helmet/data")
    cell = helmet.load_cell(helmet.DATASETS["kilt_nq"], 32768, data)       # HELMET's 100 examples, 2 shots
    for example in cell.examples:
        ids, example, cut = helmet.encode_example(tokenizer, cell, example, 32768)   # truncated as HELMET does
        output = my_generate(ids, max_new_tokens=cell.dataset.generation_max_length,
                             stop_token_ids=helmet.newline_token_ids(tokenizer))
        score, parsed = cell.score(example, output)                        # 0..1, as HELMET's metric
    # the recall tasks without any data, in the model's tokens:
    cell = helmet.generate_recall_cell(helmet.DATASETS["json_kv"], 8192, tokenizer, samples=20)
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import common
import ruler

SEED = 42  # HELMET's --seed: it picks the test examples, the demonstrations and the ICL label maps
LENGTHS = (8192, 16384, 32768, 65536, 131072)  # HELMET's input_max_length values (configs/*_short.yaml, *.yaml)
CATEGORIES = {"recall": "Recall", "rag": "RAG", "rerank": "Re-rank", "icl": "ICL"}  # --tasks helmet_<key>
JUDGED = {"qa": "LongQA", "summ": "Summ"}  # scored by GPT-4o in HELMET: not run here
PROLONG_CATEGORIES = ("Recall", "RAG", "Re-rank", "ICL", "LongQA", "Summ")  # ProLong's "long" average

# -------------------------------------------------------------------------------------------------------------
# HELMET's prompt texts (data.py). Every prompt is user_template + "\n" + system_template, formatted with the
# example's fields; without a chat template (HELMET's setting for these categories) the model continues the system
# template, which is put back in front of its output before scoring.

RULER_NIAH_USER = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I "
                   "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic "
                   "{type_needle_v} for {query} mentioned in the provided text?")
RULER_NIAH_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text is"
RULER_MV_USER = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
RULER_MV_SYSTEM = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
JSON_KV_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
                "{demos}Key: {question}")
JSON_KV_SYSTEM = "Corresponding value:"
JSON_KV_DEMO = "Key: {key}\nCorresponding value:{value}"
RAG_USER = ("Use the given documents to write a concise and short answer to the question. Write your answer in the "
            "following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}")
RAG_SYSTEM = "Answer:"
RAG_DEMO = "{documents}\n\nQuestion: {question}\nAnswer: {answer}"
RAG_PASSAGE = "Document (Title: {title}): {text}"
# "relelvant" is HELMET's spelling; the prompt must be byte-identical.
RERANK_USER = ("You are provided with a list of documents, each indicated by their ID. Rank each document based on "
               "their relevance to the question in descending order from most relelvant to least relevant texts. "
               "Include all documents in the rankings. Write your answer using the unique IDs, with the following "
               "format:\nRanking: ID3 > ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}")
RERANK_SYSTEM = "Ranking:"
RERANK_PASSAGE = "[ID: {id}] Document: {text}"
RERANK_PASSAGE_TITLED = "[ID: {id}] Document (Title: {title}): {text}"
ICL_USER = ('Use the provided mapping from the text to label to assign a label to the text. Only output "label: '
            '{{label}}" and nothing else. \n\n{context}\n\n{question}')
ICL_SYSTEM = "label:"
ICL_ITEM = "{text}\nlabel: {label}"
# The tokens HELMET's HF model stops at when its --stop_newline is set (added to the end-of-sequence ids). Its RAG,
# re-rank and ICL configs ask for it as `stop_new_line: true`, a key its argument parser does not define
# (parser.set_defaults(**config) then leaves --stop_newline False), so HELMET as run with its configs generates
# the full generation length; longctx does the same unless asked to stop (05 --helmet-stop-newline).
NEWLINE_TOKENS = ("\n", "Ċ", "ĊĊ", "<0x0A>")

# -------------------------------------------------------------------------------------------------------------
# The datasets, as HELMET's configs name and set them.


@dataclass(frozen=True)
class IclSource:
    """Where an ICL dataset's rows are (icl/<folder>/<split>.jsonl, exported from the hub dataset `hub`) and how
    HELMET reads them."""
    hub: str
    folder: str
    test_split: str | None  # None: HELMET splits the train rows 90/10 itself (NLU)
    label_field: str
    num_labels: int


ICL_SOURCES = {
    "trec_coarse": IclSource("CogComp/trec", "trec", "test", "coarse_label", 6),
    "trec_fine": IclSource("CogComp/trec", "trec", "test", "fine_label", 50),
    "banking77": IclSource("PolyAI/banking77", "banking77", "test", "label", 77),
    "clinic150": IclSource("clinc_oos (config plus)", "clinc150", "validation", "intent", 151),
    "nlu": IclSource("xingkunliuxtracta/nlu_evaluation_data", "nlu", None, "label", 68),
}


@dataclass(frozen=True)
class HelmetDataset:
    name: str  # HELMET's dataset name (ICL: without its shot count, which depends on the length)
    category: str  # Recall | RAG | Re-rank | ICL, as HELMET's collect_results groups them
    kind: str  # the loader: ruler | json_kv | kilt | msmarco | icl
    metric: str  # the metric HELMET reports for it
    generation_max_length: int
    config_stop_newline: bool  # the config's stop_new_line, which HELMET's eval.py never reads (see NEWLINE_TOKENS)
    max_test_samples: int = 100
    shots: int = 2  # demonstrations (RULER takes none; ICL's many shots are `per_length`)
    test_file: str = ""  # under the data folder; {length} and {k} are filled per length
    per_length: tuple = ()  # the k of the test file (ICL: the shots) at each of LENGTHS
    demo_file: str | None = None
    ruler_task: str | None = None  # recall: the ruler.py task whose needles it hides
    type_needle_v: str | None = None  # recall: the word HELMET's RULER template names the values with
    icl: IclSource | None = None

    def k(self, length: int) -> int:
        return self.per_length[LENGTHS.index(length)]

    def label(self, length: int) -> str:
        """HELMET's name of the dataset at a length (ICL names carry the shot count)."""
        return f"{self.name}_{self.k(length)}shot_balance" if self.kind == "icl" and length in LENGTHS else self.name


def _ruler(name, folder, task, type_v, gen):
    return HelmetDataset(name, "Recall", "ruler", "ruler_recall", gen, False, shots=0, ruler_task=task,
                         test_file=f"ruler/{folder}/validation_{{length}}.jsonl", type_needle_v=type_v)


def _kilt(name, stem, demo, dep):
    return HelmetDataset(name, "RAG", "kilt", "substring_exact_match", 20, True,
                         test_file=f"kilt/{stem}_k{{k}}_{dep}.jsonl", per_length=(50, 105, 220, 440, 1000),
                         demo_file=f"kilt/{demo}_k3_{dep}.jsonl")


def _icl(name, per_length):
    return HelmetDataset(f"icl_{name}", "ICL", "icl", "exact_match", 20, True, max_test_samples=500, shots=0,
                         per_length=per_length, icl=ICL_SOURCES[name])


DATASETS = {d.name: d for d in [
    _ruler("ruler_niah_mk_2", "niah_multikey_2", "niah_multikey_2", "number", 50),
    _ruler("ruler_niah_mk_3", "niah_multikey_3", "niah_multikey_3", "uuid", 100),
    _ruler("ruler_niah_mv", "niah_multivalue", "niah_multivalue", "numbers", 50),
    HelmetDataset("json_kv", "Recall", "json_kv", "substring_exact_match", 100, False,
                  test_file="json_kv/test_k{k}_dep6.jsonl", per_length=(105, 220, 440, 900, 1800)),
    _kilt("kilt_nq", "nq-dev-multikilt_1000", "nq-train-multikilt_1000", "dep6"),
    _kilt("kilt_triviaqa", "triviaqa-dev-multikilt_1000", "triviaqa-train-multikilt_1000", "dep6"),
    _kilt("kilt_hotpotqa", "hotpotqa-dev-multikilt_1000", "hotpotqa-train-multikilt_1000", "dep3"),
    _kilt("kilt_popqa_3", "popqa_test_1000", "popqa_test_1000", "dep6"),
    HelmetDataset("msmarco_rerank_psg", "Re-rank", "msmarco", "NDCG@10", 200, True,
                  test_file="msmarco/test_reranking_data_k{k}_dep3.jsonl", per_length=(50, 130, 285, 600, 1000),
                  demo_file="msmarco/test_reranking_data_k10_dep3.jsonl"),
    _icl("trec_coarse", (400, 800, 1600, 3300, 6600)),
    _icl("trec_fine", (400, 800, 1600, 3200, 6400)),
    _icl("banking77", (360, 720, 1450, 2900, 5900)),
    _icl("clinic150", (440, 880, 1750, 3525, 7050)),
    _icl("nlu", (510, 1020, 2040, 4080, 8296)),
]}


def category_datasets(category: str) -> list[HelmetDataset]:
    return [d for d in DATASETS.values() if d.category == category]


# -------------------------------------------------------------------------------------------------------------
# Metrics (HELMET utils.py, after DensePhrases / DrQA): answers normalised (lower case, punctuation and articles
# removed, whitespace collapsed); exact match and substring exact match over every gold answer, the best counting.


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _gold_list(answers) -> list[str]:
    """A gold answer, a list of them, or a list of lists (flattened)."""
    if isinstance(answers, str):
        return [answers]
    if answers and isinstance(answers[0], list):
        return [a for group in answers for a in group]
    return list(answers)


def exact_match(prediction: str, answers) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in _gold_list(answers)))


def substring_exact_match(prediction: str, answers) -> float:
    return float(any(normalize_answer(a) in normalize_answer(prediction) for a in _gold_list(answers)))


def parse_output(output: str, prefix: str = "Answer:") -> str | None:
    """The text after the first `prefix` (case-insensitive) up to the line's end, else the first line; a repeated
    prefix at its start is dropped."""
    found = re.search(f"(?:{prefix})(.*)(?:\n|$)", output, flags=re.IGNORECASE)
    found = found or re.search(r"(?:^)(.*)(?:\n|$)", output)
    if found is None:
        return None
    return re.sub(f"^{re.escape(prefix)}", "", found[1].strip(), flags=re.IGNORECASE).strip()


def parse_rankings(output: str) -> dict[str, int]:
    """The ranked IDs of a re-rank answer as {id: score}, first ranked highest: square brackets, colons and every
    "id" removed, then the longest run of integers joined by ">" (an answer without one is its own single id)."""
    text = re.sub(r"[\[\]:]", "", output).lower().replace("id", "")
    longest = max((m.group(0) for m in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", text)), key=len, default="")
    ranked = [x.strip() for x in longest.split(">") if x.strip().isdigit()] if longest else [text]
    scores = {}
    for i, doc in enumerate(ranked):
        scores.setdefault(doc, len(ranked) - i)
    return scores


def ndcg_at_k(scores: dict[str, float], qrels: dict[str, int], k: int = 10) -> float:
    """trec_eval's ndcg_cut.k (HELMET calls it through pytrec_eval): documents by score, highest first (ties: the
    larger id first, as trec_eval), gain = relevance label, discount log2(rank + 1); divided by the same sum over
    the labels sorted best first. Rounded to 5 decimals, as HELMET stores it per query."""
    ranked = sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True)[:k]
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return round(dcg / idcg, 5) if idcg > 0 else 0.0


def ruler_recall(prediction: str, answers: list[str]) -> float:
    """HELMET's RULER metric: the fraction of the gold values found (case-insensitive substring)."""
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)


def _best_of_parsed(metric, prediction: str, answers, prefix: str) -> tuple[float, str | None]:
    """HELMET scores the whole output and the parsed answer and keeps the better."""
    parsed = parse_output(prediction, prefix)
    value = metric(prediction, answers)
    return (max(value, metric(parsed, answers)) if parsed is not None else value), parsed


def score_prediction(kind: str, prediction: str, example: dict) -> tuple[float, str | None]:
    """(score in [0, 1], parsed answer) of a prediction (the system template + the model's output) by the dataset
    kind's HELMET metric."""
    if kind == "ruler":
        return ruler_recall(prediction, example["answer"]), prediction
    if kind == "json_kv":
        return _best_of_parsed(substring_exact_match, prediction, example["answer"], "corresponding value:")
    if kind == "kilt":
        return _best_of_parsed(substring_exact_match, prediction, example["answer"], "Answer:")
    if kind == "msmarco":
        ranking = parse_rankings(prediction)
        return ndcg_at_k(ranking, dict(example["qrel"])), " > ".join(ranking)
    parsed = parse_output(prediction, ICL_SYSTEM)
    return exact_match(parsed if parsed is not None else "", example["answer"]), parsed


# -------------------------------------------------------------------------------------------------------------
# Selecting examples and demonstrations the way HELMET's calls to Hugging Face `datasets` and Python's `random`
# do: Dataset.shuffle(seed) orders rows by numpy's default_rng(seed).permutation(n); keys are drawn with
# random.Random(seed).sample over the sorted keys; a demonstration's seed is SHA-256 of the example's key.


def shuffled(rows: list, seed: int) -> list:
    import numpy as np

    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def key_seed(key) -> int:
    return int(hashlib.sha256(str(key).encode("utf-8")).hexdigest(), 16) % 2**31


def first_distinct(rows: list[dict], key: str, count: int) -> list[dict]:
    """The first `count` rows with distinct `key` (drop_duplicates, then select(range(count)))."""
    seen, out = set(), []
    for row in rows:
        if row[key] not in seen:
            seen.add(row[key])
            out.append(row)
    if len(out) < count:
        common.fail(f"HELMET needs {count} demonstrations but only {len(out)} distinct ones are left; give the "
                    f"complete demonstration file")
    return out[:count]


def sample_by_key(rows: list[dict], key: str, count: int | None, seed: int = SEED) -> list[dict]:
    """Rows whose key is among `count` keys drawn from the sorted distinct keys (all rows when count is None), in
    file order."""
    if count is None:
        return rows
    keys = sorted({row[key] for row in rows})
    chosen = set(random.Random(seed).sample(keys, min(count, len(keys))))
    return [row for row in rows if row[key] in chosen]


def balance_labels(rows: list[dict], count: int, seed: int, label_field: str) -> list[dict]:
    """HELMET's class-balanced draw: rounds of one row per label (labels in order of first appearance, rows drawn
    without replacement within a label until it runs out), each round shuffled, the first `count` rows."""
    rng = random.Random(seed)
    by_label: dict = {}
    for row in rows:
        by_label.setdefault(row[label_field], []).append(row)
    rounds = math.ceil(count / len(by_label))
    sets = [[] for _ in range(rounds)]
    for members in by_label.values():
        picks = rng.sample(range(len(members)), rounds % len(members))  # HELMET's draw, modulo included
        while len(picks) < rounds:
            picks += rng.sample(range(len(members)), min(rounds - len(picks), len(members)))
        for round_rows, index in zip(sets, picks):
            round_rows.append(members[index])
    for round_rows in sets:
        rng.shuffle(round_rows)
    return [row for round_rows in sets for row in round_rows][:count]


def train_test_split(rows: list, seed: int, test_fraction: float = 0.1) -> tuple[list, list]:
    """`datasets`' train_test_split(test_size=0.1, seed): one permutation, the first ceil(0.1 n) rows for test."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = math.ceil(test_fraction * len(rows))
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


# -------------------------------------------------------------------------------------------------------------
# Reading HELMET's files: JSON lines, each record checked for the fields HELMET's loaders read.

REQUIRED = {  # kind -> (fields of a record, fields of each entry of its `ctxs`, what the file should be)
    "ruler": (("context", "query", "type_needle_v", "answer|outputs"), (), "HELMET's RULER files "
              "(data/ruler/<task>/validation_<length>.jsonl)"),
    "json_kv": (("context", "question", "answer", "demos", "num_kvs"), (), "HELMET's JSON KV files "
                "(data/json_kv/test_k<pairs>_dep6.jsonl)"),
    "kilt": (("question", "answers", "ctxs"), ("title", "text"), "HELMET's KILT files (data/kilt/*.jsonl)"),
    "msmarco": (("qid", "query", "ctxs"), ("id", "text", "label"), "HELMET's MS MARCO files "
                "(data/msmarco/test_reranking_data_k<passages>_dep3.jsonl)"),
}


def check_record(record, kind: str, where: str, extra: tuple = ()) -> dict:
    """The record, or one clear error naming the file, the line and the missing field."""
    fields, ctx_fields, what = REQUIRED.get(kind, ((), (), "the ICL rows (exported from the hub dataset)"))
    if not isinstance(record, dict):
        common.fail(f"{where} is not a JSON object; {what} hold one object per line")
    missing = [f for f in fields + extra if not any(alt in record for alt in f.split("|"))]
    if not missing and ctx_fields:  # every passage with the fields HELMET's templates name
        ctxs = record["ctxs"]
        if not isinstance(ctxs, list) or not ctxs:
            missing = ["ctxs (a non-empty list)"]
        else:
            missing = [f"ctxs[].{f}" for f in ctx_fields if not all(isinstance(c, dict) and f in c for c in ctxs)]
    if missing:
        passages = f" (ctxs: {', '.join(ctx_fields)})" if ctx_fields else ""
        fix = "give HELMET's own file" if kind in REQUIRED else "export the hub dataset with its own columns"
        common.fail(f"{where} has no {', '.join(missing)}: {what} hold {', '.join(fields + extra)}{passages}; {fix}")
    return record


def _checked_lines(path: Path, kind: str, extra: tuple = (), errors: str = "strict"):
    """(byte offset, record) of every non-empty line of a JSON-lines file, each record checked."""
    common.check_regular_file(path, "HELMET's file")  # a FIFO or device: named as such, never opened
    if not path.is_file():
        if kind in REQUIRED:
            fix = (f"{REQUIRED[kind][2]} belong there: extract HELMET's data.tar.gz (hub dataset princeton-nlp/HELMET) "
                   "into --helmet-data")
        else:
            fix = "export the ICL dataset from the hub there (docs/evaluation.md#helmet-in-05)"
        common.fail(f"{path} does not exist; {fix}")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(common.decode(raw, f"{path} (line {lineno})", errors, start))
            except json.JSONDecodeError as exc:
                common.fail(f"{path}:{lineno} is not valid JSON ({exc.msg}); HELMET's files hold one object per line")
            yield start, check_record(record, kind, f"{path}:{lineno}", extra)


def read_jsonl(path: Path, kind: str, extra: tuple = (), errors: str = "strict", limit: int | None = None) -> list:
    """Every record of a JSON-lines file (the first `limit` when given), each checked."""
    records = []
    for _, record in _checked_lines(path, kind, extra, errors):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        common.fail(f"{path} holds no records")
    return records


SELECTION_FIELDS = ("id", "question", "qid", "query", "s_pop")  # what HELMET selects test rows by


def selection_key(kind: str, first: dict) -> str:
    """The field HELMET draws test rows by: KILT's id (else the question), MS MARCO's qid (else the query)."""
    if kind == "kilt":
        return "id" if "id" in first else "question"
    return "qid" if "qid" in first else "query"


def select_rows(dataset: HelmetDataset, path: Path, samples: int, errors: str = "strict") -> list[dict]:
    """The test rows HELMET evaluates, in its order, reading only those in full: a file at 128K holds up to a
    thousand rows of a thousand passages each, of which HELMET keeps a hundred."""
    light = [dict({k: r[k] for k in SELECTION_FIELDS if k in r}, offset=offset)
             for offset, r in _checked_lines(path, dataset.kind, errors=errors)]
    if not light:
        common.fail(f"{path} holds no records")
    if dataset.kind in ("ruler", "json_kv"):  # Dataset.shuffle(seed).select(range(samples))
        chosen = shuffled(light, SEED)[:samples]
    else:
        threshold = popqa_threshold(dataset)
        if threshold is not None:
            light = popular_enough(light, threshold, str(path))
        chosen = sample_by_key(light, selection_key(dataset.kind, light[0]), samples)
    with open(path, "rb") as f:
        rows = []
        for row in chosen:
            f.seek(row["offset"])
            rows.append(json.loads(common.decode(f.readline(), str(path), errors)))
    return rows


def data_root(spec: str) -> Path:
    """--helmet-data: the `data` folder of HELMET's release (or the folder holding it)."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        common.fail(f"--helmet-data {spec} is not a directory; give the folder of HELMET's extracted data.tar.gz")
    known = ("ruler", "json_kv", "kilt", "msmarco", "icl")
    if not any((root / d).is_dir() for d in known) and (root / "data").is_dir():
        root = root / "data"
    return root


def test_path(root: Path, dataset: HelmetDataset, length: int) -> Path:
    return root / dataset.test_file.format(length=length, k=dataset.k(length) if dataset.per_length else "")


def icl_paths(root: Path, source: IclSource) -> tuple[Path, Path | None]:
    folder = root / "icl" / source.folder
    return folder / "train.jsonl", folder / f"{source.test_split}.jsonl" if source.test_split else None


def check_files(root: Path, dataset: HelmetDataset, length: int, errors: str = "strict") -> None:
    """Before anything runs: the dataset's files at this length exist and their first record has HELMET's shape."""
    if dataset.kind == "icl":
        for path in (p for p in icl_paths(root, dataset.icl) if p is not None):
            read_jsonl(path, "icl", ("text", dataset.icl.label_field), errors, limit=1)
        return
    read_jsonl(test_path(root, dataset, length), dataset.kind, errors=errors, limit=1)
    if dataset.demo_file:
        read_jsonl(root / dataset.demo_file, dataset.kind, errors=errors, limit=1)


# -------------------------------------------------------------------------------------------------------------
# One dataset at one length: its examples (the fields HELMET's templates name), templates and metric.


@dataclass
class Cell:
    dataset: HelmetDataset
    length: int
    examples: list[dict]
    user_template: str
    system_template: str
    source: str  # where the examples came from (a file of --helmet-data, or generated)

    def prompt(self, example: dict) -> str:
        return (self.user_template + "\n" + self.system_template).format(**example)

    def prompt_ids(self, tokenizer, example: dict) -> list[int]:
        """The prompt's token ids as HELMET tokenizes it: with the tokenizer's special tokens, no chat template."""
        return ruler.encode_prompt(tokenizer, self.prompt(example), chat_template=False)

    def score(self, example: dict, output: str) -> tuple[float, str | None]:
        """HELMET's metric (0..1) of the model's output: the system template goes back in front of it first."""
        return score_prediction(self.dataset.kind, self.system_template.format(**example) + output, example)


def ruler_cell(dataset: HelmetDataset, length: int, records: list[dict], samples: int | None, source: str,
               seed: int = SEED) -> Cell:
    """HELMET's load_ruler: answers from `answer` (or `outputs`), `samples` rows of the file shuffled by the seed."""
    examples = [dict(r, question=r.get("query", r.get("question", "")),
                     example=r["example"] + "\n\n" if r.get("example") else "",
                     answer=r["answer"] if "answer" in r else r["outputs"]) for r in records]
    if samples is not None:
        examples = shuffled(examples, seed)[:samples]
    multi = "niah_mv" in dataset.name
    return Cell(dataset, length, examples, RULER_MV_USER if multi else RULER_NIAH_USER,
                RULER_MV_SYSTEM if multi else RULER_NIAH_SYSTEM, source)


def json_kv_cell(dataset: HelmetDataset, length: int, records: list[dict], samples: int | None, source: str,
                 seed: int = SEED) -> Cell:
    """HELMET's load_json_kv: the first `shots` of each record's demonstration pairs, then `samples` rows of the
    file shuffled by the seed."""
    shots = dataset.shots
    examples = [dict(r, k=r["num_kvs"], demos="\n\n".join(JSON_KV_DEMO.format(key=key, value=" " + value)
                                                          for key, value in r["demos"][:shots])
                     + ("\n\n" if shots > 0 else "")) for r in records]
    if samples is not None:
        examples = shuffled(examples, seed)[:samples]
    return Cell(dataset, length, examples, JSON_KV_USER, JSON_KV_SYSTEM, source)


def _passages(ctxs: list[dict], template: str = RAG_PASSAGE) -> str:
    return "\n\n".join(template.format(**c) for c in ctxs)


def popqa_threshold(dataset: HelmetDataset) -> float | None:
    """The log10 popularity below which HELMET keeps a PopQA question, from its name (kilt_popqa_3: 3); None for
    every other dataset."""
    return float(dataset.name.split("_")[-1]) if "popqa" in dataset.name else None


def popular_enough(rows: list[dict], threshold: float, where: str) -> list[dict]:
    """PopQA's filter: the subject's popularity (s_pop) below 10^threshold; a file with no such row is refused
    (nothing would be left to evaluate or to draw demonstrations from)."""
    if any(not common.is_finite_number(r.get("s_pop")) or r["s_pop"] <= 0 for r in rows):
        common.fail(f"{where}: PopQA records need a positive number in s_pop (HELMET filters by log10(s_pop))")
    kept = [r for r in rows if math.log10(r["s_pop"]) < threshold]
    if not kept:
        common.fail(f"{where}: no PopQA record has a subject popularity (s_pop) below 10^{threshold:g}, the only ones "
                    "HELMET evaluates; give HELMET's own file")
    return kept


def kilt_cell(dataset: HelmetDataset, length: int, records: list[dict], demos: list[dict], samples: int | None,
              source: str, seed: int = SEED) -> Cell:
    """HELMET's load_qa: `samples` questions drawn by key (id, else the question), each with `shots` demonstrations
    (question, its passages, first answer) drawn from the demonstration file by the question's own seed."""
    threshold = popqa_threshold(dataset)
    if threshold is not None:  # demonstrations from the same split (never the question itself), filtered alike
        records = popular_enough(records, threshold, source)
        demos = popular_enough(demos, threshold, dataset.demo_file)
    key = selection_key("kilt", records[0])
    examples = []
    for sample in sample_by_key(records, key, samples, seed):
        demo_text = ""
        if dataset.shots > 0:
            pool = [d for d in demos if d[key] != sample[key]] if "popqa" in dataset.name else demos
            chosen = first_distinct(shuffled(pool, key_seed(sample[key])), key, dataset.shots)
            demo_text = "\n\n".join(RAG_DEMO.format(documents=_passages(d["ctxs"]), question=d["question"],
                                                    answer=d["answers"][0]) for d in chosen) + "\n\n"
        examples.append(dict(sample, demos=demo_text, context=_passages(sample["ctxs"]), answer=sample["answers"]))
    return Cell(dataset, length, examples, RAG_USER, RAG_SYSTEM, source)


def _ranking(ctxs: list[dict]) -> str:
    """The gold ranking: IDs by label, best first (equal labels keep their order)."""
    return " > ".join(str(c["id"]) for c in sorted(ctxs, key=lambda c: c["label"], reverse=True))


def msmarco_cell(dataset: HelmetDataset, length: int, records: list[dict], demos: list[dict], samples: int | None,
                 source: str, seed: int = SEED) -> Cell:
    """HELMET's load_msmarco_rerank: `samples` queries drawn by qid, each with `shots` demonstration queries (their
    passages and gold ranking) drawn by the query's own seed, never the query itself."""
    data = sample_by_key(records, selection_key("msmarco", records[0]), samples, seed)
    filtered_once = len(demos) > 2 * len(data)  # HELMET drops every test query from a large demo file at once
    if filtered_once:
        qids = {r["qid"] for r in data}
        demos = [d for d in demos if d["qid"] not in qids]
    examples = []
    for sample in data:
        template = RERANK_PASSAGE_TITLED if "title" in sample["ctxs"][0] else RERANK_PASSAGE
        demo_text = ""
        if dataset.shots > 0:
            pool = demos if filtered_once else [d for d in demos if d["qid"] != sample["qid"]]
            for d in first_distinct(shuffled(pool, key_seed(sample["qid"])), "qid", dataset.shots):
                demo_text += (f"{_passages(d['ctxs'], template)}\n\nQuery: {d['query']}\n"
                              f"Ranking: {_ranking(d['ctxs'])}\n\n")
        examples.append(dict(sample, context=_passages(sample["ctxs"], template), question=sample["query"],
                             demos=demo_text, answer=_ranking(sample["ctxs"]),
                             qrel=[[str(c["id"]), int(c["label"])] for c in sample["ctxs"]]))
    return Cell(dataset, length, examples, RERANK_USER, RERANK_SYSTEM, source)


def icl_cell(dataset: HelmetDataset, length: int, train: list[dict], test: list[dict], samples: int | None,
             source: str, shots: int | None = None, seed: int = SEED) -> Cell:
    """HELMET's load_icl: a class-balanced test set of `samples` rows (when the split is larger), and for each test
    text its own seed drawing `shots` class-balanced demonstrations and a shuffled map from labels to integers."""
    src, shots = dataset.icl, shots if shots is not None else dataset.k(length)
    if samples is not None and len(test) > samples:
        test = balance_labels(shuffled(test, seed), samples, seed, src.label_field)
    examples = []
    for sample in test:
        local_seed = (key_seed(sample["text"]) + seed) % 2**31  # HELMET: (SHA-256 of the text + seed) mod 2^31
        demos = balance_labels(train, shots, local_seed, src.label_field)
        mapping = list(range(src.num_labels))
        random.Random(local_seed).shuffle(mapping)
        context = "\n\n".join(ICL_ITEM.format(text=d["text"], label=str(mapping[int(d[src.label_field])]))
                              for d in demos)
        examples.append({"context": context, "question": sample["text"],
                         "answer": str(mapping[int(sample[src.label_field])])})
    return Cell(dataset, length, examples, ICL_USER, ICL_SYSTEM, source)


def load_icl_rows(root: Path, dataset: HelmetDataset, errors: str = "strict") -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of an ICL dataset, each file read once and every label checked; NLU's test rows are
    split off its train rows as HELMET does."""
    src = dataset.icl
    splits = []
    for path in (p for p in icl_paths(root, src) if p is not None):
        rows = read_jsonl(path, "icl", ("text", src.label_field), errors)
        for number, row in enumerate(rows, 1):
            label = row[src.label_field]
            if not common.is_count(label) or label >= src.num_labels:
                common.fail(f"{path}: row {number} has label {label!r}; {src.hub}'s {src.label_field} is an integer "
                            f"0..{src.num_labels - 1} (export the hub dataset as it is)")
        splits.append(rows)
    if len(splits) == 1:
        return train_test_split(splits[0], SEED)
    return splits[0], splits[1]


def load_cell(dataset: HelmetDataset, length: int, root: Path, samples: int | None = None,
              errors: str = "strict") -> Cell:
    """A dataset at one of HELMET's lengths from --helmet-data, with HELMET's selection (`samples`: its
    max_test_samples unless given)."""
    samples = samples or dataset.max_test_samples
    if dataset.kind == "icl":
        train, test = load_icl_rows(root, dataset, errors)
        return icl_cell(dataset, length, train, test, samples, f"icl/{dataset.icl.folder} ({dataset.icl.hub})")
    path = test_path(root, dataset, length)
    rows, source = select_rows(dataset, path, samples, errors), str(path.relative_to(root))
    if dataset.kind == "ruler":
        return ruler_cell(dataset, length, rows, None, source)
    if dataset.kind == "json_kv":
        return json_kv_cell(dataset, length, rows, None, source)
    demos = read_jsonl(root / dataset.demo_file, dataset.kind, errors=errors)
    loader = kilt_cell if dataset.kind == "kilt" else msmarco_cell
    return loader(dataset, length, rows, demos, None, source)


# -------------------------------------------------------------------------------------------------------------
# The recall tasks generated to a length in the model's tokens, in HELMET's record format, when HELMET's files are
# not given (or not at this length): RULER's needles and haystacks from ruler.py (MV hides them in real text:
# `essay_text`), and a JSON object of UUID pairs in the format of Liu et al.'s key-value retrieval. Each prompt is
# grown until prompt + HELMET's generation length fills the length, so HELMET's truncation never cuts it.

JSON_KV_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # "dep6": the gold pair at six depths in turn


def _grow(tokenizer, cell: Cell, make, budget: int, guess: int, what: str) -> tuple[dict, int]:
    """(make(n), n) for the largest n (haystack units, pairs) whose prompt fits `budget` tokens."""
    units = ruler.largest_fitting(lambda n: len(cell.prompt_ids(tokenizer, make(n))) <= budget, guess)
    if units < 1:
        common.fail(f"HELMET's {what} prompt does not fit {cell.length} tokens with its "
                    f"{cell.dataset.generation_max_length}-token answer; use longer --lengths")
    return make(units), units


def _ruler_example(dataset: HelmetDataset, length: int, index: int, essay_units, seed: int):
    """make(n): the index-th example of a RULER recall task with n haystack units."""
    task = ruler.NIAH_TASKS[dataset.ruler_task]
    rng = random.Random(f"{seed}:helmet:{dataset.name}:{length}:{index}")
    sample = ruler.make_sample(task, seed, length, float(rng.choice(ruler.RULER_DEPTHS)), index)

    def make(n: int) -> dict:
        units = ruler.haystack_units(task.haystack, essay_units, task, n, sample.seed)
        return {"context": ruler.assemble_context(units, sample.needles, sample.depths), "query": sample.query,
                "answer": sample.answers, "type_needle_v": dataset.type_needle_v}
    return make


def _json_kv_example(dataset: HelmetDataset, length: int, index: int, seed: int):
    """make(n): the index-th JSON KV example with n pairs, its gold pair at one of six depths in turn, its
    demonstrations two other pairs of the same object."""
    rng = random.Random(f"{seed}:helmet:json_kv:{length}:{index}")
    pairs: list[tuple[str, str]] = []

    def make(n: int) -> dict:
        while len(pairs) < n:  # one stream of pairs per example: n pairs are always the first n
            pairs.append((ruler.random_value(rng, "uuids"), ruler.random_value(rng, "uuids")))
        gold = round(JSON_KV_DEPTHS[index % len(JSON_KV_DEPTHS)] * (n - 1))
        others = [i for i in random.Random(f"{seed}:{index}:{n}").sample(range(n), min(n, dataset.shots + 1))
                  if i != gold][:dataset.shots]
        body = ",\n ".join(f'"{k}": "{v}"' for k, v in pairs[:n])
        return {"context": "JSON data:\n{" + body + "}", "question": f'"{pairs[gold][0]}"', "answer": pairs[gold][1],
                "demos": [[f'"{pairs[i][0]}"', f'"{pairs[i][1]}"'] for i in others], "num_kvs": n}
    return make


def generate_recall_cell(dataset: HelmetDataset, length: int, tokenizer, samples: int | None = None,
                         essay_text: str | None = None, seed: int = 0) -> Cell:
    """A recall dataset generated at any length in this tokenizer's tokens (`samples`: HELMET's 100 unless given);
    the MV task needs `essay_text` for its haystack."""
    samples = samples or dataset.max_test_samples
    needs_text = dataset.kind == "ruler" and ruler.NIAH_TASKS[dataset.ruler_task].haystack == "essay"
    if needs_text and not essay_text:
        common.fail(f"{dataset.name} hides its needles in real text: give essay_text")
    essay_units = ruler.split_sentences(essay_text) if needs_text else None
    to_cell = ruler_cell if dataset.kind == "ruler" else json_kv_cell  # HELMET's loader of such records
    cell = to_cell(dataset, length, [], None, "generated")
    budget, guess = length - dataset.generation_max_length, max(1, length // 40)
    for index in range(samples):
        make = _ruler_example(dataset, length, index, essay_units, seed) if dataset.kind == "ruler" \
            else _json_kv_example(dataset, length, index, seed)
        example, guess = _grow(tokenizer, cell, lambda n: to_cell(dataset, length, [make(n)], None, "").examples[0],
                               budget, guess, dataset.name)
        cell.examples.append(example)
    return cell


# -------------------------------------------------------------------------------------------------------------
# Prompts in the model's tokens, truncated as HELMET's model_utils.tokenize does: when prompt + generation length
# exceeds the length, the context (passages, haystack, demonstrations for ICL) loses its last tokens.


def encode_example(tokenizer, cell: Cell, example: dict, length: int) -> tuple[list[int], dict, int]:
    """(prompt token ids, the example as prompted, context tokens cut)."""
    limit = length - cell.dataset.generation_max_length
    ids = cell.prompt_ids(tokenizer, example)
    if len(ids) <= limit:
        return ids, example, 0
    cut = len(ids) - limit
    context = example["context"]
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(context, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        if cut > len(offsets):
            common.fail(f"{cell.dataset.name}: the prompt without its context is longer than {limit} tokens; use "
                        f"longer --lengths")
        context = context[:offsets[-cut][0]]
    else:  # HELMET's path for tokenizers without offsets
        context = tokenizer.decode(tokenizer(context, verbose=False)["input_ids"][:-cut])
    example = dict(example, context=context)
    return cell.prompt_ids(tokenizer, example), example, cut


def newline_token_ids(tokenizer) -> list[int]:
    """The vocabulary's newline tokens HELMET stops at ("\\n", "Ċ", "ĊĊ", "<0x0A>", whichever exist; never the
    unknown token, which HELMET drops for Llama only)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in NEWLINE_TOKENS}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


# -------------------------------------------------------------------------------------------------------------
# Scores: per dataset and length the mean x 100 (HELMET's averaged metric), per category the mean over its
# datasets, and the average over the categories run; each with its samples and a 95% Wilson interval.


def mean_of_cells(cells: list[dict]) -> dict:
    """The equal-weight mean of k cells (score, n), its samples, and its 95% interval from the effective sample size
    1 / sum(1 / (k^2 n_i)) of such a mean (docs/evaluation.md#helmet-in-05). A cell of examples is
    ruler.score_cell."""
    k = len(cells)
    n_eff = 1 / sum(1 / (k ** 2 * c["n"]) for c in cells)
    return ruler.mean_cell(sum(c["score"] for c in cells) / k, sum(c["n"] for c in cells), n_eff)


def summarize(records: list[dict]) -> dict:
    """Cells per dataset and length and per category and length; the average over the categories at each length
    where every category ran. A category's overall score averages its lengths, and the overall score its
    categories. `records` carry dataset, category, length and score (0-100)."""
    lengths = sorted({r["length"] for r in records})
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    categories = [c for c in CATEGORIES.values() if any(r["category"] == c for r in records)]
    cells = {d: {str(L): ruler.score_cell([r["score"] for r in records if r["dataset"] == d and r["length"] == L])
                 for L in lengths if any(r["dataset"] == d and r["length"] == L for r in records)} for d in datasets}
    by_category = {c: {str(L): mean_of_cells([cells[d.name][str(L)] for d in category_datasets(c)
                                              if str(L) in cells.get(d.name, {})])
                       for L in lengths if any(str(L) in cells.get(d.name, {}) for d in category_datasets(c))}
                   for c in categories}
    average = {str(L): mean_of_cells([by_category[c][str(L)] for c in categories])
               for L in lengths if all(str(L) in by_category[c] for c in categories)}
    category_scores = {c: sum(x["score"] for x in v.values()) / len(v) for c, v in by_category.items()}
    return {"lengths": lengths, "datasets": datasets, "categories": categories, "cells": cells,
            "by_category": by_category, "average": average, "category_scores": category_scores,
            "score": sum(category_scores.values()) / len(category_scores)}
