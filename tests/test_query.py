"""Finding clips: text and --like search, filters, SQL, indexes, the CLI and the HTML gallery."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from gr2.lake import gallery, index
from gr2.lake import query as query_module
from gr2.lake.lake import Lake
from gr2.lake.query import QueryError, plan_search, query, sql

DIM = 512
DATASETS = ("ego4d", "howto100m", "sthv2")
TEXT = "a hand opens a drawer"


def has_vector_index(lake: Lake) -> bool:
    return index.VECTOR_INDEX in {i.name for i in lake.dataset("clips").describe_indices()}


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def jpeg(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def clip_rows(vectors: np.ndarray, seed: int = 0, **fixed) -> pa.Table:
    """Synthetic clips rows with realistic columns around `vectors`."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    data = {
        "clip_id": [f"clip{seed}-{i:05d}" for i in range(n)],
        "video_id": [f"video{seed}-{i // 4:05d}" for i in range(n)],
        "uri": [f"/videos/{i // 4}.mp4" for i in range(n)],
        "start_s": (np.arange(n) % 4 * 2.0).tolist(),
        "end_s": (np.arange(n) % 4 * 2.0 + 2.0).tolist(),
        "duration_s": rng.uniform(0.5, 4.0, n).round(2).tolist(),
        "status": rng.choice(["accepted"] * 8 + ["rejected", "failed"], n).tolist(),
        "dataset": rng.choice(DATASETS, n).tolist(),
        "caption": [f"caption {i}" for i in range(n)],
        "caption_source": ["source"] * n,
        "text_score": rng.uniform(0.1, 0.4, n).astype(np.float32).tolist(),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(unit(vectors).ravel()), DIM),
        "clip_model": ["ViT-B-32"] * n,
        "clip_pretrained": ["none"] * n,
        "build_id": ["build-test"] * n,
    }
    data.update({k: v if isinstance(v, list) else [v] * n for k, v in fixed.items()})
    return pa.table(data)


@pytest.fixture(scope="module")
def embedder():
    from gr2.video.embed import ClipEmbedder

    return ClipEmbedder("ViT-B-32", "none")


@pytest.fixture(scope="module")
def lake(tmp_path_factory, embedder) -> Lake:
    """400 synthetic clips, one of which has exactly the embedding of TEXT."""
    lake = Lake(str(tmp_path_factory.mktemp("qlake") / "lake"))
    vectors = np.random.default_rng(0).standard_normal((400, DIM))
    vectors[7] = embedder.embed_text([TEXT])[0]
    rows = clip_rows(vectors)
    status = rows["status"].to_pylist()
    status[7] = status[8] = "accepted"
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(status))
    lake.commit("clips", rows)
    return lake


def test_text_query_finds_the_clip_whose_embedding_is_the_text(lake, embedder):
    hits = query(lake, text=TEXT, k=5, embedder=embedder)
    assert hits["clip_id"][0].as_py() == "clip0-00007"
    assert hits["score"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    assert hits.column_names[:3] == ["clip_id", "score", "caption"]
    scores = hits["score"].to_pylist()
    assert scores == sorted(scores, reverse=True) and len(hits) == 5
    assert hits.to_pandas().shape == (5, len(hits.column_names))


def test_text_query_loads_the_model_the_lake_records(lake):
    # ViT-B-32 random-init (seeded) is rebuilt from what the rows say.
    from gr2.video.embed import embedder_for

    assert query(lake, text=TEXT, k=1, embedder=embedder_for(lake))["clip_id"][0].as_py() == "clip0-00007"


def test_text_query_without_an_embedder_says_how_to_get_one(lake):
    with pytest.raises(QueryError, match="embedder_for"):
        query(lake, text=TEXT, k=1)


def test_like_returns_the_clip_itself_first(lake):
    hits = query(lake, like="clip0-00008", k=3)
    assert hits["clip_id"][0].as_py() == "clip0-00008"
    assert hits["score"][0].as_py() == pytest.approx(1.0, abs=1e-4)
    assert hits["score"][1].as_py() < 0.5  # random 512-d vectors are near-orthogonal


def test_where_filters_the_hits_and_k_limits_them(lake):
    hits = query(lake, like="clip0-00008", where="duration_s > 2 AND dataset = 'ego4d'", k=7,
                 columns=["duration_s", "dataset", "status"])
    assert len(hits) == 7
    assert all(d > 2 for d in hits["duration_s"].to_pylist())
    assert set(hits["dataset"].to_pylist()) == {"ego4d"} and set(hits["status"].to_pylist()) == {"accepted"}


def test_filter_only_query_returns_matching_rows_without_scores(lake):
    hits = query(lake, where="dataset = 'sthv2'", k=1000, status=None)
    expected = sql(lake, "select count(*) as n from clips where dataset = 'sthv2'")["n"][0].as_py()
    assert len(hits) == expected > 0
    assert hits["score"].null_count == len(hits)


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "   "}, "empty query"),
    ({}, "empty query"),
    ({"like": "clip0-00008", "where": "duration_s >"}, "does not parse"),
    ({"like": "clip0-00008", "where": "colour = 'red'"}, "unknown column 'colour'"),
    ({"like": "clip0-00008", "columns": ["colour"]}, "unknown column 'colour'"),
    ({"like": "no-such-clip"}, "no clip 'no-such-clip'"),
])
def test_bad_queries_are_one_line_errors(lake, kwargs, message):
    with pytest.raises(QueryError) as e:
        query(lake, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_lake_is_a_query_error(tmp_path):
    with pytest.raises(QueryError, match="no lake at"):
        query(str(tmp_path / "nowhere"), like="clip0-00001")


def test_sql_runs_duckdb_over_the_lake_tables(lake):
    counts = sql(lake, "select status, count(*) as n from clips group by status order by status")
    assert sum(counts["n"].to_pylist()) == 400
    with pytest.raises(QueryError, match="colour"):
        sql(lake, "select colour from clips")


def clustered(n: int, seed: int) -> np.ndarray:
    """Embeddings in 20 clusters, the way clips of one scene sit close together."""
    rng = np.random.default_rng(seed)
    centres = unit(np.random.default_rng(1).standard_normal((20, DIM)))
    return unit(centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, DIM)) / np.sqrt(DIM) * 4)


def recall(lake: Lake, probes: list[str], k: int = 10, **kw) -> float:
    """Mean overlap of the planned top k with exact search's, over `--like` queries for `probes`."""
    found = []
    for probe in probes:
        planned = query(lake, like=probe, k=k, **kw)["clip_id"].to_pylist()
        exact = query(lake, like=probe, k=k, exact=True, **kw)["clip_id"].to_pylist()
        assert len(planned) == len(exact) == k
        found.append(len(set(planned) & set(exact)) / k)
    return float(np.mean(found))


def plan_of(hits: pa.Table) -> dict:
    return json.loads(hits.schema.metadata[b"gr2.plan"])


@pytest.fixture(scope="module")
def indexed_lake(tmp_path_factory) -> Lake:
    """3,000 clustered clips with a vector index (min_rows lowered so a small table gets one)."""
    lake = Lake(str(tmp_path_factory.mktemp("indexed") / "lake"))
    lake.commit("clips", clip_rows(clustered(3000, seed=0), status="accepted"))
    report = index.build_indexes(lake, min_rows=1000)
    assert report["vector"].startswith("IVF_RQ trained on 3000")
    assert "clip_id_idx" in {i.name for i in lake.dataset("clips").describe_indices()}  # made with the table
    assert has_vector_index(lake)
    return lake


def test_index_gives_the_same_top_hit_as_exact_search(indexed_lake):
    probes = [f"clip0-{i:05d}" for i in np.random.default_rng(1).choice(3000, 15, replace=False)]
    for probe in probes:
        assert query(indexed_lake, like=probe, k=10)["clip_id"][0].as_py() == probe
    assert recall(indexed_lake, probes) >= 0.9


def test_planner_searches_a_selective_filter_exactly_and_a_broad_one_through_the_index(indexed_lake, monkeypatch):
    # The exact/index boundary is lowered to this small table's scale; the counts are Lance's own.
    monkeypatch.setattr(query_module, "EXACT_MAX_ROWS", 500)
    ds = indexed_lake.dataset("clips")
    selective = "dataset = 'ego4d' AND duration_s > 3.5"  # ~4% of rows
    broad = "duration_s > 1"  # ~85%
    assert ds.count_rows(filter=selective) <= 500 < ds.count_rows(filter=broad)

    small = plan_search(ds, selective, k=10)
    assert small.method == "exact" and small.matched_rows == ds.count_rows(filter=selective)
    wide = plan_search(ds, broad, k=10)
    assert wide.method == "index" and wide.matched_rows == ds.count_rows(filter=broad)
    # A narrower filter through the index probes more partitions than an unfiltered query does.
    middle = plan_search(ds, "dataset = 'ego4d'", k=10)
    assert middle.method == "index" and middle.nprobes > plan_search(ds, None, k=10).nprobes

    probes = [f"clip0-{i:05d}" for i in range(0, 3000, 200)]
    for where in (selective, broad, "dataset = 'ego4d'"):
        hits = query(indexed_lake, like=probes[0], where=where, k=10, columns=["duration_s", "dataset"])
        assert len(hits) == 10 and plan_of(hits)["method"] == plan_search(ds, where, k=10).method
        assert recall(indexed_lake, probes, where=where) >= 0.9


def test_small_filters_return_every_matching_row_even_below_k(indexed_lake, monkeypatch):
    where = "dataset = 'sthv2' AND duration_s > 3.8"
    matching = indexed_lake.dataset("clips").count_rows(filter=where)
    hits = query(indexed_lake, like="clip0-00001", where=where, k=matching + 50)
    assert 10 < len(hits) == matching and plan_of(hits)["method"] == "exact"
    # Sent through the index with one probe, the filter's rows in that partition are too few: the
    # query notices and searches the filter's rows exactly instead of returning short.
    monkeypatch.setattr(query_module, "EXACT_MAX_ROWS", 0)
    hits = query(indexed_lake, like="clip0-00001", where=where, k=10, nprobes=1)
    exact = query(indexed_lake, like="clip0-00001", where=where, k=10, exact=True)
    assert hits["clip_id"].to_pylist() == exact["clip_id"].to_pylist()
    assert plan_of(hits)["method"] == "exact" and "the index found" in plan_of(hits)["reason"]


def test_appended_rows_are_found_before_and_after_the_index_catches_up(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.commit("clips", clip_rows(clustered(3000, seed=0), status="accepted"))
    index.build_indexes(lake, min_rows=1000)
    # A later build adds 10% more rows: searchable at once (Lance scans unindexed fragments beside
    # the index), then folded into the index without retraining it.
    lake.commit("clips", clip_rows(clustered(300, seed=5), seed=5, status="accepted"))
    probes = [f"clip5-{i:05d}" for i in range(0, 300, 20)] + [f"clip0-{i:05d}" for i in range(0, 3000, 200)]
    assert query(lake, like="clip5-00007", k=1)["clip_id"][0].as_py() == "clip5-00007"
    assert recall(lake, probes) >= 0.9
    assert index.build_indexes(lake, min_rows=1000)["vector"].startswith("IVF_RQ updated")
    stats = index.vector_index_of(lake.dataset("clips"))
    assert stats["indexed_rows"] == 3300 and stats["unindexed_rows"] == 0
    assert query(lake, like="clip5-00007", k=1)["clip_id"][0].as_py() == "clip5-00007"
    assert recall(lake, probes) >= 0.9


def test_a_repeated_text_query_pays_the_encoder_once_per_model(lake, embedder, monkeypatch):
    from gr2.video.embed import ClipEmbedder

    cache = query_module.TextVectorCache(size=2)
    monkeypatch.setattr(query_module, "TEXT_VECTORS", cache)
    calls = []

    class Counting:
        """The real embedder, counting its encoder calls."""

        def __init__(self, inner):
            self.inner, self.model_name, self.weights = inner, inner.model_name, inner.weights

        def embed_text(self, texts):
            calls.append(list(texts))
            return self.inner.embed_text(texts)

    first = query(lake, text=TEXT, k=3, embedder=Counting(embedder))
    # A new embedder object for the same model (as embedder_for makes each call) still hits the cache.
    again = query(lake, text=TEXT, k=3, embedder=Counting(ClipEmbedder("ViT-B-32", "none")))
    assert calls == [[TEXT]] and (cache.hits, cache.misses) == (1, 1)
    assert again["clip_id"].to_pylist() == first["clip_id"].to_pylist()
    assert first["clip_id"][0].as_py() == "clip0-00007"

    other = Counting(embedder)
    other.model_name = "ViT-B-16"  # another model's text embedding is its own entry
    query(lake, text=TEXT, k=3, embedder=other)
    assert len(calls) == 2
    # Least recently used go first: two newer texts push the first one out.
    for text in ("a cup", "a door"):
        query(lake, text=text, k=1, embedder=Counting(embedder))
    query(lake, text=TEXT, k=1, embedder=Counting(embedder))
    assert calls[-1] == [TEXT] and len(calls) == 5


def test_small_tables_stay_on_exact_search(lake):
    report = index.build_indexes(lake)
    assert report["vector"].startswith("exact search (400 rows")
    assert not has_vector_index(lake)


# -- the command line ---------------------------------------------------------------------------


def gr2(*argv: str, capsys) -> tuple[int, str, str]:
    """Run `gr2 argv` in-process through the real CLI boundary."""
    from gr2.flows import cli

    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_lists_hits_with_clip_id_score_and_caption(lake, capsys):
    code, out, _ = gr2("query", "--lake", lake.root, "--like", "clip0-00008", "--k", "3", "--format", "json",
                       "--columns", "caption,duration_s", capsys=capsys)
    hits = json.loads(out)
    assert code == 0 and len(hits) == 3
    assert set(hits[0]) == {"clip_id", "score", "caption", "duration_s"} and hits[0]["clip_id"] == "clip0-00008"


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "empty query"),
    (["--like", "clip0-00008", "--where", "duration_s >>> 2"], "does not parse"),
    (["--like", "clip0-00008", "--where", "colour = 1"], "unknown column"),
    (["--like", "missing-id"], "no clip 'missing-id'"),
])
def test_cli_bad_input_is_one_line_and_non_zero(lake, capsys, args, message):
    code, out, err = gr2("query", "--lake", lake.root, *args, capsys=capsys)
    assert code != 0 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_lake_and_bad_sql(tmp_path, lake, capsys):
    code, _, err = gr2("query", "--lake", str(tmp_path / "none"), "--text", "x", capsys=capsys)
    assert code != 0 and "no lake at" in err and len(err.strip().splitlines()) == 1
    code, out, err = gr2("sql", "--lake", lake.root, "select dataset, count(*) as n from clips group by 1",
                         "--format", "json", capsys=capsys)
    assert code == 0 and sum(r["n"] for r in json.loads(out)) == 400
    code, _, err = gr2("sql", "--lake", lake.root, "selec 1", capsys=capsys)
    assert code != 0 and "syntax error" in err and len(err.strip().splitlines()) == 1


# -- the gallery --------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}


def colour_clip(colour: tuple[int, int, int]) -> np.ndarray:
    """8 frames of one colour with a moving white bar (so the preview animates)."""
    frames = np.empty((8, 64, 64, 3), np.uint8)
    frames[:] = colour
    for t in range(8):
        frames[t, :, t * 8:t * 8 + 4] = 255
    return frames


def test_gallery_in_headless_chromium_shows_every_hit(tmp_path):
    names = list(COLOURS)
    batch = {"clip_id": np.array(names, dtype=object), "status": np.array(["accepted"] * 3, dtype=object),
             "duration_s": np.array([2.0] * 3), "frames": np.stack([colour_clip(COLOURS[n]) for n in names])}
    previews = gallery.previews(batch)["preview"]
    assert Image.open(io.BytesIO(previews[0])).n_frames == 8
    hits = pa.table({
        "clip_id": names, "score": [0.9, 0.8, 0.7], "caption": [f"a {n} clip" for n in names],
        "caption_source": ["source", "coca", "none"], "text_score": [0.31, 0.22, None],
        "duration_s": [2.0] * 3, "start_s": [0.0, 2.0, 4.0], "end_s": [2.0, 4.0, 6.0],
        "uri": ["/videos/a.mp4"] * 3, "dataset": ["sthv2"] * 3,
        "thumbnail": [jpeg(COLOURS[n]) for n in names], "preview": list(previews),
    })
    page = gallery.write(hits, str(tmp_path / "gallery.html"), "gr2 query", f"“{TEXT}”")
    html_text = open(page).read()
    assert "http" not in html_text.replace("http-equiv", "")  # self-contained: nothing fetched
    assert html_text.count("data:image/webp;base64,") == 3 and "#t=2.00,4.00" in html_text

    shot = tmp_path / "gallery.png"
    subprocess.run([
        "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars", "--window-size=900,600", f"--screenshot={shot}", f"file://{page}",
    ], check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for name, colour in COLOURS.items():
        close = (np.abs(pixels - np.array(colour)).sum(axis=-1) < 60).sum()
        assert close > 5000, f"the {name} hit's preview is not on the page ({close} pixels)"


def test_cli_html_gallery_of_a_query(lake, tmp_path, capsys):
    out = tmp_path / "hits.html"
    code, stdout, _ = gr2("query", "--lake", lake.root, "--like", "clip0-00008", "--k", "4", "--format", "html",
                          "--out", str(out), capsys=capsys)
    assert code == 0 and "wrote 4 hits" in stdout
    assert out.read_text().count('class="hit"') == 4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# -- a real build, then queries over it ---------------------------------------------------------


def test_a_real_build_embeds_captions_dedups_and_can_be_queried(ray_local, sthv2_dir, tmp_path, capsys):
    from conftest import ffmpeg_encode

    from gr2.video.build import run_build
    from gr2.video.config import BuildConfig

    copy = ffmpeg_encode(tmp_path / "push_again.mp4", "-i", str(sthv2_dir / "1113.webm"), "-vf", "scale=-2:160",
                         "-c:v", "libx264", "-crf", "28", "-pix_fmt", "yuv420p")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"uri": str(sthv2_dir / name), "caption": caption}) + "\n" for name, caption in
                                [("1113.webm", "pushing box from left to right"), ("1870.webm", "uncovering tweezers")]))
    lake = Lake(str(tmp_path / "lake"))
    # The default models (random-init CoCa and CLIP), short captions, a tight near-duplicate distance.
    config = BuildConfig(frame_size=128, frames_per_clip=6, caption_max_tokens=4, dedup_max_distance=0.005)
    run_build([str(manifest), str(copy)], lake, config, log=lambda *_: None)
    clips = lake.read("clips").to_pylist()
    by_video: dict[str, list[dict]] = {}
    for c in clips:
        by_video.setdefault(c["uri"].rsplit("/", 1)[-1], []).append(c)

    # Every clip was embedded by the recorded random-init model; manifest captions won.
    assert all(c["clip_model"] == "ViT-B-32" and c["clip_pretrained"] == "none" for c in clips)
    assert all(len(c["embedding"]) == 512 for c in clips if c["status"] != "failed")
    assert {c["caption_source"] for c in by_video["1870.webm"]} == {"source"}
    assert by_video["1870.webm"][0]["caption"] == "uncovering tweezers"
    # The copy came without a caption, and random-init CoCa's text is no caption: flagged uncaptioned.
    assert {c["caption_source"] for c in by_video["push_again.mp4"]} == {"none"}
    assert all(c["caption"] is None and c["caption_model"] is None for c in by_video["push_again.mp4"])
    assert all(c["text_score"] is not None for c in by_video["1870.webm"])
    # The re-encoded copy and its original: per span, one is the other's duplicate, by fingerprint
    # (random-init embeddings reject nothing).
    pairs = {}
    for c in by_video["1113.webm"] + by_video["push_again.mp4"]:
        pairs.setdefault((c["start_frame"], c["end_frame"]), []).append(c)
    assert pairs and all(len(p) == 2 for p in pairs.values())
    for a, b in pairs.values():
        dup, orig = (a, b) if a["status"] == "rejected" else (b, a)
        assert orig["status"] == "accepted" and dup["duplicate_of"] == orig["clip_id"], (a["reason"], b["reason"])
        assert dup["reason"].startswith(f"duplicate: of {orig['clip_id']} (fingerprint ")

    accepted = [c for c in clips if c["status"] == "accepted"]
    target = accepted[0]["clip_id"]
    code, out, _ = gr2("query", "--lake", lake.root, "--like", target, "--k", "3", "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["clip_id"] == target
    page = tmp_path / "real.html"
    code, _, _ = gr2("query", "--lake", lake.root, "--text", "pushing a box", "--format", "html", "--out", str(page),
                     capsys=capsys)
    assert code == 0 and page.read_text().count("data:image/webp;base64,") == min(20, len(accepted))


def test_read_only_sql_answers_from_the_tables_and_touches_no_file(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.commit("clips", clip_rows(unit(np.random.default_rng(0).standard_normal((5, DIM))), status="accepted"))
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    assert sql(lake, f"select count(*) n from read_csv('{secret}')").to_pylist() == [{"n": 1}]  # a local command may
    assert sql(lake, "select count(*) n from clips", read_only=True).to_pylist() == [{"n": 5}]
    with pytest.raises(QueryError, match="disabled"):
        sql(lake, f"select * from read_csv('{secret}')", read_only=True)
    with pytest.raises(QueryError, match="disabled"):
        sql(lake, f"copy clips to '{tmp_path / 'out.csv'}'", read_only=True)
    assert not (tmp_path / "out.csv").exists()
