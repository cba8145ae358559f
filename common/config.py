"""One config mechanism: YAML files whose keys are flag names; flags on the command line override.

Every numeric flag is checked when it is parsed (the argparse `type=` checkers below), on the command line
and in a config file alike, so that a value no stage could honour (0 images, a NaN guidance scale, an EMA
decay of 1.5) stops with exit code 2 and the flag's name before any model is loaded.
"""
import argparse
import importlib
import inspect
import math
import sys
from dataclasses import fields, make_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

from common.errors import PipelineError

# The modules whose build_parser() makes a command line that reads --config. A shipped config holds keys of
# several of them (the orchestrator routes each key to the stages that take it); a stage script given the same
# config passes over the keys of the others. Imported by name, and only when a config holds a key the running
# command lacks: the stage parsers import torch (model and sampler names), and this module sits below them.
CONFIG_COMMANDS = {"data.cli": "stage1_extract_features.py", "training.cli": "stage2_train_dit.py",
                   "generation.cli": "stage3_inference.py", "evaluation.cli": "stage4_evaluate.py",
                   "pipeline.cli": "run_complete_pipeline.py", "tokenizer.cli": "train_tokenizer.py"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every flag's default (none for unset and switches)."""
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """The parser of a command line of this project (its --help shows the defaults)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


#################################################################################
#                        Numeric flags, checked at parse time                   #
#################################################################################

class Number:
    """An argparse `type=`: text -> a finite int or float within [low, high] (an end excluded when open).

    Raises argparse.ArgumentTypeError (argparse prints it after the flag's name and exits with code 2).
    `invalid` lists values it refuses, `valid` values at its bounds it accepts (for tests over all parsers).
    """
    def __init__(self, kind: type, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, name: str = "number"):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = name   # argparse names the type by it
        # What inspect.signature reports for this checker (options_class types a field by it): text -> `kind`,
        # where __call__'s own annotation can only say int | float.
        self.__signature__ = inspect.Signature(
            [inspect.Parameter("text", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)], return_annotation=kind)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()} (got {text!r})") from None
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {self.describe()} (got {text})")
        return value

    @property
    def invalid(self) -> list[str]:
        bad = ["x"] + (["1.5", "nan"] if self.kind is int else ["nan", "inf", "-inf"])
        if self.low is not None:
            bad.append(repr(self.kind(self.low if self.low_open else self.low - 1)))
        if self.high is not None:
            bad.append(repr(self.kind(self.high if self.high_open else self.high + 1)))
        return bad

    @property
    def valid(self) -> list[str]:
        step = 1 if self.kind is int else 1e-3
        good = [] if self.low is None else [self.low + step if self.low_open else self.low]
        good += [] if self.high is None else [self.high - step if self.high_open else self.high]
        return [repr(self.kind(v)) for v in good]


positive_int = Number(int, low=1, name="positive_int")
non_negative_int = Number(int, low=0, name="non_negative_int")
positive_float = Number(float, low=0, low_open=True, name="positive_float")
non_negative_float = Number(float, low=0, name="non_negative_float")
finite_float = Number(float, name="finite_float")
probability = Number(float, low=0, high=1, name="probability")                     # [0, 1]
below_one = Number(float, low=0, high=1, high_open=True, name="below_one")          # [0, 1): a decay, a beta
open_fraction = Number(float, low=0, high=1, low_open=True, high_open=True, name="open_fraction")   # (0, 1)
ema_width = Number(float, low=0, high=0.28, low_open=True, high_open=True, name="ema_width")   # EDM2's sigma_rel
percentile = Number(float, low=0, high=100, name="percentile")
seed = Number(int, low=0, high=2 ** 32 - 1, name="seed")   # Lightning's seed_everything range (outside: random)


class DistinctValues(argparse.Action):
    """nargs="+" list whose values must differ (`--user_ids 1 1` would say 2 images and write one)."""
    def __call__(self, parser, namespace, values, option_string=None):
        repeated = repeated_values(values)
        if repeated:
            raise argparse.ArgumentError(self, distinct_message(repeated, self.dest))
        setattr(namespace, self.dest, values)


def repeated_values(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(v for i, v in enumerate(values) if v in values[:i]))


def distinct_message(repeated: list[Any], dest: str) -> str:
    hint = " (more images per user: --num_samples_per_user)" if "user" in dest else ""
    return f"lists {', '.join(map(str, repeated))} more than once; give each value once{hint}"


#################################################################################
#                                  Config files                                 #
#################################################################################

def add_config_flag(parser: argparse.ArgumentParser,
                    help: str = "YAML file whose keys are flag names (without --); flags given here win. Keys of "
                                "other stages are passed over with a note") -> None:
    """--config, a YAML file of flag values (load_config; the orchestrator's holds any command's keys)."""
    parser.add_argument("--config", type=str, default=None, help=help)


def flag_key(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def commands_taking(keys: set[str]) -> dict[str, list[str]]:
    """key -> the project's commands that have that flag (keys no command has are left out)."""
    owners: dict[str, list[str]] = {}
    for module, script in CONFIG_COMMANDS.items():
        dests = {a.dest for a in importlib.import_module(module).build_parser()._actions}
        for key in keys & dests:
            owners.setdefault(key, []).append(script)
    return owners


def config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A config value checked as the flag's own parsing would check it (type, bounds, choices, distinct)."""
    def refuse(reason: str) -> PipelineError:
        return PipelineError(f"{where}: {reason}")
    if action.nargs == 0:   # a switch
        if not isinstance(value, bool):
            raise refuse(f"must be true or false (got {value!r})")
        return value
    listed = action.nargs in ("+", "*")
    if isinstance(value, (list, tuple)) != listed:
        raise refuse(f"must be {'a list' if listed else 'a single value'} (got {value!r})")
    items = list(value) if listed else [value]
    checked = []
    for item in items:
        if isinstance(item, (dict, list, tuple)) or (isinstance(item, bool) and action.type is not None):
            raise refuse(f"{item!r} is not a valid value")
        try:
            item = action.type(str(item)) if action.type is not None else item
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise refuse(str(err)) from None
        if action.choices is not None and item not in action.choices:
            raise refuse(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
        checked.append(item)
    if isinstance(action, DistinctValues) and repeated_values(checked):
        raise refuse(distinct_message(repeated_values(checked), action.dest))
    return checked if listed else checked[0]


def load_config(path: str | Path, parser: argparse.ArgumentParser,
                note: Callable[[str], None] | None = None) -> dict:
    """Read a YAML config: its keys that are flags of `parser`, checked as on the command line.

    Keys that are flags of another command of the project (stage or orchestrator) are passed over with a
    one-line note; any other key is an error (PipelineError), as is a value the flag would refuse.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise PipelineError(f"config file {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    values = {flag_key(k): v for k, v in values.items()}
    foreign = set(values) - set(actions)
    owners = commands_taking(foreign) if foreign else {}
    unknown = sorted(foreign - set(owners))
    if unknown:
        raise PipelineError(f"config file {path} has keys that are flags of no command of this project: "
                            f"{', '.join(unknown)}. Valid keys here: "
                            f"{', '.join(sorted(set(actions) - {'help', 'config'}))}")
    if owners:
        (note or (lambda m: print(m, file=sys.stderr)))(
            f"note: {path}: passed over {len(owners)} key(s) that are flags of other commands only: "
            + ", ".join(sorted(owners)))
    # `key:` with no value leaves the flag at its default.
    return {k: config_value(actions[k], v, f"config file {path}, key {k}") for k, v in values.items()
            if k in actions and v is not None}


def load_project_config(path: str | Path) -> dict:
    """A config whose keys may be flags of any command of the project (the orchestrator's --config), each
    value checked by the first command (in CONFIG_COMMANDS order) that has the flag."""
    merged = argparse.ArgumentParser(add_help=False)
    for module in CONFIG_COMMANDS:
        for action in importlib.import_module(module).build_parser()._actions:
            if action.option_strings and action.dest not in {a.dest for a in merged._actions}:
                merged._add_action(action)
    return load_config(path, merged)


def missing_flags(values: dict[str, Any], required: Sequence[str]) -> list[str]:
    """The names in `required` whose value in `values` (parsed flags by name) is unset: None, [] or ""."""
    return [name for name in required if values.get(name) in (None, [], "")]


def require_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, required: Sequence[str]) -> None:
    """Exit 2 naming the flags in `required` that neither the command line nor --config set."""
    missing = missing_flags(vars(args), required)
    if missing:
        parser.error("missing required flag(s): " + " ".join(f"--{m}" for m in missing)
                     + " (on the command line or in --config)")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               required: Sequence[str] = ()) -> argparse.Namespace:
    """Parse flags after applying `--config` as defaults; `required` may come from either place."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    require_flags(parser, args, required)
    return args


#################################################################################
#                 Options: a command's parsed flags, handed on whole              #
#################################################################################

class Options:
    """Base of the options of a command (options_class): a frozen dataclass with one field per flag of its
    parser, named as the flag, so that each flag, its type and its default are written once, in the parser; the
    command's entry function (extract_features, train, generate, evaluate, train_tokenizer) takes it whole."""
    build_parser: ClassVar[Callable[[], argparse.ArgumentParser]]
    required: ClassVar[tuple[str, ...]]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        """From parsed flags (parse_args); flags of no field (--config) are left out."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def defaults(cls, **given: Any) -> "Options":
        """The parser's defaults with `given` in their place, for code that runs a command without its command
        line (tests, benchmarks). Values are taken as given, not parsed. Raises TypeError for a name that is no
        flag of the command, or a required flag left unset."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; its fields are the flags of its command")
        args = vars(cls.build_parser().parse_args([])) | given
        missing = missing_flags(args, cls.required)
        if missing:
            raise TypeError(f"{cls.__name__} needs {missing} (required flags of its command)")
        return cls(**{name: args[name] for name in names})


def returned_type(convert: Callable[[str], Any]) -> Any:
    """What an argparse `type=` returns: a class itself (str, int), else the callable's return annotation
    (the Number checkers report their kind through their signature); Any when it has none."""
    if isinstance(convert, type):
        return convert
    try:
        returned = inspect.signature(convert, eval_str=True).return_annotation
    except (TypeError, ValueError, NameError):   # no signature to read (some builtins), or an unresolvable name
        return Any
    return Any if returned is inspect.Signature.empty else returned


def flag_type(action: argparse.Action, required: bool = False) -> Any:
    """The type of the value parsing leaves for a flag: bool for a switch; else what its `type=` returns, the
    type of its choices, of its default, or str (argparse hands the text on); list[...] of that for nargs "+"
    or "*"; `| None` when it defaults to None and is not `required` (its command or argparse refuses it unset).
    """
    if action.nargs == 0:   # store_true / store_false
        return bool
    if action.type is not None:
        item = returned_type(action.type)
    elif action.choices is not None and len({type(c) for c in action.choices}) == 1:
        item = type(next(iter(action.choices)))
    elif action.default is not None and not isinstance(action.default, (list, tuple)):
        item = type(action.default)
    else:
        item = str
    value = list[item] if action.nargs in ("+", "*") else item
    return value | None if action.default is None and not (required or action.required) else value


def options_class(name: str, build_parser: Callable[[], argparse.ArgumentParser], required: Sequence[str],
                  module: str) -> type:
    """A frozen Options dataclass `name` (defined in `module`) with one field per flag of build_parser() but
    --help and --config, typed as parsing leaves it (flag_type); `required` names the flags it cannot do
    without (parse_args and defaults() refuse them unset, so their fields are not Optional; stage 2's
    --check_memory alone builds TrainOptions without that check, and reads --latent_dir as optional)."""
    flags = [(a.dest, flag_type(a, a.dest in required)) for a in build_parser()._actions
             if a.dest not in ("help", "config")]
    return make_dataclass(name, flags, bases=(Options,), frozen=True,
                          namespace={"__module__": module, "build_parser": staticmethod(build_parser),
                                     "required": tuple(required)})
