"""One run per output: a lock file naming the run that writes there (pid, host, start time).

Every command that writes a folder (stages 1-4, the orchestrator, the tokenizer trainer) holds one while it
writes: a second run into the same place is refused at once, naming the first, instead of both mixing or
removing each other's files. A lock left by a process that is gone (kill -9, a crash, a reboot) is taken over
with a note. Each command locks its own output (the orchestrator its --output_dir root as `pipeline.lock`, each
stage its own folder), so the orchestrator's lock never blocks the stages it starts; a process that already
holds a lock passes through a second `run_lock` of it (the demo and the pipeline it runs).
"""
import contextlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import PipelineError


def process_identity(pid: int) -> str | None:
    """'boot id:start time' of a live process on this machine (Linux), '' where /proc cannot tell, None if
    the process is gone: a pid reused by another process after a reboot or a container restart differs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass   # alive, another user's
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        return f"{boot}:{start}"
    except (OSError, IndexError):
        return ""


@contextmanager
def run_lock(path: str | os.PathLike, what: str, elsewhere: str, hold: bool = True, log=print) -> Iterator[None]:
    """Hold the lock file `path` for the block: it names this process (pid, host, start time) and is removed at
    the end. `what` names the command in messages ("stage 1"); `elsewhere` is how to run it into another place
    ("another --output_path"). `hold=False` (a DDP worker started under its launcher's lock) takes nothing.

    Raises PipelineError, naming the owner, when a live run holds it; a lock whose process is gone is taken over
    with a note (`log`). A folder made for the lock is removed again when the run leaves it empty.
    """
    path = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process": process_identity(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "what": what}
    if not hold or held_by_this_process(path, me):
        yield
        return
    created = not path.parent.exists()     # removed again if the run leaves it empty (it failed early)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            take_over_stale_lock(path, me, what, elsewhere, log)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise PipelineError(f"could not take the lock {path}: another {what} run keeps starting there")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()


def held_by_this_process(path: Path, me: dict) -> bool:
    """Whether `path` names this very process (a nested run_lock of the same output)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and owner.get("pid") == me["pid"] and owner.get("host") == me["host"] \
        and owner.get("process") == me["process"]


def take_over_stale_lock(path: Path, me: dict, what: str, elsewhere: str, log=print) -> None:
    """Remove `path` if its owner is gone (same host, process dead or a new process under its pid); else raise
    PipelineError naming the owner."""
    owner = read_lock(path)
    if owner is None:
        return
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and host == me["host"]:
        alive = process_identity(pid)
        if alive is None or (alive and owner.get("process") and alive != owner["process"]):
            log(f"note: {path} was left by {owner.get('what', what)} process {pid} (started "
                f"{owner.get('started', '?')}), which is gone: taking it over")
            path.unlink(missing_ok=True)
            return
    who = f"pid {pid} on {host}, started {owner.get('started', '?')}" if owner else "its lock file is unreadable"
    raise PipelineError(
        f"another {owner.get('what', what)} run ({who}) is writing to {path.parent}: two runs would mix or remove "
        f"each other's files. Wait for it to finish, stop it, or pass {elsewhere}. If no such run is "
        f"writing there (a process of another machine that is gone), delete {path} and rerun.")


def read_lock(path: Path) -> dict | None:
    """The owner recorded in a lock file ({} if unreadable, None if gone); a lock just created is read again a moment later."""
    for wait in (0.0, 1.0):
        time.sleep(wait)
        try:
            owner = json.loads(path.read_text())
            if isinstance(owner, dict):
                return owner
        except FileNotFoundError:
            return None   # released meanwhile: the caller tries again
        except (OSError, ValueError):
            pass
    return {}
