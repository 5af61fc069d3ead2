"""03_continued_pretrain.py end to end on the CPU: 2-process FSDP2 == 1 process, SIGTERM and hard kills resume
bitwise, --resume auto with --init-from resumes a started run, bad input gets one clear line and harms no
checkpoint, a NaN stops the run keeping the last good checkpoint, and the exported HF directory holds exactly the
last checkpoint's weights (read back by torch.distributed.checkpoint's own converter), tied embeddings included."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import assets
import common
import fsdp_train
from lc_testutil import ROOT, load_script, rel_error, run_script
from test_train import make_packed_data, resumed_loss_error, trainer_and_export_logits

script = load_script("03_continued_pretrain")


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    return make_packed_data(tmp_path_factory.mktemp("data") / "d", seq_len=32, num_rows=16)


def base_args(data, tokenizer_dir, out, *extra):
    return ["--init-config", "tiny-llama", "--tokenizer", tokenizer_dir, "--data", data, "--out", str(out),
            "--device", "cpu", "--batch-tokens", "128", "--micro-batch-tokens", "64", "--max-steps", "6",
            "--lr", "1e-3", "--save-every", "2", "--log-every", "3", *map(str, extra)]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trajectory(out):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out)]


def wait_for_lines(path, n, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def reference_run(data32, tokenizer_dir, tmp_path_factory):
    """Uninterrupted 1-process run: 6 steps, 4 rows per step, 2 accumulation steps of 2 rows."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out)) == 0
    return out


def test_single_process_run_trains_checkpoints_and_exports(reference_run, tmp_path):
    m = metrics(reference_run)
    assert [r["step"] for r in m] == list(range(1, 7))
    assert all(r["valid_tokens"] > 0 and r["mfu_torchtitan"] is None for r in m)
    assert m[-1]["lr"] == pytest.approx(1e-4)  # cosine down to 0.1x
    assert [p.name for p in fsdp_train.list_checkpoints(reference_run / "checkpoints")] == ["step_00000004",
                                                                                   "step_00000006"]
    final = reference_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert common.read_manifest(final)["stage"] == "03_continued_pretrain"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the export is the trained model: every weight equal to the step-6 checkpoint's, as transformers loads it
    trained = checkpoint_weights(reference_run / "checkpoints" / "step_00000006", tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    AutoTokenizer.from_pretrained(final)


def checkpoint_weights(checkpoint, tmp_path) -> dict:
    """A checkpoint's model weights read with torch.distributed.checkpoint's own converter (not longctx's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(tmp_path / "checkpoint.pt"))
    return torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]


def test_two_process_fsdp_matches_single_process(data32, tokenizer_dir, reference_run, tmp_path):
    """2 ranks x 1 micro-batch of 2 rows == 1 rank x 2 accumulated micro-batches: same loss trajectory."""
    out = tmp_path / "two"
    proc = run_script("03_continued_pretrain", *base_args(data32, tokenizer_dir, out, "--no-export"), torchrun=2,
                      env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "1 accumulation step(s)" in proc.stdout
    two, one = trajectory(out), trajectory(reference_run)
    assert [s for s, _, _ in two] == [s for s, _, _ in one]
    for (_, l2, g2), (_, l1, g1) in zip(two, one):
        assert abs(l2 - l1) < 1e-5 and abs(g2 - g1) < 1e-4


def test_sigterm_saves_complete_checkpoint_and_resume_is_bitwise(data32, tokenizer_dir, reference_run, tmp_path):
    out = tmp_path / "sig"
    path = out / "metrics.jsonl"

    def send_sigterm():
        if wait_for_lines(path, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm, daemon=True).start()
    code = common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--save-every", "0", "--debug-sleep", "0.4"))
    assert code == 128 + signal.SIGTERM
    ckpts = fsdp_train.list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and 2 <= int(ckpts[0].name[5:]) < 6
    assert (ckpts[0] / ".metadata").is_file() and (ckpts[0] / "rng_rank0.pt").is_file()
    state = fsdp_train.read_trainer_state(ckpts[0])
    assert state["rows_consumed"] == state["step"] * 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--resume", "auto", "--no-export")) == 0
    assert trajectory(out) == trajectory(reference_run)  # bitwise


def test_hard_kill_then_resume_auto_is_bitwise(data32, tokenizer_dir, reference_run, tmp_path):
    out = tmp_path / "kill"
    cmd = [sys.executable, str(ROOT / "03_continued_pretrain.py"),
           *base_args(data32, tokenizer_dir, out, "--debug-sleep", "0.5", "--no-export")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for_lines(out / "metrics.jsonl", 3), "the run did not start"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert fsdp_train.list_checkpoints(out / "checkpoints")  # step 2 at least
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--resume", "auto", "--no-export")) == 0
    assert trajectory(out) == trajectory(reference_run)  # bitwise, records after the checkpoint replaced


def snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(directory).rglob("*") if p.is_file()}


def run_error(capsys, args):
    code = common.call_main(script.main, args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


def test_bad_inputs_fail_with_one_line_and_harm_no_checkpoint(data32, tokenizer_dir, reference_run, tmp_path,
                                                              capsys):
    before = snapshot(reference_run)
    # rows longer than the model's positions, without a RoPE patch
    args = base_args(data32, tokenizer_dir, tmp_path / "a")
    args[1] = "tiny-llama:max_position_embeddings=16"
    assert "02_rope_scale" in run_error(capsys, args)
    # PoSE target beyond the positions too
    assert "max_position_embeddings" in run_error(capsys, base_args(data32, tokenizer_dir, tmp_path / "a",
                                                                    "--pose-target-len", "100000"))
    # a data directory not made by 01
    other = make_packed_data(tmp_path / "other", seq_len=32, num_rows=4, stage="02_rope_scale")
    assert "not written by 01_prepare_data" in run_error(capsys, base_args(other, tokenizer_dir, tmp_path / "b"))
    (tmp_path / "plain").mkdir()
    assert "not written by 01_prepare_data" in run_error(capsys, base_args(str(tmp_path / "plain"), tokenizer_dir,
                                                                           tmp_path / "b"))
    # a batch that does not divide across ranks x micro-batches
    assert "does not divide" in run_error(capsys, base_args(data32, tokenizer_dir, tmp_path / "c",
                                                            "--batch-tokens", "96"))
    # an output directory holding another run
    assert "already holds a run" in run_error(capsys, base_args(data32, tokenizer_dir, reference_run))
    # resuming with other settings, or from an incompatible checkpoint
    assert "settings differ" in run_error(capsys, base_args(data32, tokenizer_dir, reference_run, "--resume",
                                                            "auto", "--lr", "5e-4"))
    ckpt = fsdp_train.list_checkpoints(reference_run / "checkpoints")[-1]
    assert "incompatible" in run_error(capsys, base_args(data32, tokenizer_dir, tmp_path / "d", "--resume",
                                                         str(ckpt), "--max-steps", "8"))
    args = base_args(data32, tokenizer_dir, tmp_path / "e", "--init-from", str(ckpt))
    args[1] = "tiny-llama:hidden_size=32,head_dim=8"
    assert "another model shape" in run_error(capsys, args)
    assert snapshot(reference_run) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data32, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    line = run_error(capsys, base_args(data32, tokenizer_dir, out, "--lr", "1e30", "--save-every", "1",
                                       "--warmup-steps", "0", "--grad-clip", "0"))
    assert "non-finite" in line and "step_0000000" in line
    ckpts = fsdp_train.list_checkpoints(out / "checkpoints")
    assert ckpts and all(m["loss"] == m["loss"] for m in metrics(out))  # only finite losses recorded
    fsdp_train.read_trainer_state(ckpts[-1])
    assert not (out / "final").exists()


def test_new_stage_keeps_optimizer_and_resets_schedule(data32, tokenizer_dir, reference_run, tmp_path):
    ckpt = fsdp_train.list_checkpoints(reference_run / "checkpoints")[-1]
    out = tmp_path / "stage2"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--init-from", ckpt, "--keep-optimizer",
                                "--max-steps", "2", "--warmup-steps", "1", "--no-export")) == 0
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2] and m[0]["lr"] == pytest.approx(1e-3)
    # it continued from the trained weights: its first loss is the reference run's level, not a fresh init's
    assert m[0]["loss"] < metrics(reference_run)[0]["loss"]


def test_resume_auto_with_init_from_resumes_instead_of_reinitialising(data32, tokenizer_dir, reference_run,
                                                                     tmp_path, capsys):
    """--init-from CKPT --resume auto is one command line for a stage's first launch and all its relaunches: while
    --out holds no checkpoint it starts from CKPT, afterwards it resumes --out's own latest checkpoint."""
    init = fsdp_train.list_checkpoints(reference_run / "checkpoints")[-1]
    out = tmp_path / "relaunch"
    args = base_args(data32, tokenizer_dir, out, "--init-from", init, "--resume", "auto", "--max-steps", "4",
                     "--log-every", "1", "--no-export")
    capsys.readouterr()
    assert common.call_main(script.main, args) == 0
    first = capsys.readouterr().out
    assert "no checkpoint in" in first and f"initialised from {init}" in first
    full = trajectory(out)
    shutil.rmtree(fsdp_train.list_checkpoints(out / "checkpoints")[-1])  # as if killed before step 4's checkpoint
    assert common.call_main(script.main, args) == 0
    second = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in second
    assert "initialised from" not in second
    assert [ln.split(" |")[0] for ln in second.splitlines() if ln.startswith("step ")] == ["step 3/4", "step 4/4"]
    assert trajectory(out) == full  # steps 3-4 continue its own step 2 bitwise, not --init-from's weights


def test_resumed_losses_and_exported_logits_agree_with_the_trainer(data32, tokenizer_dir, reference_run, tmp_path):
    """The GPU test's comparisons, run here in fp32: a copy of the reference run resumed from its step-4
    checkpoint recomputes steps 5-6 bitwise; the exported model's logits (transformers' attention) equal the
    trainer's forward of the last checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    args = base_args(data32, tokenizer_dir, out, "--resume", out / "checkpoints" / "step_00000004", "--no-export")
    assert common.call_main(script.main, args) == 0
    assert resumed_loss_error(metrics(reference_run), metrics(out), 4) == 0.0
    _, mesh = fsdp_train.setup_distributed("cpu")
    try:
        ids = torch.randint(5, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
        trainer, exported = trainer_and_export_logits(reference_run, reference_run / "checkpoints" / "step_00000006",
                                                      mesh, torch.device("cpu"), torch.float32, ids)
    finally:
        common.destroy_distributed()
    assert rel_error(exported, trainer) < 1e-5


def test_metrics_count_micro_batches_by_attention_path(data32, tokenizer_dir, reference_run, tmp_path):
    """Every step records its micro-batches by attention path: with --doc-mask rows of several documents take
    varlen; with --no-doc-mask every row is one causal span, so every micro-batch is dense."""
    assert all(sum(r["attn_paths"].values()) == 2 for r in metrics(reference_run))  # 2 micro-batches per step
    assert sum(r["attn_paths"]["varlen"] for r in metrics(reference_run)) > 0
    out = tmp_path / "unmasked"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--no-doc-mask", "--max-steps", "2",
                                                   "--save-every", "0", "--no-final-checkpoint", "--no-export")) == 0
    assert [r["attn_paths"] for r in metrics(out)] == [{"dense": 2, "varlen": 0}] * 2


def test_liger_rope_patch_matches_in_subprocess(tiny_llama_dir):
    """Liger's RoPE kernel (Triton interpreter on CPU) gives the same hidden states as transformers' RoPE.
    A subprocess, because the patch replaces transformers' apply_rotary_pos_emb globally."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import common, fsdp_train, varlen_attention
from liger_kernel.transformers import apply_liger_kernel_to_llama
info, mesh = fsdp_train.setup_distributed("cpu")
config = common.load_config({tiny_llama_dir!r})
opts = fsdp_train.ModelOptions(device=torch.device("cpu"), activation_checkpointing=False,
                               attn_implementation=varlen_attention.register_attention())
ids = torch.randint(5, 500, (1, 24))
mb = varlen_attention.MicroBatch(ids, torch.arange(24).view(1, -1), ids,
                                 torch.tensor([0, 10, 24], dtype=torch.int32), 14, [10, 14], 24, 0, 0)
ref, _ = fsdp_train.prepare_model(config, {tiny_llama_dir!r}, mesh, opts)
with torch.no_grad():
    a = varlen_attention.forward_hidden(ref, mb)
apply_liger_kernel_to_llama(rope=True, rms_norm=False, swiglu=False, cross_entropy=False,
                            fused_linear_cross_entropy=False)
with torch.no_grad():
    b = varlen_attention.forward_hidden(ref, mb)
err = (a - b).abs().max().item()
print("max error", err)
assert err < 1e-4, err
"""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_tied_model_exports_its_trained_weights_in_bf16(data32, tokenizer_dir, tmp_path):
    """A model with tied embeddings (SmolLM2's and Llama-3.2's layout) and a RoPE theta of its own, from an HF
    directory, trained 2 steps and exported in bf16: exactly the last checkpoint's weights cast to bf16, the
    embedding and the output layer still one tensor, no lm_head copy written, the config's tie and theta kept."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = assets.build_tiny_model(tmp_path / "tied", "llama", tokenizer_dir, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    out = tmp_path / "run"
    assert common.call_main(script.main, ["--model", source, "--data", data32, "--out", str(out), "--device", "cpu",
                                          "--batch-tokens", "128", "--micro-batch-tokens", "64", "--max-steps", "2",
                                          "--lr", "1e-2", "--save-every", "0", "--export-dtype", "bf16"]) == 0
    trained = checkpoint_weights(out / "checkpoints" / "step_00000002", tmp_path)
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # still one tensor
    exported = load_file(out / "final" / "model.safetensors")
    assert exported.keys() == trained.keys() - {"lm_head.weight"}
    assert all(torch.equal(exported[k], trained[k].to(torch.bfloat16)) for k in exported)
    before = load_file(Path(source) / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(trained["model.embed_tokens.weight"], before)  # trained, not copied through
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 1e5
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
