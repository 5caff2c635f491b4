"""Closed-loop evaluation's cost per environment step: a GR-2 policy playing a task's seeds side by
side (gr2.sim.env.run_lockstep: one batched forward pass a step) beside the same policy playing
them one by one, in one process, on one thread, with the same checkpoint, task and seeds.

Both must play the same episodes (each seed is its own fresh environment); the script checks that
each seed's success and length agree, and reports where time goes: rendering two cameras, the
policy, and making environments.

    .venv/bin/python benchmarks/closed_loop_speed.py                     # a checkpoint of the few-demo run
    .venv/bin/python benchmarks/closed_loop_speed.py --checkpoint DIR --tokenizer DIR --lake DIR

The default checkpoint is the newest pre-trained, frame-strided fine-tune under .few-demo-work
(benchmarks/few_demo_multitask.py makes it). Results: benchmarks/results/closed_loop_speed.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "closed_loop_speed.json"


class Timed:
    """A BatchPolicy wrapper that adds up the CPU seconds spent inside the policy."""

    def __init__(self, policy):
        self.policy, self.cpu_s, self.calls = policy, 0.0, 0

    def reset(self, episodes: int = 1) -> None:
        self.policy.reset(episodes)

    def act(self, observations):
        t = time.process_time()
        out = self.policy.act(observations)
        self.cpu_s += time.process_time() - t
        self.calls += 1
        return out


def newest_finetune(work: str) -> tuple[str, str, str]:
    """(checkpoint, tokenizer, lake) of the newest pre-trained strided fine-tune of the few-demo run."""
    runs = sorted(glob.glob(os.path.join(work, "finetune-pretrained-stride*", "result.json")), key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"no fine-tuned checkpoint under {work}: run benchmarks/few_demo_multitask.py first, "
                         "or give --checkpoint, --tokenizer and --lake")
    from gr2.training.checkpoint import read_meta
    from gr2.training.evaluate import load_tokenizer

    checkpoint = json.loads(Path(runs[-1]).read_text())["checkpoint"]
    meta = read_meta(checkpoint)
    return checkpoint, load_tokenizer(meta, meta["lake"])[1], meta["lake"]


def play(policy, task: str, seeds: tuple[int, ...], max_steps: int, lockstep: int) -> dict:
    from gr2.sim.env import RolloutConfig, run_rollouts

    timed = Timed(policy)
    config = RolloutConfig(env_name=task, seeds=seeds, cameras=("corner", "gripperPOV"), image_size=64,
                           max_steps=max_steps, lockstep=lockstep)
    wall, cpu = time.perf_counter(), time.process_time()
    episodes = run_rollouts(timed, config).episodes
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = sum(e.steps for e in episodes)
    return {"lockstep": lockstep, "episodes": [(e.seed, e.success, e.steps) for e in episodes], "env_steps": steps,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "policy_cpu_s": round(timed.cpu_s, 2),
            "policy_calls": timed.calls, "cpu_ms_per_env_step": round(1000 * cpu / steps, 2),
            "policy_cpu_ms_per_env_step": round(1000 * timed.cpu_s / steps, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(HERE.parent / ".few-demo-work"))
    p.add_argument("--checkpoint")
    p.add_argument("--tokenizer")
    p.add_argument("--lake")
    p.add_argument("--task", default="door-open-v3")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    checkpoint, tokenizer, lake = ((args.checkpoint, args.tokenizer, args.lake) if args.checkpoint
                                   else newest_finetune(args.work))

    import torch
    import torch._dynamo  # noqa: F401  (before MuJoCo's osmesa: gr2.sim.env)

    from gr2.sim.env import make_env, render
    from gr2.sim.record import INSTRUCTIONS
    from gr2.training.evaluate import MetaWorldPolicy

    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    torch.set_num_threads(1)
    policy = MetaWorldPolicy(checkpoint, tokenizer, INSTRUCTIONS[args.task], threads=1, lake=lake)
    seeds = tuple(range(50_000, 50_000 + args.seeds))  # the few-demo run's evaluation seeds

    # the floors: making an environment, and rendering both cameras, with no policy at all
    t = time.process_time()
    env = make_env(args.task, seeds[0], "corner", 64)
    env.reset(seed=seeds[0])
    make_s = time.process_time() - t
    t = time.process_time()
    for _ in range(100):
        render(env, ("corner", "gripperPOV"))
    render_ms = 10 * (time.process_time() - t)
    env.close()

    alone = play(policy, args.task, seeds, args.max_steps, lockstep=1)
    together = play(policy, args.task, seeds, args.max_steps, lockstep=args.seeds)
    # the batched forward pass sums in another order than the single one, so an action can differ in
    # its last float bits, and a closed loop can carry that into a step earlier or later
    same = [a == b for a, b in zip(alone["episodes"], together["episodes"])]
    same_success = [a[:2] == b[:2] for a, b in zip(alone["episodes"], together["episodes"])]
    result = {"command": "benchmarks/closed_loop_speed.py", "checkpoint": checkpoint, "task": args.task,
              "seeds": args.seeds, "max_steps": args.max_steps, "make_env_cpu_s": round(make_s, 2),
              "render_two_cameras_cpu_ms": round(render_ms, 2), "one_by_one": alone, "side_by_side": together,
              "same_episodes": sum(same), "same_success": sum(same_success),
              "speedup_cpu": round(alone["cpu_s"] / together["cpu_s"], 2),
              "policy_speedup_cpu": round(alone["policy_cpu_s"] / together["policy_cpu_s"], 2)}
    print(f"{'':24}{'CPU ms / env step':>18}{'policy CPU ms / step':>22}{'CPU s':>8}{'wall s':>8}")
    for name, r in (("one by one", alone), (f"{args.seeds} side by side", together)):
        print(f"{name:24}{r['cpu_ms_per_env_step']:>18}{r['policy_cpu_ms_per_env_step']:>22}"
              f"{r['cpu_s']:>8}{r['wall_s']:>8}")
    print(f"floors: rendering two cameras {render_ms:.1f} CPU ms a step; making an environment {make_s:.2f} CPU s")
    print(f"same success: {sum(same_success)} of {len(same)} seeds, same length too: {sum(same)}; "
          f"{result['speedup_cpu']}x less CPU side by side (policy alone {result['policy_speedup_cpu']}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
