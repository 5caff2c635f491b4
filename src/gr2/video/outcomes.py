"""Video outcomes: what the build's per-video stages tell its driver, beside the clip rows.

One Ray Data run carries inputs through the survey into clip rows, and only clip rows reach the
driver. A video's own row (and its input's) must reach it too: to commit a video with no clips at
once, and an accepted one's once all its clips are in. So the stage after the survey reports each
input's outcome here, and the driver takes what has come every batch. Ray runs one of these as a
small actor for the build; it is plain Python, so a test holds one in-process.

It also answers which input of the build surveys a video whose bytes come under several uris
(`claim`), so the copies are neither surveyed nor cut twice, and counts each copy by its video's
outcome once that is in. What it keeps grows with the inputs (an id and a short outcome per video),
in the actor, not the driver; what it hands on is dropped once taken.
"""

from __future__ import annotations


class VideoOutcomes:
    """The build's ledger of per-input outcomes, from the survey's workers to the driver."""

    def __init__(self):
        self._owner: dict[str, int] = {}  # video_id -> the input (its index) that surveys it
        self._status: dict[str, tuple[str, str | None]] = {}  # video_id -> (status, reason), for its copies
        self._reported: set[int] = set()  # a task Ray retries reports its inputs again: counted once
        self._ready: list[dict] = []
        self._copies: list[dict] = []  # inputs whose bytes another input surveys, until its outcome is in

    def claim(self, inputs: list[tuple[str, int]]) -> list[bool]:
        """For each (video_id, input index): is this input the one to survey the video? The first to
        ask is; asking again (a retried task) gets the same answer."""
        return [self._owner.setdefault(video_id, index) == index for video_id, index in inputs]

    def report(self, outcomes: list[dict]) -> None:
        """Inputs' outcomes: {index, input, video (the surveyed row, or None), clips, held_status,
        held_reason, copy, was_failed, frames_decoded}."""
        for o in outcomes:
            if o["index"] in self._reported:
                continue
            self._reported.add(o["index"])
            if o["video"] is not None:
                self._status[o["video"]["video_id"]] = (o["video"]["status"], o["video"].get("reason"))
            (self._copies if o["copy"] else self._ready).append(o)

    def take(self, limit: int = 1000) -> list[dict]:
        """Up to `limit` outcomes not taken yet; a copy's carries its video's `status` and `reason`."""
        waiting = []
        for o in self._copies:
            known = self._status.get(o["input"]["video_id"])
            if known:
                self._ready.append({**o, "status": known[0], "reason": known[1]})
            else:
                waiting.append(o)
        self._copies = waiting
        out, self._ready = self._ready[:limit], self._ready[limit:]
        return out

    def waiting(self) -> int:
        """Copies whose video's outcome has not come (none once every input has reported)."""
        return len(self._copies)
