"""User-facing errors: a clear message and a non-zero exit, no traceback."""
import functools
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class PipelineError(Exception):
    """An error the user can fix (bad path, bad data, wrong file). The message says what to do."""


EXIT_USER_ERROR = 2


@contextmanager
def out_of_memory_advice(what: str, flags: str) -> Iterator[None]:
    """A CUDA out-of-memory error inside becomes a PipelineError naming the flags that need less memory."""
    import torch
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        first_line = str(err).strip().split("\n")[0][:300]
        raise PipelineError(f"{what} ran out of GPU memory ({first_line}). To use less: {flags}.") from None


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a stage's main(): PipelineError -> 'error: ...' on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # Stdout into a file or pipe (Kaggle, CI, nohup) is block-buffered: flush each line, so that messages,
        # stage headers and the unbuffered stderr warnings appear in the order they happened.
        if getattr(sys.stdout, "line_buffering", True) is False and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)
        try:
            return main(*args, **kwargs)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
            sys.exit(130)
    return wrapper
