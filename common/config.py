"""One config mechanism: YAML files whose keys are flag names; flags on the command line override."""
import argparse
from pathlib import Path
from typing import Sequence

import yaml

from common.errors import PipelineError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every flag's default (none for unset and switches)."""
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """The parser of a command line of this project (its --help shows the defaults)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file whose keys are flag names (without --); flags given here win")


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config and check every key is a flag of `parser`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise PipelineError(f"config file {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in values if k.lstrip("-").replace("-", "_") not in known)
    if unknown:
        raise PipelineError(f"config file {path} has keys that are not flags of this stage: "
                            f"{', '.join(unknown)}. Valid keys: {', '.join(sorted(known - {'help', 'config'}))}")
    return {k.lstrip("-").replace("-", "_"): v for k, v in values.items()}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               required: Sequence[str] = ()) -> argparse.Namespace:
    """Parse flags after applying `--config` as defaults; `required` may come from either place."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    missing = [name for name in required if getattr(args, name, None) in (None, [], "")]
    if missing:
        parser.error("missing required flag(s): " + " ".join(f"--{m}" for m in missing)
                     + " (on the command line or in --config)")
    return args
