"""Tests for shared.hyperparams: transforms, expansion/adjoint, chain rule, flat vectors, files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.hyperparams import (SHAPES, TRANSFORMS, HyperGroup, HyperParams, dconstrained_dfree,
                                n_units, sigmoid, standard, to_constrained, to_free, unit_index)
from shared.layout import ParamLayout

# MLP 3-4-2: W0 (3,4), b0 (4,), W1 (4,2), b1 (2,) -> 26 parameters in 4 blocks
LAYOUT = ParamLayout(("W0", "b0", "W1", "b1"), ((3, 4), (4,), (4, 2), (2,)))
T = 5
P, B = LAYOUT.size, LAYOUT.n_blocks
U = 4 + 4 + 2 + 2                    # units: columns of W0, entries of b0, columns of W1, entries of b1
FREE_SHAPE = {"scalar": (), "block": (B,), "unit": (U,), "param": (P,), "iter": (T,), "iter_block": (T, B)}


def rng(seed=0):
    return np.random.default_rng(seed)


def random_hp(seed=0, tuned=None):
    """One group per shape, mixing transforms, with random in-range values."""
    r = rng(seed)
    specs = {
        "s": (0.3, "log", "scalar"),
        "blk": (r.uniform(0.1, 2, B), "identity", "block"),
        "par": (r.uniform(1e-4, 1e-2, P), "log", "param"),
        "it": (r.uniform(0.1, 0.9, T), "logit", "iter"),
        "itb": (r.uniform(0.01, 1, (T, B)), "log", "iter_block"),
    }
    return HyperParams.from_values(LAYOUT, T, specs, tuned=tuned)


SHAPE_OF = {"s": "scalar", "blk": "block", "par": "param", "it": "iter", "itb": "iter_block"}

# numpy's exp and log are within LIBM_ULPS ulp of the exact result on every CPU it dispatches
# to (its AVX-512 loops are documented below 4 ulp; glibc's below 1), not correctly rounded:
# a value that goes through them is checked against a bound, never against its last bit.
LIBM_ULPS = 4


def exp_log_rtol(x) -> float:
    """Relative error bound of exp(log(x)) (a log-transformed value read back): log's error,
    LIBM_ULPS ulp of |log x|, is an absolute error of exp's argument and so a relative
    error of its result, plus exp's own LIBM_ULPS ulp."""
    return LIBM_ULPS * np.finfo(float).eps * (1.0 + abs(float(np.log(x))))


# --- transforms ------------------------------------------------------------------

@pytest.mark.parametrize("transform,values", [
    ("log", [1e-8, 0.01, 1.0, 3.0, 1e5]),
    ("logit", [1e-6, 0.1, 0.5, 0.9, 0.999999]),
    ("identity", [-3.0, 0.0, 2.5]),
])
def test_value_free_round_trip(transform, values):
    h = np.array(values)
    s = to_free(transform, h)
    np.testing.assert_allclose(to_constrained(transform, s), h, rtol=1e-10)
    hp = HyperParams.from_values(LAYOUT, T, {"x": (h[0], transform, "scalar")})
    np.testing.assert_allclose(hp.value("x"), h[0], rtol=1e-12)
    np.testing.assert_allclose(hp.group("x").free, s[0], rtol=1e-12)


def test_known_free_values():
    hp = HyperParams.from_values(LAYOUT, T, {"lr": (np.exp(-1.0), "log", "scalar"),
                                             "m": (0.5, "logit", "scalar")})
    assert hp.group("lr").free == pytest.approx(-1.0, abs=1e-15)
    assert hp.group("m").free == pytest.approx(0.0, abs=1e-15)


def test_sigmoid_is_stable_for_large_arguments():
    with np.errstate(all="raise"):
        out = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert np.all(np.isfinite(out))
    assert out[0] == 0.0 and out[-1] == 1.0 and out[2] == 0.5
    assert out[1] == pytest.approx(np.exp(-30.0) / (1 + np.exp(-30.0)), rel=1e-14)


def test_saturated_free_value_is_rejected():
    g = HyperParams.from_values(LAYOUT, T, {"momentum": (0.9, "logit", "scalar")})
    with pytest.raises(ConfigError, match="momentum"):
        g.with_free("momentum", 50.0)  # sigmoid(50) == 1.0 in float64
    with pytest.raises(ConfigError, match="lr"):
        HyperParams.from_values(LAYOUT, T, {"lr": (1.0, "log", "scalar")}).with_free("lr", 1000.0)


# --- expansion against hand-built arrays --------------------------------------------

def test_per_param_each_shape_by_hand():
    hp = random_hp()
    block_of = np.array([0] * 12 + [1] * 4 + [2] * 8 + [3] * 2)
    t = 3
    s = hp.value("s")                    # exp(log(0.3)): 0.3 within the libm's error, not its last bit
    np.testing.assert_allclose(s, 0.3, rtol=exp_log_rtol(0.3), atol=0)
    np.testing.assert_array_equal(hp.per_param("s"), np.full(P, s))        # expansion itself is exact
    np.testing.assert_array_equal(hp.per_param("s", t), np.full(P, s))
    blk = hp.value("blk")
    np.testing.assert_array_equal(hp.per_param("blk"), np.array([blk[b] for b in block_of]))
    np.testing.assert_array_equal(hp.per_param("par"), hp.value("par"))
    it = hp.value("it")
    np.testing.assert_array_equal(hp.per_param("it", t), np.full(P, it[t]))
    itb = hp.value("itb")
    np.testing.assert_array_equal(hp.per_param("itb", t), np.array([itb[t, b] for b in block_of]))
    # schedules: row t equals per_param at t
    for name in SHAPE_OF:
        S = hp.per_param_schedule(name)
        assert S.shape == (T, P)
        for tt in range(T):
            np.testing.assert_array_equal(S[tt], hp.per_param(name, tt))


def test_per_param_returns_writable_copy():
    hp = random_hp()
    a = hp.per_param("par")
    a[:] = -1.0
    assert np.all(hp.value("par") > 0)
    with pytest.raises(ValueError):
        hp.value("par")[0] = 5.0  # read-only: the container is immutable


def test_iteration_shapes_need_valid_t():
    hp = random_hp()
    for name in ("it", "itb"):
        with pytest.raises(ConfigError, match=name):
            hp.per_param(name)
        with pytest.raises(ConfigError, match=name):
            hp.reduce(name, np.ones(P))
        for bad in (-1, T, 2.0, True):
            with pytest.raises(ConfigError, match=r"\[0, 5\)"):
                hp.per_param(name, bad)
    with pytest.raises(ConfigError):
        hp.per_param("s", T)  # out of range even where t is not needed


# --- adjoint (dot-product) test -------------------------------------------------------

ADJOINT_CASES = [(n, t) for n in SHAPE_OF for t in (None, 0, 2, T - 1)
                 if not (t is None and SHAPE_OF[n] in ("iter", "iter_block"))]


@pytest.mark.parametrize("name,t", ADJOINT_CASES)
def test_reduce_is_adjoint_of_per_param(name, t):
    hp = random_hp()
    r = rng(1)
    for _ in range(5):
        h = r.normal(size=FREE_SHAPE[SHAPE_OF[name]])
        g = r.normal(size=P)
        # per_param is linear in the constrained value: build it with identity transform
        lin = HyperParams(LAYOUT, T, (HyperGroup(name, "identity", SHAPE_OF[name], h),))
        red = hp.reduce(name, g, t)
        assert red.shape == FREE_SHAPE[SHAPE_OF[name]]
        lhs = float(np.sum(red * h))
        rhs = float(g @ lin.per_param(name, t))
        assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    if t is not None and SHAPE_OF[name] in ("iter", "iter_block"):
        others = np.delete(red, t, axis=0)
        assert np.all(others == 0)


@pytest.mark.parametrize("name", list(SHAPE_OF))
def test_reduce_schedule_is_adjoint_of_per_param_schedule(name):
    r = rng(2)
    h = r.normal(size=FREE_SHAPE[SHAPE_OF[name]])
    G = r.normal(size=(T, P))
    lin = HyperParams(LAYOUT, T, (HyperGroup(name, "identity", SHAPE_OF[name], h),))
    lhs = float(np.sum(lin.reduce_schedule(name, G) * h))
    rhs = float(np.sum(G * lin.per_param_schedule(name)))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_accumulate_matches_sum_of_reduce():
    hp = random_hp()
    r = rng(3)
    grads = {}
    expect = hp.zero_grads()
    for t in range(T):
        for name in SHAPE_OF:
            g = r.normal(size=P)
            hp.accumulate(grads, name, g, t)
            expect[name] = expect[name] + hp.reduce(name, g, t)
    for name in SHAPE_OF:
        np.testing.assert_allclose(grads[name], expect[name], rtol=1e-12, atol=1e-12)
        assert np.any(grads[name] != 0)


# --- chain rule ---------------------------------------------------------------------------

def test_chain_matches_finite_differences():
    """F(h) = <c, h> per group, so dF/ds = c * dh/ds; compare with central FD in s."""
    hp = random_hp()
    r = rng(4)
    c = {n: r.normal(size=FREE_SHAPE[SHAPE_OF[n]]) for n in SHAPE_OF}
    dfree = hp.chain(c)
    eps = 1e-6
    for n in SHAPE_OF:
        s = np.array(hp.group(n).free)
        fd = np.zeros_like(s)
        for idx in np.ndindex(s.shape):
            sp, sm = s.copy(), s.copy()
            sp[idx] += eps
            sm[idx] -= eps
            Fp = np.sum(c[n] * hp.with_free(n, sp).value(n))
            Fm = np.sum(c[n] * hp.with_free(n, sm).value(n))
            fd[idx] = (Fp - Fm) / (2 * eps)
        np.testing.assert_allclose(dfree[n], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_dconstrained_dfree_formula(transform):
    s = np.linspace(-3, 3, 7)
    h = to_constrained(transform, s)
    eps = 1e-6
    fd = (to_constrained(transform, s + eps) - to_constrained(transform, s - eps)) / (2 * eps)
    np.testing.assert_allclose(dconstrained_dfree(transform, h), fd, rtol=1e-7, atol=1e-10)


def test_chain_rejects_wrong_shape():
    hp = random_hp()
    with pytest.raises(ConfigError, match="itb"):
        hp.chain({"itb": np.ones(T)})


# --- flat vectors ---------------------------------------------------------------------------

def test_flatten_unflatten_round_trip_all_groups():
    hp = random_hp()
    v = hp.flatten()
    assert v.shape == (hp.size,) == (1 + B + P + T + T * B,)
    hp2 = hp.unflatten(v + 0.25)
    np.testing.assert_allclose(hp2.flatten(), v + 0.25)
    np.testing.assert_array_equal(hp.flatten(), v)  # original unchanged
    np.testing.assert_allclose(hp2.value("s"), np.exp(hp.group("s").free + 0.25))
    np.testing.assert_array_equal(hp.unflatten(v).flatten(), v)


def test_flatten_tuned_subset():
    hp = random_hp(tuned=("itb", "s"))  # stored in container order
    assert hp.tuned == ("s", "itb")
    assert hp.size == 1 + T * B and hp.total_size == 1 + B + P + T + T * B
    v = hp.flatten()
    np.testing.assert_array_equal(v, np.concatenate([[hp.group("s").free], hp.group("itb").free.ravel()]))
    new = hp.unflatten(np.arange(hp.size) * 0.01)
    assert new.group("s").free == 0.0
    np.testing.assert_allclose(new.group("itb").free.ravel(), np.arange(1, hp.size) * 0.01)
    for fixed in ("blk", "par", "it"):
        np.testing.assert_array_equal(new.value(fixed), hp.value(fixed))
    # gradients: same order, missing tuned -> zeros, untuned ignored
    grads = {"itb": np.ones((T, B)), "par": np.ones(P)}
    fg = hp.flatten_grads(grads)
    np.testing.assert_array_equal(fg, np.concatenate([[0.0], np.ones(T * B)]))
    with pytest.raises(ConfigError, match="nope"):
        hp.flatten_grads({"nope": np.ones(1)})
    np.testing.assert_allclose(hp.flatten_free_grads({"itb": np.ones((T, B))})[1:],
                               hp.value("itb").ravel())


def test_unflatten_validation():
    hp = random_hp()
    v = hp.flatten()
    with pytest.raises(ConfigError, match=f"expected \\({hp.size},\\)"):
        hp.unflatten(v[:-1])
    bad = v.copy()
    bad[1 + B + 3] = np.nan  # inside 'par'
    with pytest.raises(ConfigError, match="'par'.*nan"):
        hp.unflatten(bad)


# --- validation --------------------------------------------------------------------------------

def test_momentum_out_of_range_message():
    with pytest.raises(ConfigError) as e:
        standard(LAYOUT, T, lr=0.1, momentum=1.2, l2=1e-4, init_scales=0.1)
    assert "momentum" in str(e.value) and "1.2" in str(e.value)
    m = np.full((T, B), 0.9)
    m[2, 1] = 1.0
    with pytest.raises(ConfigError, match=r"momentum.*1\.0 at index \(2, 1\)"):
        standard(LAYOUT, T, lr=0.1, momentum=m, l2=1e-4, init_scales=0.1)


def test_validation_errors():
    with pytest.raises(ConfigError, match=r"'lr'.*\(5, 4\).*\(4, 4\)"):
        standard(LAYOUT, T, lr=np.full((4, B), 0.1), momentum=0.9, l2=1e-4, init_scales=0.1)
    with pytest.raises(ConfigError, match=f"'l2'.*\\({P},\\)"):
        standard(LAYOUT, T, lr=0.1, momentum=0.9, l2=np.full(P - 1, 1e-4), init_scales=0.1)
    l2 = np.full(P, 1e-4)
    l2[7] = np.nan
    with pytest.raises(ConfigError, match="'l2'.*nan at index 7"):
        standard(LAYOUT, T, lr=0.1, momentum=0.9, l2=l2, init_scales=0.1)
    with pytest.raises(ConfigError, match="'lr'.*> 0.*-0.1"):
        standard(LAYOUT, T, lr=-0.1, momentum=0.9, l2=1e-4, init_scales=0.1)
    with pytest.raises(ConfigError, match="'x'.*unknown transform"):
        HyperParams.from_values(LAYOUT, T, {"x": (1.0, "exp", "scalar")})
    with pytest.raises(ConfigError, match="'x'.*unknown shape"):
        HyperParams.from_values(LAYOUT, T, {"x": (1.0, "log", "layer")})
    with pytest.raises(ConfigError, match="unknown hyperparameter groups"):
        standard(LAYOUT, T, lr=0.1, momentum=0.9, l2=1e-4, init_scales=0.1, groups=("lr", "beta"))
    with pytest.raises(ConfigError, match="no hyperparameter group 'zz'"):
        random_hp().value("zz")
    with pytest.raises(ConfigError, match="'blk'"):
        random_hp().with_free("blk", np.ones(B + 1))


def test_standard_container():
    hp = standard(LAYOUT, T, lr=0.1, momentum=0.5, l2=1e-4, init_scales=np.full(B, np.exp(-3)),
                  groups=("lr", "momentum"))
    assert hp.names == ("l2", "lr", "momentum", "init_scale")
    assert hp.tuned == ("lr", "momentum")
    assert [hp.group(n).shape for n in hp.names] == ["param", "iter_block", "iter_block", "block"]
    assert [hp.group(n).transform for n in hp.names] == ["log", "log", "logit", "log"]
    assert hp.size == 2 * T * B
    np.testing.assert_allclose(hp.group("init_scale").free, -3.0)
    np.testing.assert_allclose(hp.group("momentum").free, 0.0, atol=1e-15)
    assert "lr" in hp and "beta" not in hp
    d = hp.describe()
    json.dumps(d)
    # 0.5 through logit (log - log1p: |free| <= 2 x 4 ulp of ln 2) and sigmoid (slope 1/4, plus its own
    # exp, add and divide): within 16 eps of 0.5, not necessarily 0.5 itself
    assert d["groups"]["momentum"] == {"transform": "logit", "shape": "iter_block", "count": T * B, "covers": "all",
                                       "tuned": True, "min": pytest.approx(0.5, rel=16 * np.finfo(float).eps),
                                       "mean": pytest.approx(0.5, rel=16 * np.finfo(float).eps),
                                       "max": pytest.approx(0.5, rel=16 * np.finfo(float).eps)}
    assert d["size"] == hp.size and d["groups"]["l2"]["tuned"] is False


# --- files -----------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    hp = random_hp(tuned=("par", "it"))
    hp.save(tmp_path / "hp")
    assert (tmp_path / "hp.npz").exists() and (tmp_path / "hp.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    for arg in (tmp_path / "hp", str(tmp_path / "hp.npz"), tmp_path / "hp.json"):
        back = HyperParams.load(arg, layout=LAYOUT)
        assert back.names == hp.names and back.tuned == hp.tuned and back.n_iters == T
        assert back.layout == LAYOUT
        for n in hp.names:
            assert back.group(n).transform == hp.group(n).transform
            assert back.group(n).shape == hp.group(n).shape
            np.testing.assert_array_equal(back.group(n).free, hp.group(n).free)


def test_load_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nothere.json"):
        HyperParams.load(tmp_path / "nothere")
    hp = random_hp()
    hp.save(tmp_path / "a")
    (tmp_path / "a.npz").unlink()
    with pytest.raises(ConfigError, match="a.npz.*missing"):
        HyperParams.load(tmp_path / "a")

    hp.save(tmp_path / "b")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ConfigError, match="b.json.*corrupt"):
        HyperParams.load(tmp_path / "b")

    hp.save(tmp_path / "c")
    data = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="c.npz"):
        HyperParams.load(tmp_path / "c")

    # a pair from two different saves is detected
    hp.save(tmp_path / "d")
    random_hp(seed=9).save(tmp_path / "e")
    (tmp_path / "d.npz").write_bytes((tmp_path / "e.npz").read_bytes())
    with pytest.raises(ConfigError, match="d.npz.*does not match"):
        HyperParams.load(tmp_path / "d")

    other = ParamLayout(("W0", "b0"), ((3, 2), (2,)))
    with pytest.raises(ConfigError, match="e.json.*layout"):
        HyperParams.load(tmp_path / "e", layout=other)


def test_loaded_values_are_validated(tmp_path):
    """A description whose shape rule no longer matches the stored array is rejected."""
    hp = random_hp()
    hp.save(tmp_path / "f")
    desc = json.loads((tmp_path / "f.json").read_text())
    desc["n_iters"] = T + 1
    (tmp_path / "f.json").write_text(json.dumps(desc))
    with pytest.raises(ConfigError, match="f.json.*'it'"):
        HyperParams.load(tmp_path / "f")


def test_shapes_constant_is_complete():
    assert set(SHAPES) == set(FREE_SHAPE)
    assert TRANSFORMS == ("log", "logit", "identity")


def test_empty_block_expansion_and_adjoint():
    """A block with no parameters (e.g. shape (3, 0)) expands to nothing and reduces to 0."""
    lay = ParamLayout(("a", "empty", "c"), ((2,), (3, 0), (3,)))
    h = np.array([1.0, 2.0, 3.0])
    hp = HyperParams(lay, 2, (HyperGroup("b", "identity", "block", h),
                              HyperGroup("ib", "identity", "iter_block", np.stack([h, 2 * h]))))
    np.testing.assert_array_equal(hp.per_param("b"), [1, 1, 3, 3, 3])
    np.testing.assert_array_equal(hp.per_param("ib", 1), [2, 2, 6, 6, 6])
    g = np.arange(1.0, 6.0)
    np.testing.assert_array_equal(hp.reduce("b", g), [3, 0, 12])
    np.testing.assert_array_equal(hp.reduce("ib", g, 1), [[0, 0, 0], [3, 0, 12]])
    np.testing.assert_array_equal(hp.reduce_schedule("ib", np.stack([g, g])), [[3, 0, 12], [3, 0, 12]])


# ---------------------------------------------------------------------------
# the 'unit' shape: one value per output unit (column / entry / output channel)

CONV_LAYOUT = ParamLayout(("conv", "scale", "fc.W", "fc.b", "s", "empty"),
                          ((3, 2, 3, 3), (3,), (3, 5), (5,), (), (4, 0)))


def test_unit_index_by_hand():
    idx = unit_index(LAYOUT)
    assert n_units(LAYOUT) == U and idx.shape == (P,)
    w0 = idx[:12].reshape(3, 4)                    # W0 (3, 4): a unit is a column
    assert np.array_equal(w0, np.tile(np.arange(4), (3, 1)))
    assert np.array_equal(idx[12:16], [4, 5, 6, 7])  # b0 entries
    assert np.array_equal(idx[16:24].reshape(4, 2), np.tile([8, 9], (4, 1)))
    assert np.array_equal(idx[24:], [10, 11])
    # conv (out, in, kh, kw): a unit is an output channel; 0-d block: one unit; (4, 0): 0 params, 0 units
    cidx = unit_index(CONV_LAYOUT)
    assert n_units(CONV_LAYOUT) == 3 + 3 + 5 + 5 + 1 + 0
    assert np.array_equal(cidx[:54].reshape(3, 2, 3, 3)[:, 0, 0, 0], [0, 1, 2])
    assert np.all(cidx[:54].reshape(3, 18) == np.arange(3)[:, None])
    assert np.array_equal(cidx[54:57], [3, 4, 5])
    assert np.array_equal(cidx[57:72].reshape(3, 5), np.tile(np.arange(6, 11), (3, 1)))
    assert np.array_equal(cidx[72:77], np.arange(11, 16)) and cidx[77] == 16 and cidx.size == 78


@pytest.mark.parametrize("layout", [LAYOUT, CONV_LAYOUT], ids=["mlp", "conv"])
@pytest.mark.parametrize("t", [None, 0, T - 1])
def test_unit_reduce_is_adjoint_of_per_param(layout, t):
    r = rng(7)
    nu = n_units(layout)
    for _ in range(5):
        h = r.normal(size=nu)
        g = r.normal(size=layout.size)
        lin = HyperParams(layout, T, (HyperGroup("u", "identity", "unit", h),))
        red = lin.reduce("u", g, t)
        assert red.shape == (nu,)
        assert float(red @ h) == pytest.approx(float(g @ lin.per_param("u", t)), rel=1e-12, abs=1e-12)
        G = r.normal(size=(T, layout.size))
        lhs = float(np.sum(lin.reduce_schedule("u", G) * h))
        assert lhs == pytest.approx(float(np.sum(G * lin.per_param_schedule("u"))), rel=1e-12)
        grads = {}
        lin.accumulate(grads, "u", g)
        lin.accumulate(grads, "u", 2 * g)
        np.testing.assert_allclose(grads["u"], 3 * red, rtol=1e-12, atol=1e-12)


def test_unit_shape_in_standard_container_and_files(tmp_path):
    vals = np.exp(rng(3).uniform(-6, -3, U))
    hp = standard(LAYOUT, T, lr=0.1, momentum=0.9, l2=vals, init_scales=0.1, l2_shape="unit")
    assert hp.free("l2").shape == (U,)
    pp = hp.per_param("l2")
    assert np.allclose(pp[:12].reshape(3, 4), vals[:4][None, :])   # every row of W0 shares column values
    hp.save(tmp_path / "h")
    back = HyperParams.load(tmp_path / "h", LAYOUT)
    np.testing.assert_array_equal(back.value("l2"), hp.value("l2"))
    with pytest.raises(ConfigError, match="'unit'.*\\(12,\\)"):
        standard(LAYOUT, T, lr=0.1, momentum=0.9, l2=np.ones(5), init_scales=0.1, l2_shape="unit")


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 2j, 3 + 0j])])
def test_file_with_non_real_values_is_a_named_config_error(tmp_path, bad):
    """A string or complex array in the .npz (checksum made to match) is refused by name,
    not a bare ValueError, nor complex values with the imaginary part dropped."""
    import hashlib
    import io
    import json

    hp = random_hp()
    hp.save(tmp_path / "hp")
    desc = json.loads((tmp_path / "hp.json").read_text())
    with np.load(tmp_path / "hp.npz") as z:
        arrays = {k: z[k] for k in z.files}
    key = desc["groups"][0]["key"]
    arrays[key] = bad
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "hp.npz").write_bytes(buf.getvalue())
    desc["npz_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (tmp_path / "hp.json").write_text(json.dumps(desc))
    with pytest.raises(ConfigError, match=rf"hp.npz.*{desc['groups'][0]['name']}.*real"):
        HyperParams.load(tmp_path / "hp")
