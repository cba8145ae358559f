"""User-facing errors: a clear message and a non-zero exit, no traceback."""
import errno
import functools
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class PipelineError(Exception):
    """An error the user can fix (bad path, bad data, wrong file). The message says what to do."""


EXIT_USER_ERROR = 2
OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}   # disk full, file-size limit, quota
# The same failures as torch.save's C++ writer and safetensors report them (the errno is lost on the way).
OUT_OF_SPACE_MESSAGES = re.compile(r"basic_ios::clear|PytorchStreamWriter failed writing file|unexpected pos \d+ vs \d+"
                                   r"|file write failed|No space left on device|File too large|Disk quota exceeded"
                                   r"|os error (28|27|122)\b")


def is_out_of_space(err: BaseException) -> bool:
    """Whether a write failed for want of space (ENOSPC, EFBIG under `ulimit -f`, EDQUOT), as any writer says it.
    common.io's writers turn such failures into a PipelineError naming the folder; cli_entry catches the rest."""
    if isinstance(err, OSError) and err.errno in OUT_OF_SPACE_ERRNOS:
        return True
    return isinstance(err, Exception) and bool(OUT_OF_SPACE_MESSAGES.search(str(err)))


@contextmanager
def out_of_memory_advice(what: str, flags: str) -> Iterator[None]:
    """A CUDA out-of-memory error inside becomes a PipelineError naming the flags that need less memory."""
    import torch   # here only: common.errors is imported by the torch-free orchestrator parser (pipeline/cli.py)
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
        except Exception as err:
            if not is_out_of_space(err):
                raise
            # A write outside common.io's writers (e.g. a library's log file) found the disk full.
            where = f" {err.filename}" if getattr(err, "filename", None) else ""
            print(f"error: no space left to write{where} ({str(err).strip().splitlines()[0][:200]}). Free space "
                  f"there (or choose another output folder) and rerun.", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
            sys.exit(130)
    return wrapper
