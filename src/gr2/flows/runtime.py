"""Where flows run: joining or starting Ray, and the environment Prefect needs offline."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def offline_defaults() -> None:
    """Settings for a machine without internet: no telemetry, no usage stats."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server takes ~20 s to start here, its default limit: on a busy 2-core
    # machine `make demo` timed out before the first flow ran. Wait longer rather than fail.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # MuJoCo renders offscreen through OSMesa (no display here); set before Ray starts its workers.
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    # Lance warns on every fork; our Lance handles never cross one (workers open their own).
    warnings.filterwarnings("ignore", message="lance is not fork-safe")


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Join RAY_ADDRESS when set (a real cluster), else start a local Ray; returns its resources."""
    import ray

    if not ray.is_initialized():
        # A run of a served deployment starts in a process of Prefect's, not through `gr2`'s main.
        offline_defaults()
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # address="local": a fresh instance, never a cluster some other `ray start` left running.
            # Ray turns token authentication on for it and says so at WARNING on every start; the
            # notice is quieted, not the authentication (RAY_AUTH_MODE set late would split this
            # process from its own cluster: Ray reads the mode once, at import).
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        # Progress bars on a terminal; in logs and CI only warnings (Ray Data logs a progress table
        # every few seconds otherwise).
        show = os.environ.get("GR2_PROGRESS", "1") == "1" and sys.stderr.isatty()
        ray.data.DataContext.get_current().enable_progress_bars = show
        if not show:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            # the bars are off on purpose; Ray Data's notice that they are is not news
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ray.cluster_resources()
