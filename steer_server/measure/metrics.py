"""What a completion scores: topic (lexicon), sentiment (VADER), fluency (NLL), relevance to
its prompt (PMI), repetition (distinct-2); the intervals the summaries report; and the [0, 1]
scores a cell gets against the unsteered cell, with their harmonic mean (as AxBench combines
concept, instruction relevance and fluency).

Intervals are 95% by default: Wilson for shares, the normal approximation (mean ± z·s/√n)
for means, which is close enough at the sample sizes an evaluation cell holds (≥ 16).
"""
from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Letters, with inner apostrophes ("don't"); digits and punctuation separate words.
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``."""
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Lexicon:
    """A set of whole words that mark a topic (compared lower-cased)."""

    name: str
    entries: frozenset[str]

    @classmethod
    def from_file(cls, path: Path, name: str | None = None) -> Lexicon:
        """One word a line; ``#`` starts a comment."""
        entries = {line.split("#", 1)[0].strip().lower() for line in path.read_text(encoding="utf-8").splitlines()}
        entries.discard("")
        if not entries:
            raise ValueError(f"{path}: the lexicon holds no words")
        return cls(name or path.stem, frozenset(entries))

    def hits(self, text: str) -> int:
        return sum(w in self.entries for w in words(text))

    def mentions(self, text: str) -> bool:
        return self.hits(text) > 0

    def density(self, text: str) -> float:
        """Share of the text's words that are in the lexicon (0 for a text without words)."""
        found = words(text)
        return sum(w in self.entries for w in found) / len(found) if found else 0.0


def distinct_n(text: str, n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams of the text's words (1 = no repeated n-gram);
    None when the text has fewer than n words."""
    found = words(text)
    grams = [tuple(found[i:i + n]) for i in range(len(found) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score in [-1, 1] (-1 most negative)."""
    return float(_vader().polarity_scores(text)["compound"])


def mean_nll(token_logprobs: Sequence[float]) -> float | None:
    """Mean negative log-likelihood (nats per token); None for no tokens."""
    return -statistics.fmean(token_logprobs) if token_logprobs else None


def pmi(conditional: Sequence[float], unprompted: Sequence[float]) -> float | None:
    """Per-token pointwise mutual information between a prompt and an answer (nats): the mean over
    the answer's tokens of log p(token | prompt, earlier tokens) − log p(token | earlier tokens).

    ``conditional``: the answer tokens' log-probabilities after the prompt; ``unprompted``: the
    same tokens' after nothing but the document start. Without a start token the first answer
    token has nothing to be conditioned on and ``unprompted`` lacks it, so both are read over
    the last ``len(unprompted)`` tokens. None when no token is scored by both."""
    if not unprompted or len(unprompted) > len(conditional):
        return None
    return statistics.fmean(conditional[len(conditional) - len(unprompted):]) - statistics.fmean(unprompted)


def fluency_score(nll: float | None, unsteered_nll: float | None) -> float | None:
    """exp(−(NLL − unsteered NLL)) capped at 1: 1 when steering costs nothing, 0.37 at one
    nat/token more; a steered text likelier than the plain one is not better than fluent."""
    if nll is None or unsteered_nll is None:
        return None
    return min(1.0, math.exp(unsteered_nll - nll))


def relevance_score(value: float | None, unsteered: float | None) -> float | None:
    """PMI / unsteered PMI clamped to [0, 1]: the share of the plain answers' dependence on the
    prompt that the steered answers keep. None when the plain answers do not depend on their
    prompts (PMI ≤ 0), where there is nothing to keep."""
    if value is None or unsteered is None or unsteered <= 0:
        return None
    return min(1.0, max(0.0, value / unsteered))


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of scores in [0, 1]; 0 when any is 0 (failing one criterion fails the cell),
    None when any is unknown."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval and the number of observations behind it."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def wilson(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """Share successes/n with the Wilson score interval (sensible at 0 and n, unlike the Wald one)."""
    if n == 0:
        return Estimate(None, None, None, 0)
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(values: Iterable[float | None], confidence: float = 0.95) -> Estimate:
    """Mean of the values that are not None, ± z·s/√n."""
    present = [v for v in values if v is not None]
    if not present:
        return Estimate(None, None, None, 0)
    mean = statistics.fmean(present)
    if len(present) == 1:
        return Estimate(mean, None, None, 1)
    half = _z(confidence) * statistics.stdev(present) / math.sqrt(len(present))
    return Estimate(mean, mean - half, mean + half, len(present))
