"""Parameter types the flows share, validated by pydantic before any work starts."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field


def _no_blank(sources: list[str]) -> list[str]:
    if any(not s.strip() for s in sources):
        raise ValueError("a source is blank")
    return sources


Sources = Annotated[list[str], Field(min_length=1), AfterValidator(_no_blank)]
LakeRoot = Annotated[str, Field(min_length=1)]
