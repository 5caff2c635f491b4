"""Probe: content id and container facts of one input, through ffprobe (ffmpeg-python)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from fractions import Fraction

import ffmpeg

from gr2.errors import Gr2Error
from gr2.lake.uri import is_remote, local_path, url_to_fs

CHUNK = 1 << 20


class ProbeError(Gr2Error):
    """An input that is not a readable video; the message says which and why."""


class ContainerRefused(ProbeError):
    """A file in a container gr2 does not open as video (a playlist, a concat list, ...)."""


# The demuxers gr2 opens input through, by ffmpeg's names: video containers, and a few audio ones so
# an audio file is told "no video stream" rather than refused. Anything else is refused before a
# decoder opens it: playlist and concat demuxers (hls, concat, ...) read the files or URLs a text
# file lists, whatever the file is called (DESIGN.md), and local files open by the file protocol only.
DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "flv", "ogg", "asf", "mxf", "mpeg",
            "mpegvideo", "h264", "hevc", "ivf", "dv", "gif", "mp3", "wav", "aac", "flac")
OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(DEMUXERS)}


def private_cache_dir(cache_dir: str | None = None) -> str:
    """This user's download cache (default: <tmp>/gr2-cache-<uid>), made mode 0700; refused when it
    is another user's or others may write to it, since whatever sits there is read as the object."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"gr2-cache-{os.getuid()}")
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    st = os.stat(cache_dir)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ProbeError(f"download cache {cache_dir} is not private (owner uid {st.st_uid}, mode "
                         f"{st.st_mode & 0o777:o}): files others can place there would be read as videos")
    return cache_dir


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path holding `uri`'s bytes: the path itself when local, else a cached download.

    ffprobe and the decoders need a seekable local file; object-store inputs are copied once per
    node into this user's private cache, keyed by the uri and the object's version, and an entry
    is used only when its size is the object's (a cut-short copy is fetched again).
    """
    if not is_remote(uri):
        return local_path(uri)
    cache_dir = private_cache_dir(cache_dir)
    # Keyed by the object's version too (ETag, size, mtime): an object overwritten in place is new
    # content and must be fetched again, or its new bytes would never reach the lake.
    try:
        fs, key = url_to_fs(uri)
        info = fs.info(key)
    except (OSError, ValueError) as e:
        raise ProbeError(f"cannot read {uri}: {e}") from None
    version = f"{info.get('ETag') or info.get('etag')}:{info.get('size')}:{info.get('LastModified') or info.get('mtime')}"
    name = hashlib.sha256(f"{uri}#{version}".encode()).hexdigest()[:24] + os.path.splitext(uri)[1]
    path = os.path.join(cache_dir, name)
    if not os.path.exists(path) or os.path.getsize(path) != info.get("size"):
        try:
            with fs.open(key, "rb") as src, tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        except (OSError, ValueError) as e:
            raise ProbeError(f"cannot read {uri}: {e}") from None
        os.replace(dst.name, path)
    return path


def file_id(path: str) -> tuple[str, int]:
    """(sha256 of the file's bytes, size in bytes)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def uri_id(uri: str) -> str:
    """The id of an input whose bytes could not be read: derived from its uri instead."""
    return "uri-" + hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()


def _rate(text: str | None) -> float | None:
    try:
        value = float(Fraction(text)) if text else None
    except (ValueError, ZeroDivisionError):
        return None
    return value if value and value > 0 else None


def _rotation(stream: dict) -> int:
    """Degrees counter-clockwise the stored frames turn to be displayed, to the nearest quarter turn."""
    # ffprobe gives the display matrix's angle counter-clockwise; the older `rotate` tag is clockwise
    # (ffmpeg's own player reads both so), hence its minus sign.
    ccw = next((float(side["rotation"]) for side in stream.get("side_data_list") or [] if "rotation" in side), None)
    if ccw is None:
        ccw = -float(stream.get("tags", {}).get("rotate", 0))
    return int(round(ccw / 90)) * 90 % 360


def probe(path: str) -> dict:
    """Container, codec, duration_s, fps, frame_count, width, height, rotation, has_audio of `path`.

    width and height are the displayed ones (rotation applied), as the decoders return frames.
    """
    if not os.path.exists(path):
        raise ProbeError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ProbeError(f"{path}: empty file (0 bytes)")
    try:
        info = ffmpeg.probe(path, **OPEN_OPTIONS)
    except ffmpeg.Error as e:
        text = e.stderr.decode("utf-8", "replace")
        refused = re.search(r"\[(\w+) @ [^\]]*\] Format not on whitelist", text)
        if refused:
            raise ContainerRefused(f"{path}: a {refused.group(1)} file is not a video container gr2 opens "
                                   "(playlists and concat lists make a decoder read the files they name)") from None
        lines = [ln for ln in text.splitlines() if ln.strip()]
        detail = lines[-1].split(": ", 1)[-1] if lines else "ffprobe failed"
        raise ProbeError(f"{path}: not a readable video ({detail})") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    fmt = info.get("format", {})
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    if video is None:
        kind = "audio only" if has_audio else "no streams"
        raise ProbeError(f"{path}: no video stream ({kind})")
    fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
    duration = float(video.get("duration") or fmt.get("duration") or 0) or None
    frames = int(video["nb_frames"]) if str(video.get("nb_frames", "")).isdigit() else None
    if frames is None and duration and fps:
        frames = int(round(duration * fps))
    rotation = _rotation(video)
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if rotation % 180:  # a quarter turn: the displayed frame is the stored one on its side
        width, height = height, width
    return {
        "container": fmt.get("format_name"),
        "codec": video.get("codec_name"),
        "duration_s": duration,
        "fps": fps,
        "frame_count": frames,
        "width": width,
        "height": height,
        "rotation": rotation,
        "has_audio": has_audio,
    }
