"""Every numeric option of every command, out of its documented range, is one line and exit 2.

The cases are generated from the CLI's own parameter list: a new numeric option without a
documented range, or a new command without base arguments here, fails this file.
"""

from __future__ import annotations

import inspect
import math
import typing

import pytest
import typer

from featurekit import options as opt
from featurekit.cli import app

# arguments that make each command otherwise valid; {tmp} is the test's folder
BASE_ARGS: dict[str, list[str]] = {
    "extract": ["digits", "--out", "{tmp}/x.h5", "--model", "resnet18", "--weights", "none",
                "--device", "cpu", "--no-progress"],
    "info": ["{tmp}/x.h5"],
    "fit": ["{tmp}/x.h5", "--head", "logistic", "--out", "{tmp}/h.skops"],
    "predict": ["{tmp}/h.skops", "{tmp}/x.h5", "--out", "{tmp}/p.csv"],
    "bench": ["{tmp}/x.h5", "--out", "{tmp}/bench"],
    "finetune": ["digits", "--out", "{tmp}/run", "--model", "resnet18", "--weights", "none",
                 "--device", "cpu", "--no-progress"],
    "sparsity": ["digits", "--model", "resnet18", "--weights", "none", "--device", "cpu",
                 "--no-progress", "--out", "{tmp}/sp"],
    "demo": ["--out", "{tmp}/demo"],
    "pack": ["{tmp}/x.h5", "--out", "{tmp}/one.h5"],
    "similarity": ["{tmp}/x.h5", "{tmp}/x.h5", "--out", "{tmp}/cka"],
    "fewshot": ["{tmp}/x.h5", "--out", "{tmp}/fs"],
    "study": ["digits", "--out", "{tmp}/study", "--weights", "none", "--plan"],
}


def _commands():
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        yield name, info.callback


def _numeric_options():
    """(command, flag, Range or None) for every int/float option of every command."""
    for name, callback in _commands():
        hints = typing.get_type_hints(callback)
        for pname, param in inspect.signature(callback).parameters.items():
            default = param.default
            if not isinstance(default, typer.models.OptionInfo):
                continue
            kinds = {a for a in typing.get_args(hints[pname]) if a is not type(None)} or {hints[pname]}
            if not kinds & {int, float}:
                continue
            decls = [d for d in (default.param_decls or ()) if d.startswith("--")]
            flag = decls[0] if decls else "--" + pname.replace("_", "-")
            yield name, flag, default.parser if isinstance(default.parser, opt.Range) else None


NUMERIC = list(_numeric_options())


def test_every_numeric_option_has_a_documented_range():
    assert NUMERIC, "no numeric options found: the walk over the CLI is broken"
    missing = [f"{c} {f}" for c, f, r in NUMERIC if r is None]
    assert not missing, f"numeric options without a featurekit.options range: {missing}"
    assert {c for c, _ in _commands()} <= set(BASE_ARGS), "give a new command its BASE_ARGS"


def bad_values(r: opt.Range) -> list[str]:
    """Values outside ``r``: below, zero where not allowed, above (where bounded), NaN,
    infinities, text, and a fraction for integers."""
    out = ["abc", "nan", "inf", "-inf", ""]
    if r.low is not None:
        out.append(repr(r.low) if r.low_open else repr(r.low - 1 if r.kind is int else r.low - 0.5))
        out.append("-1" if -1 < r.low or (r.low == -1 and r.low_open) else repr(r.low - 10))
    if not r.contains(0):
        out.append("0")
    if r.high is not None:
        out.append(repr(r.high) if r.high_open else repr(r.high + 1 if r.kind is int else r.high * 2 + 1))
        out.append("1" + "0" * 30)
    if r.kind is int:
        out.append("1.5")
    return [v.removesuffix(".0") if r.kind is int else v for v in out]


CASES = [(c, f, v) for c, f, r in NUMERIC if r is not None for v in bad_values(r)]


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_out_of_range_is_one_line_and_exit_2(command, flag, value, tmp_path, runner):
    args = [a.format(tmp=tmp_path) for a in BASE_ARGS[command]]
    r = runner.invoke(app, [command, *args, f"{flag}={value}"])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    # nothing left behind that claims to be complete (nothing at all, here)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_bad_values_really_are_outside():
    for _, _, r in NUMERIC:
        for v in bad_values(r):
            with pytest.raises(ValueError):
                r(v)


@pytest.mark.parametrize("r", sorted({r for *_, r in NUMERIC if r is not None}, key=repr))
def test_bounds_and_inside_values_are_accepted(r):
    inside = [b for b, is_open in ((r.low, r.low_open), (r.high, r.high_open))
              if b is not None and not is_open]
    for b in inside:
        assert r(str(int(b) if r.kind is int else b)) == b
    assert r.check("--x", None) is None


def test_library_callers_get_the_same_check():
    from featurekit import FeaturekitError
    from featurekit import extract

    for kw, needle in (({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed"),
                       ({"commit_seconds": math.nan}, "--commit-seconds"),
                       ({"image_size": 10**6}, "--image-size"), ({"workers": 1.5}, "--workers")):
        with pytest.raises(FeaturekitError, match=needle):
            extract("digits", "/nonexistent/x.h5", **kw)


def test_parser_errors_are_one_line(runner, tmp_path):
    for args, needle in ((["extract"], "Missing argument"), (["extractt"], "No such command"),
                         (["fit", str(tmp_path / "x.h5"), "--head", "svm", "--out", "h", "--bogus"],
                          "No such option")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
    assert runner.invoke(app, ["extract", "--help"]).exit_code == 0


def test_help_states_ranges(runner):
    r = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "[0, 1)" in r.stdout


def _file_arguments():
    """(command, argument index, metavar) for every argument of every command that names a
    file or folder the command reads (all of them: caches, head files, sources)."""
    for name, callback in _commands():
        index = 0
        for param in inspect.signature(callback).parameters.values():
            if isinstance(param.default, typer.models.ArgumentInfo):
                yield name, index, param.default.metavar or param.name.upper()
                index += 1


FILE_ARGS = list(_file_arguments())
BAD_FILES = ("missing", "junk", "empty-folder")


@pytest.mark.parametrize("command,index,metavar,bad",
                         [(*a, b) for a in FILE_ARGS for b in BAD_FILES],
                         ids=[f"{c}-{m}-{b}" for c, _, m in FILE_ARGS for b in BAD_FILES])
def test_a_bad_file_argument_is_one_line_and_exit_2(command, index, metavar, bad, tmp_path, runner):
    """Every file argument of every command (generated from the CLI): a missing path, a file
    of junk bytes, an empty folder: one line, exit 2, nothing written."""
    given = {"missing": tmp_path / "nope.h5", "junk": tmp_path / "junk.bin",
             "empty-folder": tmp_path / "empty"}
    given["junk"].write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    given["empty-folder"].mkdir()
    before = {p for p in tmp_path.rglob("*")}
    args = [a.format(tmp=tmp_path) for a in BASE_ARGS[command]]
    args[index] = str(given[bad])
    r = runner.invoke(app, [command, *args])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert {p for p in tmp_path.rglob("*")} == before
