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
