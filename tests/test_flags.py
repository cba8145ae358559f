"""Every flag of every command is checked when it is parsed, on the command line and in a config file, and
every shipped config is accepted by every command that reads --config."""
import argparse
from pathlib import Path

import pytest
import yaml

import data.cli
import evaluation.cli
import generation.cli
import pipeline.cli
import tokenizer.cli
import training.cli
from common.config import CONFIG_COMMANDS, Number, load_project_config, parse_args
from common.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"stage1_extract_features.py": data.cli.build_parser, "stage2_train_dit.py": training.cli.build_parser,
           "stage3_inference.py": generation.cli.build_parser, "stage4_evaluate.py": evaluation.cli.build_parser,
           "run_complete_pipeline.py": pipeline.cli.build_parser,
           "train_tokenizer.py": tokenizer.cli.build_parser}
SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "sizes").glob("*.yaml"))
# The stages share the run's configs; the tokenizer has its own (its --precision has no 16-mixed).
CONFIG_SCRIPTS = [s for s in PARSERS if s != "train_tokenizer.py" and s != "run_complete_pipeline.py"]


def numeric_actions():
    for script, build in PARSERS.items():
        for action in build()._actions:
            if action.option_strings and action.dest != "help":
                yield script, action


def parse_exit(capsys, script: str, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of parsing `argv` with the script's parser (0 when it parses)."""
    capsys.readouterr()
    try:
        PARSERS[script]().parse_args(argv)
        return 0, ""
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err


def test_every_numeric_flag_has_a_checker():
    """A plain type=int/float lets 0, -1, nan and inf through to a traceback (or black images) later."""
    unchecked = [f"{script} {a.option_strings[0]}" for script, a in numeric_actions()
                 if a.type in (int, float) and a.choices is None]
    assert not unchecked, unchecked


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_numeric_flag_refuses_values_out_of_its_range(capsys, script):
    checked = 0
    for _, action in [(s, a) for s, a in numeric_actions() if s == script and isinstance(a.type, Number)]:
        flag = action.option_strings[0]
        for bad in action.type.invalid:
            code, err = parse_exit(capsys, script, f"{flag}={bad}")
            assert code == 2 and f"argument {flag}: must be" in err, (script, flag, bad, err)
        for good in action.type.valid:
            assert parse_exit(capsys, script, f"{flag}={good}")[0] == 0, (script, flag, good)
        checked += 1
    assert checked >= 3


def test_the_reported_stage3_values_exit_2_naming_the_flag(capsys):
    for flag, value in [("--num_samples_per_user", "0"), ("--num_samples_per_user", "-1"), ("--batch_size", "0"),
                        ("--guidance_scale", "nan"), ("--shift", "0"), ("--num_steps", "0")]:
        code, err = parse_exit(capsys, "stage3_inference.py", flag, value)
        assert code == 2 and f"argument {flag}: must be" in err, (flag, value, err)
    for flag, value in [("--lr", "-1"), ("--ema_decay", "1.5"), ("--ema_decay", "1"), ("--max_steps", "0")]:
        code, err = parse_exit(capsys, "stage2_train_dit.py", flag, value)
        assert code == 2 and f"argument {flag}: must be" in err, (flag, value, err)


def test_repeated_user_ids_are_refused(capsys, tmp_path):
    """`--user_ids 1 1` said 2 images and wrote one."""
    code, err = parse_exit(capsys, "stage3_inference.py", "--user_ids", "1", "2", "1")
    assert code == 2 and "argument --user_ids: lists 1 more than once" in err
    code, err = parse_exit(capsys, "run_complete_pipeline.py", "--generate_user_ids", "3", "3")
    assert code == 2 and "lists 3 more than once" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("user_ids: [2, 2]\n")
    with pytest.raises(PipelineError, match=r"key user_ids: lists 2 more than once"):
        parse_args(generation.cli.build_parser(), ["--config", str(cfg)])


def test_precision_takes_the_values_that_train_and_names_why_others_fail(capsys):
    parser = training.cli.build_parser()
    for given, meant in [("32-true", "32-true"), ("32", "32-true"), ("16-mixed", "16-mixed"), ("16", "16-mixed"),
                         ("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed")]:
        assert parser.parse_args(["--precision", given]).precision == meant
    for value, reason in [("bf16-true", "EMA"), ("16-true", "EMA"), ("64", "float64"), ("fp8", "not a precision")]:
        code, err = parse_exit(capsys, "stage2_train_dit.py", "--precision", value)
        assert code == 2 and "argument --precision:" in err and reason in err, (value, err)
        assert "choose 32-true, 16-mixed" in err


def test_every_command_names_devices_and_precisions_with_the_same_words(capsys):
    """One vocabulary (common.device): auto, cpu, cuda, cuda:N, gpu read as cuda; one message for anything else."""
    def parsed(script: str, *argv: str) -> argparse.Namespace:
        return PARSERS[script]().parse_args(argv)

    device_flags = {"stage1_extract_features.py": "--device", "stage2_train_dit.py": "--accelerator",
                    "stage3_inference.py": "--device", "stage4_evaluate.py": "--device", "train_tokenizer.py": "--device"}
    for script, flag in device_flags.items():
        for given, meant in [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("gpu", "cuda")]:
            assert getattr(parsed(script, flag, given), flag[2:]) == meant, (script, given)
        assert getattr(parsed(script), flag[2:]) == "auto", script
        code, err = parse_exit(capsys, script, flag, "tpu")
        assert code == 2 and "'tpu' is not a device; use auto (CUDA when present), cpu, cuda or cuda:N" in err
    assert parsed("stage1_extract_features.py", "--device", "cuda:1").device == "cuda:1"
    code, err = parse_exit(capsys, "stage2_train_dit.py", "--accelerator", "cuda:1")
    assert code == 2 and "--devices says how many" in err
    for given, meant in [("bf16", "bf16-mixed"), ("fp32", "32-true"), ("32-true", "32-true")]:
        assert parsed("train_tokenizer.py", "--precision", given).precision == meant
    code, err = parse_exit(capsys, "train_tokenizer.py", "--precision", "16-mixed")
    assert code == 2 and "no loss scaling" in err


@pytest.mark.parametrize("key, value, pattern", [
    ("batch_size", 0, r"key batch_size: must be an integer >= 1 \(got 0\)"),
    ("lr", -1.0, r"key lr: must be a finite number > 0"),
    ("ema_decay", 1.5, r"key ema_decay: must be a finite number >= 0 and < 1"),
    ("lr", float("nan"), r"key lr: must be a finite number > 0 \(got nan\)"),
    ("precision", "bf16-true", r"key precision: bf16-true is not supported"),
    ("model", "LightningDiT-Q/9", r"key model: 'LightningDiT-Q/9' is not one of"),
    ("max_epochs", "ten", r"key max_epochs: must be an integer"),
    ("compile", "yes", r"key compile: must be true or false"),
    ("batch_size", [4, 8], r"key batch_size: must be a single value"),
])
def test_config_values_are_checked_like_flags(tmp_path, key, value, pattern):
    """Config values used to reach the stages unchecked (argparse applies type= only to text defaults)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(PipelineError, match=pattern):
        parse_args(training.cli.build_parser(), ["--config", str(cfg)])
    with pytest.raises(PipelineError, match=pattern):
        load_project_config(cfg)   # the orchestrator's --config


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
@pytest.mark.parametrize("script", CONFIG_SCRIPTS)
def test_every_shipped_config_is_accepted_by_every_stage(capsys, config, script):
    """Rerunning one stage with the config of the whole run is how users work (the OOM advice names
    configs/kaggle_2xT4.yaml for stage 2, which refused its num_workers)."""
    values = yaml.safe_load(config.read_text())
    parser = PARSERS[script]()
    own = {a.dest for a in parser._actions}
    capsys.readouterr()
    args = parse_args(parser, ["--config", str(config)])
    err = capsys.readouterr().err
    for key, value in values.items():
        if key in own:
            assert getattr(args, key) in (value, str(value)) or key == "precision", (key, getattr(args, key))
    others = sorted(set(values) - own)
    if others:
        assert err.count("note: ") == 1 and ", ".join(others) in err, err
    else:
        assert "note: " not in err


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_is_accepted_by_the_orchestrator(config):
    values = load_project_config(config)
    assert values.keys() == yaml.safe_load(config.read_text()).keys()


def test_a_key_of_no_command_stays_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 4\nnum_workers: 2\nbatch_szie: 8\n")
    with pytest.raises(PipelineError, match=r"flags of no command of this project: batch_szie\. Valid keys here"):
        parse_args(training.cli.build_parser(), ["--config", str(cfg)])
    with pytest.raises(PipelineError, match=r"batch_szie"):
        load_project_config(cfg)


def test_the_tokenizer_takes_a_config_like_every_command(tmp_path, capsys):
    """train_tokenizer.py --config: keys are flag names, flags win, other commands' keys are passed over with a
    note, and the required flags may come from the file."""
    cfg = tmp_path / "tok.yaml"
    cfg.write_text("data_dir: d\noutput_path: t.safetensors\nsteps: 50\nprecision: fp32\nmax_epochs: 3\n")
    args = parse_args(tokenizer.cli.build_parser(), ["--config", str(cfg), "--steps", "7"],
                      required=tokenizer.cli.REQUIRED)
    assert (args.data_dir, args.steps, args.precision) == ("d", 7, "32-true")
    assert "passed over 1 key(s)" in capsys.readouterr().err
    cfg.write_text("steps: 0\n")
    with pytest.raises(PipelineError, match=r"key steps: must be an integer >= 1"):
        parse_args(tokenizer.cli.build_parser(), ["--config", str(cfg)])


def test_config_commands_are_the_parsers_that_read_config():
    import importlib
    for module in CONFIG_COMMANDS:
        assert "config" in {a.dest for a in importlib.import_module(module).build_parser()._actions}, module


def test_help_texts(capsys):
    tokenizer_help = tokenizer.cli.build_parser().format_help()
    assert "tok.safetensors \\\n        --init_from" in tokenizer_help        # the example as one pastes it
    stage2_help = " ".join(training.cli.build_parser().format_help().split())
    assert "Ampere" not in stage2_help and "compute capability >= 8.0" in stage2_help
