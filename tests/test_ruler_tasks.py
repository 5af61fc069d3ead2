"""ruler.py's other five RULER tasks against RULER's definitions, each answer recomputed here from the prompt text:
vt's chain, cwe's and fwe's word counts, QA's documents; prompts fill the length; each metric scores a planted
right answer 100 and a wrong one 0; the interval, zeta and the size search against direct computations."""
import collections
import hashlib
import json
import math
import random
import re

import pytest

import common
import ruler
from lc_testutil import load_script

ev = load_script("05_eval")


def main_part(prompt: str, opening: str) -> str:
    """The task's own text: from the last occurrence of its opening (vt and cwe put a worked example first)."""
    return prompt[prompt.rindex(opening):]


def assert_fills(records, tokenizer, step_tokens):
    """prompt + budget <= length, the prompt tokenized here has the recorded size, and less than one growth step
    of RULER's (in tokens) is left over."""
    for r in records:
        ids = tokenizer(r["prompt"], verbose=False)["input_ids"]
        assert len(ids) == r["prompt_tokens"] == len(r["input_ids"])
        assert r["prompt_tokens"] + r["max_new_tokens"] <= r["length"]
        assert r["length"] - r["max_new_tokens"] - r["prompt_tokens"] < step_tokens, (r["task"], r["length"])


def test_vt_answer_is_exactly_the_variables_of_the_queried_chain(tok):
    recs = ruler.build_task_prompts("vt", [1024, 1500], 2, tok, seed=3)
    for r in recs:
        text = main_part(r["prompt"], "Memorize and track")
        query = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        values = {}
        for var, rhs in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", text):
            values[var] = rhs
        def resolve(v, seen=()):  # follow VAR X = VAR Y ... down to a number
            rhs = values[v]
            return resolve(rhs[4:], seen + (v,)) if rhs.startswith("VAR ") else rhs
        holders = sorted(v for v in values if resolve(v) == query)
        assert holders == sorted(r["references"]) and len(holders) == 5  # 1 chain, 4 hops
        assert r["prompt"].endswith(f"5 variables are assigned the value {query}, they are: ")
        # the worked example comes first, with 3-letter names and its answer
        example = r["prompt"][:r["prompt"].rindex("Memorize and track")]
        assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n\n", example)
    noise = len(tok(ruler.RULER_NOISE + "\n", verbose=False)["input_ids"])
    assert_fills(recs, tok, step_tokens=10 * noise)  # RULER grows vt by 10 noise lines


# RULER's vt texts, copied verbatim from NVIDIA/RULER scripts/data/synthetic/constants.py (TASKS["variable_tracking"])
# and variable_tracking.py (the noise haystack), each literal only split over lines here; the prompt is rebuilt from
# them below, independently of ruler.py.
RULER_VT_TEMPLATE = ("""Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"""
                     """{context}\nQuestion: Find all variables that are assigned the value {query} in the text """
                     """above.""")
RULER_VT_ANSWER_PREFIX = (""" Answer: According to the chain(s) of variable assignment in the text above, {num_v} """
                          """variables are assigned the value {query}, they are: """)
RULER_VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def rulers_vt_prompt(example_context, example_value, example_names, context, value):
    """RULER's prompt (base model template): prepare.py's template + answer prefix; the example is that text
    formatted, a space, its answer and a newline (sys_vartrack_w_noise_random), then one more newline and the task."""
    full = RULER_VT_TEMPLATE + RULER_VT_ANSWER_PREFIX
    example = full.format(context=example_context, query=example_value, num_v=5) + " " + " ".join(example_names) + "\n"
    return example + "\n" + full.format(context=context, query=value, num_v=5)


def vt_parts(prompt):
    """(example context, example value, example names, context, value) read off a prompt with a pattern made from
    RULER's literal texts: anything else in the prompt, a changed line break included, fails the match."""
    def pattern(tag):
        full = re.escape(RULER_VT_TEMPLATE + RULER_VT_ANSWER_PREFIX)
        full = full.replace(re.escape("{context}"), rf"(?P<{tag}context>(?:[^\n]*\n)*?[^\n]*)", 1)
        full = full.replace(re.escape("{query}"), rf"(?P<{tag}value>\d{{5}})", 1)
        return full.replace(re.escape("{query}"), rf"(?P={tag}value)").replace(re.escape("{num_v}"), "5")
    regex = pattern("e") + r" (?P<names>[A-Z]{3}(?: [A-Z]{3}){4})\n\n" + pattern("m")
    m = re.fullmatch(regex, prompt)
    assert m, prompt[:300]
    return m["econtext"], m["evalue"], m["names"].split(), m["mcontext"], m["mvalue"]


def chain_of(context, letters):
    """The context's lines are RULER's noise sentence or a statement; the statements, in order, are one chain
    "VAR A = value", "VAR B = VAR A " (RULER's trailing space), ...: returns its variables and its value."""
    statements = [line for line in context.split("\n") if line != RULER_VT_NOISE]
    first = re.fullmatch(rf"VAR ([A-Z]{{{letters}}}) = (\d{{5}})", statements[0])
    names = [first[1]]
    for line in statements[1:]:
        names.append(re.fullmatch(rf"VAR ([A-Z]{{{letters}}}) = VAR {names[-1]} ", line)[1])
    return names, first[2]


def test_vt_prompt_is_rulers_template_with_a_fresh_example_per_sample(tok):
    recs = ruler.build_task_prompts("vt", [1024, 1500], 3, tok, seed=5)
    examples = []
    for r in recs:
        example_context, example_value, example_names, context, value = vt_parts(r["prompt"])
        assert r["prompt"] == rulers_vt_prompt(example_context, example_value, example_names, context, value)
        assert chain_of(example_context, 3) == (example_names, example_value)  # the example answers its question
        assert chain_of(context, 5) == (r["references"], value)
        examples.append((tuple(example_names), example_value, example_context))
        # RULER fits the example's text and answer prefix (without its answer) to 500 tokens
        example_text = r["prompt"][:r["prompt"].index(", they are: ") + len(", they are: ")]
        assert len(tok(example_text, add_special_tokens=False)["input_ids"]) <= 500
    # every sample renames the example (names and value differ from every other sample's) ...
    assert len({names for names, _, _ in examples}) == len({value for _, value, _ in examples}) == len(recs) == 6
    # ... of one layout, built once as RULER does: the same lines with the names and value blanked out
    def blanked(names, value, context):
        for i, name in enumerate(names):
            context = re.sub(rf"\b{name}\b", f"<{i}>", context)
        return context.replace(value, "<value>")
    assert len({blanked(*e) for e in examples}) == 1
    again = ruler.build_task_prompts("vt", [1024, 1500], 3, tok, seed=5)
    assert [r["prompt"] for r in again] == [r["prompt"] for r in recs]  # the same seed, the same prompts
    other = ruler.build_task_prompts("vt", [1024], 1, tok, seed=6)
    assert vt_parts(other[0]["prompt"])[:3] != vt_parts(recs[0]["prompt"])[:3]


def test_saved_record_rebuilds_the_exact_prompt(tok, qa_files):
    """A record as 05 saves it without its text (JSON, no prompt, no ids) rebuilds the prompt byte for byte; its
    SHA-256 is the one of the text, computed here."""
    essay = "Plain words fill this essay. Another sentence follows it!\n" * 200
    recs = ruler.build_ruler_prompts(["niah_single_2", "niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt",
                                      "cwe", "fwe", "qa_1", "qa_2"], [1024], [0.0, 50.0], 1, tok, essay_text=essay,
                                     seed=7, qa_data=qa_files)
    for r in recs:
        saved = json.loads(json.dumps({k: v for k, v in r.items() if k not in ("prompt", "input_ids")}))
        assert saved["prompt_sha256"] == hashlib.sha256(r["prompt"].encode("utf-8")).hexdigest()
        rebuilt = ruler.rebuild_prompt(saved, tok, essay_text=essay, qa_data=qa_files)
        assert rebuilt == r["prompt"], (r["task"], r["sample"])
    assert len({r["prompt_sha256"] for r in recs}) == len(recs)


@pytest.mark.parametrize("length, common_repeats, uncommon_repeats", [(1024, 6, 1), (4096, 30, 3)])
def test_cwe_answer_is_the_common_words_at_their_configured_counts(tok, length, common_repeats,
                                                                   uncommon_repeats):
    recs = ruler.build_task_prompts("cwe", [length], 2, tok, seed=0)
    for r in recs:
        text = main_part(r["prompt"], "Below is a numbered list")
        listed = re.findall(r"(\d+)\. (\S+)", text.split("\n")[1])
        assert [int(i) for i, _ in listed] == list(range(1, len(listed) + 1))
        counts = collections.Counter(w for _, w in listed)
        assert sorted(w for w, c in counts.items() if c == common_repeats) == sorted(r["references"])
        assert len(r["references"]) == 10
        assert all(c == uncommon_repeats for w, c in counts.items() if w not in r["references"])
        assert r["prompt"].endswith("Answer: The top 10 words that appear most often in the list are:")
    assert_fills(recs, tok, step_tokens=12 * uncommon_repeats * 6)  # RULER: steps of 10 words


def test_fwe_answer_holds_the_top_three_words_of_the_text(tok):
    recs = ruler.build_task_prompts("fwe", [800, 2000], 2, tok, seed=1)
    for r in recs:
        coded = re.search(r"coded words\. (.*)\nQuestion:", r["prompt"], flags=re.S).group(1).split()
        counts = collections.Counter(w for w in coded if w != "...")
        top = counts.most_common(4)
        assert sorted(w for w, _ in top[:3]) == sorted(r["references"])
        assert top[2][1] > top[3][1]  # no tie at the cut
        assert coded.count("...") > top[0][1]  # rank 1 is the noise word
        # Zipf with alpha 2: the k-th ranked word holds int(N k^-2 / zeta(2)) of the N words drawn
        n = r["size"]
        assert [c for _, c in top[:3]] == [int(n * k ** -2 / (math.pi ** 2 / 6)) for k in (2, 3, 4)]
    assert_fills(recs, tok, step_tokens=max(r["length"] // 32 for r in recs) * 3)  # RULER: length // 32 words


SQUAD = {"data": [
    {"title": "Rivers", "paragraphs": [
        {"context": "The Nile flows north through Egypt into the Mediterranean.", "qas": [
            {"question": "Where does the Nile flow?",
             "answers": [{"text": "north"}, {"text": "into the Mediterranean"}],
             "is_impossible": False},
            {"question": "Who owns the Nile?", "answers": [], "is_impossible": True}]},
        {"context": "The Amazon carries more water than any other river.", "qas": [
            {"question": "Which river carries the most water?", "answers": [{"text": "The Amazon"}],
             "is_impossible": False},
            {"question": "What does the Amazon carry?", "answers": [{"text": "water"}]}]}]},
    {"title": "Filler", "paragraphs": [{"context": f"Filler paragraph number {i} says nothing at all.", "qas": []}
                                       for i in range(40)]},
]}
HOTPOT = [{"question": f"Which city is twinned with town {i}?", "answer": f"City{i}",
           "context": [[f"Town {i}", [f"Town {i} is twinned ", f"with City{i}."]]]
           + [[f"Distractor {i}-{j}", [f"Distractor {j} of question {i} talks about weather."]] for j in range(3)]}
          for i in range(12)]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    """A real tokenizer (SmolLM2's): RULER's words and templates at realistic token counts."""
    return common.load_tokenizer(smollm2_dir)


@pytest.fixture
def qa_files(tmp_path):
    squad, hotpot = tmp_path / "squad.json", tmp_path / "hotpotqa.json"
    squad.write_text(json.dumps(SQUAD))
    hotpot.write_text(json.dumps(HOTPOT))
    return {"squad": ruler.load_qa_data("squad", str(squad)), "hotpotqa": ruler.load_qa_data("hotpotqa", str(hotpot))}


def test_qa_prompts_hold_the_gold_documents_among_distractors(tok, qa_files):
    squad, hotpot = qa_files["squad"], qa_files["hotpotqa"]
    assert [q["query"] for q in squad.questions] == ["Where does the Nile flow?", "Which river carries the most water?",
                                                    "What does the Amazon carry?"]  # not the impossible one
    recs = ruler.build_task_prompts("qa_1", [400, 700], 2, tok, qa_data=qa_files)
    recs += ruler.build_task_prompts("qa_2", [400, 700], 3, tok, qa_data=qa_files)
    for r in recs:
        docs = re.findall(r"Document (\d+):\n", r["prompt"])
        assert [int(d) for d in docs] == list(range(1, len(docs) + 1)) and r["size"] == len(docs)
        q = (squad if r["task"] == "qa_1" else hotpot).questions[r["sample"]]
        assert r["references"] == q["outputs"] and r["prompt"].endswith(f"Question: {q['query']} Answer:")
        for gold in q["gold"]:
            assert (squad if r["task"] == "qa_1" else hotpot).docs[gold] in r["prompt"]
    nile = next(r for r in recs if r["task"] == "qa_1" and r["sample"] == 0 and r["length"] == 400)
    assert "The Amazon carries" in nile["prompt"]  # its article's other paragraph comes before random filler
    longer = [r["size"] for r in recs if r["task"] == "qa_2" and r["length"] == 700]
    assert min(longer) > max(r["size"] for r in recs if r["task"] == "qa_2" and r["length"] == 400)
    assert_fills(recs, tok, step_tokens=10 * 25)  # RULER grows by 10 documents


def test_qa_hub_rows_read_like_rulers_json(tmp_path, qa_files):
    rows = [{"title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]], "answer_start": [0] * len(q["answers"])}}
            for a in SQUAD["data"] for p in a["paragraphs"] for q in p["qas"]]
    from_rows = ruler.qa_from_squad(ruler.squad_rows_to_json(rows), "hub")

    def as_text(qa):  # questions with their documents' texts (the hub has no row for a paragraph without questions)
        return [(q["query"], q["outputs"], [qa.docs[i] for i in q["gold"]], [qa.docs[i] for i in q["more"]])
                for q in qa.questions]
    assert as_text(from_rows) == as_text(qa_files["squad"])
    assert set(from_rows.docs) <= set(qa_files["squad"].docs)
    hot_rows = [{"question": d["question"], "answer": d["answer"],
                 "context": {"title": [t for t, _ in d["context"]], "sentences": [s for _, s in d["context"]]}}
                for d in HOTPOT]
    from_hot = ruler.qa_from_hotpotqa(ruler.hotpotqa_rows_to_json(hot_rows), "hub")
    assert (from_hot.docs, from_hot.questions) == (qa_files["hotpotqa"].docs, qa_files["hotpotqa"].questions)
    assert "Town 3\nTown 3 is twinned with City3." in from_hot.docs
    with pytest.raises(common.UserError, match="not in squad's json layout"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"rows": []}))
        ruler.load_qa_data("squad", str(bad))


@pytest.mark.parametrize("task, right, wrong", [
    ("vt", lambda refs: " ".join(refs), lambda refs: "AAAAA BBBBB"),
    ("cwe", lambda refs: " ".join(f"{i + 1}. {w}" for i, w in enumerate(refs)), lambda refs: "1. zzzzqqq"),
    ("fwe", lambda refs: ", ".join(refs), lambda refs: "qqqqqq"),
    ("qa_1", lambda refs: refs[-1].upper(), lambda refs: "Paris"),
])
def test_planted_right_answer_scores_100_and_wrong_one_0(tok, qa_files, task, right, wrong):
    recs = ruler.build_task_prompts(task, [1024], 2, tok, qa_data=qa_files)
    for plant, expected in ((right, 100.0), (wrong, 0.0)):
        scored = ev.run_niah(None, tok, [dict(r) for r in recs], 8, 4096, 4,
                             generate=lambda rows, refs: [plant(x) for x in refs])
        assert [r["score"] for r in scored] == [expected, expected]
    assert ruler.METRICS[ruler.task_kind(task)] == ("string_match_part" if task == "qa_1" else "string_match_all")


def test_ruler_builds_all_13_tasks_with_their_budgets_and_equal_samples(tok, qa_files):
    recs = ruler.build_ruler_prompts(ruler.RULER_TASK_NAMES, [1024], [0, 50, 100], 1, tok,
                                     essay_text="Plain words fill this essay. " * 400, qa_data=qa_files)
    per_task = collections.Counter(r["task"] for r in recs)
    assert list(per_task) == ruler.RULER_TASK_NAMES and set(per_task.values()) == {3}
    assert {r["task"]: r["max_new_tokens"] for r in recs} == {
        t: {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}.get(t, 128) for t in ruler.RULER_TASK_NAMES}


def test_wilson_interval_solves_the_score_equation():
    """Wilson's bounds are the p with |k/n - p| = z sqrt(p (1 - p) / n): found here by bisection."""
    z = 1.959964
    for k, n in [(0, 1), (1, 1), (3, 10), (10, 10), (250, 500), (17, 40)]:
        phat = k / n

        def root(lo, hi):  # bisection for f(p) = (phat - p)^2 - z^2 p (1 - p) / n, one root in [lo, hi]
            f = lambda p: (phat - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if (f(mid) > 0) == (f(lo) > 0) else (lo, mid)
            return (lo + hi) / 2
        lo, hi = ruler.wilson_interval(phat, n)
        assert lo == pytest.approx(root(0.0, phat) if k else 0.0, abs=1e-9)
        assert hi == pytest.approx(root(phat, 1.0) if k < n else 1.0, abs=1e-9)


def test_zeta_and_largest_fitting():
    assert ruler.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-12)
    assert ruler.zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-12)
    rng = random.Random(0)
    for _ in range(300):
        threshold, upper, start = rng.randint(-1, 120), rng.choice([None, rng.randint(0, 150)]), rng.randint(0, 200)
        expected = threshold if upper is None else min(threshold, upper)
        assert ruler.largest_fitting(lambda n: n <= threshold, start, upper) == (expected if expected >= 0 else -1)
