"""bench/induction_plateau.py: its drills are what it says (every masked position is predictable only by copying
the token one span earlier, and nothing else is masked), and a short run prints the loss and copy accuracy that
its model and rows give when recomputed here."""
import json

import pytest
import torch

from lc_testutil import load_script


def test_repeat_rows_mask_marks_exactly_the_copies():
    bench = load_script("bench/induction_plateau")
    gen = torch.Generator().manual_seed(0)
    x, mask = bench.repeat_rows(64, 48, 50, gen)
    assert x.shape == mask.shape == (64, 48)
    assert int(x.min()) >= 3 and int(x.max()) < 53  # ids 3..vocab+2: specials never drawn
    for row, m in zip(x, mask):
        pos = m.nonzero().flatten()
        assert len(pos) >= 7  # spans of at least 8 tokens, the first copy token not counted
        # the copied span is contiguous and every masked token equals the token one span earlier
        assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[-1]) + 1))
        span = len(pos) + 1
        assert torch.equal(row[pos], row[pos - span])


def run_recorded(monkeypatch, capsys, argv):
    """bench.main(argv), keeping its model and every batch it draws (the functions wrapped, not replaced)."""
    bench = load_script("bench/induction_plateau")
    seen = {"batches": []}
    build, draw = bench.build_model, bench.repeat_rows

    def build_model(args):
        seen["model"], vocab = build(args)
        seen["initial"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
        return seen["model"], vocab

    def repeat_rows(n, seq, vocab, gen):
        seen["batches"].append(draw(n, seq, vocab, gen))
        return seen["batches"][-1]

    monkeypatch.setattr(bench, "build_model", build_model)
    monkeypatch.setattr(bench, "repeat_rows", repeat_rows)
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    return bench, seen, records, printed


def test_short_run_reports_the_loss_and_copy_accuracy_it_measured(monkeypatch, capsys):
    """The numbers printed are recomputed here from the model and the rows: the first step's loss (mean next-token
    cross-entropy of the initial model on the first batch) and the copy accuracy at the end (argmax == the copied
    token, over the masked positions of held-out rows drawn with the bench's seed 10,000 + length)."""
    bench, seen, records, printed = run_recorded(monkeypatch, capsys, [
        "--schedule", "16:2,32:2", "--batch-tokens", "64", "--eval-every", "1", "--eval-lens", "32", "--vocab", "20"])
    assert [(r["step"], r["seq"]) for r in records] == [(1, 16), (2, 16), (3, 32), (4, 32)]
    x, _ = seen["batches"][1]  # batches[0]: the held-out rows, drawn first
    assert x.shape == (4, 16)
    model = seen["model"]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(seen["initial"])
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    first_loss = -logits.log_softmax(-1).gather(2, x[:, 1:, None]).mean().item()
    assert records[0]["loss"] == pytest.approx(first_loss, abs=5e-4)  # printed with 3 decimals
    model.load_state_dict(trained)
    hx, hm = bench.repeat_rows(32, 32, 20, torch.Generator().manual_seed(10_000 + 32))
    assert torch.equal(hx, seen["batches"][0][0])
    with torch.no_grad():
        guess = model(input_ids=hx).logits.argmax(-1)
    copy_acc = sum(int(guess[r, t - 1] == hx[r, t]) for r, t in hm.nonzero().tolist()) / int(hm.sum())
    assert records[-1]["copy_acc"]["32"] == pytest.approx(copy_acc, abs=5e-4)
    assert f"| 4 | 32 | {records[-1]['loss']:.3f} | {100 * copy_acc:.1f}% |" in printed
    assert "(chance 5.0%)" in printed


def test_alternating_schedule_and_shape_overrides(monkeypatch, capsys):
    bench, seen, records, printed = run_recorded(monkeypatch, capsys, [
        "--schedule", "16+32:4", "--batch-tokens", "64", "--eval-every", "1", "--eval-lens", "32", "--vocab", "20",
        "--set", "num_hidden_layers=2", "--init-std", "0.05"])
    assert "schedule 16+32:4" in printed
    # steps 1..4 take the lengths in turn (step % 2 indexes them), each step --batch-tokens tokens of rows
    assert [tuple(x.shape) for x, _ in seen["batches"][1:]] == [(2, 32), (4, 16), (2, 32), (4, 16)]
    assert all(f"| {step} | {seq} |" in printed for step, seq in ((1, 32), (2, 16), (3, 32), (4, 16)))
    config = seen["model"].config
    assert (config.num_hidden_layers, config.initializer_range) == (2, 0.05)
    assert bench.build_model(bench.parse_args(["--set", "num_hidden_layers=2"]))[0].config.num_hidden_layers == 2


def test_bad_schedule_or_override_is_an_argparse_error(capsys):
    bench = load_script("bench/induction_plateau")
    for argv in (["--schedule", "32"], ["--schedule", "a:5"], ["--set", "hidden_size"], ["--set", "=4"]):
        try:
            bench.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    assert "is not" in capsys.readouterr().err
