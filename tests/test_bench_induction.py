"""bench/induction_plateau.py: its drills are what it says (every masked position is predictable only by copying
the token one span earlier, and nothing else is masked), and a short run prints its table."""
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


def test_short_run_prints_the_table(capsys):
    bench = load_script("bench/induction_plateau")
    assert bench.main(["--schedule", "16:2,32:2", "--batch-tokens", "64", "--eval-every", "2",
                       "--eval-lens", "32", "--vocab", "20"]) == 0
    out = capsys.readouterr().out
    assert "| step | training rows | loss | copy acc @32 | time |" in out
    assert "| 2 | 16 |" in out and "| 4 | 32 |" in out
    assert "(chance 5.0%)" in out


def test_alternating_schedule_and_shape_overrides(capsys):
    bench = load_script("bench/induction_plateau")
    assert bench.main(["--schedule", "16+32:4", "--batch-tokens", "64", "--eval-every", "1", "--eval-lens", "32",
                       "--vocab", "20", "--set", "num_hidden_layers=2", "--init-std", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "schedule 16+32:4" in out
    # steps 1..4 take the lengths in turn (step % 2 indexes them)
    assert all(f"| {step} | {seq} |" in out for step, seq in ((1, 32), (2, 16), (3, 32), (4, 16)))
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
