"""Helpers for tests: import a numbered stage script as a module, or run it as a command; compare tensors by
relative-norm error."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MODULES = {}


def load_script(name: str):
    """Import `ROOT/<name>.py` (e.g. "01_prepare_data") as a module, once."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"longctx_{name}", ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def run_script(name: str, *args, env: dict | None = None, timeout: float = 600, torchrun: int | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run `ROOT/<name>.py args...` in a subprocess (optionally under torchrun with N processes)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    script = str(ROOT / f"{name}.py")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               script]
    else:
        cmd = [sys.executable, script]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` lines a failed stage printed on stderr."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def rel_error(got, want) -> float:
    """||got - want|| / ||want||, in float64 on the CPU: a tolerance that scales with the values compared (an
    absolute one means nothing for outputs whose spread is itself a few hundredths). 0 when both are zero."""
    import torch

    got, want = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (got, want))
    diff, scale = (got - want).norm().item(), want.norm().item()
    if diff == 0:
        return 0.0
    return diff / scale if scale else float("inf")
