import numpy as np
import pytest

from vishwamai_edge.profile.stats import median, percentile, summarize


def test_median_odd_and_even():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0


@pytest.mark.parametrize("data", [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.5, 0.1, 9.0, 2.2], [5.0, 5.0, 1.0]])
@pytest.mark.parametrize("q", [0, 10, 25, 50, 75, 90, 100])
def test_percentile_matches_numpy_linear(data, q):
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_summarize_values():
    s = summarize([10.0, 12.0, 11.0, None, 30.0])  # None = a run without this reading
    assert s["n"] == 4
    assert s["median"] == 11.5
    assert s["min"] == 10.0 and s["max"] == 30.0
    assert s["q1"] == pytest.approx(10.75)
    assert s["q3"] == pytest.approx(16.5)
    assert s["stdev"] == pytest.approx(float(np.std([10, 12, 11, 30], ddof=1)))


def test_summarize_single_and_empty():
    one = {"median": 2.0, "q1": 2.0, "q3": 2.0, "min": 2.0, "max": 2.0, "stdev": 0.0, "n": 1}
    assert summarize([2.0]) == one
    assert summarize([]) is None
    assert summarize([None, float("nan")]) is None
    with pytest.raises(ValueError):
        percentile([], 50)
