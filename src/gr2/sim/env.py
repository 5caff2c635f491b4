"""Meta-World: the one environment factory and scripted-expert lookup (the recorder's too), and
closed-loop rollouts: a policy acts on rendered frames and state; success rate.

Run rollouts in a process of their own (`run_rollouts_in_subprocess`, or `run_rollouts` inside a
Ray actor): with torch 2.14 and MuJoCo's osmesa renderer in one process, anything that loads
torch's compiler stack after the first rendered frame (creating an Adam optimiser does) brings
triton's LLVM in beside Mesa's and the process segfaults, whichever of torch and mujoco came first.
Importing torch._dynamo before mujoco avoids it: `make_env` does so when torch is loaded, and the
subprocess always does. A caller that imports mujoco itself must do the same first.

Episode `seed` is always the same episode: a fresh environment made with that seed, then reset
with it. Resetting one environment with several seeds does not reproduce, because MT1 picks the
task (drawer position) from its generator before reset reseeds it.

A policy sees LeRobot's keys:
    observation.images.<camera>    (H, W, 3) uint8, as Meta-World renders it (no flip)
    observation.state              (4,) float32: hand xyz and gripper opening
    observation.environment_state  (39,) float64: the simulator's full observation
and returns a 4-d action: hand xyz delta and gripper effort, each in [-1, 1].

A policy that can act for many episodes at once (`BatchPolicy`: a learned model, whose forward
pass costs about as much for ten observations as for one on a CPU) plays `config.lockstep`
seeds side by side, one batched call per step; each seed is still its own fresh environment, so
its episode is the one it would be alone.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gr2.errors import Gr2Error


@dataclass(frozen=True)
class RolloutConfig:
    env_name: str = "drawer-open-v3"
    # far from the low seeds demonstrations are recorded with, so evaluation sees unseen episodes
    seeds: tuple[int, ...] = tuple(range(1000, 1020))
    cameras: tuple[str, ...] = ("corner",)  # "gripperPOV" is the wrist camera
    image_size: int = 64
    max_steps: int = 200  # the scripted expert needs ~90 steps on drawer-open-v3
    shadows: bool = False  # make_env's rendering quality
    record_episodes: int = 0  # keep every frame of this many first episodes, for videos
    # a BatchPolicy's episodes run this many at a time; each live environment holds ~100 MB
    # (MuJoCo's model and data and an osmesa context, measured here), so ten cost ~1 GB
    lockstep: int = 10


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    frames: dict[str, np.ndarray] | None = None  # camera -> (steps, H, W, 3) uint8, if recorded


@dataclass
class RolloutResult:
    env_name: str
    episodes: list[EpisodeResult] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.episodes) / max(len(self.episodes), 1)


class Policy(Protocol):
    def reset(self) -> None: ...

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray: ...


class BatchPolicy(Protocol):
    """A policy that acts for several episodes in one call: `reset(episodes)` starts that many, and
    `act` takes the observations of those still running, keyed by episode, and returns their actions."""

    def reset(self, episodes: int = 1) -> None: ...

    def act(self, observations: dict[int, dict[str, np.ndarray]]) -> dict[int, np.ndarray]: ...


class SimError(Gr2Error):
    """A Meta-World environment, expert or recording that cannot be made as asked; names the task."""


def expert_policy(env_name: str):
    """Meta-World's hand-written policy for a task (SawyerDrawerOpenV3Policy for drawer-open-v3):
    `get_action(simulator observation)`."""
    from metaworld.policies import ENV_POLICY_MAP

    if env_name not in ENV_POLICY_MAP:
        near = sorted(n for n in ENV_POLICY_MAP if n.split("-")[0] == env_name.split("-")[0])[:5]
        raise SimError(f"no scripted expert (Meta-World policy) for task {env_name!r}"
                       + (f"; similar tasks: {', '.join(near)}" if near else "; e.g. drawer-open-v3, reach-v3"))
    return ENV_POLICY_MAP[env_name]()


class ScriptedExpert:
    """The scripted expert as a Policy: it reads the simulator's full observation."""

    def __init__(self, env_name: str):
        self.policy = expert_policy(env_name)

    def reset(self) -> None:
        pass  # the scripted policies are functions of the current observation

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return self.policy.get_action(observation["observation.environment_state"])


def make_env(env_name: str, seed: int, camera: str | None = "corner", image_size: int = 64, shadows: bool = False):
    """A Meta-World MT1 environment for one seeded episode, rendering rgb frames of `camera` (`render`);
    camera None: no renderer of its own (the recorder brings one, made after this returns)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")  # headless; must be set before mujoco loads
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    if "torch" in sys.modules:
        import torch._dynamo  # noqa: F401  (before Mesa loads: see the module docstring)
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World/* environments)
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    if env_name not in ALL_V3_ENVIRONMENTS:
        raise SimError(f"unknown Meta-World task {env_name!r}")
    rendering = {} if camera is None else dict(render_mode="rgb_array", camera_name=camera, width=image_size,
                                                height=image_size)
    # gymnasium's passive checker only warns; each episode makes a fresh env, so it would on every one
    env = gym.make("Meta-World/MT1", env_name=env_name, seed=seed, disable_env_checker=True, **rendering)
    if not shadows:
        # osmesa renders in software, where Meta-World's 4096x4096 shadow map and 4x multisampling
        # cost ten times the frame itself: 139 ms a 64x64 frame with them, 12 ms without (measured
        # here); frames differ by ~5/255 on average. Renderers read these when they are made.
        quality = env.unwrapped.model.vis.quality
        quality.shadowsize, quality.offsamples = 0, 0
    return env


def render(env, cameras: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One frame per camera; the renderer is pointed at each camera in turn."""
    import mujoco

    model, renderer = env.unwrapped.model, env.unwrapped.mujoco_renderer
    frames = {}
    for camera in cameras:
        camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise SimError(f"no camera {camera!r} in {type(env.unwrapped).__name__}; has {names}")
        renderer.camera_id = camera_id
        frames[camera] = np.array(env.render(), copy=True)  # the renderer reuses its buffer
    return frames


def observe(env, obs: np.ndarray, cameras: tuple[str, ...]) -> dict[str, np.ndarray]:
    """What a policy sees of `env` now (the module note's keys); obs is the simulator's last observation."""
    observation = {f"observation.images.{camera}": image for camera, image in render(env, cameras).items()}
    observation["observation.state"] = obs[:4].astype(np.float32)
    observation["observation.environment_state"] = obs
    return observation


def run_episode(policy: Policy, config: RolloutConfig, seed: int, record: bool = False) -> EpisodeResult:
    """One closed-loop episode; it succeeds when Meta-World reports success at any step."""
    (result,) = run_lockstep(_OneEpisode(policy), config, (seed,), record=1 if record else 0)
    return result


def run_lockstep(policy: BatchPolicy, config: RolloutConfig, seeds: tuple[int, ...],
                 record: int = 0) -> list[EpisodeResult]:
    """One episode per seed, all stepped together: each step renders every live episode, asks the
    policy for all their actions in one call, and steps each environment. An episode ends when
    Meta-World reports success, at config.max_steps, or when its environment ends it; the first
    `record` episodes keep their frames."""
    envs = []
    try:
        for seed in seeds:
            envs.append(make_env(config.env_name, seed, config.cameras[0], config.image_size, config.shadows))
        obs = {i: env.reset(seed=seed)[0] for i, (env, seed) in enumerate(zip(envs, seeds))}
        policy.reset(len(seeds))
        results = [EpisodeResult(seed=seed, success=False, steps=0) for seed in seeds]
        recorded: dict[int, dict[str, list[np.ndarray]]] = {i: {c: [] for c in config.cameras} for i in range(record)}
        live = list(range(len(seeds))) if config.max_steps > 0 else []
        while live:
            observations = {i: observe(envs[i], obs[i], config.cameras) for i in live}
            for i in set(live) & recorded.keys():
                for camera in config.cameras:
                    recorded[i][camera].append(observations[i][f"observation.images.{camera}"])
            actions = policy.act(observations)
            for i in list(live):
                obs[i], _, terminated, truncated, info = envs[i].step(np.asarray(actions[i], dtype=np.float32))
                results[i].steps += 1
                results[i].success = bool(info["success"])
                if results[i].success or results[i].steps >= config.max_steps or terminated or truncated:
                    live.remove(i)
    finally:
        for env in envs:
            env.close()
    for i, frames in recorded.items():
        results[i].frames = {camera: np.stack(images) for camera, images in frames.items()}
    return results


class _OneEpisode:
    """A one-episode Policy as a BatchPolicy."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def reset(self, episodes: int = 1) -> None:
        assert episodes == 1, "a Policy plays one episode at a time"
        self.policy.reset()

    def act(self, observations: dict[int, dict[str, np.ndarray]]) -> dict[int, np.ndarray]:
        return {i: self.policy(o) for i, o in observations.items()}


def run_rollouts(policy: Policy | BatchPolicy, config: RolloutConfig) -> RolloutResult:
    """Every seed of config, in this process (see the module note before mixing with training): a
    BatchPolicy's config.lockstep at a time, any other policy's one by one."""
    batched = hasattr(policy, "act")
    played, group = (policy, max(config.lockstep, 1)) if batched else (_OneEpisode(policy), 1)
    result = RolloutResult(env_name=config.env_name)
    for start in range(0, len(config.seeds), group):
        seeds = config.seeds[start:start + group]
        record = max(0, min(config.record_episodes - start, len(seeds)))
        result.episodes += run_lockstep(played, config, seeds, record)
    return result


def run_rollouts_in_subprocess(policy_factory: Callable[[], Policy], config: RolloutConfig) -> RolloutResult:
    """run_rollouts in a fresh (spawned) process; policy_factory builds the policy there, so it
    must pickle: a module-level function or class, or a functools.partial of one."""
    context = multiprocessing.get_context("spawn")  # never fork a process that has torch threads
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_build_and_run, policy_factory, config).result()


def _build_and_run(policy_factory: Callable[[], Policy], config: RolloutConfig) -> RolloutResult:
    if importlib.util.find_spec("torch") is not None:
        # a policy may load torch only when first called, after Mesa: see the module docstring
        import torch._dynamo  # noqa: F401
    return run_rollouts(policy_factory(), config)
