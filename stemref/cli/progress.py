"""Progress lines on stderr for every slow stage."""
from __future__ import annotations

import sys
import time


class progress_printer:  # noqa: N801 (a function to its callers: progress=progress_printer("denoising"))
    """`report(done, total)` draws `label: 7/50 steps, 1.23 s/step, ETA 0:53` on one stderr line.

    Use it as `with progress_printer("denoising") as report:` so that the line is ended when the stage
    ends for any reason, before any message is printed; it also ends the line itself when done == total.
    """

    def __init__(self, label: str, unit: str = "step"):
        self.label, self.unit = label, unit
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, done) of the first report
        self.open = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.first = self.first or (now, done)
        since, before = self.first
        # the rate from the first report on: the time before it may include another stage (a VAE encode)
        per = (now - since) / (done - before) if done > before else (now - self.started) / max(done, 1)
        text = f"{self.label}: {done}/{total} {self.unit}s"
        if done:
            text += f", {per:.2f} s/{self.unit}, " + (f"ETA {_duration(per * (total - done))}" if done < total
                                                      else f"{_duration(now - self.started)} in all")
        self.show(text)
        if done >= total:
            self.end()

    def show(self, text: str) -> None:
        """Redraw the line with any text (the downloader shows bytes and rates)."""
        print(f"\r{text:<79}", end="", file=sys.stderr, flush=True)
        self.open = True

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False

    def __enter__(self) -> "progress_printer":
        return self

    def __exit__(self, *exc) -> None:
        self.end()


class silent_printer(progress_printer):  # noqa: N801
    """A progress_printer that draws nothing: the other ranks of a run under torchrun (rank 0 reports)."""

    def show(self, text: str) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"
