"""04_sft.py on the CPU with tiny models: the trained labels are exactly the assistant turns; a few SFT steps lower
the assistant-token loss (measured by plain transformers on unpacked conversations); the chunked CE + KL equals
a dense reference; self-distillation with alpha = 1 has zero KL and zero gradient; alpha = 0 equals plain SFT;
restoration distillation on 01's plain text lowers the KL; 2 ranks equal 1; bad input gets one clear line."""
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import fsdp_train
import varlen_attention
from lc_testutil import load_script, run_script
from test_train import make_packed_data

sft = load_script("04_sft")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: a second OpenMP thread spinning makes each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_chats(path, n=24, seed=0, too_long=0, without_assistant=0):
    """Arithmetic conversations (every third multi-turn with a system prompt; replies with trailing newlines and
    non-ASCII text), plus conversations longer than 128 tokens and conversations without an assistant turn."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + ("\n" if i % 4 == 1 else "")}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "You add numbers. Café ☕."}] + msgs + [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"Doubled: {2 * (a + b)} — déjà vu."}]
        records.append({"messages": msgs, "id": i})
    for i in range(too_long):
        records.append({"messages": [{"role": "user", "content": "Recite."},
                                     {"role": "assistant", "content": " ".join(["In the beginning"] * 60)}]})
    for i in range(without_assistant):
        records.append({"messages": [{"role": "user", "content": "Hello?"}]})
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return make_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl")


def base_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--device", "cpu", "--seq-len", "128",
            "--batch-tokens", "256", "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "0", "--save-every", "0",
            "--no-final-checkpoint", "--no-export", *map(str, extra)]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_ok(args):
    assert common.call_main(sft.main, args) == 0
    return metrics(args[args.index("--out") + 1])


def assistant_runs(data, tokenizer):
    """Decoded runs of consecutive trained target tokens, over every packed row, via build_micro_batch."""
    runs = []
    for r in range(data.num_rows):
        rows = data.rows([r])
        mb = varlen_attention.build_micro_batch(rows, data.seq_len, True, loss_masks=[rows[0]["loss_mask"]])
        t = mb.targets[0].tolist()
        cur = []
        for tok in t + [common.IGNORE_INDEX]:
            if tok != common.IGNORE_INDEX:
                cur.append(tok)
            elif cur:
                runs.append(tokenizer.decode(cur))
                cur = []
    return runs


@pytest.mark.parametrize("method", ["markers", "prefix", "smollm2-prefix"])
def test_unmasked_labels_decode_to_exactly_the_assistant_turns(method, tokenizer_dir, chats, request):
    from transformers import AutoTokenizer

    tok_dir = request.getfixturevalue("smollm2_dir") if method.startswith("smollm2") else tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    mask_method = method.split("-")[-1]
    args = sft.parse_args(["--model", tok_dir, "--data", chats, "--out", "unused", "--seq-len", "256",
                           "--assistant-mask", mask_method])
    template, _ = sft.resolve_chat_template(tok, "auto")
    data = sft.load_chat_data(args, tok, template, mask_method)
    assert data.stats["kept"] == 24 and data.num_rows >= 2
    end = "<|im_end|>"  # ChatML (both templates): the end-of-turn token is trained, the newline after it is not
    expected = sorted(m["content"] + end for line in open(chats) for m in json.loads(line)["messages"]
                      if m["role"] == "assistant")
    assert sorted(assistant_runs(data, tok)) == expected


def test_parquet_json_and_datasets_folders_read_like_jsonl(tokenizer_dir, tokenizer, chats, tmp_path):
    import datasets

    records = [json.loads(line) for line in open(chats)]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "c.json").write_text(json.dumps(records))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    template = tokenizer.get_chat_template()

    def packed(data):
        args = sft.parse_args(["--model", tokenizer_dir, "--data", data, "--out", "unused", "--seq-len", "128"])
        return sft.load_chat_data(args, tokenizer, template, "markers").fingerprint()["sha256"]

    assert {packed(str(tmp_path / n)) for n in ("c.parquet", "c.json", "dd")} == {packed(chats)}


def test_sft_lowers_assistant_token_loss_and_exports(tiny_llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = make_chats(tmp_path / "c.jsonl", n=16, too_long=1, without_assistant=1)
    out = tmp_path / "run"
    args = base_args(tiny_llama_dir, data, out, "--max-steps", "6", "--lr", "1e-2", "--min-lr-ratio", "1.0")
    args.remove("--no-export")
    m = run_ok(args)
    assert [r["step"] for r in m] == list(range(1, 7)) and all(r["valid_tokens"] > 0 for r in m)
    assert all(sum(r["attn_paths"].values()) == 2 for r in m)  # 2 micro-batches of one row per step, by path

    def assistant_loss(model_dir):  # plain transformers, one unpacked conversation at a time
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        template = tokenizer.get_chat_template()
        total, count = 0.0, 0
        for line in open(data):
            msgs = json.loads(line)["messages"]
            ids, mask = sft.render_conversation(tokenizer, msgs, template, "markers")
            if len(ids) > 128 or not mask.any():
                continue
            with torch.no_grad():
                logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, :-1]
            keep = torch.as_tensor(mask[1:], dtype=torch.bool)
            total += F.cross_entropy(logits[keep], torch.as_tensor(ids[1:], dtype=torch.long)[keep],
                                     reduction="sum").item()
            count += int(keep.sum())
        return total / count

    before, after = assistant_loss(tiny_llama_dir), assistant_loss(out / "final")
    assert after < before - 0.5, (before, after)
    manifest = common.read_manifest(out / "final")
    assert manifest["stage"] == "04_sft" and manifest["recipe"]["mode"] == "sft"
    conv = manifest["stats"]["conversations"]
    assert (conv["read"], conv["kept"], conv["too_long"], conv["no_assistant"]) == (18, 16, 1, 1)
    assert AutoTokenizer.from_pretrained(out / "final").chat_template == tokenizer.chat_template


def test_chunked_kd_loss_matches_dense_reference():
    torch.manual_seed(0)
    n, hidden, vocab, temp = 23, 8, 50, 2.0
    h = torch.randn(1, n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    th, tw = torch.randn(1, n, hidden), torch.randn(vocab, hidden)
    t = torch.randint(0, vocab, (1, n))
    t[0, ::4] = common.IGNORE_INDEX
    ce, kl = sft.kd_loss_fn(t, th, tw, temp, chunk_size=5)(h, w)
    (0.3 * ce + 0.7 * temp ** 2 * kl).backward()

    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    keep = t[0] != common.IGNORE_INDEX
    logits = (h2[0] @ w2.T)[keep]
    ce_ref = F.cross_entropy(logits, t[0][keep], reduction="sum")
    p = torch.softmax((th[0] @ tw.T)[keep] / temp, -1)
    kl_ref = (p * (p.log() - torch.log_softmax(logits / temp, -1))).sum()
    (0.3 * ce_ref + 0.7 * temp ** 2 * kl_ref).backward()
    torch.testing.assert_close(torch.stack([ce, kl]), torch.stack([ce_ref, kl_ref]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_self_distillation_with_alpha_1_has_zero_kl_and_zero_gradient(tiny_llama_dir, chats, tmp_path):
    m = run_ok(base_args(tiny_llama_dir, chats, tmp_path / "self", "--teacher", tiny_llama_dir, "--alpha", "1",
                         "--max-steps", "1"))[0]
    assert m["kl"] == 0.0 and m["loss"] == 0.0 and m["ce"] > 1.0
    assert m["grad_norm"] < 1e-6


def test_alpha_0_equals_plain_sft(tiny_llama_dir, tiny_qwen2_dir, chats, tmp_path):
    plain = run_ok(base_args(tiny_llama_dir, chats, tmp_path / "ce"))
    kd = run_ok(base_args(tiny_llama_dir, chats, tmp_path / "kd", "--teacher", tiny_qwen2_dir, "--alpha", "0",
                          "--loss-chunk", "48"))
    for a, b in zip(plain, kd):
        assert b["kl"] > 0 and b["ce"] == b["loss"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-5)


def test_restoration_distillation_on_01_plain_text(tiny_llama_dir, tiny_qwen2_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = shutil.copytree(tiny_qwen2_dir, tmp_path / "teacher")  # sharpened: far from the student
    weights = load_file(teacher / "model.safetensors")
    weights["lm_head.weight"] *= 30
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    data = str(tmp_path / "short")  # 01's plain text as a directory of two shards, read as one dataset of 4 rows
    for k in range(2):
        make_packed_data(tmp_path / "short" / f"shard-{k}", seq_len=64, num_rows=2, vocab=1000, seed=k)
    m = run_ok(base_args(tiny_llama_dir, data, tmp_path / "rd", "--teacher", teacher, "--alpha", "1",
                         "--seq-len", "64", "--batch-tokens", "256", "--max-steps", "6", "--lr", "1e-2",
                         "--min-lr-ratio", "1"))  # every step sees all 4 rows: the KL is measured on the same text
    assert m[-1]["kl"] < 0.9 * m[0]["kl"], [r["kl"] for r in m]
    assert all(r["valid_tokens"] > 100 for r in m)  # every token of the text, not an assistant mask
    code = common.call_main(sft.main, base_args(tiny_llama_dir, data, tmp_path / "no-teacher", "--seq-len", "64"))
    assert code == 2 and "pass --teacher" in capsys.readouterr().err
    assert not (tmp_path / "no-teacher").exists()


@pytest.fixture(scope="module")
def distill_ref(tiny_llama_dir, tiny_qwen2_dir, chats, tmp_path_factory):
    """Uninterrupted 1-process distillation run: 3 steps of 4 rows, 4 accumulated micro-batches of 1 row."""
    args = base_args(tiny_llama_dir, chats, tmp_path_factory.mktemp("ref") / "run", "--teacher", tiny_qwen2_dir,
                     "--batch-tokens", "512")
    return args, run_ok(args)


def test_two_processes_match_one_process(distill_ref, tmp_path):
    """2 ranks x 2 micro-batches == 1 rank x 4: the same global-token-mean loss, KL and gradient norm."""
    args, one = list(distill_ref[0]), distill_ref[1]
    args[args.index("--out") + 1] = str(tmp_path / "two")
    proc = run_script("04_sft", *args, torchrun=2, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "2 accumulation step(s)" in proc.stdout
    two = metrics(tmp_path / "two")
    assert [r["valid_tokens"] for r in two] == [r["valid_tokens"] for r in one]
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_sigterm_checkpoint_then_resume_is_bitwise(distill_ref, tmp_path):
    args, ref = list(distill_ref[0]), distill_ref[1]
    out = tmp_path / "sig"
    args[args.index("--out") + 1] = str(out)

    def send_sigterm():
        end = time.time() + 120
        while time.time() < end and not ((out / "metrics.jsonl").is_file()
                                         and (out / "metrics.jsonl").read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm, daemon=True).start()
    assert common.call_main(sft.main, args + ["--debug-sleep", "0.5"]) == 128 + signal.SIGTERM
    ckpts = fsdp_train.list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) < 3
    assert common.call_main(sft.main, args + ["--resume", "auto"]) == 0
    key = [(r["step"], r["loss"], r["kl"], r["grad_norm"]) for r in ref]
    assert [(r["step"], r["loss"], r["kl"], r["grad_norm"]) for r in metrics(out)] == key


def run_error(capsys, args):
    code = common.call_main(sft.main, args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert not Path(args[args.index("--out") + 1]).exists()
    return lines[0]


def test_bad_inputs_fail_with_one_line_and_no_output(tiny_llama_dir, chats, tmp_path, capsys):
    no_assistant = make_chats(tmp_path / "q.jsonl", n=0, without_assistant=3)
    assert "has an assistant turn" in run_error(capsys, base_args(tiny_llama_dir, no_assistant, tmp_path / "a"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "plain"}) + "\n")
    assert "no 'messages' field" in run_error(capsys, base_args(tiny_llama_dir, str(tmp_path / "bad.jsonl"),
                                                                tmp_path / "b"))
    # a teacher with another vocabulary size, and one with the same size but another tokenizer
    other_vocab = shutil.copytree(tiny_llama_dir, tmp_path / "t1")
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + 8)))
    assert "same vocabulary" in run_error(capsys, base_args(tiny_llama_dir, chats, tmp_path / "c", "--teacher",
                                                            other_vocab))
    other_tok = shutil.copytree(tiny_llama_dir, tmp_path / "t2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(other_tok))
    assert "another tokenizer" in run_error(capsys, base_args(tiny_llama_dir, chats, tmp_path / "d", "--teacher",
                                                              other_tok))
