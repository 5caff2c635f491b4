"""Near-duplicates: a clip close to an earlier accepted clip is rejected as its duplicate.

Two stages: `FingerprintDeduplicator` compares weight-free frame fingerprints (fingerprint.py) and
runs in every build; `Deduplicator` compares CLIP embeddings, and acts only on real weights.

"Earlier" means already accepted in the lake (any earlier build, searched through Lance's vector
index when there is one) or seen earlier in this build. The stage remembers this build's clips, so
it runs as a single actor (`ActorPoolStrategy(size=1)`): Ray feeds a one-actor pool one batch at a time.
A gate never drops a row: a duplicate gets status "rejected", its reason, and `duplicate_of`
("" for the rest: Ray cannot type a column of only None, see build.TEXT_COLUMNS).
"""

from __future__ import annotations

import numpy as np

from gr2.video import fingerprint, gates
from gr2.video.embed import RANDOM_INIT

DEFAULT_MAX_DISTANCE = 0.01  # cosine distance: re-encodes and re-uploads sit well below it


class Deduplicator:
    """Stage: reject accepted clips that near-duplicate an earlier accepted clip.

    `lake_root` (None: only this build) is where earlier builds live. Only embeddings made by the
    same model and weights are compared (see embed.check_lake_model). Random-init embeddings
    (clip_pretrained="none") carry no similarity worth acting on: their clips are left alone.
    """

    def __init__(self, lake_root: str | None = None, max_distance: float = DEFAULT_MAX_DISTANCE):
        self.lake_root, self.max_distance = lake_root, float(max_distance)
        self.seen_ids: list[str] = []
        self.seen: list[np.ndarray] = []  # this build's accepted embeddings, one array per batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        ids = [str(c) for c in batch["clip_id"]]
        emb = np.asarray(np.stack(list(batch["embedding"])) if batch["embedding"].dtype == object else batch["embedding"],
                         dtype=np.float32)
        # What an earlier near-duplicate stage (the fingerprint's) found stays.
        dup_of = [d if isinstance(d, str) else "" for d in batch.get("duplicate_of", [""] * n)]
        dist = np.array([np.nan if d is None else d for d in batch.get("duplicate_distance", [None] * n)], np.float32)
        reasons = [None] * n
        real = [str(w) != RANDOM_INIT for w in batch["clip_pretrained"]] if "clip_pretrained" in batch else [True] * n
        todo = [i for i in range(n)
                if str(batch["status"][i]) == "accepted" and real[i] and np.isfinite(emb[i]).all()]
        earlier = self._lake_matches(batch, [emb[i] for i in todo], [ids[i] for i in todo])
        new_ids, new_vecs = [], []
        for j, i in enumerate(todo):
            best = earlier[j]
            # This build so far, then this batch's own earlier clips.
            for other_ids, other in ((self.seen_ids, self._seen()), (new_ids, np.array(new_vecs, np.float32))):
                if len(other_ids):
                    d = 1.0 - other @ emb[i]
                    d[np.array(other_ids) == ids[i]] = np.inf
                    k = int(np.argmin(d))
                    if best is None or d[k] < best[1]:
                        best = (other_ids[k], float(d[k]))
            if best is not None and best[1] <= self.max_distance:
                dup_of[i], dist[i] = best
                reasons[i] = f"duplicate: of {best[0]} (cosine distance {best[1]:.4f} <= {self.max_distance})"
            else:
                new_ids.append(ids[i]), new_vecs.append(emb[i])
        if new_ids:
            self.seen_ids += new_ids
            self.seen.append(np.array(new_vecs, np.float32))
        return gates.reject({**batch, "duplicate_of": np.array(dup_of, dtype=object), "duplicate_distance": dist},
                            reasons)

    def _seen(self) -> np.ndarray:
        if len(self.seen) > 1:
            self.seen = [np.concatenate(self.seen)]
        return self.seen[0] if self.seen else np.zeros((0, 0), np.float32)

    def _lake_matches(self, batch, vectors: list[np.ndarray], ids: list[str]) -> list[tuple[str, float] | None]:
        """For each vector, its nearest accepted clip already in the lake (not itself), or None."""
        out: list[tuple[str, float] | None] = [None] * len(vectors)
        if not vectors or self.lake_root is None:
            return out
        from gr2.lake.lake import Lake
        from gr2.lake.query import NPROBES, REFINE_FACTOR, sql_literal

        lake = Lake(self.lake_root)
        if not lake.exists("clips"):
            return out
        ds = lake.dataset("clips")  # the latest version: includes what the driver committed so far
        if "embedding" not in ds.schema.names:
            return out
        model, weights = _one(batch, "clip_model"), _one(batch, "clip_pretrained")
        where = "status = 'accepted'"  # null embeddings are skipped by the search itself
        if model and weights:
            where += f" AND clip_model = {sql_literal(model)} AND clip_pretrained = {sql_literal(weights)}"
        # k=2: the nearest may be the clip itself, committed by an earlier, interrupted run.
        hits = ds.to_table(
            columns=["clip_id", "_distance"], filter=where, prefilter=True,
            # Re-ranking by full vectors (refine_factor) makes the distances exact, not PQ estimates.
            nearest={"column": "embedding", "q": np.stack(vectors), "k": 2, "metric": "cosine",
                     "nprobes": NPROBES, "refine_factor": REFINE_FACTOR},
        ).to_pylist()
        if len(vectors) == 1:
            for h in hits:
                h["query_index"] = 0
        for h in sorted(hits, key=lambda h: h["_distance"]):
            q = h["query_index"]
            if out[q] is None and h["clip_id"] != ids[q]:
                out[q] = (h["clip_id"], float(h["_distance"]))
        return out


class FingerprintDeduplicator:
    """Stage: reject accepted clips whose fingerprint is within `max_bits` of an earlier accepted
    clip of another video.

    Windows of one video are distinct clips by construction (and a static shot's windows hash
    alike), so a clip is never a duplicate of its own video's. `lake_root` (None: only this build)
    is read once, when the actor starts: the earlier builds' accepted fingerprints.
    """

    def __init__(self, lake_root: str | None = None, max_bits: float = fingerprint.DEFAULT_MAX_BITS):
        self.max_bits = float(max_bits)
        self.ids: list[str] = []
        self.video_ids: list[str] = []
        self.hashes: list[np.ndarray] = []
        if lake_root is not None:
            self._read_lake(lake_root)

    def _read_lake(self, lake_root: str) -> None:
        from gr2.lake.lake import Lake

        lake = Lake(lake_root)
        if not lake.exists("clips") or "fingerprint" not in lake.dataset("clips").schema.names:
            return
        rows = lake.read("clips", columns=["clip_id", "video_id", "fingerprint"],
                         filter="status = 'accepted' AND fingerprint IS NOT NULL").to_pylist()
        for r in rows:
            self._remember(r["clip_id"], r["video_id"], np.array(r["fingerprint"], np.uint64))

    def _remember(self, clip: str, video: str, hashes: np.ndarray) -> None:
        self.ids.append(clip), self.video_ids.append(video), self.hashes.append(hashes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        dup_of, dist, reasons = [""] * n, np.full(n, np.nan, np.float32), [None] * n
        videos = np.array(self.video_ids, dtype=object)
        for i in range(n):
            hashes = np.asarray(batch["fingerprint"][i], np.uint64)
            if str(batch["status"][i]) != "accepted" or not len(hashes):
                continue
            clip, video = str(batch["clip_id"][i]), str(batch["video_id"][i])
            k, bits = fingerprint.nearest(hashes, self.hashes, skip=videos == video)
            if k >= 0 and bits <= self.max_bits:
                dup_of[i], dist[i] = self.ids[k], bits
                reasons[i] = f"duplicate: of {self.ids[k]} (fingerprint {bits:.2f} bits <= {self.max_bits:g})"
            else:
                self._remember(clip, video, hashes)
                videos = np.append(videos, video)
        return gates.reject({**batch, "duplicate_of": np.array(dup_of, dtype=object), "duplicate_distance": dist},
                            reasons)


def _one(batch, column: str) -> str | None:
    if column not in batch or not len(batch[column]):
        return None
    value = batch[column][0]
    return value if isinstance(value, str) else None


def counts(rows: list[dict]) -> dict[str, int]:
    """Near-duplicates rejected, for the build's funnel."""
    return {"dedup_duplicates": sum(1 for r in rows if r.get("duplicate_of"))}
