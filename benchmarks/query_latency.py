"""Query latency and recall over a large clips table: the planner's choices across filter selectivities.

    .venv/bin/python benchmarks/query_latency.py [--rows 1000000] [--queries 100] [--lake DIR] [--small-rows 100000]

Builds a lake of `--rows` synthetic clips (512-d embeddings clustered the way real footage is:
many clips per scene, many scenes per dataset; realistic scalar columns), indexes it with
gr2/lake/index.py, then times `gr2.lake.query.query` (the path `gr2 query` takes) for text and
--like queries unfiltered and under filters from 0.4% to 77% of rows, filter-only queries, and text
end to end with the text-vector cache cold and warm. Recall@10 is each answer's overlap with the
exact top 10 for the same query and filter (numpy over every vector that passes the filter). Then
10% more rows are appended and recall is measured before and after the index takes them in (the
lake is restored to its first version after). `--small-rows` repeats the core queries on a smaller
lake and compares index kinds there, for the projection to 10M rows that this machine cannot hold.
Prints a table and writes benchmarks/results/query_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

OUT = Path(__file__).parent / "results" / "query_latency.json"
DIM = 512
DATASETS = ("howto100m", "ego4d", "sthv2", "epic_kitchens", "kinetics700", "rt1", "bridge")
DATASET_SHARE = (0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05)
WORDS = "a hand opens closes picks up puts down the drawer cup knife bowl door lid towel from into on table".split()
TOPICS = 300
TEXT_COSINE = 0.5
FILTER = "dataset = 'ego4d' AND duration_s > 2"  # ~20% x ~60% x 85% accepted: ~10% of rows
# The selectivity sweep (each also keeps status = 'accepted', as every query does by default).
FILTERS = {
    "selective": "dataset = 'bridge' AND duration_s > 4",  # ~0.4%
    "near the exact/index boundary": "dataset = 'rt1' AND duration_s > 2",  # ~2.4%
    "mid": FILTER,  # ~10%
    "broad": "duration_s > 1",  # ~77%
}


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_batches(rows: int, chunk: int, seed: int = 0, first_id: int = 0):
    """Clips rows chunk by chunk, with graded similarity the way real footage has it: topics
    (cooking, assembly, ...) hold scenes, a scene holds ~40 clips close to one another. A later
    `seed` with the same topics is a later build of the same kind of footage."""
    from gr2.lake import schema

    topics = unit(np.random.default_rng(0).standard_normal((TOPICS, DIM)))
    rng = np.random.default_rng(seed)
    scenes = unit(topics[rng.integers(0, TOPICS, max(1, rows // 40))] + 1.2 * unit(rng.standard_normal((max(1, rows // 40), DIM))))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scene = rng.integers(0, len(scenes), n)
        emb = unit(scenes[scene] + 0.5 * unit(rng.standard_normal((n, DIM))))
        ids = np.arange(first_id + start, first_id + start + n)
        caption_n = rng.integers(3, 9, n)
        table = pa.table({
            "clip_id": [f"{i:012x}" for i in ids],
            "video_id": [f"v{seed}-{s:09d}" for s in scene],
            "uri": [f"s3://web-video/{s % 997}/{s}.mp4" for s in scene],
            "start_s": (ids % 10 * 2.0), "end_s": (ids % 10 * 2.0 + 2.0),
            "duration_s": rng.gamma(4.0, 0.6, n).round(2),
            "fps": rng.choice([24.0, 25.0, 30.0, 60.0], n),
            "status": rng.choice(["accepted", "rejected", "failed"], n, p=[0.85, 0.13, 0.02]),
            "dataset": rng.choice(DATASETS, n, p=DATASET_SHARE),
            "caption": [" ".join(rng.choice(WORDS, k)) for k in caption_n],
            "caption_source": rng.choice(["source", "coca", "none"], n, p=[0.6, 0.35, 0.05]),
            "text_score": rng.normal(0.28, 0.05, n).astype(np.float32),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
            "clip_model": ["ViT-B-32"] * n, "clip_pretrained": ["none"] * n,
            "build_id": [f"build-{seed}-{start // 250_000}"] * n,
        })
        yield schema.conform("clips", table).to_batches()[0] if table.num_rows else None


def write_clips(uri: str, rows: int, seed: int = 0, first_id: int = 0, mode: str = "create") -> float:
    import lance

    from gr2.lake import schema

    t0 = time.perf_counter()
    # One bulk write, so Lake.commit's merge on id has nothing to merge against (ids are new).
    batches = (b for b in synthetic_batches(rows, 50_000, seed, first_id) if b)
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema.CLIPS, batches), uri, mode=mode,
                        max_rows_per_file=250_000)
    return time.perf_counter() - t0


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "n": len(samples)}


class Truth:
    """Exact top-10 answers by numpy over every embedding in the table (clip ids are row numbers)."""

    def __init__(self, ds):
        table = ds.to_table(columns=["clip_id", "embedding"])
        ids = np.array([int(c, 16) for c in table["clip_id"].to_pylist()])
        order = np.argsort(ids)
        assert (ids[order] == np.arange(len(ids))).all(), "synthetic clip ids are row numbers"
        flat = table["embedding"].combine_chunks().flatten().to_numpy()
        self.vectors = flat.reshape(len(ids), DIM)[order]
        self.ds = ds

    def mask(self, where: str) -> np.ndarray:
        kept = self.ds.to_table(columns=["clip_id"], filter=f"({where}) AND status = 'accepted'")["clip_id"]
        mask = np.zeros(len(self.vectors), bool)
        mask[[int(c, 16) for c in kept.to_pylist()]] = True
        return mask

    def top10(self, queries: np.ndarray, mask: np.ndarray) -> list[set[str]]:
        best = np.full((len(queries), 10), -np.inf, np.float32)
        best_ids = np.zeros((len(queries), 10), np.int64)
        for start in range(0, len(self.vectors), 200_000):  # blocks: no copy of the whole matrix
            scores = queries @ self.vectors[start:start + 200_000].T
            scores[:, ~mask[start:start + 200_000]] = -np.inf
            both = np.concatenate([best, scores], 1)
            ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)], 1)
            pick = np.argpartition(-both, 9, axis=1)[:, :10]
            best, best_ids = np.take_along_axis(both, pick, 1), np.take_along_axis(ids, pick, 1)
        return [{f"{i:012x}" for i, s in zip(row, srow) if np.isfinite(s)} for row, srow in zip(best_ids, best)]


def text_vectors(truth: Truth, n: int, rng) -> np.ndarray:
    """Random-init CLIP text embeddings mean nothing, so a text query is modelled by how a real one
    ranks clips: a vector at cosine TEXT_COSINE to a clip of the scene it describes. (CLIP's own
    text-image cosines are lower, ~0.3, by a modality gap that is near constant and so leaves
    rankings alone.)"""
    anchors = truth.vectors[rng.choice(len(truth.vectors), n, replace=False)]
    noise = unit(rng.standard_normal(anchors.shape))
    noise = unit(noise - (noise * anchors).sum(1, keepdims=True) * anchors)
    return unit(TEXT_COSINE * anchors + np.sqrt(1 - TEXT_COSINE ** 2) * noise)


def measure(lake, calls: list[dict], truth_sets: list[set] | None = None) -> dict:
    """Time `query` over `calls` (k=10); recall@10 against `truth_sets`; which plans ran."""
    from gr2.lake.query import query

    samples, recalls, plans, short = [], [], {}, 0
    for i, kw in enumerate(calls):
        s = time.perf_counter()
        hits = query(lake, k=10, columns=["caption", "duration_s", "dataset"], **kw)
        samples.append(time.perf_counter() - s)
        short += len(hits) < 10
        meta = hits.schema.metadata or {}
        if b"gr2.plan" in meta:
            plan = json.loads(meta[b"gr2.plan"])
            key = plan["method"] + (f" nprobes={plan['nprobes']} refine={plan['refine_factor']}" if plan["nprobes"] else "")
            plans[key] = plans.get(key, 0) + 1
        if truth_sets is not None:
            got = set(hits["clip_id"].to_pylist())
            recalls.append(len(got & truth_sets[i]) / max(1, len(truth_sets[i])))
    out = percentiles(samples)
    if truth_sets is not None:
        out["recall_at_10"] = round(float(np.mean(recalls)), 4)
        out["min_recall_at_10"] = round(float(np.min(recalls)), 2)
    out["queries_short_of_k"] = short
    if plans:
        out["plans"] = plans
    return out


def core_queries(lake, truth: Truth, vectors: np.ndarray, likes: list[str], filters: dict) -> dict:
    """Text (vector) queries unfiltered and under each filter; --like under the mid filter; filter only."""
    results = {}
    everything = truth.mask("true")
    results["text, no filter"] = {**measure(lake, [{"vector": v} for v in vectors], truth.top10(vectors, everything)),
                                  "selectivity": round(float(everything.mean()), 4)}
    for name, where in filters.items():
        mask = truth.mask(where)
        calls = [{"vector": v, "where": where} for v in vectors]
        results[f"text + {name} filter"] = {**measure(lake, calls, truth.top10(vectors, mask)), "where": where,
                                            "selectivity": round(float(mask.mean()), 4)}
    like_vectors = truth.vectors[[int(c, 16) for c in likes]]
    mask = truth.mask(FILTER)
    results["like + mid filter"] = {**measure(lake, [{"like": c, "where": FILTER} for c in likes],
                                              truth.top10(like_vectors, mask)), "where": FILTER}
    # A new threshold per query, so no query repeats another's work.
    results["filter only (scalar indexes)"] = {
        **measure(lake, [{"where": f"dataset = 'ego4d' AND duration_s > {1.5 + i / 100:.2f}"} for i in range(len(vectors))]),
        "where": "dataset = 'ego4d' AND duration_s > {1.50 .. 2.49}"}
    return results


def ensure_lake(root: str, rows: int) -> dict:
    """A lake of `rows` synthetic clips with its indexes, reusing one a --lake run left behind."""
    from gr2.lake import index
    from gr2.lake.lake import Lake

    lake = Lake(root)
    made: dict = {}
    if lake.exists("clips") and lake.dataset("clips").count_rows() != rows:
        shutil.rmtree(lake.uri("clips"))
    if not lake.exists("clips"):
        made["write_s"] = round(write_clips(lake.uri("clips"), rows), 1)
    t0 = time.perf_counter()
    made["index"] = index.build_indexes(lake)  # creates what is missing; on a reused lake, a no-op update
    made["index_s"] = round(time.perf_counter() - t0, 1)
    return {"lake": lake, **made}


def append_recall(lake, truth: Truth, vectors: np.ndarray, rows: int, fraction: float) -> dict:
    """Recall and latency right after a build appends `fraction` more rows, and after the index takes them in."""
    import lance

    from gr2.lake import index

    uri = lake.uri("clips")
    before = lance.dataset(uri).version
    added = int(rows * fraction)
    out: dict = {"appended_rows": added, "write_s": round(write_clips(uri, added, seed=1, first_id=rows, mode="append"), 1)}
    try:
        grown = Truth(lance.dataset(uri))
        stages = {}
        for stage in ("right after the append (new rows not in the index yet)", "after build_indexes"):
            if stage == "after build_indexes":
                t0 = time.perf_counter()
                out["build_indexes"] = index.build_indexes(lake)
                out["build_indexes_s"] = round(time.perf_counter() - t0, 1)
                grown.ds = lance.dataset(uri)
            coverage = index.vector_index_of(lance.dataset(uri))
            everything, mid = grown.mask("true"), grown.mask(FILTER)
            stages[stage] = {
                "index_rows": coverage["indexed_rows"], "unindexed_rows": coverage["unindexed_rows"],
                "text, no filter": measure(lake, [{"vector": v} for v in vectors], grown.top10(vectors, everything)),
                "text + mid filter": measure(lake, [{"vector": v, "where": FILTER} for v in vectors], grown.top10(vectors, mid)),
            }
        out["stages"] = stages
    finally:
        lance.dataset(uri, version=before).restore()  # the kept --lake stays the size --rows says
    return out


def compare_index_kinds(lake, truth: Truth, vectors: np.ndarray) -> dict:
    """IVF_PQ beside IVF_HNSW_SQ and IVF_RQ on the same table, searched with the planner's probes."""
    import lance

    from gr2.lake import index

    uri = lake.uri("clips")
    rows = lance.dataset(uri).count_rows()
    settings = index.vector_index_settings(rows, DIM)
    everything, mid = truth.mask("true"), truth.mask(FILTER)
    plain, filtered = truth.top10(vectors, everything), truth.top10(vectors, mid)
    out = {}
    kinds = {"IVF_HNSW_SQ": {}, "IVF_RQ": {}, "IVF_PQ": {"num_sub_vectors": settings.num_sub_vectors}}
    # The kind build_indexes makes goes last, so the lake is left with it.
    for kind in sorted(kinds, key=lambda kind: kind == settings.index_type):
        extra = kinds[kind]
        t0 = time.perf_counter()
        lance.dataset(uri).create_index(index.VECTOR_COLUMN, index_type=kind, name=index.VECTOR_INDEX, metric="cosine",
                                        replace=True, num_partitions=settings.partitions, **extra)
        out[kind] = {"build_s": round(time.perf_counter() - t0, 1), "partitions": settings.partitions,
                     "text, no filter": measure(lake, [{"vector": v} for v in vectors], plain),
                     "text + mid filter": measure(lake, [{"vector": v, "where": FILTER} for v in vectors], filtered)}
    return out


def run(rows: int, queries: int, root: str, small_rows: int, small_root: str, append_fraction: float) -> dict:
    from gr2.lake import query as query_module
    from gr2.video.embed import ClipEmbedder

    rng = np.random.default_rng(1)
    report: dict = {"rows": rows, "dim": DIM, "k": 10, "queries_per_row": queries,
                    "text_queries": f"synthetic vectors at cosine {TEXT_COSINE} to one clip of the scene they describe",
                    "recall": "overlap of each answer with the exact top 10 (numpy over every vector passing the filter)"}
    built = ensure_lake(root, rows)
    lake = built.pop("lake")
    report["build"] = built
    report["lake_bytes"] = sum(f.stat().st_size for f in Path(lake.uri("clips")).rglob("*") if f.is_file())
    truth = Truth(lake.dataset("clips"))
    vectors = text_vectors(truth, queries, rng)
    likes = lake.dataset("clips").to_table(columns=["clip_id"], filter="status = 'accepted'", limit=20_000)["clip_id"].to_pylist()
    likes = [likes[i] for i in rng.choice(len(likes), queries, replace=False)]
    report["queries"] = core_queries(lake, truth, vectors, likes, FILTERS)

    # Text end to end: the CLIP text encoder on CPU, then the same texts again from the cache.
    embedder = ClipEmbedder("ViT-B-32", "none")
    texts = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) + f" #{i}" for i in range(min(queries, 30))]
    query_module.TEXT_VECTORS = query_module.TextVectorCache()
    report["queries"]["text end to end, first time (encode + search)"] = measure(lake, [{"text": t, "embedder": embedder} for t in texts])
    report["queries"]["text end to end, repeated (cached vector + search)"] = measure(lake, [{"text": t, "embedder": embedder} for t in texts])
    report["text_vector_cache"] = {"hits": query_module.TEXT_VECTORS.hits, "misses": query_module.TEXT_VECTORS.misses}

    if append_fraction:
        report["append"] = append_recall(lake, truth, vectors[:30], rows, append_fraction)
    del truth

    if small_rows:
        small = ensure_lake(small_root, small_rows)
        small_lake = small.pop("lake")
        small_truth = Truth(small_lake.dataset("clips"))
        small_vectors = text_vectors(small_truth, queries, np.random.default_rng(2))
        small_likes = small_lake.dataset("clips").to_table(columns=["clip_id"], filter="status = 'accepted'", limit=5_000)["clip_id"].to_pylist()
        small_likes = [small_likes[i] for i in np.random.default_rng(2).choice(len(small_likes), queries, replace=False)]
        report["small"] = {"rows": small_rows, "build": small,
                           "queries": core_queries(small_lake, small_truth, small_vectors, small_likes, FILTERS),
                           "index_kinds": compare_index_kinds(small_lake, small_truth, small_vectors[:30])}
        report["projection_10m"] = project(report, 10_000_000)
    return report


def project(report: dict, target: int) -> dict:
    """10M-row figures projected from the measured small and large lakes: latency ~ rows^a per query kind."""
    big, small = report["rows"], report["small"]["rows"]
    out = {"rows": target, "measured": False,
           "why": (f"{target:,} x {DIM}-d float32 vectors are {target * DIM * 4 / 2**30:.1f} GiB before the index, and the "
                   "exact ground truth needs them all in RAM; this machine has 24 GiB shared with other work and 2 "
                   f"cores, and training the index took {report['small']['index_kinds']['IVF_PQ']['build_s']} s at "
                   f"{small:,} rows here (minutes at 1M), so a 10M build and its checks do not fit beside the other work. "
                   f"These are projections from the measured {small:,} and {big:,} row lakes: "
                   "p50 at 10M = p50 at 1M x (p50 at 1M / p50 at 100k) ^ (log(10M/1M) / log(1M/100k))."),
           "vector_bytes": target * DIM * 4,
           "index_settings": None, "p50_ms": {}}
    from gr2.lake.index import vector_index_settings

    out["index_settings"] = vector_index_settings(target, DIM).__dict__
    step = np.log(target / big) / np.log(big / small)
    for name, r in report["queries"].items():
        s = report["small"]["queries"].get(name)
        if s and r["p50_ms"] and s["p50_ms"]:
            out["p50_ms"][name] = round(r["p50_ms"] * (r["p50_ms"] / s["p50_ms"]) ** step, 1)
    return out


def markdown(report: dict) -> str:
    """The README's query-latency table, from the JSON (so the README's numbers are the file's)."""
    small = report.get("small", {}).get("queries", {})
    lines = [f"| query (k=10) | rows kept | plan at {report['rows']:,} rows | p50 ms | p95 ms | recall@10 | "
             f"p50 ms at {report.get('small', {}).get('rows', 0):,} rows | projected p50 ms at 10M |",
             "|---|---|---|---|---|---|---|---|"]
    projected = report.get("projection_10m", {}).get("p50_ms", {})
    for name, r in report["queries"].items():
        kept = f"{r['selectivity']:.1%}" if "selectivity" in r else ""
        plans = ", ".join(f"{p} x{n}" if len(r["plans"]) > 1 else p for p, n in r["plans"].items()) if "plans" in r else ""
        recall = f"{r['recall_at_10']:.3f}" if "recall_at_10" in r else ""
        s = small.get(name, {}).get("p50_ms", "")
        lines.append(f"| {name} | {kept} | {plans} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {recall} | {s} | "
                     f"{projected.get(name, '')} |")
    for stage, got in report.get("append", {}).get("stages", {}).items():
        for name in ("text, no filter", "text + mid filter"):
            r = got[name]
            lines.append(f"| {name}, {stage} | | {', '.join(r.get('plans', {}))} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                         f"{r['recall_at_10']:.3f} | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--lake", help="where to build the lake (default: a temp dir, removed after); kept for reruns")
    p.add_argument("--small-rows", type=int, default=100_000, help="a smaller lake for the projection (0: none)")
    p.add_argument("--append-fraction", type=float, default=0.1)
    p.add_argument("--markdown", action="store_true", help="print the README table from the JSON and stop")
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return
    os.environ.setdefault("LANCE_LOG", "error")
    root = args.lake or tempfile.mkdtemp(prefix="gr2-query-bench-")
    small_root = (args.lake.rstrip("/") + f"-{args.small_rows}") if args.lake else tempfile.mkdtemp(prefix="gr2-query-bench-")
    try:
        report = run(args.rows, args.queries, root, args.small_rows, small_root, args.append_fraction)
    finally:
        if not args.lake:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(small_root, ignore_errors=True)
    import lance

    report["command"] = "benchmarks/query_latency.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("lake", "markdown"))
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "pylance": lance.__version__,
                         "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work sharing the cores
                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{report['rows']:,} clips x {DIM}-d; index: {report['build']['index']['vector']}")
    print(f"{'query':52} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}  plan")
    for name, r in report["queries"].items():
        recall = f"{r['recall_at_10']:.3f}" if "recall_at_10" in r else ""
        print(f"{name:52} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {recall:>10}  {r.get('plans', '')}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
