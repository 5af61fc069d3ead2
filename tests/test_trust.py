"""A checkpoint or a data folder from someone else never runs code, never reads outside itself and never silently
costs a run; every number and name is checked where it is parsed. Each refusal is one `error:` line, a non-zero
exit, no traceback, nothing written and every input byte-identical (test_bad_input.refused); each crafted payload
would create a marker file if it were unpickled, and the marker never appears. Checkpoint files are crafted as
their author could: SHA256SUMS recomputed after the change. Variants that only the reader decides are checked
in-process; the command line runs once per family."""
import dataclasses
import io
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

import common
import fsdp_train
import mds
import safe_output
from lc_testutil import ROOT, load_script
from test_bad_input import args03, one_thread, refused, tree  # noqa: F401 (one_thread: its autouse fixture)
from test_mds import prolong_rows, write_prolong_folder
from test_slurm import FAKE_JOB, bash
from test_train import make_packed_data

prep, cpt, ev = (load_script(n) for n in ("01_prepare_data", "03_continued_pretrain", "05_eval"))
STEP1, STEP2 = "step_00000001", "step_00000002"


class Payload:
    """Unpickling this runs `touch MARKER` (pickle calls os.system): what a crafted file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """A finished 2-step 03 run with checkpoints at steps 1 and 2, and its inputs."""
    d = tmp_path_factory.mktemp("trust")
    inp = {"tok": tokenizer_dir, "packed": make_packed_data(d / "packed", seq_len=32, num_rows=8)}
    out = d / "run"
    assert common.call_main(cpt.main, [str(a) for a in args03(inp, out, "--no-export")]) == 0
    return inp, out


def copy_run(run, tmp_path) -> tuple[dict, Path, Path]:
    inp, out = run
    copy = shutil.copytree(out, tmp_path / "run", symlinks=True)
    return inp, copy, copy / "checkpoints"


def forge(ckpt: Path, change) -> Path:
    """`change(ckpt)`, then SHA256SUMS rewritten over every file, as whoever wrote the checkpoint could."""
    change(ckpt)
    safe_output.write_checksums(ckpt)
    return ckpt


def edit_metadata(ckpt: Path, change) -> None:
    md = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own file: plain pickle is fine here
    change(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def point_at(md, fqn: str, **fields) -> None:
    """Make every stored chunk of `fqn` read from other bytes (fields of DCP's _StorageInfo)."""
    for key, info in md.storage_data.items():
        if key.fqn == fqn:
            md.storage_data[key] = dataclasses.replace(info, **fields)


# -------------------------------------------------------------------------------------------------------------
# Code from a checkpoint: .metadata and the shard files are read without pickle's reach.


def test_crafted_dcp_metadata_runs_no_code_on_resume_or_init_from(run, tmp_path, capsys):
    inp, out, root = copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = forge(root / STEP2, lambda c: edit_metadata(c, lambda md: setattr(md, "planner_data", Payload(marker))))
    line = refused(capsys, cpt.main, args03(inp, out, "--resume", "auto"), [out, inp["packed"]],
                   f"{ckpt / '.metadata'} is not DCP metadata longctx reads (UnpicklingError: it names posix.system")
    assert "--resume-fallback" in line
    refused(capsys, cpt.main, args03(inp, tmp_path / "new", "--init-from", ckpt), [out],
            f"--init-from {ckpt} cannot be used: {ckpt / '.metadata'} is not DCP metadata")
    assert not marker.exists()


@pytest.mark.parametrize("fqn", ["optim.param_groups.0.lr", "model.model.norm.weight"])
def test_a_crafted_value_in_a_shard_runs_no_code(run, tmp_path, capsys, fqn):
    """A shard value replaced by a pickle that runs a command: the optimizer's plain values (which DCP's own
    planner reads with weights_only=False) and a tensor (DCP: weights_only=True)."""
    inp, out, root = copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)

    def plant(ckpt):
        shard = ckpt / "__0_0.distcp"
        at = shard.stat().st_size
        with open(shard, "ab") as f:
            f.write(payload.getvalue())
        edit_metadata(ckpt, lambda md: point_at(md, fqn, offset=at, length=len(payload.getvalue())))

    ckpt = forge(root / STEP2, plant)
    refused(capsys, cpt.main, args03(inp, out, "--resume", "auto"), [out], f"{ckpt} cannot be loaded")
    assert not marker.exists()


@pytest.mark.parametrize("change, expect", [
    (dict(relative_path="../step_00000001/__0_0.distcp"), "which is not one of the checkpoint's own shard files"),
    (dict(relative_path="/etc/passwd"), "which is not one of the checkpoint's own shard files"),
    (dict(relative_path="trainer_state.json"), "which is not one of the checkpoint's own shard files"),
    (dict(offset=1 << 40), "outside that file"),
    (dict(offset=-1), "outside that file"),
    (dict(transform_descriptors=["zstd"]), "through stream transforms"),
])
def test_metadata_that_points_outside_the_shards_is_refused(run, tmp_path, change, expect):
    ckpt = shutil.copytree(run[1] / "checkpoints" / STEP1, tmp_path / STEP1)
    forge(ckpt, lambda c: edit_metadata(c, lambda md: point_at(md, "model.model.norm.weight", **change)))
    assert expect in fsdp_train.checkpoint_problem(ckpt)


# -------------------------------------------------------------------------------------------------------------
# A checkpoint is complete or refused: its progress is never passed over, nothing in it goes unverified.


def test_a_checkpoint_without_sha256sums_is_refused_never_restarted_over(run, tmp_path, capsys):
    inp, out, root = copy_run(run, tmp_path)
    (root / STEP2 / safe_output.CHECKSUMS).unlink()
    line = refused(capsys, cpt.main, args03(inp, out, "--resume", "auto"), [out],
                   f"the latest checkpoint {root / STEP2} cannot be used: {root / STEP2 / 'SHA256SUMS'} is missing")
    assert "--resume-fallback" in line and "another --out" in line
    for step in (STEP1, STEP2):  # none verifies, each kept as corrupt-step_N by --resume-fallback: still refused
        os.rename(root / step, root / f"corrupt-{step}")
    with pytest.raises(common.UserError, match="none of the 2 checkpoint"):
        fsdp_train.latest_verified(root, fallback=True)


def test_a_forged_step_is_refused_not_resumed_past_the_end(run, tmp_path, capsys):
    """trainer_state.json says step 99,999,999 in a folder renamed to match, SHA256SUMS recomputed: before, the
    run 'resumed' past its last step and exported untrained weights with exit 0."""
    inp, out, root = copy_run(run, tmp_path)
    forged = root / "step_99999999"
    os.rename(root / STEP2, forged)

    def step(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps(dict(state, step=99999999, max_steps=99999999)))

    forge(forged, step)
    refused(capsys, cpt.main, args03(inp, out, "--resume", "auto"), [out], "says step 99999999, past this run's last "
            "step 2")


def unlisted(ckpt: Path) -> None:  # a shard dropped from SHA256SUMS, then damaged
    lines = (ckpt / "SHA256SUMS").read_text().splitlines()
    (ckpt / "SHA256SUMS").write_text("".join(ln + "\n" for ln in lines if not ln.endswith("__0_0.distcp")))
    with open(ckpt / "__0_0.distcp", "r+b") as f:
        f.write(os.urandom(256))


def set_state(**fields):
    def change(ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.update(fields)
        (ckpt / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if v != "drop"}))
        safe_output.write_checksums(ckpt)
    return change


def list_extra(name: str):
    def change(ckpt: Path) -> None:
        with open(ckpt / "SHA256SUMS", "a") as f:
            f.write(f"{'0' * 64}  {name}\n")
    return change


def fifo_sums(ckpt: Path) -> None:  # opening it to read would wait for a writer for ever
    (ckpt / "SHA256SUMS").unlink()
    os.mkfifo(ckpt / "SHA256SUMS")


@pytest.mark.parametrize("change, expect", [
    (unlisted, "__0_0.distcp is not listed in SHA256SUMS, so it cannot be verified"),
    (fifo_sums, "SHA256SUMS is missing or unreadable"),
    (lambda c: (c / "extra.bin").write_bytes(b"x"), "extra.bin is not listed in SHA256SUMS"),
    (list_extra("../step_00000002/__0_0.distcp"), "a path that leaves"),
    (list_extra("/etc/passwd"), "a path that leaves"),
    (lambda c: (c / "link").symlink_to("/etc/passwd"), "link is a link or a special file"),
    (lambda c: os.mkfifo(c / "fifo"), "fifo is a link or a special file"),
    (set_state(step=10**15), "says step 1000000000000000, but its folder is step_00000001"),
    (set_state(step=float("nan")), "missing or malformed: step"),
    (set_state(step=-1), "missing or malformed: step"),
    (set_state(world_size="drop", lr=float("inf")), "missing or malformed: world_size, lr"),
])
def test_every_gap_in_verification_is_named(run, tmp_path, change, expect):
    ckpt = shutil.copytree(run[1] / "checkpoints" / STEP1, tmp_path / STEP1)
    change(ckpt)
    assert expect in fsdp_train.checkpoint_problem(ckpt)


def test_an_unlisted_file_refuses_init_from(run, tmp_path, capsys):
    inp, out, root = copy_run(run, tmp_path)
    unlisted(root / STEP2)
    refused(capsys, cpt.main, args03(inp, tmp_path / "new", "--init-from", root / STEP2), [out],
            "__0_0.distcp is not listed in SHA256SUMS")


# -------------------------------------------------------------------------------------------------------------
# Data folders stay inside themselves; every malformed MDS index is one line.


@pytest.fixture(scope="module")
def mds_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mds")
    write_prolong_folder(root / "data", prolong_rows(6, 64, 200, 0, "x"))
    return root / "data"


def with_index(tmp_path, folder: Path, change) -> Path:
    """A copy of the MDS folder whose index.json passed through `change(index, copy)`."""
    copy = shutil.copytree(folder, tmp_path / "mds")
    index = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps(change(index, copy) or index))
    return copy


def shard(k: int, **fields):
    def change(index, copy):
        index["shards"][k].update(fields)
    return change


def outside_link(index, copy):
    name = index["shards"][0]["raw_data"]["basename"]
    shutil.copy(copy / name, copy.parent / "outside.mds")
    (copy / name).unlink()
    (copy / name).symlink_to(copy.parent / "outside.mds")


def basename(name: str):
    def change(index, copy):
        shutil.copy(copy / index["shards"][0]["raw_data"]["basename"], copy.parent / "outside.mds")
        index["shards"][0]["raw_data"]["basename"] = name.replace("DIR", str(copy.parent))
    return change


def fifo_shard(index, copy):
    os.mkfifo(copy / "pipe.mds")
    index["shards"][0]["raw_data"]["basename"] = "pipe.mds"


@pytest.mark.parametrize("change, expect", [
    (basename("../outside.mds"), "leaves the folder"),
    (basename("DIR/outside.mds"), "leaves the folder"),
    (outside_link, "outside"),
    (fifo_shard, "is not a regular file"),
    (shard(1, column_names=["domain", "spans", "input_ids", "length"]), "one folder holds one dataset's shards"),
    (shard(0, column_sizes=[None, None]), "one entry per column"),
    (shard(0, samples=10**20), "says it holds 100000000000000000000 samples"),
    (shard(0, samples=-3), "says it holds -3 samples"),
    (shard(0, samples="many"), "says it holds 'many' samples"),
    (shard(0, samples=0), "is not the file the index describes"),
    (shard(0, raw_data=None), "has no raw_data.basename"),
    (lambda index, copy: {"shards": {"a": 1}}, "has no list of shards"),
    (shard(0, column_encodings=["str", "ndarray:float128", "ndarray:uint32", "uint64"]), "is unknown"),
])
def test_a_malformed_or_escaping_mds_folder_is_one_line(mds_folder, tmp_path, change, expect):
    folder = with_index(tmp_path, mds_folder, change)
    before = tree(tmp_path)
    with pytest.raises(common.UserError) as refusal:
        mds.MDSDataset(folder)
    assert expect in str(refusal.value) and tree(tmp_path) == before


def test_an_unknown_dtype_code_in_a_value_is_one_line(mds_folder, tmp_path):
    """`ndarray` without a dtype: the dtype code is then the value's first byte (here a shape byte, no dtype)."""
    def no_dtype(index, copy):
        for s in index["shards"]:
            s["column_encodings"] = ["str", "ndarray:uint32", "ndarray", "uint64"]

    data = mds.MDSDataset(with_index(tmp_path, mds_folder, no_dtype))
    with pytest.raises(common.UserError, match="is not a valid 'ndarray' value"):
        data.tokens(0)
    data.close()


def test_01_reads_no_shard_outside_the_folder(mds_folder, tmp_path, tokenizer_dir, capsys):
    folder = with_index(tmp_path, mds_folder, basename("../outside.mds"))
    refused(capsys, prep.main, ["--data", f"mds:{folder}", "--seq-len", 64, "--tokenizer", tokenizer_dir, "--out",
                                tmp_path / "out"], [folder, tmp_path / "outside.mds"], "leaves the folder")


# -------------------------------------------------------------------------------------------------------------
# Silent wrong output, numbers, special files, schemas.


def test_an_init_config_typo_is_refused_with_the_closest_key(run, tmp_path, capsys):
    argv = args03(run[0], tmp_path / "new")
    argv[1] = "tiny-llama:num_hiden_layers=24"
    refused(capsys, cpt.main, argv, [run[0]["packed"]], "LlamaConfig has no key 'num_hiden_layers'; did you mean "
            "'num_hidden_layers'?")


def test_overflowing_numbers_are_one_line_where_parsed(tiny_llama_dir, tokenizer_dir, tmp_path, capsys):
    refused(capsys, ev.main, ["--models", tiny_llama_dir, "--tasks", "niah", "--lengths", "1k,1e400", "--out",
                              tmp_path / "eval"], [tiny_llama_dir], "--lengths: '1e400' is not a whole number")
    refused(capsys, ev.main, ["--models", tiny_llama_dir, "--tasks", "niah", "--depths", "nan", "--out",
                              tmp_path / "eval"], [tiny_llama_dir], "--depths 'nan' must be percents")
    refused(capsys, prep.main, ["--tokenizer", tokenizer_dir, "--seq-len", 64, "--max-tokens", "1e400", "--out",
                                tmp_path / "data"], [], "argument --max-tokens: not a count: '1e400'")
    refused(capsys, prep.main, ["--tokenizer", tokenizer_dir, "--seq-len", 64, "--seed", 2**64, "--out",
                                tmp_path / "data"], [], "argument --seed")


def test_a_fifo_as_data_is_refused_before_it_is_opened(tokenizer_dir, tmp_path, capsys):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)

    def unblock():  # should the check ever go, a writer lets the blocked reader see EOF: a failure, not a hang
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    watchdog = threading.Timer(20, unblock)
    watchdog.start()
    try:
        refused(capsys, prep.main, ["--data", fifo, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--out",
                                    tmp_path / "data"], [], f"{fifo} is a FIFO (named pipe), not a regular file")
    finally:
        watchdog.cancel()
    with pytest.raises(common.UserError, match="/dev/null is a character device"):
        list(common.text_lines("/dev/null"))


def test_a_malformed_published_results_file_is_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    original = ev.PUBLISHED.read_text()
    published = json.loads(original)
    assert ev.published_problem(published) is None  # every entry the file holds now, HELMET's included
    published["recipes"]["prolong"]["results"][0]["score"] = "high"
    del published["recipes"]["afm"]["results"][3]["measured_as"]["lengths"]  # a NIAH cell without lengths
    bad = tmp_path / "published_results.json"
    bad.write_text(json.dumps(published))
    monkeypatch.setattr(ev, "PUBLISHED", bad)
    refused(capsys, ev.main, ["--models", tiny_llama_dir, "--tasks", "ppl", "--compare-published", "prolong", "--out",
                              tmp_path / "eval"], [bad], "result 0 of recipe 'prolong' has a missing or malformed "
            "score")
    published["recipes"]["prolong"]["results"][0]["score"] = 71.9
    assert "result 3 of recipe 'afm'" in ev.published_problem(published)
    # a HELMET cell is averaged over exactly its lengths: without them it is malformed, not a KeyError in the report
    published = json.loads(original)
    helmet_recall = published["recipes"]["prolong"]["results"][6]
    assert helmet_recall["measured_as"]["metric"] == "HELMET Recall"
    helmet_recall["measured_as"] = {"metric": "HELMET Recall", "up_to": 131072}
    assert "result 6 of recipe 'prolong' has a missing or malformed measured_as" in ev.published_problem(published)


@pytest.mark.parametrize("env, expect", [
    ({"SLURM_NNODES": "4x"}, "SLURM_NNODES=4x is not a whole number >= 1"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID=4 is not a whole number from 0 to 3"),
    ({"SLURM_NODEID": "-1"}, "SLURM_NODEID=-1 is not a whole number from 0 to 3"),
    ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
    ({"MASTER_ADDR": "a b"}, "MASTER_ADDR='a b' is not a host name"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a whole number from 1 to 65535"),
])
def test_slurm_node_launch_names_the_bad_variable(env, expect):
    proc = bash("--node", "03_continued_pretrain.py", env={**FAKE_JOB, "SLURM_NODEID": "2", "DRY_RUN": "1", **env})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1 and lines[0].startswith(f"error: {expect}")


def test_slurm_batch_script_outside_a_job_is_one_line(tmp_path):
    env = {k: v for k, v in FAKE_JOB.items() if k not in ("SLURM_JOB_ID", "MASTER_ADDR")}
    recipe = ROOT / "recipes" / "tiny_demo.sh"
    for missing, expect in (({}, "SLURM_JOB_ID is not set"), ({"SLURM_JOB_ID": "7"}, "SLURM_JOB_NODELIST is not set")):
        proc = bash(recipe, env={**env, **missing, "LOG_DIR": str(tmp_path / "logs")})
        assert proc.returncode == 2 and proc.stderr == f"error: {expect}; run this through sbatch " \
            "recipes/slurm.sbatch RECIPE (SLURM sets it)\n" and proc.stdout == ""
    for bad in ("SLURM_GPUS_ON_NODE", "GPUS_PER_NODE", "MASTER_PORT"):  # optional, but a count when set
        proc = bash(recipe, env={**FAKE_JOB, bad: "8x", "LOG_DIR": str(tmp_path / "logs")})
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == f"error: {bad}=8x is not a whole " \
            "number from 1 to 65535; check the job's environment\n"
    assert not (tmp_path / "logs").exists()
