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


UPDATES_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 3)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(16, 5)) * 1e-3, jnp.float32),
        "b": jnp.zeros((16,), jnp.float32),
    }
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
    )

    def check(want, got):
        want, got = jax.tree.leaves(want), jax.tree.leaves(got)
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)

    def specs(tree):
        return jax.tree.map(lambda x: P("d") if x.ndim else P(), tree)

    def put(tree):
        return jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, P("d") if x.ndim else P())),
            tree)

    def step(tx, params, grads, state=None):
        state = tx.init(params) if state is None else state
        return tx.update(grads, state, params)

    # Sharded jit: the same state as on one device.
    tx = jstab.monitor_updates()
    want = step(tx, params, grads)
    sp, sg = jax.device_put(params, shard), jax.device_put(grads, shard)
    got = jax.jit(step, static_argnums=0)(tx, sp, sg)
    check(want, got)
    assert got[0]["w"].sharding.is_equivalent_to(shard, 2)
    assert float(want[1].update_ratio["b"]) == 0.0 < float(want[1].update_norms["b"])

    # Adam and the monitor, then the moments: sharded jit.
    tx = optax.chain(optax.adam(1e-2), jstab.monitor_updates())
    want = step(tx, params, grads)
    want_stats = jstab.statistics(want[1], moments=True)
    assert "adam/mu_norm" in want_stats and float(want_stats["adam/nu_norm"]) > 0
    got = jax.jit(step, static_argnums=0)(tx, sp, sg)
    check(want, got)
    got_stats = jax.jit(lambda s: jstab.statistics(s, moments=True))(got[1])
    assert set(got_stats) == set(want_stats)
    check(want_stats, {k: got_stats[k] for k in want_stats})

    # shard_map: axis_name makes every norm cover all shards, the rescaled
    # pass for tiny updates included.
    for scale in (1.0, 1e-30):
        gi = jax.tree.map(lambda x: x * jnp.float32(scale), grads)
        tx = jstab.monitor_updates()
        want = step(tx, params, gi)
        local = jstab.monitor_updates(axis_name="d")
        f = jax.jit(jax.shard_map(
            lambda p, g: step(local, p, g), mesh=mesh,
            in_specs=(P("d"), P("d")), out_specs=specs(want)))
        got = jax.block_until_ready(f(sp, jax.device_put(gi, shard)))
        check(want, got)

    # shard_map: a step of Adam and the monitor, then the statistics with
    # the moments' norms over all shards, from a state two steps in.
    tx = optax.chain(optax.adam(1e-2), jstab.monitor_updates())
    state = step(tx, params, grads)[1]
    g2 = jax.tree.map(lambda x: x * jnp.float32(-0.5), grads)
    want = step(tx, params, g2, state)
    want_stats = jstab.statistics(want[1], moments=True)
    local = optax.chain(optax.adam(1e-2), jstab.monitor_updates(axis_name="d"))

    def local_step(p, g, s):
        out = step(local, p, g, s)
        return out, jstab.statistics(out[1], moments=True, axis_name="d")

    f = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P("d"), P("d"), specs(state)),
        out_specs=(specs(want), P())))
    got, got_stats = jax.block_until_ready(
        f(sp, jax.device_put(g2, shard), put(state)))
    check(want, got)
    assert set(got_stats) == set(want_stats)
    check(want_stats, {k: got_stats[k] for k in want_stats})
    # Without axis_name the moments' norms are those of one shard only.
    f = jax.jit(jax.shard_map(
        lambda s: jstab.statistics(s, moments=True)["adam/mu_norm"][None],
        mesh=mesh, in_specs=(specs(state),), out_specs=P("d")))
    wrong = f(put(want[1]))
    assert np.asarray(wrong).max() < 0.9 * float(want_stats["adam/mu_norm"])
    print("ok")
    """
)


def test_monitor_updates_and_moment_norms_on_eight_devices(run_on_eight_devices):
    run_on_eight_devices(UPDATES_SCRIPT)
