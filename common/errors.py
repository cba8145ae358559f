"""User-facing errors: a clear message and a non-zero exit, no traceback."""
import functools
import sys
from typing import Callable


class PipelineError(Exception):
    """An error the user can fix (bad path, bad data, wrong file). The message says what to do."""


EXIT_USER_ERROR = 2


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a stage's main(): PipelineError -> 'error: ...' on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
            sys.exit(130)
    return wrapper
