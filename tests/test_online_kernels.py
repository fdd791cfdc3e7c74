"""The compiled kernels of cpu_ver/online_kernels.py against numpy."""
import numpy as np
import pytest

from cpu_ver import adaptive as ad
from cpu_ver import online_kernels as K
from shared.errors import NonFiniteError
from shared.layout import ParamLayout


def test_exp_within_one_ulp_of_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-745.0, 709.7, 200_000), rng.uniform(-2.0, 2.0, 50_000),
                        rng.uniform(-745.13, -708.0, 20_000)])          # subnormal results
    ref = np.exp(x)
    got = K.exp_array(x, np.empty_like(x))
    ulps = np.abs(got - ref) / np.spacing(ref)
    assert np.max(ulps) <= 1.0


def test_exp_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 709.78, 709.79, 710.5, 1e4,
                  -745.13, -745.14, -746.0, -1e4, 1e-300, -1e-300])
    with np.errstate(over="ignore"):
        ref = np.exp(x)
    got = K.exp_array(x, np.empty_like(x))
    assert np.array_equal(got, ref, equal_nan=True), (got, ref)


def _reference(g, h, b, w, theta, decay, clip, d=None):
    hg = np.clip(g * h, -clip, clip)
    b_new = b - theta * hg
    a = np.exp(b_new)
    hv = h if d is None else h * np.maximum(0.0, 1.0 - a * d)
    return w - a * g, b_new, decay * hv - a * g


@pytest.mark.parametrize("clip,decay,with_d", [(np.inf, 1.0, False), (1e-4, 0.9, False), (np.inf, 1.0, True),
                                               (1e-4, 0.0, True)])
def test_idbd_kernel_matches_numpy(clip, decay, with_d):
    rng = np.random.default_rng(1)
    n = 10_257                                         # a ragged end after the vector loop
    g, h, w = rng.standard_normal(n), rng.standard_normal(n) * 1e-2, rng.standard_normal(n)
    b = rng.uniform(-8.0, 0.5, n)
    d = rng.random(n) if with_d else None
    out = [np.empty(n) for _ in range(3)]
    if with_d:
        bad = K.idbd_diag_kernel(g, h, b, w, d, 0.3, decay, clip, *out)
    else:
        bad = K.idbd_kernel(g, h, b, w, 0.3, decay, clip, *out)
    assert bad == 0
    for got, ref in zip(out, _reference(g, h, b, w, 0.3, decay, clip, d)):
        assert np.linalg.norm(got - ref) <= 1e-14 * np.linalg.norm(ref)


def test_idbd_kernel_counts_nonfinite_and_update_names_the_step():
    n = 100
    g = np.ones(n)
    g[[3, 70]] = [np.nan, np.inf]
    out = [np.empty(n) for _ in range(3)]
    assert K.idbd_kernel(g, np.ones(n), np.zeros(n), np.zeros(n), 0.1, 1.0, np.inf, *out) == 2
    m = ad.make_method("idbd", ParamLayout(("w",), ((n,),)), lr=0.1, theta=0.1)
    st = m.init(np.zeros(n))
    w, st = m.update(ad.GradInfo(np.ones(n), None, None), st, np.zeros(n))   # step 0: h = 0, fine
    with pytest.raises(NonFiniteError, match="step 1"):
        m.update(ad.GradInfo(g, None, None), st, w)


def test_idbd_pass_is_vectorised():
    """The one-pass loop is only fast when LLVM vectorises it, which needs the raised
    run-time check threshold (``online_kernels._allow_runtime_checks``)."""
    import re

    import llvmlite.binding as llvm

    if not llvm.get_host_cpu_features().get("avx2"):
        pytest.skip("no AVX2 on this CPU: nothing to look for in the machine code")
    a = [np.ones(64) for _ in range(8)]
    K._idbd_pass(a[0], a[1], a[2], a[3], a[0], 0.1, 1.0, np.inf, a[4], a[5], a[6])
    asm = K._idbd_pass.inspect_asm(K._idbd_pass.signatures[0])
    assert re.search(r"vfn?m(add|sub)\w*pd\s[^\n]*ymm", asm), "IDBD's pass was not vectorised"
