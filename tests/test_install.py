"""Installed from a wheel (not editable), nanoseek works from any directory: the built-in recipes and the web
page ship in the package. Built and installed offline, with the dependencies this interpreter already has."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nanoseek

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # never the checkout
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def _data_files(folder):
    """Every file of the package that is not Python source: what must ship as package data."""
    return {f.relative_to(folder.parent).as_posix() for f in folder.rglob("*")
            if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts
            and not f.name.startswith(".")}


def _venv(path):
    """A fresh virtual environment that also sees this interpreter's packages (torch and the rest), even when this
    interpreter is itself a virtual environment: its site-packages folders go into a .pth file."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path], path.parent)
    python = path / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path).strip()
    parents = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    Path(purelib, "_parent_packages.pth").write_text("\n".join(parents) + "\n")
    return python


def test_wheel_installs_and_runs_a_builtin_recipe_from_anywhere(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "nanoseek", src / "nanoseek", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp_path / "dist", src], tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("nanoseek-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = _data_files(ROOT / "nanoseek")
    assert {"nanoseek/recipes/smoke.toml", "nanoseek/recipes/cpu.toml", "nanoseek/web/index.html"} <= needed
    assert needed <= shipped, f"not in the wheel: {sorted(needed - shipped)}"

    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], tmp_path)
    cli = python.parent / "nanoseek"
    here = tmp_path / "empty"
    here.mkdir()
    installed = _run([python, "-c", "import nanoseek; print(nanoseek.__file__)"], here).strip()
    assert Path(installed).resolve().is_relative_to((tmp_path / "venv").resolve()), f"imported {installed}"

    assert _run([cli, "--version"], here).strip() == f"nanoseek {nanoseek.__version__}"
    listed = dict(line.split(maxsplit=1) for line in _run([cli, "run", "--list"], here).splitlines())
    assert set(listed) == {f.stem for f in (ROOT / "nanoseek" / "recipes").glob("*.toml")}
    assert all(listed.values()) and "2 CPU cores" in listed["smoke"]

    out = _run([cli, "run", "--recipe", "smoke", "--stop-after", "data"], here, timeout=300)
    assert "[data] done" in out
    assert (here / "runs" / "smoke" / "tokenizer" / "tokenizer.json").is_file()
    assert (here / "runs" / "smoke" / "data" / "chat" / "manifest.json").is_file()
