"""Online (adaptive) hyperparameter methods on the Theano backend.

Modules (the same map as ``cpu_ver.online``): ``grouping`` (which hyperparameter each
coordinate uses), ``rules`` (the methods' symbolic update rules), ``run`` (the compiled
``OnlineRun`` and the checkpointed ``train_online``), ``check`` (one-step hypergradients
against finite differences) and ``crosscheck`` (against cpu_ver; the one module that
imports it, inside its function). Importing this package loads Theano
(``gpu_ver.config.load``). This package re-exports their public names.
"""
from gpu_ver.online.check import (check_all, check_float64, method_onestep, prepare, prepared_run,  # noqa: F401
                                  reference_hypergradients, reference_onestep, run_onestep, trace_hypergradient,
                                  unexpected_host_ops)
from gpu_ver.online.crosscheck import crosscheck_adaptive  # noqa: F401
from gpu_ver.online.grouping import Grouping, make_grouping  # noqa: F401
from gpu_ver.online.rules import (HD, IDBD, SMD, T1T2, Almeida, Combined, Ctx, Method, Plain,  # noqa: F401
                                  SpecMethod, floatx, from_spec, make_method)
from gpu_ver.online.run import BN_MOMENTUM, OnlineRun, model_functions, train_online  # noqa: F401
from shared.online import (CHECK_CONFIGS, CHECK_WARMUP, QUANTILES,  # noqa: F401
                           TRACE_HORIZON, TRACE_NAMES, CheckProblem, OneStep, block_quantiles,
                           build_check_problem, check_batch, check_val_batch, fd_check, fd_directional)
from shared.online_spec import GRANULARITIES, METHOD_NAMES, PLAIN_NAMES  # noqa: F401
