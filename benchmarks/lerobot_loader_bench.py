"""LeRobot's own loader, timed for benchmarks/loader.py; runs inside .venv-lerobot (lerobot 0.4.4
pins a torch older than gr2's), never in gr2's venv, and imports nothing of gr2's.

    python lerobot_loader_bench.py DATASET_ROOT DELTA_JSON BATCH WORKERS SEED

Makes a LeRobotDataset (default tolerance_s and video backend) with the delta_timestamps given and
a DataLoader over it with persistent workers, then answers benchmarks/loader.py one line at a time
on stdin: "round SECONDS" times one round and prints {"samples", "seconds"} as a JSON line; "quit"
ends. The timing loop is loader.py's `timed_round`, repeated here because this environment cannot
import it.
"""

import json
import sys
import time

import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset

MIN_BATCHES = 8  # per round, however slow the loader: a round of one or two batches says little


def timed_round(batches, seconds: float, drain: int) -> dict:
    for _ in range(drain):  # what the workers prefetched while the other loaders ran is not timed
        next(batches)
    samples, count, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or count < MIN_BATCHES:
        samples += len(next(batches)["index"])
        count += 1
    return {"samples": samples, "seconds": time.perf_counter() - t0}


def main() -> None:
    root, delta, batch, workers, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    t0 = time.perf_counter()
    dataset = LeRobotDataset("gr2/loader-bench", root=root, delta_timestamps=delta)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0)
    batches = iter(loader)
    first = next(batches)
    shapes = {k: list(v.shape) for k, v in first.items() if isinstance(v, torch.Tensor)}
    print(json.dumps({"ready": True, "frames": len(dataset), "episodes": dataset.num_episodes,
                      "first_batch_s": time.perf_counter() - t0, "shapes": shapes,
                      "video_backend": dataset.video_backend, "tolerance_s": dataset.tolerance_s}), flush=True)
    drain = workers * 2 if workers else 0  # DataLoader's prefetch_factor is 2 per worker
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        print(json.dumps(timed_round(batches, float(command[1]), drain)), flush=True)


if __name__ == "__main__":
    main()
