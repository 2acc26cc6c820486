"""Progress lines on stderr for every slow stage: one line redrawn in place on a terminal, plain lines every
few seconds in a log file (where redrawing would pile up into one very long line)."""
from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 5.0  # when stderr is not a terminal: at most one progress line per this many seconds, and the last


class progress_printer:  # noqa: N801 (a function to its callers: progress=progress_printer("denoising"))
    """`report(done, total)` draws `label: 7/50 steps, 1.23 s/step, ETA 0:53` on one stderr line.

    Use it as `with progress_printer("denoising") as report:` so that the line is ended when the stage
    ends for any reason, before any message is printed; it also ends the line itself when done == total.
    When stderr is not a terminal, it prints plain lines instead: the first, one every PLAIN_EVERY_S, the last.
    """

    def __init__(self, label: str, unit: str = "step"):
        self.label, self.unit = label, unit
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, done) of the first report
        self.open = False
        self.terminal = getattr(sys.stderr, "isatty", lambda: False)()
        self.printed_at: float | None = None  # not a terminal: when the last plain line was printed
        self.pending: str | None = None  # not a terminal: the latest text not yet printed

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
        if self.terminal:
            print(f"\r{text:<79}", end="", file=sys.stderr, flush=True)
            self.open = True
            return
        now = time.monotonic()
        if self.printed_at is None or now - self.printed_at >= PLAIN_EVERY_S:
            print(text.rstrip(), file=sys.stderr, flush=True)
            self.printed_at, self.pending = now, None
        else:
            self.pending = text

    def end(self) -> None:
        if self.pending is not None:  # the final state of a stage is always in the log
            print(self.pending.rstrip(), file=sys.stderr, flush=True)
            self.pending = None
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
