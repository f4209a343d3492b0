"""A small GPT in Flax NNX, for part F of ``jstab demo``.

Token and learned position embeddings, ``layers`` pre-LN blocks (causal
multi-head attention, optionally with LayerNorm on the queries and keys,
then a 4× MLP with GELU), a final LayerNorm and an untied head. The loss is
the mean cross-entropy of the next token, plus, with ``z_coef > 0``, the
z-loss ``z_coef * mean(logsumexp(logits)²)`` of PaLM (Chowdhery et al.,
2022), which keeps the output logits' normalizer near 1. QK-normalisation
(Dehghani et al., 2023) and the z-loss are the two remedies that Wortsman
et al. (2023) found to remove, at small scale, the instabilities of large
Transformers trained at high learning rates: attention-logit growth and
output-logit divergence.

References:
  Radford et al., 2019, "Language models are unsupervised multitask
  learners"; Chowdhery et al., 2022, "PaLM: scaling language modeling with
  pathways"; Dehghani et al., 2023, "Scaling vision transformers to 22
  billion parameters"; Wortsman et al., 2023, "Small-scale proxies for
  large-scale Transformer training instabilities", arXiv 2309.14322.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Shape:
    """The GPT's sizes and switches.

    Attributes:
      vocab: the number of tokens.
      context: the longest sequence (the position embeddings' rows).
      layers: the number of Transformer blocks.
      width: the residual stream's units.
      heads: attention heads per block (``width`` must be a multiple).
      qk_norm: whether the queries and keys are layer-normalized per head
        before their dot products.
    """

    vocab: int
    context: int = 64
    layers: int = 2
    width: int = 64
    heads: int = 4
    qk_norm: bool = False


class Attention(nnx.Module):
    """Causal multi-head self-attention, with optional QK-normalisation."""

    def __init__(self, shape: Shape, *, rngs: nnx.Rngs):
        """Builds the projections of ``shape.width`` units.

        Args:
          shape: the sizes, and whether to normalize queries and keys.
          rngs: the initializers' keys.
        """
        width, self.heads = shape.width, shape.heads
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.out = nnx.Linear(
            width,
            width,
            kernel_init=nnx.initializers.normal(0.02 / (2 * shape.layers) ** 0.5),
            rngs=rngs,
        )
        head = width // shape.heads
        self.q_norm = nnx.LayerNorm(head, rngs=rngs) if shape.qk_norm else None
        self.k_norm = nnx.LayerNorm(head, rngs=rngs) if shape.qk_norm else None

    def __call__(self, x: chex.Array) -> chex.Array:
        """``x``'s attention output, ``(batch, time, width)``; position ``t``
        attends to positions ``≤ t`` only."""
        batch, time, width = x.shape
        qkv = self.qkv(x).reshape(batch, time, 3, self.heads, width // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((time, time), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, time, width)
        return self.out(y)


class Block(nnx.Module):
    """A pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, shape: Shape, *, rngs: nnx.Rngs):
        """Builds the block's attention and 4× GELU MLP.

        Args:
          shape: the sizes.
          rngs: the initializers' keys.
        """
        width = shape.width
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = Attention(shape, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(
            4 * width,
            width,
            kernel_init=nnx.initializers.normal(0.02 / (2 * shape.layers) ** 0.5),
            rngs=rngs,
        )

    def __call__(self, x: chex.Array) -> chex.Array:
        """The stream after the block."""
        x = x + self.attention(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    """A decoder-only Transformer language model (GPT-2's layout, untied head)."""

    def __init__(self, shape: Shape, *, rngs: nnx.Rngs):
        """Builds the embeddings, ``shape.layers`` blocks and the head.

        Args:
          shape: the sizes and switches.
          rngs: the initializers' keys.
        """
        self.shape = shape
        embed = nnx.initializers.normal(0.02)
        self.tokens = nnx.Embed(
            shape.vocab, shape.width, embedding_init=embed, rngs=rngs
        )
        self.positions = nnx.Param(embed(rngs.params(), (shape.context, shape.width)))
        self.blocks = nnx.List([Block(shape, rngs=rngs) for _ in range(shape.layers)])
        self.ln = nnx.LayerNorm(shape.width, rngs=rngs)
        self.head = nnx.Linear(
            shape.width,
            shape.vocab,
            kernel_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

    def __call__(self, tokens: chex.Array) -> chex.Array:
        """The next-token logits, ``(batch, time, vocab)``, of ``tokens``,
        ``(batch, time)`` integers with ``time ≤ context``."""
        time = tokens.shape[1]
        x = self.tokens(tokens) + self.positions[...][:time]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss(model: GPT, windows: chex.Array, z_coef: float = 0.0) -> chex.Array:
    """The next-token loss of ``windows``, ``(batch, time + 1)`` tokens.

    Args:
      model: the language model.
      windows: token windows; the model reads all but the last token of
        each and predicts all but the first.
      z_coef: the z-loss coefficient (PaLM's is 1e-4); 0 leaves it out.

    Returns:
      The mean cross-entropy, plus ``z_coef * mean(logsumexp(logits)²)``.
    """
    logits = model(windows[:, :-1]).astype(jnp.float32)
    targets = windows[:, 1:]
    value = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    if z_coef:
        value = value + z_coef * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return value
