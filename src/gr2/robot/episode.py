"""The episode record every robot reader yields, and the checks an episode must pass.

Readers list cheap `EpisodeRef`s on the driver; a worker turns each into an `Episode` (arrays in
memory, camera frames decoded on demand). Time is explicit, as in LeRobot: the state stream has
its timestamps and every camera keeps its own, on its own clock; pipelines/robot/align.py maps
them onto the state's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gr2.errors import Gr2Error
from gr2.lake.uri import inside
from gr2.robot.layout import Layout
from gr2.video.probe import OPEN_OPTIONS


def dataset_path(where: str, root: str, relative: str, what: str) -> str:
    """`relative` inside the dataset at `root`, or EpisodeError naming `where`, `what` named it and the rule."""
    try:
        return inside(root, relative)
    except ValueError as e:
        raise EpisodeError(f"{where}: {what} {e} (paths a dataset names must stay inside its root)") from None


class EpisodeError(Gr2Error):
    """An episode that cannot be read or is not valid; the message names the episode and the fault."""


# Bounds no real episode reaches (5.5 h at 100 Hz; a few hundred joints), checked against a file's
# declared shape before reading it: an HDF5 or .npy header may claim a billion steps in a tiny file,
# and reading that would take the worker's memory or hours of hashing fill values.
MAX_STEPS = 2_000_000
MAX_WIDTH = 100_000


def check_shape(where: str, what: str, shape: tuple[int, ...]) -> None:
    """EpisodeError naming `where` and `what` unless `shape` is [steps, ...] within MAX_STEPS and MAX_WIDTH."""
    if len(shape) == 0:
        raise EpisodeError(f"{where}: {what} is a scalar, not a [steps, ...] array")
    width = int(np.prod(shape[1:], dtype=np.int64))
    if shape[0] > MAX_STEPS or width > MAX_WIDTH:
        raise EpisodeError(f"{where}: {what} claims shape {tuple(shape)}, beyond {MAX_STEPS} steps "
                           f"or {MAX_WIDTH} values per step")


@dataclass(frozen=True)
class EpisodeRef:
    """Where one episode lives: listed on the driver, loaded on a worker."""

    format: str  # lerobot | hdf5-robomimic | hdf5-aloha | calvin | annotated-json
    source: str  # the dataset's root (directory or file)
    key: str  # the episode within the source
    cameras: tuple[str, ...] = ()  # cameras the source promises for every episode
    dataset: str = ""  # name the normalisation statistics are grouped by
    # An object-store source only: the files this episode reads, relative to the source's parent
    # (pipelines/robot/remote.py fetches them for the worker that loads it).
    files: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"{self.source}#{self.key}"


class Frames(Protocol):
    """A camera's frames, decoded on demand."""

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 [N, H, W, 3] frames at `indices`."""
        ...

    def digest(self) -> str:
        """A content hash of the frames (of the encoded bytes where there are some)."""
        ...


class ArrayFrames:
    """Frames already in memory (or in an h5py dataset): [F, H, W, 3] uint8."""

    def __init__(self, array, decode_jpeg: bool = False):
        self.array = array
        self.decode_jpeg = decode_jpeg  # ALOHA's compressed layout: rows of padded JPEG bytes

    def __len__(self) -> int:
        return len(self.array)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        idx = [int(i) for i in indices]
        if not idx:
            return np.zeros((0, 1, 1, 3), np.uint8)
        # h5py wants increasing unique indices; numpy takes anything.
        uniq = sorted(set(idx))
        block = np.asarray(self.array[uniq])
        rows = {i: block[j] for j, i in enumerate(uniq)}
        if self.decode_jpeg:
            rows = {i: decode_jpeg(bytes(np.asarray(r, np.uint8))) for i, r in rows.items()}
        return np.stack([rows[i] for i in idx]).astype(np.uint8, copy=False)

    def digest(self) -> str:
        h = hashlib.sha256()
        for start in range(0, len(self.array), 256):
            h.update(np.ascontiguousarray(self.array[start:start + 256]).tobytes())
        return h.hexdigest()


class EncodedFrames:
    """Frames stored as encoded images (JPEG/PNG bytes), decoded on access."""

    def __init__(self, encoded: list[bytes]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([decode_jpeg(self.encoded[int(i)]) for i in indices])

    def digest(self) -> str:
        h = hashlib.sha256()
        for data in self.encoded:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()


class SelectedFrames:
    """Some of another stream's frames (`keep`: their indices in it, increasing)."""

    def __init__(self, frames: Frames, keep: np.ndarray):
        self.frames, self.keep = frames, np.asarray(keep, np.int64)

    def __len__(self) -> int:
        return len(self.keep)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self.frames.get([int(self.keep[int(i)]) for i in indices])

    def digest(self) -> str:
        return hashlib.sha256(f"{self.frames.digest()}:{self.keep.tolist()}".encode()).hexdigest()


class VideoFrames:
    """Frames `first`..`first + count` of a video file (a LeRobot v3 file holds many episodes)."""

    def __init__(self, path: str, first: int = 0, count: int | None = None):
        from gr2.video.decode import DecodeError, VideoReader, display_size

        self.path, self.first = path, int(first)
        try:
            self._reader = VideoReader(path, *display_size(path))
        except DecodeError:
            raise
        except Exception as e:  # PyAV raises its own error family for unreadable containers
            raise DecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
        total = self._reader.frame_count - self.first
        self.count = total if count is None else int(count)
        if self.count > total:
            raise DecodeError(f"{path}: frames {self.first}..{self.first + self.count} asked, the video has {self._reader.frame_count}")

    @property
    def decoder(self) -> str:
        return self._reader.decoder

    def __len__(self) -> int:
        return self.count

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self._reader.get([self.first + int(i) for i in indices])

    def digest(self) -> str:
        return f"{file_digest(self.path)}:{self.first}:{self.count}"


@dataclass
class Camera:
    """One camera stream: frames and their timestamps on the camera's own clock."""

    name: str
    timestamps_s: np.ndarray  # [F] float64
    frames: Frames
    fps: float | None = None  # the rate the source declares; None: from the timestamps
    offset_s: float | None = None  # latency the source declares (a calibrated rig's metadata)


@dataclass
class EndEffector:
    """End-effector pose per state step, as the canonical action needs it (actions.py)."""

    pos: np.ndarray  # [T, 3] metres, robot base frame
    quat: np.ndarray  # [T, 4] unit quaternion (x, y, z, w), base frame
    effector: np.ndarray  # [T, k] the gripper (k=1) or hand command at each step
    layout: Layout | None = None  # what the k effector dimensions are (layout.py); None: undeclared


@dataclass
class Episode:
    """One robot episode: the state stream (the reference clock), actions and cameras."""

    ref: EpisodeRef
    instruction: str | None
    timestamps_s: np.ndarray  # [T] float64, the state clock
    state: np.ndarray  # [T, S]
    action: np.ndarray  # [T, A] or [T-1, A] (an action between each pair of states)
    cameras: dict[str, Camera]
    end_effector: EndEffector | None = None
    meta: dict = field(default_factory=dict)
    state_layout: Layout | None = None  # what each state and action dimension is (layout.py); None: undeclared
    action_layout: Layout | None = None

    @property
    def length(self) -> int:
        return len(self.timestamps_s)

    @property
    def fps(self) -> float:
        if self.length < 2:
            return 0.0
        return float(1.0 / np.median(np.diff(self.timestamps_s)))

    def validate(self) -> None:
        """Raise EpisodeError naming the field and step of the first fault found."""
        name = self.ref.uri
        t = self.length
        if t < 1:
            raise EpisodeError(f"{name}: no steps")
        _check_2d(name, "state", self.state, t)
        _check_finite(name, "state", self.state)
        _check_finite(name, "action", _per_step(name, "action", self.action))
        if len(self.action) not in (t, t - 1):
            raise EpisodeError(f"{name}: length mismatch: state has {t} steps, action has {len(self.action)}")
        _check_times(name, "timestamp", self.timestamps_s, t)
        ee = self.end_effector
        declared = (("state", self.state_layout, self.state), ("action", self.action_layout, self.action),
                    ("end_effector.effector", ee.layout if ee else None, ee.effector if ee else None))
        for what, layout, values in declared:
            width = _per_step(name, what, values).shape[1] if layout is not None else None
            if layout is not None and len(layout) != width:
                raise EpisodeError(f"{name}: {what} has {width} dimensions but the source declares "
                                   f"{len(layout)} ({', '.join(d.name for d in layout)})")
        if self.end_effector is not None:
            for part in ("pos", "quat", "effector"):
                arr = np.asarray(getattr(self.end_effector, part))
                _check_2d(name, f"end_effector.{part}", arr, t)
                _check_finite(name, f"end_effector.{part}", arr)
        missing = [c for c in self.ref.cameras if c not in self.cameras]
        if missing:
            raise EpisodeError(f"{name}: camera {missing[0]} missing (the source promises {list(self.ref.cameras)})")
        for cam in self.cameras.values():
            frames = len(cam.frames)
            _check_times(name, f"camera {cam.name} timestamp", cam.timestamps_s, frames)
            if frames == 0:
                raise EpisodeError(f"{name}: camera {cam.name} has no frames")

    def every(self, n: int) -> Episode:
        """The episode with every n-th state step kept (cameras untouched).

        ee_delta actions are recomputed between the kept poses, so they stay exact; the source's
        own actions are kept at the kept steps only.
        """
        if n <= 1:
            return self
        keep = np.arange(0, self.length, n)
        between = len(self.action) == self.length - 1
        action = np.asarray(self.action)[keep[:-1] if between else keep]
        ee = self.end_effector
        if ee is not None:
            ee = EndEffector(ee.pos[keep], ee.quat[keep], ee.effector[keep], ee.layout)
        return Episode(self.ref, self.instruction, self.timestamps_s[keep], self.state[keep], action,
                       self.cameras, ee, {**self.meta, "every": n}, self.state_layout, self.action_layout)

    def content_id(self) -> str:
        """sha256 over every array and every camera's frames: the same content, the same id."""
        h = hashlib.sha256(f"{self.ref.format}\0{self.instruction}\0".encode())
        for arr in (self.timestamps_s, self.state, self.action):
            _hash_array(h, arr)
        if self.end_effector is not None:
            for arr in (self.end_effector.pos, self.end_effector.quat, self.end_effector.effector):
                _hash_array(h, arr)
        for name in sorted(self.cameras):
            cam = self.cameras[name]
            h.update(f"\0{name}\0".encode())
            _hash_array(h, cam.timestamps_s)
            h.update(cam.frames.digest().encode())
        return h.hexdigest()


def ref_id(ref: EpisodeRef) -> str:
    """Id of an episode whose content could not be read: a hash of where it lives."""
    return hashlib.sha256(f"unreadable\0{ref.format}\0{ref.uri}".encode()).hexdigest()


def _hash_array(h, arr) -> None:
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float64))
    h.update(f"{a.shape}".encode())
    h.update(a.tobytes())


def _per_step(name: str, what: str, values) -> np.ndarray:
    """`values` as [steps, dims]; numpy cannot infer the width of an empty array by itself (reshape(0, -1))."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        raise EpisodeError(f"{name}: {what} is a scalar, not a [steps, dims] array")
    return arr.reshape(len(arr), int(np.prod(arr.shape[1:], dtype=np.int64)))


def _check_2d(name: str, what: str, arr: np.ndarray, steps: int) -> None:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise EpisodeError(f"{name}: {what} should be [steps, dims], has shape {arr.shape}")
    if len(arr) != steps:
        raise EpisodeError(f"{name}: length mismatch: state has {steps} steps, {what} has {len(arr)}")


def _check_finite(name: str, what: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(np.asarray(arr, dtype=np.float64))
    if bad.any():
        step, dim = (int(v) for v in np.argwhere(bad)[0])
        value = np.asarray(arr, dtype=np.float64)[step, dim]
        raise EpisodeError(f"{name}: {what} is {value} at step {step} (dim {dim})")


def _check_times(name: str, what: str, times: np.ndarray, count: int) -> None:
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or len(times) != count:
        raise EpisodeError(f"{name}: length mismatch: {count} {'frames' if 'camera' in what else 'steps'} but {len(times)} {what}s")
    bad = ~np.isfinite(times)
    if bad.any():
        raise EpisodeError(f"{name}: {what} is {times[bad][0]} at step {int(np.argmax(bad))}")
    back = np.flatnonzero(np.diff(times) <= 0)
    if len(back):
        i = int(back[0]) + 1
        raise EpisodeError(
            f"{name}: {what}s not increasing: step {i} at {times[i]:.6f}s is not after step {i - 1} at {times[i - 1]:.6f}s"
        )


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def video_timestamps(path: str) -> np.ndarray:
    """Presentation times (s) of every frame of a video, read from the container without decoding."""
    import av

    with av.open(path, options=OPEN_OPTIONS) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
        base = float(stream.time_base)
        start = stream.start_time or 0
    return (np.sort(np.asarray(pts, dtype=np.float64)) - start) * base


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) to uint8 RGB [H, W, 3]."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
