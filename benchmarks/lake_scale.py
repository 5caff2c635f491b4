"""The clips table at scale: commit and read-by-id latency at 10k, 100k and 1M rows, before and after
compaction, concurrent committers on one table, and what GR-2's 38M clips would cost on paper.

    .venv/bin/python benchmarks/lake_scale.py [--sizes 10000,100000,1000000] [--writers 1,2,4,8]

Rows are synthetic but shaped like the demo lake's: 32-hex clip ids, incompressible JPEG/WebP-sized
thumbnail and preview, two 512-d float32 embeddings, an 8x8x8 token grid. 10M rows are not written
(disk and time); their latency is a linear fit over the measured sizes, and the JSON says so.
Prints tables and writes benchmarks/results/lake_scale.json; absolute numbers are this machine's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gr2.lake import schema
from gr2.lake.lake import COMMIT_RETRIES, Lake, id_index

OUT = Path(__file__).parent / "results" / "lake_scale.json"
BUILD = Path(__file__).parent / "results" / "build_throughput.json"
BATCH = 256  # clips per commit while commits are quick: BuildConfig.commit_every
# Mean sizes in the demo lake's clips (real footage): JPEG thumbnail, animated WebP preview, 8x8x8 tokens.
THUMBNAIL_BYTES, PREVIEW_BYTES, TOKENS = 4000, 7200, 512
CLIPS_PER_VIDEO = 20
GR2_CLIPS = 38_000_000  # GR-2's pre-training clips (arXiv 2410.06158)


# -- synthetic clips ---------------------------------------------------------------------------------

def _hex_ids(prefix: str, numbers: range | np.ndarray, digest: int = 16) -> list[str]:
    """Content-hash-like ids: random order, like gr2's (a BTREE sees no helpful locality)."""
    return [hashlib.blake2b(f"{prefix}{i}".encode(), digest_size=digest).hexdigest() for i in numbers]


def _random_binary(rng: np.random.Generator, n: int, size: int, magic: bytes) -> pa.Array:
    """`n` incompressible blobs of about `size` bytes starting with `magic` (compressed images are noise to zstd)."""
    lengths = rng.integers(size // 2, size * 3 // 2, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(rng.bytes(int(offsets[-1])), np.uint8).copy()
    data[offsets[:-1, None] + np.arange(len(magic))] = np.frombuffer(magic, np.uint8)
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _vectors(rng: np.random.Generator, n: int, dim: int = schema.EMBEDDING_DIM) -> pa.Array:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)


def _lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    n, width = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * width + 1, width, dtype=np.int32)),
                                    pa.array(values.ravel(), type_))


def clips(numbers: np.ndarray, prefix: str = "c", seed: int = 0) -> pa.Table:
    """Clip rows numbered `numbers` (the same number and prefix give the same id and video) in the clips schema."""
    n = len(numbers)
    rng = np.random.default_rng([seed, int(numbers[0]) if n else 0])
    videos = _hex_ids("v", numbers // CLIPS_PER_VIDEO, digest=32)
    shot = (numbers % CLIPS_PER_VIDEO).astype(np.int32)
    start = shot.astype(np.int64) * 60
    rejected = rng.random(n) < 0.2
    sampled = start[:, None] + np.arange(0, 64, 8)
    cols = {
        "clip_id": _hex_ids(prefix, numbers),
        "video_id": videos,
        "uri": [f"s3://lake-sources/howto100m/{v[:2]}/{v}.mp4" for v in videos],
        "shot_index": shot, "start_frame": start, "end_frame": start + 60,
        "start_s": start / 30.0, "end_s": (start + 60) / 30.0, "duration_s": np.full(n, 2.0), "fps": np.full(n, 30.0),
        "status": np.where(rejected, "rejected", "accepted"),
        "reason": ["static: motion 0.31 < 0.5" if r else None for r in rejected],
        "black_score": rng.uniform(16, 200, n).astype(np.float32),
        "blank_score": rng.uniform(4, 80, n).astype(np.float32),
        "motion_score": rng.uniform(0, 30, n).astype(np.float32),
        "sampled_frames": _lists(sampled, pa.int64()),
        "fingerprint": _lists(rng.integers(0, 2**63, (n, 8), dtype=np.uint64), pa.uint64()),
        "thumbnail": _random_binary(rng, n, THUMBNAIL_BYTES, b"\xff\xd8\xff\xe0"),
        "caption": pa.array(["a person opens a drawer and takes out a spoon"] * n),
        "caption_source": pa.array(["source"] * n),
        "dataset": pa.array(["howto100m"] * n),
        "embedding": _vectors(rng, n),
        "clip_model": pa.array(["ViT-B-32"] * n), "clip_pretrained": pa.array(["laion2b_s34b_b79k"] * n),
        "text_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
        "caption_embedding": _vectors(rng, n),
        "text_model": pa.array(["ViT-B-32"] * n), "text_pretrained": pa.array(["laion2b_s34b_b79k"] * n),
        "preview": _random_binary(rng, n, PREVIEW_BYTES, b"RIFF"),
        "tokenizer_id": pa.array(["vq-3f9a1c"] * n),
        "tokens": _lists(rng.integers(0, 1024, (n, TOKENS), dtype=np.uint16), pa.uint16()),
        "token_shape": pa.FixedSizeListArray.from_arrays(pa.array(np.tile([8, 8, 8], n).astype(np.int32)), 3),
        "config_hash": pa.array(["5d1e2a"] * n), "build_id": pa.array(["bench"] * n),
    }
    return schema.conform("clips", pa.table(cols))


def write_table(lake: Lake, rows: int, chunk: int = 50_000) -> None:
    """`rows` clips written as one commit, id indexed: a table as a compacted lake holds it."""
    def batches():
        for a in range(0, rows, chunk):
            yield from clips(np.arange(a, min(rows, a + chunk))).to_batches()

    reader = pa.RecordBatchReader.from_batches(schema.CLIPS, batches())
    ds = lance.write_dataset(reader, lake.uri("clips"), schema=schema.CLIPS, mode="create")
    ds.create_scalar_index("clip_id", "BTREE", name=id_index("clips"))


# -- one table: commit and read latency ----------------------------------------------------------------

def indexed_commit(lake: Lake, data: pa.Table) -> int:
    """Lake.commit's merge, but through the id's BTREE index: what it costs with lance's bug fixed.

    Not safe under concurrent writers in pylance 14 (a racing merge of one new id inserts it twice)."""
    lake.exists("clips")  # the same opens Lake.commit makes, so only the merge differs
    data = schema.conform("clips", data)
    (lake._keyed("clips").merge_insert("clip_id").use_index(True).when_matched_update_all()
     .when_not_matched_insert_all().conflict_retries(COMMIT_RETRIES).execute(data))
    return lake.dataset("clips").version


def commit_latency(lake: Lake, first: int, n: int) -> tuple[dict, int]:
    """Median seconds of `n` commits of 256 new ids each way, interleaved (the machine is noisy); next free number."""
    times = {"unindexed": [], "indexed": []}
    for i in range(n + 1):  # the first of each is a warm-up
        for way, commit in (("unindexed", Lake.commit), ("indexed", indexed_commit)):
            batch = clips(np.arange(first, first + BATCH), seed=1)
            first += BATCH
            t0 = time.perf_counter()
            commit(lake, "clips", batch) if way == "unindexed" else commit(lake, batch)
            if i:
                times[way].append(time.perf_counter() - t0)
    return {way: statistics.median(t) for way, t in times.items()}, first


def read_latency(lake: Lake, rows: int, n: int, seed: int) -> float:
    """Median seconds of Lake.read of one clip by id (a random row of the indexed table)."""
    ids = _hex_ids("c", np.random.default_rng(seed).integers(0, rows, n + 1))
    times = []
    for i, clip_id in enumerate(ids):
        t0 = time.perf_counter()
        got = lake.read("clips", filter=f"clip_id = '{clip_id}'")
        if i:
            times.append(time.perf_counter() - t0)
        assert len(got) == 1 and got["clip_id"][0].as_py() == clip_id, clip_id
    return statistics.median(times)


def tree_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def one_size(rows: int, commits: int, reads: int, workdir: str) -> dict:
    lake = Lake(os.path.join(workdir, f"lake-{rows}"))
    t0 = time.perf_counter()
    write_table(lake, rows)
    written_s = time.perf_counter() - t0
    size = tree_bytes(lake.uri("clips"))  # the table and its id index, before commits leave versions behind
    commit_before, first = commit_latency(lake, rows, commits)
    read_before = read_latency(lake, rows, reads, seed=rows)
    fragments_before = len(lake.dataset("clips").get_fragments())
    t0 = time.perf_counter()
    report = lake.compact(("clips",))["clips"]
    compact_s = time.perf_counter() - t0
    assert "skipped" not in report, report
    commit_after, first = commit_latency(lake, first, commits)
    read_after = read_latency(lake, rows, reads, seed=rows + 1)
    ds = lake.dataset("clips")
    ids = ds.to_table(columns=["clip_id"])["clip_id"]
    assert len(ids) == first and pc.count_distinct(ids).as_py() == len(ids), "an id landed twice"
    shutil.rmtree(lake.root)
    return {
        "rows": rows, "write_s": written_s, "bytes_per_row": size / rows,
        "before_compaction": {"fragments": fragments_before, "commit_s": commit_before["unindexed"],
                              "indexed_commit_s": commit_before["indexed"], "read_by_id_s": read_before},
        "compaction": {"seconds": compact_s, "fragments_after": report["fragments_after"]},
        "after_compaction": {"fragments": report["fragments_after"], "commit_s": commit_after["unindexed"],
                             "indexed_commit_s": commit_after["indexed"], "read_by_id_s": read_after},
    }


def fit(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (intercept s, slope s per row) of latency against table rows."""
    slope, intercept = np.polyfit(np.array(rows, float), np.array(seconds, float), 1)
    return float(intercept), float(slope)


# -- concurrent committers -------------------------------------------------------------------------------

def _is_conflict(e: OSError) -> bool:
    """A merge another writer's commit got in before (with retries off pylance 14 says "Too many concurrent
    writers. Attempted 0 retries.")."""
    message = str(e).lower()
    return getattr(e, "retryable", False) or "conflict" in message or "concurrent writers" in message


def writer(root: str, w: int, writers: int, batches: int, counted: bool, start, out) -> None:
    """One committer process: `batches` batches of 256 rows, ~10% of each shared with every other writer."""
    lake = Lake(root)
    shared = BATCH // 10
    work = []
    for b in range(batches):
        own = clips(np.arange(b * BATCH, b * BATCH + BATCH - shared), prefix=f"w{w}-", seed=w)
        common = clips(np.arange(b * shared, (b + 1) * shared), prefix="shared-", seed=99)
        work.append(pa.concat_tables([own, common]))
    conflicts = 0
    start.wait()
    t0 = time.perf_counter()
    for batch in work:
        if not counted:
            lake.commit("clips", batch)
            continue
        # Benchmark-only: Lake.commit's merge with Lance's retries off, retried here so they can be counted.
        while True:
            try:
                (lake._keyed("clips").merge_insert("clip_id").use_index(False).when_matched_update_all()
                 .when_not_matched_insert_all().conflict_retries(0).execute(batch))
                break
            except OSError as e:
                if not _is_conflict(e):
                    raise
                conflicts += 1
    out.put({"writer": w, "seconds": time.perf_counter() - t0, "conflicts": conflicts})


def concurrent(root: str, base_rows: int, writers: int, batches: int, counted: bool) -> dict:
    """`writers` spawned processes (Lance is not fork-safe) committing into `root`'s table at once."""
    lake = Lake(root)
    base = lake.dataset("clips").version
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(root, w, writers, batches, counted, start, out)) for w in range(writers)]
    for p in procs:
        p.start()
    start.wait()  # every writer has its rows ready: only commits are timed
    t0 = time.perf_counter()
    results = []
    while len(results) < writers:
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a writer failed (exit codes {dead})"
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"writer exited {p.exitcode}"
    ids = lake.read("clips", columns=["clip_id"])["clip_id"]
    shared = BATCH // 10
    expected = base_rows + writers * batches * (BATCH - shared) + batches * shared
    assert len(ids) == expected and pc.count_distinct(ids).as_py() == expected, (len(ids), expected)
    offered = writers * batches * BATCH
    lance.dataset(lake.uri("clips"), version=base).restore()  # the next run starts from the same table
    return {"writers": writers, "lance_retries": "counted" if counted else "Lake.commit", "batches_each": batches,
            "rows_offered": offered, "new_rows": expected - base_rows, "wall_s": wall, "rows_per_s": offered / wall,
            "conflicts": sum(r["conflicts"] for r in results) if counted else None, "every_id_once": True}


# -- the report ----------------------------------------------------------------------------------------------

def on_paper(sizes: list[dict], driver_bytes: float) -> dict:
    """GR-2's 38M clips through gr2, from the unit costs measured here."""
    commits = math.ceil(GR2_CLIPS / BATCH)
    rows = [s["rows"] for s in sizes]
    totals = {}
    for key in ("commit_s", "indexed_commit_s"):
        a, b = fit(rows, [s["after_compaction"][key] for s in sizes])
        # the table grows by 256 rows a commit: the mean commit meets a table half the final size
        totals[key.replace("_s", "_hours_total")] = commits * (a + b * GR2_CLIPS / 2) / 3600
    paper = {"clips": GR2_CLIPS, "clips_per_commit": BATCH, "commits": commits, **totals,
             "driver_bytes_per_clip_row": driver_bytes,
             "lake_bytes_per_clip_row": sizes[-1]["bytes_per_row"],
             "lake_bytes": sizes[-1]["bytes_per_row"] * GR2_CLIPS}
    if BUILD.exists():
        build = json.loads(BUILD.read_text())
        if "per_frame_at_scale" in build:  # CPU per frame of a build less a 1-copy build's: no fixed costs
            clips_per_frame = build["build"][0]["clips"] / build["inputs"]["frames"]
            per_clip = build["per_frame_at_scale"]["cpu_s_per_frame"] / clips_per_frame
            source = (f"{BUILD.name}: per_frame_at_scale (CPU-seconds, 1 worker) x {1 / clips_per_frame:.1f} "
                      "source frames a clip, models off")
        else:  # older files: the cheapest core-seconds per clip (noisy machine: more workers can cost more)
            best = min(build["build"], key=lambda r: r["seconds"] * r["workers"] / r["clips"])
            per_clip = best["seconds"] * best["workers"] / best["clips"]
            source = f"{BUILD.name}: {best['workers']} workers, {best['clips']} clips, models off"
        paper.update(build_core_seconds_per_clip=per_clip, build_core_hours=per_clip * GR2_CLIPS / 3600,
                     build_source=source)
    from gr2.video.build import CLIP_BUFFER_COMMITS, COMMIT_PAUSE

    # the build's clips wait after each commit (COMMIT_PAUSE x its time), so a commit carries up to this many
    paper["clips_per_commit_at_most"] = BATCH * CLIP_BUFFER_COMMITS
    paper["commits_at_least"] = math.ceil(GR2_CLIPS / paper["clips_per_commit_at_most"])
    paper["driver_share_in_clip_commits_at_most"] = 1 / (1 + COMMIT_PAUSE)
    paper["note"] = ("commit hours are projected by a linear fit of the measured post-compaction commit latency "
                     "against table rows, at 256 clips a commit; the mean commit meets a 19M-row table. The build "
                     "commits fewer, larger batches as commits slow (clips_per_commit_at_most, commits_at_least), "
                     "whose latency at that size is not measured here. Build core-hours: decode, cuts and gates only "
                     "(no CLIP, captioning or tokenizer).")
    return paper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--commits", type=int, default=10, help="commits timed each way per size")
    p.add_argument("--reads", type=int, default=50)
    p.add_argument("--writers", default="1,2,4,8")
    p.add_argument("--writer-rows", type=int, default=100_000, help="rows in the table the writers share")
    p.add_argument("--writer-batches", type=int, default=8, help="batches each writer commits")
    p.add_argument("--workdir", default=None, help="where tables are written (default: a temporary directory)")
    p.add_argument("--paper", action="store_true",
                   help="measure nothing: redo the on-paper section of the results from their own measurements and "
                        "the current build_throughput.json")
    args = p.parse_args()
    if args.paper:
        result = json.loads(OUT.read_text())
        driver = result["gr2_at_gr2_scale_on_paper"]["driver_bytes_per_clip_row"]
        result["gr2_at_gr2_scale_on_paper"] = paper = on_paper(result["sizes"], driver)
        OUT.write_text(json.dumps(result, indent=2))
        print("GR-2 scale on paper:", json.dumps(paper, indent=1))
        return
    workdir = tempfile.mkdtemp(prefix="lake-scale-", dir=args.workdir)
    try:
        sizes = [one_size(int(n), args.commits, args.reads, workdir) for n in args.sizes.split(",")]
        print(f"\n{'rows':>9} {'frags':>6} {'commit ms':>10} {'indexed ms':>11} {'read ms':>8} | {'compact s':>9} "
              f"{'frags':>6} {'commit ms':>10} {'indexed ms':>11} {'read ms':>8} {'KB/row':>7}")
        for s in sizes:
            b, a = s["before_compaction"], s["after_compaction"]
            print(f"{s['rows']:>9} {b['fragments']:>6} {b['commit_s'] * 1e3:>10.1f} {b['indexed_commit_s'] * 1e3:>11.1f} "
                  f"{b['read_by_id_s'] * 1e3:>8.1f} | {s['compaction']['seconds']:>9.1f} {a['fragments']:>6} "
                  f"{a['commit_s'] * 1e3:>10.1f} {a['indexed_commit_s'] * 1e3:>11.1f} {a['read_by_id_s'] * 1e3:>8.1f} "
                  f"{s['bytes_per_row'] / 1e3:>7.1f}")
        rows = [s["rows"] for s in sizes]
        projection = {}
        for key in ("commit_s", "indexed_commit_s", "read_by_id_s"):
            a, b = fit(rows, [s["after_compaction"][key] for s in sizes])
            projection[key] = {"intercept_s": a, "s_per_million_rows": b * 1e6, "at_10m_s": a + b * 10_000_000}
        small = sizes[0]["after_compaction"]
        goal = {way: {"at_10k_s": small[way], "at_10m_projected_s": projection[way]["at_10m_s"],
                      "ratio": projection[way]["at_10m_s"] / small[way],
                      "met": projection[way]["at_10m_s"] <= 2 * small[way]} for way in ("commit_s", "indexed_commit_s")}
        print(f"\n10M rows, projected (not written), linear fit over {rows}:")
        for key, v in projection.items():
            print(f"  {key:<18} {v['at_10m_s'] * 1e3:8.1f} ms  ({v['s_per_million_rows'] * 1e3:.1f} ms per 1M rows)")
        for way, g in goal.items():
            print(f"  goal 10M commit <= 2x 10k, {way}: {g['ratio']:.1f}x -> {'met' if g['met'] else 'missed'}")

        root = os.path.join(workdir, "shared")
        write_table(Lake(root), args.writer_rows)
        runs = []
        for n in (int(w) for w in args.writers.split(",")):
            for counted in (True, False):
                runs.append(concurrent(root, args.writer_rows, n, args.writer_batches, counted))
        print(f"\nconcurrent committers, {args.writer_rows}-row table, {args.writer_batches} batches of {BATCH} each, "
              f"~10% of ids shared by all writers")
        print(f"{'writers':>8} {'retries by':>12} {'rows/s':>8} {'wall s':>7} {'conflicts':>9}")
        for r in runs:
            print(f"{r['writers']:>8} {r['lance_retries']:>12} {r['rows_per_s']:>8.0f} {r['wall_s']:>7.1f} "
                  f"{'' if r['conflicts'] is None else r['conflicts']:>9}")
        driver = clips(np.arange(BATCH)).nbytes / BATCH
        paper = on_paper(sizes, driver)
        print("\nGR-2 scale on paper:", json.dumps(paper, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "machine": "2 cores, 24 GiB, shared and noisy: absolute numbers are this machine's; compare within a run",
        "row": {"thumbnail_bytes": THUMBNAIL_BYTES, "preview_bytes": PREVIEW_BYTES, "tokens": TOKENS,
                "embedding_dim": schema.EMBEDDING_DIM, "note": "synthetic rows shaped like the demo lake's"},
        "method": {"commit": f"median of {args.commits} commits of {BATCH} new ids; 'commit_s' is Lake.commit "
                             "(merge with use_index(False), safe); 'indexed_commit_s' the same merge through the id's "
                             "BTREE (use_index(True): fast, but pylance 14 loses primary-key conflict detection "
                             "through it, lance PR 9238), interleaved on the same table",
                   "read": f"median of {args.reads} Lake.read(filter=clip_id = ...) of random rows, BTREE on clip_id",
                   "before_compaction": "the table as one write plus the timed commits' fragments",
                   "writers": "spawned processes; 'counted': merge with conflict_retries(0), the writer retries "
                              "each commit conflict itself and counts it (benchmark only); 'Lake.commit': Lance "
                              "retries. rows/s counts rows offered (10% are ids another writer also commits)"},
        "sizes": sizes, "projection_10m": {"written": False, "fit": "linear least squares over sizes " + str(rows),
                                           **projection},
        "goal_10m_commit_within_2x_of_10k": goal, "concurrent": runs, "gr2_at_gr2_scale_on_paper": paper,
    }, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
