"""Progress in the rules' logs: logging set up once per process, and progress lines with elapsed time and ETA.

Every rule runs `tamperlab ... > {log} 2>&1`, so whatever reaches stderr or stdout while a job runs is its log.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup() -> None:
    """Once, at the command's entry point: tamperlab's loggers at INFO, other libraries' at WARNING (their INFO is
    request-level noise), to stderr. Both streams line-buffered: redirected to a file they would be block-buffered,
    and the Trainer prints its per-step loss lines to stdout (PrinterCallback, as tqdm is off)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("tamperlab").setLevel(logging.INFO)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`what i/N: detail, elapsed H:MM:SS, eta H:MM:SS` lines, at most one every `every` seconds unless forced
    (the last one always). `done` counts from `start` (a resumed run): the ETA extrapolates this process's pace."""

    def __init__(self, log: logging.Logger, what: str, total: int, every: float = 10.0, start: int = 0):
        self.log, self.what, self.total, self.every, self.start = log, what, total, every, start
        self.began = self.last = time.perf_counter()

    def update(self, done: int, detail: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and done < self.total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.began
        pace = elapsed / (done - self.start) if done > self.start else 0.0
        self.log.info("%s %d/%d%s, elapsed %s, eta %s", self.what, done, self.total, f": {detail}" if detail else "",
                      clock(elapsed), clock(pace * (self.total - done)))
