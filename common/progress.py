"""Progress that reads well both in a terminal and in a saved log.

In a terminal: tqdm bars. Elsewhere (a Kaggle notebook's saved output, CI, nohup, a pipe) a redrawn bar is a
wall of carriage returns, so progress is a whole line now and then: at the start, every LINE_EVERY_S seconds
or further 10% of the work, and at the end, flushed, with no carriage returns or escape codes. Progress goes
to stderr, as tqdm's does; stdout keeps the stages' messages.

Either way the percentage and the time left follow the loop's real stopping rule (Tqdm): a clock budget that
may end it before `total` (budget_s), or an early stop that may end it sooner (upper_bound: 'at most ... left').
"""
import io
import sys
import time
from typing import NamedTuple

from tqdm import tqdm

LINE_EVERY_S = 30.0
LINE_STEPS = 10   # ... and a line at every further tenth of the work


def is_terminal() -> bool:
    """Whether the user watches the progress stream live (then bars are redrawn in place)."""
    return sys.stderr.isatty()


def due(now: float, last_time: float, done: int, last_done: int, total: int | None) -> bool:
    """Time for the next progress line: LINE_EVERY_S seconds or a further tenth of `total` since the last one."""
    if now - last_time >= LINE_EVERY_S:
        return True
    return bool(total) and done * LINE_STEPS // total > last_done * LINE_STEPS // total


def print_line(text: str) -> None:
    """A message on stdout, flushed at once (so that it comes before what a child process writes next)."""
    print(text, file=sys.stdout, flush=True)


def progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Estimate(NamedTuple):
    """Where a loop stands: the fraction done (0..1), the seconds left (None: unknown), and whether that is
    only an upper bound (the loop may stop sooner)."""
    fraction: float
    left_s: float | None
    at_most: bool


def estimate(n: float, total: float, elapsed: float, rate: float | None, budget_s: float | None = None,
             upper_bound: bool = False) -> Estimate:
    """The progress of a loop that ends after `total` steps or `budget_s` seconds (from its start), whichever
    comes first: fraction = max(n / total, elapsed / budget_s), seconds left = min((total - n) / rate,
    budget_s - elapsed). `rate` in steps/s (None or 0: not known yet, then the clock alone bounds the time left).
    upper_bound: the loop may stop before either (early stopping on a plateau), so the time left is at most."""
    steps_left = (total - n) / rate if rate else None
    if budget_s is None:
        return Estimate(min(1.0, n / total), steps_left, upper_bound)
    clock_left = max(0.0, budget_s - elapsed)
    left = clock_left if steps_left is None else min(steps_left, clock_left)
    return Estimate(min(1.0, max(n / total, elapsed / budget_s)), left, upper_bound or steps_left is None)


class Tqdm(tqdm):
    """tqdm whose percentage, bar and time left follow the loop's stopping rule (see `estimate`).

    budget_s: a clock budget in seconds from the bar's creation that ends the loop if `total` is not reached
    first (the tokenizer's --max_minutes): without it a 10,000-step run stopped by a 25-minute budget would
    say hours left. upper_bound: `total` is the most the loop runs ('120/up to 400 step', 'at most 0:01:20
    left'), for early stopping. The counts shown (n/total) stay the steps done and asked for.
    """

    def __init__(self, *args, budget_s: float | None = None, upper_bound: bool = False, **kwargs):
        self.budget_s, self.upper_bound = budget_s, upper_bound
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "budget_s": self.budget_s, "upper_bound": self.upper_bound}

    @staticmethod
    def format_meter(n, total, elapsed, budget_s=None, upper_bound=False, rate=None, initial=0, bar_format=None,
                     unit_scale=False, unit_divisor=1000, ncols=None, **kwargs) -> str:
        plain = dict(rate=rate, initial=initial, unit_scale=unit_scale, unit_divisor=unit_divisor, **kwargs)
        if not total or (budget_s is None and not upper_bound):
            return tqdm.format_meter(n, total, elapsed, bar_format=bar_format, ncols=ncols, **plain)
        if rate is None and elapsed:
            rate = (n - initial) / elapsed
        where = estimate(n, total, elapsed, rate, budget_s, upper_bound)
        left = "?" if where.left_s is None else ("at most " if where.at_most else "") + tqdm.format_interval(where.left_s)
        count = (lambda x: tqdm.format_sizeof(x, divisor=unit_divisor)) if unit_scale else str
        # tqdm draws the bar and the percentage from n / total: hand it the fraction of the real stopping rule,
        # and the texts it would derive from n (counts, time left) as ours, which its format dict lets override.
        return tqdm.format_meter(
            where.fraction * total, total, elapsed, bar_format=bar_format or DEFAULT_BAR, ncols=ncols or None,
            **{**plain, "rate": rate}, n_fmt=count(n), total_fmt=("up to " if upper_bound else "") + count(total),
            remaining=left, remaining_s=where.left_s or 0)


# tqdm's default layout, spelled out so that format_meter's overrides reach its right side
DEFAULT_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineTqdm(Tqdm):
    """tqdm that prints plain lines to stderr when they are due (see the module docstring)."""
    monitor_interval = 0   # no monitor thread redrawing behind our back

    def __init__(self, *args, **kwargs):
        self._last_line = (-float("inf"), -1)   # (time, n) of the last line printed
        kwargs.pop("dynamic_ncols", None), kwargs.pop("position", None)
        bar_format = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, " \
                     "{remaining} left, {rate_fmt}{postfix}"
        if kwargs.get("total") is None and not hasattr(args[0] if args else kwargs.get("iterable"), "__len__"):
            bar_format = "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}{postfix}"
        # tqdm's own writes (the bar, the closing newline) go nowhere; display() prints the lines.
        super().__init__(*args, **kwargs, file=io.StringIO(), mininterval=0, miniters=1, ascii=True,
                         bar_format=bar_format)

    def display(self, msg=None, pos=None) -> bool:
        closing = self.disable   # close() sets it before its last display()
        now, (last_time, last_n) = time.monotonic(), self._last_line
        if self.n != last_n and (closing or last_n < 0 or due(now, last_time, self.n, last_n, self.total)):
            self._last_line = (now, self.n)
            progress_line(self.format_meter(**self.format_dict))
        return True


def progress_bar(*args, budget_s: float | None = None, upper_bound: bool = False, **kwargs) -> tqdm:
    """tqdm(...) with the same arguments: a bar in a terminal, occasional plain lines elsewhere; budget_s (a
    clock budget, seconds) and upper_bound (an early stop) make its estimate follow the loop's stopping rule
    (Tqdm)."""
    if kwargs.get("disable"):
        return tqdm(*args, **kwargs)
    return (Tqdm if is_terminal() else LineTqdm)(*args, budget_s=budget_s, upper_bound=upper_bound, **kwargs)
