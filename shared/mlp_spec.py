"""Backend-neutral description of an MLP: layer sizes, block layout, initialisation.

Both backends build the same network from this spec, so that given a seed they
start from the same flat weight vector, in the same block order
``W0, b0, W1, b1, ...`` (W_k has shape (fan_in, fan_out)). Initialisation
follows Maclaurin et al. (2015): w0 = s[block(i)] * eps_i with a fixed standard
normal draw eps (a function of the seed) and per-block scales s, so that the
scales are hyperparameters with d w0 / d s_b = eps on block b.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError
from shared.layout import ParamLayout

ACTIVATION_NAMES = ("tanh", "relu", "softplus")


@dataclass(frozen=True)
class MLPSpec:
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]``, softmax output.

    ``sizes=(784, 10)`` is logistic regression.
    """

    sizes: tuple
    activation: str = "tanh"

    def __post_init__(self):
        try:
            sizes = tuple(int(s) for s in self.sizes)
        except (TypeError, ValueError):
            raise ConfigError(f"MLP: layer sizes must be integers, got {self.sizes!r}") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise ConfigError(f"MLP: layer sizes must be at least two positive integers, got {self.sizes}")
        if self.activation not in ACTIVATION_NAMES:
            raise ConfigError(f"MLP: activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}")
        object.__setattr__(self, "sizes", sizes)

    @property
    def layout(self) -> ParamLayout:
        names, shapes = [], []
        for k, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            names += [f"W{k}", f"b{k}"]
            shapes += [(a, b), (b,)]
        return ParamLayout(tuple(names), tuple(shapes))

    @property
    def n_classes(self) -> int:
        return self.sizes[-1]

    def check_data(self, X, y, what="data") -> None:
        """Raise ConfigError when the data do not fit the layer sizes."""
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            got = X.shape[1] if X.ndim == 2 else f"shape {X.shape}"
            raise ConfigError(f"MLP {self.sizes}: {what} has {got} input features, "
                              f"the first layer expects {self.sizes[0]}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.sizes[-1]):
            raise ConfigError(f"MLP {self.sizes}: {what} has labels in [{y.min()}, {y.max()}], "
                              f"the output layer has {self.sizes[-1]} classes")

    def default_init_scales(self) -> np.ndarray:
        """Per-block initial scales: 1/sqrt(fan_in) for weights, 0.1/sqrt(fan_in) for biases."""
        out = []
        for a in self.sizes[:-1]:
            out += [1.0 / np.sqrt(a), 0.1 / np.sqrt(a)]
        return np.array(out)

    def init_noise(self, seed: int) -> np.ndarray:
        """The fixed standard-normal draw eps behind w0 = scale * eps."""
        return np.random.default_rng(seed).standard_normal(self.layout.size)

    def init(self, seed: int, scales=None) -> np.ndarray:
        """Initial flat weights w0 = expand(scales) * eps(seed), float64."""
        scales = self.default_init_scales() if scales is None else np.asarray(scales, float)
        return self.layout.expand(scales) * self.init_noise(seed)


def parse_layers(spec: str) -> tuple:
    """'64,50,10' -> (64, 50, 10), with a clear error for anything else."""
    try:
        sizes = tuple(int(s) for s in str(spec).split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers like 64,50,10, got {spec!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ConfigError(f"--layers needs at least an input and an output size, all positive, got {spec!r}")
    return sizes
