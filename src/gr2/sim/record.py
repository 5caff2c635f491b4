"""Record Meta-World's scripted experts as a LeRobot-layout dataset with realistic camera clocks.

Real robot logs have a clock per camera: its own rate, a latency, jitter and dropped frames. This
recorder makes all four, seeded, and writes the truth into meta/info.json ("gr2_recording") so
tests can check the alignment against it.

Timing model, per camera and episode (state clock: env step i is at i * dt, dt = 12.5 ms):
- nominal capture times j / fps + phase, phase uniform in [0, 1/fps);
- jitter: each capture time moves by N(0, jitter_s), then snaps to the env step it renders
  (MuJoCo can only show the scene at a step), kept strictly increasing;
- latency: the frame is stamped offset_s after its capture, on the camera's clock;
- drops: `drops` frames away from the ends vanish from the video and the timestamps.

So for every kept frame: timestamp = capture_step * dt + offset_s, exactly. Each camera's latency
is also declared in its feature info (`gr2.latency_s`), as a calibrated rig would; jitter and
drops are not (RecordConfig.declare_latency=False leaves the latency for estimation).

Layout: LeRobot v2.1 (meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, one parquet per
episode, one mp4 per camera per episode), plus one extension LeRobot lacks: per-camera frame
timestamps in a parquet beside each video (`camera_timestamps_path` in info.json), because a
LeRobot mp4 carries no clock of its own worth trusting.

Rendering is the recorder's cost (osmesa draws in software), so only the frames a camera's rate
needs are rendered, and without Meta-World's shadow map and multisampling (gr2.sim.env.make_env:
12 ms a 64x64 frame instead of 139 ms; DESIGN.md's "~0.1 s whatever the size" was that shadow map).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from gr2.robot import layout as lay
from gr2.robot.lerobot import LATENCY_KEY, LAYOUT_KEY
from gr2.sim.env import SimError, expert_policy, make_env

INSTRUCTIONS = {
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-v3": "press the button",
    "button-press-topdown-v3": "press the button from the top",
    "door-open-v3": "open the door",
    "door-close-v3": "close the door",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "handle-press-v3": "press the handle down",
    "coffee-button-v3": "press the coffee machine button",
    "plate-slide-v3": "slide the plate into the goal",
}

STATE_NAMES = ["x", "y", "z", "qx", "qy", "qz", "qw", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]
# Meta-World's hand pose in metres, its finger opening in [0, 1]; its action moves the hand by
# action_scale (1/100 m) per unit and its gripper effort is -1 (open) or +1 (close) from the experts.
STATE_LAYOUT = (lay.dims("x y z", "m") + lay.dims("qx qy qz qw", "1")
                + (lay.continuous_gripper("gripper", 0.0, 1.0),))
ACTION_LAYOUT = lay.dims("dx dy dz", "cm", "delta") + (lay.binary_gripper("gripper", -1.0, 1.0),)
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
TIMESTAMPS_PATH = "timestamps/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.parquet"
CHUNK_SIZE = 1000
EPISODES_PER_TASK = 8  # most episodes one Ray task records (gr2.sim.record.record)


@dataclass(frozen=True)
class CameraSpec:
    """A simulated camera: a Meta-World camera name and the flaws of its clock."""

    name: str
    fps: float
    offset_s: float = 0.0  # latency: the stamp is this much after the capture
    jitter_s: float = 0.0  # std of the capture time around its nominal time
    drops: int = 0  # frames dropped per episode


@dataclass(frozen=True)
class RecordConfig:
    tasks: tuple[str, ...] = ("drawer-open-v3",)
    episodes: int = 2  # per task
    cameras: tuple[CameraSpec, ...] = (
        CameraSpec("corner", fps=20.0, offset_s=0.030, jitter_s=0.003, drops=2),
        CameraSpec("gripperPOV", fps=15.0, offset_s=0.055, jitter_s=0.003, drops=2),
    )
    width: int = 128
    height: int = 128
    max_steps: int = 200
    tail_steps: int = 10  # steps recorded after the expert succeeds
    seed: int = 0
    crf: int = 18
    shadows: bool = False  # gr2.sim.env.make_env's rendering quality
    declare_latency: bool = True  # write each camera's latency into info.json, as a calibrated rig would


@dataclass
class EpisodeRecording:
    """What one episode's recording wrote, and the truth about its cameras."""

    episode_index: int
    task: str
    seed: int
    length: int
    success: bool
    success_step: int | None
    dt: float  # control period: state step i is at i * dt
    cameras: dict = field(default_factory=dict)  # name -> {capture_step, dropped_capture_step, phase_s}


def _video_key(camera: str) -> str:
    return f"observation.images.{camera}"


def _episode_path(template: str, episode_index: int, **kw) -> str:
    return template.format(episode_chunk=episode_index // CHUNK_SIZE, episode_index=episode_index, **kw)


def capture_schedule(spec: CameraSpec, dt: float, max_steps: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Env steps at which the camera captures, and its phase (see the module docstring)."""
    period = 1.0 / spec.fps
    phase = float(rng.uniform(0.0, period))
    nominal = np.arange(0.0, max_steps * dt, period) + phase
    captured = nominal + rng.normal(0.0, spec.jitter_s, len(nominal)) if spec.jitter_s > 0 else nominal
    steps = np.round(captured / dt).astype(np.int64)
    steps = np.maximum.accumulate(np.maximum(steps, 0))
    for i in range(1, len(steps)):  # strictly increasing: one frame per rendered step at most
        steps[i] = max(steps[i], steps[i - 1] + 1)
    return steps[steps < max_steps], phase


def choose_drops(n_frames: int, drops: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `drops` frames to drop: never the first or last two, never two in a row."""
    candidates = np.arange(2, n_frames - 2)
    chosen: list[int] = []
    for i in rng.permutation(candidates):
        if len(chosen) == drops:
            break
        if all(abs(int(i) - c) > 1 for c in chosen):
            chosen.append(int(i))
    return np.array(sorted(chosen), dtype=np.int64)


def record_episode(out: str, config: RecordConfig, task: str, episode_index: int, seed: int) -> EpisodeRecording:
    """Run the expert for one episode, render the frames its cameras' clocks call for, write them."""
    with warnings.catch_warnings():
        # Meta-World's experts warn on every step that their gains exceed the clipped action range.
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        return _record_episode(out, config, task, episode_index, seed)


def _record_episode(out: str, config: RecordConfig, task: str, episode_index: int, seed: int) -> EpisodeRecording:
    import pandas as pd

    # first: it orders the imports mujoco needs beside torch
    env = make_env(task, seed, camera=None, shadows=config.shadows)
    import mujoco

    policy = expert_policy(task)
    rng = np.random.default_rng(seed)
    u = env.unwrapped
    dt = float(u.dt)
    obs, _ = env.reset(seed=seed)

    schedules = {c.name: capture_schedule(c, dt, config.max_steps, rng) for c in config.cameras}
    renderer = mujoco.Renderer(u.model, config.height, config.width)
    frames: dict[str, list[np.ndarray]] = {c.name: [] for c in config.cameras}
    next_frame = {c.name: 0 for c in config.cameras}
    states, actions = [], []
    success_step, end = None, config.max_steps
    for i in range(config.max_steps):
        hand = u.data.body("hand")
        w, x, y, z = hand.xquat
        states.append([*hand.xpos, x, y, z, w, obs[3]])
        for cam in config.cameras:
            steps = schedules[cam.name][0]
            if next_frame[cam.name] < len(steps) and steps[next_frame[cam.name]] == i:
                renderer.update_scene(u.data, camera=cam.name)
                # Meta-World's cameras render upside down under MuJoCo's image convention.
                frames[cam.name].append(renderer.render()[::-1].copy())
                next_frame[cam.name] += 1
        action = np.clip(policy.get_action(obs), -1.0, 1.0)
        actions.append(action)
        obs, _, _, _, info = env.step(action)
        if success_step is None and info.get("success", 0) > 0:
            success_step = i
            end = min(config.max_steps, i + 1 + config.tail_steps)
        if i + 1 >= end:
            break
    renderer.close()
    env.close()

    length = len(states)
    timestamps = np.arange(length) * dt
    os.makedirs(out, exist_ok=True)
    data_path = os.path.join(out, _episode_path(DATA_PATH, episode_index))
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    pd.DataFrame(
        {
            "observation.state": list(np.asarray(states, np.float32)),
            "action": list(np.asarray(actions, np.float32)),
            "timestamp": timestamps.astype(np.float32),
            "frame_index": np.arange(length, dtype=np.int64),
            "episode_index": np.full(length, episode_index, np.int64),
            "index": np.arange(length, dtype=np.int64),  # renumbered globally in write_meta
            "task_index": np.zeros(length, np.int64),  # set in write_meta
            "next.done": np.arange(length) == length - 1,
        }
    ).to_parquet(data_path, index=False)

    truth = {}
    for cam in config.cameras:
        steps, phase = schedules[cam.name]
        rendered = steps[: len(frames[cam.name])]
        keep_mask = np.ones(len(rendered), bool)
        dropped = choose_drops(len(rendered), cam.drops, rng)
        keep_mask[dropped] = False
        kept = rendered[keep_mask]
        key = _video_key(cam.name)
        write_mp4(
            os.path.join(out, _episode_path(VIDEO_PATH, episode_index, video_key=key)),
            [f for f, k in zip(frames[cam.name], keep_mask) if k],
            cam.fps,
            config.crf,
        )
        ts_path = os.path.join(out, _episode_path(TIMESTAMPS_PATH, episode_index, video_key=key))
        os.makedirs(os.path.dirname(ts_path), exist_ok=True)
        pd.DataFrame({"frame_index": np.arange(len(kept)), "timestamp": kept * dt + cam.offset_s}).to_parquet(ts_path, index=False)
        truth[cam.name] = {
            "capture_step": kept.tolist(),
            "dropped_capture_step": rendered[dropped].tolist(),
            "phase_s": phase,
        }
    return EpisodeRecording(episode_index, task, seed, length, success_step is not None, success_step, dt, truth)


def write_mp4(path: str, frames: list[np.ndarray], fps: float, crf: int = 18) -> None:
    """H.264 mp4 at a constant nominal rate; the real frame times live in the timestamps parquet."""
    import fractions

    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "bf": "0", "g": "30"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_meta(out: str, config: RecordConfig, recordings: list[EpisodeRecording]) -> dict:
    """meta/info.json, episodes.jsonl and tasks.jsonl; fixes the global index and task_index columns."""
    import metaworld
    import pandas as pd

    recordings = sorted(recordings, key=lambda r: r.episode_index)
    tasks = list(dict.fromkeys(INSTRUCTIONS.get(r.task, r.task) for r in recordings))
    start = 0
    for rec in recordings:
        path = os.path.join(out, _episode_path(DATA_PATH, rec.episode_index))
        df = pd.read_parquet(path)
        df["index"] = np.arange(start, start + len(df), dtype=np.int64)
        df["task_index"] = tasks.index(INSTRUCTIONS.get(rec.task, rec.task))
        df.to_parquet(path, index=False)
        start += len(df)
    features = {
        _video_key(c.name): {
            "dtype": "video",
            "shape": [config.height, config.width, 3],
            "names": ["height", "width", "channel"],
            "info": {"video.fps": c.fps, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                     "video.is_depth_map": False, "has_audio": False,
                     **({LATENCY_KEY: c.offset_s} if config.declare_latency else {})},
        }
        for c in config.cameras
    }
    features.update(
        {
            "observation.state": {"dtype": "float32", "shape": [len(STATE_NAMES)], "names": STATE_NAMES,
                                  LAYOUT_KEY: lay.to_rows(STATE_LAYOUT)},
            "action": {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": ACTION_NAMES,
                       LAYOUT_KEY: lay.to_rows(ACTION_LAYOUT)},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
            "next.done": {"dtype": "bool", "shape": [1], "names": None},
        }
    )
    dt = recordings[0].dt if recordings else 0.0125
    info = {
        "codebase_version": "v2.1",
        "robot_type": "sawyer",
        "total_episodes": len(recordings),
        "total_frames": start,
        "total_tasks": len(tasks),
        "total_videos": len(recordings) * len(config.cameras),
        "total_chunks": 1 + (max(r.episode_index for r in recordings) // CHUNK_SIZE if recordings else 0),
        "chunks_size": CHUNK_SIZE,
        "fps": 1.0 / dt,
        "splits": {"train": f"0:{len(recordings)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "camera_timestamps_path": TIMESTAMPS_PATH,
        "features": features,
        "gr2_recording": {
            "simulator": f"metaworld {getattr(metaworld, '__version__', '3')}",
            "control_dt_s": dt,
            "config": {**asdict(config), "cameras": [asdict(c) for c in config.cameras]},
            "cameras": {c.name: asdict(c) for c in config.cameras},
            "episodes": [asdict(r) for r in recordings],
        },
    }
    meta = os.path.join(out, "meta")
    os.makedirs(meta, exist_ok=True)
    with open(os.path.join(meta, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(meta, "episodes.jsonl"), "w") as f:
        for r in recordings:
            f.write(json.dumps({"episode_index": r.episode_index, "tasks": [INSTRUCTIONS.get(r.task, r.task)], "length": r.length}) + "\n")
    with open(os.path.join(meta, "tasks.jsonl"), "w") as f:
        for i, t in enumerate(tasks):
            f.write(json.dumps({"task_index": i, "task": t}) + "\n")
    return info


def record(out: str, config: RecordConfig = RecordConfig()) -> dict:
    """Record `config.episodes` episodes of every task into a new LeRobot dataset at `out`.

    Episodes are independent, so when Ray is running they are recorded as Ray tasks, one simulator
    per worker process (which also keeps MuJoCo's osmesa away from torch, see DESIGN.md).
    Returns info.json's content.
    """
    if os.path.exists(os.path.join(out, "meta", "info.json")):
        raise SimError(f"{out} already holds a dataset (meta/info.json); choose a new directory")
    for task in config.tasks:
        expert_policy(task)
    jobs = [
        (task, t * config.episodes + e, config.seed * 100_003 + t * 1_009 + e)
        for t, task in enumerate(config.tasks)
        for e in range(config.episodes)
    ]
    if _ray_running():
        import ray

        # max_calls=1: the worker process exits after its episodes, so no later task in it meets
        # osmesa's state (torch's compiler stack segfaults beside it, DESIGN.md). A fresh process
        # costs seconds of imports, so each task records a run of episodes, not one.
        remote = ray.remote(num_cpus=1, max_calls=1)(record_episodes)
        per_task = -(-len(jobs) // max(2 * int(ray.available_resources().get("CPU", 1)), 1))
        per_task = min(max(per_task, 1), EPISODES_PER_TASK)
        runs = [jobs[i:i + per_task] for i in range(0, len(jobs), per_task)]
        recordings = [r for run in ray.get([remote.remote(out, config, run) for run in runs]) for r in run]
    else:
        recordings = record_episodes(out, config, jobs)
    return write_meta(out, config, recordings)


def record_episodes(out: str, config: RecordConfig, jobs: list[tuple[str, int, int]]) -> list[EpisodeRecording]:
    """record_episode for each (task, episode_index, seed), in this process."""
    return [record_episode(out, config, task, idx, seed) for task, idx, seed in jobs]


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def truth(dataset: str) -> dict:
    """The recording's truth from meta/info.json: control dt, cameras and per-episode capture steps."""
    with open(os.path.join(dataset, "meta", "info.json")) as f:
        return json.load(f)["gr2_recording"]
