"""The `tag` command end to end on the real sample photos."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from tag_lightning.commands.cli import build_parser, main
from tag_lightning.data.samples import HAPPINESS, NO_FACE


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_of_every_command_is_explained():
    for parser in _all_parsers(build_parser()):
        assert parser.description or parser.prog == "tag", parser.prog
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {action.dest} has no help text"


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "au-cache", "--help"])
    assert exit_.value.code == 0 and "--libreface-weights" in capsys.readouterr().out


@pytest.fixture(scope="module")
def built_cache(samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_cache")
    assert main(["prepare", "au-cache", "--images", str(samples_dir / "manifest.csv"), "--out", str(out), "--quiet"]) == 0
    return out


def test_au_show_json_contract(built_cache, samples_dir, capsys):
    capsys.readouterr()
    assert main(["prepare", "au-show", str(samples_dir / HAPPINESS), "--cache", str(built_cache), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == str(samples_dir / HAPPINESS)
    assert record["status"] == "ok" and record["reason"] is None
    assert len(record["face_box"]) == 4 and len(record["landmarks"]) == 478 and record["quality"]
    au12 = record["aus"]["AU12"]
    assert au12["source"] == "blendshape" and 0 <= au12["intensity"] <= 5 and len(au12["box"]) == 4


def test_au_show_no_face_and_drawing(built_cache, samples_dir, tmp_path, capsys):
    assert main(["prepare", "au-show", str(samples_dir / NO_FACE), "--cache", str(built_cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "no_face"
    drawing = tmp_path / "happy.png"
    assert main(["prepare", "au-show", str(samples_dir / HAPPINESS), "--cache", str(built_cache),
                 "--draw", str(drawing)]) == 0
    assert "AU12" in capsys.readouterr().out
    with Image.open(drawing) as image:
        assert image.size == (512, 512)


def test_clear_errors(built_cache, tmp_path, capsys):
    stranger = tmp_path / "stranger.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(stranger)
    assert main(["prepare", "au-show", str(stranger), "--cache", str(built_cache)]) == 2
    assert "not in the AU cache" in capsys.readouterr().err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["prepare", "au-cache", "--images", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["prepare", "au-show", str(stranger), "--cache", str(tmp_path / "nothing")]) == 2
    assert "tag prepare au-cache" in capsys.readouterr().err


def test_demo_prepares_everything_the_configs_expect(demo_dir, capsys):
    drawings = sorted(p.name for p in (demo_dir / "drawings").glob("*.png"))
    assert len(drawings) == 6 and "free-mountain-vector-01_aus.png" not in drawings
    assert (demo_dir / "traces.jsonl").read_text().count("\n") == 4  # the four labelled photos
    assert (demo_dir / "tiny-qwen2.5-vl" / "config.json").is_file()


@pytest.mark.parametrize("module", ["tag_lightning.models.sft.SFTModule", "tag_lightning.models.grpo.GRPOModule"])
def test_no_module_option_shares_a_name_with_a_datamodule_option(module):
    """Lightning logs the module's and the datamodule's arguments together and stops a run whose
    shared names differ (e.g. a GRPO ``seed`` and the datamodule's ``seed``)."""
    import importlib
    import inspect

    from tag_lightning.data.datamodule import FERDataModule

    path, name = module.rsplit(".", 1)
    options = set(inspect.signature(getattr(importlib.import_module(path), name)).parameters)
    assert not options & set(inspect.signature(FERDataModule).parameters)
