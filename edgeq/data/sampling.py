"""Deterministic, class-balanced choice of a subset of a labelled data set."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def balanced_indices(labels: Sequence[int], count: int, seed: int = 0) -> list[int]:
    """``count`` indices spread as evenly as possible over the classes.

    Each class's members are shuffled with ``seed``; classes then take turns in
    sorted order, so the first k picks of a larger count equal a count of k.
    """
    if count <= 0:
        return []
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        queues.append(members)
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(depth < len(q) for q in queues):
        for members in queues:
            if depth < len(members):
                picked.append(members[depth])
                if len(picked) == count:
                    break
        depth += 1
    return picked
