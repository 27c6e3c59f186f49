"""Progress of a long step, with its rate and the time left: a tqdm bar on a terminal; where the
output is a file or a pipe (CI logs), a plain line every `every_s` seconds and one at the end, since
a bar's carriage returns would fill a log with partial lines."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class PlainProgress:
    """tqdm's calls the code uses (update, set_postfix_str, write, close), printed as lines."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 30.0, file=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.file = file or sys.stdout
        self.n = self.initial = initial
        self.postfix = ""
        self._started = self._printed = time.monotonic()
        # (time, n) just after the first advance: the rate counts from there, since start-up (or the
        # steps a resumed run had done before) is no part of it.
        self._rate_from: tuple[float, int] | None = None

    def update(self, n: int = 1) -> None:
        """Advance by `n`; a line when `every_s` has passed since the last, even for n=0 (the step is alive)."""
        self.n += n
        if n and self._rate_from is None:
            self._rate_from = (time.monotonic(), self.n)
        if time.monotonic() - self._printed >= self.every_s:
            self._print()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text
        if refresh:
            self.update(0)

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        self._print()

    def line(self) -> str:
        now = time.monotonic()
        since, first_n = self._rate_from or (now, self.n)
        rate = (self.n - first_n) / (now - since) if now > since else 0.0
        if rate == 0 and now > self._started:  # one advance so far (or at the end of a one-batch step): the average
            rate = (self.n - self.initial) / (now - self._started)
        left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        postfix = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s [{tqdm.format_interval(now - self._started)} elapsed, "
                f"{left} left, {rate:.2f} {self.unit}s/s{postfix}]")

    def _print(self) -> None:
        self._printed = time.monotonic()
        self.write(self.line())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, file=None):
    """A bar on a terminal (tqdm), plain lines elsewhere; both are context managers with `update(n)`,
    `set_postfix_str`, `write` (a line that does not break the bar) and `close`."""
    file = file or sys.stdout  # the story's stream: bars and lines stay in order
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, dynamic_ncols=True, smoothing=0.1)
    return PlainProgress(total, desc, unit, initial, file=file)
