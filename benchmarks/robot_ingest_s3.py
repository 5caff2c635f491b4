"""Robot ingest from object storage against the same from disk: Meta-World episodes (LeRobot v2, two
cameras) ingested on 2 Ray workers from a local directory into a local lake, then from S3 into a
lake on S3, then re-ingested from S3 (which must add nothing).

    .venv/bin/python benchmarks/robot_ingest_s3.py [--episodes N] [--size PX] [--repeat N]

The object store is moto's S3 server on 127.0.0.1 (started here; no network), so the S3 rows show
the cost of the path (listing, per-episode fetches, Lance over HTTP, the lake's lease object), not
of a real network. The first S3 run fetches into an empty node cache (a fresh bucket name makes
the cache cold); the next ones find the bytes cached by object version and only ask for each
object's version. Prints a table and writes benchmarks/results/robot_ingest_s3.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from robot_ingest import ingest_once, quiet_local_environment, record_episodes

OUT = Path(__file__).parent / "results" / "robot_ingest_s3.json"


def start_s3() -> str:
    """moto's S3 server on loopback, its settings in this process's environment; a fresh bucket's name."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    bucket = f"gr2-bench-{int(time.time())}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def upload(directory: str, bucket: str, prefix: str) -> tuple[str, int, int]:
    """Every file under `directory` to s3://bucket/prefix; (uri, files, bytes)."""
    import boto3

    s3 = boto3.client("s3")
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    for p in files:
        s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(directory).as_posix()}")
    return f"s3://{bucket}/{prefix}", len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    quiet_local_environment()
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="camera frame width and height, pixels")
    p.add_argument("--repeat", type=int, default=2, help="ingests per setting, each into a fresh lake")
    args = p.parse_args()

    import ray

    from gr2.flows.runtime import ensure_ray

    ensure_ray(num_cpus=2)  # before the S3 settings exist: workers get them from the driver, as on a cluster
    tmp = Path(tempfile.mkdtemp(prefix="gr2-robot-s3-bench-"))
    try:
        dataset = str(tmp / "drawer")
        rec = record_episodes(dataset, args.episodes, args.size)
        bucket = start_s3()
        t0 = time.perf_counter()
        source, n_files, n_bytes = upload(dataset, bucket, "robot/drawer")
        upload_s = time.perf_counter() - t0
        runs = []
        for where in ("local", "s3"):
            for i in range(args.repeat):
                src = dataset if where == "local" else source
                lake = str(tmp / f"lake-{i}") if where == "local" else f"s3://{bucket}/lake-{i}"
                r = ingest_once(src, lake, 2, None)
                runs.append({"what": f"ingest {where} -> {where} lake" + (" (cold cache)" if where == "s3" and i == 0 else ""),
                             "lake": lake, **r})
        runs.append({"what": "re-ingest s3 (same lake)", "lake": f"s3://{bucket}/lake-0",
                     **ingest_once(source, f"s3://{bucket}/lake-0", 2, None)})
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"dataset: {rec['episodes']} drawer-open-v3 episodes, {rec['steps']} steps, {args.size}px, two cameras; "
          f"{n_files} files, {n_bytes / 1e6:.2f} MB, uploaded to moto S3 (loopback) in {upload_s:.1f} s")
    print(f"{'what':<36}{'steps':>7}{'added':>7}{'seconds':>9}{'steps/s':>9}  accounted")
    for r in runs:
        accounted = r["episodes"] == r["accepted"] + r["rejected"] + r["failed"]
        print(f"{r['what']:<36}{r['rows_after']['steps']:>7}{r['steps_added']:>7}{r['seconds']:>9.2f}"
              f"{r['steps_per_s']:>9.1f}  {r['accepted']}+{r['rejected']}+{r['failed']}=={r['episodes']}: {accounted}")
    load = os.getloadavg()
    print(f"load average while measuring (2 cores, shared): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"recording": rec, "files": n_files, "bytes": n_bytes, "upload_s": upload_s, "runs": runs,
                               "repeat": args.repeat, "workers": 2, "cluster_cpus": 2, "load_average_at_end": load},
                              indent=2, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
