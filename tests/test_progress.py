"""Long work shows a bar on a terminal and a line now and then off one (logs, CI, cron)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import termios

from gr2.progress import Progress


def test_off_a_terminal_it_prints_lines_with_the_count_the_total_and_the_rate():
    out = io.StringIO()
    bar = Progress(4, "build: clips", "clip", every_s=0.0, stream=out)
    bar.update(1)
    bar.update(3)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("build: clips: 1 of 4 clips in ") and "/s, about" in lines[0]
    assert lines[1].startswith("build: clips: 4 of 4 clips") and "left" not in lines[1]


def test_a_short_job_off_a_terminal_says_nothing():
    out = io.StringIO()
    bar = Progress(4, "ingest: episodes", "episode", stream=out)  # every 30 s: never reached
    bar.update(4)
    bar.close()
    assert out.getvalue() == ""


def test_on_a_terminal_it_draws_a_bar_unless_told_not_to(monkeypatch):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setenv("GR2_PROGRESS", "1")
        bar = Progress(10, "tokenize: clips", "clip", stream=terminal)
        bar.update(10)
        bar.close()
        terminal.flush()
        drawn = ""
        while "10/10" not in drawn and select.select([master], [], [], 5)[0]:
            drawn += os.read(master, 65536).decode(errors="replace")
        assert "tokenize: clips" in drawn and "10/10" in drawn
        monkeypatch.setenv("GR2_PROGRESS", "0")
        assert Progress(10, "quiet", "clip", stream=terminal).bar is None
    os.close(master)
