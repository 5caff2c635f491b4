"""Run by tests/test_robot_export.py inside .venv-lerobot (lerobot 0.4.4), never in gr2's own venv.

Loads a dataset with LeRobot's own LeRobotDataset (default tolerance_s), a delta_timestamps window
on the first camera (previous and current frame) and on the action (a chunk of three), iterates
every item, and saves what it got as .npz; prints a JSON summary.

usage: python lerobot_iterate.py DATASET_ROOT OUT.npz
"""

import json
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

root, out = sys.argv[1], sys.argv[2]
meta = LeRobotDatasetMetadata("gr2/export", root=root)
fps = meta.fps
cameras = meta.video_keys
delta = {"action": [0.0, 1 / fps, 2 / fps]}
if cameras:
    delta[cameras[0]] = [-1 / fps, 0.0]
dataset = LeRobotDataset("gr2/export", root=root, delta_timestamps=delta)

got = {k: [] for k in ("state", "action", "action_is_pad", "episode_index", "frame_index", "timestamp")}
frames = {c: [] for c in cameras}
tasks = {}
for i in range(len(dataset)):
    item = dataset[i]
    got["state"].append(item["observation.state"].numpy())
    got["action"].append(item["action"].numpy())
    got["action_is_pad"].append(item["action_is_pad"].numpy())
    got["episode_index"].append(int(item["episode_index"]))
    got["frame_index"].append(int(item["frame_index"]))
    got["timestamp"].append(float(item["timestamp"]))
    tasks[int(item["episode_index"])] = item["task"]
    for c in cameras:
        frame = item[c][-1] if c in delta else item[c]  # [3, H, W] float in [0, 1]
        frames[c].append(np.round(frame.numpy().transpose(1, 2, 0) * 255).astype(np.uint8))

np.savez(out, **{k: np.asarray(v) for k, v in got.items()}, **{f"frame:{c}": np.stack(v) for c, v in frames.items()})
print(json.dumps({
    "fps": fps,
    "frames": len(dataset),
    "episodes": dataset.num_episodes,
    "tasks": [tasks[e] for e in sorted(tasks)],
    "cameras": cameras,
    "image_shape": list(dataset[0][cameras[0]].shape) if cameras else None,
    "state_checksum": float(np.sum(np.asarray(got["state"], np.float64))),
}))
