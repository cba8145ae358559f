"""The orchestrator: run stages 1-4 as subprocesses, skip finished ones, pass flags to the stages that take them.

Each stage runs in its own process so that Lightning's DDP launcher (which re-executes the running
script once per GPU) re-executes that stage alone, and so that each stage's memory is freed. Stages run
in the user's working folder, so a relative path means the same file to the orchestrator and to every stage.

A finished stage leaves a marker with its arguments and a fingerprint of the files it read (the images of
--data_dir: names, sizes, mtimes; a weight file such as --vavae_path: its sha256). It is skipped only while
its arguments, those files and the stage before it are unchanged (a redone stage 1 redoes 2, 3 and 4).
"""
import argparse
import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import data.cli
import evaluation.cli
import generation.cli
import training.cli
from common.config import load_project_config
from common.errors import PipelineError
from common.io import file_sha256, read_safetensors_metadata, require_file, write_text
from common.lock import run_lock
from common.progress import print_line
from data.images import IMAGE_EXTENSIONS

ROOT = Path(__file__).resolve().parent.parent
STAGE_SCRIPTS = {1: "stage1_extract_features.py", 2: "stage2_train_dit.py", 3: "stage3_inference.py",
                 4: "stage4_evaluate.py"}
STAGE_DIRS = {1: "latent_features", 2: "trained_models", 3: "generated_images", 4: "evaluation"}
DONE_MARKER = ".stage_complete.json"
LOCK_NAME = "pipeline.lock"   # one pipeline per --output_dir; each stage also locks its own folder
# Flags that say how to run a stage, not what it produces: a change in them alone does not redo the stage.
NOT_COMPARED = {"--restart"}
# Flags naming files a stage reads: a change in those files (not only in the flag) redoes the stage.
INPUT_FLAGS = ("--data_dir", "--vavae_path", "--init_from")


def stage_parsers() -> dict[int, argparse.ArgumentParser]:
    return {i + 1: m.build_parser() for i, m in enumerate([data.cli, training.cli, generation.cli, evaluation.cli])}


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def flag_groups(tokens: list[str]) -> list[list[str]]:
    """['--a', '1', '--b=2', '--c'] -> [['--a', '1'], ['--b', '2'], ['--c']]."""
    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("--"):
            groups.append([token.split("=", 1)[0]] + token.split("=", 1)[1:])
        elif groups:
            groups[-1].append(token)
        else:
            raise PipelineError(f"unexpected argument '{token}'")
    return groups


def split_extra_flags(extra: list[str], parsers: dict[int, argparse.ArgumentParser]) -> dict[int, list[str]]:
    """Route each `--flag [values...]` to every stage whose parser knows it; unknown flags are an error.

    The stage parsers are the one record of which stage takes what (a list of the flag groups each stage takes
    would be a second one); a flag several stages share reads the one value given here alike in each, its
    definition being common/flag_groups.py's (tests/test_options.py checks both)."""
    routed: dict[int, list[str]] = {s: [] for s in parsers}
    for group in flag_groups(extra):
        takers = [s for s, p in parsers.items() if group[0] in flag_names(p)]
        if not takers:
            raise PipelineError(f"no stage takes the flag {group[0]}; see each stage's --help")
        for s in takers:
            routed[s] += group
    return routed


def config_to_flags(values: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in values.items():
        if value is False or value is None:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return flags


def absolute(path: str | None) -> str | None:
    """A path flag as the user meant it (relative to their working folder), independent of any cwd."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def stage_arguments(args: argparse.Namespace, out: Path) -> dict[int, list[str]]:
    """The flags the orchestrator itself derives for each stage (paths between stages, shared sizes)."""
    d = {s: out / name for s, name in STAGE_DIRS.items()}
    data_dir, vavae_path = absolute(args.data_dir), absolute(args.vavae_path)
    users = [str(u) for u in args.generate_user_ids] if args.generate_user_ids else []
    return {
        1: ["--data_dir", data_dir, "--vavae_path", vavae_path, "--output_path", str(d[1]),
            "--batch_size", str(args.batch_size), "--devices", str(args.devices)],
        2: ["--latent_dir", str(d[1]), "--output_dir", str(d[2]), "--batch_size", str(args.batch_size),
            "--max_epochs", str(args.max_epochs), "--devices", str(args.devices),
            "--vavae_path", vavae_path],    # decodes the validation sample grids
        3: ["--dit_checkpoint", str(d[2] / "checkpoints" / "best.ckpt"), "--vavae_path", vavae_path,
            "--output_dir", str(d[3]), "--num_samples_per_user", str(args.num_samples_per_user),
            "--devices", str(args.devices), "--user_ids", *users],
        4: ["--data_dir", data_dir, "--generated_dir", str(d[3]), "--output_dir", str(d[4]), "--vavae_path", vavae_path],
    }


def repa_asked(stage2_argv: list[str]) -> bool:
    """True when stage 2's flags turn REPA on (--repa_weight above 0), so stage 1 must write its targets."""
    weights = flag_values(stage2_argv).get("--repa_weight") or ["0"]
    try:
        return float(weights[-1]) > 0
    except ValueError:   # stage 2's own parser names the bad value
        return False


def default_user_ids(out: Path) -> list[int]:
    """All users of the trained model, when --generate_user_ids is not given."""
    path = require_file(out / STAGE_DIRS[1] / "train.safetensors", "stage 1 latents (run stage 1 first)")
    return read_safetensors_metadata(path)["user_numbers"]


#################################################################################
#                              Done-markers                                     #
#################################################################################

def read_marker(path: Path) -> dict[str, Any] | None:
    """A finished stage's record, or None (absent, or unreadable: the stage runs again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    return {g[0]: g[1:] for g in flag_groups(argv) if g[0] not in NOT_COMPARED}


def changed_flags(recorded: list[str], argv: list[str]) -> list[str]:
    """'--flag: old -> new' for every flag whose values differ between two stage command lines."""
    before, now = flag_values(recorded), flag_values(argv)
    show = lambda values: " ".join(values) if values else "(on)"
    changes = []
    for flag in dict.fromkeys([*before, *now]):
        if flag not in now:
            changes.append(f"{flag} {show(before[flag])} removed")
        elif flag not in before:
            changes.append(f"{flag} {show(now[flag])} added")
        elif before[flag] != now[flag]:
            changes.append(f"{flag}: {show(before[flag])} -> {show(now[flag])}")
    return changes


def fingerprint(path: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stage reads at `path`, cheaply: a folder's image files (count and a digest of their names,
    sizes and mtimes; hidden ones skipped, as scan_dataset does), a file's sha256 (reused from `previous`
    while its size and mtime are unchanged), or {'missing': True}."""
    if path.is_dir():
        digest, count = hashlib.sha256(), 0
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path)
            if file.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in relative.parts) \
                    and file.is_file():
                stat = file.stat()
                digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                count += 1
        return {"images": count, "digest": digest.hexdigest()}
    if path.is_file():
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        if previous and previous.get("stamp") == stamp and "sha256" in previous:
            return previous
        return {"stamp": stamp, "sha256": _sha256(str(path.resolve()), *stamp)}
    return {"missing": True}


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """file_sha256, once per file version in this process (stages 1, 3 and 4 all read the tokenizer)."""
    return file_sha256(path)


def input_fingerprints(argv: list[str], recorded: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """fingerprint() of each file or folder an INPUT_FLAGS flag in `argv` names, keyed by the flag."""
    values, recorded = flag_values(argv), recorded or {}
    return {flag: fingerprint(Path(values[flag][0]), recorded.get(flag))
            for flag in INPUT_FLAGS if values.get(flag)}


def changed_inputs(recorded: dict[str, Any], now: dict[str, Any], argv: list[str]) -> list[str]:
    """'--flag PATH: what changed' for every input whose fingerprint differs from the record."""
    values, changes = flag_values(argv), []
    for flag, print_now in now.items():
        before = recorded.get(flag)
        if before is None or {k: v for k, v in before.items() if k != "stamp"} == \
                {k: v for k, v in print_now.items() if k != "stamp"}:
            continue
        if "images" in print_now and "images" in before:
            what = f"its images changed ({before['images']} -> {print_now['images']} files)" \
                if before["images"] != print_now["images"] else "its images changed (names, sizes or times)"
        else:
            what = "the file changed" if "sha256" in print_now else "it is gone"
        changes.append(f"{flag} {values[flag][0]}: {what}")
    return changes


def rerun_reasons(marker: dict[str, Any] | None, argv: list[str], upstream: float | None,
                  inputs: dict[str, Any] | None = None) -> list[str]:
    """Why a stage must run: no finished record, other arguments, other input files (`inputs`, from
    input_fingerprints), or the stage before it redone since."""
    if marker is None:
        return ["not finished"]
    reasons = changed_flags(marker.get("argv", []), argv)
    if inputs and "inputs" not in marker:
        reasons.append("its record has no fingerprint of the files it read (an older version wrote it)")
    reasons += changed_inputs(marker.get("inputs", {}), inputs or {}, argv)
    if "upstream" in marker and marker["upstream"] != upstream:
        reasons.append("the stage before it was redone since")
    return reasons


def finished_at(folder: Path) -> float | None:
    """The id (finish time) of a stage's finished run, None when it has none."""
    return (read_marker(folder / DONE_MARKER) or {}).get("finished")


def pipeline_lock(out: Path, log=print_line):
    """The orchestrator's lock, `out/pipeline.lock` (common/lock.py): a second pipeline into the same --output_dir
    is refused at once, naming the first. The stages it starts lock their own folders (stage1.lock, ...), other
    files, so this lock never blocks them."""
    return run_lock(out / LOCK_NAME, "pipeline", "another --output_dir", log=log)


def run_pipeline(args: argparse.Namespace, extra: list[str], log=print_line) -> Path:
    """Run the requested stages in order under the pipeline's lock; returns the output folder. Raises
    PipelineError for another pipeline running into the same folder, or a stage that failed."""
    out = Path(absolute(args.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    with pipeline_lock(out, log):
        parsers = stage_parsers()
        routed = split_extra_flags(extra, parsers)
        if args.force and "--restart" not in routed[2]:
            routed[2] = routed[2] + ["--restart"]     # --force trains anew; without it stage 2 would resume
        if repa_asked(routed[2]) and "--repa_encoder" not in routed[1]:
            routed[1] = routed[1] + ["--repa_encoder", "auto"]   # stage 2's REPA reads stage 1's targets
        if "--real_anchored_strength" in routed[3] and "--latent_dir" not in routed[3]:
            routed[3] = routed[3] + ["--latent_dir", str(out / STAGE_DIRS[1])]   # its anchors: stage 1's latents
        for stage in args.stages:
            folder = out / STAGE_DIRS[stage]
            marker = folder / DONE_MARKER
            if stage == 3 and not args.generate_user_ids:
                args.generate_user_ids = default_user_ids(out)
            argv = stage_arguments(args, out)[stage] + routed[stage]
            upstream = finished_at(out / STAGE_DIRS[stage - 1]) if stage > 1 else None
            recorded = read_marker(marker)
            inputs = input_fingerprints(argv, (recorded or {}).get("inputs"))
            reasons = ["--force"] if args.force else rerun_reasons(recorded, argv, upstream, inputs)
            if not reasons:
                log(f"== stage {stage}: already complete in {folder} with these arguments and input files, "
                    "skipped (--force to redo)")
                continue
            if marker.is_file():
                log(f"== stage {stage}: redone ({'; '.join(reasons)})")
            marker.unlink(missing_ok=True)
            log(f"== stage {stage}: python {shlex.join([STAGE_SCRIPTS[stage], *argv])}")   # pastes back into a shell
            started = time.time()
            code = subprocess.call([sys.executable, str(ROOT / STAGE_SCRIPTS[stage]), *argv])
            if code != 0:
                raise PipelineError(f"stage {stage} failed (exit code {code}); its message is above. "
                                    f"Fix it and rerun: finished stages are skipped, stage 2 resumes.")
            record = {"argv": argv, "seconds": round(time.time() - started, 1), "finished": time.time(),
                      "upstream": upstream, "inputs": inputs}
            write_text(marker, json.dumps(record, indent=1))
            log(f"== stage {stage}: finished in {record['seconds']:.0f} s")
        return out


def check_memory_only(args: argparse.Namespace, extra: list[str]) -> int:
    """`--check_memory GB`: stage 2's memory estimate for the flags stage 2 would get; runs no stage.
    Returns stage 2's exit code (0: fits)."""
    argv = ["--batch_size", str(args.batch_size), "--devices", str(args.devices)]
    if args.output_dir:   # stage 1's latents, if they exist already, give the real data sizes
        argv += ["--latent_dir", str(Path(args.output_dir) / STAGE_DIRS[1])]
    argv += split_extra_flags(extra, stage_parsers())[2]
    return subprocess.call([sys.executable, str(ROOT / STAGE_SCRIPTS[2]), *argv], cwd=ROOT)


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str],
                 extra: list[str]) -> list[str]:
    """The orchestrator's --config: its own keys become defaults, other keys go to the stages; flags win."""
    if not args.config:
        return extra
    values = load_config_any(args.config)
    own = {a.dest for a in parser._actions}
    given = {t.split("=", 1)[0].lstrip("-") for t in argv if t.startswith("--")}
    for key, value in values.items():
        if key in own and key not in given:
            setattr(args, key, value)
    return config_to_flags({k: v for k, v in values.items() if k not in own and k not in given}) + extra


def load_config_any(path: str) -> dict[str, Any]:
    """A config whose keys may belong to any stage or to this script, each value checked as its flag would be."""
    return load_project_config(path)
