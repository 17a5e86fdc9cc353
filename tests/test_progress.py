"""Progress on a terminal and in a log (issue 43): a bar on a terminal; when the output is not a terminal
(`lgm train ... > log`), a plain line per task at a steady interval -- step/total, what the task says (loss),
images/s, elapsed, ETA -- instead of nothing until the end."""
import io

import pytest
from rich.console import Console

from lgm_lab.progress import INTERVAL_ENV, LogProgress, interval_from_env, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_plain_line_at_a_steady_interval():
    out = io.StringIO()
    clock = Clock()
    bar = LogProgress(Console(file=out, width=80), interval=30.0, get_time=clock)
    with bar:
        task = bar.add_task("train", total=100, images_per_step=64)
        for step in range(100):
            clock.now += 1.0  # one step a second
            bar.update(task, advance=1, description=f"epoch 1/1 loss {2.0 - step / 100:.4f}")
    lines = out.getvalue().splitlines()
    # every 30 s (steps 30, 60, 90), then the end; never wrapped at the console's width
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1 loss 1.7100", "epoch 1/1 loss 1.4100",
                                                      "epoch 1/1 loss 1.1100", "epoch 1/1 loss 1.0100"]
    assert lines[0].startswith("epoch 1/1 loss 1.7100: 30/100 (30%), 64 images/s, elapsed 0:00:30, ETA 0:01:10")
    assert lines[-1].startswith("epoch 1/1 loss 1.0100: 100/100 (100%), 64 images/s, elapsed 0:01:40")
    assert "ETA" not in lines[-1] and "\x1b" not in out.getvalue()  # plain text: no escape codes


def test_a_task_without_images_per_step_counts_its_own_unit_and_an_unfinished_task_ends_with_a_line():
    out = io.StringIO()
    clock = Clock()
    with LogProgress(Console(file=out, width=200), interval=5.0, get_time=clock) as bar:
        task = bar.add_task("scoring", total=1000, unit="images")
        for _ in range(4):
            clock.now += 2.0
            bar.update(task, advance=100)
        quick = bar.add_task("quick", total=10)  # done within the interval: prints nothing
        bar.update(quick, advance=10)
    lines = out.getvalue().splitlines()
    assert lines == ["scoring: 300/1000 (30%), 50 images/s, elapsed 0:00:06, ETA 0:00:14",
                     "scoring: 400/1000 (40%), 50 images/s, elapsed 0:00:08, ETA 0:00:12"]


def test_a_terminal_gets_a_bar_and_no_progress_prints_nothing(monkeypatch):
    term = io.StringIO()
    bar = progress(True, Console(file=term, force_terminal=True, width=100))
    assert not isinstance(bar, LogProgress)
    with bar:
        task = bar.add_task("train", total=10)
        bar.update(task, advance=10)
    assert "━" in term.getvalue() and "10/10" in term.getvalue()
    log = io.StringIO()
    assert isinstance(progress(True, Console(file=log, width=100)), LogProgress)
    silent = io.StringIO()
    for console in (Console(file=silent, width=100), Console(file=silent, force_terminal=True, width=100)):
        with progress(False, console) as bar:
            bar.update(bar.add_task("train", total=5), advance=5)
    assert silent.getvalue() == ""
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5 and progress(True, Console(file=log)).interval == 2.5
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            interval_from_env()


def test_a_long_stage_without_updates_still_prints_at_the_interval():
    """A task that does not advance for a while (one long stage of lgm reproduce) still gets its line every
    interval, from the timer thread; the thread ends with the display."""
    import threading
    import time

    out = io.StringIO()
    with LogProgress(Console(file=out, width=200), interval=0.05) as bar:
        bar.add_task("reproduce", total=3)
        time.sleep(0.3)
    assert out.getvalue().count("reproduce: 0/3 (0%)") >= 2
    assert not [t for t in threading.enumerate() if t.name == "lgm-progress"]
