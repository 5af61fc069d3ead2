"""Bad input, refused writes and checkpoints that cannot be trusted, stage by stage. Each
refusal exits non-zero with exactly one line starting with `error:` on a line of its own on stderr, no traceback,
no output left behind (an existing --out unchanged), nothing new beside --out, and every input byte-identical
afterwards (its tree hashed before and after). In-process through common.call_main; tiny inputs."""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import common
import safe_output
from lc_testutil import load_script
from test_safe_output import dead_pid
from test_sft import make_chats
from test_train import make_packed_data

prep, scale, cpt, sft, ev, merge = (load_script(n) for n in ("01_prepare_data", "02_rope_scale",
                                                              "03_continued_pretrain", "04_sft", "05_eval", "06_merge"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores
    yield
    torch.set_num_threads(threads)


def tree(path) -> dict:
    """sha256 of every file under `path` (or of `path` itself), by relative name; {} when absent."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(capsys, main, argv, inputs=(), expect: str = "") -> str:
    """Run `main(argv)` expecting one clean refusal; check the output, its parent and every input afterwards."""
    argv = [str(a) for a in argv]
    out = Path(argv[argv.index("--out") + 1])
    parent = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    before = {"out": tree(out), "beside": sorted(p.name for p in parent.iterdir()),
              **{str(p): tree(p) for p in inputs}}
    code = common.call_main(main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.split("\n") if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert expect in errors[0], errors[0]
    after = {"out": tree(out), "beside": sorted(p.name for p in parent.iterdir()), **{str(p): tree(p) for p in inputs}}
    assert after == before
    return errors[0]


def corrupt(path: Path, nbytes: int = 4096, at: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(os.urandom(nbytes))


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs at `path` (root only: a read-only one, or a tiny one that fills up); skips where none can be made."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -------------------------------------------------------------------------------------------------------------
# Inputs shared by the cases.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_dir, tiny_llama_dir):
    d = tmp_path_factory.mktemp("inputs")
    packed = make_packed_data(d / "packed", seq_len=32, num_rows=8)
    chats = make_chats(d / "chats.jsonl", n=8)
    kjv = [json.loads(line) for _, line in zip(range(400), open(common.kjv_path()))] if common.kjv_path() else []
    text = "\n".join(v["text"] for v in kjv) or "\n".join(d["text"] for d in common.code_repo_documents())[:40000]
    (d / "corpus").mkdir()
    for i in range(4):
        (d / "corpus" / f"{i}.txt").write_text(text[i * 9000:(i + 1) * 9000])
    (d / "latin1").mkdir()
    (d / "latin1" / "good.txt").write_text("plain text " * 50)
    (d / "latin1" / "bad.txt").write_bytes(b"caf\xe9 au lait, " * 20)  # Latin-1, not UTF-8, no NUL byte
    no_weights = d / "no-weights"
    no_weights.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    return {"dir": d, "packed": packed, "chats": chats, "corpus": d / "corpus", "latin1": d / "latin1",
            "no_weights": no_weights, "tok": tokenizer_dir, "model": tiny_llama_dir}


def args01(inp, out, *extra, data=None, seq_len=64):
    return ["--data", data or inp["corpus"], "--tokenizer", inp["tok"], "--seq-len", seq_len, "--num-proc", 1,
            "--out", out, *extra]


def args03(inp, out, *extra):
    return ["--init-config", "tiny-llama", "--tokenizer", inp["tok"], "--data", inp["packed"], "--out", out,
            "--device", "cpu", "--batch-tokens", 64, "--max-steps", 2, "--save-every", 1, "--lr", "1e-3", *extra]


def args04(inp, out, *extra):
    return ["--model", inp["model"], "--data", inp["chats"], "--out", out, "--device", "cpu", "--seq-len", 128,
            "--max-steps", 1, "--save-every", 0, "--no-final-checkpoint", "--no-export", *extra]


def trajectory(run: Path) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, (run / "metrics.jsonl").open())]


@pytest.fixture(scope="module")
def complete_run(inputs, tmp_path_factory):
    """A finished 03 run: checkpoints at steps 1 and 2, OUT/final."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert common.call_main(cpt.main, [str(a) for a in args03(inputs, out)]) == 0
    return out


# -------------------------------------------------------------------------------------------------------------
# 01


def test_01_bad_text_locks_sizes_and_outputs_inside_inputs(inputs, tmp_path, capsys):
    inp, out = inputs, tmp_path / "data"
    bad = inp["latin1"] / "bad.txt"
    line = refused(capsys, prep.main, args01(inp, out, data=inp["latin1"]), [inp["latin1"]],
                   "is not UTF-8 text: byte 0xe9 at byte offset 3")
    assert str(bad) in line and "--encoding-errors replace" in line
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    (tmp_path / "x.jsonl").write_bytes(data)
    refused(capsys, prep.main, args01(inp, out, data=tmp_path / "x.jsonl"), [tmp_path / "x.jsonl"],
            f"{tmp_path / 'x.jsonl'} (line 2) is not UTF-8 text: byte 0xe9 at byte offset {data.index(0xe9)} ")
    refused(capsys, prep.main, args01(inp, out, seq_len=10**14), [inp["corpus"]], "is not an integer >= 2, <= ")
    import psutil

    with pytest.MonkeyPatch.context() as mp:  # a machine with 1 GiB free: a row of 2^27 tokens needs 1.5 GiB
        mp.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**30})())
        refused(capsys, prep.main, args01(inp, out, seq_len=2**27), [inp["corpus"]],
                "--seq-len 134217728 does not fit: writing one row takes 1.5 GiB and this machine has 1 GiB")
    refused(capsys, prep.main, args01(inp, inp["corpus"] / "sub", "--overwrite"), [inp["corpus"]],
            "lies inside the input --data")
    refused(capsys, prep.main, args01(inp, inp["dir"], "--overwrite"), [inp["corpus"]], "contains the input --data")
    with safe_output.OutputLock(out):  # another writer of the same --out: refused at once
        refused(capsys, prep.main, args01(inp, out), [inp["corpus"]], "is being written by")
    stale = tmp_path / f".data.tmp-{safe_output.HOST}-{dead_pid()}-00c0ffee"
    stale.mkdir()  # what a killed 01 left: cleaned by the next run, which succeeds
    argv = args01(inp, out, "--encoding-errors", "replace", data=inp["latin1"])
    assert common.call_main(prep.main, [str(a) for a in argv]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "x.jsonl"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------------------------------------------------
# 02


def test_02_numbers_configs_missing_weights_and_betas(inputs, tmp_path, capsys):
    inp, out = inputs, tmp_path / "patched"
    model = ["--model", inp["model"], "--out", out]
    for value in ("nan", "inf", "-inf"):
        refused(capsys, scale.main, model + ["--method", "yarn", f"--factor={value}"], [inp["model"]],
                f"argument --factor: '{value}' is not a finite number")
    refused(capsys, scale.main, model + ["--method", "yarn", "--factor", 4, "--beta-fast", 1, "--beta-slow", 32],
            [inp["model"]], "YaRN needs beta_fast > beta_slow (got 1 <= 32)")
    no_weights = ["--model", inp["no_weights"], "--out", out, "--method", "yarn", "--factor", 4]
    refused(capsys, scale.main, no_weights, [inp["no_weights"]], "has no weight files")
    refused(capsys, scale.main, ["--model", inp["model"], "--out", inp["model"], "--overwrite", "--method", "yarn",
                                 "--factor", 4], [inp["model"]], "is the input --model")
    (tmp_path / "doc.txt").write_bytes(b"\x80" + b"word " * 300)
    refused(capsys, scale.main, model + ["--method", "yarn", "--factor", 4, "--ppl-check", tmp_path / "doc.txt"],
            [inp["model"], tmp_path / "doc.txt"], "doc.txt (line 1) is not UTF-8 text: byte 0x80 at byte offset 0")
    broken = shutil.copytree(inp["no_weights"], tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "llama",')
    refused(capsys, scale.main, ["--model", broken, "--out", out, "--method", "yarn", "--factor", 4], [broken],
            "config.json is not valid JSON")
    assert common.call_main(scale.main, [str(a) for a in no_weights + ["--config-only"]]) == 0
    assert (out / "config.json").is_file() and not list(out.glob("*.safetensors"))


# -------------------------------------------------------------------------------------------------------------
# 03


def test_03_outputs_that_are_inputs_and_bad_numbers(inputs, tmp_path, capsys):
    inp = inputs
    model_args = lambda out, *x: ["--model", inp["model"], *args03(inp, out)[2:], *x]  # noqa: E731
    refused(capsys, cpt.main, model_args(inp["model"], "--overwrite"), [inp["model"]], "is the input --model")
    refused(capsys, cpt.main, args03(inp, inp["packed"], "--overwrite"), [inp["packed"]], "is the input --data")
    out = tmp_path / "run"
    refused(capsys, cpt.main, args03(inp, out, "--lr", "nan"), [inp["packed"]], "argument --lr: 'nan' is not a finite")
    refused(capsys, cpt.main, args03(inp, out, "--max-steps", 0), [], "argument --max-steps: '0' is not an integer")
    bad_override = args03(inp, out)
    bad_override[1] = "tiny-llama:hidden_size=abc"
    refused(capsys, cpt.main, bad_override, [], "expected int, got str")
    (tmp_path / "file").write_text("not a directory")
    refused(capsys, cpt.main, args03(inp, tmp_path / "file"), [tmp_path / "file"], "is not a directory")
    # a model without weights fails after every cheap check: the run directory was never created
    refused(capsys, cpt.main, ["--model", inp["no_weights"], *args03(inp, out)[2:]], [inp["no_weights"]],
            "has no model.safetensors")


def test_03_overwrite_with_a_bad_model_keeps_the_complete_run(inputs, complete_run, capsys):
    refused(capsys, cpt.main, ["--model", inputs["no_weights"], *args03(inputs, complete_run)[2:], "--overwrite"],
            [inputs["no_weights"], complete_run], "has no model.safetensors")


@pytest.mark.parametrize("victim", ["__0_0.distcp", "trainer_state.json", "rng_rank0.pt", ".metadata"])
def test_03_a_damaged_checkpoint_is_refused_naming_the_file(inputs, complete_run, tmp_path, capsys, victim):
    run = shutil.copytree(complete_run, tmp_path / "run")
    path = run / "checkpoints" / "step_00000002" / victim
    if victim == "__0_0.distcp":
        corrupt(path)  # 4 KiB of random bytes inside a shard
    else:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # truncated
    line = refused(capsys, cpt.main, args03(inputs, run, "--resume", "auto"), [run], f"{path} does not match")
    assert "--resume-fallback" in line
    refused(capsys, cpt.main, args03(inputs, tmp_path / "new", "--init-from", path.parent), [run],
            f"--init-from {path.parent} cannot be used: {path} does not match")


def test_03_resume_fallback_continues_from_the_previous_checkpoint_to_the_same_result(inputs, complete_run,
                                                                                        tmp_path, capsys):
    run = shutil.copytree(complete_run, tmp_path / "run")
    corrupt(run / "checkpoints" / "step_00000002" / "__0_0.distcp")
    assert common.call_main(cpt.main, [str(a) for a in args03(inputs, run, "--resume", "auto",
                                                                 "--resume-fallback")]) == 0
    printed = capsys.readouterr().out
    assert f"skipping {run / 'checkpoints' / 'step_00000002'}" in printed
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1" in printed
    assert trajectory(run) == trajectory(complete_run)  # bitwise: losses and gradient norms of steps 1 and 2
    assert (run / "checkpoints" / "corrupt-step_00000002").is_dir()  # kept for inspection, never resumed
    from safetensors.torch import load_file

    a, b = load_file(run / "final" / "model.safetensors"), load_file(complete_run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_03_a_crafted_rng_file_runs_no_code(inputs, complete_run, tmp_path, capsys):
    """A crafted rng_rank0.pt whose unpickling would run a command (a pickle's classic attack). Its SHA256SUMS is
    rewritten as an attacker would; resuming refuses the file with one line and the command never runs."""
    run = shutil.copytree(complete_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step_00000002"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"python": Exploit()}, ckpt / "rng_rank0.pt")  # torch.save pickles: loading it unpickles
    safe_output.write_checksums(ckpt)
    refused(capsys, cpt.main, args03(inputs, run, "--resume", "auto"), [],
            f"{ckpt / 'rng_rank0.pt'} is not a longctx RNG state")
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------------------
# 04


def test_04_teacher_steps_text_and_the_error_after_a_progress_bar(inputs, tmp_path, capsys):
    inp, out = inputs, tmp_path / "sft"
    other = shutil.copytree(inp["model"], tmp_path / "teacher")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, vocab_size=config["vocab_size"] + 8)))
    refused(capsys, sft.main, args04(inp, out, "--teacher", other), [other, inp["model"]],
            f"--teacher {other} has a vocabulary of")
    refused(capsys, sft.main, args04(inp, out, "--teacher", tmp_path / "nope"), [], f"--teacher {tmp_path / 'nope'}")
    refused(capsys, sft.main, args04(inp, out, "--max-steps", 0), [], "argument --max-steps")
    refused(capsys, sft.main, args04(inp, other, "--overwrite", "--teacher", other), [other], "is the input --teacher")
    refused(capsys, sft.main, args04(inp, inp["model"], "--overwrite"), [inp["model"]], "is the input --model")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(Path(inp["chats"]).read_bytes().replace("é".encode(), b"\xe9", 1))
    refused(capsys, sft.main, args04(inp, out)[:2] + ["--data", bad] + args04(inp, out)[4:], [bad],
            "bad.jsonl (line 1) is not UTF-8 text: byte 0xe9")
    no_reply = tmp_path / "q.jsonl"
    no_reply.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Hi?"}]}) + "\n"
                                for _ in range(3)))
    # the render bar leaves its line open (\r): the error line still starts a line of its own (refused checks)
    refused(capsys, sft.main, args04(inp, out)[:2] + ["--data", no_reply] + args04(inp, out)[4:], [no_reply],
            "has an assistant turn")


# -------------------------------------------------------------------------------------------------------------
# 05 and 06


def test_05_ppl_data_text_and_json_and_an_output_inside_a_model(inputs, tmp_path, capsys):
    inp, out = inputs, tmp_path / "eval"
    base = ["--models", inp["model"], "--tasks", "ppl", "--seq-len", 64, "--ppl-docs", 1, "--out", out]
    (tmp_path / "doc.txt").write_bytes("ok ".encode() * 100 + b"\xff")
    refused(capsys, ev.main, base + ["--ppl-data", tmp_path / "doc.txt"], [tmp_path / "doc.txt"],
            "doc.txt is not UTF-8 text: byte 0xff at byte offset 300")
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n{"text": \n')
    refused(capsys, ev.main, base + ["--ppl-data", tmp_path / "docs.jsonl"], [tmp_path / "docs.jsonl"],
            f"{tmp_path / 'docs.jsonl'}:2 is not valid JSON")
    refused(capsys, ev.main, base[:-1] + [Path(inp["model"]) / "eval"], [inp["model"]],
            "lies inside the input --models")


def test_06_non_finite_weights_broken_configs_and_inputs_as_output(inputs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    inp, out = inputs, tmp_path / "soup"
    a = inp["model"]
    for value in ("nan", "inf"):
        refused(capsys, merge.main, ["--models", a, a, "--weights", value, 1, "--out", out], [a],
                f"argument --weights: '{value}' is not a finite number")
    nan = shutil.copytree(a, tmp_path / "nan-model")
    state = load_file(nan / "model.safetensors")
    name = sorted(state)[3]
    state[name][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, merge.main, ["--models", a, nan, "--out", out], [a, nan],
            f"the merged {name} is not finite (NaN or inf: it is already in {nan})")
    broken = shutil.copytree(a, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    refused(capsys, merge.main, ["--models", broken, a, "--out", out], [broken], "config.json is not valid JSON")
    refused(capsys, merge.main, ["--models", a, nan, "--out", a, "--overwrite"], [a], "is the input --models")


# -------------------------------------------------------------------------------------------------------------
# Every stage: an --out nobody may write, and a disk that fills up while writing.


def stage_cases(inp, out):
    return {
        "01": (prep.main, args01(inp, out)),
        "02": (scale.main, ["--model", inp["model"], "--method", "yarn", "--factor", 4, "--copy-weights",
                            "--out", out]),
        "03": (cpt.main, args03(inp, out, "--max-steps", 1)),
        "04": (sft.main, args04(inp, out, "--save-every", 1)),
        "05": (ev.main, ["--models", inp["model"], "--tasks", "ppl", "--seq-len", 64, "--ppl-docs", 1, "--ppl-data",
                         inp["corpus"], "--out", out]),
        "06": (merge.main, ["--models", inp["model"], inp["model"], "--out", out]),
    }


@pytest.mark.parametrize("stage", ["01", "02", "03", "04", "05", "06"])
def test_every_stage_refuses_a_read_only_out_before_any_work(inputs, tmp_path, capsys, stage):
    if os.geteuid() == 0:
        place = mounted_tmpfs(tmp_path / "ro", "ro,size=64k")
    else:  # without root, a directory this user may not write to
        place = contextlib.nullcontext((tmp_path / "ro"))
        (tmp_path / "ro").mkdir(mode=0o555)
    with place as ro:
        main, argv = stage_cases(inputs, ro / "out")[stage]
        line = refused(capsys, main, argv, [inputs["model"]], "cannot write --out")
        assert "read-only filesystem" in line or "no permission" in line


@pytest.mark.parametrize("stage", ["01", "02", "03", "04", "05", "06"])
def test_every_stage_on_a_full_disk_says_no_space_and_leaves_nothing(inputs, tmp_path, capsys, stage):
    with mounted_tmpfs(tmp_path / "small", "size=16k") as small:
        main, argv = stage_cases(inputs, small / "out")[stage]
        refused(capsys, main, argv, [inputs["model"], inputs["corpus"]],
                f"cannot write {small / 'out'}: no space left on the device; free space there or choose another")
        assert list(small.iterdir()) == []
