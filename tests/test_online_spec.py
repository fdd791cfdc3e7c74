"""The table of online methods (shared/online_spec.py): both backends check options from it,
its defaults are the constructors', and a new method needs only a specification and one
update per backend: a toy method added here is cross-checked like the built-in ones (its
one-step hypergradient against central finite differences in each backend, and gpu_ver's
against cpu_ver's, float64, Theano's C backend)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from cpu_ver import online as cpu  # noqa: E402
from cpu_ver.online import rules as cpu_rules  # noqa: E402
from gpu_ver import models as M  # noqa: E402
from gpu_ver import online as gpu  # noqa: E402
from gpu_ver.online import rules as gpu_rules  # noqa: E402
from gpu_ver.online.crosscheck import rel_difference  # noqa: E402
from gpu_ver.online.grouping import tt  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from shared.online_spec import (REG_STATE, SPECS, MethodSpec, Option, check_granularity, check_l2,  # noqa: E402
                                 check_meta_step, check_positive, method_spec)

FD_TOL, CROSS_TOL = 1e-6, 1e-10      # as tests/test_gpu_adaptive.py (FD: O(h^4) stencil; cross: rounding)


# ---------------------------------------------------------------------------
# A toy method: sign hypergradient descent on log learning rates (per group),
#   hg_t = d L(w_t) / d s_{t-1} = -alpha_{t-1} (g_t . u_{t-1})  (per group: sums)
#   s_t = s_{t-1} - beta sign(hg_t);  w_{t+1} = w_t - alpha_t g_t;  u_t = g_t

def toy_init(opts, n_groups, w0):
    z = np.zeros_like(w0)
    return dict(t=np.int64(0), hyper=np.log(np.full(n_groups, float(opts["lr"]))), u=z, hg=np.zeros(n_groups))


TOY = MethodSpec(
    "sign-hd",
    (Option("lr", 0.2, lambda v, n: check_positive("initial learning rate", v)),
     Option("beta", 0.05, lambda v, n: check_meta_step("beta", v)),
     Option("granularity", "block", check_granularity),
     Option("l2", 0.0, lambda v, n: check_l2(v, n))),
    state=("t", "hyper", "u", "hg"), init=toy_init, grouping="granularity", lr_view=("hyper", "log"))


def toy_update_cpu(opts, gr, info, state, w):
    hg = -cpu.reduce_dot(gr, info.g, state.u) * np.exp(state.hyper)
    hyper = state.hyper - opts["beta"] * np.sign(hg)
    return w - cpu.expand(gr, np.exp(hyper)) * info.g, dict(t=state.t + 1, hyper=hyper, u=info.g, hg=hg)


def toy_update_gpu(opts, gr, c):
    S = c.S
    hg = -gr.reduce(c.g * S["u"]) * tt.exp(S["hyper"])
    hyper = S["hyper"] - opts["beta"] * tt.sgn(hg)
    w_new = c.w - gr.expand(tt.exp(hyper)) * c.g
    return w_new, {"t": S["t"] + 1, "hyper": hyper, "u": c.g, "hg": hg}, {"learning-rate hypergradient": tt.sum(hg)}


@pytest.fixture(scope="module")
def problem():
    return cpu.build_check_problem(0)


@pytest.mark.parametrize("granularity", ["block", "unit"])
def test_toy_method_is_cross_checked_between_the_backends(problem, granularity):
    model = M.MLP(problem.sizes, problem.activation)
    kw = dict(granularity=granularity, l2=problem.l2)
    mine = cpu.method_onestep(cpu_rules.from_spec(TOY, toy_update_cpu, model.layout, **kw), problem)
    run = gpu.OnlineRun(model, gpu_rules.from_spec(TOY, toy_update_gpu, model.layout, **kw), problem.w0,
                        name=f"toy_{granularity}")
    theirs = gpu.run_onestep(gpu.prepare(run, problem), problem)
    assert set(mine) == set(theirs) == {"lr"}
    assert np.all(mine["lr"].value != 0)                            # the check is not vacuous
    assert cpu.fd_check(mine["lr"]) < FD_TOL
    assert rel_difference(gpu.method_onestep(run.method, problem)["lr"].value, mine["lr"].value) < CROSS_TOL
    assert gpu.fd_check(theirs["lr"]) < FD_TOL
    assert rel_difference(theirs["lr"].value, mine["lr"].value) < CROSS_TOL
    # the rule ran as written: the steps moved the log rates by +-beta per group
    a = run.state()
    moves = (a["hyper"] - np.log(0.2)) / 0.05
    assert np.allclose(moves, np.round(moves), rtol=0, atol=1e-9) and np.any(moves != 0)


@pytest.mark.parametrize("kw,match", [(dict(beta=-1.0), "meta step size beta"),
                                      (dict(granularity="row"), "granularity"),
                                      (dict(speed=1.0), "unknown option 'speed'")])
def test_toy_method_options_are_checked_by_its_spec_in_both_backends(problem, kw, match):
    layout = M.MLP(problem.sizes, problem.activation).layout
    with pytest.raises(ConfigError, match=match):
        cpu_rules.from_spec(TOY, toy_update_cpu, layout, **kw)
    with pytest.raises(ConfigError, match=match):
        gpu_rules.from_spec(TOY, toy_update_gpu, layout, **kw)


@pytest.mark.parametrize("name,kw,match", [
    ("hd", dict(lr_min=0.0), "lr_min"),
    ("adam-hd", dict(b1=1.0), "b1=1.0"),
    ("adam", dict(eps=0.0), "eps=0.0"),
    ("sgdn", dict(momentum=1.0), "momentum"),
    ("t1t2", dict(every=True), "hyper-step interval"),
    ("idbd", dict(trace_decay=2.0), "trace_decay"),
    ("smd", dict(nu=1.0), "unknown option 'nu'"),
])
def test_both_backends_check_the_same_options(name, kw, match):
    """The options gpu_ver alone used to check (lr_min, b1/b2/eps, every) are checked in
    cpu_ver too, with the same message naming the option and the value."""
    layout = M.MLP((5, 4, 3), "tanh").layout
    for backend in (cpu, gpu):
        with pytest.raises(ConfigError, match=match):
            backend.make_method(name, layout, **kw)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_defaults_are_the_builders_defaults(name):
    """One set of defaults: each backend's builder takes the specification's options with
    the same defaults (the fixed ones, the optimiser of plain/hd, come from the name)."""
    spec = method_spec(name)
    for builder in (cpu_rules.BUILDERS[name], gpu_rules.BUILDERS[name]):
        params = inspect.signature(builder).parameters
        got = {k: p.default for k, p in params.items() if k not in ("layout", "self", *spec.fixed)}
        assert got == spec.defaults, (builder, got, spec.defaults)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_builtin_state_fields_and_init_come_from_the_spec_in_both_backends(name):
    """Each built-in method's state holds the fields of its specification, initialised by
    ``spec.init``, in both backends (cpu_ver: NamedTuple fields in that order; gpu_ver:
    shared-variable keys, none for an empty field), beside each backend's own caches;
    t1t2 and combined hold the regulariser's fields (REG_STATE, r_ keys in gpu_ver)."""
    spec = method_spec(name)
    layout = M.MLP((5, 4, 3), "tanh").layout
    w0 = np.linspace(-1.0, 1.0, layout.size)
    cs, gs = cpu.make_method(name, layout).init(w0), gpu.make_method(name, layout).init(w0)
    caches = {"cpu": {"h_prev", "clip", "l2"}, "gpu": {"hg", "l2"}}
    if spec.init is None:                                        # t1t2, combined
        reg = cs.reg if name == "combined" else cs
        assert tuple(f for f in reg._fields if f != "l2") == REG_STATE
        assert [k for k in gs if k.startswith("r_")] == [f"r_{f}" for f in REG_STATE]
        return
    opts = {**spec.defaults}
    n = cpu.make_grouping(layout, opts[spec.grouping]).n if spec.grouping else layout.size
    ref = spec.init(opts, n, w0)
    assert cs._fields[:len(spec.state)] == spec.state == tuple(ref)
    assert set(cs._fields[len(spec.state):]) <= caches["cpu"]
    used = [k for k in spec.state if np.size(ref[k])]
    assert [k for k in gs if k in spec.state] == used and set(gs) - set(used) <= caches["gpu"]
    for k in spec.state:
        np.testing.assert_array_equal(getattr(cs, k), ref[k])
        if k in used:
            np.testing.assert_array_equal(gs[k], ref[k])


@pytest.mark.parametrize("call,match", [
    (lambda r, L: r.BUILDERS["idbd"](L, theta=-1.0), "meta step size theta"),
    (lambda r, L: r.BUILDERS["sgd"](L, optimizer="rmsprop"), "optimizer must be one of"),
    (lambda r, L: r.BUILDERS["t1t2"](L, every=0), "hyper-step interval"),
    (lambda r, L: r.BUILDERS["combined"](L, meta_opt="lbfgs"), "T1-T2 meta optimiser"),
])
def test_builders_called_directly_check_their_options_by_the_spec(call, match):
    layout = M.MLP((5, 4, 3), "tanh").layout
    for rules in (cpu_rules, gpu_rules):
        with pytest.raises(ConfigError, match=match):
            call(rules, layout)
