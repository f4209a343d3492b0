"""Diagnostics on 8 (virtual CPU) devices: sharded jit and shard_map.

The script runs in a subprocess (the ``run_on_eight_devices`` fixture of
``tests/conftest.py``).
"""

import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    g = {
        "w": jnp.asarray(rng.normal(size=(64, 3)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(16, 5)) * 1e-4, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16,)) * 3, jnp.float32),
    }
    g["b"] = g["b"].at[3].set(jnp.nan)

    def check(want, got):
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)

    # Sharded jit: the same state as on one device.
    tx = jstab.monitor_gradients()
    want = tx.update(g, tx.init(g))
    got = jax.jit(tx.update)(jax.device_put(g, shard), tx.init(g))
    check(want, got)
    assert got[0]["w"].sharding.is_equivalent_to(shard, 2)
    assert bool(want[1].vanishing) and int(want[1].nonfinite) == 1

    # shard_map: axis_name makes norms and counts cover all shards, the
    # rescaled pass for tiny gradients included.
    for scale in (1.0, 1e-30):
        gi = jax.tree.map(lambda x: x * jnp.float32(scale), g)
        want = tx.update(gi, tx.init(gi))
        local = jstab.monitor_gradients(axis_name="d")
        f = jax.jit(jax.shard_map(
            lambda g: local.update(g, local.init(g)), mesh=mesh,
            in_specs=(P("d"),), out_specs=(P("d"), P())))
        got = f(jax.device_put(gi, shard))
        check(want, got)

    # signal_propagation on a batch sharded over the devices.
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(4):
                x = jax.nn.relu(nn.Dense(16)(x))
            return nn.Dense(4)(x)

    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    model = MLP()
    variables = model.init(jax.random.key(0), x)
    want = jstab.signal_propagation(model, variables, x)
    # Data parallel as users write it: an Auto mesh lets XLA place the
    # kernel gradients' reduction over the sharded batch.
    auto = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(auto, P("d")))
    got = jstab.signal_propagation(model, variables, xs)
    for field in ("activation_mean", "activation_std", "dead_fraction",
                  "grad_norm"):
        np.testing.assert_allclose(getattr(want, field), getattr(got, field),
                                   rtol=1e-5, atol=1e-7)
    print("ok")
    """
)


def test_sharded_jit_and_shard_map_match_one_device(run_on_eight_devices):
    run_on_eight_devices(SCRIPT)
