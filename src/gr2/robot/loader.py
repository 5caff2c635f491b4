"""A LeRobot-style torch dataset over the lake's steps: `delta_timestamps` in seconds, `*_is_pad`
masks, and every camera served as VQ tokens or as decoded frames.

    dataset = StepsDataset(lake, {"observation.images.corner": [-0.1, 0.0], "action": [0.0, 0.0125]})
    loader = dataset.loader(batch_size=32, shuffle=True, num_workers=2)  # a DataLoader, workers by forkserver

An item looks like LeRobotDataset's: "observation.state", "action", "observation.images.<cam>",
"timestamp" (seconds since the episode's first step), "episode_index" (into `episode_ids`),
"frame_index" (the step), "index", "task" (the instruction), plus the instruction's stored
"text_embedding" (zeros without one) and the current step's "gr2.view_ok" / "gr2.action_ok", the
columns a LeRobot export of the lake carries. A key with delta_timestamps holds one entry per
offset and has "<key>_is_pad".

How time is resolved: the steps sit on the robot's state clock, so an offset is added to the
step's own `timestamp_s` and the step nearest that time is taken, within `tolerance_s` (default: a
quarter of the episode's step period, so a jittery clock still resolves while an offset that falls
between steps is an error naming the episode and the time, at construction, not in a worker
mid-epoch; LeRobot asks for 1e-4 s and its users trip on it). A time before the first step or after
the last repeats the edge step and is padding, LeRobot's convention. Padding also marks entries
that hold no real value: a view flagged at alignment (the camera's nearest good frame stands in, as
in the LeRobot export) and the null action after an ee_delta episode's last pose (zero motion, the
effector held).

Why it is fast: everything small (state, action, times, which neighbour each offset lands on) is
resolved once, into numpy arrays, when the dataset is made; an item is then array lookups plus
one Lance `take` of the views it needs. DataLoader's batched fetch (`__getitems__`) takes a whole
batch's views in one call and decodes each distinct frame once (history windows overlap).

Lance is not fork-safe: a DataLoader worker forked from a process that has read Lance (this one,
to make the dataset) hung in its first `take` here, waiting on the parent's runtime. Workers are
therefore started by forkserver or spawn (`StepsDataset.loader` does it), each opening its own
handle on the pinned table version; a forked worker is refused with an error that says so, rather
than left to hang. As with spawn, a script that starts workers needs `if __name__ == "__main__":`,
and workers take seconds to start: keep them (`persistent_workers=True`) across epochs.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gr2.errors import Gr2Error
from gr2.lake.lake import Lake
from gr2.robot.export import ExportError, filled_actions, nearest_ok, select_episodes
from gr2.robot.lerobot import ACTION_KEY, STATE_KEY, VIEW_OK_KEY

SERVE = ("tokens", "frames")
IMAGE_PREFIX = "observation.images."
ACTION_OK_KEY = "gr2.action_ok"
STEP_COLUMNS = ["episode_id", "step", "timestamp_s", "state", "action", "flags"]


class LoaderError(Gr2Error):
    """A dataset that cannot be made as asked (unknown keys or cameras, no tokens, unresolvable times)."""


class StepsDataset(torch.utils.data.Dataset):
    """Every step of the lake's accepted episodes (those `where` selects), as LeRobot-style items.

    delta_timestamps: {key: [seconds relative to the step]} for "observation.state", "action" and
        "observation.images.<camera>"; keys without it hold the step's own value.
    cameras: views to serve, in order; empty: the first selected episode's cameras.
    serve: "tokens" (each view's VQ grid, int64 [h, w]) or "frames" (its JPEG, float [3, H, W] in [0, 1]).
    where: SQL over the episodes table, ANDed with status = 'accepted'.
    tolerance_s: how far a resolved step may be from the time asked for; None: a quarter step period.
    """

    def __init__(self, lake: Lake | str, delta_timestamps: dict[str, list[float]] | None = None,
                 cameras: tuple[str, ...] | list[str] = (), serve: str = "tokens", where: str | None = None,
                 tolerance_s: float | None = None):
        self.lake = lake if isinstance(lake, Lake) else Lake(lake)
        if serve not in SERVE:
            raise LoaderError(f"serve must be one of {', '.join(SERVE)}, got {serve!r}")
        if tolerance_s is not None and tolerance_s < 0:
            raise LoaderError(f"tolerance_s must be >= 0, got {tolerance_s}")
        self.serve, self.tolerance_s = serve, tolerance_s
        if not self.lake.exists("episodes") or not self.lake.exists("steps"):
            raise LoaderError(f"lake {self.lake.root} has no robot episodes: ingest some (gr2 ingest-robot) first")
        episodes = self._episodes(where)
        self.episode_ids = episodes.column("episode_id").to_pylist()
        self.cameras = self._cameras(episodes, cameras)
        self.delta_timestamps = self._deltas(delta_timestamps or {})
        if serve == "tokens":
            self.tokenizer_id = self._tokenizer(episodes)
        # Every process reads this one snapshot, however the table moves on while it trains.
        self.steps_version = self.lake.dataset("steps").version
        self._steps = None
        self._pid = None
        self._made_in, self._unpickled = os.getpid(), False
        self._load_steps(episodes)
        self._load_texts(episodes)
        self._resolve()

    # -- construction: what is selected, checked at the boundary -----------------------------------

    def _episodes(self, where: str | None) -> pa.Table:
        try:
            episodes = select_episodes(self.lake, where)
        except ExportError as e:
            raise LoaderError(str(e)) from None
        if len(episodes) == 0:
            raise LoaderError(f"no accepted episodes in {self.lake.root}" + (f" where {where}" if where else ""))
        widths = {(r["state_dim"], r["action_dim"]) for r in episodes.select(["state_dim", "action_dim"]).to_pylist()}
        if len(widths) > 1:
            raise LoaderError(f"the selected episodes mix (state, action) widths {sorted(widths)}: "
                              f"select episodes of one robot with `where`")
        return episodes

    def _cameras(self, episodes: pa.Table, cameras) -> tuple[str, ...]:
        had = episodes.column("cameras").to_pylist()
        cameras = tuple(cameras) or tuple(had[0] or ())
        for episode_id, has in zip(self.episode_ids, had):
            missing = [c for c in cameras if c not in (has or [])]
            if missing:
                raise LoaderError(f"episode {episode_id} has no camera {missing[0]!r} (it has {has})")
        # Where each camera sits in an episode's `views` list (ingest may order them per source).
        self._view_slot = np.array([[(has or []).index(c) for c in cameras] for has in had], np.int64).reshape(
            len(had), len(cameras))
        return cameras

    def _deltas(self, delta_timestamps: dict) -> dict[str, np.ndarray]:
        known = [STATE_KEY, ACTION_KEY, *(IMAGE_PREFIX + c for c in self.cameras)]
        out = {}
        for key, offsets in delta_timestamps.items():
            if key not in known:
                raise LoaderError(f"delta_timestamps key {key!r} is not served; known keys: {', '.join(known)}")
            offsets = np.asarray(offsets, np.float64).reshape(-1)
            if len(offsets) == 0 or not np.isfinite(offsets).all():
                raise LoaderError(f"delta_timestamps[{key!r}] must be a non-empty list of seconds, got {offsets.tolist()}")
            out[key] = offsets
        return out

    def _tokenizer(self, episodes: pa.Table) -> str:
        ids = episodes.column("tokenizer_id").to_pylist()
        untokenized = [e for e, t in zip(self.episode_ids, ids) if not t]
        if untokenized:
            raise LoaderError(f"{len(untokenized)} of {len(ids)} selected episodes in {self.lake.root} carry no VQ "
                              f"tokens (e.g. {untokenized[0]}): run `gr2 tokenize` first, or serve='frames'")
        if len(set(ids)) > 1:
            raise LoaderError(f"the selected episodes hold tokens of {len(set(ids))} tokenizers "
                              f"({', '.join(sorted(set(ids)))}): run `gr2 tokenize` with one tokenizer")
        return ids[0]

    def _load_steps(self, episodes: pa.Table) -> None:
        """The small columns of every selected step, in episode then step order, as numpy arrays."""
        ds = self.lake.dataset("steps", self.steps_version)
        steps = ds.to_table(columns=STEP_COLUMNS, filter=pc.field("episode_id").isin(self.episode_ids),
                            with_row_id=True)
        order = {e: i for i, e in enumerate(self.episode_ids)}
        episode = np.array([order[e] for e in steps.column("episode_id").to_pylist()], np.int64)
        step = steps.column("step").to_numpy()
        sort = np.lexsort((step, episode))
        steps = steps.take(pa.array(sort))
        self._episode, self._step = episode[sort], step[sort]
        self._row_id = steps.column("_rowid").to_numpy()
        self._time = steps.column("timestamp_s").to_numpy().astype(np.float64)
        counts = np.bincount(self._episode, minlength=len(self.episode_ids))
        empty = [self.episode_ids[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise LoaderError(f"accepted episode {empty[0]} has no steps in {self.lake.root}")
        self._start = np.concatenate([[0], np.cumsum(counts)])
        self._state = np.asarray(pc.list_flatten(steps.column("state")).to_numpy(), np.float32).reshape(len(steps), -1)
        width = int(episodes.column("action_dim")[0].as_py() or 0)
        spaces = episodes.column("action_space").to_pylist()
        actions, ok = [], []
        raw = steps.column("action").to_pylist()  # nullable rows: per episode, with export's fill
        for e in range(len(self.episode_ids)):
            a, o = filled_actions(raw[self._start[e]:self._start[e + 1]], spaces[e], width)
            actions.append(a)
            ok.append(o)
        self._action, self._action_ok = np.concatenate(actions), np.concatenate(ok)
        flags = steps.column("flags").to_pylist()
        self._view_ok = np.array([[f"view:{c}" not in (f or ()) for c in self.cameras] for f in flags], bool).reshape(
            len(steps), len(self.cameras))

    def _load_texts(self, episodes: pa.Table) -> None:
        self._tasks = [t or "" for t in episodes.column("instruction").to_pylist()]
        field = episodes.schema.field("instruction_embedding")
        width = field.type.list_size if pa.types.is_fixed_size_list(field.type) else 512
        texts = np.zeros((len(episodes), width), np.float32)
        for i, v in enumerate(episodes.column("instruction_embedding").to_pylist()):
            if v is not None:
                texts[i] = v
        self._text = texts

    def _resolve(self) -> None:
        """For every step and offset of every key: the step it lands on and whether that is padding."""
        n = len(self._time)
        self._at, self._pad = {}, {}
        # Each camera's stand-in for a flagged view: its nearest good view in the episode.
        self._source = np.zeros((n, len(self.cameras)), np.int64)
        for e, episode_id in enumerate(self.episode_ids):
            lo, hi = self._start[e], self._start[e + 1]
            for c, camera in enumerate(self.cameras):
                ok = self._view_ok[lo:hi, c]
                if not ok.any():
                    raise LoaderError(f"episode {episode_id} has no frame of camera {camera!r} at any step")
                self._source[lo:hi, c] = lo + nearest_ok(ok)
        for key, offsets in self.delta_timestamps.items():
            at, pad = np.zeros((n, len(offsets)), np.int64), np.zeros((n, len(offsets)), bool)
            for e in range(len(self.episode_ids)):
                lo, hi = self._start[e], self._start[e + 1]
                at[lo:hi], pad[lo:hi] = self._episode_offsets(e, offsets, key)
            self._at[key], self._pad[key] = at, pad

    def _episode_offsets(self, e: int, offsets: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._start[e], self._start[e + 1]
        t = self._time[lo:hi]
        period = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
        tolerance = self.tolerance_s if self.tolerance_s is not None else period / 4
        wanted = t[:, None] + offsets[None, :]
        right = np.clip(np.searchsorted(t, wanted), 0, len(t) - 1)
        left = np.clip(right - 1, 0, len(t) - 1)
        nearest = np.where(np.abs(t[left] - wanted) <= np.abs(t[right] - wanted), left, right)
        outside = (wanted < t[0] - tolerance) | (wanted > t[-1] + tolerance)
        off = ~outside & (np.abs(t[nearest] - wanted) > tolerance + 1e-9)
        if off.any():
            i, k = np.argwhere(off)[0]
            raise LoaderError(
                f"episode {self.episode_ids[e]}: {key} offset {offsets[k]:+g} s from the step at "
                f"{t[i] - t[0]:.4f} s asks for {wanted[i, k] - t[0]:.4f} s, but the nearest step is at "
                f"{t[nearest[i, k]] - t[0]:.4f} s, beyond tolerance_s={tolerance:g} (the steps are "
                f"{period:g} s apart: use offsets on that grid, or a larger tolerance_s)")
        return lo + nearest, outside

    # -- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._time)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items at once: torch's DataLoader calls this with each batch's indices."""
        idx = np.asarray(indices, np.int64)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} steps")
        idx = idx % len(self) if len(idx) else idx
        batch = {
            STATE_KEY: self._gather(STATE_KEY, self._state, idx),
            ACTION_KEY: self._gather(ACTION_KEY, self._action, idx),
            **self._views(idx),
        }
        for key in self.delta_timestamps:
            pad = self._pad[key][idx]
            if key == ACTION_KEY:
                pad = pad | ~self._action_ok[self._at[key][idx]]
            elif key.startswith(IMAGE_PREFIX):
                c = self.cameras.index(key[len(IMAGE_PREFIX):])
                pad = pad | ~self._view_ok[self._at[key][idx], c]
            batch[f"{key}_is_pad"] = torch.from_numpy(pad)
        episode = self._episode[idx]
        batch["timestamp"] = torch.from_numpy((self._time[idx] - self._time[self._start[episode]]).astype(np.float32))
        batch["episode_index"] = torch.from_numpy(episode)
        batch["frame_index"] = torch.from_numpy(self._step[idx].astype(np.int64))
        batch["index"] = torch.from_numpy(idx)
        batch["text_embedding"] = torch.from_numpy(self._text[episode])
        batch[VIEW_OK_KEY] = torch.from_numpy(self._view_ok[idx])
        batch[ACTION_OK_KEY] = torch.from_numpy(self._action_ok[idx])
        tasks = [self._tasks[e] for e in episode]
        return [{**{k: v[i] for k, v in batch.items()}, "task": tasks[i]} for i in range(len(idx))]

    def _gather(self, key: str, values: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        rows = self._at[key][idx] if key in self._at else idx
        return torch.from_numpy(values[rows])

    def _views(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Every camera's tokens or frames for the batch: one Lance take of the steps they come from,
        each distinct frame decoded once (neighbouring windows share most of theirs)."""
        if not self.cameras:
            return {}
        wanted = []  # per camera: [B, K] or [B] positions of the steps whose view it shows
        for c, camera in enumerate(self.cameras):
            key = IMAGE_PREFIX + camera
            wanted.append(self._source[self._at[key][idx] if key in self._at else idx, c])
        rows = np.unique(np.concatenate([w.reshape(-1) for w in wanted]))
        # _take_rows keeps the order asked for; `views` is each step's list of per-camera structs
        views = self._steps_dataset()._take_rows(pa.array(self._row_id[rows]), columns=["views"])
        views = views.column("views").combine_chunks()
        first = views.offsets.to_numpy()[:-1]
        out = {}
        for c, camera in enumerate(self.cameras):
            steps, back = np.unique(wanted[c], return_inverse=True)
            slots = first[np.searchsorted(rows, steps)] + self._view_slot[self._episode[steps], c]
            values = self._decode(views.values.take(pa.array(slots)), camera)
            picked = values[torch.from_numpy(back.reshape(-1))].reshape(*wanted[c].shape, *values.shape[1:])
            # frames become float after the gather: a quarter of the bytes move until then
            out[IMAGE_PREFIX + camera] = picked.float().div_(255) if self.serve == "frames" else picked
        return out

    def _decode(self, entries: pa.StructArray, camera: str) -> torch.Tensor:
        """One camera's views as tokens (int64 [n, h, w]) or frames (uint8 [n, 3, H, W])."""
        if self.serve == "tokens":
            h, w = entries.field("token_shape")[0].as_py()
            tokens = pc.list_flatten(entries.field("tokens")).to_numpy().astype(np.int64)
            if tokens.size != len(entries) * h * w:
                raise LoaderError(f"camera {camera!r} holds token grids of several shapes (one is {h}x{w}): "
                                  f"re-run `gr2 tokenize` with one tokenizer")
            return torch.from_numpy(tokens.reshape(len(entries), h, w))
        from torchvision.io import ImageReadMode, decode_jpeg

        # torchvision decodes a list of JPEGs in one call (libjpeg-turbo), twice as fast here as PIL
        jpegs = entries.field("jpeg").cast(pa.large_binary())  # only good views are read: never null
        _, offsets, data = jpegs.buffers()
        offsets = np.frombuffer(offsets, np.int64)[jpegs.offset:jpegs.offset + len(jpegs) + 1]
        data = torch.from_numpy(np.frombuffer(data, np.uint8).copy())  # one writable copy of the batch's bytes
        frames = decode_jpeg([data[a:b] for a, b in zip(offsets[:-1], offsets[1:])], mode=ImageReadMode.RGB)
        return torch.stack(frames)

    def _steps_dataset(self):
        """This process's Lance handle on the pinned steps version."""
        if self._steps is None or self._pid != os.getpid():
            if os.getpid() != self._made_in and not self._unpickled:
                raise LoaderError(
                    "StepsDataset reached a forked DataLoader worker, where Lance can hang (it is not fork-safe): "
                    "pass multiprocessing_context='forkserver' (or 'spawn') to the DataLoader, or use "
                    "StepsDataset.loader(...)")
            self._steps, self._pid = self.lake.dataset("steps", self.steps_version), os.getpid()
        return self._steps

    def __getstate__(self) -> dict:
        # A worker started by forkserver or spawn gets the arrays, never this process's Lance handle.
        return {**self.__dict__, "_steps": None, "_pid": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._unpickled = True

    def loader(self, batch_size: int = 32, shuffle: bool = False, num_workers: int = 0,
               **kwargs) -> torch.utils.data.DataLoader:
        """A torch DataLoader over this dataset whose workers start by forkserver (see the module docstring)."""
        if num_workers > 0 and "multiprocessing_context" not in kwargs:
            context = multiprocessing.get_context("forkserver")
            # The server imports torch, pyarrow and Lance once (no Lance runtime starts on import) and
            # each worker forks from it ready: seconds less per worker than importing them anew.
            context.set_forkserver_preload([__name__])
            kwargs["multiprocessing_context"] = context
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                           **kwargs)

    # -- what LeRobot users ask of a dataset -----------------------------------------------------

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ids)

    @property
    def num_frames(self) -> int:
        return len(self)
