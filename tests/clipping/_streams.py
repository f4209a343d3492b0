"""Helpers of the adaptive rules' tests: exact-norm gradients, one-trace steps."""

import chex
import jax
import jax.numpy as jnp


def grad_of_norm(norm):
    """A two-leaf gradient whose global L2 norm is exactly ``norm`` in float32.

    One nonzero element: sqrt(x²) == |x| in IEEE arithmetic, so references
    can work with ``norm`` itself.
    """
    return {"a": jnp.array([norm], jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def traced_once(tx):
    """``jax.jit(tx.update)`` that fails if it is traced a second time."""
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state)

    return step
