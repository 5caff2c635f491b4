"""Per-step training metrics: a JSONL log beside the checkpoints, and a follower for whoever reports them.

Rank 0 writes one record per step (loss and its parts, token accuracy, action error, samples/s,
tokens/s, lr), the values averaged over every rank's batch, so the log shows the global batch
whatever the worker count. A run resumed after a kill appends again from its checkpoint's step;
`read_metrics` keeps the last record of each step. The flow follows the file while training runs
(`follow`) and forwards records to Prefect; nothing here knows Prefect.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from gr2.lake.uri import url_to_fs

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends records to <run_dir>/metrics.jsonl (rewritten whole on stores that cannot append)."""

    def __init__(self, run_dir: str):
        self.path = f"{run_dir.rstrip('/')}/{METRICS}"
        self.fs, self._path = url_to_fs(self.path)
        self._local = "file" in self.fs.protocol
        self._pending: list[dict] = []
        self._all: list[dict] | None = None if self._local else read_metrics_raw(self.path)
        if self._local:
            self.fs.makedirs(self._path.rsplit("/", 1)[0], exist_ok=True)
            self._end_a_torn_line()

    def _end_a_torn_line(self) -> None:
        """A worker killed mid-append leaves half a line; ended here, the records after it stay whole."""
        try:
            with open(self._path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        except FileNotFoundError:
            pass

    def write(self, record: dict) -> None:
        self._pending.append(record)

    def flush(self) -> None:
        if not self._pending:
            return
        if self._local:
            with open(self._path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._pending)
        else:
            self._all.extend(self._pending)
            with self.fs.open(self._path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._all)
        self._pending.clear()


def read_metrics_raw(path: str) -> list[dict]:
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return []
    with fs.open(p) as f:
        lines = f.read().decode().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or an append torn by a worker killed mid-write: not a record
            continue
    return records


def read_metrics(run_dir: str) -> list[dict]:
    """The run's step records in step order, the last written for each step (resumes rewrite some)."""
    by_step: dict[int, dict] = {}
    for r in read_metrics_raw(f"{run_dir.rstrip('/')}/{METRICS}"):
        if "step" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def smoothed(records: list[dict], key: str = "loss", window: int = 20) -> list[float]:
    """A trailing mean of `key`: the curve to compare between runs, one step's noise aside."""
    values, out = [r[key] for r in records if key in r], []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def follow(path: str, callback: Callable[[dict], None], stop: threading.Event, interval_s: float = 2.0,
           start_at_end: bool = False) -> threading.Thread:
    """Call `callback` with each record appended to the local JSONL `path` until `stop` is set
    (start_at_end: only records written from now on, not a resumed run's earlier ones)."""

    def run() -> None:
        offset = os.path.getsize(path) if start_at_end and os.path.exists(path) else 0
        while True:
            finished = stop.is_set()
            try:
                with open(path) as f:
                    f.seek(offset)
                    data = f.read()
                    # only whole lines: the writer may be mid-line
                    end = data.rfind("\n") + 1
                    offset += len(data[:end].encode())
                for line in data[:end].splitlines():
                    if line.strip():
                        callback(json.loads(line))
            except FileNotFoundError:
                pass
            if finished:
                return
            stop.wait(interval_s)

    thread = threading.Thread(target=run, name="metrics-follower", daemon=True)
    thread.start()
    return thread


class Throughput:
    """Samples and tokens per second over the steps since the last call."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def tick(self, samples: int, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, self._t = max(now - self._t, 1e-9), now
        return {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "step_s": dt}
