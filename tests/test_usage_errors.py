"""Every usage error of every subcommand is one plain line on stderr and exit code 2, whatever
the option and whatever the bad value; no traceback, and no file touched.

The options are read from the Click command objects Typer builds (`typer.main.get_command`), so
an option added later is walked too. Each run is in-process (CliRunner) and stops before a model
loads: the runs name weights that do not exist, so a value that is accepted ends in exit code 3
(weights error) before any work, and `eval --pred` scores a two-image file in milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args, get_origin

import pytest
import typer
from typer.testing import CliRunner

from segcli import __version__
from segcli.cli import app
from tests.conftest import synthetic_shapes

INTS = ["-1", "0", "99999999999999999999", "-99999999999999999999", "abc", "1.5", ""]
FLOATS = ["-1", "0", "nan", "inf", "-inf", "1e400", "abc", ""]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two small images with their COCO ground truth, predictions that match it, a folder, a
    TorchScript-less weights name: the inputs every run below is given."""
    root = tmp_path_factory.mktemp("walk")
    gt = synthetic_shapes().generate(root / "data", images=2, size=64, seed=3)
    truth = json.loads(gt.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                "segmentation": a["segmentation"]} for a in truth["annotations"]]
    pred = root / "pred.json"
    pred.write_text(json.dumps(results))
    images = root / "data" / "images"
    return {"root": root, "gt": gt, "pred": pred, "images": images, "image": sorted(images.iterdir())[0],
            "folder": root / "data", "missing_weights": root / "no_such_weights.pt"}


def bases(world) -> dict[str, list[dict[str, list[str]]]]:
    """Valid command lines (by parameter name) that stop before a model is loaded, or run in a moment."""
    w = {k: str(v) for k, v in world.items()}
    return {
        "predict": [{"sources": [w["image"]], "weights": ["--weights", w["missing_weights"]],
                     "out": ["--out", f"{w['root']}/out/preds.json"]}],
        "eval": [{"gt": ["--gt", w["gt"]], "pred": ["--pred", w["pred"]]},
                 {"gt": ["--gt", w["gt"]], "images": ["--images", w["images"]], "weights": ["--weights", w["missing_weights"]]}],
        "train": [{"coco": ["--coco", w["gt"]], "weights": ["--weights", w["missing_weights"]],
                   "out": ["--out", f"{w['root']}/runs/walk"]}],
        "export": [{"weights": ["--weights", w["missing_weights"]], "format": ["--format", "torchscript"],
                    "out": ["--out", f"{w['root']}/model.ts"]}],
    }


def bad_values(param, world) -> list[tuple[list[str], bool]]:
    """Bad values for one parameter, by its type: (the tokens after the option, whether the value
    must be refused whatever the option: no option takes a negative, non-finite or 64-bit-overflowing
    number, a number that is not one, or an empty string)."""
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) is tuple:  # export --image-size H W
        return [(["-1", "-1"], True), (["0", "0"], True), (["abc", "8"], True), (["99999999999", "99999999999"], True)]
    element = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    if element is bool:
        return []  # flags take no value (walked separately: `--flag=value`)
    if element in (int, float):
        return [([value], value != "0") for value in (INTS if element is int else FLOATS)]
    # Strings are paths, names or choices: a file where a folder goes and the reverse, the run's
    # own inputs (outputs must refuse them), a missing path, nothing, and a name with a newline.
    paths = [world["image"], world["folder"], world["gt"], world["pred"], world["root"] / "missing" / "x"]
    return [([str(path)], False) for path in paths] + [([""], True), (["bad\nname"], False)]


def walk(world):
    """(command line, bad value, whether it must be refused) for every parameter of every subcommand."""
    root = typer.main.get_command(app)
    assert {"predict", "train", "eval", "export"} <= set(root.commands)
    for name, command in root.commands.items():
        # A subcommand added later is walked too, bare (its required options then missing),
        # until it gets command lines of its own in `bases`.
        for base in bases(world).get(name, [{}]):
            for param in command.params:
                rest = [token for key, tokens in base.items() if key != param.name for token in tokens]
                if param.param_type_name == "argument":
                    for value, refuse in bad_values(param, world):
                        yield [name, *value, *rest], value, refuse
                    continue
                option = next(opt for opt in param.opts if opt.startswith("--"))
                if getattr(param, "is_flag", False):
                    yield [name, *rest, f"{option}=yes"], ["yes"], True
                    continue
                for value, refuse in bad_values(param, world):
                    yield [name, *rest, option, *value], value, refuse


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes (the world is a few small files) and every folder (None)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def restore(folder: Path, before: dict[str, bytes | None]) -> None:
    """Undo what an accepted run wrote (a report where the user asked for it), for the next run."""
    for name in sorted(set(snapshot(folder)) - set(before), reverse=True):
        path = folder / name
        path.unlink() if path.is_file() else path.rmdir()
    for name, data in before.items():
        if data is not None and (folder / name).read_bytes() != data:
            (folder / name).write_bytes(data)


def test_every_option_of_every_subcommand_refuses_bad_values_in_one_line(world, monkeypatch):
    monkeypatch.chdir(world["root"])  # defaults such as `--out runs/train` land here, if anywhere
    runner = CliRunner()
    inputs = {str(world[key].relative_to(world["root"])) for key in ("gt", "pred")}  # what `eval --pred` reads
    runs = 0
    for args, value, refuse in walk(world):
        before = snapshot(world["root"])
        result = runner.invoke(app, args)
        runs += 1
        where = f"segcli {' '.join(map(repr, args))}"
        assert result.exception is None or isinstance(result.exception, SystemExit), (where, result.exception)
        assert "Traceback" not in result.stderr, where
        assert result.exit_code in (0, 2, 3), (where, result.exit_code, result.stderr)
        if refuse:
            assert result.exit_code == 2, (where, result.stderr)
        after = snapshot(world["root"])
        if result.exit_code == 0:  # `eval --pred` scored: it may write where it was told, never over its inputs
            assert all(after[name] == before[name] for name in inputs), where
            restore(world["root"], before)
            continue
        assert after == before, (where, set(after) ^ set(before))  # not a file created, changed or removed
        lines = result.stderr.splitlines()
        assert lines and lines[-1].startswith("segcli: error: "), (where, result.stderr)
        assert sum(line.startswith("segcli: error: ") for line in lines) == 1, (where, result.stderr)
        assert all(line.startswith(("segcli: ", "warning: ")) for line in lines), (where, result.stderr)
    assert runs > 400  # every parameter of the four subcommands was walked


@pytest.mark.parametrize("args, words", [
    (["predict", "x.jpg", "--bogus"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
    (["predict", "x.jpg", "--max-det", "abc"], "Invalid value for '--max-det'"),
    (["eval"], "Missing option '--gt'"),
    (["train"], "Missing option '--coco'"),
    (["export", "--weights", "x"], "Missing option"),
    (["predict"], "Missing argument"),
    (["predict", "x.jpg", "--bogus\nflag"], "--bogus"),
    (["--bogus"], "No such option"),
])
def test_click_usage_errors_are_one_plain_line_with_the_help_hint(args, words):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("segcli: error: "), result.stderr
    assert words in result.stderr
    command = "segcli" if args[0] not in ("predict", "eval", "train", "export") else f"segcli {args[0]}"
    assert result.stderr.rstrip().endswith(f"Try '{command} --help' for help."), result.stderr
    assert not re.search("[─│╭╮╰╯]", result.stderr)  # no rich box


def test_every_subcommand_rejects_an_unknown_flag_in_one_line():
    for name in typer.main.get_command(app).commands:
        result = CliRunner().invoke(app, [name, "--no-such-flag"])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, (name, result.stderr)
        assert result.stderr.startswith("segcli: error: ") and f"segcli {name} --help" in result.stderr


def test_help_shows_no_type_after_on_off_flags_and_train_groups_its_options():
    runner = CliRunner()
    for args in ([], *([name] for name in typer.main.get_command(app).commands)):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.stdout, args
        assert "--help" in result.stdout and "Show this message and exit." in result.stdout
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    panels = [line.strip("╭─ ") for line in train.splitlines() if line.startswith("╭─")]
    assert [p.split(" ")[0] for p in panels] == ["Options", "Data", "Model", "Schedule", "Output"], panels


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"segcli {__version__}\n"
