"""File I/O shared by every stage: atomic writes, safe loading, fingerprints."""
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, safe_open, save_file

from common.errors import PipelineError, is_out_of_space


#################################################################################
#                               Atomic writes                                   #
#################################################################################

_UMASK = os.umask(0)   # read once, at import (setting it is process-wide, so not while threads run)
os.umask(_UMASK)


@contextlib.contextmanager
def out_of_space_as_error(folder: Path, unchanged: str) -> Iterator[None]:
    """Writes into `folder` inside: an out-of-space failure becomes a PipelineError naming the folder, saying
    what was kept (`unchanged`) and to free space. Other errors pass through."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        if not is_out_of_space(err):
            raise
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PipelineError(f"could not write to {folder}: no space left (the disk is full, or a file-size or "
                            f"quota limit was reached: {reason}). {unchanged} Free space there (or choose another "
                            f"output folder) and rerun.") from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A stage killed mid-write leaves at most a hidden temporary file, never a file a later
    stage (or the orchestrator's skip logic) would take for finished work. Raises PipelineError
    (naming the folder, `path` unchanged) when the disk is full.
    """
    path = Path(path)
    with out_of_space_as_error(path.parent, f"{path.name} there is as it was before."):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            # After the writer (some write a file of their own over tmp): mkstemp's 0600 becomes the usual mode.
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, Any] | None = None) -> None:
    """Atomically write a safetensors file; metadata values that are not strings are stored as JSON."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


#################################################################################
#                               Safe loading                                    #
#################################################################################

def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a safetensors file, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    require_file(path, "safetensors file")
    refuse_lfs_pointer(path, "a safetensors file")
    try:
        return load_file(str(path)), read_safetensors_metadata(path)
    except Exception as err:  # safetensors raises its own types for corrupt headers
        raise PipelineError(f"{path} is not a readable safetensors file ({err}).") from err


def torch_load_weights(path: str | os.PathLike, what: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed.

    mmap=True (zip-format files only) maps the tensors instead of reading them: for large checkpoints
    of which only a part is used (e.g. the EMA weights of a file that also holds the optimizer state).
    """
    require_file(path, what)
    refuse_lfs_pointer(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise PipelineError(
            f"{path} was refused: it is not a plain weights file (it holds Python objects that "
            f"would run code when unpickled, or it is not a torch file at all). Nothing of it was "
            f"executed. Expected {what}.{unpickler_reason(err)}") from err
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        # Corrupt pickles fail inside the weights-only unpickler in many ways (~6% of random files give
        # IndexError or KeyError, which made test_dit_checkpoint_file_errors flaky).
        raise PipelineError(f"{path} could not be read as {what}: {err!r}") from err


def load_any_weights(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a .safetensors (tensors, metadata) or a torch file (object, {}) without unpickling code."""
    if Path(path).suffix == ".safetensors":
        return load_safetensors(path)
    obj = torch_load_weights(path, what)
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not {what}.")
    return obj, {}


def unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason (e.g. the global it refused), without torch's generic advice to
    retry with weights_only=False, which this project never does; '' when torch gives none."""
    prefix = "WeightsUnpickler error:"
    reasons = [line.strip()[len(prefix):].strip() for line in str(err).splitlines() if line.strip().startswith(prefix)]
    return f" The unpickler says: {reasons[0]}" if reasons else ""


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise PipelineError(f"{what} not found: {path}{hint}. Check the path.")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


#################################################################################
#                        Several files replaced together                        #
#################################################################################

STAGING_DIR = ".staging"                  # hidden: scan_dataset and scan_generated never take it for data
REPLACING_MARKER = ".replacing.json"      # present only while files move from staging into place


@contextlib.contextmanager
def replaced_together(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder inside `folder` to write a set of files into; when the block succeeds, move
    them all into `folder` (os.replace, same file system: no space needed; files of the same names are replaced,
    other files left alone). `names`: the files the block must write (RuntimeError if one is missing); None:
    whatever it wrote.

    When the block raises, `folder` is left as it was: a disk that fills up fails the block while `folder` still
    holds the previous set, complete (PipelineError naming the folder). While the files move, folder/.replacing.json
    exists: a process killed mid-move leaves it, and interrupted_replace(folder) tells a reader that the files
    may mix two runs. The staging folder is removed in every case.
    """
    folder = Path(folder)
    staging = folder / STAGING_DIR
    with out_of_space_as_error(folder, f"{folder} was left as it was."):
        shutil.rmtree(staging, ignore_errors=True)     # a killed run's leftovers
        staging.mkdir(parents=True)
        try:
            yield staging
            written = tuple(sorted(path.name for path in staging.iterdir()))
            missing = [name for name in names or () if name not in written]
            if missing:
                raise RuntimeError(f"replaced_together: the block did not write {missing}")
            write_text(folder / REPLACING_MARKER, json.dumps(list(written)))
            for name in written:
                os.replace(staging / name, folder / name)
            (folder / REPLACING_MARKER).unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def interrupted_replace(folder: str | os.PathLike) -> bool:
    """True when a replaced_together() into `folder` stopped while moving its files into place."""
    return (Path(folder) / REPLACING_MARKER).is_file()


LFS_POINTER_PREFIX = b"version https://git-lfs"


def refuse_lfs_pointer(path: str | os.PathLike, what: str) -> None:
    """Raise PipelineError when `path` is a Git LFS pointer (a clone made without git-lfs) instead of `what`."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
    except OSError:
        return      # the loader reports an unreadable file itself
    if head == LFS_POINTER_PREFIX:
        raise PipelineError(f"{path} is a Git LFS pointer (a small text file standing in for {what}), not the "
                            "file itself: run `git lfs pull` in its repository (install git-lfs first), or "
                            "download the file directly.")
