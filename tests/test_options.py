"""Typed options and shared flag groups: each command's Options fields have the type parsing leaves (no Any), a
flag several commands take is defined once (common/flag_groups.py, common.device.add_device_flag) and read alike
by every command that has it, the stages the orchestrator sends one value to read it alike, and --help shows
each command's flags in named groups."""
import argparse
import inspect
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import common.flag_groups
import data.cli
import evaluation.cli
import generation.cli
import pipeline.cli
import tokenizer.cli
import training.cli
from common.config import Number, flag_type, positive_float, positive_int, returned_type
from common.device import add_device_flag, add_precision_flag, device_word

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"stage1_extract_features.py": data.cli.build_parser, "stage2_train_dit.py": training.cli.build_parser,
           "stage3_inference.py": generation.cli.build_parser, "stage4_evaluate.py": evaluation.cli.build_parser,
           "run_complete_pipeline.py": pipeline.cli.build_parser, "train_tokenizer.py": tokenizer.cli.build_parser}
STAGES = ["stage1_extract_features.py", "stage2_train_dit.py", "stage3_inference.py", "stage4_evaluate.py"]
OPTIONS = [data.cli.ExtractOptions, training.cli.TrainOptions, generation.cli.GenerateOptions,
           evaluation.cli.EvaluateOptions, tokenizer.cli.TokenizerOptions]
SHARED = [add_device_flag, add_precision_flag] + [f for name, f in inspect.getmembers(common.flag_groups, inspect.isfunction)
                              if name.startswith("add_") and f.__module__ == common.flag_groups.__name__]
# Same name, another meaning: each command keeps its own definition (common/flag_groups.py's docstring says why).
OWN_MEANING = {"--output_path", "--init_from", "--precision", "--lr", "--compile"}
# ... where a shared function also defines it: the commands that keep their own (the tokenizer has no 16-mixed).
OWN_DEFINITION = {"--precision": {"train_tokenizer.py"}}
NOT_YET_GROUPED: set[str] = set()     # commands whose shared flags do not come from common/flag_groups.py yet
CLI_SOURCES = sorted(ROOT.glob("*/cli.py")) + [ROOT / "common" / "flag_groups.py", ROOT / "common" / "device.py",
                                               ROOT / "common" / "config.py"]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def reads(action: argparse.Action) -> tuple:
    """How a flag reads its value: action kind, nargs, choices, metavar, and the type (argparse's none = str)."""
    return type(action), action.nargs, action.choices, action.metavar, action.type or str


def added_by(function) -> dict[str, argparse.Action]:
    """The flags a shared function adds to a fresh parser (a per-command default and help given as stand-ins)."""
    parser = argparse.ArgumentParser(add_help=False)
    stand_ins = {"help": "stand-in", "default": 7}
    function(parser, **{name: stand_ins[name] for name in inspect.signature(function).parameters if name != "group"})
    return flags_of(parser)


#################################################################################
#                               Typed options                                   #
#################################################################################

@pytest.mark.parametrize("options, expected", [
    (training.cli.TrainOptions, {"lr": float, "batch_size": int, "use_qknorm": bool, "max_steps": int | None,
                                 "model": str, "precision": str, "latent_dir": str, "init_from": str | None,
                                 "ema_std": float | None, "seed": int}),
    (generation.cli.GenerateOptions, {"user_ids": list[int], "guidance_scale": float, "num_steps": int,
                                      "sampler": str, "guidance_checkpoint": str | None, "device": str}),
    (data.cli.ExtractOptions, {"data_dir": str, "image_size": int, "repa_encoder": str, "devices": int}),
    (evaluation.cli.EvaluateOptions, {"generated_dir": str, "copy_percentile": float, "export_dir": str | None,
                                      "seed": int}),
    (tokenizer.cli.TokenizerOptions, {"batch_size": int | None, "lr": float | None, "decoder_only": bool,
                                      "precision": str | None, "val_fraction": float}),
], ids=lambda v: getattr(v, "__name__", ""))
def test_options_fields_have_the_type_parsing_leaves(options, expected):
    types = {f.name: f.type for f in fields(options)}
    assert {name: types[name] for name in expected} == expected


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.__name__)
def test_no_options_field_is_any(options):
    untyped = [f.name for f in fields(options) if f.type is Any or Any in getattr(f.type, "__args__", ())]
    assert not untyped, f"{options.__name__}: fields typed Any (give their type= checker a return annotation)"


def test_orchestrator_flags_are_typed_too():
    types = {a.dest: flag_type(a) for a in pipeline.cli.build_parser()._actions if a.dest != "help"}
    assert types["stages"] == list[int] and types["generate_user_ids"] == list[int] | None
    assert types["force"] is bool and types["max_epochs"] is int and types["data_dir"] == str | None


def test_flag_type_follows_the_action():
    """Each rule of flag_type on a parser written here, the required rule included."""
    p = argparse.ArgumentParser()
    switch = p.add_argument("--switch", action="store_true")
    number = p.add_argument("--number", type=positive_float, default=1.0)
    counts = p.add_argument("--counts", type=positive_int, nargs="+", default=None)
    word = p.add_argument("--word", choices=["a", "b"], default="a")
    text = p.add_argument("--text")
    fraction = p.add_argument("--fraction", default=0.5)
    device = p.add_argument("--device", type=device_word, default=None, required=True)
    unannotated = p.add_argument("--raw", type=lambda t: t.upper(), default="X")
    assert flag_type(switch) is bool and flag_type(number) is float and flag_type(counts) == list[int] | None
    assert flag_type(word) is str and flag_type(text) == str | None and flag_type(fraction) is float
    assert flag_type(device) is str and flag_type(text, required=True) is str
    assert flag_type(unannotated) is Any   # nothing says what it returns


def test_numeric_checkers_report_their_kind():
    assert returned_type(Number(int, low=3)) is int and returned_type(Number(float, high=2)) is float
    assert returned_type(device_word) is str and returned_type(int) is int


#################################################################################
#                          Flags several commands share                         #
#################################################################################

@pytest.mark.parametrize("function", SHARED, ids=lambda f: f.__name__)
def test_a_shared_flag_is_read_alike_by_every_command_that_takes_it(function):
    """Its kind, nargs, choices, metavar and type in every command are the function's, and so is its default
    unless the function leaves the default to the command."""
    takes_default = "default" in inspect.signature(function).parameters
    takers = 0
    for flag, shared in added_by(function).items():
        for script, build in PARSERS.items():
            action = flags_of(build()).get(flag)
            if action is None or script in OWN_DEFINITION.get(flag, ()):
                continue
            takers += 1
            assert reads(action) == reads(shared), f"{script} reads {flag} unlike {function.__name__}"
            assert takes_default or action.default == shared.default, f"{script} {flag}: another default"
            assert "help" in inspect.signature(function).parameters or action.help == shared.help
    assert takers >= 2, f"{function.__name__}: a shared flag that fewer than two commands take"


def test_no_flag_is_defined_twice():
    """A flag written as add_argument("--name" in two of the command-line modules is one the group functions
    should hold, unless it means another thing in each (OWN_MEANING)."""
    skipped = {str(ROOT / "evaluation" / "cli.py")} if "stage4_evaluate.py" in NOT_YET_GROUPED else set()
    where: dict[str, list[str]] = {}
    for path in CLI_SOURCES:
        if str(path) not in skipped:
            for name in re.findall(r'add_argument\(\s*"(--\w+)"', path.read_text()):
                where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1 and name not in OWN_MEANING}
    assert not twice, f"flags defined more than once: {twice}"
    assert all(len(where.get(name, [])) == 2 for name in OWN_MEANING), "OWN_MEANING lists a flag defined once"


def test_flags_the_orchestrator_sends_to_several_stages_are_read_alike():
    """run_complete_pipeline.py sends a flag's one value to every stage that has it (split_extra_flags), so two
    stages that share a flag must read that value the same way."""
    stage_flags = {script: flags_of(PARSERS[script]()) for script in STAGES}
    shared = {flag for script in STAGES for flag in stage_flags[script]
              if sum(flag in flags for flags in stage_flags.values()) > 1} - {"--help"}
    assert {"--seed", "--device", "--vavae_path", "--image_size"} <= shared
    for flag in shared:
        readings = {script: reads(flags[flag]) for script, flags in stage_flags.items() if flag in flags}
        assert len(set(readings.values())) == 1, f"{flag} is read differently by the stages: {readings}"


@pytest.mark.parametrize("script", sorted(set(PARSERS) - NOT_YET_GROUPED))
def test_help_shows_every_flag_in_a_named_group(script):
    parser = PARSERS[script]()
    text = parser.format_help()
    ungrouped = [a.option_strings[0] for g in parser._action_groups if g is parser._optionals
                 for a in g._group_actions if a.dest not in ("help", "config")]
    assert not ungrouped, f"{script}: flags outside any argument group: {ungrouped}"
    titled = [g.title for g in parser._action_groups if g._group_actions and g is not parser._optionals]
    assert len(titled) >= 3 and all(f"\n{title}:\n" in text for title in titled), f"{script} --help: {titled}"
