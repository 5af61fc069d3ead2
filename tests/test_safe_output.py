"""safe_output.py and the input side of common.py: atomic outputs that put the old one back on failure, the
input/output overlap rule, the lock, what a dead process leaves, the umask, refused writes as one line,
SHA256SUMS (checked against coreutils' own `sha256sum -c`), run directories; text decoding with byte offsets,
numbers checked at parsing, and the error line that starts a line of its own after a progress bar."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import common
import safe_output
from lc_testutil import ROOT


def dead_pid() -> int:
    """The pid of a process that has just ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftover(out: Path, kind: str, pid: int) -> Path:
    path = out.parent / f".{out.name}.{kind}-{safe_output.HOST}-{pid}-0123abcd"
    path.mkdir()
    return path


def test_output_appears_only_when_complete_and_a_failed_overwrite_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    with safe_output.output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not out.exists()  # nothing visible until complete
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(common.UserError, match="already exists"):
        safe_output.check_output(out)
    with pytest.raises(common.UserError, match="boom"):
        with safe_output.output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half-written")
            common.fail("boom")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory, aside or lock left
    with safe_output.output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    model = tmp_path / "runs" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out, relation in ((model, "is"), (tmp_path / "runs", "contains"), (model / "eval", "lies inside")):
        with pytest.raises(common.UserError, match=f"--out {out} {relation} the input --model"):
            safe_output.check_output(out, {"--model": str(model), "--data": ["hub/name", None]}, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(model)  # the same directory by another name
    with pytest.raises(common.UserError, match="is the input"):
        safe_output.check_output(link, {"--model": str(model)}, overwrite=True)
    assert safe_output.check_output(tmp_path / "elsewhere", {"--model": str(model)}) == tmp_path / "elsewhere"
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="is not a directory"):
        safe_output.check_output(tmp_path / "file", overwrite=True)
    with pytest.raises(common.UserError, match="is a file, not a directory"):
        safe_output.check_output(tmp_path / "file" / "sub")


def test_a_second_writer_fails_at_once_and_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "new" / "out"
    with safe_output.OutputLock(out):
        with pytest.raises(common.UserError, match=f"being written by host .* pid {os.getpid()}"):
            with safe_output.OutputLock(out):
                pass
    assert not (tmp_path / "new").exists()  # the lock file and the directory made for it are gone
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import safe_output\n"
            f"safe_output.OutputLock(safe_output.Path({str(out)!r})).__enter__(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(common.UserError, match=f"pid {holder.pid}"):
            with safe_output.output_dir(out):
                pass
        holder.kill()  # kill -9: the kernel drops its flock
        holder.wait()
        with safe_output.output_dir(out) as tmp:
            (tmp / "x").write_text("x")
    finally:
        holder.kill()
    assert (out / "x").is_file()


def test_leftovers_of_dead_processes_are_cleaned_and_an_interrupted_replacement_undone(tmp_path):
    out = tmp_path / "out"
    stale = leftover(out, "tmp", dead_pid())  # a temporary output of a killed writer
    mine = leftover(out, "tmp", os.getpid())  # a live process's: not touched
    aside = leftover(out, "old", dead_pid())  # killed between moving the old output aside and renaming the new in
    (aside / "previous").mkdir()
    (aside / "previous" / "keep.txt").write_text("old")
    safe_output.clean_leftovers(out)
    assert (out / "keep.txt").read_text() == "old" and not stale.exists() and not aside.exists() and mine.exists()
    pending = leftover(out, "old", dead_pid())  # a run replacing `out` was killed before it completed
    shutil.move(str(out), str(pending / "previous"))
    (pending / safe_output.PENDING).touch()
    out.mkdir()
    (out / "half.txt").write_text("unfinished")
    safe_output.clean_leftovers(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not pending.exists()


def test_outputs_honour_the_umask_even_for_files_a_library_makes_private(tmp_path):
    from safetensors.torch import save_file
    import torch

    private_input = tmp_path / "input.safetensors"
    save_file({"w": torch.zeros(2)}, str(private_input))
    assert private_input.stat().st_mode & 0o777 == 0o600
    old = os.umask(0o027)
    try:
        with safe_output.output_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            common.atomic_write_text(tmp / "config.json", "{}")
            (tmp / "linked.safetensors").hardlink_to(private_input)  # 02's hard-linked weights: the input's mode
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert modes == {"model.safetensors": 0o640, "config.json": 0o640, "linked.safetensors": 0o600}
    assert private_input.stat().st_mode & 0o777 == 0o600  # the input is not touched


def test_a_refused_write_is_one_line_naming_the_path_and_what_is_missing(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/inputs/model.safetensors", None, str(tmp_path / "x"))
    assert safe_output.write_failure(full, tmp_path) == (f"cannot write {tmp_path}: no space left on the device; "
                                                         "free space there or choose another --out")
    denied = PermissionError(errno.EACCES, "Permission denied", "/inputs/model.safetensors", None, "/out/x")
    assert safe_output.write_failure(denied, tmp_path).startswith("cannot write /out/x: permission denied")
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 30, message: \"Read-only file system\" })")
    assert "the filesystem is read-only; choose an --out you may write to" in safe_output.write_failure(
        wrapped, tmp_path)
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/x/y")
        except PermissionError as exc:
            raise RuntimeError("save failed") from exc
    except RuntimeError as exc:
        assert safe_output.write_failure(exc, tmp_path).startswith("cannot write /x/y: permission denied")
    assert safe_output.write_failure(ValueError("a bug"), tmp_path) is None
    assert safe_output.write_failure(common.UserError("No space left on device"), tmp_path) is None


def test_a_filesystem_without_flock_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(safe_output.fcntl, "flock", no_flock)
    out = tmp_path / "new" / "out"
    with pytest.raises(common.UserError, match=r"cannot lock .*\.out\.lock: Function not implemented; .*-o flock"):
        with safe_output.output_dir(out):
            pass
    assert not (tmp_path / "new").exists()


def test_checksums_match_coreutils_and_name_the_changed_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(5000))
    (tmp_path / "sub" / "b.txt").write_text("text")
    safe_output.write_checksums(tmp_path)
    assert safe_output.verify_checksums(tmp_path) is None
    if shutil.which("sha256sum"):  # an independent reference: coreutils reads and checks the same file
        subprocess.run(["sha256sum", "--quiet", "-c", safe_output.CHECKSUMS], cwd=tmp_path, check=True)
    with open(tmp_path / "a.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\0" if f.read(1) != b"\0" else b"\1")
    assert "a.bin does not match" in safe_output.verify_checksums(tmp_path)
    assert safe_output.verify_checksums(tmp_path, ["sub/b.txt"]) is None  # a share of the files
    (tmp_path / "sub" / "b.txt").unlink()
    assert "b.txt is missing" in safe_output.verify_checksums(tmp_path, ["sub/b.txt"])
    (tmp_path / safe_output.CHECKSUMS).write_text("garbage\n")
    assert "missing or unreadable" in safe_output.verify_checksums(tmp_path)


def test_run_dir_is_made_late_and_undone_unless_it_holds_something_worth_keeping(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(common.UserError, match="bad model"):
        with safe_output.RunDir(out) as run:
            common.fail("bad model")  # before create: nothing was made
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(common.UserError, match="nan"):
        with safe_output.RunDir(out) as run:
            run.create({"run.json": "{}"})
            common.fail("nan at step 1")  # a fresh start that saved nothing: removed
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(common.UserError):
        with safe_output.RunDir(out, keep_if=lambda o: (o / "ckpt").exists()) as run:
            run.create({"run.json": "{}"})
            (out / "ckpt").mkdir()
            common.fail("nan at step 9")  # it saved a checkpoint: kept, to resume
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "run.json"]
    with pytest.raises(common.UserError):
        with safe_output.RunDir(out, overwrite=True) as run:
            run.create({"run.json": "new"})
            assert (out / "run.json").read_text() == "new"
            common.fail("the new run failed")  # --overwrite: the old run comes back
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "run.json"]
    assert (out / "run.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with safe_output.RunDir(out, overwrite=True) as run:
        run.create({"run.json": "new"})
    assert [p.name for p in out.iterdir()] == ["run.json"] and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_decoding_names_the_file_and_byte_offset_unless_replace(tmp_path):
    import gzip

    data = "line one\r\ncafé \xe9\n".encode("utf-8") + b"bad \xff byte\n"
    path = tmp_path / "t.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    offset = data.index(b"\xff")
    with pytest.raises(common.UserError, match=rf"t.txt.gz \(line 3\) is not UTF-8 text: byte 0xff at byte offset "
                                               rf"{offset} .* --encoding-errors replace"):
        list(common.text_lines(path))
    lines = [line for _, line in common.text_lines(path, "replace")]
    assert lines == ["line one\n", "café é\n", "bad \ufffd byte\n"]
    with pytest.raises(common.UserError, match=f"byte offset {offset} "):
        common.read_text(path)
    (tmp_path / "bad.json").write_text('{"a": 1,,}')
    with pytest.raises(common.UserError, match=r"bad.json is not valid JSON \(.* at line 1, column 9\)"):
        common.read_json(tmp_path / "bad.json")


def test_numbers_are_checked_as_they_are_parsed_and_a_bad_command_line_is_one_line(capsys):
    parser = common.ArgumentParser(prog="stage.py")
    parser.add_argument("--lr", type=common.number(above=0))
    parser.add_argument("--steps", type=common.number(int, min=1))
    parser.add_argument("--ratio", type=common.number(min=0, max=1))
    assert vars(parser.parse_args(["--lr", "1e-5", "--steps", "3", "--ratio", "1"])) == {"lr": 1e-5, "steps": 3,
                                                                                         "ratio": 1.0}
    for argv, message in ((["--lr", "nan"], "'nan' is not a finite number > 0"), (["--lr", "inf"], "'inf'"),
                          (["--lr", "0"], "> 0"), (["--steps", "0"], "'0' is not an integer >= 1"),
                          (["--steps", "2.5"], "integer"), (["--ratio", "1.5"], "<= 1"), (["--nope"], "unrecognized")):
        with pytest.raises(common.UserError, match=message):
            parser.parse_args(argv)

    def main(argv):
        sys.stderr.write("render: 3 conv\r")  # what a progress bar leaves: its line still open
        parser.parse_args(argv)

    assert common.call_main(main, ["--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.split("\n")[1] == "error: argument --lr: '-1' is not a finite number > 0 (see stage.py --help)"
