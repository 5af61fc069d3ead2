"""Outputs that never cost a user their data: the rule every stage's --out follows, in one place.

- Refused before anything is touched: an --out that is, contains or lies inside an input (a model, data, a
  teacher, a tokenizer, a checkpoint), an --out that exists without --overwrite or is not a directory, an --out
  on a read-only filesystem or in a directory this user may not write to (`check_output`).
- One writer per --out: a lock file beside it (`.NAME.lock`, flock) makes a second writer fail at once, naming
  the first; the kernel drops the lock when its process dies, however it dies (`OutputLock`).
- Atomic outputs (`output_dir`: 01, 02, 05, 06, a training run's final model): written in a temporary directory
  beside --out and renamed into place when complete. With --overwrite the old output is moved aside and deleted
  only once the new one is in place; a failure removes the new one and leaves the old one where it was.
- Training run directories (`RunDir`: 03, 04): created only once every check passed; a start that fails before
  its first checkpoint leaves nothing behind; with --overwrite the old run is moved aside, deleted when the new
  run ends in order (finished, or stopped by a signal with its checkpoint saved), put back when it fails.
- Temporary and aside directories carry their host and process id in their names: the next run on the same
  --out removes those of a dead process, and puts back an aside whose replacement never completed.
- Directories honour the umask (tempfile would make them private to their owner).
- The filesystem refusing a write (no space, quota, read-only, permission) becomes one error line naming the
  path and what is missing, instead of a traceback (`write_failure`).
- `write_checksums` / `verify_checksums` / `coverage_problem`: a SHA256SUMS file (the format `sha256sum -c`
  checks), written last and verified before a directory is trusted (03/04's checkpoints): it lists every file of
  the directory and only files inside it. It catches corruption, not forgery (whoever can write a checkpoint can
  rewrite its SHA256SUMS too): what keeps a forged checkpoint from running code is how it is read (fsdp_train.py).

Outside this repository (copy this file and common.py):

    from safe_output import check_output, output_dir
    inputs = {"--model": "models/base"}
    check_output("runs/x", inputs, overwrite=True)                # first, before any heavy work
    with output_dir("runs/x", overwrite=True, inputs=inputs) as tmp:
        (tmp / "result.json").write_text("{}")   # runs/x appears, or replaces the old one, only when complete
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import secrets
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from common import UserError, atomic_write_text, fail, get_rank, print0

HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"  # no "-": it separates the fields of a name below
# `.NAME.tmp-HOST-PID-XXXXXXXX` and `.NAME.old-HOST-PID-XXXXXXXX` (8 random hex digits)
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[\w.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
PENDING = "PENDING"  # in an aside directory: the run replacing it has not completed yet
CHECKSUMS = "SHA256SUMS"

# -------------------------------------------------------------------------------------------------------------
# Checks before anything is touched.


def local_inputs(inputs: dict[str, Any]) -> Iterator[tuple[str, str, Path]]:
    """(flag, path as given, resolved path) of every input that exists on this machine (hub names do not)."""
    for flag, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            path = os.path.expanduser(str(value)) if value is not None else ""
            if path and os.path.exists(path):
                yield flag, str(value), Path(os.path.realpath(path))


def check_output(out: str | os.PathLike, inputs: dict[str, Any] | None = None, overwrite: bool = False,
                 existing_ok: bool = False) -> Path:
    """Refuse an --out that would harm an input or cannot be written, before any work (see the module docstring).
    `inputs` maps a flag to the path(s) it names; `existing_ok`: an existing --out is the caller's to judge (03/04
    resume the run in it)."""
    out = Path(out).expanduser()
    real = Path(os.path.realpath(out))
    for flag, given, path in local_inputs(inputs or {}):
        relation = ("is" if real == path else "contains" if path.is_relative_to(real)
                    else "lies inside" if real.is_relative_to(path) else None)
        if relation:
            fail(f"--out {out} {relation} the input {flag} {given}, so writing it could destroy that input; choose "
                 "an --out outside every input")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a directory; choose another --out")
    if out.exists() and not (overwrite or existing_ok):
        fail(f"--out {out} already exists; choose another --out or pass --overwrite to replace it (only once the "
             "new output is complete)")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        fail(f"--out {out} cannot be created: {existing} is a file, not a directory; choose another --out")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        fail(f"cannot write --out {out}: {existing} is on a read-only filesystem; choose a writable --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"cannot write --out {out}: no permission to write in {existing}; choose an --out you may write to")
    return out


# -------------------------------------------------------------------------------------------------------------
# One writer per --out, and what dead writers left behind.


class OutputLock:
    """An exclusive lock on --out: flock on `.NAME.lock` beside it, holding the owner's host and pid."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None
        self.made: list[Path] = []  # parent directories created for the lock file: removed again if left empty

    def __enter__(self) -> "OutputLock":
        self.made = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                self._remove_made()
                fail(f"--out {self.out} is being written by {owner} (lock {self.path}); wait for it to end or "
                     "choose another --out")
            except OSError as exc:  # a filesystem without flock (Lustre mounted without -o flock: ENOSYS)
                os.close(fd)
                os.unlink(self.path)  # no lock can be held there, so no one else's is removed
                self._remove_made()
                fail(f"cannot lock {self.path}: {exc.strerror}; put --out on a filesystem with flock(2) locks "
                     "(Lustre: mount with -o flock)")
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:  # else its last holder removed it: retry
                    self.fd = fd
            if self.fd is None:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"host {HOST} pid {os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for path in self.made:  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                path.rmdir()


def _dead_owner(match: re.Match) -> bool:
    """True when the process that named this directory ran on this host and has ended."""
    if match["host"] != HOST:
        return False  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _temp(out: Path, kind: str) -> Path:
    """A new `.NAME.KIND-HOST-PID-XXXXXXXX` directory beside `out`. Not tempfile.mkdtemp: its directories are
    private to their owner (0700) whatever the umask, and the output would keep that mode."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)  # mode 0777 less the umask
            return path


def _honour_umask(tmp: Path) -> None:
    """Give the umask's mode to the files a library made private (safetensors writes 0600 whatever the umask);
    `tmp`, made by mkdir, shows what the umask allows. A hard link shares its mode with an input: left alone."""
    mode = tmp.stat().st_mode & 0o666
    for path in tmp.rglob("*"):
        st = path.lstat()
        if path.is_file() and not path.is_symlink() and st.st_mode & 0o777 == 0o600 and st.st_nlink == 1:
            os.chmod(path, mode)


def _discard(path: Path) -> None:
    """Delete a directory tree, first renamed to a temporary name, so a half-deleted tree never looks real."""
    trash = _temp(path, "tmp")
    os.rename(path, trash / "discarded")
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Remove the temporary directories a dead process left beside --out, putting back first an output it had
    moved aside and not replaced (killed between the renames, or while its replacement run was unfinished).
    Call it holding the lock."""
    for entry in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        match = LEFTOVER.match(entry.name)
        if not match or match["name"] != out.name or not _dead_owner(match):
            continue
        previous = entry / "previous"
        if match["kind"] == "old" and previous.exists() and (not out.exists() or (entry / PENDING).exists()):
            if out.exists():
                _discard(out)
            os.rename(previous, out)
            print0(f"note: put back {out}, which process {match['pid']} (killed) had moved aside to replace it")
        shutil.rmtree(entry, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------------
# The filesystem refusing a write: one line that names the path and what is missing.

REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "the operation is not permitted", errno.EFBIG: "the file is too large for the filesystem"}


def free_bytes(path: Path) -> int:
    existing = next(p for p in [path, *path.parents] if p.exists())
    st = os.statvfs(existing)
    return st.f_bavail * st.f_frsize


def write_failure(exc: BaseException, out: Path) -> str | None:
    """The error line for `exc` when it is the filesystem refusing a write under `out`, however deep a library
    wrapped the OS error (or with no OS error at all, when the disk is full); None for anything else."""
    if isinstance(exc, (UserError, KeyboardInterrupt)):
        return None
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in REFUSALS:  # a copy names its source first, then its target
            where = out if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.filename2 or error.filename or out
            return _refusal(Path(where), REFUSALS[error.errno])
        for code, what in REFUSALS.items():  # e.g. safetensors and DCP keep only the OS error's text
            if os.strerror(code) in str(error):
                return _refusal(out, what)
        error = error.__cause__ or error.__context__
    return _refusal(out, REFUSALS[errno.ENOSPC]) if free_bytes(out) < 1 << 20 else None


def _refusal(path: Path, what: str) -> str:
    fix = ("free space there or choose another --out" if "space" in what or "quota" in what
           else "choose an --out you may write to")
    return f"cannot write {path}: {what}; {fix}"


# -------------------------------------------------------------------------------------------------------------
# Atomic output directories (01, 02, 05, 06, a run's final model).


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: dict[str, Any] | None = None,
               lock: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; when the block ends without error, it becomes `out` (an old
    `out`, with `overwrite`, is moved aside first and deleted after); on any error it is removed, `out` left as
    it was, and a refused write reported as one error line. `lock=False` inside a directory already locked."""
    out = check_output(out, inputs, overwrite)
    with OutputLock(out) if lock else contextlib.nullcontext():
        clean_leftovers(out)
        check_output(out, inputs, overwrite)  # again: a put-back output is an existing one
        tmp = _temp(out, "tmp")
        try:
            yield tmp
            _honour_umask(tmp)
            aside = None
            if out.exists():
                aside = _temp(out, "old")
                os.rename(out, aside / "previous")
            try:
                os.rename(tmp, out)
            except BaseException:
                if aside is not None:
                    os.rename(aside / "previous", out)
                raise
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            message = write_failure(exc, out)
            if message:
                raise UserError(message) from exc
            raise


# -------------------------------------------------------------------------------------------------------------
# Training run directories (03, 04): live directories with checkpoints, resumed in place.


class RunDir:
    """A training run's --out. Entering it checks --out against the inputs and (rank 0) takes the lock and
    cleans what dead processes left; `create` makes the directory once every check passed; leaving it keeps the
    run when it ended in order, and on an error puts --out back as it was before `create` (the old run with
    --overwrite), unless `keep_if(out)` says the new run holds something worth resuming (a checkpoint)."""

    def __init__(self, out: str | os.PathLike, inputs: dict[str, Any] | None = None, overwrite: bool = False,
                 keep_if: Callable[[Path], bool] = lambda out: False):
        self.out, self.inputs, self.overwrite, self.keep_if = Path(out).expanduser(), inputs, overwrite, keep_if
        self.lock = OutputLock(self.out) if get_rank() == 0 else None
        self.aside: Path | None = None
        self.before: set[str] | None = None  # entries of --out before `create` (None: it did not exist)
        self.created = False

    def __enter__(self) -> "RunDir":
        check_output(self.out, self.inputs, self.overwrite, existing_ok=True)
        if self.lock is not None:
            self.lock.__enter__()
            clean_leftovers(self.out)
        return self

    def create(self, files: dict[str, str]) -> None:
        """Rank 0: move an old run aside (--overwrite), make --out and write `files` (name: text) that are not
        there yet. The caller synchronises the ranks afterwards."""
        if self.lock is None:
            return
        if self.overwrite and self.out.exists():
            self.aside = _temp(self.out, "old")
            (self.aside / PENDING).touch()
            os.rename(self.out, self.aside / "previous")
        self.before = {p.name for p in self.out.iterdir()} if self.out.is_dir() else None
        self.out.mkdir(parents=True, exist_ok=True)  # mkdir applies the umask
        self.created = True
        for name, text in files.items():
            if not (self.out / name).exists():
                atomic_write_text(self.out / name, text)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.lock is not None:
            try:
                self._undo() if exc is not None else self._commit()
            finally:
                self.lock.__exit__()
        message = write_failure(exc, self.out) if exc is not None else None
        if message:
            raise UserError(message) from exc

    def _commit(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)

    def _undo(self) -> None:
        if self.aside is not None:
            if self.out.exists():
                _discard(self.out)
            os.rename(self.aside / "previous", self.out)
            shutil.rmtree(self.aside, ignore_errors=True)
            print0(f"note: {self.out} is back as it was: --overwrite replaces a run only once the new one ends "
                   "in order")
        elif self.created and not self.keep_if(self.out):
            if self.before is None:
                _discard(self.out)
            else:
                for entry in self.out.iterdir():
                    if entry.name not in self.before:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# -------------------------------------------------------------------------------------------------------------
# SHA256SUMS: written last, verified before a directory is trusted.


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def checksum_files(directory: Path) -> list[str]:
    """The files SHA256SUMS covers: every regular file in `directory` (recursively) but itself, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def checksum_lines(directory: Path, names: Iterable[str]) -> list[str]:
    return [f"{sha256_file(directory / name)}  {name}" for name in names]


def write_checksums(directory: Path, lines: Iterable[str] | None = None) -> None:
    """Write SHA256SUMS (the lines `checksum_lines` makes, e.g. computed in parts by several ranks; default: all
    of `checksum_files`). Write it last: a directory without it is incomplete."""
    lines = checksum_lines(directory, checksum_files(directory)) if lines is None else lines
    atomic_write_text(directory / CHECKSUMS, "".join(f"{line}\n" for line in sorted(lines, key=lambda x: x[66:])))


def read_checksums(directory: Path) -> dict[str, str] | None:
    """{file: sha256} from SHA256SUMS, or None when it is missing or unreadable."""
    try:
        lines = (directory / CHECKSUMS).read_text().splitlines()
        listed = {line[66:]: line[:64] for line in lines}
    except (OSError, UnicodeDecodeError):
        return None
    ok = all(len(line) > 66 and line[64:66] == "  " and re.fullmatch(r"[0-9a-f]{64}", line[:64]) for line in lines)
    return listed if ok and listed else None


def coverage_problem(directory: Path) -> str | None:
    """None when SHA256SUMS lists every file in `directory` and only regular files inside it; else what is wrong:
    SHA256SUMS missing or malformed, a listed name that leaves the directory (absolute, `..`) or is missing, a
    file it does not list (never read unverified), a link or special file (nothing outside is ever reached)."""
    sums = directory / CHECKSUMS
    listed = read_checksums(directory) if sums.is_file() and not sums.is_symlink() else None  # never a FIFO's open
    if listed is None:
        return f"{sums} is missing or unreadable, so nothing in {directory} is verified"
    for name in sorted(listed):
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
            return f"{sums} names {name!r}, a path that leaves {directory}"
    known = {*listed, CHECKSUMS}
    for root, dirs, files in os.walk(directory):  # links are never followed: they are refused below
        for entry in sorted(dirs + files):
            path = Path(root) / entry
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                return f"{path} is a link or a special file, not a file written into {directory}"
            if path.relative_to(directory).as_posix() not in known:
                return f"{path} is not listed in {CHECKSUMS}, so it cannot be verified"
    missing = next((name for name in sorted(listed) if not (directory / name).is_file()), None)
    return f"{directory / missing} is missing" if missing else None


def verify_checksums(directory: Path, names: Iterable[str] | None = None) -> str | None:
    """None when the files `names` (default: all that SHA256SUMS lists) match it; else what is wrong, naming
    the file."""
    listed = read_checksums(directory)
    if listed is None:
        return f"{directory / CHECKSUMS} is missing or unreadable"
    for name in sorted(listed) if names is None else names:
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != listed[name]:
            return f"{path} does not match its SHA256SUMS entry (the file is corrupted or was changed)"
    return None
