"""The installed package: one top-level import name, and the public API importable from it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """negcase built as a wheel from this checkout, as `pip install .` would build it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    (built,) = out.glob("negcase-*.whl")
    return built


def test_the_wheel_installs_exactly_one_top_level_package(wheel: Path) -> None:
    """Given the built wheel, then everything in it lives under negcase/ (or its metadata)."""
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"negcase"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # The data files travel too: Lua scripts, JSON Schemas, the dashboard page.
    assert "negcase/store/claim.lua" in names
    assert "negcase/schemas/trade_closed.schema.json" in names
    assert "negcase/cli/dashboard.html" in names


def test_the_public_api_imports_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """Given the wheel installed into a fresh folder, when a program outside the checkout
    imports negcase, then the public names resolve there, and nothing else at top level."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top in (["negcase"], ["bin", "negcase"])
    program = (
        "import negcase, sys;"
        "from negcase import SignalClient, Predictor, TradeClosed, Settings, ModelFactory;"
        "print(negcase.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().startswith(str(target))
