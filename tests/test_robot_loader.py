"""StepsDataset: LeRobot-style items straight from the lake's steps, checked against the rows they
come from (delta windows, padding at the edges, tokens, frames, DataLoader workers) and against
what LeRobot itself reads from the lake's export."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from test_robot_export import lerobot_iterate, lerobot_python  # noqa: F401  (a fixture: LeRobot's own venv)
from test_robot_readers import write_lerobot_v2
from test_robot_tokens import checkpoint  # noqa: F401  (a fixture: a small random-init tokenizer)
from test_training_lakes import robot_lake

from gr2.lake.lake import Lake
from gr2.robot.episode import decode_jpeg
from gr2.robot.export import export_lerobot
from gr2.robot.ingest import IngestConfig, ingest
from gr2.robot.loader import LoaderError, StepsDataset

FPS = 20.0
FRONT = "observation.images.front"
WRIST = "observation.images.wrist"
FRONT_PAD = FRONT + "_is_pad"


@pytest.fixture(scope="module")
def lake(tmp_path_factory, ray_local, checkpoint) -> Lake:  # noqa: F811
    """A LeRobot v2.1 source at 20 Hz with two cameras, ingested with a tokenizer: episodes of 12
    and 10 steps are accepted, one of 3 is rejected (min_steps). The front camera is declared 100 ms
    late, so each episode's last two steps have no front frame: flagged views."""
    d = tmp_path_factory.mktemp("loader")
    write_lerobot_v2(d / "cups", lengths=(12, 10, 3), fps=FPS)
    the_lake = Lake(str(d / "lake"))
    config = IngestConfig(offsets_s={"front": 0.1}, tokenizer=checkpoint[0], min_steps=4)
    result = ingest([str(d / "cups")], the_lake, config)
    assert (result.funnel["accepted"], result.funnel["rejected"]) == (2, 1)
    return the_lake


def episode_steps(lake: Lake, episode_id: str) -> dict:
    return lake.read("steps", filter=pc.field("episode_id") == episode_id).sort_by("step").to_pydict()


def slot(lake: Lake, episode_id: str, camera: str) -> int:
    """Where `camera` sits in the episode's views."""
    return lake.read("episodes", filter=pc.field("episode_id") == episode_id).column("cameras")[0].as_py().index(camera)


def test_items_are_the_accepted_steps_rows_with_their_episode_and_task(lake):
    ds = StepsDataset(lake, serve="frames")
    assert len(ds) == 12 + 10 and ds.num_episodes == 2  # the rejected episode's steps are not served
    episodes = {r["episode_id"]: r for r in lake.read("episodes").to_pylist()}
    for index in (0, 5, 11, 12, 21):
        item = ds[index]
        e = int(item["episode_index"])
        row = episodes[ds.episode_ids[e]]
        steps = episode_steps(lake, row["episode_id"])
        t = int(item["frame_index"])
        assert row["status"] == "accepted" and int(item["index"]) == index
        np.testing.assert_array_equal(item["observation.state"].numpy(), np.float32(steps["state"][t]))
        if steps["action"][t] is not None:
            np.testing.assert_array_equal(item["action"].numpy(), np.float32(steps["action"][t]))
        assert item["timestamp"] == pytest.approx(steps["timestamp_s"][t] - steps["timestamp_s"][0], abs=1e-6)
        assert item["task"] == row["instruction"] == "stack the cups"
        np.testing.assert_array_equal(item["text_embedding"].numpy(), np.float32(row["instruction_embedding"]))
        assert item["gr2.view_ok"].tolist() == [v["ok"] for v in steps["views"][t]]


def test_delta_timestamps_in_seconds_return_the_neighbouring_steps(lake):
    ds = StepsDataset(lake, {"observation.state": [-0.1, -0.05, 0.0], "action": [0.0, 0.05, 0.1]}, serve="frames")
    item = ds[5]  # step 5 of the first episode: both windows inside it
    steps = episode_steps(lake, ds.episode_ids[0])
    np.testing.assert_array_equal(item["observation.state"].numpy(), np.float32(steps["state"][3:6]))
    np.testing.assert_array_equal(item["action"].numpy(), np.float32(steps["action"][5:8]))
    assert not item["observation.state_is_pad"].any() and not item["action_is_pad"].any()


def test_offsets_past_the_episode_edges_repeat_the_edge_step_and_are_padding(lake):
    ds = StepsDataset(lake, {"observation.state": [-0.1, -0.05, 0.0], "action": [0.0, 0.05, 0.1]}, serve="frames")
    steps = episode_steps(lake, ds.episode_ids[1])
    first, last = ds[12], ds[21]  # the second episode's first and last (10th) steps
    assert first["observation.state_is_pad"].tolist() == [True, True, False]
    np.testing.assert_array_equal(first["observation.state"].numpy(), np.float32([steps["state"][0]] * 3))
    # The last step's ee_delta action is null in the lake: zero motion, gripper held, and padding.
    assert steps["action"][9] is None
    assert last["action_is_pad"].tolist() == [True, True, True] and last["gr2.action_ok"].item() is False
    np.testing.assert_array_equal(last["action"][0, :6].numpy(), np.zeros(6, np.float32))
    np.testing.assert_array_equal(last["action"][0, 6:].numpy(), np.float32(steps["action"][8][6:]))
    assert torch.equal(last["action"][1], last["action"][0]) and torch.equal(last["action"][2], last["action"][0])
    assert ds[19]["action_is_pad"].tolist() == [False, False, True]  # step 7: steps 7 and 8 real, step 9 null


def test_tokens_are_the_stored_grids_and_flagged_views_borrow_the_nearest_good_one(lake):
    ds = StepsDataset(lake, {FRONT: [-0.05, 0.0]}, serve="tokens")
    steps = episode_steps(lake, ds.episode_ids[0])
    front, wrist = (slot(lake, ds.episode_ids[0], c) for c in ("front", "wrist"))
    item = ds[6]
    for k, t in enumerate((5, 6)):
        view = steps["views"][t][front]
        assert item[FRONT][k].dtype == torch.int64
        np.testing.assert_array_equal(item[FRONT][k].numpy(), np.asarray(view["tokens"]).reshape(view["token_shape"]))
    wrist_view = steps["views"][6][wrist]
    np.testing.assert_array_equal(item[WRIST].numpy(), np.asarray(wrist_view["tokens"]).reshape(wrist_view["token_shape"]))
    # The last two front views are flagged (no frame within tolerance): step 9's grid stands in, as padding.
    assert [v[front]["ok"] for v in steps["views"][9:]] == [True, False, False]
    end = ds[11]
    assert end[FRONT_PAD].tolist() == [True, True] and end["gr2.view_ok"].tolist() == [False, True]
    np.testing.assert_array_equal(end[FRONT][1].numpy(), np.asarray(steps["views"][9][front]["tokens"]).reshape(4, 4))


def test_frames_are_the_stored_jpegs_decoded_to_float_chw(lake):
    ds = StepsDataset(lake, {WRIST: [-0.05, 0.0]}, serve="frames")
    steps = episode_steps(lake, ds.episode_ids[1])
    wrist = slot(lake, ds.episode_ids[1], "wrist")
    item = ds[12 + 4]
    frames = item[WRIST]
    assert frames.dtype == torch.float32 and tuple(frames.shape) == (2, 3, 32, 32)
    for k, t in enumerate((3, 4)):
        stored = decode_jpeg(steps["views"][t][wrist]["jpeg"])
        np.testing.assert_array_equal(np.round(frames[k].numpy().transpose(1, 2, 0) * 255).astype(np.uint8), stored)


def test_two_dataloader_workers_give_the_batches_one_process_gives(lake):
    ds = StepsDataset(lake, {FRONT: [-0.05, 0.0], "action": [0.0, 0.05]}, serve="tokens")
    batches = []
    for workers in (0, 2):
        batches.append(list(ds.loader(batch_size=8, num_workers=workers)))
    assert len(batches[0]) == len(batches[1]) == 3
    for one, two in zip(*batches):
        assert one.keys() == two.keys() and one["task"] == two["task"]
        for key in one:
            if key != "task":
                assert torch.equal(one[key], two[key]), key


def test_a_forked_dataloader_worker_is_refused_rather_than_left_to_hang_in_lance(lake):
    ds = StepsDataset(lake, serve="tokens")
    forked = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(LoaderError, match="forked DataLoader worker.*multiprocessing_context='forkserver'"):
        next(iter(forked))


def test_unknown_keys_and_cameras_are_refused_when_the_dataset_is_made(lake):
    with pytest.raises(LoaderError, match="'observation.images.top' is not served; known keys"):
        StepsDataset(lake, {"observation.images.top": [0.0]})
    with pytest.raises(LoaderError, match="has no camera 'top'"):
        StepsDataset(lake, cameras=("top",))
    with pytest.raises(LoaderError, match="serve must be one of tokens, frames"):
        StepsDataset(lake, serve="pixels")
    with pytest.raises(LoaderError, match="no accepted episodes"):
        StepsDataset(lake, where="episode_key = 'nothing'")


def test_an_offset_between_steps_names_the_episode_and_time_unless_tolerated(lake):
    with pytest.raises(LoaderError, match=r"episode \w+: action offset \+0.025 s .* beyond tolerance_s=0.0125"):
        StepsDataset(lake, {"action": [0.0, 0.025]}, serve="frames")
    ds = StepsDataset(lake, {"action": [0.0, 0.026]}, serve="frames", tolerance_s=0.025)
    steps = episode_steps(lake, ds.episode_ids[0])
    np.testing.assert_array_equal(ds[2]["action"][1].numpy(), np.float32(steps["action"][3]))  # 0.126 s: step 3


def test_a_lake_without_tokens_says_to_run_gr2_tokenize(tmp_path):
    plain = robot_lake(str(tmp_path / "lake"), episodes=2, length=4, tokenizer_id=None, instruction="")
    with pytest.raises(LoaderError, match="carry no VQ tokens .*run `gr2 tokenize` first"):
        StepsDataset(plain, serve="tokens")


@pytest.mark.slow
def test_lerobot_reading_the_lakes_export_gets_the_items_the_lake_serves(lake, lerobot_python, tmp_path):  # noqa: F811
    """The same request of LeRobot 0.4.4 over `gr2 export-lerobot`'s copy and of StepsDataset over the lake."""
    export_lerobot(lake, str(tmp_path / "export"))
    summary, got = lerobot_iterate(lerobot_python, tmp_path / "export", tmp_path)
    fps, camera = summary["fps"], summary["cameras"][0]  # lerobot_iterate's request: these offsets
    ds = StepsDataset(lake, {"action": [0.0, 1 / fps, 2 / fps], camera: [-1 / fps, 0.0]}, serve="frames")
    batch = next(iter(ds.loader(batch_size=len(ds))))
    assert summary["frames"] == len(ds) and summary["tasks"] == ["stack the cups"] * 2
    np.testing.assert_array_equal(batch["observation.state"].numpy(), got["state"])
    for key in ("episode_index", "frame_index"):
        np.testing.assert_array_equal(batch[key].numpy(), got[key])
    np.testing.assert_allclose(batch["timestamp"].numpy(), got["timestamp"], atol=1e-6)
    # Padding: LeRobot's (past the episode) and, beyond it, only the null action LeRobot is handed as a fill.
    ours, theirs = batch["action_is_pad"].numpy(), got["action_is_pad"]
    assert (ours | ~theirs).all()
    rows, k = np.nonzero(ours & ~theirs)
    last_step = {0: 11, 1: 9}  # the ee_delta episodes' last steps, whose action is null in the lake
    assert len(rows) and all(batch["frame_index"][i] + j == last_step[int(batch["episode_index"][i])]
                             for i, j in zip(rows, k))
    np.testing.assert_allclose(batch["action"].numpy()[~ours], got["action"][~ours], atol=1e-7)
    # The current frame: the lake's JPEG beside LeRobot's H.264 decode of it.
    ours_frames = np.round(batch[camera][:, -1].numpy().transpose(0, 2, 3, 1) * 255)
    assert np.abs(ours_frames - got[f"frame:{camera}"].astype(float)).mean(axis=(1, 2, 3)).max() < 8
