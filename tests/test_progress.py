"""Progress tells the truth: the percentage and the time left follow the loop's real stopping rule (a clock
budget, the step count, or an early stop), in a terminal bar and in the plain lines of a log alike."""
import io
import re

import pytest

from common import progress
from helpers import make_dataset, track_image, train_in_process
from tokenizer.cli import TokenizerOptions
from tokenizer.train import train_tokenizer
from training import callbacks

STEPS, BUDGET_S = 10_000, 25 * 60       # the tokenizer's --steps default-sized run with --max_minutes 25
INTERVAL = r"(?:(\d+):)?(\d+):(\d+)"     # tqdm.format_interval: [H:]MM:SS


def seconds(text: str) -> int:
    hours, minutes, secs = re.fullmatch(INTERVAL, text).groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs)


def run_for(mode: str, monkeypatch, capsys, seconds_elapsed: float, steps_done: int, **rule) -> str:
    """The progress text a run of STEPS steps shows after `steps_done` steps in `seconds_elapsed` (a fake clock):
    the bar a terminal is redrawn with, or the last plain line of a log."""
    monkeypatch.setattr(progress, "is_terminal", lambda: mode == "terminal")
    out = io.StringIO()
    bar = progress.progress_bar(total=STEPS, desc="tokenizer", unit="step", **rule,
                                **({"file": out} if mode == "terminal" else {}))
    assert isinstance(bar, progress.LineTqdm) == (mode == "line")
    clock = [1000.0]
    # tqdm's own test hook (its tests' cpu_timify): the bar reads this clock for elapsed time and rate
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    clock[0] += seconds_elapsed
    bar.update(steps_done)
    if mode == "terminal":
        bar.refresh()
        text = out.getvalue().split("\r")[-1]
    else:
        bar.close()
        text = capsys.readouterr().err.strip().splitlines()[-1]
    return text


def time_left(text: str) -> str:
    return re.search(rf"(?:<|, )((?:at most )?{INTERVAL}|\?)(?:,| left)", text).group(1)


@pytest.mark.parametrize("mode", ["terminal", "line"])
def test_a_clock_budget_that_ends_the_run_first_sets_the_time_left(mode, monkeypatch, capsys):
    # 100 of 10,000 steps in 5 minutes: the steps alone would take 8 h 15 min more, the budget ends it in 20
    text = run_for(mode, monkeypatch, capsys, 300, 100, budget_s=BUDGET_S)
    assert seconds(time_left(text)) == 20 * 60, text
    assert re.search(r"\b20%", text) and "100/10000" in text, text


@pytest.mark.parametrize("mode", ["terminal", "line"])
def test_steps_that_end_the_run_before_the_budget_set_the_time_left(mode, monkeypatch, capsys):
    # 5,000 steps in 5 minutes: 5 more minutes of steps, well inside the 20 left of the budget
    text = run_for(mode, monkeypatch, capsys, 300, 5000, budget_s=BUDGET_S)
    assert seconds(time_left(text)) == 5 * 60, text
    assert re.search(r"\b50%", text), text


@pytest.mark.parametrize("mode", ["terminal", "line"])
def test_without_a_budget_the_steps_alone_set_the_time_left(mode, monkeypatch, capsys):
    text = run_for(mode, monkeypatch, capsys, 300, 100)
    assert abs(seconds(time_left(text)) - 9900 * 3) <= 1, text     # 9,900 steps at 3 s each; tqdm rounds down
    assert re.search(r"\b1%", text), text


@pytest.mark.parametrize("mode", ["terminal", "line"])
def test_an_early_stop_makes_the_time_left_an_upper_bound(mode, monkeypatch, capsys):
    text = run_for(mode, monkeypatch, capsys, 300, 100, upper_bound=True)
    left = time_left(text)
    assert left.startswith("at most ") and abs(seconds(left.removeprefix("at most ")) - 9900 * 3) <= 1, text
    assert "100/up to 10000" in text, text


def test_before_the_first_step_a_budget_still_bounds_the_time_left():
    where = progress.estimate(0, STEPS, 0.0, None, budget_s=BUDGET_S)
    assert where == progress.Estimate(0.0, BUDGET_S, True)
    assert progress.estimate(0, STEPS, 0.0, None) == progress.Estimate(0.0, None, False)


@pytest.mark.slow
def test_the_tokenizer_progress_follows_max_minutes(tmp_path, capsys, one_thread):
    """The issue's case at tiny size: --steps 10000 with a --max_minutes budget of 3 s. Every progress line's
    time left is within the budget, however slow the machine (the steps alone would take minutes)."""
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=4, val_per_user=1, draw=track_image)
    options = TokenizerOptions.defaults(data_dir=data, output_path=tmp_path / "tok.safetensors", steps=STEPS,
                                        max_minutes=0.05, width=8, num_res_blocks=1, image_size=32, batch_size=4,
                                        device="cpu", eval_every=0)
    capsys.readouterr()
    summary = train_tokenizer(options, progress=True, log=lambda *a: None)
    assert summary["steps"] < STEPS
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenizer: ")]
    assert len(lines) >= 2, lines
    for line in lines:
        left = time_left(line)
        assert left == "?" or seconds(left.removeprefix("at most ")) <= 3, line
    assert seconds(time_left(lines[-1])) == 0 and "(100%)" in lines[-1], lines[-1]


@pytest.mark.slow
def test_stage2_terminal_bar_counts_the_run_not_the_epoch(tmp_path, latent_dir, monkeypatch, one_thread):
    """In a terminal, stage 2's bar runs over all the run's steps across epochs (Lightning's own restarts every
    epoch, so its time left was the epoch's), and a resumed run's bar starts at the resumed step."""
    seen = []

    def record_end(self, *args):
        bar = self.train_progress_bar
        seen.append((bar.initial, bar.n, bar.total))
        bar.close()
    monkeypatch.setattr(callbacks, "is_terminal", lambda: True)
    monkeypatch.setattr(callbacks.RunProgressBar, "on_train_end", record_end)
    flags = ("--val_every_n_epochs", 1000, "--classifier_steps", 0, "--val_identity_samples", 0)
    # latent_dir: 24 train latents, batch 4 -> 6 steps an epoch; 9 steps span two epochs, then resume to 15.
    train_in_process(latent_dir, tmp_path / "run", "--max_steps", 9, *flags)
    train_in_process(latent_dir, tmp_path / "run", "--max_steps", 15, *flags)
    assert seen == [(0, 9, 9), (9, 15, 15)]
