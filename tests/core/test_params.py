import numpy as np
import pytest

from fedloom.core.params import Params, ParamsError


def make(w: float = 1.0) -> Params:
    return Params.from_arrays({"w": np.full((2, 3), w), "b": np.arange(3)})


def test_views_share_the_flat_buffer() -> None:
    p = make()
    p.flat[:] = np.arange(9)
    assert p["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert p["b"].tolist() == [6, 7, 8]
    assert list(p) == ["w", "b"]


def test_sum_of_params_equals_sum_of_flat_vectors() -> None:
    rng = np.random.default_rng(0)
    a, b = make(), make()
    a.flat[:] = rng.normal(size=9)
    b.flat[:] = rng.normal(size=9)
    total = a + b * 2.0 - a
    np.testing.assert_allclose(total.flat, 2 * b.flat, rtol=1e-6)
    assert total.layout == a.layout


def test_add_scaled_is_in_place() -> None:
    a, b = make(1.0), make(2.0)
    before = a.flat
    a.add_scaled_(b, 0.5)
    assert a.flat is before
    assert a["w"][0, 0] == 2.0


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        ({"w": np.zeros((2, 3))}, "missing tensor(s) b"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, "tensor 'w' has shape (3, 2)"),
        ({"w": np.zeros((2, 3)), "b": np.zeros(3), "c": np.zeros(1)}, "unexpected tensor(s) c"),
        ({"b": np.zeros(3), "w": np.zeros((2, 3))}, "different order"),
    ],
)
def test_mismatched_layouts_are_refused_with_a_reason(
    other: dict[str, np.ndarray], reason: str
) -> None:
    with pytest.raises(ParamsError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        _ = make() + Params.from_arrays(other)


def test_dtype_mismatch_and_unsupported_dtype() -> None:
    with pytest.raises(ParamsError, match="dtype float64"):
        _ = make() + Params.from_arrays({"w": np.zeros((2, 3)), "b": np.zeros(3)}, np.float64)
    with pytest.raises(ParamsError, match="not a supported float dtype"):
        Params.from_arrays({"w": np.zeros(2)}, np.int32)


def test_finiteness_and_norm() -> None:
    p = make(0.0)
    p.flat[:] = 0
    p["b"][:] = [3, 4, 0]
    assert p.norm() == pytest.approx(5.0)
    assert p.is_finite()
    p["w"][1, 1] = np.nan
    assert not p.is_finite()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finiteness_when_the_sum_of_squares_overflows(dtype: type) -> None:
    """Huge but finite values whose sum of squares (the fast check) overflows are finite; one
    Inf or -Inf is not."""
    big = np.finfo(dtype).max
    p = Params.from_arrays({"w": np.full(8, big)}, dtype)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.dot(p.flat, p.flat))  # the fast check cannot decide here
    assert p.is_finite()
    for bad in (np.inf, -np.inf, np.nan):
        p.flat[3] = bad
        assert not p.is_finite()
        p.flat[3] = big
    p.flat[:4], p.flat[4:] = np.inf, -np.inf  # the sum is NaN, not Inf
    assert not p.is_finite()


def test_layout_hash_survives_pickling_into_another_process() -> None:
    """The cached hash is recomputed on unpickling (string hashes differ between processes)."""
    import pickle
    import subprocess
    import sys

    blob = pickle.dumps(make().layout)
    check = (
        "import pickle, sys; layout = pickle.loads(sys.stdin.buffer.read()); "
        "assert hash(layout) == hash((layout.specs, layout.dtype)), 'stale hash'"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    subprocess.run([sys.executable, "-c", check], input=blob, env=env, check=True)
