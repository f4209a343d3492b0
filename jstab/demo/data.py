"""The demo's data: scikit-learn's digits, the adding problem, and the text
of Python's documentation.

None needs a download: the digits ship with scikit-learn, the adding
problem is generated from a key, and ``pydoc_data.topics`` ships with every
Python.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

ADDING_BASELINE = 1.0 / 6.0
"""The adding problem's MSE when always predicting 1: ``Var(u + v) = 2/12``."""


class Split(NamedTuple):
    """A labelled data set cut into a training and a held-out test part."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's 8×8 handwritten digits: 1797 images, 10 classes.

    The images are flattened to 64 features, standardized with the training
    part's mean and standard deviation (constant pixels are left at 0), and
    cut into a stratified training and test part, the same for a given
    ``seed``.

    Args:
      seed: the seed of the split.
      test_fraction: the fraction of the images held out for testing.

    Returns:
      A :class:`Split` of float32 features and int32 labels.
    """
    from sklearn.datasets import load_digits  # the demo extra
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)

    def scale(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    return Split(
        scale(x_train), y_train.astype(np.int32), scale(x_test), y_test.astype(np.int32)
    )


def adding_problem(
    key: chex.PRNGKey, batch: int, length: int
) -> tuple[chex.Array, chex.Array]:
    r"""A batch of the adding problem (Hochreiter & Schmidhuber, 1997).

    Each sequence has ``length`` steps of two channels: a value
    :math:`u_t \sim U(0, 1)` and a marker that is 1 at two steps, one in each
    half of the sequence, and 0 elsewhere. The target is the sum of the two
    marked values. The answer depends on the first half of the sequence, so
    the gradient must cross at least ``length / 2`` steps; predicting 1
    always gives an MSE of ``ADDING_BASELINE`` (1/6).

    Args:
      key: the PRNG key of the batch.
      batch: the number of sequences.
      length: the number of steps, ≥ 2.

    Returns:
      ``(x, y)``: float32 inputs of shape ``(batch, length, 2)`` and targets
      of shape ``(batch,)``.
    """
    k_value, k_first, k_second = jax.random.split(key, 3)
    half = length // 2
    values = jax.random.uniform(k_value, (batch, length))
    first = jax.random.randint(k_first, (batch,), 0, half)
    second = jax.random.randint(k_second, (batch,), half, length)
    steps = jnp.arange(length)
    marks = (steps == first[:, None]) | (steps == second[:, None])
    x = jnp.stack([values, marks.astype(values.dtype)], axis=-1)
    y = jnp.sum(values * marks, axis=-1)
    return x, y


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The characters of ``pydoc_data.topics``, as token ids.

    Attributes:
      chars: the vocabulary, sorted; token ``i`` is ``chars[i]``.
      train: the first 90% of the text's tokens, int32.
      valid: the last 10%, int32.
    """

    chars: str
    train: np.ndarray
    valid: np.ndarray


def text() -> str:
    """``pydoc_data.topics.topics``' values joined in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@functools.cache
def corpus() -> Corpus:
    """The character-level corpus of :func:`text`, split 90/10."""
    raw = text()
    chars = "".join(sorted(set(raw)))
    index = {c: i for i, c in enumerate(chars)}
    tokens = np.array([index[c] for c in raw], np.int32)
    cut = int(0.9 * tokens.size)
    return Corpus(chars, tokens[:cut], tokens[cut:])


def sampler(
    tokens: np.ndarray,
    *,
    batch: int,
    context: int,
    vocab: int,
    corrupt_at: Sequence[int] = (),
    corruption: str = "random",
) -> Callable[[chex.PRNGKey, chex.Array], chex.Array]:
    """``sample(key, step)``: a minibatch of ``(batch, context + 1)`` windows.

    The windows start at uniform random offsets of ``tokens``. At the steps
    of ``corrupt_at`` the minibatch is replaced by a corrupted one drawn
    from the same key: uniform random tokens (``"random"``), or each window
    a single random token repeated (``"repeat"``).

    Args:
      tokens: the training text's token ids.
      batch: windows per minibatch.
      context: the model's context; each window has one token more.
      vocab: the number of tokens (the range of corrupted ones).
      corrupt_at: the steps whose minibatch is corrupted.
      corruption: ``"random"`` or ``"repeat"``.

    Returns:
      A pure function of a key and a step number (a traced int).
    """
    if corruption not in ("random", "repeat"):
        raise ValueError(f"unknown corruption {corruption!r}")
    data = jnp.asarray(tokens)
    bad = jnp.asarray(corrupt_at, jnp.int32)
    shape = (batch, context + 1)

    def sample(key: chex.PRNGKey, step: chex.Array) -> chex.Array:
        clean_key, noise_key = jax.random.split(key)
        start = jax.random.randint(clean_key, (batch,), 0, data.size - shape[1])
        clean = data[start[:, None] + jnp.arange(shape[1])]
        if corruption == "random":
            noise = jax.random.randint(noise_key, shape, 0, vocab, jnp.int32)
        else:
            noise = jax.random.randint(noise_key, (batch, 1), 0, vocab, jnp.int32)
            noise = jnp.broadcast_to(noise, shape)
        return jnp.where(jnp.any(step == bad), noise, clean)

    return sample
