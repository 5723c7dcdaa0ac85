"""Progress reporting for long work: done/total, rate, ETA, printed at most every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Callable


def format_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``p = Progress("vae", total=600, unit="steps"); p.update(1, loss=0.1)``.

    Prints ``[vae] 120/600 steps (20%) 3.1 steps/s ETA 2m34s loss=0.1000`` every ``every`` seconds
    and at the end; ``on_report`` (e.g. an MLflow logger) receives the same numbers.
    """

    def __init__(self, name: str, total: int, unit: str = "items", every: float = 10.0,
                 on_report: Callable[[dict], None] | None = None, stream=None):
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.on_report = on_report
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = self.last = time.monotonic()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **metrics: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self.report(**metrics)

    def report(self, **metrics: float) -> None:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        eta_s = format_seconds(eta) if eta != float("inf") else "?"
        print(f"[{self.name}] {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
              f"ETA {eta_s} {extra}".rstrip(), file=self.stream, flush=True)
        if self.on_report:
            self.on_report({"done": self.done, "total": self.total, "rate": rate, **metrics})
