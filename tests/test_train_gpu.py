"""GPU checks of the training path (skipped without CUDA; the coordinator runs them on an H100):
the varlen kernels against the per-document reference in bf16 (outputs and gradients), a packed row equals its
documents alone, Liger on == Liger off (loss and gradients) for Llama and Qwen2 shapes, and a 1-GPU FSDP2 bf16
run that trains, checkpoints, resumes and exports."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import fsdp_train
import varlen_attention

from lc_testutil import ROOT, run_script
from test_train import make_packed_data

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_mesh():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    info, mesh = fsdp_train.setup_distributed("cuda")
    yield mesh
    common.destroy_distributed()


@pytest.mark.parametrize("backend", ["auto", "torch_varlen", "flash_attn"])
def test_varlen_kernel_matches_reference_bf16_outputs_and_grads(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend == "flash_attn" and varlen_attention._flash_attn() is None:
        pytest.skip("flash-attn not installed")
    if backend == "torch_varlen" and varlen_attention._torch_varlen() is None:
        pytest.skip("torch has no varlen_attn")
    name = None if backend == "auto" else backend
    torch.manual_seed(0)
    seg = [1, 700, 33, 1290, 2]
    T = sum(seg)
    dev = torch.device("cuda")
    q = torch.randn(T, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor(np.cumsum([0] + seg), dtype=torch.int32, device=dev)
    go = torch.randn(T, 8, 64, device=dev, dtype=torch.bfloat16)
    out = varlen_attention.varlen_attention(q, k, v, cu, max(seg), seg, 0.125, backend=name)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = varlen_attention.reference_varlen_attention(qf, kf, vf, seg, 0.125)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), go.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)


def test_packed_row_equals_documents_alone_bf16(gpu_mesh):
    config = common.config_from_init_spec("tiny-llama:hidden_size=256,head_dim=64,intermediate_size=512")
    model, _ = fsdp_train.prepare_model(config, None, gpu_mesh, fsdp_train.ModelOptions(
        attn_implementation=varlen_attention.register_attention(),
        device=torch.device("cuda"), compute_dtype=torch.bfloat16, liger=False, activation_checkpointing=False))
    backend = varlen_attention.check_attention(model, torch.device("cuda"), torch.bfloat16, config.vocab_size)
    assert "reference" not in backend
    rng = np.random.default_rng(0)
    lens = [100, 333, 67]
    row = {"index": 0, "input_ids": rng.integers(5, 1000, size=500), "doc_lens": np.array(lens), "num_pad": 0}
    mb = varlen_attention.build_micro_batch([row], 500).to("cuda")
    with torch.no_grad():
        packed = varlen_attention.forward_hidden(model, mb)[0].float()
        start = 0
        for n in lens:
            ids = mb.input_ids[:, start:start + n]
            alone = varlen_attention.MicroBatch(ids, torch.arange(n, device="cuda").view(1, -1), ids,
                                  torch.tensor([0, n], dtype=torch.int32, device="cuda"), n, [n], n, 0, 0)
            h = varlen_attention.forward_hidden(model, alone)[0].float()
            rel = ((packed[start:start + n] - h).norm() / h.norm()).item()
            assert rel < 2e-2, (n, rel)
            start += n
    fsdp_train.reshard(model)


LIGER_SCRIPT = r"""
import sys, torch, numpy as np
sys.path.insert(0, {root!r})
import common, fsdp_train, varlen_attention
info, mesh = fsdp_train.setup_distributed("cuda")
config = common.config_from_init_spec({spec!r})
rng = np.random.default_rng(0)
row = {{"index": 0, "input_ids": rng.integers(5, config.vocab_size, size=2048),
        "doc_lens": np.array([1000, 900, 148]), "num_pad": 0}}
mb = varlen_attention.build_micro_batch([row], 2048).to("cuda")
out = {{}}
for liger in (False, True):  # off first: Liger's RoPE patch is global
    model, _ = fsdp_train.prepare_model(config, None, mesh, fsdp_train.ModelOptions(device=torch.device("cuda"),
        attn_implementation=varlen_attention.register_attention(),
        compute_dtype=torch.bfloat16, liger=liger, activation_checkpointing=True, seed=0))
    loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, "liger" if liger else "chunked", 512))
    (loss / mb.n_valid).backward()
    out[liger] = (loss.item() / mb.n_valid, {{k: p.grad.full_tensor().float() for k, p in model.named_parameters()}})
(l0, g0), (l1, g1) = out[False], out[True]
assert abs(l0 - l1) < 2e-2 * abs(l0), (l0, l1)
for k in g0:
    rel = ((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-12)).item()
    assert rel < 5e-2, (k, rel)
print("ok", l0, l1)
"""


@pytest.mark.parametrize("spec", ["llama-3.2-1b:num_hidden_layers=2,vocab_size=32000",
                                  "qwen2.5-1.5b:num_hidden_layers=2,vocab_size=32000"])
def test_liger_on_equals_off_loss_and_grads(spec):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("liger_kernel")
    code = LIGER_SCRIPT.format(root=str(ROOT), spec=spec)
    env = dict(os.environ, TRITON_INTERPRET="0")  # conftest interprets Triton for CPU tests; not here
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_one_gpu_fsdp2_bf16_trains_checkpoints_resumes_exports(tokenizer_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = make_packed_data(tmp_path / "data", seq_len=256, num_rows=16)
    env = {"TRITON_INTERPRET": "0"}  # conftest interprets Triton for CPU tests; real kernels here
    args = ["--init-config", "tiny-llama:hidden_size=256,head_dim=64,intermediate_size=512", "--tokenizer",
            tokenizer_dir, "--data", data, "--batch-tokens", "1024", "--micro-batch-tokens", "512",
            "--max-steps", "6", "--lr", "1e-3", "--save-every", "3"]
    full = run_script("03_continued_pretrain", *args, "--out", tmp_path / "full", torchrun=1, env=env)
    assert full.returncode == 0, full.stderr[-4000:]
    assert "liger rope+rms_norm+swiglu" in full.stdout and "loss liger" in full.stdout
    assert "reference" not in full.stdout.split("attention:")[1].splitlines()[0]
    # resume the finished run from its step-3 checkpoint: steps 4-6 again, records replaced
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    if ckpt.exists():
        resumed = run_script("03_continued_pretrain", *args, "--out", tmp_path / "full", "--resume", str(ckpt),
                             "--no-export", torchrun=1, env=env)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").cuda()
    ids = torch.randint(5, 1000, (1, 64), device="cuda")
    assert torch.isfinite(model(ids).logits).all()
