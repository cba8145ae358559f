"""The product's import layout, read from the source with ast (nothing is imported): imports sit at module top
except where a comment says why one waits inside a function (an optional heavy dependency, a command's --help
kept fast), and the packages import only downward: common/ and models/ under every stage, a stage package
(stage 1 data/, 2 training/, 3 generation/, 4 evaluation/) only the stages before it, and the orchestrator
(pipeline/) only the stage packages' parsers (their cli modules)."""
import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_PRODUCT = {"tests", "benchmarks", "experiments"}   # top-level folders whose code is not the product's
BASE = {"common", "models"}
STAGES = ["data", "training", "generation", "evaluation"]   # in the pipeline's order: stage 1 to stage 4
# What each package may import besides itself ("pkg.module": that module only).
ALLOWED = {
    "common": set(),
    "models": {"common"},
    **{stage: BASE | set(STAGES[:i]) for i, stage in enumerate(STAGES)},
    "tokenizer": BASE | {"data"},   # trains the tokenizer stage 1 reads; reads images as stage 1 does
    "pipeline": BASE | {"data"} | {f"{package}.cli" for package in [*STAGES[1:], "tokenizer"]},
}
PENDING: set[str] = set()     # packages whose function-level imports are not checked yet


def product_files() -> list[Path]:
    """The product's .py files: the top-level scripts and every file of the top-level packages."""
    files = []
    for entry in sorted(ROOT.iterdir()):
        if entry.name.startswith(".") or entry.name in NOT_PRODUCT:
            continue
        if entry.is_file() and entry.suffix == ".py":
            files.append(entry)
        elif entry.is_dir():
            files += sorted(entry.rglob("*.py"))
    return files


def comment_lines(source: str) -> set[int]:
    """Line numbers holding a comment (tokenize's COMMENT tokens: a '#' inside a string does not count)."""
    return {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}


def unexplained_function_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function (or a class in one) with no comment on their own lines, nor on
    the line above the run of consecutive imports they belong to (one comment may explain a block)."""
    tree, comments = ast.parse(source), comment_lines(source)
    found: set[int] = set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            for field in ("body", "orelse", "finalbody"):
                statements = getattr(node, field, None)
                if not isinstance(statements, list):   # a lambda's or a conditional expression's body
                    continue
                run: list[ast.stmt] = []
                for statement in [*statements, None]:
                    if isinstance(statement, (ast.Import, ast.ImportFrom)):
                        run.append(statement)
                        continue
                    above = bool(run) and run[0].lineno - 1 in comments
                    for imp in run:
                        if not above and not comments & set(range(imp.lineno, imp.end_lineno + 1)):
                            found.add(imp.lineno)
                    run = []
    return sorted(found)


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import anywhere in the module; `from pkg import mod` gives pkg.mod
    for each name, so that `from training import cli` reads as training.cli."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ALLOWED:
                names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                names.append((node.lineno, node.module))
    return names


def forbidden_imports(package: str, tree: ast.AST, scripts: set[str]) -> list[tuple[int, str]]:
    """(line, module) for each import of a package module that `package` may not import (ALLOWED), or of a
    top-level script (scripts import packages, never the reverse)."""
    bad = []
    for line, name in imported_names(tree):
        top = name.split(".")[0]
        if top in scripts or (top in ALLOWED and top != package and top not in ALLOWED[package]
                              and ".".join(name.split(".")[:2]) not in ALLOWED[package]):
            bad.append((line, name))
    return bad


def where(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_scan_sees_the_product():
    """The scans below read every package and script (a file list gone empty would pass them vacuously), and every
    top-level folder of Python code is either a package with a place in ALLOWED or outside the product."""
    files = {where(p) for p in product_files()}
    assert {"stage3_inference.py", "run_complete_pipeline.py", "generation/ranks.py", "pipeline/orchestrate.py",
            "training/train_dit.py", "common/errors.py", "evaluation/cli.py"} <= files
    assert not any(f.split("/")[0] in NOT_PRODUCT for f in files)
    packages = {f.split("/")[0] for f in files if "/" in f}
    assert packages == set(ALLOWED), f"packages without a place in ALLOWED: {sorted(packages - set(ALLOWED))}"


def test_an_import_inside_a_function_says_why():
    """Imports sit at module top; one inside a function (an optional heavy dependency such as peft, Lightning
    kept out of a one-process stage 3, torch kept out of a --help) carries a comment saying why, on its line or
    on the line above its block of imports."""
    unexplained = []
    for path in product_files():
        if path.parent != ROOT and path.relative_to(ROOT).parts[0] in PENDING:
            continue
        lines = path.read_text().splitlines()
        unexplained += [f"{where(path)}:{n}: {lines[n - 1].strip()}"
                        for n in unexplained_function_imports(path.read_text())]
    assert not unexplained, ("imports inside functions without a comment saying why (move them to the module top, "
                             "or say why they wait):\n" + "\n".join(unexplained))


def test_the_scan_flags_a_bare_import_and_accepts_a_reason():
    source = ("import os\n\n\ndef bare():\n    x = 1\n    import json\n    return x\n\n\n"
              "def reasoned():\n    # optional: only this path needs it\n    import json\n    from pathlib import Path\n\n\n"
              "def trailing():\n    try:   # optional dependency\n        import json\n    except ImportError:\n"
              "        import pickle\n    return '# not a comment'\n")
    assert unexplained_function_imports(source) == [6, 20]


def test_packages_import_only_downward():
    """No package imports a stage package above it (training/ never imports generation/, no stage imports
    pipeline/), and the orchestrator takes only the stage packages' parsers (it runs the stages as processes)."""
    scripts = {p.stem for p in ROOT.glob("*.py")}
    bad = []
    for path in product_files():
        if path.parent == ROOT:
            continue
        package = path.relative_to(ROOT).parts[0]
        for line, name in forbidden_imports(package, ast.parse(path.read_text()), scripts):
            bad.append(f"{where(path)}:{line} imports {name} ({package}/ may import {sorted(ALLOWED[package])})")
    assert not bad, "imports against the package layering:\n" + "\n".join(bad)


def test_the_layering_refuses_an_upward_import():
    scripts = {"stage3_inference"}
    upward = ast.parse("from generation.generate import generate\nimport pipeline.orchestrate\n"
                       "from training import cli\nimport stage3_inference\nfrom data.images import load_bank\n")
    assert forbidden_imports("training", upward, scripts) == [
        (1, "generation.generate"), (2, "pipeline.orchestrate"), (4, "stage3_inference")]
    assert forbidden_imports("pipeline", ast.parse("from training import cli\nfrom training import train_dit\n"),
                             scripts) == [(2, "training.train_dit")]


MAX_FUNCTION_LINES = 80   # a function a reader takes in at once; longer ones get their parts named as functions


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than MAX_FUNCTION_LINES (decorators aside)."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_product_function_is_longer_than_a_screen():
    too_long = [f"{where(path)}: {name} ({lines} lines)" for path in product_files()
                for name, lines in long_functions(path.read_text())]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named parts):\n" + \
        "\n".join(too_long)


def test_the_length_scan_counts_a_long_method():
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"class A:\n    def long(self):\n{body}\n    def short(self):\n        pass\n") == \
        [("long", MAX_FUNCTION_LINES + 1)]
