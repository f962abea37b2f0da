"""benchmarks/report.py: the interleaving order, the bootstrap interval of a median ratio and how a goal is judged
with it (met by the median; resolved only when the interval lies on one side of the threshold)."""

import importlib
import random
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("report")


def test_interleave_runs_blocks_back_to_back_and_rotates_the_order_when_asked(report):
    for rotate, expected in ((False, "abcabcabcabc"), (True, "abcbcacababc")):
        order = []
        results = report.interleave({name: (lambda name=name: order.append(name) or name) for name in "abc"},
                                    reps=4, rotate=rotate)  # fmt: skip
        assert "".join(order) == expected
        assert results == {name: [name] * 4 for name in "abc"}  # results keep their candidate, whatever the order


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_medians(report):
    values = [1.00, 1.02, 0.99, 1.05, 1.01, 1.03, 1.00, 0.98, 1.04, 1.01]
    low, high = report.bootstrap_interval(values, resamples=2000, seed=3)
    rng = random.Random(3)  # the same computation written out
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    assert (low, high) == (medians[49], medians[1950])  # the 2.5 % and 97.5 % points of 2000
    assert low <= statistics.median(values) <= high and low < high
    assert report.bootstrap_interval(values, resamples=2000, seed=3) == (low, high)  # seeded: reproducible
    # More blocks of the same spread give a narrower interval: the point of running more of them.
    wide = report.bootstrap_interval(values[:5])
    narrow = report.bootstrap_interval(values * 8)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="at least 2 blocks, got 1"):
        report.bootstrap_interval([1.0])


@pytest.mark.parametrize(
    ("goal", "met", "resolved"),
    [
        (("<=", 1.10), True, True),  # the whole interval [0.99, 1.03] is within the goal
        (("<=", 1.01), True, False),  # the median 1.005 meets it, the interval straddles it
        (("<=", 0.95), False, True),  # missed for certain
        ((">=", 1.00), True, False),
        ((">=", 0.90), True, True),
        ((">=", 1.05), False, True),
    ],
)
def test_a_goal_is_met_by_the_median_and_resolved_by_the_interval(report, goal, met, resolved):
    figure = report.Figure("ratio", [1.0, 1.02, 0.99, 1.05, 1.01, 1.03, 1.00, 0.98], goal=goal, interval=(0.99, 1.03))
    assert (figure.met, figure.resolved) == (met, resolved)
    summary = figure.summary()
    assert summary["interval_95"] == [0.99, 1.03] and summary["resolved"] is resolved
    row = report.table([figure]).splitlines()[2]
    assert "0.99 – 1.03" in row and row.endswith("(not resolved) |") is (not resolved)


def test_without_an_interval_nothing_is_claimed_about_resolution(report):
    assert report.Figure("ratio", [1.0, 1.1], goal=("<=", 1.2)).resolved is None
