"""A metric series as one line of block characters, for a terminal."""

from __future__ import annotations

from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 60) -> str:
    """`values` squeezed into at most `width` characters (each the mean of its share of the
    points), scaled from the smallest to the largest; a share with no finite value is a space."""
    if not values:
        return ""
    buckets: list[float | None] = []
    count = min(width, len(values))
    for index in range(count):
        share = values[index * len(values) // count : (index + 1) * len(values) // count]
        finite = [value for value in share if value is not None]
        buckets.append(sum(finite) / len(finite) if finite else None)
    known = [value for value in buckets if value is not None]
    if not known:
        return " " * len(buckets)
    low, high = min(known), max(known)
    span = high - low
    top = len(BLOCKS) - 1
    return "".join(
        " "
        if value is None
        else BLOCKS[round((value - low) / span * top) if span > 0 else top // 2]
        for value in buckets
    )
