"""Cron schedules for fine-tuning jobs, and the in-process scheduler for single-box installs.

Cron matching comes from ``croniter`` (a well-kept library; standard 5-field expressions). The
in-process scheduler is a daemon thread in ``enclave serve`` that starts the job as a separate
``finetune run`` process at each due time, so training never shares the API process's memory or
takes it down, and the job lock still keeps it to one job at a time across every replica.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

log = logging.getLogger(__name__)

QUARTERLY = "0 2 1 1,4,7,10 *"  # 02:00 on the first day of January, April, July and October


def validate(cron: str) -> str:
    from croniter import croniter

    if not croniter.is_valid(cron) or len(cron.split()) != 5:
        raise ValueError(f"not a 5-field cron expression: {cron!r}")
    return cron


def next_run(cron: str, after: datetime) -> datetime:
    """The first due time strictly after ``after`` (in ``after``'s time zone; naive means local)."""
    from croniter import croniter

    return croniter(validate(cron), after).get_next(datetime)


class InProcessScheduler:
    """Calls ``job()`` at every due time of ``cron`` until ``stop()``; a failing job is logged, never fatal."""

    def __init__(self, cron: str, job: Callable[[], object], *, now: Callable[[], datetime] | None = None):
        self.cron = validate(cron)
        self.job = job
        self.now = now or (lambda: datetime.now().astimezone())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="enclave-finetune-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            due = next_run(self.cron, self.now())
            log.info("next fine-tuning run at %s", due.isoformat())
            # Wake at least every minute so a changed clock (suspend, NTP step) is noticed.
            while not self._stop.is_set():
                left = (due - self.now()).total_seconds()
                if left <= 0:
                    break
                self._stop.wait(min(left, 60.0))
            if self._stop.is_set():
                return
            self.runs += 1
            try:
                self.job()
            except Exception:
                log.exception("scheduled fine-tuning run failed")


