"""Optimal one-to-one matching for the tracker and the review's flip check (numpy, no scipy).

`match(similarity, threshold)` pairs rows with columns so that the total of `similarity - threshold`
over the chosen pairs is as large as possible, only pairs above the threshold being allowed. That
is the objective ByteTrack gets from `lap.lapjv(cost, cost_limit=...)`: a weak pair is not worth
taking if it blocks a strong one. It is solved exactly by the Hungarian method (shortest
augmenting paths with potentials, O(n^2 m)), its inner step vectorized over the columns; the
matrices here are tens of rows, so a scipy dependency would buy nothing.
"""

from __future__ import annotations

import numpy as np


def match(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, column) pairs, each row and column used at most once, every pair's similarity above
    `threshold`, maximizing the sum of `similarity - threshold`; sorted by row."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be 2-D, got shape {similarity.shape}")
    gain = np.where(similarity > threshold, similarity - threshold, 0.0)
    # Rows and columns without any allowed pair cannot be matched: leave them out of the solve.
    rows = np.flatnonzero(gain.max(axis=1, initial=0.0) > 0)
    cols = np.flatnonzero(gain.max(axis=0, initial=0.0) > 0)
    if len(rows) == 0:
        return []
    sub = gain[np.ix_(rows, cols)]
    transposed = len(rows) > len(cols)
    pairs = min_cost_assignment(-(sub.T if transposed else sub))
    chosen = [(rows[c], cols[r]) if transposed else (rows[r], cols[c]) for r, c in pairs]
    # A zero-gain pair (not allowed) only fills the square; it is the same as leaving both unmatched.
    return sorted((int(r), int(c)) for r, c in chosen if gain[r, c] > 0)


def min_cost_assignment(cost: np.ndarray) -> list[tuple[int, int]]:
    """Assign every row of an n x m cost matrix (n <= m) to a distinct column at minimum total
    cost; returns (row, column) pairs. Potentials u (rows) and v (columns) keep reduced costs
    non-negative; each row is added by a Dijkstra-like search for the cheapest augmenting path."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n > m:
        raise ValueError(f"need rows <= columns, got {n} x {m}")
    # 1-based as in the textbook formulation: column 0 is the virtual start of each search.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: row assigned to column j (0: none)
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the augmenting path
    for row in range(1, n + 1):
        owner[0] = row
        column = 0
        min_reduced = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[column] = True
            current = owner[column]
            reduced = cost[current - 1] - u[current] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            way[1:][better] = column
            candidates = np.where(free, min_reduced[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            min_reduced[~used] -= delta
            column = nxt
            if owner[column] == 0:
                break
        while column:  # flip the path: every column on it takes the row before it
            previous = way[column]
            owner[column] = owner[previous]
            column = previous
    return sorted((int(owner[j]) - 1, j - 1) for j in range(1, m + 1) if owner[j])
