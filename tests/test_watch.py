"""Long runs watched and planned: --report-to (tracking.py), --eval-every probes and the short-context alarm
(probes.py), --ac-every / --offload-activations / --tiled-mlp (activation_memory.py) and the fit planner
(memory_plan.py, 03 --plan). Tiny models on the CPU."""
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import activation_memory
import common
import memory_plan
import tracking
from lc_testutil import load_script
from test_train import make_packed_data
from test_sft import make_chats, one_thread  # noqa: F401  (one_thread: an autouse fixture, one OpenMP thread)
from test_train_runs import base_args, metrics, trajectory

script = load_script("03_continued_pretrain")
LLAMA3_8B = memory_plan.Shape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256)


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    return make_packed_data(tmp_path_factory.mktemp("d32") / "d", seq_len=32, num_rows=16)


@pytest.fixture(scope="module")
def data256(tmp_path_factory):
    return make_packed_data(tmp_path_factory.mktemp("d256") / "d", seq_len=256, num_rows=8)


def probe_args(data, tokenizer_dir, out, *extra):
    return ["--init-config", "tiny-llama", "--tokenizer", tokenizer_dir, "--data", data, "--out", str(out),
            "--device", "cpu", "--batch-tokens", "512", "--max-steps", "4", "--save-every", "0", "--no-export",
            "--no-final-checkpoint", "--eval-every", "2", "--probe-niah-task", "niah_single_kv",
            "--probe-lengths", "128,256", "--probe-depths", "50", "--probe-docs", "1", "--probe-short-docs", "2",
            *map(str, extra)]


def test_probes_at_their_steps_and_every_metric_in_tensorboard(data256, tokenizer_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert common.call_main(script.main, probe_args(data256, tokenizer_dir, out, "--lr", "1e-3",
                                                    "--report-to", "tensorboard")) == 0
    printed = capsys.readouterr().out
    records = metrics(out)
    assert [r["step"] for r in records if "probe/short_ppl" in r] == [0, 2, 4]  # before training, then every 2
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    first = records[0]
    assert set(first) >= {"probe/niah", "probe/niah/128", "probe/niah/256", "probe/loss_pos/1-31",
                          "probe/loss_pos/128-255", "probe/short_ppl"}
    assert first["probe/short_ppl"] == pytest.approx(math.exp(7), rel=0.2)  # a random init: ~ln(1024) nats
    assert printed.count("probe step ") == 3 and "warning:" not in printed
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for record in records:
        values = tracking.scalars(record)
        assert values, record
        for name, value in values.items():
            assert logged[name][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, record["step"])


def test_short_context_alarm_fires_when_a_learning_rate_wrecks_the_model(data256, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "wreck"
    assert common.call_main(script.main, probe_args(data256, tokenizer_dir, out, "--lr", "0.3", "--warmup-steps",
                                                    "0", "--max-steps", "2", "--eval-every", "1")) == 0
    printed = capsys.readouterr().out
    rises = [r["probe/short_ppl_rise"] for r in metrics(out) if "probe/short_ppl_rise" in r]
    assert len(rises) == 3 and rises[0] == 0 and max(rises) > 0.05
    warnings = [ln for ln in printed.splitlines() if ln.startswith("warning: short-context perplexity")]
    assert warnings and all("--short-ppl-alarm 5%" in w for w in warnings)


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (OUT/wandb/offline-run-*/run-ID.wandb), read here: a 7-byte header (":W&B",
    0xBEE1, a version byte), then LevelDB log framing in 32 KiB blocks (each piece: CRC-32C 4 bytes, length 2
    bytes, type 1 byte: 1 full, 2 first, 3 middle, 4 last; a block's last < 7 bytes are padding) around W&B's
    protobuf `Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", data[:7]
    records, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the block's tail: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zeros after the last record, or a record being written
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pieces))
            pieces = b""
    return records


def read_wandb_run(run_file: Path, timeout: float = 60) -> tuple:
    """(run record, {step: {name: value}} without W&B's own "_" fields) of a finished run file. W&B's service
    writes the file after run.finish() returns: wait for its last record, "exit"."""
    end = time.time() + timeout
    while not [r for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]:
        assert time.time() < end, f"{run_file} has no exit record"
        time.sleep(0.05)
    run, history = None, {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            run = record.run
        elif record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run, history


def test_wandb_offline_run_holds_every_number_of_every_record(tmp_path, monkeypatch):
    """On a node without network the tracker writes an offline W&B run; read back from its run file, it holds each
    record's numbers at the record's step (nested ones flattened; text, None and NaN left out), the config, and
    the run id derived from OUT, so that a relaunch continues the same run."""
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))  # nothing written outside tmp_path
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest captures the output; W&B need not
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "wandb_reachable", lambda timeout=2.0: False)  # a node without network
    out = tmp_path / "run"
    records = [{"step": 1, "loss": 2.5, "grad_norm": 0.75, "cp_methods": {"ulysses": 2, "local": 1}, "note": "x",
                "mfu": None},
               {"step": 2, "loss": 1.25, "lr": 1e-3, "bad": float("nan")}]
    want = {1: {"loss": 2.5, "grad_norm": 0.75, "cp_methods/ulysses": 2, "cp_methods/local": 1},
            2: {"loss": 1.25, "lr": 1e-3}}
    run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    for launch in (records, records[1:]):  # a run, then its relaunch from a checkpoint at step 1
        before = set((out / "wandb").glob("offline-run-*/*.wandb"))
        tracker = tracking.open_tracker("wandb", out, {"lr": 1e-3})
        assert tracker.mode == "offline"
        for record in launch:
            tracker.log(record)
        tracker.close()
        run_file, = set((out / "wandb").glob("offline-run-*/*.wandb")) - before
        run, history = read_wandb_run(run_file)
        assert run.run_id == run_id and run.project == "longctx"
        assert json.loads(next(i.value_json for i in run.config.update if i.key == "lr")) == 1e-3
        assert history == {r["step"]: want[r["step"]] for r in launch}


def test_tracking_flattens_numbers_and_skips_the_rest():
    rec = {"step": 3, "loss": 1.5, "mfu": None, "cp_methods": {"ulysses": 2, "local": 1}, "ok": True,
           "name": "x", "bad": float("nan")}
    assert tracking.scalars(rec) == {"loss": 1.5, "cp_methods/ulysses": 2.0, "cp_methods/local": 1.0, "ok": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Activation memory: the same arithmetic as full checkpointing.


@pytest.fixture(scope="module")
def full_ac_run(data32, tokenizer_dir, tmp_path_factory):
    """The default: every layer checkpointed (fsdp_train.apply_activation_checkpointing), 3 steps."""
    out = tmp_path_factory.mktemp("ac") / "ref"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--no-export", "--max-steps", "3")) == 0
    return out


@pytest.mark.parametrize("variant", [["--ac-every", "2"], ["--offload-activations"], ["--tiled-mlp", "4"],
                                     ["--tiled-mlp", "4", "--offload-activations"],
                                     ["--tiled-mlp", "auto", "--ac-every", "2"]])
def test_ac_every_and_offload_give_the_default_losses(data32, tokenizer_dir, full_ac_run, tmp_path, variant,
                                                     monkeypatch):
    """3 steps of 03 (2 micro-batches of 64 tokens each): the metrics.jsonl losses and gradient norms of every
    layer checkpointed, also with the MLP over 4 slices of 16 tokens (alone and with offload). --tiled-mlp reaches
    the model: 03 tiles it with the slices asked for, or with auto the planner's rule for a rank's 64 tokens
    (which for this model's hidden size of 64 is one slice)."""
    tiled = []  # the slices 03 hands to activation_memory.tile_mlp

    def tile_mlp(layers, chunks, _tile_mlp=activation_memory.tile_mlp):
        tiled.append(chunks)
        _tile_mlp(layers, chunks)

    monkeypatch.setattr(activation_memory, "tile_mlp", tile_mlp)
    run = tmp_path / "variant"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, run, "--no-export", "--max-steps", "3",
                                                   *variant)) == 0
    asked = variant[variant.index("--tiled-mlp") + 1] if "--tiled-mlp" in variant else None
    if asked == "auto":
        shape = memory_plan.Shape.from_config(common.config_from_init_spec("tiny-llama"))
        assert tiled == [memory_plan.tiled_mlp_chunks(shape, 64)]
    else:
        assert tiled == ([int(asked)] if asked else [])
    for (s1, l1, g1), (s2, l2, g2) in zip(trajectory(full_ac_run), trajectory(run), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-6 and abs(g1 - g2) < 1e-6


def test_offload_hooks_see_exactly_the_checkpointed_layer_inputs():
    """The saved-tensor hooks around torch.utils.checkpoint receive the layer inputs (hidden states) and nothing
    the layers compute: layers x tokens x hidden x 4 bytes with every layer checkpointed, half with every 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for every, layers in ((1, 4), (2, 2)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        stats = activation_memory.checkpoint_layers(model.model.layers, every=every, offload=True)
        ids = torch.randint(0, 128, (1, 24))
        model(input_ids=ids, labels=ids).loss.backward()
        assert stats.saved_bytes == layers * 24 * 32 * 4 and stats.offloaded_bytes == 0  # CPU: nothing moves


# ---------------------------------------------------------------------------------------------------------------
# The fit planner.


def test_planner_parameter_count_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        assert memory_plan.Shape.from_config(config).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seq_len,published_cp", [(65536, 1), (524288, 8)])
def test_planner_on_prolongs_published_settings(seq_len, published_cp):
    """ProLong (Llama-3-8B, 8 x 80 GB): 64K without sequence parallelism, 512K with sequence parallelism 8. The
    planner finds 64K without, 512K only with context parallelism (cp 4 already, 70.5 GiB of 79.6), and the
    published cp 8 fits too; nothing cheaper than its choice fits."""
    best, table = memory_plan.choose(LLAMA3_8B, seq_len, gpus=8)
    assert (best.ac_every, best.offload, best.tiled_mlp) == (1, False, 0)
    assert (best.cp == 1) == (published_cp == 1) and best.cp <= published_cp
    published = memory_plan.estimate(LLAMA3_8B, replace(best, cp=published_cp))
    assert published["total"] <= memory_plan.H100_GIB * 0.9 * 2**30
    assert all(est["total"] > memory_plan.H100_GIB * 0.9 * 2**30 for st, est in table[:-1])  # nothing cheaper fits


def test_planner_components_follow_their_definitions():
    st = memory_plan.Setting(seq_len=65536, gpus=8, cp=2)
    est = memory_plan.estimate(LLAMA3_8B, st)
    assert est["states"] == 12 * LLAMA3_8B.params / 8
    assert est["ckpt inputs"] == 32 * 32768 * 4096 * 2
    assert memory_plan.estimate(LLAMA3_8B, memory_plan.Setting(seq_len=65536, gpus=8, cp=2, offload=True))[
        "ckpt inputs"] == 0
    parts = [v for k, v in est.items() if k not in ("total", "peak at")]
    assert est["peak at"] == "MLP backward" and est["total"] == pytest.approx(sum(parts))
    # a short row peaks at the end of the backward: states, every sharded fp32 gradient, the gathered root
    short = memory_plan.estimate(LLAMA3_8B, memory_plan.Setting(seq_len=1024, gpus=8))
    assert short["peak at"] == "end of backward"
    assert short["total"] == pytest.approx(16 * LLAMA3_8B.params / 8 + short["weights"] + 1024 * 4096 * 2)


def test_tiled_mlp_in_the_planner_drops_the_mlp_activations():
    """With the tiled MLP a layer keeps no [tokens x intermediate] tensor: the kept layers lose exactly the MLP's
    4 (HF) or 3 (Liger) intermediates per token, and the MLP's backward holds one slice's of them."""
    for liger, n in ((False, 4), (True, 3)):
        st = memory_plan.Setting(seq_len=65536, gpus=8, ac_every=0, liger=liger)
        plain, tiled = (memory_plan.estimate(LLAMA3_8B, replace(st, tiled_mlp=c))["kept layers"] for c in (0, 64))
        assert plain - tiled == pytest.approx(31 * 65536 * n * 2 * 14336)
    assert memory_plan.tiled_mlp_chunks(LLAMA3_8B, 65536) == 16 and memory_plan.tiled_mlp_chunks(LLAMA3_8B, 5) == 1
    st = memory_plan.Setting(seq_len=2**20, gpus=8, cp=8)
    auto = memory_plan.estimate(LLAMA3_8B, replace(st, tiled_mlp=memory_plan.AUTO))
    assert auto == memory_plan.estimate(LLAMA3_8B, replace(st, tiled_mlp=32))  # 131,072 tokens per GPU / 4,096
    assert auto["total"] < memory_plan.estimate(LLAMA3_8B, st)["total"]


def test_longest_row_is_the_last_that_fits_and_grows_with_each_option():
    base = memory_plan.Setting(seq_len=1, gpus=8, cp=8)
    limit = memory_plan.H100_GIB * 0.9 * 2**30
    rows = {}
    for name, options in [("plain", {}), *memory_plan.OPTIONS.items()]:
        st = replace(base, **options)
        n = rows[name] = memory_plan.longest_row(LLAMA3_8B, st)
        assert n % (1024 * 8) == 0
        assert memory_plan.estimate(LLAMA3_8B, replace(st, seq_len=n))["total"] <= limit
        assert memory_plan.estimate(LLAMA3_8B, replace(st, seq_len=n + 1024 * 8))["total"] > limit
    assert all(rows[name] > rows["plain"] for name in memory_plan.OPTIONS)
    assert memory_plan.longest_row(LLAMA3_8B, memory_plan.Setting(seq_len=1)) == 0  # 8B's states alone: 96 GB


def test_smallest_setting_tiles_then_offloads_then_both_then_moves_the_states():
    """Past the longest row plain cp 8 trains on 8 GPUs, the planner turns to the tiled MLP, then to offload,
    then to both, then to both with the states on the host, each only when nothing cheaper fits at any cp."""
    base = memory_plan.Setting(seq_len=1, gpus=8, cp=8)
    steps = [({}, (False, False, False)), ({"tiled_mlp": memory_plan.AUTO}, (True, False, False)),
             ({"offload": True}, (False, True, False)),
             ({"tiled_mlp": memory_plan.AUTO, "offload": True}, (True, True, False))]
    lengths = [memory_plan.longest_row(LLAMA3_8B, replace(base, **options)) for options, _ in steps]
    assert lengths == sorted(lengths)
    for seq_len, (_, want) in [*zip(lengths, steps), (lengths[-1] + 65536, ((), (True, True, True)))]:
        best, table = memory_plan.choose(LLAMA3_8B, seq_len, gpus=8)
        assert (bool(best.tiled_mlp), best.offload, best.cpu_offload) == want and best.cp == 8, seq_len
        assert all(est["total"] > memory_plan.H100_GIB * 0.9 * 2**30 for st, est in table[:-1])


def test_chunked_loss_never_holds_a_row_of_logits_or_of_fp32_hidden_states():
    """What the planner assumes of the chunked loss (bf16, as on a GPU without Liger): no allocation in its forward
    and backward is larger than one chunk's fp32 logits or the row's bf16 hidden states (its gradient): neither
    the row's logits nor an fp32 copy of the row's hidden states ever exist."""
    import fsdp_train
    from torch.profiler import ProfilerActivity, profile

    tokens, hidden, vocab, chunk = 4096, 96, 2048, 448  # the last chunk is shorter (64 tokens)
    h = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fsdp_train.chunked_token_loss(h, w, targets, chunk).backward()
    sizes = {e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"}
    assert max(sizes) == chunk * vocab * 4  # one chunk's fp32 logits (3.5 MiB) ...
    assert tokens * hidden * 4 not in sizes and tokens * hidden * 2 in sizes  # ... the row only in bf16


def test_plan_flag_prints_the_table_and_writes_nothing(data32, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert common.call_main(script.main, base_args(data32, tokenizer_dir, out, "--plan", "--ac-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "fit: cp 1, 2 row(s)/micro-batch, no AC" in printed  # a tiny model fits without checkpointing
    assert "plan: this run's setting (cp 1, 2 row(s)/micro-batch, AC every 2)" in printed
    longest = [ln.split("  ")[2] for ln in printed.splitlines() if ln.startswith(("    with ", "    this setting"))]
    assert longest == ["this setting", "with tiled MLP", "with offload", "with cpu-offload",
                       "with tiled MLP, offload, cpu-offload"], longest
    assert not out.exists()


def test_sft_probes_and_tracks_the_same_way(tiny_llama_dir, tmp_path, capsys):
    """04 takes the same --eval-every and --report-to: probe records at steps 0 and 2, every value in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sft = load_script("04_sft")
    out = tmp_path / "sft"
    args = ["--model", tiny_llama_dir, "--data", make_chats(tmp_path / "c.jsonl", n=8), "--out", str(out),
            "--device", "cpu", "--seq-len", "128", "--batch-tokens", "256", "--max-steps", "2", "--lr", "3e-3",
            "--save-every", "0", "--no-final-checkpoint", "--no-export", "--eval-every", "2", "--report-to",
            "tensorboard", "--probe-niah-task", "niah_single_kv", "--probe-lengths", "128", "--probe-depths", "50",
            "--probe-docs", "1", "--probe-short-docs", "2"]
    assert common.call_main(sft.main, args) == 0
    records = metrics(out)
    assert [r["step"] for r in records if "probe/short_ppl" in r] == [0, 2]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for record in records:
        for name, value in tracking.scalars(record).items():
            assert events.Scalars(name)[[e.step for e in events.Scalars(name)].index(record["step"])].value == \
                pytest.approx(value, rel=1e-6, abs=1e-6)


def test_probe_that_cannot_be_built_fails_with_one_line_before_any_output(data256, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    broken = tmp_path / "held_out.jsonl"
    broken.write_text('{"text": "a held-out document"}\n{"text": \n')
    for extra, names in ((["--probe-lengths", "16"], "--probe-lengths"), (["--eval-every", "-1"], "--eval-every"),
                         (["--probe-depths", "50,x"], "--probe-depths: 'x'"), (["--short-ppl-alarm", "nan"], "nan"),
                         (["--probe-data", str(broken)], f"{broken}:2 is not a JSON object")):
        code = common.call_main(script.main, probe_args(data256, tokenizer_dir, out, *extra))
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and names in errors[0] and not out.exists(), (extra, errors)


# The planner against measured peaks. Its stated accuracy (docs/benchmarks.md#fit-planner): within 15%.
PLAN_TOLERANCE = 0.15


def test_planner_predicts_the_peak_torch_allocates_on_the_cpu():
    """The CPU counterpart of --plan's measured step: bench/memory_plan_check.py runs 03's model and two steps
    under torch.profiler's memory profile (every layer checkpointed, the MLP over 4 slices, the checkpointed
    inputs offloaded to memory outside torch's allocator) and the planner predicts the largest allocation."""
    bench = load_script("bench/memory_plan_check")
    cfg = dict(bench.DEFAULTS, shape="a", seq_len=2048, tiled=4, offload=True)
    result = bench.run_one(cfg, dict(os.environ, OMP_NUM_THREADS="1"))
    assert isinstance(result, dict), result
    assert result["saved_bytes"] == 4 * 2048 * 256 * 4  # one input per layer went to the "host"
    assert abs(bench.predict(cfg) / result["measured"] - 1) < PLAN_TOLERANCE, (bench.predict(cfg), result)


@pytest.fixture(scope="module")
def data16k(tmp_path_factory):
    return make_packed_data(tmp_path_factory.mktemp("d16k") / "d", seq_len=16384, num_rows=2, vocab=32000)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--tiled-mlp", "auto", "--offload-activations"]])
def test_plan_on_cuda_predicts_the_measured_peak(data16k, tokenizer_dir, tmp_path, capsys, extra):
    """03 --plan on CUDA runs two steps of the setting and prints the prediction beside the measured peak; on a
    model whose activations and states are GiBs (two layers of the Llama-3.2-1B shape, 16K-token rows) they
    agree within the planner's tolerance."""
    import re

    out = tmp_path / "never"
    args = base_args(data16k, tokenizer_dir, out, "--plan", "--device", "cuda", "--micro-batch-tokens", "16384",
                     "--batch-tokens", "16384", *extra)
    args[args.index("tiny-llama")] = "llama-3.2-1b:num_hidden_layers=2,vocab_size=32000"
    assert common.call_main(script.main, args) == 0
    printed = capsys.readouterr().out
    found = re.search(r"predicted ([\d.]+) GiB, measured peak ([\d.]+) GiB", printed)
    assert found and not out.exists(), printed[-2000:]
    predicted, measured = float(found.group(1)), float(found.group(2))
    assert abs(predicted / measured - 1) < PLAN_TOLERANCE, (predicted, measured)
