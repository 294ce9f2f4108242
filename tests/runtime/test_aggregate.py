import numpy as np
import pytest

from fedloom.core.params import Params
from fedloom.core.types import Update
from fedloom.runtime.aggregate import StreamingMean, check_update


def params(values: list[float], dtype: type = np.float32) -> Params:
    return Params.from_arrays({"w": np.array(values[:2]), "b": np.array(values[2:])}, dtype)


def test_weighted_mean_by_examples_and_unweighted_extras() -> None:
    layout = params([0, 0, 0]).layout
    mean = StreamingMean(layout, {"c": layout})
    mean.add(Update(params([1, 2, 3]), 1, extras={"c": params([1, 1, 1])}, metrics={"loss": 4.0}))
    mean.add(Update(params([4, 5, 6]), 3, extras={"c": params([3, 3, 3])}, metrics={"loss": 0.0}))
    agg = mean.result()
    # (1*[1,2,3] + 3*[4,5,6]) / 4 = [13/4, 17/4, 21/4]
    np.testing.assert_allclose(agg.delta.flat, [3.25, 4.25, 5.25])
    np.testing.assert_allclose(agg.extras["c"].flat, [2, 2, 2])
    assert agg.metrics == {"loss": 1.0}
    assert (agg.num_clients, agg.num_examples) == (2, 4)


def test_memory_does_not_grow_with_clients() -> None:
    layout = params([0, 0, 0]).layout
    mean = StreamingMean(layout)
    buffers = {id(mean._delta.flat), id(mean._scratch)}
    for i in range(1000):
        mean.add(Update(params([i, i, i]), 1))
    assert {id(mean._delta.flat), id(mean._scratch)} == buffers
    np.testing.assert_allclose(mean.result().delta.flat, [499.5] * 3)


def test_empty_aggregate_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        StreamingMean(params([0, 0, 0]).layout).result()


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ("not an update", "returned str"),
        (Update(params([1, 2, 3]), 0), "num_examples must be a positive integer"),
        (Update(params([1, 2, 3]), True), "num_examples must be a positive integer"),
        (Update(params([1, 2, np.nan]), 5), "NaN or Inf"),
        (Update(params([1, 2, np.inf]), 5), "NaN or Inf"),
        (Update(params([1, 2, 3], np.float64), 5), "dtype float64"),
        (Update(Params.from_arrays({"w": np.zeros(2), "x": np.zeros(1)}), 5), "missing tensor"),
        (Update(Params.from_arrays({"w": np.zeros(3), "b": np.zeros(1)}), 5), "shape (3,)"),
        (Update(params([1, 2, 3]), 5, metrics={"loss": float("nan")}), "metric 'loss'"),
        (Update(params([1, 2, 3]), 5, extras={"c": params([0, 0, 0])}), "unexpected extra"),
    ],
)
def test_check_update_names_what_is_wrong(update: object, reason: str) -> None:
    found = check_update(update, params([0, 0, 0]).layout, {})
    assert found is not None and reason in found


def test_check_update_requires_declared_extras() -> None:
    layout = params([0, 0, 0]).layout
    assert "missing extra(s) c" in str(
        check_update(Update(params([1, 2, 3]), 1), layout, {"c": layout})
    )
    assert check_update(Update(params([1, 2, 3]), 1), layout, {}) is None
