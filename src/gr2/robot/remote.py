"""Robot sources on object storage (s3://bucket/prefix): listed on the driver, fetched per episode.

The readers, and decord, PyAV and h5py under them, want local files. So a remote source is read
through local mirrors: on the driver, the files a reader lists episodes from (LeRobot's meta/,
the annotation JSONs, CALVIN's index, the HDF5 files) are fetched and the reader lists the mirror;
each EpisodeRef then carries the files its episode reads, and the worker that loads it fetches
just those. Bytes are cached per node by object version (probe.local_copy: an object overwritten
in place is fetched again); a mirror holds links to the files fetched for this one listing or
episode and is removed after it, so a file deleted since is missing, never a stale copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace

from gr2.lake.uri import join, url_to_fs
from gr2.robot.episode import EpisodeError, EpisodeRef
from gr2.video.probe import ProbeError, local_copy

__all__ = ["list_episodes", "local_ref"]


def _split(source: str) -> tuple[str, str]:
    """(parent uri, name) of a source: s3://bucket/robot/ds -> (s3://bucket/robot, ds)."""
    scheme, _, rest = source.partition("://")
    parent, _, name = rest.rstrip("/").rpartition("/")
    return f"{scheme}://{parent}", name


def list_files(source: str) -> list[str]:
    """Every object of `source` (one object, or all under a prefix), relative to the source's parent."""
    _, name = _split(source)
    try:
        fs, path = url_to_fs(source)
        path = path.rstrip("/")
        fs.invalidate_cache(path)  # a listing made earlier in this process may predate new objects
        if fs.isfile(path):
            return [name]
        found = sorted(fs.find(path))
    except (OSError, ValueError) as e:
        raise EpisodeError(f"{source}: cannot list ({type(e).__name__}: {e})") from None
    if not found:
        raise EpisodeError(f"{source}: no such object or prefix")
    return [f"{name}/{p[len(path) + 1:]}" for p in found]


@contextlib.contextmanager
def fetched(source: str, files: Sequence[str]) -> Iterator[str]:
    """The local path standing for `source` while the block runs, holding `files` (relative to its parent)."""
    parent, name = _split(source)
    root = tempfile.mkdtemp(prefix="gr2-robot-")
    try:
        for rel in dict.fromkeys(files):
            try:
                blob = local_copy(join(parent, rel))
            except ProbeError as e:  # "cannot read <object uri>: <why>"
                raise EpisodeError(str(e)) from None
            link = os.path.join(root, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(blob, link)
        yield os.path.join(root, name)
    finally:
        shutil.rmtree(root)


@contextlib.contextmanager
def local_ref(ref: EpisodeRef) -> Iterator[EpisodeRef]:
    """`ref` with a local source: itself, or for an object-store episode a mirror of the files it reads."""
    if not ref.files:
        yield ref
        return
    with fetched(ref.source, ref.files) as path:
        yield replace(ref, source=path)


def list_episodes(source: str, readers: Sequence) -> list[EpisodeRef]:
    """Every episode of the object-store `source`, through the first of `readers` that knows it."""
    files = list_files(source)
    _, name = _split(source)
    if files == [name]:  # one object: an HDF5 file is its own index and its episodes' only file
        with fetched(source, files) as path:
            for reader in readers:
                if reader.is_dataset(path):
                    return [replace(r, source=source, files=(name,)) for r in reader.list_episodes(path)]
    else:
        inner = [f[len(name) + 1:] for f in files]
        for reader in readers:
            index = reader.index_files(inner)
            if not index:
                continue
            with fetched(source, [f"{name}/{f}" for f in index]) as path:
                if not reader.is_dataset(path):
                    continue
                return [replace(r, source=source, files=tuple(f"{name}/{f}" for f in _episode_files(reader, r, inner, index)))
                        for r in reader.list_episodes(path)]
    raise EpisodeError(f"{source}: not a robot dataset this reader knows (LeRobot dir with meta/info.json, "
                       "CALVIN dir with ep_start_end_ids.npy, annotation/*.json, or HDF5 files)")


def _episode_files(reader, ref: EpisodeRef, files: list[str], index: list[str]) -> list[str]:
    try:
        return reader.episode_files(ref, files)
    except (EpisodeError, KeyError, ValueError, OSError):
        # An episode whose files cannot be named (a v3 episode missing from meta/episodes, a broken
        # annotation) fails alone, on its worker, with the reason load_episode gives it from disk.
        return index


def remote_reason(reason: str, local: EpisodeRef, ref: EpisodeRef) -> str:
    """A failure message naming the object-store source rather than the mirror it was read through."""
    return reason.replace(local.source, ref.source) if local.source != ref.source else reason
