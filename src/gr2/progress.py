"""Progress of long work: a bar on a terminal, a line every half minute off one (logs, CI, cron).

    with progress(len(specs), "build: clips", "clip") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

`GR2_PROGRESS=0` turns the bar off (the tests set it); the lines still come, so a scheduled build's
log says how far it got. tqdm draws the bar, as it does for Ray's and Hugging Face's own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

EVERY_S = 30.0  # seconds between lines when no terminal shows a bar


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str, every_s: float = EVERY_S, stream=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if os.environ.get("GR2_PROGRESS", "1") == "1" and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f" of {self.total}" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.done < self.total:
            left = f", about {(self.total - self.done) / rate:.0f} s left"
        return f"{self.desc}: {self.done}{of} {self.unit}s in {elapsed:.0f} s ({rate:.2f}/s{left})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done and time.monotonic() - self.started >= self.every_s:
            self._print(self.line())  # a long job's last line; a short one said nothing and needs not

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str, every_s: float = EVERY_S) -> Iterator[Progress]:
    bar = Progress(total, desc, unit, every_s)
    try:
        yield bar
    finally:
        bar.close()
