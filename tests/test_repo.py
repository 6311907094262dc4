"""The front door: the README's commands match CI, and the tree is lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(block.strip() for block in _readme_commands() if "pytest" in block)
    assert test_cmd in ci.splitlines()


def test_readme_set_up_command_pins_the_cpu_torch_and_runs_the_main_job():
    setup = next(block for block in _readme_commands() if "python -m search" in block)
    assert "torch==2.13.0" in setup and "python -m " in setup


def test_a_reader_meets_the_cpu_wheel_before_any_command_that_installs_torch():
    # on the standard index torch==2.13.0 is the CUDA build: GBs a machine without GPUs never uses
    installs = [block for block in _readme_commands() if "torch" in block]
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    text = (ROOT / "README.md").read_text()
    for section in ("## Set up and run", "## Test"):
        part = text[text.index(section):]
        part = part[:part.index("\n## ", 1)]
        assert part.index("without GPUs") < part.index('pip install "torch==2.13.0" -e'), section


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by the dev extra")
def test_ruff_clean():
    r = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
