"""recipes/slurm.sbatch: the batch script turns a recipe's 03 / 04 commands into one torchrun per node, rendered
from SLURM's environment; a time-limit signal is passed to the job's tasks and the job requeued. Fake SLURM
environments and fake `scancel` / `scontrol` stand in for a cluster."""
import os
import re
import shlex
import signal
import subprocess
import time

from lc_testutil import ROOT, load_script

SBATCH = ROOT / "recipes" / "slurm.sbatch"
FAKE_JOB = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "777", "SLURM_SUBMIT_DIR": str(ROOT), "MASTER_ADDR": "gpu-a01"}


def bash(*args, env: dict, **kw) -> subprocess.CompletedProcess:
    full = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    full.update(env)
    return subprocess.run(["bash", str(SBATCH), *map(str, args)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=60, **kw)


def test_sbatch_renders_torchrun_on_node_2_of_4_that_03_parses():
    proc = bash(ROOT / "recipes" / "prolong_512k.sh", env={**FAKE_JOB, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("+ ") and "03_continued_pretrain.py" in ln)
    words = shlex.split(line[2:])
    assert words[0] == "srun" and "--ntasks-per-node=1" in words and any("node-%n.log" in w for w in words)
    node_args = words[words.index("--node") + 1:]  # what srun runs on every node, after `slurm.sbatch --node`
    # that node's rendering, as srun would start it on the third of four nodes
    rendered = bash("--node", *node_args, env={**FAKE_JOB, "SLURM_NODEID": "2", "GPUS_PER_NODE": "8",
                                               "DRY_RUN": "1"})
    assert rendered.returncode == 0, rendered.stderr
    torchrun = shlex.split(rendered.stdout)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    i = next(k for k, w in enumerate(torchrun) if w.endswith("03_continued_pretrain.py"))
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(torchrun[3:i + 1])  # torchrun's own parser
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == ("4", 2, "8")
    assert (launch.master_addr, launch.master_port, launch.rdzv_id) == ("gpu-a01", 29500, "777")
    assert "SIGUSR1" in launch.signals_to_handle.split(",")
    args = load_script("03_continued_pretrain").parse_args(torchrun[i + 1:])  # and 03's
    assert (args.cp, args.resume, args.data) == (8, "auto", ["runs/prolong-512k/data"])
    # 32 GPUs: the plan is made for 4 nodes, and the 16-row step still divides over 4 data-parallel groups
    assert "(DRY_RUN=1, 32 GPUs)" in proc.stdout


def test_sbatch_header_asks_for_requeue_and_an_early_signal():
    header = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header
    warn = next(int(m.group(1)) for ln in header if (m := re.fullmatch(r"#SBATCH --signal=B:USR1@(\d+)", ln)))
    assert warn >= 300  # time to finish a step and write a checkpoint
    assert any(ln.startswith("#SBATCH --output=") and "%j" in ln for ln in header)


def test_node_mode_without_slurm_environment_is_refused():
    proc = bash("--node", "03_continued_pretrain.py", env={"DRY_RUN": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: SLURM_NNODES is not set")


def test_time_limit_signal_is_passed_on_and_the_job_requeued(tmp_path):
    """SIGUSR1 to the batch script (SLURM's --signal=B:USR1): scancel --signal=USR1 JOB reaches the tasks, and once
    the recipe has ended (here: as 03 does after its checkpoint, exit 128 + 10) the job is requeued."""
    calls = tmp_path / "calls"
    for tool in ("scancel", "scontrol"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (tmp_path / tool).chmod(0o755)
    recipe = tmp_path / "recipe.sh"
    recipe.write_text("sleep 3\nexit 138\n")
    env = {k: os.environ[k] for k in ("HOME",) if k in os.environ}
    env.update(FAKE_JOB, PATH=f"{tmp_path}:{os.environ['PATH']}", LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen(["bash", str(SBATCH), str(recipe)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("job 777")  # the traps are set before this line
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 777", "scontrol requeue 777"]
    assert "requeueing job 777" in out and (tmp_path / "logs" / "777").is_dir()
