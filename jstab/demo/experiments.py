"""The demo's configurations, and how one of them is measured.

Each :class:`Config` is one row of the demo's table: a model, what is
measured at initialization, and an optimizer (Adam, with or without a
clipping transform before it). :func:`measure` runs it for several seeds and
returns a :class:`~jstab.demo.experiments.Result`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jstab
from jstab.demo import data, models, pretrain, train

Task = Literal["digits", "adding"]
VANISHING_RATIO = 1e-3  # the thresholds of jstab.signal_propagation


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one run of the demo may spend.

    Attributes:
      seeds: models trained per configuration, side by side.
      steps: Adam steps per model.
      depth: Dense layers of the MLP.
      width: units of each hidden layer of the MLP.
      batch: minibatch size.
      length: steps of each adding-problem sequence.
      hidden: units of the recurrent cells.
      learning_rate: Adam's learning rate.
      convolutions: convolutions of the CNN.
      channels: feature maps of each convolution.
      pretrain_epochs: epochs of greedy pretraining for each layer.
    """

    seeds: int = 3
    steps: int = 1000
    depth: int = 20
    width: int = 64
    batch: int = 64
    length: int = 50
    hidden: int = 64
    learning_rate: float = 1e-3
    convolutions: int = 12
    channels: int = 8
    pretrain_epochs: int = 10


DEFAULT = Budget()
QUICK = Budget(seeds=2, steps=200)


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: a model, its initialization and its optimizer.

    Attributes:
      name: the row's name in the table.
      task: ``"digits"`` (the MLP) or ``"adding"`` (a recurrent network).
      model: ``model(budget) -> nn.Module``.
      nonlinearity: what follows the layers, for the dead-unit statistics of
        :func:`jstab.signal_propagation`.
      clip: ``clip() -> GradientTransformation`` chained before Adam, or
        ``None``.
      wrap: ``wrap(tx) -> GradientTransformation`` around the whole
        optimizer (such as :func:`jstab.skip_on_spike`), or ``None``.
      lsuv: whether the kernels are re-initialized by :func:`jstab.lsuv`.
      quick: whether the row is part of ``jstab demo --quick``.
      optimizer: ``optimizer() -> GradientTransformation``, the optimizer
        after ``clip``; ``None`` for Adam with the budget's learning rate.
      pretrain: ``pretrain(x, key, budget) -> layers``, greedy pretraining
        (:mod:`jstab.demo.pretrain`) on the training images ``x``, whose
        layers replace the first kernels and biases of the initialized
        MLP before anything is measured; or ``None``.
      part: the table the row belongs to (``"cnn"``, ``"optimizers"``,
        ``"pretraining"``; ``jstab.demo.report.PARTS``); the
        empty string for the task's own (``"digits"``, ``"adding"``).
      full: whether the row runs only in ``jstab demo --full``.
      dtype: the dtype of the parameters and of the forward pass
        (``"float32"``, ``"float16"`` or ``"bfloat16"``); the loss is
        computed in float32 from the logits.
      loss_scaling: whether :func:`jstab.dynamic_loss_scale` wraps the
        optimizer (inside ``wrap``) and the loss is scaled before it is
        differentiated.
      baseline: for a row that clips or skips steps (a ``clip``, a ``wrap``
        such as :func:`jstab.skip_on_spike`, or ``loss_scaling``), the name
        of the row it is compared with: the same task, model, optimizer and
        dtype, with nothing clipped or skipped. It runs in every selection
        this row runs in (``--quick``, the default). ``None`` otherwise.
    """

    name: str
    task: Task
    model: Callable[[Budget], nn.Module]
    nonlinearity: str = "relu"
    clip: Callable[[], optax.GradientTransformation] | None = None
    wrap: (
        Callable[[optax.GradientTransformation], optax.GradientTransformation] | None
    ) = None
    lsuv: bool = False
    quick: bool = False
    optimizer: Callable[[], optax.GradientTransformation] | None = None
    pretrain: Callable[[jax.Array, jax.Array, Budget], Any] | None = None
    part: str = ""
    full: bool = False
    dtype: str = "float32"
    loss_scaling: bool = False
    baseline: str | None = None

    @property
    def table(self) -> str:
        """The table the row belongs to: ``part``, or else ``task``."""
        return self.part or self.task


@dataclasses.dataclass(frozen=True)
class Result:
    """What :func:`measure` found for one configuration.

    Attributes:
      config: the configuration.
      ratio: the gradient norm of the first layer over the last one at
        initialization (MLP: kernels, from :func:`jstab.signal_propagation`;
        recurrent network: the inputs of the first and the last time step).
      diagnosis: ``"vanishing"``, ``"exploding"`` or ``"ok"``: from
        :func:`diagnose` (MLP, CNN) or from ``ratio`` (recurrent network).
      peak: the largest global norm of the raw gradient in training, per
        seed.
      train_loss: the mean minibatch loss of the last 50 steps, per seed.
      metric: test accuracy (digits) or test MSE (adding), per seed.
      clipped: steps in which the clipping transform clipped, per seed
        (``None`` without one).
      skipped: steps that :func:`jstab.skip_on_spike` or
        :func:`jstab.dynamic_loss_scale` skipped, per seed (``None`` without
        either).
      seconds: wall time, compilation included.
      loss: the minibatch loss at every step, averaged over seeds.
      profile: the gradient norm at initialization per layer (MLP) or per
        time step (recurrent network).
      report: the :class:`jstab.SignalReport` at initialization (seed 0) of
        an MLP or a CNN; ``None`` for a recurrent network.
      variables: the trained models' variables (``params`` and any model
        state), with a leading seed axis.
      flushed: for a half-precision row, the fraction of each kernel's
        gradient elements (layer by layer) that are nonzero in float32 and
        zero in the row's dtype, at initialization (seed 0; :func:`flushed`);
        ``None`` for a float32 row.
      loss_scale: the loss scale at every step (seed 0), ``None`` without
        loss scaling.
    """

    config: Config
    ratio: float
    diagnosis: str
    peak: np.ndarray
    train_loss: np.ndarray
    metric: np.ndarray
    clipped: np.ndarray | None
    skipped: np.ndarray | None
    seconds: float
    loss: np.ndarray
    profile: np.ndarray
    report: jstab.SignalReport | None
    variables: Any
    flushed: np.ndarray | None = None
    loss_scale: np.ndarray | None = None


def _mlp(activation, kernel_init, **kw) -> Callable[[Budget], nn.Module]:
    return lambda b: models.MLP(b.depth, b.width, 10, activation, kernel_init, **kw)


def _rnn(cell: Callable[[Budget], nn.RNNCellBase]) -> Callable[[Budget], nn.Module]:
    return lambda b: models.RecurrentRegressor(cell(b))


def _tanh_rnn(recurrent_init: Callable[[int], jstab.Initializer]):
    return _rnn(
        lambda b: nn.SimpleCell(
            b.hidden,
            kernel_init=jstab.lecun_normal(),
            recurrent_kernel_init=recurrent_init(b.hidden),
        )
    )


def _large(hidden: int) -> jstab.Initializer:
    # N(0, 2.25/n): spectral radius about 1.5, past the edge of chaos of a
    # tanh RNN: its gradient explodes in training (Pascanu et al., 2013).
    return jax.nn.initializers.normal(1.5 / np.sqrt(hidden))


# N(0, 1): fan_in / 2 = 32 times He's variance, a gain of √32 per layer.
_EXPLODING = _mlp(nn.relu, jax.nn.initializers.normal(1.0))
_HE = jstab.he_normal()
_RELU_HE = _mlp(nn.relu, _HE)
_LARGE_RNN = _tanh_rnn(_large)
_GLOBAL = lambda: jstab.clip_by_global_norm(1.0)  # noqa: E731

# ReLU + He is sound at initialization, but plain SGD at a learning rate of
# 0.5 blows it up in training: on every seed, at 200 steps and at 1000, the
# loss turns NaN or the network falls to chance. Clipping the global norm at
# 1 bounds every step's length by 0.5, and it trains (0.96 test accuracy at
# 1000 steps, 3 seeds; Adam gets 0.94). At 0.2, SGD did not diverge in 200
# steps; at 0.3, one seed of three ended at 0.19 accuracy after 1000.
_SGD_LR = 0.5
_SGD = lambda: optax.sgd(_SGD_LR)  # noqa: E731


def _cnn(kernel_init, **kw) -> Callable[[Budget], nn.Module]:
    return lambda b: models.CNN(b.convolutions, b.channels, 10, kernel_init, **kw)


_CNN_INITS = {
    "He": _HE,
    "small N(0, 0.01²)": jstab.small_normal(0.01),
    "delta-orthogonal": jstab.delta_orthogonal(jstab.calculate_gain("relu")),
}
_CNN = tuple(
    Config(
        f"CNN{variant} + {init}",
        "digits",
        _cnn(_CNN_INITS[init], **kw),
        part="cnn",
        # Trained one step at a time (train.fit), each CNN row costs 35-75 s
        # on 2 cores, a third of the default run's budget: part C runs with
        # --full.
        full=True,
    )
    for variant, kw in (
        ("", {}),
        (" residual", {"residual": True}),
        (" batch norm", {"batch_norm": True}),
    )
    for init in _CNN_INITS
)


def _pretrained(method: Callable[..., pretrain.Pretrained]):
    """A ``Config.pretrain``: ``method`` over every MLP layer below the head."""

    def layers(x: jax.Array, key: jax.Array, b: Budget) -> list[pretrain.Layer]:
        widths = [b.width] * (b.depth - 1)
        return method(x, key, widths, epochs=b.pretrain_epochs).layers

    return layers


# Optimizers as a remedy (adaptive learning rates are often named as one):
# the exploding MLP trained with SGD's one step size and with Adagrad's and
# Adam's per-parameter ones, each with and without clipping. Adam is part
# A's "ReLU + N(0, 1)" row, again.
_OPTIMIZERS = {
    "SGD 0.1": lambda: optax.sgd(0.1),
    "momentum (0.01, 0.9)": lambda: optax.sgd(0.01, momentum=0.9),
    "Adagrad 0.01": lambda: optax.adagrad(0.01),
    "Adam 1e-3": lambda: optax.adam(1e-3),
}
_BY_OPTIMIZER = tuple(
    Config(
        f"ReLU + N(0, 1), {name}{' + global-norm clip' if clip else ''}",
        "digits",
        _EXPLODING,
        optimizer=optimizer,
        clip=_GLOBAL if clip else None,
        baseline=f"ReLU + N(0, 1), {name}" if clip else None,
        part="optimizers",
        # Part A's note says why no optimizer rescues this network; the
        # default run leaves the table to --full.
        full=True,
    )
    for name, optimizer in _OPTIMIZERS.items()
    for clip in (False, True)
)


# Greedy layer-wise pretraining of the deep sigmoid MLP (Hinton et al., 2006;
# Bengio et al., 2007), against random initializations of the same network,
# all fine-tuned with Adam.
def _sigmoid(name: str, kernel_init: jstab.Initializer, **kw) -> Config:
    model = _mlp(nn.sigmoid, kernel_init)
    return Config(name, "digits", model, "sigmoid", part="pretraining", **kw)


_SMALL_SIGMOID = _mlp(nn.sigmoid, jstab.small_normal(0.01))
_PRETRAINING = (
    Config(
        "sigmoid + small N(0, 0.01²), not pretrained",
        "digits",
        _SMALL_SIGMOID,
        "sigmoid",
        part="pretraining",
        full=True,  # part A's first row, the same network and optimizer
    ),
    _sigmoid("sigmoid + Glorot", jstab.glorot_normal(), full=True),
    _sigmoid("sigmoid + LSUV", jstab.glorot_normal(), lsuv=True, full=True),
    _sigmoid(
        "sigmoid + RBM pretraining (CD-1)",
        jstab.small_normal(0.01),
        pretrain=_pretrained(pretrain.rbm),
    ),
    _sigmoid(
        "sigmoid + denoising-AE pretraining",
        jstab.small_normal(0.01),
        pretrain=_pretrained(pretrain.denoising_autoencoder),
        full=True,
    ),
)


# Mixed precision: float16 flushes gradients below about 6e-8 to zero. Part
# A's networks do not underflow (ReLU + He and tanh + Glorot train alike in
# float16), and sigmoid networks deep enough to underflow train erratically
# in float32 too. A ReLU network with weights a little too small for its
# depth does both: each of 18 layers shrinks the backward signal by about
# 0.45, so at initialization 75-96 % of the first layers' gradient elements
# are below float16's range, while in float32 Adam's step, which does not
# depend on the gradient's scale, still trains it (0.91 test accuracy,
# against ReLU + He's 0.94).
def _small_relu(b: Budget) -> nn.Module:
    return models.MLP(18, b.width, 10, nn.relu, jstab.small_normal(0.08))


def _precision(name: str, dtype: str, **kw) -> Config:
    return Config(
        f"ReLU + N(0, 0.08²), 18 layers, {name}",
        "digits",
        _small_relu,
        part="precision",
        dtype=dtype,
        **kw,
    )


_PRECISION = (
    _precision("float32", "float32", full=True),
    _precision("float16, Adam", "float16", full=True),
    _precision("float16, upcast(Adam)", "float16", wrap=jstab.upcast, quick=True),
    _precision(
        "float16, upcast(dynamic_loss_scale(Adam))",
        "float16",
        wrap=jstab.upcast,
        loss_scaling=True,
        quick=True,
        baseline="ReLU + N(0, 0.08²), 18 layers, float16, upcast(Adam)",
    ),
    _precision("bfloat16, upcast(Adam)", "bfloat16", wrap=jstab.upcast, full=True),
)
CONFIGS: tuple[Config, ...] = (
    Config(
        "sigmoid + small N(0, 0.01²)",
        "digits",
        _SMALL_SIGMOID,
        "sigmoid",
        quick=True,
    ),
    Config("ReLU + N(0, 1)", "digits", _EXPLODING),
    Config(
        "tanh + Glorot",
        "digits",
        _mlp(nn.tanh, jstab.glorot_normal()),
        "tanh",
        full=True,
    ),
    Config("ReLU + He", "digits", _RELU_HE),
    Config(f"ReLU + He, SGD {_SGD_LR}", "digits", _RELU_HE, optimizer=_SGD, quick=True),
    Config(
        f"ReLU + He, SGD {_SGD_LR} + global-norm clip",
        "digits",
        _RELU_HE,
        optimizer=_SGD,
        clip=_GLOBAL,
        quick=True,
        baseline=f"ReLU + He, SGD {_SGD_LR}",
    ),
    Config(
        "ReLU + orthogonal",
        "digits",
        _mlp(nn.relu, jstab.orthogonal(jstab.calculate_gain("relu"))),
        full=True,
    ),
    Config("ReLU + LSUV", "digits", _RELU_HE, lsuv=True, full=True),
    Config(
        "ReLU + He + residual",
        "digits",
        _mlp(nn.relu, _HE, residual=True),
        full=True,
    ),
    Config(
        "ReLU + He + batch norm",
        "digits",
        _mlp(nn.relu, _HE, batch_norm=True),
        full=True,
    ),
    Config(
        "ReLU + N(0, 1) + global-norm clip",
        "digits",
        _EXPLODING,
        clip=_GLOBAL,
        baseline="ReLU + N(0, 1)",
    ),
    Config(
        "ReLU + N(0, 1) + per-layer clip",
        "digits",
        _EXPLODING,
        clip=lambda: jstab.clip_by_layer_norm(1.0),
        baseline="ReLU + N(0, 1)",
        full=True,
    ),
    Config(
        "ReLU + N(0, 1) + AGC",
        "digits",
        _EXPLODING,
        clip=lambda: jstab.adaptive_grad_clip(0.01),
        baseline="ReLU + N(0, 1)",
        full=True,
    ),
    Config(
        "ReLU + N(0, 1) + AutoClip",
        "digits",
        _EXPLODING,
        clip=lambda: jstab.autoclip(10.0),
        baseline="ReLU + N(0, 1)",
        full=True,
    ),
    Config(
        "ReLU + N(0, 1) + ZClip",
        "digits",
        _EXPLODING,
        clip=jstab.zclip,
        baseline="ReLU + N(0, 1)",
        full=True,
    ),
    Config(
        "ReLU + N(0, 1) + spectral norm",
        "digits",
        _mlp(nn.relu, jax.nn.initializers.normal(1.0), spectral_norm=True),
        full=True,
    ),
    Config("tanh RNN, N(0, 2.25/n) recurrent", "adding", _LARGE_RNN, "tanh"),
    Config(
        "tanh RNN, N(0, 2.25/n) + global-norm clip",
        "adding",
        _LARGE_RNN,
        "tanh",
        clip=_GLOBAL,
        baseline="tanh RNN, N(0, 2.25/n) recurrent",
    ),
    # On the adding problem the gradient norm grows as the network starts to
    # learn (the median norm of the unclipped row went from about 0.7 in
    # steps 300-600 to 1.3 in steps 900-1000, as its loss fell). Against the
    # statistics of the quiet phase that rise is a spike, and as only
    # accepted steps update them, a z-test alone then skips every later step:
    # at z_thresh=3, two seeds of three skipped all of their last 100 steps
    # and the test MSE was 0.174 (predicting 1 gives 0.167); at 6, one seed
    # stalled (0.211); over a window of 128, two (0.193). Accepting the step
    # after 10 skips in a row lets the statistics follow the new level:
    # 0.118 with 63-84 steps skipped, against 0.135 for the unclipped row
    # (1000 steps, 3 seeds).
    Config(
        "tanh RNN, N(0, 2.25/n) + skip_on_spike",
        "adding",
        _LARGE_RNN,
        "tanh",
        wrap=lambda tx: jstab.skip_on_spike(tx, z_thresh=3.0, max_consecutive=10),
        baseline="tanh RNN, N(0, 2.25/n) recurrent",
    ),
    Config(
        "tanh RNN, orthogonal recurrent",
        "adding",
        _tanh_rnn(lambda n: jstab.orthogonal()),
        "tanh",
        full=True,
    ),
    Config(
        "LSTM (Flax LSTMCell)",
        "adding",
        _rnn(lambda b: nn.LSTMCell(b.hidden)),
        "tanh",
        full=True,
    ),
    Config(
        "GRU (Flax GRUCell)", "adding", _rnn(lambda b: nn.GRUCell(b.hidden)), "tanh"
    ),
    *_PRECISION,
    *_CNN,
    *_BY_OPTIMIZER,
    *_PRETRAINING,
)


def time_gradients(
    model: nn.Module, params: optax.Params, x: jax.Array, y: jax.Array
) -> np.ndarray:
    """``‖∂L/∂x_t‖`` at every time step ``t``: how far back the gradient reaches.

    ``L`` is the MSE of ``model`` (a :class:`~jstab.demo.models.RecurrentRegressor`) on
    the sequences ``x`` of shape ``(batch, length, features)`` and the
    targets ``y``. A vanilla RNN whose gradient vanishes over time has a
    first step's norm many decades below the last one's.
    """
    loss = lambda x: jnp.mean((model.apply({"params": params}, x) - y) ** 2)  # noqa: E731
    return np.asarray(jnp.linalg.norm(jax.grad(loss)(x), axis=(0, 2)))


def flushed(loss_fn, params: optax.Params, batch, dtype: jnp.dtype) -> np.ndarray:
    """Per kernel, the fraction of gradient elements that ``dtype`` flushes to 0.

    The gradient of ``loss_fn(params, batch)`` is taken twice, with the
    parameters (and so the forward and backward passes) in float32 and in
    ``dtype``; an element counts as flushed when it is nonzero in float32
    and exactly zero in ``dtype``. Kernels are taken in the order of their
    Flax names (``Dense_0``, ``Dense_1``, ...).
    """

    def fractions(p):
        wide = jax.grad(loss_fn)(p, batch)
        narrow = jax.grad(loss_fn)(jax.tree.map(lambda x: x.astype(dtype), p), batch)
        names = sorted(wide, key=lambda k: int(k.rsplit("_", 1)[-1]))
        lost = [(wide[k]["kernel"] != 0) & (narrow[k]["kernel"] == 0) for k in names]
        return jnp.stack([jnp.mean(x) for x in lost])

    return np.asarray(jax.jit(fractions)(params))


def _diagnosis(ratio: float) -> str:
    if not np.isfinite(ratio) or ratio > 1 / VANISHING_RATIO:
        return "exploding"
    return "vanishing" if ratio < VANISHING_RATIO else "ok"


def diagnose(report: jstab.SignalReport) -> str:
    """The report's verdict, or ``"vanishing"`` when the activations collapse.

    :attr:`jstab.SignalReport.vanishing` compares the first layer's gradient
    with the last one's. A ReLU network of small kernels with zero biases
    shrinks its signal by the same factor at every layer, forward and
    backward, so every kernel's gradient is equally tiny and the ratio
    stays near 1: a 12-layer CNN with N(0, 0.01²) kernels has gradient norms
    of 10⁻³¹ at every layer and a verdict of ``"ok"``. Such a network is
    vanishing too: its last layer's output is more than ``1/VANISHING_RATIO``
    times smaller than its first layer's.
    """
    std = np.asarray(report.activation_std)
    if report.verdict == "ok" and std[-1] < VANISHING_RATIO * std[0]:
        return "vanishing"
    return report.verdict


def _ratio(norms: np.ndarray) -> float:
    """The first norm over the last one: inf or NaN when the last is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(norms[0] / norms[-1])


def _init(model: nn.Module, keys: jax.Array, x: jax.Array) -> list[Any]:
    """One model's variables per key, ``init`` run eagerly.

    Eager ``init`` dispatches one small compiled primitive at a time, each
    cached across rows; compiling the whole of a 20-layer MLP's ``init``
    cost 2.7-3.8 s per row, several times the eager calls.
    """
    return [model.init(k, x) for k in keys]


def _other(keys: jax.Array) -> jax.Array:
    """One key for each of ``keys``, independent of it."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


# The last starts measured, oldest first: key -> (split, value). Rows that
# differ only in their optimizer (a clip, a wrap, another optimizer) start
# from the same variables and the same measurements at initialization, and
# are near each other in CONFIGS: the later ones reuse them, which saves
# the initialization and the compilation of the diagnostics.
_STARTS: dict = {}
_KEPT_STARTS = 4


def _start(config: Config, budget: Budget, seed: int, split, compute):
    """``compute()``, or its value for a recent row with the same start."""
    key = (
        config.task,
        config.model,
        config.nonlinearity,
        config.lsuv,
        config.pretrain,
        budget,
        seed,
    )
    kept = _STARTS.pop(key, None)
    if kept is None or kept[0] is not split:
        kept = (split, compute())
    _STARTS[key] = kept
    while len(_STARTS) > _KEPT_STARTS:
        del _STARTS[next(iter(_STARTS))]
    return kept[1]


def _classifier(config: Config, model: nn.Module, budget: Budget, split, keys, start):
    """Initial variables, report and task functions of a digits configuration."""
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)

    def sample(key):
        i = jax.random.randint(key, (budget.batch,), 0, x.shape[0])
        return x[i], y[i]

    dtype = jnp.dtype(config.dtype)

    def loss_fn(params, state, batch):
        logits, state = model.apply(
            {"params": params, **state},
            batch[0].astype(dtype),
            train=True,
            mutable=list(state),
        )
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
        return loss.mean(), state

    def evaluate(params, state):
        x_test = jnp.asarray(split.x_test, dtype)
        logits = model.apply({"params": params, **state}, x_test)
        return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(split.y_test))

    variables, found = start(lambda: _diagnosed(config, model, budget, x, keys))
    return variables, found, sample, loss_fn, evaluate


def _diagnosed(config: Config, model: nn.Module, budget: Budget, x, keys):
    """Initial variables of a digits configuration, and its report."""
    probe = x[:256]
    variables = _init(model, keys, x[:2])
    if config.pretrain is not None:
        variables = [
            {**v, "params": pretrain.load(v["params"], config.pretrain(x, k, budget))}
            for v, k in zip(variables, _other(keys), strict=True)
        ]
    if config.lsuv:
        variables = [
            jstab.lsuv(model, v, probe, key=k)
            for v, k in zip(variables, keys, strict=True)
        ]
    report = jstab.signal_propagation(
        model,
        variables[0],
        probe,
        nonlinearity=config.nonlinearity,
        model_kwargs={"train": True},
    )
    profile = np.asarray(report.grad_norm)
    return variables, (_ratio(profile), diagnose(report), profile, report)


def _regressor(config: Config, model: nn.Module, budget: Budget, key, keys, start):
    """Initial variables, time profile and task functions of an adding one."""
    x_test, y_test = data.adding_problem(key, 1000, budget.length)

    def diagnosed():
        variables = _init(model, keys, x_test[:2])
        params = variables[0]["params"]
        profile = time_gradients(model, params, x_test[:256], y_test[:256])
        ratio = _ratio(profile)
        return variables, (ratio, _diagnosis(ratio), profile, None)

    variables, found = start(diagnosed)

    def sample(key):
        return data.adding_problem(key, budget.batch, budget.length)

    def loss_fn(params, state, batch):
        out = model.apply({"params": params}, batch[0])
        return jnp.mean((out - batch[1]) ** 2), state

    def evaluate(params, state):
        return jnp.mean((model.apply({"params": params}, x_test) - y_test) ** 2)

    return variables, found, sample, loss_fn, evaluate


def optimizer(config: Config, budget: Budget = DEFAULT) -> optax.GradientTransformation:
    """The whole optimizer of ``config``: ``wrap``, loss scaling, ``clip``, and
    ``optimizer`` (or Adam at the budget's learning rate), outermost first."""
    if config.optimizer is None:
        tx = optax.adam(budget.learning_rate)
    else:
        tx = config.optimizer()
    if config.clip is not None:
        tx = optax.chain(config.clip(), tx)
    if config.loss_scaling:
        tx = jstab.dynamic_loss_scale(tx)
    if config.wrap is not None:
        tx = config.wrap(tx)
    return tx


def measure(
    config: Config,
    budget: Budget = DEFAULT,
    *,
    seed: int = 0,
    split: data.Split | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Result:
    """Initializes, diagnoses and trains ``config`` for ``budget.seeds`` seeds.

    Every key comes from ``seed``, so a run is deterministic given it (on one
    machine and JAX version).

    Args:
      config: the configuration.
      budget: the sizes and the training budget.
      seed: the seed of the initializations, minibatches and test sequences.
      split: the digits data (:func:`~jstab.demo.data.digits`); loaded if ``None``.
      progress: called with the number of steps done, as training goes.

    Returns:
      A :class:`~jstab.demo.experiments.Result`.
    """
    start = time.perf_counter()
    model = config.model(budget)
    key_init, key_data, key_test = jax.random.split(jax.random.key(seed), 3)
    init_keys = jax.random.split(key_init, budget.seeds)
    if config.task == "digits":
        split = data.digits() if split is None else split
    start_of = functools.partial(_start, config, budget, seed, split)
    if config.task == "digits":
        variables, found, sample, loss_fn, evaluate = _classifier(
            config, model, budget, split, init_keys, start_of
        )
    else:
        variables, found, sample, loss_fn, evaluate = _regressor(
            config, model, budget, key_test, init_keys, start_of
        )
    variables = dict(train.stack(variables))
    params = variables.pop("params")
    dtype = jnp.dtype(config.dtype)
    lost = None
    if dtype != jnp.float32:
        one, state = jax.tree.map(lambda x: x[0], (params, variables))
        batch = sample(jax.random.key(seed))
        lost = flushed(lambda p, b: loss_fn(p, state, b)[0], one, batch, dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    tx = optimizer(config, budget)
    run = train.fit(
        loss_fn,
        tx,
        params,
        variables,
        sample,
        jax.random.split(key_data, budget.seeds),
        steps=budget.steps,
        progress=progress,
        # XLA's CPU backend runs convolutions slowly vmapped or scanned.
        vectorize=not isinstance(model, models.CNN),
        scale_loss=config.loss_scaling,
    )
    metric = jax.jit(jax.vmap(evaluate))(run.params, run.model_state)
    stats = jstab.statistics(run.opt_state)
    clipped = [v for k, v in stats.items() if k.endswith("/clip_count")]
    skipped = [v for k, v in stats.items() if k.endswith("/skip_count")]
    ratio, diagnosis, profile, report = found
    return Result(
        config=config,
        ratio=ratio,
        diagnosis=diagnosis,
        peak=np.asarray(run.grad_norm.max(axis=1)),
        train_loss=np.asarray(run.loss[:, -50:].mean(axis=1)),
        metric=np.asarray(metric),
        clipped=np.asarray(sum(clipped)) if clipped else None,
        skipped=np.asarray(sum(skipped)) if skipped else None,
        seconds=time.perf_counter() - start,
        loss=np.asarray(run.loss.mean(axis=0)),
        profile=profile,
        report=report,
        variables={"params": run.params, **run.model_state},
        flushed=lost,
        loss_scale=np.asarray(run.loss_scale[0]) if config.loss_scaling else None,
    )
