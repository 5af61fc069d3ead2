"""recipes/*.sh: with DRY_RUN=1 every recipe prints its plan and the exact stage commands, runs nothing and exits 0;
the plan's numbers equal the published recipe arithmetic (docs/recipes.md, computed here independently); every command
parses with its stage's own argument parser (flags, types, choices and cross-flag rules), and every flag written in
a recipe shows up in some printed command, so no recipe can rot as the stages change. A real run (DRY_RUN=0) runs
exactly the printed commands, skipping the stages already finished."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from lc_testutil import ROOT, load_script

import fsdp_train

# Optional flags, set so that their branches are printed (and so parsed) too.
OPTIONAL = {"LM_EVAL_TASKS": "bbh", "EVAL_EXTRA": "--limit 100"}
M = 2**20


def run_recipe(recipe: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """bash recipes/RECIPE with only PATH and HOME from the caller (a stray STEPS or LR must not leak in)."""
    full = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(ROOT / "recipes" / recipe)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def dry_run(recipe: str, **env) -> subprocess.CompletedProcess:
    return run_recipe(recipe, DRY_RUN=1, **{**OPTIONAL, **env})


def plans(stdout: str) -> list[dict]:
    """The numbers of every `plan:` block."""
    out = []
    for block in stdout.split("plan: ")[1:]:
        def num(label, block=block):
            return int(re.search(rf"^  {label}\s+([\d,]+)", block, re.M).group(1).replace(",", ""))

        accum = {int(g): (None if a == "refused" else int(a))
                 for g, a in re.findall(r"^\s+(\d+)\s+(\d+|refused)\b", block, re.M)}
        published = re.search(r"^  GPU-hours, published\s+([\d,]+) =", block, re.M)
        measured = re.search(r"^  GPU-hours, measured\s+([\d,]+) at", block, re.M)
        out.append({"title": block.splitlines()[0], "tokens_per_step": num("tokens per step"),
                    "steps": num("steps"), "total": num("tokens in total"), "accum": accum, "text": block,
                    "published_hours": int(published.group(1).replace(",", "")) if published else None,
                    "measured_hours": int(measured.group(1).replace(",", "")) if measured else None})
    return out


def commands(stdout: str) -> list[tuple[str, list[str], list[str]]]:
    """(stage, launcher words, stage argv) of every printed `+ ...` command line."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            i = next(k for k, w in enumerate(words) if re.fullmatch(r"0[1-6]_\w+\.py", os.path.basename(w)))
            out.append((os.path.basename(words[i])[:-3], words[:i], words[i + 1:]))
    return out


def parse(stage: str, argv: list[str]):
    """The stage's own parse_args on argv; a SystemExit (unknown flag, bad value, broken rule) fails the test."""
    try:
        return load_script(stage).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{stage} rejects the recipe's arguments (exit {exc.code}): {shlex.join(argv)}")


# recipe file, environment, and the stages it calls in order
CASES = {
    "prolong_64k": ("prolong_64k.sh", {}, ["01", "01", "02", "03", "05"]),
    "prolong_64k_released": ("prolong_64k.sh", {"PROLONG_DATA": "data/prolong-data-64K", "DATA_SHARDS": 3},
                             ["01", "01", "01", "01", "02", "03", "05"]),
    "prolong_512k": ("prolong_512k.sh", {}, ["01", "01", "02", "03", "05"]),
    "prolong_sft": ("prolong_sft.sh", {}, ["04", "05"]),
    "ultralong_1m": ("ultralong.sh", {"TARGET": "1m"}, ["01", "02", "03", "04", "05"]),
    "ultralong_2m": ("ultralong.sh", {"TARGET": "2m"}, ["01", "02", "03", "04", "05"]),
    "ultralong_4m": ("ultralong.sh", {"TARGET": "4m"}, ["01", "02", "03", "04", "05"]),
    "afm_64k": ("afm_64k.sh", {}, ["01", "01", "02", "03", "03", "06", "04", "06", "05"]),
    "smollm2_32k": ("smollm2_32k.sh", {}, ["01", "02", "03", "05"]),
}


@pytest.fixture(scope="module")
def runs():
    """Every recipe's dry run, once."""
    return {name: dry_run(recipe, **env) for name, (recipe, env, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_prints_plan_and_commands_in_order(runs, name):
    proc = runs[name]
    assert proc.returncode == 0, proc.stderr
    assert "plan: " in proc.stdout and "GPU-hours, measured" in proc.stdout
    stages = [stage[:2] for stage, _, _ in commands(proc.stdout)]
    assert stages == CASES[name][2]
    for stage, launcher, _ in commands(proc.stdout):  # the trainers run under torchrun
        assert ("torch.distributed.run" in launcher or "torchrun" in launcher) == (stage[:2] in ("03", "04"))


@pytest.mark.parametrize("name", list(CASES))
def test_every_command_parses_and_every_flag_is_exercised(runs, name):
    printed = set()
    for stage, _, argv in commands(runs[name].stdout):
        parse(stage, argv)
        printed |= {w.split("=")[0] for w in argv if w.startswith("--")}
    plan_flags = set(load_plan_flags())
    source = (ROOT / "recipes" / CASES[name][0]).read_text()
    code = "\n".join(line.split(" #")[0] for line in source.splitlines() if not line.lstrip().startswith("#"))
    written = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", code))
    assert written - printed - plan_flags == set(), "flags in the recipe that no printed command carries"


def load_plan():
    spec = importlib.util.spec_from_file_location("longctx_recipes_plan", ROOT / "recipes" / "plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    return plan


def load_plan_flags() -> list[str]:
    return [s for action in load_plan().build_parser()._actions for s in action.option_strings]


def test_plan_usage_keeps_its_line_breaks():
    """The example command's backslashes stay in plan.py's docstring (a lone one in the source joins the lines)."""
    doc = load_plan().__doc__
    assert "--seq-len 65536 \\\n        --batch-tokens" in doc
    assert [line for line in doc.splitlines() if re.search(r"\S {4,}--", line)] == []


PROLONG_64K_SHARES = {"code": .3, "books": .3, "fineweb-edu": .1, "fineweb": .1, "stackexchange": .04,
                      "wikipedia": .04, "tulu-v2": .03, "arxiv": .03, "openwebmath": .03, "textbooks": .03}
prep = load_script("01_prepare_data")


def stage_args(proc, prefix):
    return [parse(stage, argv) for stage, _, argv in commands(proc.stdout) if stage.startswith(prefix)]


def test_prolong_arithmetic(runs):
    # stage 1: bsz 64 x 64K, 5000 steps, "20B" tokens, 2.2K H100-hours per 20B (Table 9); accumulation
    # bsz / seq / GPUs as train_64K.sh derives it
    p64, = plans(runs["prolong_64k"].stdout)
    assert p64["tokens_per_step"] == 64 * 65536 and p64["steps"] == 5000
    assert p64["total"] == 64 * 65536 * 5000 and abs(p64["total"] / 20e9 - 1) < 0.05
    assert p64["accum"][8] == 64 // 8 and p64["accum"][64] == 1
    assert p64["published_hours"] == round(2200 * p64["total"] / 20e9)
    a03, = stage_args(runs["prolong_64k"], "03")
    assert (a03.lr, a03.min_lr_ratio, a03.warmup_ratio, a03.weight_decay, tuple(a03.betas), a03.doc_mask) == \
        (1e-5, 0.1, 0.1, 0.1, (0.9, 0.95), True)
    a02, = stage_args(runs["prolong_64k"], "02")
    preset = load_script("02_rope_scale").ROPE_PRESETS["prolong-64k"]
    assert (a02.method, a02.theta, a02.target_len) == (preset["method"], preset["theta"], preset["target_len"])
    a01, report = stage_args(runs["prolong_64k"], "01")
    specs = {s.name: s for s in prep.parse_source_specs(a01.data)}
    assert {n: s.weight for n, s in specs.items()} == PROLONG_64K_SHARES
    # long data: documents of >= 64K tokens, code and books only (App. A.2); the short mix unfiltered
    assert {n for n, s in specs.items() if s.min_tokens} == {"code", "books"} and specs["code"].min_tokens == 65536
    assert a01.max_tokens == p64["total"] and a01.boundary == "mask"
    assert report.merge_report == [os.path.dirname(a01.out)] == a03.data  # 03 reads the folder of shards
    # ProLong's released rows: the same shares over its MDS domain folders, prepared as 3 shards
    *shards, report = stage_args(runs["prolong_64k_released"], "01")
    assert [(a.num_shards, a.shard_index) for a in shards] == [(3, 0), (3, 1), (3, 2)]
    specs = {s.name: s for s in prep.parse_source_specs(shards[0].data)}
    assert {n: s.weight for n, s in specs.items()} == PROLONG_64K_SHARES
    assert {s.kind for s in specs.values()} == {"mds"} and specs["books"].location.endswith("/book-65536")

    # stage 2: bsz 128 x 512K / SP 8 = 8M tokens, 2500 steps, 12.2K H100-hours per 20B; Ulysses over 8 GPUs
    p512, = plans(runs["prolong_512k"].stdout)
    assert p512["tokens_per_step"] == 128 * 512 * 1024 // 8 and p512["steps"] == 2500
    assert abs(p512["total"] / 20e9 - 1) < 0.05
    assert p512["published_hours"] == round(12200 * p512["total"] / 20e9)
    a03b, = stage_args(runs["prolong_512k"], "03")
    assert a03b.cp == 8 and p512["accum"][8] == 16 and p512["accum"][64] == 2  # 16 rows over 8 / cp groups
    assert a03b.lr == 5e-6  # the released train_512K.sh (the paper says 1e-5): the file says which it uses
    assert "5e-6" in (ROOT / "recipes" / "prolong_512k.sh").read_text() and "1e-5" in \
        (ROOT / "recipes" / "prolong_512k.sh").read_text()
    a01b, _ = stage_args(runs["prolong_512k"], "01")
    ranges = {s.name: (s.min_tokens, s.max_tokens) for s in prep.parse_source_specs(a01b.data) if s.min_tokens}
    assert ranges == {"code-512k": (524288, None), "books-512k": (524288, None), "code-64k": (65536, 524287),
                      "books-64k": (65536, 524287)}  # the 64K-class documents disjoint from the 512K ones
    a02b, = stage_args(runs["prolong_512k"], "02")
    assert a02b.theta == load_script("02_rope_scale").ROPE_PRESETS["prolong-512k"]["theta"]
    # the 512K stage continues the 64K run's LAST checkpoint, optimizer included, in 03's directory format
    ckpt = a03b.init_from
    assert a03b.keep_optimizer and os.path.dirname(ckpt) == os.path.join(a03.out, "checkpoints")
    assert fsdp_train.CKPT_RE.match(os.path.basename(ckpt)).group(1) == f"{a03.max_steps:08d}"
    assert a03.final_checkpoint
    assert a02b.model == os.path.join(a03.out, "final")

    # SFT: 64 x 64K x 250 steps ~ 1B tokens, LR 2e-5, 5% warmup, of the 512K model
    psft, = plans(runs["prolong_sft"].stdout)
    assert psft["tokens_per_step"] == 64 * 65536 and psft["steps"] == 250 and abs(psft["total"] / 1e9 - 1) < 0.05
    a04, = stage_args(runs["prolong_sft"], "04")
    assert (a04.lr, a04.warmup_ratio, a04.seq_len, a04.teacher) == (2e-5, 0.05, 65536, None)
    assert a04.model == os.path.join(a03b.out, "final")


@pytest.mark.parametrize("name,cp,length", [("prolong_64k", 1, 65536), ("prolong_512k", 8, 524288)])
def test_fit_plan_chooses_the_recipes_cp(runs, name, cp, length):
    """The fit planner (memory_plan.py) alone finds what ProLong found on 8 x 80 GB: 64K without sequence
    parallelism, 512K only with it (cp 4 already fits; ProLong ran 8), both with full activation checkpointing
    and no offload; the recipe's longest row is at least its rows."""
    a03, = stage_args(runs[name], "03")
    fit = re.search(r"^  fit: cp (\d+), 1 row\(s\)/micro-batch, AC every layer \(", runs[name].stdout, re.M)
    assert fit and a03.cp == cp and (int(fit.group(1)) == 1) == (cp == 1) and int(fit.group(1)) <= cp
    longest = re.search(r"^    this setting +([\d,]+) tokens", runs[name].stdout, re.M)
    assert longest and int(longest.group(1).replace(",", "")) >= length


def test_fit_plan_offers_each_stage_only_its_own_flags(runs):
    """A plan for 04 names only settings 04 has flags for (no --cp, --ac-every, --tiled-mlp or
    --offload-activations: it checkpoints every layer or none, and may put its states on the host); a plan for 03
    offers all of them. Every setting the fit table lists and every longest-row line is checked."""
    fit_tables = {"03": 0, "04": 0}
    for name in CASES:
        for plan in plans(runs[name].stdout):
            settings = re.findall(r"^  (cp \d+, .*?)  +[\d.]+ ", plan["text"], re.M)
            longest = re.findall(r"^    with (.+?)  +(?:[\d,]+ tokens|does not fit)$", plan["text"], re.M)
            stage = plan["title"][:2]
            fit_tables[stage] += bool(settings)
            if stage == "04" and settings:
                assert all(s.startswith("cp 1,") and ("no AC" in s or s.endswith("AC every layer"))
                           for s in settings), (name, settings)
                assert longest == ["cpu-offload"], (name, longest)
            elif stage == "03" and settings:
                assert {"tiled MLP", "offload", "cpu-offload"} <= set(longest), (name, longest)
    assert fit_tables["03"] and fit_tables["04"], fit_tables  # both kinds were seen


@pytest.mark.parametrize("target,length,sft_steps", [("1m", M, 480), ("2m", 2 * M, 140), ("4m", 4 * M, 150)])
def test_ultralong_arithmetic(runs, target, length, sft_steps):
    proc = runs[f"ultralong_{target}"]
    cpt, sft = plans(proc.stdout)
    assert cpt["tokens_per_step"] == 2 * 4 * M  # the 4M card: global batch 2 x 4M
    if target == "4m":
        assert cpt["steps"] == 150  # the 4M card: 150 iterations, ~1.26B tokens
        assert abs(cpt["total"] / 1.26e9 - 1) < 0.01
    else:
        assert abs(cpt["total"] / 1e9 - 1) < 0.05  # the paper's 1B tokens
    assert sft["steps"] == sft_steps and sft["tokens_per_step"] == 128 * 8192  # 128 rows of < 8K [S]
    a01, = stage_args(proc, "01")
    assert (a01.boundary, a01.separator, a01.seq_len) == ("separator", "<s>", length)
    assert (a01.short_doc_tokens, a01.long_doc_tokens) == (4096, 8192)
    assert abs(sum(float(s.rsplit("@", 1)[1]) for s in a01.data) - 1) < 1e-9
    a02, = stage_args(proc, "02")
    preset = load_script("02_rope_scale").ROPE_PRESETS[f"ultralong-{target}"]
    assert a02.method == "yarn" and a02.factor == preset["published_factor"] == length / 8192
    assert (a02.beta_fast, a02.beta_slow, a02.target_len) == (preset["beta_fast"], preset["beta_slow"], length)
    a03, = stage_args(proc, "03")
    assert a03.lr == 3e-5 and not a03.doc_mask
    assert cpt["accum"].get(a03.cp) == cpt["tokens_per_step"] // length  # one data-parallel group
    a04, = stage_args(proc, "04")
    assert (a04.lr, a04.max_tokens, a04.max_steps) == (5e-6, 8192, sft_steps)


def test_afm_reconstruction(runs):
    proc = runs["afm_64k"]
    cpt, _ = plans(proc.stdout)
    a03 = stage_args(proc, "03")
    assert cpt["total"] == len(a03) * a03[0].max_steps * a03[0].batch_tokens
    assert len({a.seed for a in a03}) == len(a03)  # different runs, not copies
    assert "700 in total" in cpt["text"]  # ~700 H100-hours [S], printed as published
    a02, = stage_args(proc, "02")
    preset = load_script("02_rope_scale").ROPE_PRESETS["afm-64k"]
    assert (a02.method, a02.factor, a02.target_len, a02.beta_fast, a02.beta_slow, a02.mscale) == \
        ("yarn", preset["factor"], preset["target_len"], preset["beta_fast"], preset["beta_slow"], preset["mscale"])
    soup, final = stage_args(proc, "06")
    assert sorted(soup.models) == sorted(os.path.join(a.out, "final") for a in a03)
    a04, = stage_args(proc, "04")
    assert a04.model == soup.out and a04.teacher and (a04.alpha, a04.temperature) == (0.5, 2.0)
    assert final.models[0] == os.path.join(a04.out, "final")
    text = (ROOT / "recipes" / "afm_64k.sh").read_text()
    assert "[R]" in text and "[C" in text and "[S" in text  # reconstructed vs published, marked


def test_smollm2_32k_plan_is_one_gpu_yarn_x4_from_8k(runs):
    proc = runs["smollm2_32k"]
    p, = plans(proc.stdout)
    assert p["tokens_per_step"] == 8 * 32768 and p["total"] == 200 * 8 * 32768
    assert re.search(r"^\s+1\s+8\s+.*<- this launch", p["text"], re.M)  # one GPU, 8 rows accumulated
    a01, = stage_args(proc, "01")
    a02, = stage_args(proc, "02")
    a03, = stage_args(proc, "03")
    a05, = stage_args(proc, "05")
    assert (a02.method, a02.factor, a02.original_len) == ("yarn", 4.0, 8192) and a01.seq_len == 32768
    assert a03.batch_tokens == p["tokens_per_step"] and a03.max_steps == 200 and a03.data == [a01.out]
    assert a05.models == [a02.model, a02.out, os.path.join(a03.out, "final")]
    assert a05.lengths == "8192,16384,32768" and a05.allow_beyond_context


def test_a_real_run_runs_what_the_dry_run_prints_and_skips_finished_stages(tmp_path):
    """Not a dry run: lib.sh's `step` runs each stage command exactly as DRY_RUN=1 prints it, except the stages whose
    manifest.json exists (a recipe re-run after a failure resumes it). PY is a stand-in that records the commands
    it is given (the plan, recipes/plan.py --check, runs for real); every stage itself runs for real, chained, in
    the demo pipeline (tests/test_demo.py)."""
    run, log, fake = tmp_path / "run", tmp_path / "launched", tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\nif [[ $1 == recipes/plan.py ]]; then exec {shlex.quote(sys.executable)} "
                    f"\"$@\"; fi\nprintf '%s\\n' \"$(printf ' %q' \"$@\")\" >> {shlex.quote(str(log))}\n")
    fake.chmod(0o755)
    for finished in ("data", "cpt/final"):  # 01 and 03 had finished before the interruption; 02 and 05 had not
        (run / finished).mkdir(parents=True)
        (run / finished / "manifest.json").write_text("{}")
    proc = run_recipe("smollm2_32k.sh", PY=fake, RUN=run, **OPTIONAL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    printed = commands(proc.stdout)
    assert printed == commands(dry_run("smollm2_32k.sh", PY=fake, RUN=run).stdout)
    assert [stage for stage, _, _ in printed] == ["01_prepare_data", "02_rope_scale", "03_continued_pretrain",
                                                  "05_eval"]
    skipped = re.findall(r"^  \(skipped: (\S+) exists", proc.stdout, re.M)
    assert skipped == [str(run / "data" / "manifest.json"), str(run / "cpt" / "final" / "manifest.json")]
    launched = [shlex.split(line) for line in log.read_text().splitlines()]
    assert launched == [[*launcher[1:], stage + ".py", *argv] for stage, launcher, argv in printed
                        if stage in ("02_rope_scale", "05_eval")]  # the launcher's first word is PY itself
    assert sorted(p.name for p in run.iterdir()) == ["cpt", "data"]  # nothing else written


def test_measured_throughput_is_used_when_present(tmp_path):
    bench = tmp_path / "benchmarks.md"
    bench.write_text("| shape | seq len | mode | tokens/s | MFU (torchtitan) |\n|---|---|---|---|---|\n"
                     "| llama-3.1-8b | 65,536 | baseline | 9,999 | 1% |\n"
                     "| llama-3.1-8b | 65,536 | ours | OOM | | \n"
                     "| llama-3.1-8b:num_hidden_layers=4 | 65,536 | ours | 20,000 | 1% |\n"
                     "| llama-3.1-8b | 65,536 | ours | 3,000 | 40% |\n")
    proc = dry_run("prolong_64k.sh", BENCHMARKS=bench)
    assert proc.returncode == 0, proc.stderr
    p, = plans(proc.stdout)
    assert p["measured_hours"] == round(p["total"] / 3000 / 3600)
    default, = plans(dry_run("prolong_64k.sh").stdout)
    assert default["measured_hours"] is None and "no measured throughput for this shape yet" in default["text"]


def test_bad_target_and_indivisible_launch_are_refused(tmp_path):
    proc = dry_run("ultralong.sh", TARGET="8m")
    assert proc.returncode != 0 and "error: TARGET must be 1m, 2m or 4m" in proc.stderr
    # a real run (DRY_RUN=0) on 8 GPUs of a step that needs --cp 16: stopped by the plan before any stage runs
    proc = run_recipe("ultralong.sh", DRY_RUN=0, TARGET="2m", RUN=tmp_path / "run")
    assert proc.returncode == 2 and "error: 8 GPUs cannot run this step" in proc.stderr
    assert "+ " not in proc.stdout and not (tmp_path / "run").exists()


def test_readme_commands_parse():
    """The stage commands README.md gives (continuation lines joined) parse with each stage's own parser."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            stage = next((os.path.basename(w)[:-3] for w in words if re.fullmatch(r"0[1-6]_\w+\.py", w)), None)
            if stage:
                parse(stage, words[[os.path.basename(w) for w in words].index(stage + ".py") + 1:])
                found.append(stage[:2])
    assert found == ["01", "02", "03", "04", "06", "05"]
