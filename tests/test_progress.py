"""Progress bars: a live bar on a terminal; in a log, whole lines no more often than every few
seconds and the final state; every command's bar made by estimator.base.progress."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from estimator.base.progress import LogLines, progress_bar
from tests.conftest import ROOT


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar_through_log(updates: int, step_s: float, interval_s: float) -> list[str]:
    """The lines a bar of ``updates`` updates, ``step_s`` apart, leaves in a log."""
    from tqdm import tqdm

    clock, log = FakeClock(), io.StringIO()
    with tqdm(total=updates, desc="work", file=LogLines(log, interval_s, clock), ascii=True, mininterval=0) as bar:
        for _ in range(updates):
            clock.now += step_s
            bar.update()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    return log.getvalue().splitlines()


def test_a_log_gets_a_line_per_interval_and_the_final_state():
    lines = _bar_through_log(updates=1000, step_s=0.1, interval_s=5.0)  # 100 s of work
    assert lines[0].startswith("work:   0%") and "1000/1000" in lines[-1]
    assert 1 + 100 / 5 <= len(lines) <= 1 + 100 / 5 + 1  # the first, one per 5 s, the last
    assert all(line.startswith("work:") for line in lines)
    # a bar quicker than the interval leaves its first and last state only
    assert [line.split("|")[-1].split(" [")[0] for line in _bar_through_log(50, 0.01, 5.0)] == [" 0/50", " 50/50"]


def test_a_terminal_gets_the_live_bar_and_a_log_gets_lines():
    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        with progress_bar(total=3, desc="points", unit="point", stream=stream) as bar:
            for _ in range(3):
                bar.update()
    assert "\r" in tty.getvalue()  # redrawn in place
    assert "\r" not in log.getvalue() and log.getvalue().splitlines()[-1].startswith("points: 100%")
    assert progress_bar(total=1, stream=log, disable=True).disable


def test_every_progress_bar_of_the_project_is_made_by_estimator_base_progress():
    users = []
    for path in ROOT.rglob("*.py"):
        if path.parts[len(ROOT.parts)] in ("tests", ".git") or path == ROOT / "estimator" / "base" / "progress.py":
            continue
        text = path.read_text()
        if "import tqdm" in text or "from tqdm" in text:
            users.append(str(path.relative_to(ROOT)))
    assert users == [], f"these make tqdm bars of their own: {users}"


def test_a_search_piped_into_a_log_leaves_a_small_readable_log(tmp_path: Path):
    # `python -m search > log 2>&1` on the built-in default experiment; --max-evals bounds the work
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "search", "--max-evals", "3000"], cwd=tmp_path, stdout=fh,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert len(text.encode()) < 5000, f"{len(text.encode())} bytes"
    assert "\r" not in text and "] ," not in text
    progress = [line for line in text.splitlines() if line.startswith("search:")]
    assert progress[0].startswith("search: 0 plans") and progress[-1].startswith("search: 3000 plans [")
    assert progress[-1].endswith(" s]") and ", best " in progress[-1]  # the best so far inside the brackets
    assert "speedup of the searched plan" in text  # the report follows
