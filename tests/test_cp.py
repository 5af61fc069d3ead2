"""Context parallelism (--cp N) on the CPU with gloo.

In-process: how a micro-batch is split (an independent layout reference: contiguous slices for Ulysses, chunks
r and 2N-1-r of 2N for the ring), padding to the split, which attention method each row gets (ProLong's local
shortcut only where no document straddles a slice), and bad input (heads, world size, ring on CPU).

One 4-process torchrun (a dp 2 x cp 2 mesh and a cp 4 mesh): the split attention's outputs and q/k/v gradients
equal the per-document reference on the whole row in float64 (Ulysses with and without repeated KV heads, the
all-gather ring, the local shortcut; documents straddling slice boundaries; padded rows), then
03_continued_pretrain.py with --cp 2 and --cp 4, document-masked (Ulysses) and unmasked (ring), has the loss and
gradient-norm trajectory of the 1-process --cp 1 run on the same rows, and resumes under cp: bitwise with the
same --cp, and with another --cp."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import context_parallel
import fsdp_train
import varlen_attention
from lc_testutil import ROOT, load_script
from test_train import make_packed_data, rows_of

script = load_script("03_continued_pretrain")
SEQ = 30  # not a multiple of 4 or 8: cp 4 (Ulysses) and the ring (2N chunks) pad the micro-batches


def group(size, rank, attention, ring_impl="allgather", kv_repeat=1):
    return context_parallel.CPGroup(size=size, rank=rank, attention=attention, kv_repeat=kv_repeat,
                          ring_impl=ring_impl if attention == "ring" else "")


def expected_positions(total, size, rank, attention):
    """Independent layout reference: Ulysses = the rank-th contiguous slice; ring = head-tail chunks."""
    if attention == "ulysses":
        n = total // size
        return list(range(rank * n, (rank + 1) * n))
    c = total // (2 * size)
    return list(range(rank * c, (rank + 1) * c)) + list(range((2 * size - 1 - rank) * c, (2 * size - rank) * c))


@pytest.mark.parametrize("attention,size", [("ulysses", 2), ("ulysses", 4), ("ring", 2), ("ring", 4)])
def test_shards_partition_the_row_with_targets_positions_and_counts(attention, size):
    rows = rows_of([([4, 19, 7], 0), ([11, 12], 7)], SEQ, seed=3)
    mb = varlen_attention.build_micro_batch(rows, SEQ, doc_mask=True)
    T = 2 * SEQ
    mult = size * (2 if attention == "ring" else 1)
    total = -(-T // mult) * mult
    ids = mb.input_ids[0].tolist() + [1] * (total - T)  # pad id 1
    pos = mb.position_ids[0].tolist() + list(range(SEQ, SEQ + total - T))  # positions continue
    tgt = mb.targets[0].tolist() + [-100] * (total - T)
    seen, n_valid = [], 0
    for r in range(size):
        local = context_parallel.shard_micro_batch(mb, group(size, r, attention), pad_id=1)
        want = expected_positions(total, size, r, attention)
        assert local.input_ids[0].tolist() == [ids[i] for i in want]
        assert local.position_ids[0].tolist() == [pos[i] for i in want]
        assert local.targets[0].tolist() == [tgt[i] for i in want]
        assert local.n_tokens == total // size and sum(local.seg_lens) == total // size
        assert group(size, r, attention).tokens_per_rank(T) == local.input_ids.numel()  # what 03 prints and tiles
        seen += want
        n_valid += local.n_valid
    assert sorted(seen) == list(range(total))
    assert n_valid == mb.n_valid  # the global count is unchanged by the split


def test_method_choice_local_shortcut_only_when_exact():
    def method(segs, size, attention, ring_impl="allgather", doc_mask=True):
        row = rows_of([(segs, 0)], sum(segs))
        mb = varlen_attention.build_micro_batch(row, sum(segs), doc_mask=doc_mask)
        return [context_parallel.shard_micro_batch(mb, group(size, r, attention, ring_impl)).cp.method
                for r in range(size)]

    # documents tiling the slices: ProLong's shortcut, no collective
    assert method([8, 8, 8, 8], 4, "ulysses") == ["local"] * 4
    assert method([4, 4, 8, 8, 8], 2, "ring") == ["local"] * 2  # head-tail chunks of 8 tokens, all aligned
    # every document fits one slice (ProLong's own test would take the shortcut) but one straddles a boundary
    assert method([4, 8, 8, 12], 4, "ulysses") == ["ulysses"] * 4
    assert method([4, 8, 8, 12], 4, "ring") == ["allgather"] * 4
    # PyTorch's ring (causal over the whole row) only where that is exact: every target in the first segment
    assert method([32], 2, "ring", "torch", doc_mask=False) == ["torch_ring"] * 2
    assert method([20, 12], 2, "ring", "torch") == ["allgather"] * 2
    # KV heads: repeated up to lcm(H_kv, N)
    config = common.config_from_init_spec("tiny-llama")  # 4 query heads, 2 KV heads
    assert context_parallel.setup_context_parallel(1, config, torch.device("cpu")).size == 1
    row = varlen_attention.build_micro_batch(rows_of([([30], 0)], 30), 30)
    padded = context_parallel.shard_micro_batch(row, group(4, 0, "ring"))
    assert padded.cp.method == "allgather" and padded.n_tokens == 32 // 4


def run_error(capsys, argv):
    code = common.call_main(script.main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def data30(tmp_path_factory):
    return make_packed_data(tmp_path_factory.mktemp("cpdata") / "d", seq_len=SEQ, num_rows=16)


def stage_args(data, out, *extra):
    return ["--init-config", "tiny-llama", "--data", data, "--out", str(out), "--device", "cpu", "--batch-tokens",
            str(4 * SEQ), "--micro-batch-tokens", str(SEQ), "--max-steps", "4", "--lr", "1e-3", "--save-every", "2",
            "--keep", "0", "--no-export", *map(str, extra)]


def test_bad_cp_inputs_fail_with_one_line(data30, tmp_path, capsys):
    out = tmp_path / "x"
    line = run_error(capsys, stage_args(data30, out, "--cp", "3"))
    assert "4 query heads over 3 ranks" in line and "--cp-attention ring" in line
    assert "does not divide the world size 1" in run_error(capsys, stage_args(data30, out, "--cp", "2"))
    assert "runs on CUDA only" in run_error(capsys, stage_args(data30, out, "--cp", "2", "--no-doc-mask",
                                                               "--cp-ring-impl", "torch"))
    assert "argument --cp: '0' is not an integer >= 1" in run_error(capsys, stage_args(data30, out, "--cp", "0"))
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# 4 processes: the split attention against the reference, then stage 03 under cp

WORKER = r"""
import json, math, sys
from dataclasses import replace
from types import SimpleNamespace
import torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import common, context_parallel, fsdp_train, varlen_attention
from lc_testutil import load_script
script = load_script("03_continued_pretrain")
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {{"attention": []}}

# 1. attention: outputs and q/k/v gradients against the per-document reference on the whole row (float64)
heads = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
for size in (2, 4):
    for attention in ("ulysses", "ring"):
        base = context_parallel.setup_context_parallel(size, heads, torch.device("cpu"), attention=attention)
        for hkv in (2, 1):
            cp = replace(base, kv_repeat=math.lcm(hkv, size) // hkv if attention == "ulysses" else 1)
            for segs in ([3, 17, 1, 9], [30], [8, 8, 8, 8], [5, 20, 7]):
                T = sum(segs)
                g = torch.Generator().manual_seed(T * 10 + hkv)
                q = torch.randn(T, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
                k = torch.randn(T, hkv, 8, generator=g, dtype=torch.float64, requires_grad=True)
                v = torch.randn(T, hkv, 8, generator=g, dtype=torch.float64, requires_grad=True)
                go = torch.randn(T, 4, 8, generator=g, dtype=torch.float64)
                ref = varlen_attention.reference_varlen_attention(q, k, v, segs, 0.3)
                ref_grads = torch.autograd.grad(ref, (q, k, v), go)
                local = context_parallel.shard_micro_batch(context_parallel._probe_micro_batch(segs), cp)
                idx = local.position_ids[0]
                real = idx < T  # the padding appended for the split has positions >= T
                def take(z):
                    out = torch.zeros(len(idx), *z.shape[1:], dtype=z.dtype)
                    out[real] = z.detach()[idx[real]]
                    return out.requires_grad_()
                ql, kl, vl = take(q), take(k), take(v)
                out = context_parallel.cp_attention(ql, kl, vl, local.cp, 0.3)
                gl = torch.zeros_like(out)
                gl[real] = go[idx[real]]
                grads = torch.autograd.grad(out, (ql, kl, vl), gl)
                err = (out[real] - ref.detach()[idx[real]]).abs().max().item()
                for z, r in zip(grads, ref_grads):  # every rank's share, summed over the cp group, is the gradient
                    full = torch.zeros(T + 64, *z.shape[1:], dtype=z.dtype)
                    full.index_add_(0, idx, z)
                    dist.all_reduce(full, group=cp.group)
                    err = max(err, (full[:T] - r).abs().max().item())
                results["attention"].append([size, attention, hkv, segs, local.cp.method, err])

# 2. stage 03 under cp (argument lists from the test), resumes included
def trajectory(out):
    return [json.loads(l) for l in open(out + "/metrics.jsonl").read().splitlines() if l.strip()]
def call(argv):  # common.call_main, but keeping the process group (it tears it down; torchrun's can't re-init)
    try:
        return script.main(argv) or 0
    except common.UserError as exc:
        if rank == 0:
            print(f"error: {{exc}}", file=sys.stderr, flush=True)
        return common.EXIT_USER_ERROR
for name, argv, keep_before in json.loads({runs!r}):
    before = trajectory(keep_before) if keep_before and rank == 0 else None
    results[name] = {{"code": call(argv), "before": before}}
if rank == 0:
    json.dump(results, open({result!r}, "w"))
"""


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def assert_same_trajectory(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, (a, b)
        assert a["valid_tokens"] == b["valid_tokens"]


@pytest.fixture(scope="module")
def cp_runs(data30, tmp_path_factory):
    """The 4-process worker and the two 1-process --cp 1 references (document-masked and not)."""
    tmp = tmp_path_factory.mktemp("cp")
    refs = {}
    for mode in ("--doc-mask", "--no-doc-mask"):
        refs[mode] = tmp / f"ref{mode}"
        assert common.call_main(script.main, stage_args(data30, refs[mode], mode)) == 0
    ck = lambda name, step: str(tmp / name / "checkpoints" / f"step_{step:08d}")  # noqa: E731
    runs = [
        ["ulysses_cp2", stage_args(data30, tmp / "ulysses_cp2", "--cp", "2"), None],  # dp 2 x cp 2
        ["ulysses_cp4", stage_args(data30, tmp / "ulysses_cp4", "--cp", "4"), None],  # KV heads repeated 2 -> 4
        ["ring_cp4", stage_args(data30, tmp / "ring_cp4", "--cp", "4", "--no-doc-mask"), None],
        # resume under cp: the same --cp (bitwise), and the cp 4 ring run continued with --cp 2
        ["ulysses_cp2_resume", stage_args(data30, tmp / "ulysses_cp2", "--cp", "2", "--resume",
                                          ck("ulysses_cp2", 2)), str(tmp / "ulysses_cp2")],
        ["ring_cp4_resume_cp2", stage_args(data30, tmp / "ring_cp4", "--cp", "2", "--no-doc-mask", "--resume",
                                           ck("ring_cp4", 2)), None],
        ["world_not_divisible", stage_args(data30, tmp / "bad", "--cp", "3", "--cp-attention", "ring"), None],
    ]
    worker = tmp / "worker.py"
    result = tmp / "result.json"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), runs=json.dumps(runs),
                                    result=str(result)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           str(worker)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"tmp": tmp, "refs": refs, "result": json.loads(result.read_text()), "stdout": proc.stdout,
            "stderr": proc.stderr}


@pytest.mark.slow
def test_split_attention_equals_reference_outputs_and_grads(cp_runs):
    rows = cp_runs["result"]["attention"]
    assert len(rows) == 2 * 2 * 2 * 4
    for size, attention, hkv, segs, method, err in rows:
        assert err < 1e-12, (size, attention, hkv, segs, method, err)
    methods = {(r[1], r[4]) for r in rows}
    assert methods == {("ulysses", "ulysses"), ("ulysses", "local"), ("ring", "allgather"), ("ring", "local")}


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", [("ulysses_cp2", "--doc-mask"), ("ulysses_cp4", "--doc-mask"),
                                       ("ring_cp4", "--no-doc-mask")])
def test_stage03_under_cp_matches_cp1(cp_runs, name, mode):
    """Ring with --cp 2 (dp 2) is ring_cp4's steps 3-4, resumed with --cp 2 (test_resume_under_cp)."""
    res = cp_runs["result"]
    assert res[name]["code"] == 0
    out = cp_runs["tmp"] / name
    assert_same_trajectory(metrics(out), metrics(cp_runs["refs"][mode]))  # ring_cp4: steps 3-4 from its resume
    used = set().union(*(m["cp_methods"] for m in metrics(out)))
    assert used <= ({"ulysses", "local"} if mode == "--doc-mask" else {"allgather", "local"}) and used - {"local"}
    state = fsdp_train.read_trainer_state(out / "checkpoints" / "step_00000004")
    assert state["world_size"] == 4 and state["rows_consumed"] == 16


@pytest.mark.slow
def test_resume_under_cp(cp_runs):
    res = cp_runs["result"]
    assert res["ulysses_cp2_resume"]["code"] == 0 and res["ring_cp4_resume_cp2"]["code"] == 0
    before = [(m["step"], m["loss"], m["grad_norm"]) for m in res["ulysses_cp2_resume"]["before"]]
    after = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(cp_runs["tmp"] / "ulysses_cp2")]
    assert after == before  # the same --cp: bitwise
    # the ring run resumed with another --cp (and data-parallel size): still the --cp 1 trajectory
    assert_same_trajectory(metrics(cp_runs["tmp"] / "ring_cp4"), metrics(cp_runs["refs"]["--no-doc-mask"]))
    assert "resumed from" in cp_runs["stdout"]


@pytest.mark.slow
def test_world_size_not_divisible_is_refused(cp_runs):
    assert cp_runs["result"]["world_not_divisible"]["code"] == 2
    assert "error: --cp 3 does not divide the world size 4" in cp_runs["stderr"]
    assert not (cp_runs["tmp"] / "bad").exists()
