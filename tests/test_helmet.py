"""HELMET (helmet.py and 05_eval.py --tasks helmet): on small files in HELMET's own formats, every category's prompt
equals HELMET's template filled with the example HELMET's code would select (built here from HELMET's template
strings, with `datasets` and `random` called as HELMET calls them), every metric gives HELMET's score on planted
answers (nDCG@10 of a partly right ranking computed by hand), and bad input is one clear line."""
import hashlib
import json
import math
import os
import random

import datasets
import pytest

import common
import helmet
from lc_testutil import error_lines, load_script, run_script

ev = load_script("05_eval")

# HELMET's template strings (princeton-nlp/HELMET data.py), copied as they are.
T_RULER_NIAH = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I "
                "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic "
                "{type_needle_v} for {query} mentioned in the provided text?\nThe special magic {type_needle_v} for "
                "{query} mentioned in the provided text is")
T_RULER_MV = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I "
              "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
              "{type_needle_v} for {query} mentioned in the provided text?\nThe special magic {type_needle_v} for "
              "{query} mentioned in the provided text are")
T_JSON_KV = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n{demos}"
             "Key: {question}\nCorresponding value:")
T_RAG = ("Use the given documents to write a concise and short answer to the question. Write your answer in the "
         "following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}\nAnswer:")
T_RERANK = ("You are provided with a list of documents, each indicated by their ID. Rank each document based on "
            "their relevance to the question in descending order from most relelvant to least relevant texts. "
            "Include all documents in the rankings. Write your answer using the unique IDs, with the following "
            "format:\nRanking: ID3 > ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}\nRanking:")
T_ICL = ('Use the provided mapping from the text to label to assign a label to the text. Only output "label: '
         '{{label}}" and nothing else. \n\n{context}\n\n{question}\nlabel:')

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def passage(i: int) -> dict:
    return {"title": f"Title {i}", "text": f"Passage {i} mentions {WORDS[i % 16]} and {WORDS[(3 * i) % 16]}.",
            "has_answer": i % 2 == 0}


def kilt_rows(n: int, start: int = 0, ids: bool = True, popularity: bool = False) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        row = {"question": f"which word follows {WORDS[i % 16]}?", "answers": [WORDS[(i + 1) % 16], f"the {i}"],
               "ctxs": [passage(i + j) for j in range(3)]}
        if ids:
            row["id"] = f"q{i}"
        if popularity:
            row["s_pop"] = 10 ** (1 + i % 4)  # 10 .. 10000: log10 below 3 for half of them
        rows.append(row)
    return rows


def msmarco_rows(n: int, passages: int, start: int = 0) -> list[dict]:
    return [{"qid": str(1000 + q), "query": f"what is {WORDS[q % 16]}",
             "ctxs": [{"id": str(p), "text": f"{WORDS[(p + q) % 16]} text {p}", "label": (p * 7 + q) % 4}
                      for p in range(passages)]} for q in range(start, start + n)]


def icl_rows(n: int, label_field: str, num_labels: int, offset: int = 0) -> list[dict]:
    return [{"text": f"sentence {i + offset} about {WORDS[i % 16]}", label_field: i % num_labels} for i in range(n)]


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ruler_record(i: int, values: int = 1) -> dict:
    answers = [str(1000000 + 7 * i + v) for v in range(values)]
    needles = "".join(f"One of the special magic numbers for key-{i} is: {a}.\n" for a in answers)
    return {"index": i, "context": f"Noise {i}.\n{needles}More noise.", "query": f"key-{i}", "answer": answers,
            "type_needle_v": "numbers" if values > 1 else "number", "length": 8192}


def json_kv_record(i: int) -> dict:
    pairs = [(f"k{i}-{j}", f"v{i}-{j}") for j in range(4)]
    return {"context": "JSON data:\n" + json.dumps(dict(pairs)), "question": f'"{pairs[1][0]}"', "answer": pairs[1][1],
            "demos": [[f'"{k}"', f'"{v}"'] for k, v in pairs[2:]] + [["x", "y"]], "num_kvs": 4}


def write_helmet_data(root, length: int = 8192) -> None:
    """A small HELMET data folder: every file the four categories read at `length`, in HELMET's formats."""
    k = helmet.LENGTHS.index(length)
    for folder, values in (("niah_multikey_2", 1), ("niah_multikey_3", 1), ("niah_multivalue", 4)):
        write_jsonl(root / f"ruler/{folder}/validation_{length}.jsonl", [ruler_record(i, values) for i in range(5)])
    write_jsonl(root / f"json_kv/test_k{(105, 220, 440, 900, 1800)[k]}_dep6.jsonl",
                [json_kv_record(i) for i in range(5)])
    for stem, demo, dep in (("nq-dev", "nq-train", "dep6"), ("triviaqa-dev", "triviaqa-train", "dep6"),
                            ("hotpotqa-dev", "hotpotqa-train", "dep3")):
        write_jsonl(root / f"kilt/{stem}-multikilt_1000_k{(50, 105, 220, 440, 1000)[k]}_{dep}.jsonl", kilt_rows(6))
        write_jsonl(root / f"kilt/{demo}-multikilt_1000_k3_{dep}.jsonl", kilt_rows(5, start=20))
    write_jsonl(root / f"kilt/popqa_test_1000_k{(50, 105, 220, 440, 1000)[k]}_dep6.jsonl",
                kilt_rows(8, ids=False, popularity=True))
    write_jsonl(root / "kilt/popqa_test_1000_k3_dep6.jsonl", kilt_rows(8, ids=False, popularity=True))
    write_jsonl(root / f"msmarco/test_reranking_data_k{(50, 130, 285, 600, 1000)[k]}_dep3.jsonl", msmarco_rows(4, 12))
    write_jsonl(root / "msmarco/test_reranking_data_k10_dep3.jsonl", msmarco_rows(5, 3, start=10))
    for folder, labels in (("trec", {"coarse_label": 6, "fine_label": 50}), ("banking77", {"label": 77}),
                           ("clinc150", {"intent": 151}), ("nlu", {"label": 68})):
        def rows(n, offset=0):  # the hub dataset's columns: text and its integer label field(s)
            return [dict({"text": f"sentence {offset + i} about {WORDS[i % 16]}"},
                         **{field: i % count for field, count in labels.items()}) for i in range(n)]
        write_jsonl(root / f"icl/{folder}/train.jsonl", rows(24))
        test_split = {"trec": "test", "banking77": "test", "clinc150": "validation"}.get(folder)
        if test_split:  # NLU has only a train split
            write_jsonl(root / f"icl/{folder}/{test_split}.jsonl", rows(9, offset=100))


@pytest.fixture(scope="module")
def helmet_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("helmet") / "data"
    write_helmet_data(root)
    return root


def hf_shuffled(rows: list[dict], seed: int) -> list[dict]:
    """The rows as HELMET's Dataset.shuffle(seed) orders them, through `datasets` itself."""
    return list(datasets.Dataset.from_list(rows).shuffle(seed=seed))


def sha_seed(key) -> int:
    return int(hashlib.sha256(str(key).encode("utf-8")).hexdigest(), 16) % 2**31


# -------------------------------------------------------------------------------------------------------------
# Recall


def test_recall_prompts_selection_and_scores_are_helmets(helmet_data):
    cell = helmet.load_cell(helmet.DATASETS["ruler_niah_mk_2"], 8192, helmet_data, samples=3)
    records = [ruler_record(i) for i in range(5)]
    expected = hf_shuffled(records, 42)[:3]  # data.shuffle(seed).select(range(3))
    assert [e["query"] for e in cell.examples] == [r["query"] for r in expected]
    assert [cell.prompt(e) for e in cell.examples] == [T_RULER_NIAH.format(**r) for r in expected]
    ex = cell.examples[0]
    assert cell.score(ex, f" {ex['answer'][0]}.") == (1.0, T_RULER_NIAH.split("?\n")[1].format(**ex) +
                                                       f" {ex['answer'][0]}.")
    assert cell.score(ex, " 1234567.")[0] == 0.0

    mv = helmet.load_cell(helmet.DATASETS["ruler_niah_mv"], 8192, helmet_data, samples=5)
    assert [mv.prompt(e) for e in mv.examples] == [T_RULER_MV.format(**r) for r in
                                                   hf_shuffled([ruler_record(i, 4) for i in range(5)], 42)]
    e = mv.examples[0]
    assert mv.score(e, f" {e['answer'][0]} and {e['answer'][2].upper()}")[0] == 0.5  # 2 of 4 values found

    kv = helmet.load_cell(helmet.DATASETS["json_kv"], 8192, helmet_data, samples=2)
    rows = hf_shuffled([json_kv_record(i) for i in range(5)], 42)[:2]
    demos = ["Key: {}\nCorresponding value: {}\n\nKey: {}\nCorresponding value: {}\n\n".format(
        *r["demos"][0], *r["demos"][1]) for r in rows]  # the first 2 of 3 pairs, value after one space
    assert [kv.prompt(e) for e in kv.examples] == [T_JSON_KV.format(**dict(r, demos=d)) for r, d in zip(rows, demos)]
    e = kv.examples[0]
    assert kv.score(e, f' "{e["answer"]}"\n\nKey: other')[0] == 1.0  # substring EM, quotes and case aside
    assert kv.score(e, " v9-9")[0] == 0.0


def test_generated_recall_fills_the_length_in_helmets_format(tokenizer):
    _, text = ev.ruler.load_haystack_text("pydocs")
    for name in ("ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv", "json_kv"):
        spec = helmet.DATASETS[name]
        cell = helmet.generate_recall_cell(spec, 1024, tokenizer, samples=3, essay_text=text)
        again = helmet.generate_recall_cell(spec, 1024, tokenizer, samples=3, essay_text=text)
        assert [cell.prompt(e) for e in cell.examples] == [again.prompt(e) for e in again.examples]  # deterministic
        budget = 1024 - spec.generation_max_length
        for e in cell.examples:
            ids, _, cut = helmet.encode_example(tokenizer, cell, e, 1024)
            assert cut == 0 and budget - 120 <= len(ids) <= budget, (name, len(ids))
            answers = [e["answer"]] if isinstance(e["answer"], str) else e["answer"]
            assert all(a in e["context"] for a in answers)
            template = {"ruler_niah_mv": T_RULER_MV, "json_kv": T_JSON_KV}.get(name, T_RULER_NIAH)
            assert cell.prompt(e) == template.format(**e)
            assert cell.score(e, " " + " ".join(answers))[0] == 1.0


# -------------------------------------------------------------------------------------------------------------
# RAG


def expected_rag(rows: list[dict], demos: list[dict], key: str, shots: int, samples: int, popqa: bool = False):
    """HELMET's load_qa for these rows, written from its description: random.seed(42) then random.sample of the
    sorted keys; per question the demo file shuffled by `datasets` with the question's SHA-256 seed, first
    distinct keys; passages as "Document (Title: ...): ..."."""
    random.seed(42)
    keys = set(random.sample(sorted({r[key] for r in rows}), min(samples, len(rows))))
    out = []
    for r in (r for r in rows if r[key] in keys):
        pool = [d for d in demos if d[key] != r[key]] if popqa else demos
        picked, seen = [], set()
        for d in hf_shuffled(pool, sha_seed(r[key])):
            if d[key] not in seen:
                seen.add(d[key])
                picked.append(d)
        docs = lambda ctxs: "\n\n".join(f"Document (Title: {c['title']}): {c['text']}" for c in ctxs)  # noqa: E731
        demo_text = "".join(f"{docs(d['ctxs'])}\n\nQuestion: {d['question']}\nAnswer: {d['answers'][0]}\n\n"
                            for d in picked[:shots])
        out.append(T_RAG.format(demos=demo_text, context=docs(r["ctxs"]), question=r["question"]))
    return out


def test_rag_prompts_demos_and_subem_are_helmets(helmet_data):
    cell = helmet.load_cell(helmet.DATASETS["kilt_nq"], 8192, helmet_data, samples=3)
    assert [cell.prompt(e) for e in cell.examples] == expected_rag(kilt_rows(6), kilt_rows(5, start=20), "id", 2, 3)
    e = cell.examples[0]
    gold = e["answer"][0]
    assert cell.score(e, f" {gold}\n")[0] == 1.0
    assert cell.score(e, f" The {gold.upper()}.")[0] == 1.0  # normalised: case, article, punctuation
    assert cell.score(e, " i think it is " + e["answer"][1].replace("the ", ""))[0] == 1.0  # any gold answer
    assert cell.score(e, " zulu")[0] == 0.0
    # PopQA: no id (the question is the key), popularity below 10^3, never its own question as a demonstration
    pop = helmet.load_cell(helmet.DATASETS["kilt_popqa_3"], 8192, helmet_data, samples=2)
    rows = [r for r in kilt_rows(8, ids=False, popularity=True) if math.log10(r["s_pop"]) < 3]
    assert [pop.prompt(e) for e in pop.examples] == expected_rag(rows, rows, "question", 2, 2, popqa=True)
    assert all(e["question"] not in e["demos"] for e in pop.examples)


# -------------------------------------------------------------------------------------------------------------
# Re-rank


def test_rerank_prompt_demos_and_ndcg_are_helmets(helmet_data):
    cell = helmet.load_cell(helmet.DATASETS["msmarco_rerank_psg"], 8192, helmet_data, samples=2)
    rows, demos = msmarco_rows(4, 12), msmarco_rows(5, 3, start=10)
    random.seed(42)
    keys = set(random.sample(sorted(r["qid"] for r in rows), 2))
    data = [r for r in rows if r["qid"] in keys]
    # 5 demo queries are more than twice the 2 test queries: HELMET drops the test queries from them once
    demos = [d for d in demos if d["qid"] not in keys]
    for e, r in zip(cell.examples, data):
        docs = lambda ctxs: "\n\n".join(f"[ID: {c['id']}] Document: {c['text']}" for c in ctxs)  # noqa: E731
        rank = lambda ctxs: " > ".join(c["id"] for c in sorted(ctxs, key=lambda c: -c["label"]))  # noqa: E731
        picked = hf_shuffled(demos, sha_seed(r["qid"]))[:2]
        demo_text = "".join(f"{docs(d['ctxs'])}\n\nQuery: {d['query']}\nRanking: {rank(d['ctxs'])}\n\n"
                            for d in picked)
        assert cell.prompt(e) == T_RERANK.format(demos=demo_text, context=docs(r["ctxs"]), question=r["query"])
        assert e["answer"] == rank(r["ctxs"])
    e = cell.examples[0]
    labels = {c: label for c, label in e["qrel"]}
    assert cell.score(e, " " + e["answer"])[0] == 1.0  # the gold ranking
    zeros = [d for d, label in labels.items() if label == 0]
    assert cell.score(e, " " + " > ".join(zeros))[0] == 0.0  # only irrelevant documents
    # A partly right ranking, written as models write it. The labels of this query (qid 1000): IDs 1, 5, 9: 3;
    # 2, 6, 10: 2; 3, 7, 11: 1; 0, 4, 8: 0. nDCG@10 by hand, gain = label, discount log2(rank + 1):
    assert labels == {"1": 3, "5": 3, "9": 3, "2": 2, "6": 2, "10": 2, "3": 1, "7": 1, "11": 1, "0": 0, "4": 0, "8": 0}
    dcg = 3 / 1 + 0 / math.log2(3) + 2 / 2 + 1 / math.log2(5)  # IDs 5, 0, 2, 3
    idcg = (3 / 1 + 3 / math.log2(3) + 3 / 2 + 2 / math.log2(5) + 2 / math.log2(6) + 2 / math.log2(7) + 1 / 3
            + 1 / math.log2(9) + 1 / math.log2(10))  # 3, 3, 3, 2, 2, 2, 1, 1, 1, 0
    assert round(dcg / idcg, 5) == 0.45724
    assert cell.score(e, " [ID: 5] > [ID: 0] > [ID: 2] > [ID: 3]\n")[0] == 0.45724
    assert cell.score(e, " 5 > 0 > 2 > 3 > 5 > 0")[0] == 0.45724  # a repeated id keeps its first rank
    assert helmet.parse_rankings("Ranking: ID3 > ID1 > ID2 then 4") == {"3": 3, "1": 2, "2": 1}


# -------------------------------------------------------------------------------------------------------------
# ICL


def reference_balance(rows, count, seed, field):
    """HELMET's class-balanced draw, from its description: one round per label set, without replacement within a
    label, the first draw of each label sized `rounds mod members`, rounds shuffled."""
    rng = random.Random(seed)
    labels = list(dict.fromkeys(r[field] for r in rows))
    rounds = -(-count // len(labels))
    table = [[] for _ in range(rounds)]
    for label in labels:
        members = [r for r in rows if r[field] == label]
        order = rng.sample(range(len(members)), rounds % len(members))
        while len(order) < rounds:
            order.extend(rng.sample(range(len(members)), min(rounds - len(order), len(members))))
        for i in range(rounds):
            table[i].append(members[order[i]])
    for r in table:
        rng.shuffle(r)
    return [x for r in table for x in r][:count]


def test_icl_prompt_balanced_demos_and_accuracy_are_helmets(helmet_data):
    spec = helmet.DATASETS["icl_trec_coarse"]
    train = [json.loads(x) for x in (helmet_data / "icl/trec/train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (helmet_data / "icl/trec/test.jsonl").read_text().splitlines()]
    cell = helmet.icl_cell(spec, 8192, train, test, samples=6, source="fixture", shots=12)
    chosen = reference_balance(hf_shuffled(test, 42), 6, 42, "coarse_label")  # 9 test rows > 6: balanced draw
    assert [e["question"] for e in cell.examples] == [r["text"] for r in chosen]
    for e, r in zip(cell.examples, chosen):
        seed = (int(hashlib.sha256(r["text"].encode()).hexdigest(), 16) + 42) % 2**31
        mapping = list(range(6))
        random.seed(seed)
        random.shuffle(mapping)
        demos = reference_balance(train, 12, seed, "coarse_label")
        assert sorted(d["coarse_label"] for d in demos) == sorted(list(range(6)) * 2)  # every label twice
        context = "\n\n".join(f"{d['text']}\nlabel: {mapping[d['coarse_label']]}" for d in demos)
        assert cell.prompt(e) == T_ICL.format(context=context, question=r["text"])
        assert e["answer"] == str(mapping[r["coarse_label"]])
        assert cell.score(e, f" {e['answer']}\nsentence 7\nlabel: 1")[0] == 1.0
        assert cell.score(e, f" {(int(e['answer']) + 1) % 6}")[0] == 0.0
    # NLU has one split: HELMET takes 10% for test with datasets' train_test_split(test_size=0.1, seed=42)
    rows = icl_rows(31, "label", 68)
    ours = helmet.train_test_split(rows, 42)
    theirs = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=42)
    assert ours == (list(theirs["train"]), list(theirs["test"]))
    nlu = helmet.load_cell(helmet.DATASETS["icl_nlu"], 8192, helmet_data, samples=2)
    assert len(nlu.examples) == 2 and nlu.examples[0]["context"].count("\nlabel: ") == 510  # 510 shots at 8K


def test_truncation_cuts_the_context_as_helmet_does(tokenizer, helmet_data):
    cell = helmet.load_cell(helmet.DATASETS["kilt_nq"], 8192, helmet_data, samples=1)
    e = cell.examples[0]
    full = tokenizer(cell.prompt(e))["input_ids"]
    length = len(full) - 25 + 20  # 25 tokens too many for a 20-token answer
    ids, cut_example, cut = helmet.encode_example(tokenizer, cell, e, length)
    offsets = tokenizer(e["context"], return_offsets_mapping=True)["offset_mapping"]
    assert cut == 25 and cut_example["context"] == e["context"][:offsets[-25][0]]
    assert ids == tokenizer(cell.prompt(cut_example))["input_ids"] and abs(len(ids) - (length - 20)) <= 2
    assert cut_example["demos"] == e["demos"] and cut_example["question"] == e["question"]


# -------------------------------------------------------------------------------------------------------------
# Through 05: planted answers, the report, the published table, bad input


def test_planted_answers_score_100_and_0_and_average_by_category(helmet_data, tokenizer):
    cells = [helmet.load_cell(helmet.DATASETS[d], 8192, helmet_data, samples=2)
             for d in ("json_kv", "ruler_niah_mv", "kilt_nq", "msmarco_rerank_psg", "icl_banking77")]
    right, wrong = [], []
    for cell in cells:
        def gold(rows, indices, cell=cell):
            answers = [cell.examples[i]["answer"] for i in indices]
            return [" " + (a if isinstance(a, str) else " ".join(a)) + "\n" for a in answers]
        right += ev.run_helmet_cell(None, tokenizer, cell, 1 << 20, 4, generate=gold)
        wrong += ev.run_helmet_cell(None, tokenizer, cell, 1 << 20, 4, generate=lambda rows, i: [" zulu"] * len(rows))
    assert [r["score"] for r in right] == [100.0] * 10 and [r["score"] for r in wrong] == [0.0] * 10
    s = helmet.summarize(right[:4] + wrong[4:])  # recall right, RAG / re-rank / ICL wrong
    assert s["categories"] == ["Recall", "RAG", "Re-rank", "ICL"]
    assert s["category_scores"] == {"Recall": 100.0, "RAG": 0.0, "Re-rank": 0.0, "ICL": 0.0} and s["score"] == 25.0
    assert s["cells"]["json_kv"]["8192"]["n"] == 2 and s["by_category"]["Recall"]["8192"]["n"] == 4
    # an equal-weight mean of cells of 2 and 4 samples: its interval from 1 / sum(1 / (k^2 n_i)) = 16/3 samples
    lo, hi = helmet.ruler.wilson_interval(0.5, 1 / (1 / (4 * 2) + 1 / (4 * 4)))
    assert helmet.mean_of_cells([{"score": 100.0, "n": 2}, {"score": 0.0, "n": 4}]) == \
        {"score": 50.0, "n": 6, "lo": 100 * lo, "hi": 100 * hi}


def test_helmet_through_05_with_the_published_table(tiny_llama_dir, helmet_data, tmp_path, monkeypatch):
    """Every category through 05 at 8K on the fixture (generation replaced: the tiny model's own generation is
    tested below); HELMET's generation lengths, newline stops and the recall early stop reach the generation."""
    calls = []

    def fake_generate(model, tokenizer, rows, max_new_tokens, stop_refs=None, prefill_chunk=None, stop_score=None,
                      stop_token_ids=()):
        calls.append((max_new_tokens, bool(stop_refs), bool(stop_token_ids), prefill_chunk))
        return [" zulu\n"] * len(rows)
    monkeypatch.setattr(ev, "generate_batch", fake_generate)
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "helmet", "--lengths", "8k",
             "--helmet-data", str(helmet_data), "--helmet-samples", "1", "--prefill-chunk", "2048",
             "--allow-beyond-context", "--compare-published", "prolong"])
    # recall 50/100 tokens, stopping once answered; RAG 20, re-rank 200 and ICL 20 tokens in full: HELMET's configs
    # say stop_new_line, which its eval.py never reads
    assert sorted(set(calls)) == [(20, False, False, 2048), (50, True, False, 2048), (100, True, False, 2048),
                                  (200, False, False, 2048)]
    results = json.loads((out / "results.json").read_text())
    s = results["models"][0]["helmet"]
    assert s["categories"] == ["Recall", "RAG", "Re-rank", "ICL"] and not s["not_run"]
    assert len(s["datasets"]) == 14 and all(c["8192"]["n"] == 1 for c in s["cells"].values())
    assert s["sources"]["json_kv"] == ["json_kv/test_k105_dep6.jsonl"]  # HELMET's file, not generated
    records = json.loads((out / f"0-{ev.slug(tiny_llama_dir)}" / "helmet.json").read_text())["records"]
    assert {r["dataset"] for r in records} == set(helmet.DATASETS) and all(r["output"] == " zulu\n" for r in records)
    report = (out / "report.md").read_text()
    assert "## Long context: HELMET" in report and "HELMET average (4 of 6 categories)" in report
    published = json.loads(ev.PUBLISHED.read_text())["recipes"]["prolong"]["results"]
    rows = [e for e in published if e["benchmark"].startswith("HELMET")]
    assert len(rows) >= 40
    for e in rows:
        assert e["source"].startswith("arXiv 2410.02660 v4, Table") and e["tag"] == "[C]"
        assert f"| {e['score']:g} | {e['source']} {e['tag']} |" in report, e
    assert "– (not run at 128K)" in next(x for x in report.splitlines() if "| 98.8 |" in x)  # measured at 8K only
    assert "judged by GPT-4o in HELMET: not run" in next(x for x in report.splitlines() if "| 43.9 |" in x)
    assert "averages LongQA and Summ" in next(x for x in report.splitlines() if "| 55.7 |" in x)
    calls.clear()  # the configs' newline stop, on request
    ev.main(["--models", tiny_llama_dir, "--out", str(tmp_path / "o2"), "--tasks", "helmet_rag,helmet_recall",
             "--lengths", "8k", "--helmet-data", str(helmet_data), "--helmet-samples", "1", "--prefill-chunk", "2048",
             "--allow-beyond-context", "--helmet-stop-newline"])
    assert sorted(set(calls)) == [(20, False, True, 2048), (50, True, False, 2048), (100, True, False, 2048)]


def test_generation_stops_at_helmets_stop_tokens(tiny_llama_dir):
    """The tiny model's own greedy generation ends at a stop token when given one (HELMET's newline stop), and is
    otherwise the full continuation."""
    tok = common.load_tokenizer(tiny_llama_dir)
    model = common.load_model(tiny_llama_dir)
    row = tok("Document (Title: T): some text.\nQuestion: what?\nAnswer:")["input_ids"]
    free = ev.generate_batch(model, tok, [row], 12)[0]
    ids = tok(free, add_special_tokens=False)["input_ids"]
    stop = ids[3]
    stopped = ev.generate_batch(model, tok, [row], 12, stop_token_ids=[stop])[0]
    assert stopped == tok.decode(ids[:ids.index(stop) + 1]) and len(stopped) < len(free)
    assert helmet.newline_token_ids(tok) == [tok.convert_tokens_to_ids("Ċ")]  # byte-level BPE: its newline


def test_helmet_without_data_runs_generated_recall_and_says_why_not_the_rest(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "helmet", "--lengths", "512",
             "--helmet-samples", "2", "--haystack", "pydocs", "--allow-beyond-context"])
    s = json.loads((out / "results.json").read_text())["models"][0]["helmet"]
    assert s["categories"] == ["Recall"] and set(s["sources"]["json_kv"]) == {"generated"}
    assert set(s["not_run"]) == {"RAG", "Re-rank", "ICL"} and "no --helmet-data" in s["not_run"]["RAG"]
    assert all(c["512"]["n"] == 2 for c in s["cells"].values())
    assert "Not run: RAG (no --helmet-data" in (out / "report.md").read_text()


def broken_data(tmp_path, helmet_data):
    """A copy of the fixture whose NQ file at 8K lacks `ctxs` on its first line."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(helmet_data, root)
    path = root / "kilt/nq-dev-multikilt_1000_k50_dep6.jsonl"
    rows = kilt_rows(6)
    del rows[0]["ctxs"]
    write_jsonl(path, rows)
    return root


@pytest.mark.parametrize("extra, expected", [
    (["--tasks", "helmet_rag", "--lengths", "8k"], "helmet_rag cannot run: no --helmet-data"),
    (["--tasks", "helmet_rag", "--lengths", "8k", "--helmet-data", "BROKEN"],
     "nq-dev-multikilt_1000_k50_dep6.jsonl:1 has no ctxs"),
    (["--tasks", "helmet_summ"], "HELMET's QA and summarisation are judged by GPT-4o"),
    (["--tasks", "helmet_chat"], "unknown task 'helmet_chat'"),
    (["--tasks", "helmet_icl", "--lengths", "4k", "--helmet-data", "DATA"], "HELMET has no ICL data at 4K"),
    (["--tasks", "helmet_recall", "--lengths", "512", "--helmet-samples", "0"], "--helmet-samples must be positive"),
    (["--tasks", "helmet"], "HELMET's lengths are 8K to 128K and --seq-len is 4096"),
])
def test_bad_helmet_input_is_one_line_and_leaves_nothing(tiny_llama_dir, helmet_data, tmp_path, extra, expected):
    swap = {"BROKEN": lambda: str(broken_data(tmp_path, helmet_data)), "DATA": lambda: str(helmet_data)}
    extra = [swap[x]() if x in swap else x for x in extra]
    with pytest.raises(common.UserError) as exc:
        ev.main(["--models", tiny_llama_dir, "--out", str(tmp_path / "o"), "--allow-beyond-context", *extra])
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()


def test_icl_label_out_of_range_is_refused(helmet_data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(helmet_data, root)
    write_jsonl(root / "icl/banking77/test.jsonl", [{"text": "hello", "label": 77}])
    with pytest.raises(common.UserError, match="banking77/test.jsonl: row 1 has label 77; PolyAI/banking77's label is "
                                               "an integer 0..76"):
        helmet.load_cell(helmet.DATASETS["icl_banking77"], 8192, root)


def test_popqa_without_a_question_below_helmets_popularity_and_a_fifo_are_refused(helmet_data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(helmet_data, root)
    rows = kilt_rows(4, ids=False, popularity=True)
    for r in rows:
        r["s_pop"] = 5000  # log10 above 3: HELMET keeps none of them
    write_jsonl(root / "kilt/popqa_test_1000_k50_dep6.jsonl", rows)
    with pytest.raises(common.UserError, match=r"popqa_test_1000_k50_dep6.jsonl: no PopQA record has a subject "
                                               r"popularity \(s_pop\) below 10\^3"):
        helmet.load_cell(helmet.DATASETS["kilt_popqa_3"], 8192, root, samples=2)
    rows[0]["s_pop"] = True  # JSON's true is no popularity (Python would read it as 1, log10 0: kept)
    write_jsonl(root / "kilt/popqa_test_1000_k50_dep6.jsonl", rows)
    with pytest.raises(common.UserError, match="PopQA records need a positive number in s_pop"):
        helmet.load_cell(helmet.DATASETS["kilt_popqa_3"], 8192, root, samples=2)
    fifo = root / "icl/banking77/test.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(common.UserError, match=f"HELMET's file {fifo} is a FIFO"):
        helmet.check_files(root, helmet.DATASETS["icl_banking77"], 8192)


def test_missing_helmet_data_exits_2_with_one_error_line(tiny_llama_dir, tmp_path):
    proc = run_script("05_eval", "--models", tiny_llama_dir, "--out", tmp_path / "o", "--tasks", "helmet_rerank",
                      "--lengths", "8k", "--helmet-data", tmp_path / "nowhere")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: --helmet-data {tmp_path / 'nowhere'} is not a directory; give the folder "
                                 f"of HELMET's extracted data.tar.gz"]
    assert not (tmp_path / "o").exists()
