"""Ray Train's TorchTrainer, set up in one place for every training in gr2 (the GR-2 loop, the tokenizer).

`check_cluster` runs first, on the driver: Ray Train asked for more CPUs or GPUs than the cluster
has waits for them forever, so such a request is refused at once. `launch` then runs a worker
function on N workers (torch DDP; gloo on CPU), keeps Ray Train's run records under `storage`, and
restarts the worker group up to `max_failures` times; resuming is the worker's own business (the
GR-2 worker starts from its run's last checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from gr2.errors import Gr2Error
from gr2.lake.lake import worker_env
from gr2.lake.uri import arrow_filesystem, is_remote


def check_cluster(workers: int, cpus_per_worker: float, use_gpu: bool = False,
                  error: type[Gr2Error] = Gr2Error) -> None:
    """Raise `error` (the caller's domain error) when the Ray cluster cannot seat the workers."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
    have = ray.cluster_resources()
    cpus = workers * cpus_per_worker
    if cpus > have.get("CPU", 0):
        raise error(
            f"{workers} workers x {cpus_per_worker:g} CPU need {cpus:g} CPUs; the Ray cluster has "
            f"{have.get('CPU', 0):g}. Ask for fewer workers (or fewer CPUs each).")
    if use_gpu and workers > have.get("GPU", 0):
        raise error(f"{workers} GPU workers asked for; the Ray cluster has {have.get('GPU', 0):g} GPUs")


def launch(worker: Callable[[dict], None], config: dict, *, workers: int, cpus_per_worker: float,
           use_gpu: bool, storage: str, name: str, max_failures: int = 0) -> None:
    """Run `worker(config)` on `workers` Ray Train workers until it returns; raises what failed it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    trainer = _trainer_class()(
        worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, **_storage(storage), worker_runtime_env=worker_env().get("runtime_env"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def _trainer_class() -> type:
    """Ray Train's TorchTrainer; on a cluster without a dashboard, without its placement-group cleaner.

    Ray Train 2.x starts a detached cleaner actor per run that asks the State API, which lives in
    the dashboard, whether the run's controller is still alive. Without a dashboard (gr2's local Ray
    starts none; the `ray[default]` extras are not installed) each ask waits out a 10 s timeout, so
    every run's shutdown waits 12 s for the cleaner and logs an ERROR that it could not stop it: a
    trivial one-step fit took 26-30 s with it and 12-14 s without, side by side on this machine.
    The cleaner only matters when a controller dies while its driver lives on; a driver's exit frees
    its job's placement groups anyway.
    """
    import ray
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        if ray._private.worker.get_dashboard_url():
            return TorchTrainer
    except (ImportError, AttributeError, RuntimeError):  # another Ray: its own defaults
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def _storage(path: str) -> dict:
    if not is_remote(path):
        return {"storage_path": os.path.abspath(path)}
    # An explicit filesystem: Ray Train's controller actor resolves a bare URI with its own
    # environment, which never saw this driver's AWS settings (endpoint, credentials).
    fs, root = arrow_filesystem(path, credentials=False)  # pickled to Ray Train's controller: no keys
    return {"storage_path": root, "storage_filesystem": fs}
