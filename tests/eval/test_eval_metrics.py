"""The evaluation's scoring and journaling, without a server."""
from __future__ import annotations

import json
import math

import pytest

from steer_server.measure import data, metrics
from steer_server.measure.journal import Journal, JournalMismatch
from steer_server.serving import calibration


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


def test_pmi_compares_the_same_answer_tokens_with_and_without_the_prompt():
    # a 3-token answer's log-probabilities after its prompt, and after the document start alone
    after_prompt = [-1.0, -2.0, -3.0]
    assert metrics.pmi(after_prompt, [-2.0, -2.5, -4.5]) == pytest.approx(-2.0 - -3.0)
    # no start token: the first answer token has no prompt-free log-probability, so it is left out
    assert metrics.pmi(after_prompt, [-2.5, -4.5]) == pytest.approx(-2.5 - -3.5)
    assert metrics.pmi([-1.0], []) is None


def test_fluency_score_is_the_exponentiated_nll_cost_capped_at_one():
    assert metrics.fluency_score(2.79, 1.79) == pytest.approx(0.367879, abs=1e-6)  # one nat/token: 1/e
    assert metrics.fluency_score(2.29, 1.79) == pytest.approx(0.606531, abs=1e-6)
    assert metrics.fluency_score(1.5, 1.79) == 1.0  # likelier than the plain answers is not more fluent
    assert metrics.fluency_score(None, 1.79) is None


def test_relevance_score_is_the_share_of_the_plain_pmi_kept():
    assert metrics.relevance_score(0.3, 1.2) == pytest.approx(0.25)
    assert metrics.relevance_score(-0.1, 1.2) == 0.0
    assert metrics.relevance_score(1.5, 1.2) == 1.0
    # plain answers that do not depend on their prompts leave nothing to keep
    assert metrics.relevance_score(0.3, 0.0) is None and metrics.relevance_score(0.3, -0.2) is None


def test_harmonic_mean_is_zero_when_one_score_is():
    assert metrics.harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / 7)  # 3 / (2 + 1 + 4)
    assert metrics.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    assert metrics.harmonic_mean([0.9, None, 0.8]) is None


def test_cell_scores_are_measured_against_the_unsteered_cell():
    from steer_server.measure.sweep import scores

    def summary(topic: float, nll: float, pmi: float) -> dict[str, metrics.Estimate]:
        return {"topic": metrics.Estimate(topic, None, None, 32), "nll": metrics.Estimate(nll, None, None, 32),
                "relevance": metrics.Estimate(pmi, None, None, 30)}

    unsteered, steered = summary(0.0, 1.8, 0.8), summary(0.5, 2.3, 0.4)
    got = scores(steered, unsteered)
    fluency = math.exp(-0.5)
    assert got["fluency_score"].value == pytest.approx(fluency)
    assert got["relevance_score"].value == pytest.approx(0.5)
    assert got["harmonic"].value == pytest.approx(3 / (1 / 0.5 + 1 / fluency + 1 / 0.5))
    assert (got["relevance_score"].n, got["harmonic"].n) == (30, 30)
    plain = scores(unsteered, unsteered)
    assert (plain["fluency_score"].value, plain["relevance_score"].value, plain["harmonic"].value) == (1.0, 1.0, 0.0)
    alone = scores(steered, None)  # a sweep without the unsteered cell
    assert alone["fluency_score"].value is alone["relevance_score"].value is alone["harmonic"].value is None


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


def _cell(layer: int, dose: float, concept: float, nll: float, nll_high: float | None) -> calibration.CellScore:
    return calibration.CellScore(layer, dose, metrics.Estimate(concept, None, None, 32),
                                 metrics.Estimate(nll, None, nll_high, 32), metrics.Estimate(0.03, None, None, 32))


def test_calibration_keeps_to_the_budget_at_the_upper_end_of_each_cells_cost():
    # The wedding calibration of EVALUATION.md, "First try", in short: the cell that moved most
    # cost 0.93 nats on average but up to 1.10, and 1.00 on held-out prompts.
    edge = _cell(22, 0.15, 0.97, 2.56, 2.73)
    safe = _cell(17, 0.1, 0.91, 2.45, 2.58)
    weak = _cell(22, 0.05, 0.41, 1.73, 1.81)
    assert calibration.choose([edge, safe, weak], unsteered_nll=1.63, budget=1.0) == safe
    assert calibration.choose([edge, safe, weak], unsteered_nll=1.63, budget=1.2) == edge
    # One completion a cell gives no interval: its value is the bound.
    lone = _cell(3, 0.2, 0.5, 2.5, None)
    assert calibration.choose([lone], unsteered_nll=1.63, budget=1.0) == lone
    with pytest.raises(calibration.CalibrationError,
                       match=r"no cell costs at most 0.1 nats/token .*\(the cheapest, layer 22 at dose 0.05, costs 0.10, "
                             r"up to 0.18\)"):
        calibration.choose([edge, safe, weak], unsteered_nll=1.63, budget=0.1)
