"""Hostile robot files: a small valid dataset in each format, damaged by a Hypothesis-chosen mutation
(wrong dtypes, NaN/inf, truncated or garbage files, mismatched lengths, absurd sizes, missing keys),
ends as failed episodes whose reason names the episode, never a traceback or a hung worker."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_robot_readers import frames, write_calvin, write_lerobot_v2, write_lerobot_v3

from gr2.robot.episode import MAX_WIDTH
from gr2.robot.ingest import IngestConfig, list_sources, process_episode

# Each example copies or writes a dataset and ingests it: a handful is enough to walk every mutation kind.
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# A CALVIN example copies 30 npz files and ingests two windows, an annotated one decodes a 29-frame video:
# fewer of them keep the file under a minute on a busy machine.
FEW_SETTINGS = settings(SETTINGS, max_examples=12)
CONFIG = IngestConfig(text_model=None)
HUGE = 10**9  # steps or dimensions no real episode has; a reader must refuse it before reading it
# A reason that is a Python exception's own text ("KeyError: 'fps'") means a reader let an error through
# without saying which field or file was wrong.
BARE_ERROR = re.compile(r"^[A-Z]\w*(Error|Exception): ")

hostile_value = st.one_of(st.none(), st.text(max_size=12), st.integers(-3, 3), st.just(HUGE), st.just(-HUGE),
                          st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-HUGE, HUGE), max_size=3),
                          st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.booleans())


def ingest(root: Path) -> list[dict]:
    """Every row the source produces: failed listing rows and one row per listed episode."""
    refs, failed = list_sources([str(root)])
    for row in failed:
        assert row["status"] == "failed" and str(root) in row["reason"], row
        _assert_explained(row["reason"], str(root))
    rows = list(failed)
    for ref in refs:
        row, steps = process_episode(ref, CONFIG, "hostile")
        assert row["status"] in ("accepted", "rejected", "failed"), row
        assert (steps is None) == (row["status"] != "accepted")
        if row["status"] == "failed":
            assert isinstance(row["reason"], str) and ref.uri in row["reason"], row
            _assert_explained(row["reason"], ref.uri)
        elif row["status"] == "rejected":  # a gate and its score ("flagged_fraction:0.667"), by design
            assert row["reason"], row
        rows.append(row)
    return rows


def _assert_explained(reason: str, where: str) -> None:
    said = reason.split(f"{where}: ", 1)[-1]
    said = said.removeprefix("cannot list episodes (")  # list_sources wraps the reader's own message
    assert said.strip() and not BARE_ERROR.match(said), reason


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def statuses(rows: list[dict]) -> list[str]:
    return [r["status"] for r in rows]


# -- LeRobot v2: parquet, meta JSON, mp4 --------------------------------------------------------------


@pytest.fixture(scope="module")
def lerobot_template(tmp_path_factory) -> Path:
    return write_lerobot_v2(tmp_path_factory.mktemp("lerobot") / "ds", lengths=(8,), cams=("front",))


def _copy(template: Path) -> Path:
    return Path(shutil.copytree(template, Path(tempfile.mkdtemp(prefix="hostile-")) / template.name))


PARQUET = "data/chunk-000/episode_000000.parquet"
COLUMNS = ("observation.state", "action", "timestamp")


def _damage_parquet(root: Path, kind: str, column: str, step: int, value) -> None:
    path = root / PARQUET
    df = pd.read_parquet(path)
    n = len(df)
    if kind == "strings":  # text where floats belong
        df[column] = [["abc"] * 7 if column != "timestamp" else "abc" for _ in range(n)] if step % 2 else "x"
    elif kind == "objects":  # a column of mixed Python objects, stored as JSON-ish text by pyarrow
        df[column] = [json.dumps(value) for _ in range(n)]
    elif kind == "nonfinite":
        bad = [np.nan, np.inf, -np.inf][step % 3]
        if column == "timestamp":
            ts = df[column].to_numpy().copy()
            ts[step % n] = bad
            df[column] = ts
        else:
            values = [np.array(v, np.float64) for v in df[column]]
            values[step % n][step % 7] = bad
            df[column] = values
    elif kind == "ragged":  # one step's vector a different width from the others
        if column == "timestamp":
            df[column] = [[0.1 * i] * (1 + (i == step % n)) for i in range(n)]
        else:
            values = [np.array(v) for v in df[column]]
            values[step % n] = np.zeros(8 + step, values[0].dtype)  # never the other steps' 7
            df[column] = values
    elif kind == "wide":  # wider than any robot (episode.MAX_WIDTH); zeros, so the parquet stays small
        df[column] = [np.zeros(MAX_WIDTH + 1, np.float32) for _ in range(n)]
    elif kind == "drop":
        df = df.drop(columns=[column])
    elif kind == "empty":
        df = df.iloc[:0]
    df.to_parquet(path, index=False)


@SETTINGS
@given(kind=st.sampled_from(["strings", "objects", "nonfinite", "ragged", "wide", "drop", "empty"]),
       column=st.sampled_from(COLUMNS), step=st.integers(0, 20), value=hostile_value)
def test_a_damaged_lerobot_parquet_fails_its_episode(lerobot_template, kind, column, step, value):
    root = _copy(lerobot_template)
    _damage_parquet(root, kind, column, step, value)
    rows = ingest(root)
    assert statuses(rows) == ["failed"], rows


@SETTINGS
@given(file=st.sampled_from([PARQUET, "meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl",
                             "videos/chunk-000/observation.images.front/episode_000000.mp4"]),
       fraction=st.floats(0, 0.99), garbage=st.binary(max_size=64), cut=st.booleans())
def test_a_truncated_or_garbage_lerobot_file_fails_its_episode(lerobot_template, file, fraction, garbage, cut):
    root = _copy(lerobot_template)
    if cut:
        truncate(root / file, fraction)
    else:
        (root / file).write_bytes(garbage)
    rows = ingest(root)
    # A tasks.jsonl cut after its one line, or an mp4 cut in its index, may still read: that is harmless.
    assert rows and all(r["status"] in ("failed", "accepted") for r in rows), rows


INFO_KEYS = ("fps", "chunks_size", "data_path", "video_path", "features", "codebase_version",
             "features.observation.state", "features.observation.state.shape", "features.observation.state.names",
             "features.observation.state.gr2_layout", "features.action.names", "features.observation.images.front",
             "features.observation.images.front.dtype", "features.observation.images.front.info",
             "camera_timestamps_path")


def _set_path(info: dict, dotted: str, value) -> None:
    """Set a key of info.json by a dotted path whose feature names themselves contain dots."""
    if dotted.startswith("features.") and dotted.count(".") > 1:
        rest = dotted[len("features."):]
        for name in sorted(info["features"], key=len, reverse=True):
            if rest == name:
                info["features"][name] = value
                return
            if rest.startswith(name + "."):
                info["features"][name][rest[len(name) + 1:]] = value
                return
    info[dotted] = value


@SETTINGS
@given(key=st.sampled_from(INFO_KEYS), value=hostile_value, remove=st.booleans())
def test_hostile_meta_info_values_fail_the_episode_or_are_harmless(lerobot_template, key, value, remove):
    root = _copy(lerobot_template)
    info = json.loads((root / "meta/info.json").read_text())
    if remove and "." not in key:
        info.pop(key, None)
    else:
        _set_path(info, key, value)
    (root / "meta/info.json").write_text(json.dumps(info))
    rows = ingest(root)
    assert rows and all(r["status"] in ("failed", "accepted") for r in rows), rows


@SETTINGS
@given(value=hostile_value, extra=st.booleans())
def test_hostile_episode_indices_fail_or_are_harmless(lerobot_template, value, extra):
    root = _copy(lerobot_template)
    lines = [{"episode_index": value, "length": HUGE}] + ([{"episode_index": 0, "length": 8}] if extra else [])
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = ingest(root)
    assert rows, rows


@pytest.fixture(scope="module")
def lerobot_v3_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lerobot3") / "ds"
    write_lerobot_v3(root, lengths=(5, 4))
    return root


V3_EPISODES = "meta/episodes/chunk-000/file-000.parquet"
V3_COLUMNS = ("episode_index", "data/chunk_index", "data/file_index", "tasks",
              "videos/observation.images.top/from_timestamp", "videos/observation.images.top/to_timestamp",
              "videos/observation.images.top/file_index")


@SETTINGS
@given(column=st.sampled_from(V3_COLUMNS), value=st.one_of(st.just(np.nan), st.just(np.inf), st.just(-1.0),
                                                          st.just(float(HUGE)), st.just("abc"), st.none()),
       cut=st.booleans(), fraction=st.floats(0, 0.99))
def test_hostile_lerobot_v3_episode_index_fails_or_is_harmless(lerobot_v3_template, column, value, cut, fraction):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _copy(lerobot_v3_template)
    path = root / V3_EPISODES
    if cut:
        truncate(path, fraction)
    else:
        table = pq.read_table(path)
        i = table.column_names.index(column)
        table = table.set_column(i, column, pa.array([value] * len(table)))
        pq.write_table(table, path)
    rows = ingest(root)
    # A camera window shifted off its steps is a gate's business: rejected, flagged_fraction and its score.
    assert rows and all(r["status"] in ("failed", "rejected", "accepted") for r in rows), rows


# -- HDF5: robomimic and ALOHA ------------------------------------------------------------------------


def write_robomimic(path: Path, n: int = 6) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_kwargs": {"control_freq": 20}})
        g = data.create_group("demo_0")
        g["actions"] = np.random.default_rng(0).normal(size=(n, 7))
        g["obs/agentview_image"] = frames(n, 0, size=16)
        g["obs/robot0_eef_pos"] = np.cumsum(np.full((n, 3), 0.01), axis=0)
        g["obs/robot0_eef_quat"] = np.tile([0, 0, 0, 1.0], (n, 1))
        g["obs/robot0_gripper_qpos"] = np.zeros((n, 2))


def write_aloha(path: Path, n: int = 6) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["compress"] = False
        f["action"] = np.zeros((n, 14))
        f["observations/qpos"] = np.arange(n * 14, dtype=float).reshape(n, 14)
        f["observations/images/cam_high"] = frames(n, 3, size=16)


ROBOMIMIC_KEYS = ("data/demo_0/actions", "data/demo_0/obs/robot0_eef_pos", "data/demo_0/obs/robot0_eef_quat",
                  "data/demo_0/obs/robot0_gripper_qpos", "data/demo_0/obs/agentview_image")
ALOHA_KEYS = ("action", "observations/qpos", "observations/images/cam_high")


def _damage_hdf5(path: Path, key: str, kind: str, step: int) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        old = np.asarray(f[key])
        n = len(old)
        del f[key]
        if kind == "strings":
            f[key] = np.array([[b"abc"] * max(1, old.shape[-1])] * n)
        elif kind == "compound":
            f[key] = np.zeros(n, dtype=[("a", "f4"), ("b", "i4")])
        elif kind == "scalar":
            f[key] = 3.0
        elif kind == "nonfinite":
            bad = old.astype(np.float64)
            bad.reshape(n, -1)[step % n, 0] = [np.nan, np.inf, -np.inf][step % 3]
            f[key] = bad
        elif kind == "shorter":  # two or more steps short: one short is an action between each pair of states
            f[key] = old[: max(0, n - 2 - step % n)]
        elif kind == "longer":
            f[key] = np.concatenate([old] * 3)
        elif kind == "absurd_steps":  # claims a billion steps; chunked and never written, so the file stays tiny
            f.create_dataset(key, shape=(HUGE,) + old.shape[1:], dtype=old.dtype, chunks=(64,) + old.shape[1:])
        elif kind == "absurd_width":
            f.create_dataset(key, shape=(n, HUGE), dtype="f8", chunks=(1, 1024))
        elif kind == "missing":
            pass


@SETTINGS
@given(layout=st.sampled_from(["robomimic", "aloha"]), data=st.data(),
       kind=st.sampled_from(["strings", "compound", "scalar", "nonfinite", "shorter", "longer", "absurd_steps",
                             "absurd_width", "missing"]), step=st.integers(0, 10))
def test_a_damaged_hdf5_dataset_fails_its_episode(layout, data, kind, step):
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        path = Path(tmp) / "episode.hdf5"
        (write_robomimic if layout == "robomimic" else write_aloha)(path)
        key = data.draw(st.sampled_from(ROBOMIMIC_KEYS if layout == "robomimic" else ALOHA_KEYS))
        _damage_hdf5(path, key, kind, step)
        rows = ingest(path)
        assert rows and all(r["status"] in ("failed", "rejected", "accepted") for r in rows), rows
        # Harmless by design: a camera with fewer frames than steps is flagged at alignment; a missing camera
        # is not promised (cameras are found in the file); a robomimic state is built from the low-dim keys present.
        camera, low_dim = key.endswith(("_image", "cam_high")), "/obs/" in key and not key.endswith("_image")
        if not ((camera and kind in ("shorter", "missing")) or (low_dim and kind == "missing")):
            assert statuses(rows) == ["failed"] * len(rows), rows


@SETTINGS
@given(layout=st.sampled_from(["robomimic", "aloha"]), fraction=st.floats(0, 0.99), garbage=st.binary(max_size=64),
       cut=st.booleans(), attr=st.sampled_from(["fps", "compress", "instruction", "env_args"]), value=hostile_value)
def test_a_truncated_garbage_or_odd_attribute_hdf5_file_fails_or_is_harmless(layout, fraction, garbage, cut, attr, value):
    import h5py

    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        path = Path(tmp) / "episode.hdf5"
        (write_robomimic if layout == "robomimic" else write_aloha)(path)
        if value is not None and not isinstance(value, dict):
            with h5py.File(path, "a") as f:
                node = f["data"] if layout == "robomimic" else f
                # HDF5 strings cannot hold NUL: a file could not carry it either
                value = value.replace("\x00", "") if isinstance(value, str) else value
                node.attrs[attr] = np.asarray(value) if isinstance(value, list) else value
        if cut:
            truncate(path, fraction)
        elif garbage:
            path.write_bytes(garbage)
        rows = ingest(path)
        assert rows, rows


# -- CALVIN: one npz per step ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def calvin_template(tmp_path_factory) -> Path:
    return write_calvin(tmp_path_factory.mktemp("calvin") / "validation")


def _npz_with_header(path: Path, key: str, shape: tuple, arrays: dict) -> None:
    """An npz whose `key` member's .npy header claims `shape` but holds a few bytes of data."""
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            if k == key:
                header = {"descr": "<f8", "fortran_order": False, "shape": shape}
                text = repr(header).encode()
                text += b" " * (-(len(text) + 11) % 64) + b"\n"
                z.writestr(f"{k}.npy", b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 64)
            else:
                with z.open(f"{k}.npy", "w") as out:
                    np.lib.format.write_array(out, np.asarray(v))


@FEW_SETTINGS
@given(step=st.integers(100, 111), key=st.sampled_from(["actions", "rel_actions", "robot_obs", "rgb_static"]),
       kind=st.sampled_from(["strings", "objects", "nonfinite", "short", "missing", "truncated", "garbage",
                             "absurd_steps", "absurd_width", "scalar"]),
       fraction=st.floats(0, 0.99))
def test_a_damaged_calvin_step_fails_its_episode(calvin_template, step, key, kind, fraction):
    root = _copy(calvin_template)
    path = root / f"episode_{step:07d}.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if kind == "truncated":
        truncate(path, fraction)
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(range(60)))
    elif kind in ("absurd_steps", "absurd_width"):
        _npz_with_header(path, key, (HUGE, 15) if kind == "absurd_steps" else (HUGE,), arrays)
    else:
        if kind == "strings":
            arrays[key] = np.array(["abc"] * arrays[key].size).reshape(arrays[key].shape)
        elif kind == "objects":
            arrays[key] = np.array([{"a": 1}, None], dtype=object)
        elif kind == "nonfinite":
            # the last value: CALVIN reads only the gripper (index 6) of the absolute `actions`
            arrays[key] = arrays[key].astype(np.float64)
            arrays[key].reshape(-1)[-1] = np.nan
        elif kind == "short":
            arrays[key] = arrays[key].reshape(-1)[:3]
        elif kind == "missing":
            del arrays[key]
        elif kind == "scalar":
            arrays[key] = np.float64(1.0)
        np.savez(path, **arrays)
    rows = ingest(root)
    assert len(rows) == 2, rows
    # Step 100-111 lies in the first annotated window only: the second episode is untouched.
    assert rows[1]["status"] == "accepted", rows[1]
    assert rows[0]["status"] == "failed", rows[0]


@FEW_SETTINGS
@given(file=st.sampled_from(["ep_start_end_ids.npy", "lang_annotations/auto_lang_ann.npy"]),
       kind=st.sampled_from(["truncated", "garbage", "strings", "absurd_range", "reversed", "flat", "bad_dict"]),
       fraction=st.floats(0, 0.99))
def test_hostile_calvin_indices_and_annotations_fail_or_are_harmless(calvin_template, file, kind, fraction):
    root = _copy(calvin_template)
    path = root / file
    annotated = file.startswith("lang")
    if kind == "truncated":
        truncate(path, fraction)
    elif kind == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" + bytes(range(40)))
    elif kind == "strings":
        np.save(path, np.array([["a", "b"]]))
    elif kind in ("absurd_range", "reversed"):
        span = (100, HUGE) if kind == "absurd_range" else (129, 100)
        if annotated:
            np.save(path, {"info": {"indx": [span]}, "language": {"ann": ["x"], "task": ["x"]}})
        else:
            np.save(path, np.array([span]))
    elif kind == "flat":
        np.save(path, np.array([100, 129]))
    elif kind == "bad_dict":
        np.save(path, {"info": {"indx": [(1, 2, 3)]}, "language": {}} if annotated else np.array([[1.5, np.nan]]))
    rows = ingest(root)
    assert rows and all(r["status"] in ("failed", "accepted") for r in rows), rows
    if kind in ("absurd_range", "reversed") and (annotated or not (root / "lang_annotations").exists()):
        assert statuses(rows) == ["failed"], rows



# -- annotated JSON: one annotation per episode, beside its videos ----------------------------------

SAMPLES = Path(__file__).parent / "data" / "robot"
ANNOTATION = "annotation/val/6.json"
ANNOTATION_KEYS = ("state", "action", "texts", "videos", "continuous_gripper_state", "episode_id")


@FEW_SETTINGS
@given(key=st.sampled_from(ANNOTATION_KEYS), value=hostile_value,
       kind=st.sampled_from(["value", "missing", "nonfinite", "shorter", "document", "truncated"]),
       fraction=st.floats(0, 0.99))
def test_a_damaged_annotation_fails_its_episode_or_is_harmless(key, value, kind, fraction):
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        root = Path(shutil.copytree(SAMPLES / "rt1", Path(tmp) / "rt1"))
        path = root / ANNOTATION
        ann = json.loads(path.read_text())
        if kind == "value":
            ann[key] = value
        elif kind == "missing":
            ann.pop(key)
        elif kind == "nonfinite" and key in ("state", "action"):
            ann[key][3][0] = float("nan")  # json.dumps writes NaN, which Python's json reads back
        elif kind == "shorter" and isinstance(ann[key], list):
            ann[key] = ann[key][: len(ann[key]) // 2]
        elif kind == "document":
            ann = value
        path.write_text(json.dumps(ann))
        if kind == "truncated":
            truncate(path, fraction)
        rows = ingest(root)
        assert rows and all(r["status"] in ("failed", "accepted") for r in rows), rows
        if kind in ("nonfinite", "truncated", "document") and key in ("state", "action"):
            assert statuses(rows) == ["failed"], rows
