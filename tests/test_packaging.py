"""What setup.cfg promises about the installed environment: one OpenCV build, no unused extras, and
no package that reaches the network when tag_lightning imports it."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPENCV = ("opencv-contrib-python", "opencv-python-headless")  # mediapipe's, albumentations' and albucore's


def requirements(key: str, section: str = "options") -> dict[str, str]:
    """`name -> version specifier` of a requirement list in setup.cfg (comments skipped)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = (line.split("#")[0].strip() for line in config[section][key].splitlines())
    pairs = (re.match(r"([A-Za-z0-9_.\[\]-]+)\s*(.*)", line).groups() for line in lines if line)
    return {name.split("[")[0].lower(): specifier for name, specifier in pairs}


def test_both_opencv_packages_are_pinned_to_the_one_installed_version():
    pins = {name: requirements("install_requires").get(name, "") for name in OPENCV}
    assert all(pin.startswith("==") for pin in pins.values()), pins
    assert len(set(pins.values())) == 1, pins
    for name, pin in pins.items():
        assert version(name) == pin.removeprefix("=="), name


def cv2_names(package: str) -> set[str]:
    """The `cv2.<name>` attributes an installed package's sources use."""
    root = Path(importlib.util.find_spec(package).origin).parent
    names = set()
    for path in root.rglob("*.py"):
        source = path.read_text(encoding="utf-8", errors="replace")
        if "cv2" in source:
            names |= {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
                      and isinstance(node.value, ast.Name) and node.value.id == "cv2"}
    return names


@pytest.mark.parametrize("package", ["tag_lightning", "mediapipe", "albumentations", "albucore"])
def test_cv2_imports_with_what_each_user_of_it_needs(package):
    import cv2

    assert cv2.__version__ == version("opencv-python-headless").rsplit(".", 1)[0]  # e.g. 5.1.0 of 5.1.0.95
    used = cv2_names(package)
    assert used, f"{package} uses nothing of cv2?"
    missing = sorted(name for name in used if not hasattr(cv2, name))
    assert not missing, f"{package} uses cv2.{missing}, which this cv2 lacks"


def test_every_bench_extra_is_imported_by_a_bench_script():
    imported = set()
    for script in (REPO / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    unused = [name for name in requirements("bench", "options.extras_require") if name.replace("-", "_") not in imported]
    assert not unused, f"the bench extra installs {unused}, which no bench script imports"


def test_importing_the_package_opens_no_network_connection():
    """albumentations looks for a newer release on pypi.org when imported, unless told not to."""
    probe = """
import os, socket
os.environ.pop("NO_ALBUMENTATIONS_UPDATE", None)
asked = []
def refuse(host, *args, **kwargs):
    asked.append(host)
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
import tag_lightning.commands.cli, tag_lightning.data.datamodule, tag_lightning.models.grpo
print(asked)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])
