"""Every command the README and the docs tell a user to run starts from the installed wheel, not from the source tree.

Each runs in a fresh process whose working directory is outside the clone (so ``import tts_plugins`` can only find
the installed package), with the venv's own interpreter and console script. ``--help`` imports the command's module
and runs its argument parser; commands with a cheap real run (``tts bench --list``, ``benchmarks/summary.py`` on an
empty folder) run it too. The demo itself (``./dev demo``) runs end to end in its own CI phase on the real engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_packaging import installed

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY = str(BIN / "python")

# (the command as a user types it, minus the interpreter, and a string its output must hold)
MODULES = [
    (["-m", "tts_plugins.models.demo", "--help"], "--problems"),
    (["-m", "tts_plugins.models.trained", "--help"], "--variant"),
    (["-m", "tts_plugins.client.cli", "--help"], "bench"),
]
TTS = [(["--help"], "bench"), (["run", "--help"], "--strategy"), (["bench", "--help"], "--method"), (["bench", "--list"], "short-m"),
       (["plugins"], "tts_think_max"), (["plugins", "--json"], '"model_patches"'),
       (["serve", "--help"], "--upstream")]
# the benchmark scripts the README and the docs name, run from the clone with the venv's interpreter
SCRIPTS = ["accuracy.py", "carbon_fit.py", "deepconf.py", "efficiency.py", "engine.py", "gpu_check.py", "hotpath.py", "moi.py", "reliability.py",
           "roster.py", "serve.py"]


def _run(argv: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    installed()  # skips on an editable install
    cwd = tmp_path_factory.mktemp("user")
    where = _run([PY, "-c", "import tts_plugins, json; print(json.dumps(tts_plugins.__file__))"], cwd).strip().splitlines()[-1]
    path = Path(json.loads(where)).resolve()
    assert "site-packages" in path.parts and not path.is_relative_to(ROOT / "tts_plugins"), f"tts_plugins imported from the clone: {where}"
    return cwd


@pytest.mark.parametrize("argv,expect", MODULES, ids=[" ".join(a[:2]) for a, _ in MODULES])
def test_python_dash_m_commands_run_from_the_wheel(outside, argv, expect):
    assert expect in _run([PY, *argv], outside)


@pytest.mark.parametrize("argv,expect", TTS, ids=[" ".join(a) for a, _ in TTS])
def test_tts_console_script(outside, argv, expect):
    tts = BIN / "tts"
    assert tts.exists(), "the wheel's console script `tts` is not installed beside the interpreter"
    assert expect in _run([str(tts), *argv], outside)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_scripts_start(outside, script):
    assert "usage" in _run([PY, str(ROOT / "benchmarks" / script), "--help"], outside).lower()


def test_the_gpu_check_dry_run(outside):
    """``./dev gpu``'s script: CI cannot lend it a GPU, so it imports what the check needs and parses its arguments."""
    assert "dry run" in _run([PY, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], outside)


def test_benchmark_summary_runs_on_an_empty_folder(outside, tmp_path):
    _run([PY, str(ROOT / "benchmarks" / "summary.py"), str(tmp_path)], outside)


def test_every_readme_command_is_covered():
    """A ``python -m`` module or benchmark script that the README or a docs page (``docs/**/*.md``) tells a user to
    run, and that this file does not start, fails here: a new documented command gets its smoke test."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 1, "no docs pages found under docs/"
    text = "\n".join(p.read_text() for p in pages)
    modules = set(re.findall(r"python -m (tts_plugins[\w.]*)", text))
    covered = {a[1] for a, _ in MODULES}
    assert modules <= covered, f"documented commands without a smoke test: {sorted(modules - covered)}"
    scripts = set(re.findall(r"benchmarks/(\w+\.py)", text)) - {"summary.py"}
    assert scripts <= set(SCRIPTS), f"documented scripts without a smoke test: {sorted(scripts - set(SCRIPTS))}"
