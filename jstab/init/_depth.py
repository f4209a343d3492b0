"""Residual branches scaled with depth: GPT-2, Fixup and DeepNorm."""

from __future__ import annotations

import math
from typing import Literal

import chex
import jax.numpy as jnp

from jstab import _checks
from jstab._numerics import compute_dtype
from jstab.init import _core

Scheme = Literal["gpt2", "fixup", "deepnorm"]
_SCHEMES = ("gpt2", "fixup", "deepnorm")


def _factor(scheme: str, num_layers: int, branch_layers: int) -> float:
    if scheme == "gpt2":
        return 1.0 / math.sqrt(2 * num_layers)
    if scheme == "fixup":
        return num_layers ** (-1.0 / (2 * branch_layers - 2))
    return (8 * num_layers) ** -0.25


def depth_scaled(
    init: _core.Initializer,
    num_layers: int,
    *,
    scheme: Scheme = "gpt2",
    branch_layers: int = 2,
) -> _core.Initializer:
    r"""``init`` times a factor that shrinks a residual branch with depth.

    Without normalization, each residual block :math:`h \leftarrow h +
    f(h)` adds its branch's variance to the stream: with :math:`L` blocks
    whose branches keep the variance of their input, the stream's variance
    grows as :math:`2^L`, and a network of a few hundred blocks explodes at
    initialization. Scaling the branch's weights with the depth keeps the
    sum bounded. The returned initializer draws ``init(key, shape, dtype)``
    and multiplies it by (:math:`L` = ``num_layers``, :math:`m` =
    ``branch_layers``):

    .. math::
      \text{gpt2: } \frac{1}{\sqrt{2L}}, \qquad
      \text{fixup: } L^{-\frac{1}{2m-2}}, \qquad
      \text{deepnorm: } (8L)^{-\frac14}.

    Which layers of a branch take it:

    - ``"gpt2"``: the branch's output projection (GPT-2's ``c_proj``, as in
      nanoGPT); :math:`L` counts the Transformer blocks, each with two
      residual branches (attention and MLP), so the factor is one over the
      square root of the number of branches.
    - ``"fixup"``: every layer of the branch but the last, which starts at
      zero (``kernel_init=flax.linen.initializers.zeros``); :math:`L` counts
      the residual branches, :math:`m \ge 2` the layers in each. Fixup's
      other parts compose from Flax: a scalar bias before each layer is a
      ``self.param("bias", nn.initializers.zeros, ())`` added to the input,
      and its scalar multiplier is a :class:`jstab.nn.ResidualGate` with
      ``init_value=1.0``.
    - ``"deepnorm"``: the feed-forward layers and the attention's value and
      output projections of a decoder-only (or encoder-only) stack of
      :math:`L` layers, with DeepNorm's residual :math:`\text{LN}(\alpha x +
      f(x))`; :math:`\alpha` and, for an encoder-decoder, both stacks'
      constants come from :func:`deepnorm_constants`. DeepNet draws these
      weights from Xavier's normal with gain :math:`\beta`, which is
      ``depth_scaled(jstab.glorot_normal(), L, scheme="deepnorm")``, or
      ``jstab.glorot_normal(gain=beta)`` with any of the table's
      :math:`\beta`.

    The same key gives ``init``'s draw times the factor, computed in at
    least float32 and returned in the requested dtype.

    Args:
      init: any initializer ``init(key, shape, dtype) -> Array`` (jstab's,
        ``jax.nn.initializers``', Flax's).
      num_layers: :math:`L`, an int ≥ 1.
      scheme: ``"gpt2"``, ``"fixup"`` or ``"deepnorm"``.
      branch_layers: :math:`m`, the layers in a residual branch, an int ≥ 2
        for ``"fixup"`` (unused by the other schemes, but checked).

    Returns:
      An initializer ``init(key, shape, dtype=None) -> Array``; ``dtype=None``
      keeps ``init``'s own default.

    Raises:
      TypeError: ``init`` is not callable, or an argument has the wrong type.
      ValueError: ``num_layers < 1``, an unknown ``scheme``, or
        ``branch_layers < 2`` with ``"fixup"``.

    Example:
      >>> import jax
      >>> import jstab
      >>> from flax import nnx
      >>> depth = 48
      >>> proj = nnx.Linear(
      ...     256, 64, rngs=nnx.Rngs(0),
      ...     kernel_init=jstab.depth_scaled(jstab.he_normal(), depth),
      ... )
      >>> print(f"{float(proj.kernel[...].std()):.3f}")  # sqrt(2/256)/sqrt(2 * 48)
      0.009

    References:
      Radford et al., 2019, "Language models are unsupervised multitask
      learners" (GPT-2); Zhang, Dauphin & Ma, 2019, "Fixup initialization:
      residual learning without normalization", arXiv 1901.09321; Wang et
      al., 2022, "DeepNet: scaling Transformers to 1,000 layers", arXiv
      2203.00555.
    """
    if not callable(init):
        raise TypeError(
            f"`init` must be an initializer init(key, shape, dtype), got {init!r}."
        )
    num_layers = _checks.integer_at_least("num_layers", num_layers, 1)
    scheme = _checks.one_of("scheme", scheme, _SCHEMES)
    branch_layers = _checks.integer_at_least("branch_layers", branch_layers, 1)
    if scheme == "fixup" and branch_layers < 2:
        raise ValueError(
            f'`branch_layers` must be an int >= 2 for scheme="fixup" (its '
            f"factor is num_layers ** (-1 / (2 * branch_layers - 2))), got "
            f"{branch_layers!r}."
        )
    factor = _factor(scheme, num_layers, branch_layers)

    def scaled(
        key: chex.PRNGKey, shape: chex.Shape, dtype: chex.ArrayDType | None = None
    ) -> chex.Array:
        dtype = _checks.float_dtype("dtype", dtype)
        draw = init(key, shape) if dtype is None else init(key, shape, dtype)
        draw = jnp.asarray(draw)
        return (draw.astype(compute_dtype(draw.dtype)) * factor).astype(draw.dtype)

    name = getattr(init, "__name__", type(init).__name__)
    scaled.__name__ = scaled.__qualname__ = (
        f"depth_scaled({name}, {num_layers}, scheme={scheme!r})"
    )
    return scaled


def deepnorm_constants(
    encoder_layers: int = 0, decoder_layers: int = 0
) -> dict[str, tuple[float, float]]:
    r"""DeepNorm's residual multiplier :math:`\alpha` and init scale :math:`\beta`.

    DeepNorm replaces a Post-LN residual :math:`\text{LN}(x + f(x))` with
    :math:`\text{LN}(\alpha x + f(x))` and draws the feed-forward and the
    value and output projections' weights with gain :math:`\beta`, which
    bounds the model's update and trained Transformers of 1,000 layers. With
    :math:`N` encoder and :math:`M` decoder layers (DeepNet's Table 1):

    ====================  ============================  =============================
    stack                 :math:`\alpha`                :math:`\beta`
    ====================  ============================  =============================
    encoder only          :math:`(2N)^{1/4}`            :math:`(8N)^{-1/4}`
    decoder only          :math:`(2M)^{1/4}`            :math:`(8M)^{-1/4}`
    encoder of enc.-dec.  :math:`0.81(N^4 M)^{1/16}`    :math:`0.87(N^4 M)^{-1/16}`
    decoder of enc.-dec.  :math:`(3M)^{1/4}`            :math:`(12M)^{-1/4}`
    ====================  ============================  =============================

    Args:
      encoder_layers: :math:`N`, an int ≥ 0.
      decoder_layers: :math:`M`, an int ≥ 0; not both zero.

    Returns:
      ``{"encoder": (alpha, beta), "decoder": (alpha, beta)}`` with the
      stacks that exist.

    Raises:
      ValueError: both are zero, or one is negative.
      TypeError: one is not an int.

    Example:
      >>> import jstab
      >>> alpha, beta = jstab.deepnorm_constants(decoder_layers=24)["decoder"]
      >>> print(f"{alpha:.4f} {beta:.4f}")
      2.6321 0.2686

    References:
      Wang et al., 2022, "DeepNet: scaling Transformers to 1,000 layers",
      arXiv 2203.00555.
    """
    n = _checks.integer_at_least("encoder_layers", encoder_layers, 0)
    m = _checks.integer_at_least("decoder_layers", decoder_layers, 0)
    if n == 0 and m == 0:
        raise ValueError(
            "`encoder_layers` and `decoder_layers` are both 0; DeepNorm's "
            "constants need at least one stack (an int >= 1)."
        )
    if m == 0:
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    if n == 0:
        return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    return {
        "encoder": (0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
        "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
    }
