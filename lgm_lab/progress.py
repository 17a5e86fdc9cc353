"""Progress of long work, for a terminal and for a log.

On a terminal, a rich progress bar.  When the output is not a terminal (``lgm train ... > log``, a batch job, CI),
a bar would print nothing until the end; :class:`LogProgress` prints one plain line per task instead, at a steady
interval (``LGM_PROGRESS_INTERVAL`` seconds, default 30), and a last one when a task that printed finishes (work
shorter than the interval prints nothing, so a quick command's output stays as it was):

    train: 120/1024 (12%), epoch 1/4 loss 0.6123 acc 78.1%, 412 images/s, elapsed 0:00:37, ETA 0:04:40

``images/s`` when the task counts steps of ``images_per_step`` images (a field given to ``add_task``), else the
task's own unit per second (``unit``, default ``it``).
"""
from __future__ import annotations

import datetime
import os
import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress", "LogProgress", "INTERVAL_ENV", "DEFAULT_INTERVAL"]

INTERVAL_ENV = "LGM_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval_from_env() -> float:
    """The seconds between two log lines: ``LGM_PROGRESS_INTERVAL`` (a number >= 0), else 30."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {text!r}")
    return value


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class LogProgress(Progress):
    """rich's :class:`~rich.progress.Progress` for a log: no live display; one plain line per running task every
    ``interval`` seconds -- when it advances, and from a timer thread while it does not (a long stage still
    says it runs) -- and a last one when a task that printed finishes (or the display stops with it
    unfinished).  The same interface (``add_task``, ``update``, ``advance``, ``tasks``, a context manager), so a
    command writes its progress once for both."""

    def __init__(self, console: Console, interval: float, **kwargs) -> None:
        super().__init__(console=console, disable=True, **kwargs)
        self.interval = float(interval)
        self._last: dict[TaskID, tuple[float, float]] = {}  # task -> (time of its last line, completed then)
        self._printed: set[TaskID] = set()  # tasks that printed a line
        self._print_lock = threading.Lock()
        self._stopped = threading.Event()
        self._timer: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self.interval > 0 and self._timer is None:
            self._stopped.clear()
            self._timer = threading.Thread(target=self._tick, name="lgm-progress", daemon=True)
            self._timer.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            for task in self.tasks:
                if task.started and not task.finished:
                    self._maybe_print(task.id, unchanged=True)

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> TaskID:
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                   **fields)
        self._last[task_id] = (self.get_time(), completed)  # the first line comes one interval later
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def stop(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        for task in self.tasks:  # the last state of a task that printed, if its last line is older
            if task.id in self._printed and self._last[task.id][1] != task.completed:
                self._print(task.id)
        super().stop()

    def _maybe_print(self, task_id: TaskID, unchanged: bool = False) -> None:
        with self._print_lock:
            task = self._tasks[task_id]
            last_time, last_completed = self._last[task_id]
            if last_completed == task.completed and not unchanged:
                return
            if self.get_time() - last_time >= self.interval or task.finished and task_id in self._printed:
                self._print(task_id)

    def line(self, task_id: TaskID) -> str:
        """The task's progress as one plain line (what the log gets)."""
        task = self._tasks[task_id]
        parts = []
        if task.total:
            parts.append(f"{task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f}%)")
        else:
            parts.append(f"{task.completed:g}")
        speed = task.finished_speed if task.finished else task.speed
        if speed is None and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        if speed:
            per_step = task.fields.get("images_per_step")
            parts.append(f"{speed * per_step:.0f} images/s" if per_step else
                         f"{speed:.3g} {task.fields.get('unit', 'it')}/s")
        parts.append(f"elapsed {_clock(task.elapsed)}")
        if not task.finished and task.total:
            parts.append(f"ETA {_clock(task.time_remaining)}")
        return ", ".join([f"{task.description}: {parts[0]}", *parts[1:]])

    def _print(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.visible:
            self.console.print(self.line(task_id), markup=False, highlight=False, soft_wrap=True, emoji=False)
            self._printed.add(task_id)
        self._last[task_id] = (self.get_time(), task.completed)


def progress(enabled: bool, console: Console | None = None, *, interval: float | None = None) -> Progress:
    """Progress for ``console`` (rich's default console, stdout, when None): a bar on a terminal, a
    :class:`LogProgress` (plain lines every ``interval`` seconds; None: ``LGM_PROGRESS_INTERVAL`` or 30) when the
    output is not a terminal, nothing when not ``enabled`` (``--no-progress``)."""
    from rich import get_console

    console = console or get_console()
    if enabled and not console.is_terminal:
        return LogProgress(console, interval_from_env() if interval is None else interval)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)
