"""The command lines: flag tables (docs/flags.md) = parsers, README links each command to them, links in the docs resolve, one source
per default, --help shows defaults, and the package layout (stage 3 without Lightning, parsers in the packages)."""
import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data.cli
import evaluation.cli
import generation.cli
import pipeline.cli
import tokenizer.cli
import training.cli

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"stage1_extract_features.py": data.cli.build_parser, "stage2_train_dit.py": training.cli.build_parser,
           "stage3_inference.py": generation.cli.build_parser, "stage4_evaluate.py": evaluation.cli.build_parser,
           "run_complete_pipeline.py": pipeline.cli.build_parser,
           "train_tokenizer.py": tokenizer.cli.build_parser}


FLAG_TABLES = ROOT / "docs" / "flags.md"   # every flag of every command
README = ROOT / "README.md"                 # the manual: links each command to its flags


def flag_tables(path: Path = FLAG_TABLES) -> dict[str, list[tuple[list[str], str]]]:
    """script -> [(flags of a row, its default cell)] from the `| flag | default | meaning |` table that
    follows each heading naming `script.py` in the markdown file at `path`."""
    tables: dict[str, list[tuple[list[str], str]]] = {}
    script = None
    for line in path.read_text().splitlines():
        heading = re.match(r"#+ .*`(\w+\.py)`", line)
        if heading:
            script = heading.group(1)
        elif line.startswith("#"):
            script = None
        elif script and line.startswith("| `--"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables.setdefault(script, []).append((re.findall(r"`(--\w+)", cells[0]), cells[1]))
    return tables


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def same_default(readme: str, action: argparse.Action) -> bool:
    text, default = readme.strip("`"), action.default
    if isinstance(action, argparse._StoreTrueAction):
        return text in ("off", "")
    if default is None:   # unset: blank, "none", or a described default ("rank", "every user")
        return text in ("", "none") or not is_number(text)
    if isinstance(default, list):
        return text.split() == [str(v) for v in default]
    if isinstance(default, (int, float)):
        return is_number(text) and float(text) == default
    return text == str(default)


def check_defaults(script: str, rows: list[tuple[list[str], str]], actions: dict, where: str) -> None:
    for flags, cell in rows:
        values = [v.strip() for v in cell.split(",")] if cell else [""]
        values = values if len(values) == len(flags) else values * len(flags) if len(values) == 1 else None
        assert values is not None, f"{where} {script}: row {flags} has {cell!r}, not one default per flag"
        for flag, value in zip(flags, values):
            assert flag in actions, f"{where} {script}: {flag} is no flag of the parser"
            assert same_default(value, actions[flag]), \
                f"{where} {script} {flag}: says {value!r}, the parser {actions[flag].default!r}"


def parser_flags(script: str) -> dict[str, argparse.Action]:
    return {s: a for a in PARSERS[script]()._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_flag_table_matches_the_parser(script):
    """docs/flags.md lists every flag of every command with the parser's default."""
    tables = flag_tables()
    assert script in tables, f"docs/flags.md has no flag table under a heading naming {script}"
    actions = parser_flags(script)
    documented = [flag for flags, _ in tables[script] for flag in flags]
    assert sorted(set(documented)) == sorted(set(actions) - {"--help", "--config"}), \
        f"{script}: docs/flags.md table flags differ from the parser"
    check_defaults(script, tables[script], actions, "docs/flags.md")


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_readme_points_each_command_to_its_flags_and_restates_none(script):
    """The README is the manual of what each command does; its flags live in one place, docs/flags.md. Each
    command's paragraph links its section there (test_docs_links_and_anchors_resolve checks the anchor), and the
    README holds no flag table that could drift from the parser."""
    text = README.read_text()
    assert f"`{script}`** ([flags](docs/flags.md#" in text, f"README's paragraph on {script} links no docs/flags.md section"
    assert not flag_tables(README), "README restates a flag table: flags are documented in docs/flags.md only"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation other than - and _ dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#+ (.*)", line)
        if heading and not in_code:
            anchor = github_anchor(heading.group(1))
            result.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return result


def test_docs_links_and_anchors_resolve():
    """Every relative link in README.md, docs/ and experiments/README.md names a file that exists and,
    with #anchor, a heading of that file."""
    pages = [README, ROOT / "experiments" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def function_defaults_agree(function, parser: argparse.ArgumentParser, rename: dict[str, str] = {}) -> None:
    """A default a stage's entry function repeats must be the parser's (one source)."""
    flags = {a.dest: a.default for a in parser._actions}
    for name, p in inspect.signature(function).parameters.items():
        dest = rename.get(name, name)
        if p.default is not inspect.Parameter.empty and dest in flags:
            assert p.default == flags[dest], f"{function.__name__}({name}={p.default!r}) vs --{dest} {flags[dest]!r}"


def test_sampler_defaults_are_the_parsers():
    """sample_images is the sampler stage 3 and the training grids share; the defaults it keeps are stage 3's."""
    from models.sampling import sample_images
    function_defaults_agree(sample_images, generation.cli.build_parser(), {"device": "resolved device"})


ENTRY_FUNCTIONS = {"data.latents.extract_features": data.cli.ExtractOptions,
                   "training.train_dit.train": training.cli.TrainOptions,
                   "generation.generate.generate": generation.cli.GenerateOptions,
                   "evaluation.evaluate.evaluate": evaluation.cli.EvaluateOptions,
                   "tokenizer.train.train_tokenizer": tokenizer.cli.TokenizerOptions}


@pytest.mark.parametrize("entry", sorted(ENTRY_FUNCTIONS))
def test_each_entry_function_takes_its_commands_options_whole(entry):
    """Each command's flags reach its entry function as one Options object with a field per flag and the
    parser's default: no default written a second time in a signature, no flag dropped on the way."""
    import importlib
    from dataclasses import fields
    module, name = entry.rsplit(".", 1)
    function, options_type = getattr(importlib.import_module(module), name), ENTRY_FUNCTIONS[entry]
    parser = options_type.build_parser()
    dests = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "config")}
    assert {f.name for f in fields(options_type)} == set(dests)
    parameters = inspect.signature(function).parameters
    first = next(iter(parameters.values()))
    assert first.annotation in (options_type, options_type.__name__) and first.default is inspect.Parameter.empty
    assert not set(dests) & set(parameters), f"{entry} takes flags beside its options"
    given = {name: f"<{name}>" for name in options_type.required}
    assert vars(options_type.defaults(**given)) == {**dests, **given}


def test_options_defaults_refuse_unknown_and_missing_flags():
    with pytest.raises(TypeError, match=r"GenerateOptions has no field\(s\) \['guidance'\]"):
        generation.cli.GenerateOptions.defaults(dit_checkpoint="c", vavae_path="v", output_dir="o", user_ids=[1],
                                                guidance=4.0)
    with pytest.raises(TypeError, match=r"ExtractOptions needs \['vavae_path'\]"):
        data.cli.ExtractOptions.defaults(data_dir="d", output_path="o")
    options = data.cli.ExtractOptions.defaults(data_dir="d", vavae_path="v", output_path="o")
    with pytest.raises(Exception, match="cannot assign"):   # frozen: what the command was given stays as given
        options.batch_size = 1


def test_train_options_name_every_stage2_flag_and_the_module_restates_no_default():
    """TrainOptions is derived from the parser, and DiTTrainingModule takes it whole: no flag default is
    written a second time in the module's signature."""
    from dataclasses import fields
    from training.dit_module import DiTTrainingModule
    dests = {a.dest for a in training.cli.build_parser()._actions} - {"help", "config"}
    assert {f.name for f in fields(training.cli.TrainOptions)} == dests
    signature = inspect.signature(DiTTrainingModule).parameters
    assert not dests & {name for name, p in signature.items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_shows_defaults(script):
    parser = PARSERS[script]()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False) and action.dest != "help":
            assert f"(default: {action.default})" in text, f"{script} --help hides {action.option_strings[0]}'s default"


def test_every_flag_has_help():
    for script, build in PARSERS.items():
        for action in build()._actions:
            assert action.help, f"{script} {action.option_strings} has no help text (so --help shows no default)"


def test_stage3_and_parsers_load_without_training_code():
    """Sampling needs the checkpoint format (models/checkpoint.py), not Lightning or training/; the
    orchestrator gets the stage parsers from the packages, not from the top-level scripts."""
    code = ("import sys, generation.generate, pipeline.orchestrate as o; o.stage_parsers(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning') "
            "or m.startswith('training.') and m != 'training.cli' or m.startswith(('stage', 'run_complete'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
