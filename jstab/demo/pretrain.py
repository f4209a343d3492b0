r"""Greedy layer-wise pretraining of a deep sigmoid MLP, without labels.

Before careful initializations, deep sigmoid networks were made trainable by
training their layers one at a time, each to model its input, and then
fine-tuning the whole stack with backpropagation (Hinton, Osindero & Teh,
2006, "A fast learning algorithm for deep belief nets"; Bengio et al., 2007,
"Greedy layer-wise training of deep networks"). Layer :math:`i` is trained
on the hidden probabilities :math:`\sigma(x W_{<i} + b_{<i})` of the layers
below it, already trained and then frozen. Its kernel and hidden bias become
the initialization of the MLP's ``Dense_i``: the layers start out carrying
information about the input instead of small noise, and the gradient reaches
the first layers (compare the first to last gradient ratio of
:func:`jstab.signal_propagation` before and after :func:`load`).

Two kinds of layer:

- :func:`rbm`: restricted Boltzmann machines trained with one step of
  contrastive divergence, stacked into a deep belief net;
- :func:`denoising_autoencoder`: autoencoders with tied weights that
  reconstruct their clean input from a corrupted copy (Vincent et al., 2008).

Each layer's whole training, every epoch and minibatch, is one compiled
program (a ``jax.lax.scan`` of epochs, each a scan of minibatches): layers of
the same shape reuse it, so a stack of equal layers compiles twice, for the
first layer (real-valued inputs) and for the others (inputs in ``[0, 1]``).
Both use Adam (Kingma & Ba, 2015): its steps are of the order of the
learning rate whatever the scale of the gradient, so one learning rate
serves both kinds of input and a finite input cannot make the weights
overflow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jstab import _checks

Params = dict[str, chex.Array]
# grad_fn(params, batch, key) -> an update direction shaped like params.
GradFn = Callable[[Params, chex.Array, chex.PRNGKey], Params]
# metrics_fn(params, x) -> two scalars measured on the whole training set.
MetricsFn = Callable[[Params, chex.Array], tuple[chex.Array, chex.Array]]


class Layer(NamedTuple):
    """One pretrained layer, ``h = sigmoid(x @ kernel + bias)``.

    Attributes:
      kernel: float32 ``(inputs, width)``.
      bias: float32 ``(width,)``, the hidden units' bias.
    """

    kernel: chex.Array
    bias: chex.Array


class Pretrained(NamedTuple):
    """The outcome of :func:`rbm` or :func:`denoising_autoencoder`.

    Both histories are measured on the whole training set (each layer's
    own inputs) after every epoch.

    Attributes:
      layers: the pretrained layers, first layer first.
      history: float32 ``(layers, epochs)``: the mean free energy of the
        data (:func:`rbm`) or the reconstruction loss of the clean inputs
        (:func:`denoising_autoencoder`).
      reconstruction: float32 ``(layers, epochs)``: the mean squared error,
        per input unit, of the deterministic reconstruction of the inputs
        from their hidden probabilities; comparable across both methods.
    """

    layers: list[Layer]
    history: chex.Array
    reconstruction: chex.Array


def rbm(
    x: chex.Array,
    key: chex.PRNGKey,
    widths: Sequence[int],
    *,
    epochs: int = 10,
    batch: int = 64,
    learning_rate: float = 3e-2,
) -> Pretrained:
    r"""Stacked restricted Boltzmann machines trained with CD-1: a deep belief net.

    An RBM is an energy model of visible units :math:`v` and binary hidden
    units :math:`h`, :math:`p(v, h) \propto e^{-E(v, h)}`. The first layer's
    inputs are real-valued and standardized, so it is a Gaussian–Bernoulli
    RBM with unit-variance visible units; the next layers' inputs are the
    hidden probabilities of the layer below, in :math:`[0, 1]`, so they are
    Bernoulli–Bernoulli RBMs (Hinton, 2010, "A practical guide to training
    restricted Boltzmann machines", §13.2):

    .. math::
      E(v, h) = \tfrac12 \lVert v - a \rVert^2 - v^\top W h - b^\top h
      \quad\text{or}\quad -a^\top v - v^\top W h - b^\top h,

    with conditionals :math:`p(h_j = 1 \mid v) = \sigma(b_j + (vW)_j)`, and
    :math:`p(v \mid h) = \mathcal{N}(a + W h, I)` or
    :math:`p(v_i = 1 \mid h) = \sigma(a_i + (Wh)_i)`. Summing out :math:`h`
    gives the free energy, :math:`p(v) \propto e^{-F(v)}`:

    .. math::
      F(v) = \tfrac12 \lVert v - a \rVert^2
        - \textstyle\sum_j \operatorname{softplus}(b_j + (vW)_j)
      \quad\text{or}\quad -a^\top v
        - \textstyle\sum_j \operatorname{softplus}(b_j + (vW)_j).

    The log-likelihood's gradient :math:`\langle v h^\top\rangle_{data} -
    \langle v h^\top\rangle_{model}` needs samples of the model;
    contrastive divergence (Hinton, 2002, "Training products of experts by
    minimizing contrastive divergence") replaces them with one step of Gibbs
    sampling from the data. CD-1 on a minibatch :math:`v_0`:
    :math:`h_0 = p(h \mid v_0)`; a binary sample :math:`\tilde h \sim h_0`;
    the reconstruction :math:`v_1 = E[v \mid \tilde h]` (the mean, not a
    sample, as is usual); :math:`h_1 = p(h \mid v_1)`; and

    .. math::
      \Delta W \propto \langle v_0 h_0^\top\rangle - \langle v_1 h_1^\top\rangle,
      \quad \Delta b \propto \langle h_0 - h_1 \rangle,
      \quad \Delta a \propto \langle v_0 - v_1 \rangle,

    averaged over the minibatch, given to Adam as the negative of a gradient.
    Kernels start from :math:`\mathcal{N}(0, 0.01^2)`, hidden biases from 0,
    visible biases from the data's mean (Gaussian) or its logit (Bernoulli),
    as the practical guide suggests.

    The defaults pretrain the 19 hidden layers of ``MLP(20, 64, 10,
    nn.sigmoid, ...)`` on the digits in about a second on two CPU cores
    (plus two compilations); fine-tuned, that MLP then learns where its
    small-initialized twin does not.

    Args:
      x: float ``(examples, features)``, standardized (each feature of mean
        0 and standard deviation 1, or constant 0): the first layer models
        it with unit-variance Gaussian units.
      key: the key of the initial kernels, minibatches and hidden samples.
      widths: the hidden units of each layer, first layer first, e.g.
        ``[64] * 19`` for all the hidden layers of ``MLP(20, 64, ...)``.
      epochs: the passes over ``x`` of each layer, each in minibatches of
        a new random order (the last, incomplete minibatch left out).
      batch: the examples of a minibatch, at most ``examples``.
      learning_rate: Adam's learning rate, for every layer.

    Returns:
      A :class:`Pretrained`: ``history`` is the mean free energy of the
      layer's training inputs, ``reconstruction`` the mean squared error of
      :math:`E[v \mid h = p(h \mid v)]`. The free energy is not the negative
      log-likelihood (:math:`\log Z` moves as well) and need not fall
      steadily: on the digits the first two layers end lower than after
      their first epoch (the first after a minimum halfway), while in deeper
      layers hidden biases turning negative can raise it as the
      reconstruction keeps improving.
    """
    x, widths = _check_arguments(x, widths, epochs, batch, learning_rate)
    return _greedy(
        functools.partial(_train_rbm, epochs=epochs, batch=batch),
        x,
        key,
        widths,
        jnp.float32(learning_rate),
    )


def denoising_autoencoder(
    x: chex.Array,
    key: chex.PRNGKey,
    widths: Sequence[int],
    *,
    epochs: int = 10,
    batch: int = 64,
    learning_rate: float = 3e-2,
    noise: float = 0.1,
) -> Pretrained:
    r"""Stacked denoising autoencoders with tied weights.

    Each layer encodes a corrupted copy :math:`\tilde x` of its input and
    decodes it with the transposed kernel (Vincent et al., 2008, "Extracting
    and composing robust features with denoising autoencoders"; Bengio et
    al., 2007):

    .. math::
      h = \sigma(\tilde x W + b), \qquad z = h W^\top + c,

    and learns to reconstruct the clean :math:`x` from :math:`z`. The first
    layer's inputs are real-valued: a linear decoder :math:`\hat x = z` and
    the squared error :math:`\tfrac12 \lVert \hat x - x \rVert^2`. The next
    layers' inputs are hidden probabilities in :math:`[0, 1]`: a sigmoid
    decoder :math:`\hat x = \sigma(z)` and the cross-entropy
    :math:`-\sum_i [x_i \log \hat x_i + (1 - x_i) \log(1 - \hat x_i)]
    = \sum_i \operatorname{softplus}(z_i) - x_i z_i`, computed from
    :math:`z` so that it stays finite. Both are averaged over the examples
    and the input units.

    The corruption is masking noise: each input unit is set to 0 with
    probability ``noise``, anew for every example and step. For the first
    layer's standardized inputs 0 is the feature's mean; for the next ones
    it is a unit switched off. Hiding part of the input keeps the
    autoencoder from learning the identity, and makes its features capture
    how the input units depend on one another. The default masks 10%: an
    8×8 digit has few pixels, and masking 25% fine-tuned worse on the
    digits. The kernels start from :math:`\mathcal{N}(0, 0.01^2)`, like
    :func:`rbm`'s, and are trained with Adam on minibatches.

    Args:
      x: float ``(examples, features)``, standardized (see :func:`rbm`).
      key: the key of the initial kernels, minibatches and corruption.
      widths: the hidden units of each layer, first layer first.
      epochs: the passes over ``x`` of each layer.
      batch: the examples of a minibatch, at most ``examples``.
      learning_rate: Adam's learning rate, for every layer.
      noise: the probability of masking an input unit, in ``[0, 1)``.

    Returns:
      A :class:`Pretrained`: ``history`` is the loss of reconstructing the
      clean inputs (squared error, then cross-entropy),
      ``reconstruction`` its mean squared error.
    """
    x, widths = _check_arguments(x, widths, epochs, batch, learning_rate)
    noise = _checks.nonnegative("noise", noise)
    if noise >= 1:
        raise ValueError(f"`noise` must be in [0, 1), got {noise!r}.")
    return _greedy(
        functools.partial(_train_autoencoder, epochs=epochs, batch=batch),
        x,
        key,
        widths,
        jnp.float32(learning_rate),
        jnp.float32(noise),
    )


def load(params: Mapping[str, Any], layers: Sequence[Layer]) -> dict[str, Any]:
    """Puts pretrained layers into the parameters of a Flax MLP.

    The ``i``-th layer's kernel and bias replace those of ``Dense_i``, the
    name Flax gives to the ``i``-th ``nn.Dense`` of a compact module such as
    :class:`jstab.demo.models.MLP`. The other entries (the head, layers not
    pretrained, anything else) are kept as they are; ``params`` itself is
    not changed.

    Args:
      params: the MLP's parameters, ``variables["params"]``.
      layers: the pretrained layers, e.g. ``rbm(...).layers``.

    Returns:
      New parameters, each loaded array in the dtype of the one it replaces.

    Raises:
      ValueError: ``params`` has no ``Dense_i`` for a layer, or its kernel
        or bias has another shape than the layer's.
    """
    loaded = dict(params)
    for i, layer in enumerate(layers):
        name = f"Dense_{i}"
        dense = params.get(name)
        if not isinstance(dense, Mapping) or not {"kernel", "bias"} <= dense.keys():
            hint = " (pass variables['params'])" if "params" in params else ""
            raise ValueError(
                f"`params` must have a {name!r} with a kernel and a bias for "
                f"pretrained layer {i}{hint}; it has {sorted(params)}."
            )
        new = dict(dense)
        for field, value in zip(("kernel", "bias"), layer, strict=True):
            old = dense[field]
            if jnp.shape(value) != jnp.shape(old):
                raise ValueError(
                    f"pretrained layer {i}'s {field} has shape {jnp.shape(value)}, "
                    f"but `params[{name!r}][{field!r}]` has shape {jnp.shape(old)}."
                )
            new[field] = jnp.asarray(value, jnp.result_type(old))
        loaded[name] = new
    return loaded


def _check_arguments(
    x: chex.Array,
    widths: Sequence[int],
    epochs: int,
    batch: int,
    learning_rate: float,
) -> tuple[chex.Array, list[int]]:
    """Checks the arguments shared by both methods; returns float32 ``x``."""
    if np.ndim(x) != 2 or np.shape(x)[0] == 0:
        raise ValueError(
            f"`x` must be a non-empty 2-D array (examples, features), got shape "
            f"{np.shape(x)}."
        )
    x = jnp.asarray(x, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("`x` must be finite, got NaN or infinite values.")
    if isinstance(widths, int) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(
            f"`widths` must be a non-empty sequence of ints, got {widths!r}."
        )
    widths = [
        _checks.integer_at_least(f"widths[{i}]", w, 1) for i, w in enumerate(widths)
    ]
    _checks.integer_at_least("epochs", epochs, 1)
    _checks.integer_at_least("batch", batch, 1)
    if batch > x.shape[0]:
        raise ValueError(
            f"`batch` must be at most the {x.shape[0]} examples of `x`, got {batch}."
        )
    _checks.positive("learning_rate", learning_rate)
    return x, widths


def _greedy(
    train: Callable[..., tuple[Params, tuple[chex.Array, chex.Array]]],
    x: chex.Array,
    key: chex.PRNGKey,
    widths: Sequence[int],
    *hyperparameters: chex.Array,
) -> Pretrained:
    """Trains one layer per width, each on the hidden probabilities of the last."""
    layers, histories = [], []
    for i, (width, layer_key) in enumerate(
        zip(widths, jax.random.split(key, len(widths)), strict=True)
    ):
        params, history = train(
            x, layer_key, *hyperparameters, width=width, first=i == 0
        )
        layers.append(Layer(params["kernel"], params["bias"]))
        histories.append(history)
        x = _hidden(params, x)
    objective, reconstruction = (jnp.stack(h) for h in zip(*histories, strict=True))
    return Pretrained(layers, objective, reconstruction)


def _init(key: chex.PRNGKey, x: chex.Array, width: int, first: bool) -> Params:
    """Hinton's (2010) initialization: small kernel, visible bias from the data."""
    mean = jnp.mean(x, axis=0)
    if not first:  # the logit of the units' mean activity
        mean = jnp.clip(mean, 1e-3, 1 - 1e-3)
        mean = jnp.log(mean) - jnp.log1p(-mean)
    return {
        "kernel": 0.01 * jax.random.normal(key, (x.shape[1], width), jnp.float32),
        "bias": jnp.zeros((width,), jnp.float32),
        "visible_bias": mean,
    }


def _hidden(params: Params, v: chex.Array) -> chex.Array:
    """The hidden probabilities, ``sigmoid(v W + b)``."""
    return jax.nn.sigmoid(v @ params["kernel"] + params["bias"])


def _logits(params: Params, h: chex.Array) -> chex.Array:
    """The visible units' input from the hidden ones, ``h Wᵀ + a``."""
    return h @ params["kernel"].T + params["visible_bias"]


def _visible(params: Params, h: chex.Array, first: bool) -> chex.Array:
    """The visible units' mean given ``h``: linear (first layer) or sigmoid."""
    z = _logits(params, h)
    return z if first else jax.nn.sigmoid(z)


def _reconstruction_error(params: Params, v: chex.Array, first: bool) -> chex.Array:
    """The mean squared error of ``E[v | h = p(h | v)]``, per unit."""
    return jnp.mean((_visible(params, _hidden(params, v), first) - v) ** 2)


def _free_energy(params: Params, v: chex.Array, first: bool) -> chex.Array:
    """The RBM's free energy of each row of ``v`` (see :func:`rbm`)."""
    hidden = jnp.sum(jax.nn.softplus(v @ params["kernel"] + params["bias"]), axis=-1)
    if first:
        return 0.5 * jnp.sum((v - params["visible_bias"]) ** 2, axis=-1) - hidden
    return -(v @ params["visible_bias"]) - hidden


def _fit(
    grad_fn: GradFn,
    metrics_fn: MetricsFn,
    params: Params,
    x: chex.Array,
    key: chex.PRNGKey,
    learning_rate: chex.Array,
    epochs: int,
    batch: int,
) -> tuple[Params, tuple[chex.Array, chex.Array]]:
    """Adam on shuffled minibatches of ``x``; the metrics after every epoch."""
    tx = optax.adam(learning_rate)
    steps = x.shape[0] // batch

    def step(state, inputs):
        params, opt_state = state
        index, step_key = inputs
        grads = grad_fn(params, x[index], step_key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(state, epoch_key):
        order_key, step_key = jax.random.split(epoch_key)
        order = jax.random.permutation(order_key, x.shape[0])[: steps * batch]
        inputs = (order.reshape(steps, batch), jax.random.split(step_key, steps))
        state, _ = jax.lax.scan(step, state, inputs)
        return state, metrics_fn(state[0], x)

    state = (params, tx.init(params))
    (params, _), history = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
    return params, history


@functools.partial(jax.jit, static_argnames=("width", "first", "epochs", "batch"))
def _train_rbm(
    x: chex.Array,
    key: chex.PRNGKey,
    learning_rate: chex.Array,
    *,
    width: int,
    first: bool,
    epochs: int,
    batch: int,
) -> tuple[Params, tuple[chex.Array, chex.Array]]:
    """One RBM's whole CD-1 training: Gaussian visible units if ``first``."""

    def negative_cd1(params, v0, key):
        h0 = _hidden(params, v0)
        sample = jax.random.bernoulli(key, h0).astype(v0.dtype)
        v1 = _visible(params, sample, first)
        h1 = _hidden(params, v1)
        return {
            "kernel": (v1.T @ h1 - v0.T @ h0) / v0.shape[0],
            "bias": jnp.mean(h1 - h0, axis=0),
            "visible_bias": jnp.mean(v1 - v0, axis=0),
        }

    def metrics(params, v):
        free_energy = jnp.mean(_free_energy(params, v, first))
        return free_energy, _reconstruction_error(params, v, first)

    init_key, key = jax.random.split(key)
    params = _init(init_key, x, width, first)
    return _fit(negative_cd1, metrics, params, x, key, learning_rate, epochs, batch)


@functools.partial(jax.jit, static_argnames=("width", "first", "epochs", "batch"))
def _train_autoencoder(
    x: chex.Array,
    key: chex.PRNGKey,
    learning_rate: chex.Array,
    noise: chex.Array,
    *,
    width: int,
    first: bool,
    epochs: int,
    batch: int,
) -> tuple[Params, tuple[chex.Array, chex.Array]]:
    """One denoising autoencoder's training: linear decoder if ``first``."""

    def loss(params, corrupted, clean):
        z = _logits(params, _hidden(params, corrupted))
        if first:
            return 0.5 * jnp.mean((z - clean) ** 2)
        return jnp.mean(jax.nn.softplus(z) - clean * z)

    def grad_fn(params, clean, key):
        keep = jax.random.bernoulli(key, 1 - noise, clean.shape)
        return jax.grad(loss)(params, jnp.where(keep, clean, 0.0), clean)

    def metrics(params, v):
        return loss(params, v, v), _reconstruction_error(params, v, first)

    init_key, key = jax.random.split(key)
    params = _init(init_key, x, width, first)
    return _fit(grad_fn, metrics, params, x, key, learning_rate, epochs, batch)
