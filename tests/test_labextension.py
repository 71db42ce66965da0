"""The JupyterLab extension: its TypeScript unit tests, its install, and the wheel that ships it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", CI="true")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_typescript_unit_tests_pass():
    result = run(["jlpm", "test"], cwd=ROOT / "labextension")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_labextension_is_installed_and_enabled():
    result = run([str(BIN / "jupyter"), "labextension", "list"])
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "mlx-jupyter" in line]
    assert lines, result.stdout + result.stderr
    assert "enabled" in lines[0] and "OK" in lines[0], lines[0]


def test_wheel_ships_the_labextension_as_shared_data(tmp_path):
    result = run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    target = "share/jupyter/labextensions/mlx-jupyter/"
    (data,) = {n.split(target)[0] + target for n in names if target in n}
    assert data + "package.json" in names
    assert data + "install.json" in names
    assert any(n.startswith(data + "static/remoteEntry.") for n in names), names
    assert "mlx_jupyter/kernel/static/dashboard.js" in names
    assert not any("node_modules" in n for n in names)
