"""Former home of the online methods, now ``gpu_ver.online`` (grouping, rules, run, check,
crosscheck): a thin re-export kept for ``gpu_ver.check`` and ``gpu_ver.crosscheck`` until
they import ``gpu_ver.online`` themselves."""
from gpu_ver.online import check_all, crosscheck_adaptive, unexpected_host_ops  # noqa: F401
