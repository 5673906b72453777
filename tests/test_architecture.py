"""The house's rules, checked: the import contracts, short functions, the public names, the
help texts, and warnings as one line."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import featurekit
from featurekit.cli import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featurekit"
MAX_LINES = 80


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_import_contracts_hold():
    r = _lint_imports(ROOT, ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module,bad_import,contract", [
    ("cache.py", "from featurekit import fit", "cli over composites"),  # a stage reaching up
    ("extraction.py", "from featurekit import sparsity", "cli over composites"),  # a sibling command
    ("heads/_torch/_common.py", "from featurekit import cache", "heads know arrays only"),
    ("heads/_torch/_kernels.py", "from featurekit.heads._torch import _svm", "no import cycles"),
    ("cache.py", "from featurekit import fit_head", "no module imports the package root"),
])
def test_the_contracts_fail_on_a_bad_import(tmp_path, module, bad_import, contract):
    """The same contracts on a copy of the package with one deliberate bad import: broken."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "featurekit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "featurekit" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # deliberate\n")
    r = _lint_imports(copy, copy)
    assert r.returncode != 0, r.stdout[-2000:]
    broken = r.stdout.split("Broken contracts")[-1]
    assert contract in broken and "deliberate" not in r.stderr


def _long_functions(root: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_80_lines(tmp_path):
    assert _long_functions(PACKAGE, MAX_LINES) == []
    # the check itself finds a long one
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_LINES)
    assert _long_functions(tmp_path / "pkg", MAX_LINES) == ["pkg/m.py:1 f (81 lines)"]


def test_extract_is_the_function_whatever_was_imported_first(tmp_path):
    """Every submodule imported first, then featurekit.extract(...): the function, not a
    module (in a fresh process, where nothing else was imported before)."""
    code = f"""
import importlib, pkgutil, featurekit
for m in pkgutil.walk_packages(featurekit.__path__, "featurekit."):
    if "cuml" not in m.name:
        importlib.import_module(m.name)
s = featurekit.extract("digits", {str(tmp_path / 'd.h5')!r}, model="resnet18", weights="none",
                       image_size=32, device="cpu", workers=0, progress=False)
print(callable(featurekit.extract), s.rows)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "1797"]
    for m in pkgutil.walk_packages(featurekit.__path__, "featurekit."):  # and here, too
        if "cuml" not in m.name:
            importlib.import_module(m.name)
    assert callable(featurekit.extract) and featurekit.extract.__module__ == "featurekit.extraction"
    for name in featurekit.__all__:  # no public name is also a submodule's name
        assert not isinstance(getattr(featurekit, name), type(featurekit)), name


def test_library_results_are_json_ready(digits_cache, tmp_path):
    """What the library returns is what --json prints: no numpy scalars to convert."""
    from featurekit.fit import fit_head, predict
    from featurekit.sparsity import sparsity

    fit = fit_head(digits_cache, "logistic", backend="torch", out=tmp_path / "h.skops")
    json.dumps(fit.report)
    json.dumps(predict(tmp_path / "h.skops", digits_cache, tmp_path / "p.csv"))
    json.dumps(featurekit.run_bench(digits_cache, heads="logistic:torch"))
    json.dumps(sparsity("digits", model="resnet18", weights="none", image_size=32, device="cpu",
                        workers=0, max_images=40, progress=False))
    with featurekit.open_cache(digits_cache) as c:
        json.dumps(c.summary())


# --------------------------------------------------------------------------- help


def _commands() -> list[str]:
    return ["", *typer.main.get_command(app).commands]


def _help(command: str, columns: int) -> str:
    from typer.testing import CliRunner

    args = [command, "--help"] if command else ["--help"]
    r = CliRunner().invoke(app, args, env={"COLUMNS": str(columns)}, terminal_width=columns)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", _commands())
def test_help_shows_every_default_and_fits_the_terminal(command, columns):
    text = _help(command, columns)
    assert "Example" in text
    assert [line for line in text.splitlines() if len(line) > columns] == []
    assert not re.search(r"\s\.(\s|$)", text)  # "Cached layer to fit on ." (a lost "[default: …]")
    flat = re.sub(r"\s+", "", text)
    group = typer.main.get_command(app)
    params = group.commands[command].params if command else []
    for p in params:
        help_text = p.help or ""
        assert re.sub(r"\s+", "", help_text) in flat, f"{command} {p.opts}: help lost text"
        if p.param_type_name != "option" or p.opts == ["--help"]:
            continue
        shown = "[default:" in help_text or p.required or (
            p.default is not None and not (p.is_flag and not p.secondary_opts))
        assert shown, f"{command} {p.opts}: its default is not shown"
        if p.default not in (None, False) and "[default:" not in help_text:  # typer's own
            after = flat[flat.find(re.sub(r"\s+", "", help_text)):]
            assert after.startswith(re.sub(r"\s+", "", help_text) + "[default:"), p.opts


def test_help_in_a_real_terminal_width():
    """The same through the installed entry point, its width read from $COLUMNS."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    r = subprocess.run([sys.executable, "-m", "featurekit", "fit", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and "[default: penultimate]" in re.sub(r"\s+", " ", r.stdout)
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


# --------------------------------------------------------------------------- warnings


def test_bench_warnings_are_one_line_each(slow_linearsvc_cache):
    """A bench whose selections (scikit-learn's, point by point in worker processes) choose on
    the grid's edge (svm) and have grid points that stop at max_iter (linearsvc): each is one
    ``warning:`` line on stderr, with no file path of featurekit's and no source line."""
    r = subprocess.run([sys.executable, "-m", "featurekit", "bench", str(slow_linearsvc_cache),
                        "--heads", "linearsvc:sklearn,svm:sklearn", "--jobs", "2", "--no-progress",
                        "--no-extend-grid"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if not line.startswith("bench ")]
    warned = [line for line in lines if line.startswith("warning: ")]
    assert any(w.startswith("warning: svm (sklearn)") and "edge of the grid" in w for w in warned)
    assert any(w.startswith("warning: linearsvc (sklearn)") and "max_iter=5000 before converging"
               in w for w in warned), r.stderr
    assert len(warned) == len(lines) == 2, r.stderr  # nothing else: no path, no source line
    assert "featurekit/" not in r.stderr and "Warning:" not in r.stderr


def test_library_users_get_real_warnings(digits_cache):
    import warnings

    from featurekit._console import SelectionWarning
    from featurekit.fit import fit_head

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit_head(digits_cache, "nystroem", backend="torch", extend=False)
    selection = [w for w in seen if issubclass(w.category, SelectionWarning)]
    assert selection and "edge of the grid" in str(selection[0].message)
    assert not selection[0].filename.startswith(str(PACKAGE))  # attributed to the caller


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name
        assert "](../README.md)" in page.read_text(), page.name  # and back
    for target in re.findall(r"\]\(([^)#]+)", readme):  # every relative link resolves
        if "://" not in target:
            assert (ROOT / target).exists(), target
