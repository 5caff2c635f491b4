"""Reliability: gr2's jobs on a flaky object store, and hostile files per format.

    .venv/bin/python benchmarks/reliability.py [--rates 0.2] [--mixed 0.05] [--seed 0] [--skip-hostile]

Storage faults: moto's S3 server on 127.0.0.1 behind tests/faultproxy.py's FaultProxy, which returns
500 and 503 SlowDown, resets connections before replying, cuts replies half-way, or stalls them
(1 s, below every client's timeout). For a healthy store, every kind at once at each --mixed rate,
then each kind alone at each --rates rate (a rate is per kind, per request), each on a fresh
bucket: a video build, a tokenize and a short training run with a checkpoint every step on one S3
lake, a robot ingest, and bare lake commits (Lance alone). Each job runs once, again if it
stopped or left work undone (the faults still on), and a third time on a healed store if it still
had not finished; then what the lake holds is counted: inputs with their row, ids unique.

Hostile files: tests/test_hostile_robot.py and the manifest properties of tests/test_hostile_input.py
run under pytest with a tally of every damaged file they try, per format, and how each ended.

The jobs are tests/fault_runs.py's, shared with tests/test_faults.py: this script loads it and the
proxy from their paths (they are test tools, not part of gr2). Prints a table and writes
benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
OUT = Path(__file__).parent / "results" / "reliability.json"


def load(name: str):
    """tests/<name>.py as module `name` (registered, so the files can import each other by name)."""
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def start_s3() -> str:
    """moto's S3 server on loopback, its keys in this process's environment; its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return f"http://{host}:{port}"


def storage_rows(moto: str, settings: list[tuple[tuple[str, ...], float]], seed: int) -> list[dict]:
    """Every job under every (kinds, rate) setting, each on a fresh bucket; one row per job."""
    import boto3
    import fault_runs as runs
    from faultproxy import FaultProxy

    from gr2.lake.lake import Lake

    work = Path(tempfile.mkdtemp(prefix="gr2-reliability-"))
    videos, robot = runs.make_videos(work / "videos"), runs.ROBOT_SAMPLE
    rows = []
    with FaultProxy(moto, seed=seed, stall_s=1.0) as proxy:
        for n, (kinds, rate) in enumerate(settings):
            bucket = f"reliability-{n}-{int(time.time())}"
            boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=bucket)
            video_uris = runs.upload(videos, bucket, "videos", moto)
            sources = [*runs.upload([robot], bucket, "robot", moto), f"s3://{bucket}/robot/nothing-here"]
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            lake = Lake(f"s3://{bucket}/lake")
            jobs = {"build": runs.video_build(lake, video_uris, undecodable=1),
                    "tokenize": runs.video_tokenize(lake),
                    "train": runs.training(lake),
                    "ingest": runs.robot_ingest(Lake(f"s3://{bucket}/robot-lake"), sources, episodes=1),
                    "commits": runs.lake_commits(Lake(f"s3://{bucket}/commit-lake"))}
            for job, (run, check) in jobs.items():
                outcome = runs.run_job(job, proxy, kinds, rate, run, check, heal_after_rerun=True)
                rows.append(outcome.row())
                print(_storage_line(rows[-1]), flush=True)
            os.environ["AWS_ENDPOINT_URL"] = moto
    return rows


def _storage_line(r: dict) -> str:
    injected = sum(r["injected"].values())
    ended = "first try" if r["first_try"] else "re-run" if r["after_rerun"] else "healed" if r["after_heal"] else "NOT"
    return (f"{r['kinds']:>20} {r['rate']:>5.2f} {r['job']:>9} {injected:>5}/{r['requests']:<5} {ended:>9} "
            f"{r['accounted']:>3}/{r['inputs']:<3} {'yes' if r['ids_unique'] else 'NO':>6} {r['seconds']:>6.1f}s  "
            f"{r['error'][:90]}")


class HostileTally:
    """A pytest plugin counting each hostile file the property tests try, per format, by how it ended."""

    FORMATS = (("lerobot_v3", "LeRobot v3"), ("lerobot", "LeRobot v2 (parquet + meta JSON)"),
               ("meta_info", "LeRobot v2 (parquet + meta JSON)"), ("episode_indices", "LeRobot v2 (parquet + meta JSON)"),
               ("hdf5", "HDF5 (robomimic, ALOHA)"), ("calvin", "CALVIN npz"), ("annotation", "annotated JSON"),
               ("jsonl_manifest", "manifest JSONL"), ("arbitrary_bytes", "manifest (any bytes)"),
               ("csv_and_parquet", "manifest CSV / Parquet"))

    def __init__(self):
        self.ended: dict[str, Counter] = {}
        self.tests: Counter = Counter()

    def _format(self, name: str) -> str:
        return next(label for key, label in self.FORMATS if key in name)

    def _count(self, fmt: str, how: str) -> None:
        self.ended.setdefault(fmt, Counter())[how] += 1

    def _tally(self, real, fmt, outcome):
        """`real` wrapped to count how each call ended: outcome(result), or how it raised."""
        def counted(arg):
            try:
                result = real(arg)
            except AssertionError:
                self._count(fmt, "unexplained (test failed)")
                raise
            except Exception:
                self._count(fmt, "traceback")
                raise
            self._count(fmt, outcome(result))
            return result
        return counted

    def _robot(self, real, fmt):
        def ended(rows):
            statuses = {r["status"] for r in rows}
            return ("failed with its reason" if "failed" in statuses else
                    "rejected by a gate" if "rejected" in statuses else "harmless (accepted)")
        return self._tally(real, fmt, ended)

    def _manifest(self, real, fmt):
        return self._tally(real, fmt, lambda inputs: "one-line SourceError" if inputs is None else "every row accounted for")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        """Wraps the test module's own helper (ingest for robot files, outcome for manifests) for this test."""
        fmt = self._format(item.name)
        self.tests[fmt] += 1
        originals = {}
        for name, wrap in (("ingest", self._robot), ("outcome", self._manifest)):
            if hasattr(item.module, name):
                originals[name] = getattr(item.module, name)
                setattr(item.module, name, wrap(originals[name], fmt))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(item.module, name, fn)



def hostile_rows() -> tuple[list[dict], int]:
    """The hostile-file property tests run once with a tally; (rows per format and ending, pytest's exit code)."""
    tally = HostileTally()
    manifests = [f"{TESTS}/test_hostile_input.py::{t}" for t in (
        "test_any_jsonl_manifest_is_an_error_or_accounted_rows", "test_arbitrary_bytes_as_a_manifest_never_crash",
        "test_csv_and_parquet_manifests_with_odd_uris_keep_every_row")]
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), str(TESTS / "test_hostile_robot.py"),
                        *manifests], plugins=[tally])
    rows = [{"format": fmt, "ended": how, "files": n} for fmt, ended in sorted(tally.ended.items())
            for how, n in sorted(ended.items())]
    return rows, int(code)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rates", type=float, nargs="+", default=[0.2], help="rates at which each kind is injected alone")
    p.add_argument("--mixed", type=float, nargs="*", default=[0.05], help="rates at which every kind is injected at once")
    p.add_argument("--kinds", nargs="+", default=None, help="fault kinds (default: every kind the proxy has)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hostile", action="store_true")
    args = p.parse_args()
    from gr2.flows.runtime import ensure_ray, offline_defaults

    offline_defaults()
    os.environ["GR2_PROGRESS"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    proxy = load("faultproxy")
    load("fault_runs")
    t0 = time.monotonic()
    moto = start_s3()
    os.environ["AWS_ENDPOINT_URL"] = moto  # set before Ray starts: its workers are told the proxy's per stage
    ensure_ray(num_cpus=2)
    kinds = tuple(args.kinds or proxy.KINDS)
    settings = [((), 0.0), *((kinds, rate) for rate in args.mixed),
                *(((kind,), rate) for rate in args.rates for kind in kinds)]
    print(f"{'faults':>20} {'rate':>5} {'job':>9} {'inj/requests':>11} {'finished':>9} {'rows':>7} {'unique':>6}")
    storage = storage_rows(moto, settings, args.seed)
    hostile, code = ([], 0) if args.skip_hostile else hostile_rows()
    for r in hostile:
        print(f"{r['format']:>34} {r['ended']:>28} {r['files']:>4}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ".venv/bin/python benchmarks/reliability.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "seconds": round(time.monotonic() - t0),
        "stall_s": 1.0,
        "storage_faults": storage,
        "hostile_files": hostile, "hostile_pytest_exit_code": code,
    }, indent=2) + "\n")
    print(f"wrote {OUT} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
