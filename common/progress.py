"""Progress that reads well both in a terminal and in a saved log.

In a terminal: tqdm bars. Elsewhere (a Kaggle notebook's saved output, CI, nohup, a pipe) a redrawn bar is a
wall of carriage returns, so progress is a whole line now and then: at the start, every LINE_EVERY_S seconds
or further 10% of the work, and at the end, flushed, with no carriage returns or escape codes. Progress goes
to stderr, as tqdm's does; stdout keeps the stages' messages.
"""
import io
import sys
import time

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


class LineTqdm(tqdm):
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


def progress_bar(*args, **kwargs) -> tqdm:
    """tqdm(...) with the same arguments: a bar in a terminal, occasional plain lines elsewhere."""
    if kwargs.get("disable"):
        return tqdm(*args, **kwargs)
    return tqdm(*args, **kwargs) if is_terminal() else LineTqdm(*args, **kwargs)
