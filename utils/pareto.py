"""Ranking sweep trials: what scores a trial and which trials are on a cost/quality Pareto front.
Apart from ``sweep`` so that ``plots`` can draw fronts without importing the sweep (imports flow one
way: sweep -> plots -> pareto)."""
from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, value) points, lower cost and higher value better: True where no other point is
    at least as good on both and better on one."""
    front = []
    for i, (c, v) in enumerate(points):
        dominated = any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def is_judged(record: dict) -> bool:
    return bool(record.get("quality")) and record["quality"].get("mean") is not None


def score_of(record: dict) -> float | None:
    """What ranks the trials: the judge's mean overall grade, or minus the held-out loss without a judge."""
    if is_judged(record):
        return record["quality"]["mean"]
    return -record["heldout_loss"] if record.get("heldout_loss") is not None else None
