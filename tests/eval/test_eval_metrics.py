"""The evaluation's scoring and journaling, without a server."""
from __future__ import annotations

import json

import pytest

from steer_server.eval import data, metrics
from steer_server.eval.journal import Journal, JournalMismatch


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_published_intervals(successes, n, low, high):
    est = metrics.wilson(successes, n)
    assert est.value == successes / n
    assert est.low == pytest.approx(low, abs=5e-5)
    assert est.high == pytest.approx(high, abs=5e-5)


def test_distinct_2_counts_repeated_word_pairs():
    # bigrams: (the cat) (cat the) (the cat) (cat sat): 3 distinct of 4
    assert metrics.distinct_n("The cat, the cat sat.") == 0.75
    assert metrics.distinct_n("alone") is None


def test_lexicon_matches_whole_words_only():
    lexicon = data.wedding_lexicon()
    assert lexicon.mentions("Their WEDDING was lovely.")
    assert not lexicon.mentions("The wedge held the door.")  # a prefix is not a word
    assert lexicon.density("the bride and the groom") == pytest.approx(2 / 5)


def test_sentiment_orders_kind_above_hostile():
    assert metrics.sentiment("I love you, you are wonderful") > 0.5 > -0.5 > metrics.sentiment("I hate you, you are awful")


def test_shipped_texts_span_every_relatedness_bin():
    from steer_server.eval.paper import BINS, bin_of

    lexicon = data.wedding_lexicon()
    counts = {label: 0 for _, _, label in BINS}
    for text in data.offtopic_texts():
        counts[bin_of(lexicon.density(text))] += 1
    assert all(count >= 8 for count in counts.values()), counts


def test_journal_resumes_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "records.jsonl"
    with Journal(path, {"run": 1}) as journal:
        journal.add("a", {"value": 1})
        journal.add("b", {"value": 2})
    with path.open("a") as f:
        f.write('{"key": "c", "val')  # an interrupted write
    with Journal(path, {"run": 1}) as journal:
        assert set(journal.records) == {"a", "b"}
        journal.add("c", {"value": 3})
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"key"') and line.endswith("}")]
    assert [r["key"] for r in lines] == ["a", "b", "c"]
    with pytest.raises(JournalMismatch):
        Journal(path, {"run": 2})
