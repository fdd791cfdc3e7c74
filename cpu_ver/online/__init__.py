"""Online (adaptive) hyperparameter methods on the autograd backend: learning rates and L2
strengths adapted during ONE training run from a short-horizon hypergradient.

Modules (the same map as ``gpu_ver.online``): ``grouping`` (which hyperparameter each
coordinate uses), ``rules`` (the methods' update rules, with the equations and papers),
``run`` (one step, state (de)serialisation, the checkpointed ``train_online``) and
``check`` (one-step hypergradients against finite differences, the reference numbers
gpu_ver is cross-checked with). This package re-exports their public names.
"""
from cpu_ver.online.check import (check_all, check_method_config, method_onestep,  # noqa: F401
                                  one_step_hypergradient, reference_hypergradients, reference_onestep, reset_trace,
                                  trace_hypergradient)
from cpu_ver.online.grouping import Grouping, expand, make_grouping, reduce, reduce_dot  # noqa: F401
from cpu_ver.online.rules import (AlmeidaState, CombinedState, GradInfo, HDState, IDBDState, Method,  # noqa: F401
                                  PlainState, SMDState, T1T2State, almeida, combined, from_spec, hypergradient_descent,
                                  idbd, make_method, plain, smd, t1t2)
from cpu_ver.online.run import (grad_and_hvp, state_arrays, state_from_arrays, state_step, step,  # noqa: F401
                                train_online)
from shared.online import (CHECK_CONFIGS, CHECK_WARMUP, QUANTILES,  # noqa: F401
                           TRACE_HORIZON, TRACE_NAMES, CheckProblem, OneStep, block_quantiles,
                           build_check_problem, check_batch, check_val_batch, fd_check, fd_directional)
from shared.online_spec import GRANULARITIES, METHOD_NAMES, PLAIN_NAMES  # noqa: F401
