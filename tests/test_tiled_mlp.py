"""The sequence-tiled MLP (activation_memory.tile_mlp, 03 --tiled-mlp): losses and EVERY gradient equal the
untiled model's (fp32, 1e-6) under FSDP2 on one rank, with per-layer checkpointing, checkpointing every second
layer, offloaded checkpoints and a SwiGLU bound to the MLP as Liger binds its own (Liger's own kernel on CUDA: a
gpu test); under FSDP2 on two gloo ranks (data parallel, and --cp 2 with Ulysses), where the weights' gradients
are reduced across ranks; and it refuses what it cannot slice. The 3-step runs of 03 with --tiled-mlp are in
tests/test_watch.py beside --ac-every and --offload-activations."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import activation_memory
import common
import fsdp_train
import varlen_attention
from lc_testutil import ROOT
from test_train import cpu_mesh, rows_of  # noqa: F401  (cpu_mesh: a fixture)

TOL = 1e-6


class SiLUMul(torch.autograd.Function):
    """Liger's LigerSiLUMulFunction in torch (its Triton kernel does not run in the CPU interpreter): keeps gate
    and up, recomputes the SiLU in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig


def liger_like_forward(self, x):  # LigerSwiGLUMLP.forward with SiLUMul for Liger's kernel
    return self.down_proj(SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


def loss_and_grads(mesh, rows, seq_len, chunks=0, every=1, offload=False, liger_like=False):
    """03's model (FSDP2) with this activation memory setting: the mean loss and every gradient, full."""
    config = common.config_from_init_spec("tiny-llama:num_hidden_layers=3")
    opts = fsdp_train.ModelOptions(device=torch.device("cpu"), activation_checkpointing=False,
                                   attn_implementation=varlen_attention.register_attention())
    model, _ = fsdp_train.prepare_model(config, None, mesh, opts)
    layers = model.get_decoder().layers
    if liger_like:  # bound to each MLP instance as fsdp_train.apply_liger binds Liger's SwiGLU on CUDA
        for layer in layers:
            layer.mlp.forward = types.MethodType(liger_like_forward, layer.mlp)
    if every:
        activation_memory.checkpoint_layers(layers, every, offload)
    if chunks:
        activation_memory.tile_mlp(layers, chunks)
    mb = varlen_attention.build_micro_batch(rows, seq_len)
    loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, "chunked", 24)) / mb.n_valid
    loss.backward()  # 03's loss: the mean over the valid targets
    return loss.item(), {k: p.grad.full_tensor() for k, p in model.named_parameters()}


def assert_equal_runs(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= TOL
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        assert err <= TOL, (name, err)
        if ".mlp." in name:  # gradients large enough that a slice lost or counted twice shows
            assert grads_a[name].abs().max().item() > 1000 * TOL, name


ROWS = rows_of([([10, 22, 7], 2), ([41], 0)], 41, seed=4)  # 82 tokens: 4 slices of 21, 21, 20, 20


@pytest.mark.parametrize("every,offload", [(0, False), (1, False), (2, False), (1, True)],
                         ids=["no-ac", "ac", "ac-every-2", "ac-offload"])
def test_tiled_mlp_equals_untiled_loss_and_every_gradient(cpu_mesh, every, offload):  # noqa: F811
    untiled = loss_and_grads(cpu_mesh, ROWS, 41, every=every, offload=offload)
    assert_equal_runs(loss_and_grads(cpu_mesh, ROWS, 41, chunks=4, every=every, offload=offload), untiled)
    # more slices than a call has tokens: one token per slice (a short probe's call); one slice: no tiling
    assert_equal_runs(loss_and_grads(cpu_mesh, ROWS, 41, chunks=500, every=every, offload=offload), untiled)


def test_tiled_liger_style_swiglu_equals_untiled(cpu_mesh):  # noqa: F811
    """A forward bound to the MLP instance with its own autograd Function (as Liger's SwiGLU is bound on CUDA):
    the tiling wraps it, slices included."""
    untiled = loss_and_grads(cpu_mesh, ROWS, 41, liger_like=True)
    assert_equal_runs(untiled, loss_and_grads(cpu_mesh, ROWS, 41, liger_like=False))  # the stand-in is exact
    assert_equal_runs(loss_and_grads(cpu_mesh, ROWS, 41, chunks=3, liger_like=True), untiled)


@pytest.mark.gpu
def test_tiled_liger_swiglu_on_cuda_equals_untiled():
    """Liger's real SwiGLU (Triton) on CUDA, fp32: tiled == untiled in loss and every gradient."""
    from liger_kernel.transformers.monkey_patch import _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import AutoModelForCausalLM

    config = common.config_from_init_spec("tiny-llama:num_hidden_layers=3")
    ids = torch.randint(5, 1000, (1, 82), device="cuda")
    runs = []
    for chunks in (0, 4):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda()
        for layer in model.model.layers:
            _patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)
        if chunks:
            activation_memory.tile_mlp(model.model.layers, chunks)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.item(), {k: p.grad.cpu() for k, p in model.named_parameters()}))
    assert_equal_runs(*runs)


def test_tiled_mlp_saves_only_its_input_and_sums_weight_gradients_in_fp32():
    """What the forward keeps (the MLP's input, none of its [tokens x intermediate] tensors), and bf16 weight
    gradients summed in fp32 over the slices: within bf16's rounding of the exact fp32 gradient, where summing
    100 slices in bf16 would be off by far more."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    mlp = LlamaMLP(config)
    x = torch.randn(1, 400, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        activation_memory.tile_mlp([type("Layer", (), {"mlp": mlp})()], 100)
        out = mlp(x)
    assert saved == [x.shape]
    exact = torch.autograd.grad(out.sum(), mlp.down_proj.weight)[0]
    mlp.to(torch.bfloat16)
    tiled = torch.autograd.grad(mlp(x.detach().bfloat16()).float().sum(), mlp.down_proj.weight)[0]
    assert tiled.dtype == torch.bfloat16
    assert ((tiled.float() - exact).abs().max() / exact.abs().max()).item() < 2e-2


def test_unsupported_mlp_and_zero_slices_are_refused():
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    config = GemmaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8)
    layer = type("Layer", (), {"mlp": GemmaMLP(config)})()
    with pytest.raises(ValueError, match="llama / qwen2 / mistral families.*not GemmaMLP"):
        activation_memory.tile_mlp([layer], 4)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        activation_memory.tile_mlp([], 0)


# ------------------------------------------------------------------------------------------------------------
# Two gloo ranks: FSDP2 data parallel (each rank its own rows, gradients reduce-scattered) and --cp 2 (Ulysses:
# each rank half of every row, the partial gradients summed over the cp group), tiled == untiled.

WORKER = r"""
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import activation_memory, common, context_parallel, fsdp_train, varlen_attention
from test_train import rows_of
info, mesh = fsdp_train.setup_distributed("cpu")
rank = dist.get_rank()
config = common.config_from_init_spec("tiny-llama:num_hidden_layers=3")

def run(cp_size, chunks, offload):
    cp = context_parallel.setup_context_parallel(cp_size, config, torch.device("cpu"))
    opts = fsdp_train.ModelOptions(device=torch.device("cpu"), activation_checkpointing=False,
                                   attn_implementation=varlen_attention.register_attention())
    model, _ = fsdp_train.prepare_model(config, None, mesh, opts)
    activation_memory.checkpoint_layers(model.get_decoder().layers, 1, offload)
    if chunks:
        activation_memory.tile_mlp(model.get_decoder().layers, chunks)
    # data parallel: rank r reads row r; cp: both ranks hold halves of the same two rows
    rows = rows_of([([10, 22, 7], 2), ([41], 0)], 41, seed=4)
    mb = varlen_attention.build_micro_batch(rows if cp_size > 1 else rows[rank:rank + 1], 41)
    mb = context_parallel.shard_micro_batch(mb, cp)
    n = fsdp_train.global_count(mb.n_valid, torch.device("cpu"))
    loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, "chunked", 16))
    (loss / n).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {{k: p.grad.full_tensor() for k, p in model.named_parameters()}}
    return total.item() / n, grads

result = {{}}
for name, cp_size, offload in (("dp2", 1, False), ("cp2", 2, False), ("cp2_offload", 2, True)):
    (l0, g0), (l1, g1) = run(cp_size, 0, offload), run(cp_size, 4, offload)
    result[name] = {{"loss": [l0, l1], "grad_err": max((g0[k] - g1[k]).abs().max().item() for k in g0),
                    "grad_norm": sum(g.pow(2).sum().item() for g in g0.values()) ** 0.5}}
if rank == 0:
    json.dump(result, open({out!r}, "w"))
"""


def test_two_gloo_ranks_fsdp2_and_cp2_tiled_equals_untiled(tmp_path):
    out = tmp_path / "result.json"
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for name, r in result.items():
        untiled, tiled = r["loss"]
        assert abs(untiled - tiled) <= TOL * max(1.0, abs(untiled)), name
        assert r["grad_err"] <= TOL and r["grad_norm"] > 0, (name, r)
    # the same rows on one rank and on two (data parallel, or split by cp): the same mean loss
    assert result["cp2"]["loss"][0] == pytest.approx(result["dp2"]["loss"][0], rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# 03 --tiled-mlp: bad input is one line before anything is written


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    from test_train import make_packed_data

    return make_packed_data(tmp_path_factory.mktemp("data") / "d", seq_len=32, num_rows=8)


@pytest.mark.parametrize("extra,words", [
    (["--tiled-mlp", "0"], "argument --tiled-mlp: '0' is neither auto nor a number of slices >= 1"),
    (["--tiled-mlp", "65"], "--tiled-mlp 65: more slices than the 64 tokens a rank holds per micro-batch"),
    (["--tiled-mlp", "4", "--init-config", "tiny-llama:model_type=gemma"],
     "supports the SwiGLU MLPs of the llama / qwen2 / mistral families, not model type 'gemma'"),
])
def test_bad_tiled_mlp_is_one_line(data32, tokenizer_dir, tmp_path, capsys, extra, words):
    from lc_testutil import load_script
    from test_train_runs import base_args

    out = tmp_path / "never"
    args = base_args(data32, tokenizer_dir, out, *extra)  # a second --init-config replaces base_args' one
    code = common.call_main(load_script("03_continued_pretrain").main, args)
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and words in errors[0], captured.err[-2000:]
    assert "Traceback" not in captured.err and not out.exists()
