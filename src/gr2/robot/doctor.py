"""The dataset doctor: what is wrong with a lake's robot episodes, per dataset, episode and camera.

It reads the episodes back from the lake as training sees them (aligned steps, per-view JPEGs,
timestamps on the state clock) and runs one check per kind of defect that public robot datasets
are known to carry: broken clocks, frame rates that disagree with their declaration, frozen or
black camera stretches, red and blue swapped, NaN or wild states and actions, cameras that sit far
from the steps they were snapped to. Episodes that ingest refused are findings too (their reason).

    diagnosis = examine(Lake("lake/"))
    print(diagnosis.table())
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHECKS = ("refused", "timestamps", "fps", "frame_count", "frozen", "black", "channel_swap", "non_finite",
          "out_of_range", "alignment", "flagged")


@dataclass(frozen=True)
class DoctorConfig:
    fps_tolerance: float = 0.05  # relative gap between declared and measured frame rate
    frame_count_slack: int = 1  # frames a camera may have beyond/below duration x fps (a boundary frame)
    frozen_frames: int = 5  # this many new frames in a row showing one picture: a stuck camera
    same_picture: float = 0.5  # mean |difference| (0-255, 16x16 grey) under which two frames are one picture
    black_luma: float = 12.0  # mean luma (0-255) below which a frame is black
    black_frames: int = 3  # black frames in a row that make a stretch (a single dark frame is a scene)
    swap_margin: float = 8.0  # |mean R - mean B| an episode needs before its sign counts as a colour cast
    outlier_mads: float = 25.0  # a value this many robust spreads from its dataset's median is out of range
    residual_periods: float = 0.5  # mean |skew| above this fraction of the camera's frame period
    flagged_rate: float = 0.05  # steps flagged (a view out of tolerance) above this rate


@dataclass
class Finding:
    dataset: str
    episode_key: str
    check: str
    detail: str
    camera: str = ""
    count: int = 1
    episode_id: str = ""


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)
    episodes: list[dict] = field(default_factory=list)  # one summary per episode examined
    # (dataset, episode, camera) -> (step times, frame time minus step time, the camera's tolerance), seconds
    residuals: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Findings per dataset and check."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CHECKS, 0))
        for f in self.findings:
            out[f.dataset][f.check] += 1
        return dict(out)

    def table(self) -> str:
        """One line per finding, grouped by dataset, for a terminal."""
        if not self.episodes:
            return "no robot episodes in the lake"
        lines = []
        for dataset in sorted({e["dataset"] for e in self.episodes}):
            eps = [e for e in self.episodes if e["dataset"] == dataset]
            mine = [f for f in self.findings if f.dataset == dataset]
            bad = len({f.episode_key for f in mine})
            lines.append(f"{dataset}: {len(eps)} episodes, {bad} with findings")
            for f in sorted(mine, key=lambda f: (f.episode_key, f.check, f.camera)):
                where = f"{f.episode_key}" + (f" [{f.camera}]" if f.camera else "")
                lines.append(f"  {f.check:<13} {where:<28} {f.detail}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts(), "episodes": self.episodes,
                           "findings": [asdict(f) for f in self.findings]}, indent=1, default=str)


def examine(lake, dataset: str | None = None, config: DoctorConfig = DoctorConfig()) -> Diagnosis:
    """Run every check over the lake's episodes (of `dataset`, or all)."""
    diagnosis = Diagnosis()
    if not lake.exists("episodes"):
        return diagnosis
    where = pc.field("dataset") == dataset if dataset else None
    episodes = lake.read("episodes", filter=where).to_pylist()
    for name in sorted({e["dataset"] or "default" for e in episodes}):
        mine = [e for e in episodes if (e["dataset"] or "default") == name]
        _examine_dataset(lake, name, mine, config, diagnosis)
    return diagnosis


def summary(lake, datasets: list[str], max_episodes: int = 200, config: DoctorConfig = DoctorConfig()) -> dict:
    """What ingest reports: findings per check of each dataset that gained episodes, examined whole
    (its checks compare an episode with its dataset). A dataset above `max_episodes` is left to
    `gr2 doctor`, which the summary says, rather than decoding all of it at the end of every ingest."""
    out: dict[str, dict] = {}
    for name in datasets:
        n = lake.dataset("episodes").count_rows(filter=f"dataset = '{name.replace(chr(39), chr(39) * 2)}'")
        if n > max_episodes:
            out[name] = {"episodes": n, "skipped": f"more than {max_episodes} episodes: run gr2 doctor"}
            continue
        diagnosis = examine(lake, name, config)
        counts = diagnosis.counts().get(name, dict.fromkeys(CHECKS, 0))
        out[name] = {"episodes": n, "with_findings": len({f.episode_key for f in diagnosis.findings}),
                     **{check: k for check, k in counts.items() if k}}
    return out


def _examine_dataset(lake, name: str, episodes: list[dict], config: DoctorConfig, diagnosis: Diagnosis) -> None:
    accepted = [e for e in episodes if e["status"] == "accepted"]
    for e in episodes:
        if e["status"] != "accepted":
            diagnosis.findings.append(Finding(name, e["episode_key"], "refused", f"{e['status']}: {e['reason']}",
                                              episode_id=e["episode_id"]))
            diagnosis.episodes.append({"dataset": name, "episode_key": e["episode_key"], "status": e["status"]})
    columns = ["episode_id", "step", "timestamp_s", "state", "action", "views", "flags"]
    steps = lake.read("steps", columns=columns, filter=pc.field("episode_id").isin([e["episode_id"] for e in accepted])) \
        if accepted else pa.table({c: [] for c in columns})
    by_episode = defaultdict(list)
    for i, eid in enumerate(steps.column("episode_id").to_pylist()):
        by_episode[eid].append(i)
    tables = {eid: steps.take(rows).sort_by("step") for eid, rows in by_episode.items()}
    colour = {}
    for e in accepted:
        table = tables.get(e["episode_id"])
        if table is None or len(table) == 0:
            continue
        found, cast = _examine_episode(name, e, table, config, diagnosis)
        diagnosis.findings += found
        colour[e["episode_key"]] = cast
        diagnosis.episodes.append({"dataset": name, "episode_key": e["episode_key"], "status": "accepted",
                                   "steps": len(table), "flagged_steps": e["flagged_steps"], "findings": len(found)})
    diagnosis.findings += _channel_swaps(name, accepted, colour, config)
    diagnosis.findings += _out_of_range(name, accepted, tables, config)


def _examine_episode(name: str, episode: dict, steps: pa.Table, config: DoctorConfig,
                     diagnosis: Diagnosis) -> tuple[list[Finding], dict[str, float]]:
    key, eid = episode["episode_key"], episode["episode_id"]
    found = []

    def finding(check: str, detail: str, camera: str = "", count: int = 1) -> None:
        found.append(Finding(name, key, check, detail, camera, count, eid))

    t = np.asarray(steps.column("timestamp_s").to_numpy(zero_copy_only=False), np.float64)
    back = np.flatnonzero(np.diff(t) <= 0)
    if len(back):
        finding("timestamps", f"{len(back)} steps not after the one before (first: step {back[0] + 1})", count=len(back))
    for column in ("state", "action"):
        values = steps.column(column).to_pylist()
        bad = [i for i, v in enumerate(values) if v is not None and not np.isfinite(v).all()]
        if bad:
            finding("non_finite", f"{column} not finite at {len(bad)} steps (first: step {bad[0]})", count=len(bad))
    flagged = sum(1 for f in steps.column("flags").to_pylist() if any(x.startswith("view:") for x in f or ()))
    if len(steps) and flagged / len(steps) > config.flagged_rate:
        finding("flagged", f"{flagged}/{len(steps)} steps ({flagged / len(steps):.0%}) have a view out of tolerance",
                count=flagged)
    views = steps.column("views").to_pylist()
    cast = {}
    for c, report in enumerate(episode["alignment"] or []):
        camera = report["camera"]
        frames = _camera_frames(views, c)
        residual = np.array([(t[i], f[1]) for i, f in enumerate(frames) if f[1] is not None], np.float64).reshape(-1, 2)
        diagnosis.residuals[(name, key, camera)] = (residual[:, 0], residual[:, 1], report["tolerance_s"] or 0.0)
        for check, detail, count in _camera_checks(report, frames, residual, episode, config):
            finding(check, detail, camera, count)
        cast[camera] = _colour_cast(frames)
    return found, cast


def _camera_frames(views: list, c: int) -> list[tuple]:
    """(frame_index, skew_s, jpeg, frame time) of camera `c` at every step; Nones where it was flagged."""
    out = []
    for step in views:
        v = step[c] if step and c < len(step) else None
        ok = v is not None and v["ok"]
        out.append((v["frame_index"], v["skew_s"], v["jpeg"], v["timestamp_s"]) if ok else (None,) * 4)
    return out


def _camera_checks(report: dict, frames: list, residual: np.ndarray, episode: dict, config: DoctorConfig):
    """(check, detail, count) for one camera of one episode."""
    declared = report["fps"]
    own = {i: when for i, _, _, when in frames if i is not None}  # each frame's time on the state clock
    if declared and len(own) > 2:
        # measured over the frames the steps landed on: frame index advance over time advance
        idx = np.array(sorted(own), np.float64)
        times = np.array([own[i] for i in sorted(own)])
        measured = (idx[-1] - idx[0]) / (times[-1] - times[0]) if times[-1] > times[0] else 0.0
        if measured and abs(measured - declared) / declared > config.fps_tolerance:
            yield "fps", f"declared {declared:g} fps, frames advance at {measured:.3g} fps", 1
    duration = episode["duration_s"] or 0.0
    if declared and report["frame_count"]:
        expected = duration * declared + 1
        if abs(report["frame_count"] - expected) > config.frame_count_slack + 0.5:
            yield "frame_count", f"{report['frame_count']} frames for {duration:.2f} s at {declared:g} fps " \
                                 f"(expected ~{expected:.0f})", 1
    if declared and len(residual):
        mean_abs = float(np.mean(np.abs(residual[:, 1])))
        if mean_abs > config.residual_periods / declared:
            yield "alignment", f"mean |skew| {mean_abs * 1000:.0f} ms against a {1000 / declared:.0f} ms frame period " \
                               f"(offset {report['offset_s'] * 1000:+.0f} ms, {report['offset_source']})", 1
    pictures = _pictures(frames, config.same_picture)
    stuck = [same and luma >= config.black_luma for luma, same, _ in pictures[1:]]  # a black stretch is not a stuck one
    for check, run, what in (("frozen", _runs(stuck, config.frozen_frames - 1), "one picture"),
                             ("black", _runs([p[0] < config.black_luma for p in pictures], config.black_frames), "black")):
        if run:
            yield check, f"{len(run)} stretch(es) of {what}, longest {max(n for _, n in run) + (check == 'frozen')} " \
                         f"frames (from frame {pictures[run[0][0]][2]})", len(run)


def _pictures(frames: list, same: float) -> list[tuple[float, bool, int]]:
    """(mean luma, same picture as the previous distinct frame, frame index) per distinct frame.

    "Same" is judged against the camera's own motion: a still scene differs from frame to frame by
    sensor and codec noise (xhand's idle hand: 0.23-0.51 of 255 at 16x16, its median change 1.24),
    a stuck camera by far less than its usual change (RT-1 frozen with ffmpeg, then re-encoded:
    0.0-0.33 against a median of 2.7), so the bar is 0.15 of the camera's median change, capped at
    `same`. Measured on those two only: a threshold to revisit with more labelled cameras.
    """
    lumas, diffs, indices, last, seen = [], [], [], None, set()
    for i, _, jpeg, _ in frames:
        if i is None or i in seen:
            continue
        seen.add(i)
        grey = _grey(jpeg)
        lumas.append(float(grey.mean()))
        diffs.append(float(np.abs(grey - last).mean()) if last is not None else np.inf)
        indices.append(i)
        last = grey
    bar = min(same, 0.15 * float(np.median(diffs[1:]))) if len(diffs) > 1 else same
    return [(luma, d < bar, i) for luma, d, i in zip(lumas, diffs, indices)]


def _grey(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("L", (32, 32))  # JPEG decodes at 1/2..1/8 scale for free
        return np.asarray(im.convert("L").resize((16, 16)), np.float32)


def _runs(flags: list[bool], length: int) -> list[tuple[int, int]]:
    """(start, length) of every run of True at least `length` long."""
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            if i - start >= length:
                runs.append((start, i - start))
            start = None
    return runs


def _colour_cast(frames: list) -> float:
    """Mean red minus mean blue over a camera's distinct frames (0-255)."""
    from PIL import Image

    casts, seen = [], set()
    for i, _, jpeg, _ in frames:
        if i is None or i in seen:
            continue
        seen.add(i)
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft("RGB", (32, 32))
            rgb = np.asarray(im.convert("RGB"), np.float32)
        casts.append(rgb[..., 0].mean() - rgb[..., 2].mean())
    return float(np.mean(casts)) if casts else 0.0


def _channel_swaps(name: str, episodes: list[dict], colour: dict, config: DoctorConfig) -> list[Finding]:
    """Episodes whose red-blue cast has the opposite sign of their camera's across the dataset.

    A camera keeps its scene's colour cast from episode to episode; red and blue swapped (BGR stored
    as RGB, a known defect of converted datasets) flips it. Needs three episodes to have a majority.
    """
    out = []
    cameras = {c for casts in colour.values() for c in casts}
    for camera in sorted(cameras):
        casts = {k: v[camera] for k, v in colour.items() if camera in v and abs(v[camera]) >= config.swap_margin}
        if len(casts) < 3:
            continue
        usual = np.sign(np.median(list(casts.values())))
        ids = {e["episode_key"]: e["episode_id"] for e in episodes}
        for key, cast in sorted(casts.items()):
            if np.sign(cast) != usual:
                out.append(Finding(name, key, "channel_swap", f"red-blue cast {cast:+.0f} against the camera's usual "
                                   f"{'+' if usual > 0 else '-'}: red and blue likely swapped", camera, 1, ids[key]))
    return out


def _out_of_range(name: str, episodes: list[dict], tables: dict, config: DoctorConfig) -> list[Finding]:
    """States and actions far outside their dataset's spread (median +- outlier_mads robust spreads)."""
    out = []
    for column in ("state", "action"):
        rows = [(e, i, v) for e in episodes if e["episode_id"] in tables
                for i, v in enumerate(tables[e["episode_id"]].column(column).to_pylist()) if v is not None]
        widths = {len(v) for _, _, v in rows}
        if len(rows) < 10 or len(widths) != 1:
            continue
        values = np.asarray([v for _, _, v in rows], np.float64)
        finite = np.where(np.isfinite(values), values, np.nan)
        median = np.nanmedian(finite, axis=0)
        # The larger of two robust spreads: the scaled MAD, and the central 98% range as a normal's
        # (q99 - q01 = 4.65 sigma). A near-constant dimension (a gripper that rarely moves) has a
        # MAD of almost nothing and would flag its every move; a lone wild value sits outside q01..q99.
        q01, q99 = np.nanquantile(finite, [0.01, 0.99], axis=0)
        spread = np.maximum(1.4826 * np.nanmedian(np.abs(finite - median), axis=0), (q99 - q01) / 4.65) + 1e-9
        far = np.abs(finite - median) > config.outlier_mads * spread
        hits = defaultdict(list)
        for (e, step, _), row in zip(rows, far):
            for dim in np.flatnonzero(row):
                hits[(e["episode_key"], e["episode_id"])].append((step, int(dim)))
        for (key, eid), where in sorted(hits.items()):
            step, dim = where[0]
            out.append(Finding(name, key, "out_of_range", f"{column}[{dim}] far outside the dataset's spread at "
                               f"{len(where)} values (first: step {step})", "", len(where), eid))
    return out


def residual_png(diagnosis: Diagnosis, path: str, limit: int = 12) -> str:
    """One panel per camera: each episode's alignment residual (frame time minus step time) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_camera = defaultdict(list)
    for (dataset, episode, camera), (t, skew, tolerance) in diagnosis.residuals.items():
        by_camera[f"{dataset}: camera {camera}"].append((episode, t, skew, tolerance))
    panels = sorted(by_camera)[:limit] or ["no cameras"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        lines = by_camera.get(panel, [])
        for episode, t, skew, _ in lines[:20]:
            ax.plot(t, skew * 1000, lw=0.8, marker=".", ms=3, label=episode)
        # The tolerance band: a residual inside it is jitter, outside it the step was flagged.
        tolerance = max((tol for *_, tol in lines), default=0.0) * 1000
        if tolerance:
            ax.axhspan(-tolerance, tolerance, color="0.93", zorder=0)
            ax.set_ylim(-1.3 * tolerance, 1.3 * tolerance)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel("frame - step (ms)")
        if 1 < len(lines) <= 10:
            ax.legend(fontsize=6, ncol=5, loc="upper right")
    axes[-1, 0].set_xlabel("time on the state clock (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
