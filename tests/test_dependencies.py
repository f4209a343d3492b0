"""The core dependencies install together and offer what jstab builds on."""

import importlib.metadata

import chex
import jax
import jax.numpy as jnp
import optax
from flax import linen, nnx


def test_core_dependencies_are_declared_in_the_package_metadata():
    requires = importlib.metadata.requires("jstab")
    declared = {r.split(">")[0].split("=")[0].strip() for r in requires or []}
    assert {"jax", "optax", "flax", "chex"} <= declared


def test_the_stack_runs_a_jitted_optax_step_with_readable_state():
    # jstab's transforms are read with optax.tree.get; this pins that the
    # installed Optax has it (our lower bound in pyproject.toml).
    params = {"w": jnp.ones((3,))}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: 2.0 * p, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new_params, state = step(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    assert int(optax.tree.get(state, "count")) == 1


def test_flax_linen_and_nnx_accept_a_plain_kernel_init():
    init = jax.nn.initializers.zeros
    variables = linen.Dense(4, kernel_init=init).init(
        jax.random.key(0), jnp.ones((1, 3))
    )
    assert variables["params"]["kernel"].shape == (3, 4)
    layer = nnx.Linear(3, 4, kernel_init=init, rngs=nnx.Rngs(0))
    assert layer.kernel[...].shape == (3, 4)
