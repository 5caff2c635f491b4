"""What each dimension of a state or action vector is: declared by the reader, stored in the lake,
followed by normalisation, the model's losses and `select_action`.

A layout is a tuple of `Dim`s, one per dimension, in the vector's order:

    Dim("dx", "m", "delta")                                   a position change in metres
    Dim("gripper", "1", "absolute", "binary", -1.0, 1.0)     two values: open (low) or closed (high)
    Dim("gripper", "1", "absolute", "continuous", 0.0, 1.0)  any opening in [low, high]
    Dim("hand_3", "rad", "absolute")                          a hand joint target: plain regression

Only a binary gripper is learned as a label (the model predicts which of its two values, returned
as -1/+1 and mapped back to low/high). A continuous gripper is regressed like an arm dimension, so
RT-1's and Bridge's openings in [0, 1] are never rounded to "closed", and a hand's twelve joints are
twelve regressed targets, not eleven arm dimensions and a gripper.

In the lake a layout is a list of structs (schema.LAYOUT), so `gr2 sql` can read it:
    select episode_id, action_layout from episodes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MODES = ("absolute", "delta")
GRIPPERS = (None, "binary", "continuous")



class LayoutError(ValueError):
    """A layout that contradicts itself or the vectors it describes."""


@dataclass(frozen=True)
class Dim:
    name: str
    unit: str = ""
    mode: str = "absolute"
    gripper: str | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise LayoutError(f"dimension {self.name!r}: mode {self.mode!r} is not one of {MODES}")
        if self.gripper not in GRIPPERS:
            raise LayoutError(f"dimension {self.name!r}: gripper {self.gripper!r} is not one of {GRIPPERS}")
        if self.gripper == "binary" and (self.low is None or self.high is None or not self.low < self.high):
            raise LayoutError(f"dimension {self.name!r}: a binary gripper needs its two values, low < high")


Layout = tuple[Dim, ...]


def dims(names: str, unit: str = "", mode: str = "absolute") -> Layout:
    """Plain dimensions by space-separated names: dims("x y z", "m")."""
    return tuple(Dim(n, unit, mode) for n in names.split())


def binary_gripper(name: str = "gripper", low: float = -1.0, high: float = 1.0, unit: str = "1") -> Dim:
    return Dim(name, unit, "absolute", "binary", low, high)


def continuous_gripper(name: str = "gripper", low: float | None = None, high: float | None = None,
                       unit: str = "1") -> Dim:
    return Dim(name, unit, "absolute", "continuous", low, high)


def or_unknown(layout: Layout, width: int, prefix: str) -> Layout:
    """`layout` when it has `width` dimensions; else positional names (a source of another shape)."""
    return layout if len(layout) == width else unknown(width, prefix)


def unknown(width: int, prefix: str) -> Layout:
    """A layout for a source that declares nothing: named by position, no units, no gripper."""
    return tuple(Dim(f"{prefix}_{i}") for i in range(width))


def to_rows(layout: Layout | None) -> list[dict] | None:
    return None if layout is None else [asdict(d) for d in layout]


def from_rows(rows: Sequence[dict] | None) -> Layout | None:
    return None if rows is None else tuple(Dim(**r) for r in rows)


def names(layout: Layout) -> list[str]:
    return [d.name for d in layout]


def binary_dims(layout: Layout) -> tuple[int, ...]:
    """Indices of the binary grippers: learned as labels, not regressed."""
    return tuple(i for i, d in enumerate(layout) if d.gripper == "binary")


def gripper_dims(layout: Layout) -> tuple[int, ...]:
    """Indices of every gripper, binary or continuous (the state encoder keeps them apart)."""
    return tuple(i for i, d in enumerate(layout) if d.gripper is not None)


def check(layout: Layout, width: int, what: str) -> None:
    if len(layout) != width:
        raise LayoutError(f"{what}: the layout declares {len(layout)} dimensions ({', '.join(names(layout))}) "
                          f"but the vectors have {width}")


def same(a: Layout, b: Layout) -> bool:
    """Whether two layouts describe the same vector (names, units, modes, grippers; ranges may differ)."""
    key = lambda lay: [(d.name, d.unit, d.mode, d.gripper) for d in lay]  # noqa: E731
    return key(a) == key(b)


def select(layout: Layout, dims: Sequence[int] | None) -> Layout:
    return layout if dims is None else tuple(layout[i] for i in dims)


def ee_delta(effector: Layout) -> Layout:
    """The canonical action's layout (actions.py): pose deltas, then the effector as declared."""
    return (Dim("dx", "m", "delta"), Dim("dy", "m", "delta"), Dim("dz", "m", "delta"),
            Dim("rx", "rad", "delta"), Dim("ry", "rad", "delta"), Dim("rz", "rad", "delta"), *effector)


# -- normalisation that follows the declaration ---------------------------------------------------


def to_model(x: np.ndarray, stats: dict, layout: Layout) -> np.ndarray:
    """Vectors as the model sees them: binary grippers as -1/+1 (above their midpoint: +1), every
    other dimension zero-mean unit-std by `stats` (mean/std over every dimension)."""
    x = np.asarray(x, np.float64)
    out = (x - np.asarray(stats["mean"])) / _std(stats)
    for i in binary_dims(layout):
        d = layout[i]
        out[..., i] = np.where(x[..., i] > (d.low + d.high) / 2, 1.0, -1.0)
    return out


def from_model(y: np.ndarray, stats: dict, layout: Layout) -> np.ndarray:
    """The inverse of to_model: binary grippers back to their declared two values."""
    y = np.asarray(y, np.float64)
    out = y * _std(stats) + np.asarray(stats["mean"])
    for i in binary_dims(layout):
        d = layout[i]
        out[..., i] = np.where(y[..., i] > 0, d.high, d.low)
    return out


def _std(stats: dict) -> np.ndarray:
    std = np.asarray(stats["std"], np.float64)
    return np.where(std < 1e-8, 1.0, std)
