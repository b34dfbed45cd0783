"""Metrics and confidence intervals: known inputs give known values."""

import math

import numpy as np
import pytest

from finetune.evaluate import metrics as M


@pytest.mark.parametrize("options, text, expected", [
    (["strip"], "  The Cat!  ", "The Cat!"),
    (["lower"], "The Cat", "the cat"),
    (["punctuation"], "a, b. c!", "a b c"),
    (["whitespace"], " a \n\t b  ", "a b"),
    (["articles", "whitespace"], "the cat and a dog", "cat and dog"),
    # SQuAD order whatever the listed order: punctuation before articles, whitespace last.
    (["whitespace", "articles", "punctuation", "lower"], "The, cat!", "cat"),
    ([], "  As Is ", "  As Is "),
])
def test_normalize(options, text, expected):
    assert M.normalize(text, options) == expected


def test_exact_match_and_contains_with_normalisation():
    assert M.exact_match(" Paris\n", ["Paris"]) == 1.0  # default strip
    assert M.exact_match("paris", ["Paris"]) == 0.0
    assert M.exact_match("paris", ["Paris"], ["lower"]) == 1.0
    assert M.exact_match("The Paris.", ["paris"], ["lower", "punctuation", "articles", "whitespace"]) == 1.0
    assert M.exact_match("Lyon", ["Paris", "Lyon"]) == 1.0  # any reference
    assert M.contains("It is Paris, of course.", ["Paris"]) == 1.0
    assert M.contains("It is paris.", ["Paris"]) == 0.0
    assert M.contains("It is paris.", ["Paris"], ["lower"]) == 1.0


def test_regex_format_check_and_extraction():
    assert M.regex("Answer: 42", [], r"Answer: \d+") == 1.0
    assert M.regex("I think 42", [], r"Answer: \d+") == 0.0
    assert M.regex("Answer: 42.", ["42"], r"Answer: (\d+)") == 1.0
    assert M.regex("Answer: 41.", ["42"], r"Answer: (\d+)") == 0.0
    assert M.regex("YES", ["yes"], r"\w+", ["lower"]) == 1.0


def test_json_match_compares_fields():
    ref = '{"name": "Zoe", "age": 32, "city": "Vienna"}'
    assert M.json_match('{"city": "Vienna", "age": 32, "name": "Zoe"}', [ref]) == 1.0  # key order is irrelevant
    assert M.json_match('{"name": "Zoe", "age": 32.0, "city": "Vienna"}', [ref]) == 1.0  # 32 == 32.0 in JSON
    assert M.json_match('{"name": "Zoe", "age": 33, "city": "Vienna"}', [ref]) == pytest.approx(2 / 3)
    assert M.json_match('{"name": "Zoe", "age": 32}', [ref]) == pytest.approx(2 / 3)  # a missing field costs
    assert M.json_match('{"name": "Zoe", "age": 32, "city": "Vienna", "x": 1}', [ref]) == pytest.approx(3 / 4)
    assert M.json_match('Sure! {"name": "Zoe", "age": 32, "city": "Vienna"}', [ref]) == 0.0  # strict: prose fails
    assert M.json_match('```json\n{"name": "Zoe"}\n```', [ref]) == 0.0
    assert M.json_match("[1, 2]", ["[1, 2]"]) == 1.0
    assert M.json_match("true", ["1"]) == 0.0  # JSON true is not 1
    with pytest.raises(ValueError, match="reference is not valid JSON"):
        M.json_match("{}", ["not json"])


def test_rouge_l_and_chrf_known_values():
    # LCS("the cat sat", "the cat sat on") = 3: precision 1, recall 3/4, F = 6/7.
    assert M.rouge_l("the cat sat", ["the cat sat on"]) == pytest.approx(6 / 7)
    assert M.rouge_l("dog", ["the cat"]) == 0.0
    assert M.rouge_l("東京 です", ["東京 です"]) == 1.0  # non-ASCII words count (rouge-score's default drops them)
    assert M.chrf("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert M.chrf("xyz", ["the cat sat on the mat"]) == 0.0
    from sacrebleu.metrics import CHRF

    expected = CHRF().sentence_score("the cat sat", ["the cat sat on the mat"]).score / 100
    assert M.chrf("the cat sat", ["the cat sat on the mat"]) == pytest.approx(expected)
    assert 0 < expected < 1


def test_score_dispatch_and_unknown_metric():
    assert M.score("contains", "x Paris y", ["Paris"]) == 1.0
    assert M.score("regex", "id-7", [], pattern=r"id-\d") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.score("bleu", "a", ["a"])


def test_aggregate_weighted_and_perplexity():
    assert M.aggregate([1.0, 0.0, 1.0]) == pytest.approx(2 / 3)
    # Token-weighted loss: (2*1 + 1*4) / (1 + 4) = 1.2 rather than the example mean 1.5.
    assert M.aggregate([2.0, 1.0], [1, 4]) == pytest.approx(1.2)
    assert M.aggregate([2.0, 1.0], [1, 4], M.perplexity) == pytest.approx(math.exp(1.2))


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    base = rng.random(50)
    # Tuned is base + 0.25 on every example: the paired interval is exactly that, whatever the spread.
    lo, hi = M.paired_bootstrap_ci(base, base + 0.25, n=500)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    # An unpaired interval of the same values is wide.
    blo, bhi = M.bootstrap_ci(base, n=500)
    assert bhi - blo > 0.1 and blo < base.mean() < bhi
    # 0 -> 1 on 20 of 20 examples: the delta interval excludes zero; 1 of 20 changing does not.
    zeros, ones = np.zeros(20), np.ones(20)
    assert M.paired_bootstrap_ci(zeros, ones, n=500) == (1.0, 1.0)
    one_flip = zeros.copy()
    one_flip[3] = 1
    lo, hi = M.paired_bootstrap_ci(zeros, one_flip, n=500)
    assert lo == 0.0 and hi > 0
    with pytest.raises(ValueError, match="same examples"):
        M.paired_bootstrap_ci([1, 2], [1])
    assert all(math.isnan(x) for x in M.bootstrap_ci([]))


def test_bootstrap_is_reproducible_seeded_and_agrees_with_an_independent_bootstrap():
    vals = np.random.default_rng(1).random(40)
    tuned = vals + np.random.default_rng(2).normal(0.1, 0.05, 40)
    ci = M.bootstrap_ci(vals, n=10000, seed=3)
    assert ci == M.bootstrap_ci(vals, n=10000, seed=3)  # same seed, same interval
    assert ci != M.bootstrap_ci(vals, n=10000, seed=4)  # the seed is used
    paired = M.paired_bootstrap_ci(vals, tuned, n=10000, seed=3)
    assert paired == M.paired_bootstrap_ci(vals, tuned, n=10000, seed=3)
    assert paired != M.paired_bootstrap_ci(vals, tuned, n=10000, seed=4)

    # An independent computation: a plain percentile bootstrap of the mean on another random stream agrees up to
    # Monte Carlo error (< 2.5% of the width here; a 90% interval instead of 95% would be 8% off); for the paired
    # delta, the bootstrap of the per-example differences.
    def independent_ci(x, resamples=20000):
        rs = np.random.RandomState(99)
        means = [x[rs.randint(0, len(x), len(x))].mean() for _ in range(resamples)]
        return tuple(np.percentile(means, [2.5, 97.5]))

    for got, want in ((ci, independent_ci(vals)), (paired, independent_ci(tuned - vals))):
        assert got == pytest.approx(want, abs=0.05 * (want[1] - want[0]))
    assert paired[1] - paired[0] < 0.6 * (ci[1] - ci[0]), "pairing removes the spread between examples"
