"""fastopt.init against torch.nn.init's formulas: gains, fans, bounds and sample statistics."""
import math
import warnings

import numpy as np
import pytest

from fastopt import init

torch = pytest.importorskip("torch")

SHAPES = [(256, 128), (64, 32, 3, 3), (128, 16, 5), (8, 4, 2, 3, 3)]
GAINS = [("linear", None), ("conv1d", None), ("conv2d", None), ("conv3d", None),
         ("conv_transpose2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
         ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 1), ("selu", None)]


@pytest.mark.parametrize("name,param", GAINS)
def test_calculate_gain_matches_torch(name, param):
    assert init.calculate_gain(name, param) == torch.nn.init.calculate_gain(name, param)


def test_calculate_gain_errors_match_torch():
    for args in (("softplus",), ("leaky_relu", True), ("leaky_relu", "0.1")):
        with pytest.raises(ValueError):
            torch.nn.init.calculate_gain(*args)
        with pytest.raises(ValueError):
            init.calculate_gain(*args)


@pytest.mark.parametrize("shape", SHAPES + [(3, 5)])
def test_fans_match_torch(shape):
    want = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert init.fan_in_and_fan_out(shape) == want
    assert init.fan_in_and_fan_out(np.empty(shape, np.float32)) == want
    with pytest.raises(ValueError, match="fewer than 2"):
        init.fan_in_and_fan_out((7,))


def _torch_std(fn, shape, **kw):
    """The std of torch's documented formula, from the fan and gain helpers its
    initialisers call."""
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    if fn.startswith("xavier"):
        return kw.get("gain", 1.0) * math.sqrt(2.0 / (fan_in + fan_out))
    fan = fan_in if kw.get("mode", "fan_in") == "fan_in" else fan_out
    return torch.nn.init.calculate_gain(kw.get("nonlinearity", "leaky_relu"), kw.get("a", 0)) / math.sqrt(fan)


CASES = [
    ("xavier_uniform_", {}), ("xavier_uniform_", dict(gain=5 / 3)),
    ("xavier_normal_", {}), ("xavier_normal_", dict(gain=2.0)),
    ("kaiming_uniform_", {}), ("kaiming_uniform_", dict(mode="fan_out", nonlinearity="relu")),
    ("kaiming_uniform_", dict(a=math.sqrt(5))),          # torch's nn.Linear default
    ("kaiming_normal_", {}), ("kaiming_normal_", dict(mode="fan_out", nonlinearity="tanh")),
    ("kaiming_normal_", dict(a=0.1, nonlinearity="leaky_relu")),
]


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("fn,kw", CASES, ids=[f"{f}-{sorted(k.items())}" for f, k in CASES])
def test_bounds_and_statistics_match_torch(fn, kw, shape):
    std = _torch_std(fn, shape, **kw)
    if fn.startswith("xavier"):
        assert init.xavier_std(shape, kw.get("gain", 1.0)) == pytest.approx(std, rel=1e-15)
    else:
        assert init.kaiming_std(shape, kw.get("a", 0), kw.get("mode", "fan_in"),
                                kw.get("nonlinearity", "leaky_relu")) == pytest.approx(std, rel=1e-15)
    mine = getattr(init, fn)(np.empty(shape, np.float32), **kw, seed=0)
    ref = getattr(torch.nn.init, fn)(torch.empty(shape), **kw, generator=torch.Generator().manual_seed(0)).numpy()
    n = mine.size
    for x in (mine, ref):
        assert abs(x.mean()) < 5 * std / math.sqrt(n)
        assert x.std() == pytest.approx(std, rel=6 / math.sqrt(n))
    if "uniform" in fn:
        bound = math.sqrt(3) * std
        for x in (mine, ref):
            assert np.abs(x).max() <= np.float32(bound)
            assert np.abs(x).max() > bound * (1 - 20 / n)           # the bound is reached
    else:
        # Normal: the fourth moment separates N from U with the same std.
        assert np.mean((mine / std) ** 4) == pytest.approx(3.0, rel=0.1)


def test_seeding_dtypes_and_layouts():
    a = init.kaiming_uniform((64, 32), seed=3)
    b = init.kaiming_uniform((64, 32), rng=np.random.default_rng(3))
    assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
    assert init.kaiming_uniform((64, 32), seed=4).tobytes() != a.tobytes()
    init.manual_seed(11)
    c = init.xavier_normal((10, 10))
    init.manual_seed(11)
    assert init.xavier_normal((10, 10)).tobytes() == c.tobytes()
    # float64 and float16 and a non-contiguous view fill in place.
    d = init.kaiming_normal((50, 40), dtype=np.float64, seed=1)
    assert d.dtype == np.float64
    h = np.zeros((40, 50), np.float16)
    assert init.xavier_uniform_(h, seed=1) is h and h.dtype == np.float16 and np.abs(h).max() > 0
    big = np.zeros((40, 100), np.float32)
    view = big[:, ::2]
    init.kaiming_uniform_(view, seed=2)
    assert np.all(big[:, 1::2] == 0) and np.all(view != 0)
    # The in-place fill of a contiguous array writes into that array's memory.
    w = np.zeros((32, 16), np.float32)
    assert init.kaiming_normal_(w, seed=0) is w and np.count_nonzero(w) == w.size


@pytest.mark.parametrize("mean,std,a,b", [
    (0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.04, 0.04), (1.0, 2.0, 0.5, 1.5),
    (0.0, 1.0, 3.0, math.inf), (0.0, 1.0, -math.inf, -4.0), (0.0, 1.0, 2.0, 2.5),
])
def test_trunc_normal_moments(mean, std, a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = init.trunc_normal((200_000,), mean, std, a, b, dtype=np.float64, seed=0)
    assert x.min() >= a and x.max() <= b
    # The truncated normal's mean and variance (closed form).
    al, be = (a - mean) / std, (b - mean) / std
    phi = lambda z: 0.0 if math.isinf(z) else math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    zm = cdf(be) - cdf(al)
    m = (phi(al) - phi(be)) / zm
    zal = 0.0 if math.isinf(al) else al * phi(al)
    zbe = 0.0 if math.isinf(be) else be * phi(be)
    var = 1 + (zal - zbe) / zm - m * m
    assert x.mean() == pytest.approx(mean + std * m, abs=6 * std * math.sqrt(var / x.size))
    assert x.var() == pytest.approx(std * std * var, rel=0.03)


def test_trunc_normal_float32_stays_in_bounds_and_matches_torch_stats():
    x = init.trunc_normal((500, 400), std=0.02, a=-0.04, b=0.04, seed=5)
    t = torch.nn.init.trunc_normal_(torch.empty(500, 400), std=0.02, a=-0.04, b=0.04,
                                    generator=torch.Generator().manual_seed(5)).numpy()
    assert x.dtype == np.float32
    assert x.min() >= np.float32(-0.04) and x.max() <= np.float32(0.04)
    assert x.std() == pytest.approx(t.std(), rel=0.01)
    assert x.mean() == pytest.approx(t.mean(), abs=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="Mode"):
        init.kaiming_uniform((3, 4), mode="fan_avg")
    with pytest.raises(ValueError, match="Unsupported"):
        init.kaiming_normal((3, 4), nonlinearity="gelu")
    with pytest.raises(ValueError, match="fewer than 2"):
        init.xavier_uniform((5,))
    with pytest.raises(TypeError):
        init.kaiming_uniform_(np.zeros((3, 3), np.int32))
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        init.normal_([[1.0, 2.0]])
    with pytest.raises(ValueError, match="not both"):
        init.xavier_normal((3, 3), rng=np.random.default_rng(0), seed=1)
    with pytest.raises(TypeError, match="Generator"):
        init.xavier_normal((3, 3), rng=np.random.RandomState(0))
    with pytest.raises(ValueError):
        init.trunc_normal((3,), a=1.0, b=1.0)
    with pytest.raises(ValueError):
        init.trunc_normal((3,), std=0.0)
    ro = np.zeros((3, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        init.kaiming_uniform_(ro)
    with pytest.warns(UserWarning, match="zero-element"):
        z = init.kaiming_uniform_(np.zeros((0, 3), np.float32))
    assert z.shape == (0, 3)
