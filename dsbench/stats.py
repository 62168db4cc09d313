"""Comparing two sets of timing samples: an exact Mann–Whitney rank test and the
Hodges–Lehmann estimate of their ratio, with its distribution-free confidence interval.

The unit of a sample is one process (one run of a cell in its own interpreter): steps within
a process share its memory layout, its CPU and the neighbours of its seconds, so they are not
independent draws; processes are. With a handful of processes per side nothing justifies a
normal or log-normal model of their spread (on a shared VM it is skewed and often bimodal), so
the rule is a rank test: exact for small samples, no distribution assumed, and one outlying
process moves it by one rank, not by its size. The ratio estimate is the median of the pairwise
ratios b_j / a_i (Hodges & Lehmann 1963), the estimate that goes with the rank test.

    compare_samples(base_ms, current_ms)  ->  SampleComparison(ratio, low, high, p_slower, p_faster, m, n)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

EXACT_MAX = 400  # m·n up to which the null distribution of U is enumerated exactly (DP, O(m·n·(m+n)))


@dataclass(frozen=True)
class SampleComparison:
    ratio: float  # Hodges–Lehmann estimate of current ÷ base
    low: float  # the distribution-free confidence interval of that ratio
    high: float
    confidence: float  # the interval's actual coverage (U is discrete: at least the requested one)
    p_slower: float  # one-sided P(U ≥ observed) under "no change": the current is slower
    p_faster: float  # one-sided P(U ≤ observed): the current is faster
    m: int  # processes of the base
    n: int  # processes of the current

    def describe(self) -> str:
        return (f"×{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.confidence:.0%} interval), "
                f"p(slower) = {self.p_slower:.3g}, {self.m} vs {self.n} processes")


def mann_whitney_u(a: np.ndarray, b: np.ndarray) -> float:
    """U = #pairs (a_i, b_j) with b_j > a_i, ties counting one half."""
    diff = np.subtract.outer(np.asarray(b, float), np.asarray(a, float))
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum())


@lru_cache(maxsize=256)
def u_null_counts(m: int, n: int) -> tuple[int, ...]:
    """How many of the C(m+n, m) orderings of two untied samples give U = 0, 1, …, m·n."""
    # counts[i][j] = the distribution for sizes (i, j); the largest of the m+n values belongs to
    # the second sample (adding i to U: it beats every value of the first) or to the first.
    prev = [[1] for _ in range(n + 1)]  # i = 0: U is always 0
    for i in range(1, m + 1):
        cur = [[1]]  # j = 0
        for j in range(1, n + 1):
            size = i * j + 1
            dist = [0] * size
            for u, c in enumerate(cur[j - 1]):  # the largest value is the second sample's: U += i
                dist[u + i] += c
            for u, c in enumerate(prev[j]):  # the largest value is the first sample's
                dist[u] += c
            cur.append(dist)
        prev = cur
    return tuple(prev[n])


def u_tail(m: int, n: int, u: float) -> float:
    """P(U ≥ u) under the null hypothesis that both samples come from one distribution."""
    if m * n <= EXACT_MAX:
        counts = u_null_counts(m, n)
        total = math.comb(m + n, m)
        return sum(counts[math.ceil(u - 1e-9):]) / total
    mean, sd = m * n / 2, math.sqrt(m * n * (m + n + 1) / 12)
    return 0.5 * math.erfc((u - 0.5 - mean) / (sd * math.sqrt(2)))  # normal approximation, continuity-corrected


def _interval_rank(m: int, n: int, alpha_each: float) -> int:
    """The largest c ≥ 1 with P(U ≤ c − 1) ≤ alpha_each: the interval is [d_(c), d_(mn+1−c)]."""
    c = 1
    while c < m * n and u_tail(m, n, m * n - c) <= alpha_each:  # P(U ≤ c) = P(U ≥ mn − c) by symmetry
        c += 1
    return c


def compare_samples(base: list[float], current: list[float], confidence: float = 0.90) -> SampleComparison:
    """Current ÷ base from per-process values (e.g. each process's median step time)."""
    a, b = np.asarray(base, float), np.asarray(current, float)
    if a.size == 0 or b.size == 0 or (a <= 0).any() or (b <= 0).any():
        raise ValueError("compare_samples needs positive values on both sides")
    m, n = a.size, b.size
    logs = np.sort(np.subtract.outer(np.log(b), np.log(a)).ravel())  # every pairwise log ratio
    ratio = float(np.exp(np.median(logs)))
    c = _interval_rank(m, n, (1 - confidence) / 2)
    low, high = float(np.exp(logs[c - 1])), float(np.exp(logs[m * n - c]))
    covered = 1 - 2 * u_tail(m, n, m * n - c + 1)  # P(U ≤ c − 1) outside on each side
    u = mann_whitney_u(a, b)
    return SampleComparison(ratio, low, high, covered, u_tail(m, n, u), u_tail(m, n, m * n - u), m, n)


# --- paired ratios: one B ÷ A per pair (and per replicate), the statistic every verdict uses ---

# A timing metric's noise band: the check policy's default samples_threshold (×1.05, policies/
# default.toml) read as ±5%; a measured change inside it is not called a difference.
TIMING_NOISE = 0.05


@dataclass(frozen=True)
class RatioInterval:
    median: float  # median of the pairs' B ÷ A
    low: float  # distribution-free interval for that median (order statistics, sign-test rank)
    high: float
    confidence: float  # its actual coverage; below the requested one when there are too few pairs
    n: int

    def excludes_one(self, band: float) -> int:
        """+1 when the whole interval lies above ×(1 + band), −1 below ×(1 − band), else 0."""
        if self.n == 0 or self.confidence < REQUESTED - 1e-9:
            return 0
        return 1 if self.low > 1 + band else -1 if self.high < 1 - band else 0

    def describe(self) -> str:
        return f"×{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


REQUESTED = 0.90


def ratio_interval(ratios: list[float], confidence: float = REQUESTED) -> RatioInterval:
    """The median of paired ratios with its order-statistic interval [r_(c), r_(n+1−c)]: c the
    largest rank with P(Bin(n, ½) ≤ c − 1) ≤ (1 − confidence) / 2. No distribution assumed, like
    compare_samples; one outlying pair moves the interval by one rank, not by its size. Under 5
    pairs no rank reaches 90%: the interval is the pairs' range, its coverage 1 − 2·½ⁿ, and no
    verdict is drawn from it."""
    r = np.sort(np.asarray([x for x in ratios if x > 0], float))
    n = r.size
    if n == 0:
        return RatioInterval(float("nan"), float("nan"), float("nan"), 0.0, 0)
    tail = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(Bin(n, ½) ≤ k − 1)
    c = 1
    while c < n // 2 and tail(c + 1) <= (1 - confidence) / 2:
        c += 1
    covered = 1 - 2 * tail(c)
    return RatioInterval(float(np.median(r)), float(r[c - 1]), float(r[n - c]), covered, n)
