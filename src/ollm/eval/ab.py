"""A/B comparison of two option sets in one process: the same prompts, runs alternating
A B B A A B ... so slow drift (thermals, page cache, other load) falls on both, and a paired
bootstrap interval for each difference, which says when a difference is within noise."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from statistics import NormalDist

# name -> how to read it from a GenerationResult's metrics; higher is better where noted.
METRICS = {
    "prefill_tok_s": (lambda m: m.prefill_tokens_per_second, True),
    "decode_tok_s": (lambda m: m.decode_tokens_per_second, True),
    "ttft_s": (lambda m: m.time_to_first_token, False),
    "total_s": (lambda m: m.prefill_seconds + m.decode_seconds, False),
    "peak_gpu_bytes": (lambda m: float(m.peak_gpu_memory), False),
    "h2d_bytes_per_token": (lambda m: m.bytes_copied_h2d / max(1, m.generated_tokens), False),
    "disk_bytes_per_token": (lambda m: m.bytes_read_disk / max(1, m.generated_tokens), False),
}


@dataclass
class Difference:
    """B minus A for one metric: means, the paired bootstrap interval, and a verdict."""

    metric: str
    mean_a: float
    mean_b: float
    low: float  # interval of mean(B - A)
    high: float
    higher_is_better: bool

    @property
    def diff(self) -> float:
        return self.mean_b - self.mean_a

    @property
    def relative(self) -> float:
        return self.diff / self.mean_a if self.mean_a else 0.0

    @property
    def significant(self) -> bool:
        """The interval excludes zero (a difference is not "no difference at all")."""
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        if not self.significant:
            return "within noise"
        better = (self.diff > 0) == self.higher_is_better
        return "B better" if better else "B worse"

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "diff": self.diff,
            "relative": self.relative,
            "ci_low": self.low,
            "ci_high": self.high,
            "significant": self.significant,
            "verdict": self.verdict(),
        }


def paired_bootstrap(
    a: list[float], b: list[float], level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Interval of mean(b_i - a_i): the percentile bootstrap over resampled pairs, widened to the
    paired Student-t interval where that is wider. With few runs the percentile bootstrap is far
    too narrow (with 4 pairs of equal settings all differences share a sign one time in eight,
    and its interval then excludes 0); the t interval keeps the stated level for small samples."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    if len(set(d)) <= 1:  # identical differences (e.g. bytes moved): no spread to resample
        return (d[0], d[0]) if d else (0.0, 0.0)
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int((1 + level) / 2 * (resamples - 1))]
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    half = t_quantile((1 + level) / 2, n - 1) * sd / n**0.5
    return min(lo, mean - half), max(hi, mean + half)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion around the
    normal quantile; within 1% of the exact value for df >= 4, and exact tables below that)."""
    small = {0.975: (12.706, 4.303, 3.182), 0.995: (63.657, 9.925, 5.841)}
    if df < 4 and round(p, 3) in small:
        return small[round(p, 3)][df - 1]
    z = NormalDist().inv_cdf(p)
    v = max(df, 1)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


@dataclass
class ABReport:
    """Per-run metrics of both sides and the differences."""

    a: dict[str, object]
    b: dict[str, object]
    runs: int
    level: float
    samples_a: dict[str, list[float]] = field(default_factory=dict)
    samples_b: dict[str, list[float]] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    quality: dict[str, float] | None = None  # B against A's distributions (KL, top-1), if asked
    cost_a: dict[str, float | None] = field(default_factory=dict)  # mean cost per token
    cost_b: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "runs": self.runs,
            "level": self.level,
            "samples_a": self.samples_a,
            "samples_b": self.samples_b,
            "differences": [d.to_dict() for d in self.differences],
            "quality": self.quality,
            "cost_per_token": {"A": self.cost_a, "B": self.cost_b},
        }


def order(runs: int) -> list[str]:
    """A B B A A B B A ...: each side goes first equally often and a linear drift cancels."""
    return [s for i in range(runs) for s in (("A", "B") if i % 2 == 0 else ("B", "A"))]


def summarize(report: ABReport, level: float) -> None:
    """Fill ``report.differences`` from the collected samples."""
    for name, (_, higher) in METRICS.items():
        xs, ys = report.samples_a[name], report.samples_b[name]
        lo, hi = paired_bootstrap(xs, ys, level)
        report.differences.append(
            Difference(name, sum(xs) / len(xs), sum(ys) / len(ys), lo, hi, higher)
        )
