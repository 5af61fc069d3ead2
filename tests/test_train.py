"""Training building blocks (varlen_attention.py, fsdp_train.py): micro-batches, attention, loss, accumulation,
PoSE, schedule, weights loading. In-process, tiny models, fp32 on the CPU.

`make_packed_data` writes a dataset in 01's format (docs/data-format.md) directly, so these tests do not depend on
01_prepare_data.py; the script-level tests in test_train_runs.py use it too, and the GPU tests its comparisons of
a resumed run and of an exported model with the trainer."""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import fsdp_train
import varlen_attention
from lc_testutil import rel_error


def make_packed_data(out, seq_len=32, num_rows=8, vocab=1000, seed=0, pad_id=1, max_docs=4, pad_rows=True,
                     stage="01_prepare_data", real_rows=None):
    """A packed training set in 01's format: `num_rows` rows of `seq_len` tokens with random document lengths;
    every other row ends with padding (when `pad_rows`). `real_rows`: a list of token lists (documents) packed
    greedily instead of random tokens."""
    import datasets

    rng = np.random.default_rng(seed)
    cols = {"input_ids": [], "doc_lens": [], "num_pad": [], "source": [], "attn_cost": []}
    docs = list(real_rows or [])
    for r in range(num_rows):
        num_pad = int(rng.integers(1, seq_len // 4)) if pad_rows and r % 2 else 0
        real = seq_len - num_pad
        if docs:
            ids = []
            lens = []
            while len(ids) < real and docs:
                d = docs.pop(0)
                take = d[:real - len(ids)]
                ids += take
                lens.append(len(take))
            num_pad = seq_len - len(ids)
            ids += [pad_id] * num_pad
        else:
            k = int(rng.integers(1, max_docs + 1))
            cuts = sorted(rng.choice(np.arange(1, real), size=min(k - 1, real - 1), replace=False).tolist())
            lens = np.diff([0] + cuts + [real]).tolist()
            ids = rng.integers(5, vocab, size=real).tolist() + [pad_id] * num_pad
        doc_lens = lens + ([num_pad] if num_pad else [])
        cols["input_ids"].append(ids)
        cols["doc_lens"].append(doc_lens)
        cols["num_pad"].append(num_pad)
        cols["source"].append("synthetic")
        cols["attn_cost"].append(int(sum(x * x for x in lens)))
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "doc_lens": datasets.Sequence(datasets.Value("int32")),
                                  "num_pad": datasets.Value("int32"), "source": datasets.Value("string"),
                                  "attn_cost": datasets.Value("int64")})
    datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(out))
    common.write_manifest(out, stage, {}, seq_len=seq_len, boundary="mask", separator=None, packing="best-fit",
                          tokenizer="synthetic", vocab_size=vocab, eos_token_id=0, pad_token_id=pad_id,
                          num_rows=num_rows, num_tokens=num_rows * seq_len)
    return str(out)


def resumed_loss_error(first: list[dict], resumed: list[dict], resume_step: int) -> float:
    """A run's metrics records against the same run resumed from its checkpoint at `resume_step`: the same steps,
    the records up to the checkpoint kept as they were written; returns the largest relative difference of the
    recomputed steps' losses (0.0 where the resume is bitwise)."""
    assert [r["step"] for r in resumed] == [r["step"] for r in first]
    assert resumed[:resume_step] == first[:resume_step]
    later = list(zip(first[resume_step:], resumed[resume_step:]))
    assert later, f"no step after {resume_step} was recomputed"
    return max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in later)


def trainer_and_export_logits(run, checkpoint, mesh, device: torch.device, dtype: torch.dtype, ids: torch.Tensor):
    """Logits [T, vocab] (fp32) of `ids` [1, T] two ways: the trainer's (`checkpoint` loaded into fsdp_train's
    sharded model, run through its own forward: longctx attention, the head inside the root FSDP forward) and the
    export's (RUN/final loaded by transformers, with its own attention)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    final = Path(run) / "final"
    model, _ = fsdp_train.prepare_model(common.load_config(final), None, mesh, fsdp_train.ModelOptions(
        device=device, compute_dtype=dtype, activation_checkpointing=False,
        attn_implementation=varlen_attention.register_attention()))
    fsdp_train.load_checkpoint(checkpoint, model, restore_rng=False)
    n = ids.shape[1]
    row = {"index": 0, "input_ids": ids[0].numpy(), "doc_lens": [n], "num_pad": 0}
    mb = varlen_attention.build_micro_batch([row], n).to(device)
    exported = AutoModelForCausalLM.from_pretrained(final, dtype=dtype).to(device)
    with torch.no_grad():
        ours = fsdp_train.forward_loss(model, mb, lambda hidden, weight: F.linear(hidden, weight))[0].float()
        theirs = exported(ids.to(device)).logits[0].float()
    fsdp_train.reshard(model)
    return ours, theirs


@pytest.fixture(scope="module")
def cpu_mesh():
    info, mesh = fsdp_train.setup_distributed("cpu")
    yield mesh
    common.destroy_distributed()


def tiny_model(mesh, spec="tiny-llama", weights=None, seed=0, ac=False):
    config = common.config_from_init_spec(spec) if weights is None else common.load_config(weights)
    model, _ = fsdp_train.prepare_model(config, weights, mesh, fsdp_train.ModelOptions(
        device=torch.device("cpu"), seed=seed, attn_implementation=varlen_attention.register_attention(),
                                                                      activation_checkpointing=ac))
    return model


def rows_of(lens_list, seq_len, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, (lens, num_pad) in enumerate(lens_list):
        doc_lens = list(lens) + ([num_pad] if num_pad else [])
        rows.append({"index": i, "input_ids": rng.integers(5, vocab, size=seq_len),
                     "doc_lens": np.array(doc_lens), "num_pad": num_pad})
    return rows


# ------------------------------------------------------------------------------------------------------------
# Micro-batches


def test_micro_batch_targets_positions_and_boundaries():
    rows = rows_of([([4, 9], 3), ([16], 0)], 16)
    mb = varlen_attention.build_micro_batch(rows, 16, doc_mask=True)
    ids, t = mb.input_ids[0], mb.targets[0]
    assert mb.input_ids.shape == (1, 32) and mb.cu_seqlens.tolist() == [0, 4, 13, 16, 32]
    assert mb.position_ids[0].tolist() == list(range(16)) * 2  # not reset per document
    # inside a document: the next token; the last token of a document and padding: no target
    assert t[0:3].tolist() == ids[1:4].tolist() and t[3] == -100
    assert t[4:12].tolist() == ids[5:13].tolist() and t[12] == -100
    assert (t[13:16] == -100).all()
    assert t[16:31].tolist() == ids[17:32].tolist() and t[31] == -100
    assert mb.n_valid == 3 + 8 + 15 == int((t != -100).sum())
    assert mb.attn_sq == 16 + 81 + 256 and mb.max_len == 16
    # --no-doc-mask: the real tokens of a row are one segment, padding still its own and never a target
    mb = varlen_attention.build_micro_batch(rows, 16, doc_mask=False)
    assert mb.cu_seqlens.tolist() == [0, 13, 16, 32]
    assert mb.targets[0, 3] == ids[4] and mb.targets[0, 12] == -100 and mb.n_valid == 12 + 15


def test_plan_step_balances_cost_and_covers_rows():
    costs = [100, 1, 50, 49, 2, 99, 10, 11]
    plan = fsdp_train.plan_step(list(range(8)), costs, world_size=2, rows_per_micro=2)
    assert sorted(r for rank in plan for mb in rank for r in mb) == list(range(8))
    assert all(len(mb) == 2 for rank in plan for mb in rank) and len(plan[0]) == 2
    for a in range(2):  # each micro-step: the two ranks' costs are close
        c0, c1 = (sum(costs[r] for r in plan[k][a]) for k in (0, 1))
        assert abs(c0 - c1) <= 2
    assert sum(costs[r] for r in plan[0][0]) > sum(costs[r] for r in plan[0][1])  # expensive micro-steps first


def test_data_order_is_deterministic_and_epoch_wise():
    a, b = fsdp_train.DataOrder(5, seed=3), fsdp_train.DataOrder(5, seed=3)
    first = a.take(0, 12)
    assert first == b.take(0, 12)
    assert sorted(r for e, r in first[:5]) == list(range(5)) and {e for e, _ in first[5:10]} == {1}
    assert a.take(7, 3) == first[7:10]


def test_pose_ids_in_range_and_increasing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = varlen_attention.pose_position_ids(64, 1024, rng)
        assert p[0] == 0 and p[-1] <= 1023 and np.all(np.diff(p) >= 1)
        jumps = np.nonzero(np.diff(p) > 1)[0]
        assert len(jumps) <= 1  # two chunks
        if len(jumps):
            assert 1 <= jumps[0] + 1 <= 32  # chunk 1 length in U{1, (n+1)//2}
    seen_max = max(varlen_attention.pose_position_ids(64, 1024, rng)[-1] for _ in range(300))
    assert seen_max > 900  # the skips cover the target range
    mb = varlen_attention.build_micro_batch(rows_of([([20, 12], 0)], 32), 32, pose_target_len=512, pose_seed=1)
    p = mb.position_ids[0]
    assert p.max() < 512 and bool((p.diff() > 0).all())


@pytest.mark.parametrize("stage", ["03_continued_pretrain", "04_sft"])
def test_lr_schedule_warmup_cosine_min_ratio(stage):
    """Each stage's schedule: linear warmup to the peak, then a cosine down to min_lr_ratio x the peak at the last
    step, against the formula written here."""
    import argparse
    import math

    from lc_testutil import load_script

    args = argparse.Namespace(lr=2e-5, min_lr_ratio=0.1)
    m = [load_script(stage).learning_rate(s, args, 100, 10) / 2e-5 for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[10] == pytest.approx(1.0) and m[-1] == pytest.approx(0.1)
    assert m[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 89)))
    assert all(x >= y - 1e-12 for x, y in zip(m[10:], m[11:]))


# ------------------------------------------------------------------------------------------------------------
# Attention


def dense_doc_reference(q, k, v, seg_lens, scale):
    """A dense [T, T] block-diagonal causal mask, computed by hand (softmax over masked scores)."""
    T = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(seg_lens)), torch.tensor(seg_lens))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_attention_equals_dense_document_reference_outputs_and_grads():
    torch.manual_seed(0)
    seg = [3, 17, 1, 9]
    q = torch.randn(30, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(30, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(30, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(np.cumsum([0] + seg), dtype=torch.int32)
    go = torch.randn(30, 4, 8, dtype=torch.float64)
    out = varlen_attention.varlen_attention(q, k, v, cu, max(seg), None, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = dense_doc_reference(q, k, v, seg, 0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_attention_refuses_calls_without_boundaries(cpu_mesh):
    model = tiny_model(cpu_mesh)
    ids = torch.randint(5, 1000, (1, 8))
    with pytest.raises(RuntimeError, match="without cu_seq_lens_q"):
        model.longctx_forward(ids, torch.arange(8).view(1, -1))


def test_packed_row_logits_equal_each_document_alone(cpu_mesh):
    model = tiny_model(cpu_mesh)
    rows = rows_of([([5, 11, 7], 9)], 32, seed=1)
    mb = varlen_attention.build_micro_batch(rows, 32)
    with torch.no_grad():
        packed = varlen_attention.forward_hidden(model, mb)[0]
        head = model.get_output_embeddings().weight
        start = 0
        for n in [5, 11, 7]:
            ids = mb.input_ids[:, start:start + n]
            alone = varlen_attention.MicroBatch(ids, torch.arange(n).view(1, -1), ids,
                                                torch.tensor([0, n], dtype=torch.int32), n, [n], n, 0, 0)
            h = varlen_attention.forward_hidden(model, alone)[0]
            torch.testing.assert_close(packed[start:start + n] @ head.T, h @ head.T, rtol=1e-4, atol=1e-5)
            start += n


def test_startup_probe_names_backend_and_catches_leaks(cpu_mesh, monkeypatch):
    model = tiny_model(cpu_mesh)
    assert "reference" in varlen_attention.check_attention(model, torch.device("cpu"), torch.float32, 1000)
    # a backend that ignores boundaries (whole-row causal attention) must be refused
    exact = varlen_attention.reference_varlen_attention
    leaky = lambda q, k, v, seg_lens, scale, seg_lens_k=None: exact(q, k, v, [q.shape[0]], scale)  # noqa: E731
    monkeypatch.setattr(varlen_attention, "reference_varlen_attention", leaky)
    with pytest.raises(RuntimeError, match="reference|crosses document boundaries"):
        varlen_attention.check_attention(model, torch.device("cpu"), torch.float32, 1000)


# ------------------------------------------------------------------------------------------------------------
# Dense causal attention for rows of one causal span


def test_rel_error_is_the_relative_norm_of_the_difference():
    torch.manual_seed(0)
    want, noise = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    got = want + 1e-3 * noise
    assert rel_error(got, want) == pytest.approx(1e-3 * noise.norm().item() / want.norm().item(), rel=1e-9)
    assert rel_error(want, want) == 0.0 and rel_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_error(torch.ones(3), torch.zeros(3)) == float("inf")
    # outputs within +-0.03: a 30% error passes atol=2e-2, not a relative-norm bound
    small = 0.03 * want / want.abs().max()
    assert torch.allclose(1.3 * small, small, atol=2e-2) and rel_error(1.3 * small, small) == pytest.approx(0.3)


def test_micro_batch_takes_dense_path_only_where_every_row_is_one_causal_span():
    one_doc = rows_of([([16], 0), ([12], 4)], 16)  # one document per row, the second padded at its end
    several = rows_of([([16], 0), ([5, 11], 0)], 16)
    mb = varlen_attention.build_micro_batch(one_doc, 16)
    assert mb.attn_path == "dense" and mb.dense_rows == 2 and mb.to("cpu").dense_rows == 2
    assert mb.attention_kwargs()["longctx_dense_rows"] == 2
    mixed = varlen_attention.build_micro_batch(several, 16)
    assert mixed.attn_path == "varlen" and "longctx_dense_rows" not in mixed.attention_kwargs()
    unmasked = varlen_attention.build_micro_batch(several, 16, doc_mask=False)  # UltraLong: one span per row
    assert unmasked.attn_path == "dense" and unmasked.dense_rows == 2
    assert varlen_attention.count_attention_paths([mb, mixed, unmasked]) == {"dense": 2, "varlen": 1}
    split = dataclasses.replace(mb, cp=object())  # a row split over a cp group keeps the cp path
    assert varlen_attention.count_attention_paths([split, mixed]) == {"dense": 0, "varlen": 1, "cp": 1}


def test_dense_kernel_equals_hand_written_reference_outputs_and_grads_fp32():
    """Two rows of 24 tokens, the second ending in 5 padding tokens, GQA 4:2, fp32: the dense path's outputs on
    real tokens and its q/k/v gradients (the loss never reads padding) equal a dense document mask written here."""
    torch.manual_seed(0)
    segs = [24, 19, 5]  # row 1, then row 2's document and its padding
    q = torch.randn(48, 4, 8, requires_grad=True)
    k, v = (torch.randn(48, 2, 8, requires_grad=True) for _ in range(2))
    go = torch.randn(48, 4, 8)
    go[43:] = 0  # padding has no target: no gradient reaches its outputs
    out = varlen_attention.dense_causal_attention(q, k, v, 2, 0.3)
    ref = dense_doc_reference(q, k, v, segs, 0.3)
    assert rel_error(out[:43], ref[:43]) < 1e-5
    for g, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        assert rel_error(g, r) < 1e-5


def real_tokens(rows, seq_len) -> torch.Tensor:
    """[rows * seq_len] bool: False on each row's end padding."""
    return torch.cat([torch.arange(seq_len) < seq_len - r["num_pad"] for r in rows])


def dense_equals_varlen(model, mb, rows, seq_len):
    """The dense path against the per-document reference (the same micro-batch on the varlen path, the exact
    per-segment attention on the CPU): hidden states of real tokens, loss and every gradient, fp32, 1e-5."""
    assert mb.attn_path == "dense"
    reference = dataclasses.replace(mb, dense_rows=0)
    before = varlen_attention._ATTN["calls"]["dense"]
    with torch.no_grad():
        hidden = varlen_attention.forward_hidden(model, mb)[0]
        assert varlen_attention._ATTN["calls"]["dense"] - before == model.config.num_hidden_layers
        keep = real_tokens(rows, seq_len)
        assert rel_error(hidden[keep], varlen_attention.forward_hidden(model, reference)[0][keep]) < 1e-5
    fsdp_train.reshard(model)  # a forward without backward leaves FSDP2's root unsharded
    loss, grads = grads_after(model, [mb])
    ref_loss, ref_grads = grads_after(model, [reference])
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in grads.items():
        assert rel_error(g, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_path_equals_per_document_reference_outputs_and_grads(cpu_mesh, tiny_qwen2_dir, family):
    """Llama (GQA 4:2) and Qwen2 (q/k/v bias, GQA): rows of one document, rows with end padding, and --no-doc-mask
    rows of several documents take the dense path and equal the per-document reference."""
    model = tiny_model(cpu_mesh) if family == "llama" else tiny_model(cpu_mesh, weights=tiny_qwen2_dir)
    vocab = model.config.vocab_size
    cases = [(rows_of([([32], 0), ([32], 0)], 32, vocab, seed=3), True),
             (rows_of([([32], 0), ([25], 7), ([20], 12)], 32, vocab, seed=4), True),
             (rows_of([([5, 11, 16], 0), ([9, 13], 10)], 32, vocab, seed=5), False)]
    for rows, doc_mask in cases:
        mb = varlen_attention.build_micro_batch(rows, 32, doc_mask=doc_mask)
        dense_equals_varlen(model, mb, rows, 32)


def test_mixed_micro_batch_takes_varlen_and_equals_its_rows_alone(cpu_mesh):
    """A row of one document beside a row of three must take varlen; its hidden states, loss and gradients equal
    those of each row run alone (the first on the dense path), so a mixed micro-batch loses nothing by it."""
    model = tiny_model(cpu_mesh)
    rows = rows_of([([32], 0), ([7, 9, 10], 6)], 32, seed=6)
    mixed = varlen_attention.build_micro_batch(rows, 32)
    alone = [varlen_attention.build_micro_batch([r], 32) for r in rows]
    assert mixed.attn_path == "varlen" and [mb.attn_path for mb in alone] == ["dense", "varlen"]
    with torch.no_grad():
        together = varlen_attention.forward_hidden(model, mixed)[0]
        apart = torch.cat([varlen_attention.forward_hidden(model, mb)[0] for mb in alone])
    keep = real_tokens(rows, 32)
    assert rel_error(together[keep], apart[keep]) < 1e-5
    fsdp_train.reshard(model)
    loss, grads = grads_after(model, [mixed])
    loss_apart, grads_apart = grads_after(model, alone)  # accumulated, divided by the same global count
    assert loss == pytest.approx(loss_apart, rel=1e-6)
    for name, g in grads.items():
        assert rel_error(g, grads_apart[name]) < 1e-5, name


def test_startup_probe_names_both_paths_and_refuses_a_broken_one(cpu_mesh, monkeypatch):
    model = tiny_model(cpu_mesh)
    desc = varlen_attention.check_attention(model, torch.device("cpu"), torch.float32, 1000)
    assert desc.startswith("dense causal: PyTorch SDPA is_causal=True (") and "; varlen: exact per-document" in desc
    # a dense kernel that lets row 2 read row 1 (causal over the whole flattened micro-batch)
    exact = varlen_attention.dense_causal_attention
    leaky = lambda q, k, v, rows, scale: exact(q, k, v, 1, scale)  # noqa: E731
    monkeypatch.setattr(varlen_attention, "dense_causal_attention", leaky)
    with pytest.raises(RuntimeError, match="dense causal attention .* disagrees with the per-document reference"):
        varlen_attention.check_attention(model, torch.device("cpu"), torch.float32, 1000)
    monkeypatch.undo()
    # a dispatch that never takes the dense path: the probe sees the layers run varlen for a dense micro-batch
    plain = varlen_attention.MicroBatch.attention_kwargs
    monkeypatch.setattr(varlen_attention.MicroBatch, "attention_kwargs",
                        lambda self: {k: v for k, v in plain(self).items() if k != "longctx_dense_rows"})
    with pytest.raises(RuntimeError, match="a dense micro-batch ran .* as {'varlen': 2}"):
        varlen_attention.check_attention(model, torch.device("cpu"), torch.float32, 1000)


# ------------------------------------------------------------------------------------------------------------
# Loss


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(1, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (1, 37))
    t[0, ::5] = -100
    loss = fsdp_train.chunked_token_loss(h, w, t, chunk_size=8)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = torch.nn.functional.cross_entropy((h[0] @ w.T), t[0], reduction="sum")
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_liger_flce_equals_chunked_loss():
    """Liger's fused linear CE (Triton, run by the interpreter on CPU: TRITON_INTERPRET=1) == chunked CE."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by conftest)")
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    h = torch.randn(1, 40, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    t = torch.randint(0, 100, (1, 40))
    t[0, 3::7] = -100
    lig = fsdp_train.liger_token_loss(h, w, t)
    gh, gw = torch.autograd.grad(lig, (h, w))
    ch = fsdp_train.chunked_token_loss(h, w, t, chunk_size=16)
    rh, rw = torch.autograd.grad(ch, (h, w))
    torch.testing.assert_close(lig, ch, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def grads_after(model, micro_batches, impl="chunked"):
    model.zero_grad(set_to_none=True)
    n = sum(mb.n_valid for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss = fsdp_train.forward_loss(model, mb, fsdp_train.ce_loss_fn(mb.targets, impl, chunk_size=24))
        (loss / n).backward()
        total += loss.item()
    return total / n, {k: p.grad.full_tensor().clone() for k, p in model.named_parameters()}


def test_accumulating_k_micro_batches_equals_one_big_batch(cpu_mesh):
    model = tiny_model(cpu_mesh, ac=True)
    rows = rows_of([([10, 22], 0), ([32], 0), ([7, 7, 7], 11), ([31], 1)], 32, seed=2)
    big = [varlen_attention.build_micro_batch(rows, 32)]
    small = [varlen_attention.build_micro_batch([r], 32) for r in rows]
    loss_big, g_big = grads_after(model, big)
    loss_small, g_small = grads_after(model, small)
    assert loss_big == pytest.approx(loss_small, rel=1e-6)
    for k in g_big:
        torch.testing.assert_close(g_small[k], g_big[k], rtol=1e-5, atol=1e-7)
    # global token mean: rows with more valid tokens weigh more (not a mean of per-row means)
    per_row = [grads_after(model, [mb])[0] for mb in small]
    assert loss_big != pytest.approx(sum(per_row) / len(per_row), rel=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Weights: meta-device construction + per-rank shard loading == from_pretrained


def test_meta_init_and_shard_loading_match_from_pretrained(cpu_mesh, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model = tiny_model(cpu_mesh, weights=tiny_qwen2_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (1, 12))
    mb = varlen_attention.MicroBatch(ids, torch.arange(12).view(1, -1), ids, torch.tensor([0, 12], dtype=torch.int32),
                                     12, [12], 12, 0, 0)
    with torch.no_grad():
        ours = varlen_attention.forward_hidden(model, mb) @ model.get_output_embeddings().weight.T
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_random_init_is_deterministic_by_name():
    a = fsdp_train.random_init_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 0.02, seed=3)
    b = fsdp_train.random_init_tensor("model.layers.0.mlp.up_proj.weight", (8, 4), 0.02, seed=3)
    c = fsdp_train.random_init_tensor("model.layers.1.mlp.up_proj.weight", (8, 4), 0.02, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(fsdp_train.random_init_tensor("model.norm.weight", (4,), 0.02, 0), torch.ones(4))


def test_flop_conventions():
    config = common.config_from_init_spec("tiny-llama")
    params = {"non_embedding": 1000}
    f = fsdp_train.step_flops(params, config, n_tokens=64, seq_len=64, attn_sq=32 * 32 * 2)
    L, H, d = 2, 4, 16
    assert f["torchtitan"] == 64 * (6 * 1000 + 12 * L * H * d * 64)
    assert f["causal_doc"] == 6 * 1000 * 64 + 12 * L * H * d * (2 * 32 * 32) / 2
    assert fsdp_train.peak_flops(torch.device("cpu")) is None


def test_chunked_loss_composes_a_distillation_term():
    """04's use: a chunk loss with an extra per-token tensor (teacher hidden states) == the full computation."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    h = torch.randn(1, 29, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    th, tw = torch.randn(1, 29, 16), torch.randn(40, 16)
    t = torch.randint(0, 40, (1, 29))
    t[0, -1] = -100

    def ce_plus_kl(hc, wc, tc, thc):
        logits = F.linear(hc, wc).float()
        kl = F.kl_div(logits.log_softmax(-1), F.linear(thc, tw).float().log_softmax(-1), log_target=True,
                      reduction="none").sum(-1)[tc != -100].sum()
        return F.cross_entropy(logits, tc, ignore_index=-100, reduction="sum") + kl

    got = fsdp_train.chunked_token_loss(h, w, t, chunk_size=8, chunk_loss=ce_plus_kl, extra=[th])
    gh, gw = torch.autograd.grad(got, (h, w))
    ref = ce_plus_kl(h[0], w, t[0], th[0])
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_gpu_test_code_names_what_it_uses():
    """The GPU tests run only where CUDA is: check on the CPU that their code would not die of a NameError.
    (1) no function imports a name the module already imports (a local `import common` in a fixture's teardown
    makes `common` local for the whole function: UnboundLocalError before it); (2) every name the Liger
    subprocess script reads is defined in the script or a builtin."""
    import ast
    import builtins
    import symtable

    path = os.path.join(os.path.dirname(__file__), "test_train_gpu.py")
    source = open(path).read()
    tree = ast.parse(source)
    module_imports = {a.asname or a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                      for a in n.names}
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        local = {a.asname or a.name.split(".")[0] for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
        assert not local & module_imports, (fn.name, local & module_imports)
    import test_train_gpu

    script = test_train_gpu.LIGER_SCRIPT.format(root="/x", spec="tiny-llama")
    top = symtable.symtable(script, "liger_script", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}
    for child in top.get_children():  # comprehensions and lambdas read module names too
        used |= {s.get_name() for s in child.get_symbols() if s.is_global() or s.is_free()}
    assert used - defined - set(dir(builtins)) == set()


def test_stop_signals_put_the_previous_handlers_back_however_the_run_ends():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), fsdp_train.StopSignals() as signals:
        assert signal.getsignal(signal.SIGTERM) is before  # nothing caught until the loop starts
        signals.install()
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the run goes on to save its checkpoint
        assert signals.received == signal.SIGTERM
        raise RuntimeError("the run fails after the handler was installed")
    assert signal.getsignal(signal.SIGTERM) is before
