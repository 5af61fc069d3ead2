"""GPU checks of the training path (skipped without CUDA; the coordinator runs them on an H100), every tolerance a
relative-norm error (lc_testutil.rel_error): the varlen kernels and the dense causal path (SDPA) against the
per-document reference in bf16 (outputs and gradients), a packed row equals its documents alone, Liger on ==
Liger off (loss and gradients) for Llama and Qwen2 shapes, and a 1-GPU FSDP2 bf16 run that trains, checkpoints,
resumes (the resumed losses against the first run's) and exports (the exported model's logits against the
trainer's). The comparisons of the last test are test_train.py's, which test_train_runs.py runs on the CPU too."""
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

from lc_testutil import ROOT, rel_error, run_script
from test_train import make_packed_data, resumed_loss_error, trainer_and_export_logits

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_mesh():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    info, mesh = fsdp_train.setup_distributed("cuda")
    yield mesh
    common.destroy_distributed()


def bf16_qkv(n_tokens: int, seed: int = 0):
    """Random q [T, 8, 64] and k, v [T, 2, 64] (GQA 4:1) in bf16 on CUDA with gradients, an upstream gradient,
    and their fp32 copies for the reference."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    q, k, v = (torch.randn(n_tokens, h, 64, device=dev, generator=g).bfloat16().requires_grad_() for h in (8, 2, 2))
    go = torch.randn(n_tokens, 8, 64, device=dev, generator=g).bfloat16()
    return (q, k, v), go, tuple(t.detach().float().requires_grad_() for t in (q, k, v))


def assert_matches_reference(out, grads, ref, ref_grads, what: str):
    """bf16 kernels against the fp32 reference: outputs within 1e-2 and gradients within 2e-2 (relative norm; bf16
    rounds to 2^-9 relative, a leak across a boundary moves the affected rows by O(1))."""
    err = rel_error(out.float(), ref)
    grad_errs = [rel_error(g.float(), r) for g, r in zip(grads, ref_grads)]
    print(f"{what}: output {err:.2e}, dq/dk/dv {', '.join(f'{e:.2e}' for e in grad_errs)} (relative norm)")
    assert err < 1e-2, (what, err)
    assert max(grad_errs) < 2e-2, (what, grad_errs)


@pytest.mark.parametrize("backend", ["auto", "torch_varlen", "flash_attn"])
def test_varlen_kernel_matches_reference_bf16_outputs_and_grads(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if backend == "flash_attn" and varlen_attention._flash_attn() is None:
        pytest.skip("flash-attn not installed")
    if backend == "torch_varlen" and varlen_attention._torch_varlen() is None:
        pytest.skip("torch has no varlen_attn")
    seg = [1, 700, 33, 1290, 2]
    (q, k, v), go, (qf, kf, vf) = bf16_qkv(sum(seg))
    cu = torch.tensor(np.cumsum([0] + seg), dtype=torch.int32, device="cuda")
    out = varlen_attention.varlen_attention(q, k, v, cu, max(seg), seg, 0.125,
                                            backend=None if backend == "auto" else backend)
    ref = varlen_attention.reference_varlen_attention(qf, kf, vf, seg, 0.125)
    assert_matches_reference(out, torch.autograd.grad(out, (q, k, v), go), ref,
                             torch.autograd.grad(ref, (qf, kf, vf), go.float()), f"varlen {backend}")


def test_dense_causal_path_matches_reference_bf16_outputs_and_grads():
    """Two rows of 1,024 tokens, one document each, the second ending in 100 padding tokens: SDPA causal per row
    (a fused kernel, never the math fallback) against the per-document reference on the real tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (q, k, v), go, (qf, kf, vf) = bf16_qkv(2048, seed=1)
    go[-100:] = 0  # padding is never a target: no gradient reaches its outputs
    kernel = varlen_attention.sdpa_kernel_name(*(t.view(2, 1024, t.shape[1], 64).transpose(1, 2) for t in (q, k, v)),
                                               0.125)
    assert kernel != "math", "SDPA fell back to its math kernel for bf16 causal attention on this GPU"
    out = varlen_attention.dense_causal_attention(q, k, v, 2, 0.125)
    ref = varlen_attention.reference_varlen_attention(qf, kf, vf, [1024, 924, 100], 0.125)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), go.float())
    assert_matches_reference(out[:-100], grads, ref[:-100], ref_grads, f"dense causal ({kernel})")


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
# the mean token loss at init is ~ln(vocab) ~ 10.4 whatever the hidden states: 1e-3 relative is 0.01 nats
loss_rel = abs(l0 - l1) / abs(l0)
grad_rel = {{k: ((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-12)).item() for k in g0}}
worst = max(grad_rel, key=grad_rel.get)
print("loss", l0, l1, "relative", loss_rel, "worst gradient", worst, grad_rel[worst])
assert loss_rel < 1e-3, (l0, l1, loss_rel)
assert grad_rel[worst] < 5e-2, (worst, grad_rel[worst])
print("ok")
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


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_one_gpu_fsdp2_bf16_trains_checkpoints_resumes_exports(gpu_mesh, tokenizer_dir, tmp_path):
    data = make_packed_data(tmp_path / "data", seq_len=256, num_rows=16)
    env = {"TRITON_INTERPRET": "0"}  # conftest interprets Triton for CPU tests; real kernels here
    args = ["--init-config", "tiny-llama:hidden_size=256,head_dim=64,intermediate_size=512", "--tokenizer",
            tokenizer_dir, "--data", data, "--batch-tokens", "1024", "--micro-batch-tokens", "512",
            "--max-steps", "6", "--lr", "1e-3", "--save-every", "3"]
    run = tmp_path / "full"
    full = run_script("03_continued_pretrain", *args, "--out", run, torchrun=1, env=env)
    assert full.returncode == 0, full.stderr[-4000:]
    assert "liger rope+rms_norm+swiglu" in full.stdout and "loss liger" in full.stdout
    attention = full.stdout.split("attention: ")[1].splitlines()[0]
    assert attention.startswith("dense causal: PyTorch SDPA") and "reference" not in attention, attention
    first = metrics(run)
    losses = [r["loss"] for r in first]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(sum(r["attn_paths"].values()) == 2 for r in first)  # 2 micro-batches of 2 rows per step
    # the exported model (transformers' own attention, bf16) against the trainer's forward of its last checkpoint
    ids = torch.randint(5, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    trainer, exported = trainer_and_export_logits(run, run / "checkpoints" / "step_00000006", gpu_mesh,
                                                  torch.device("cuda"), torch.bfloat16, ids)
    err = rel_error(exported, trainer)
    print(f"exported logits against the trainer's: {err:.2e} (relative norm)")
    assert err < 2e-2
    # resume the finished run from its step-3 checkpoint: steps 4-6 again, records replaced, losses as before
    ckpt = run / "checkpoints" / "step_00000003"
    assert ckpt.is_dir(), f"--save-every 3 left no {ckpt.name}: {sorted(p.name for p in ckpt.parent.iterdir())}"
    resumed = run_script("03_continued_pretrain", *args, "--out", run, "--resume", str(ckpt), "--no-export",
                         torchrun=1, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    err = resumed_loss_error(first, metrics(run), 3)
    print(f"resumed losses against the first run's: {err:.2e} (largest relative difference)")
    assert err < 5e-3  # the same weights, data and RNG; bf16 kernels with atomic adds in their backward
