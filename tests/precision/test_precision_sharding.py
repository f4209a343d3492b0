"""Dynamic loss scaling on 8 (virtual CPU) devices: sharded jit and shard_map.

A non-finite element anywhere in the gradient skips the step on every device.
Under ``jax.jit`` with sharded arrays the check is global by construction;
inside ``jax.shard_map`` it takes ``axis_name``, and without it each device
decides alone (the failure mode the option exists for). Both runs follow the
same scripted stream of scaled gradients as one device, unsharded: finite,
finite, a NaN on one shard only, finite, +inf on another shard only, finite.

The scripts run in a subprocess (the ``run_on_eight_devices`` fixture of
``tests/conftest.py``).
"""

import textwrap

# The optimizer, the stream, and the run on one device, unsharded.
PRELUDE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 3)), jnp.float16),
        "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
    }
    raw = [
        {k: rng.normal(size=p.shape).astype(np.float32) for k, p in params.items()}
        for _ in range(6)
    ]
    # Step 2: a NaN in w[42, 1], on device 5 only (rows 40-47). Step 4: +inf
    # in b[2], on device 1 only (elements 2-3).
    BAD = {2: ("w", (42, 1), np.nan, 5), 4: ("b", (2,), np.inf, 1)}

    def make_tx(axis_name=None):
        return jstab.dynamic_loss_scale(
            jstab.upcast(optax.adam(1e-2)), init_scale=2.0**10, growth_interval=2,
            axis_name=axis_name)

    def scaled(i, scale):
        # The gradient of the loss times the current scale, in each leaf's dtype.
        g = {k: jnp.asarray(r * np.float32(scale), params[k].dtype)
             for k, r in raw[i].items()}
        if i in BAD:
            name, index, value, _ = BAD[i]
            g[name] = g[name].at[index].set(value)
        return g

    def specs(tree):
        return jax.tree.map(lambda x: P("d") if x.ndim else P(), tree)

    def put(tree):
        return jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, P("d") if x.ndim else P())),
            tree)

    def same(want, got):
        want, got = jax.tree.leaves(want), jax.tree.leaves(got)
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
            # Arrays of floats to 1e-6 (measured: bit for bit); the scale
            # (a power of two), counters and flags exactly.
            if a.ndim and np.issubdtype(a.dtype, np.floating):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
            else:
                np.testing.assert_array_equal(b, a)

    def bits(tree):
        return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]

    tx = make_tx()

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return updates, state, optax.apply_updates(params, updates)

    one_device = jax.jit(step)
    runs, p, state = [], params, tx.init(params)
    for i in range(6):
        g = scaled(i, jstab.loss_scale(state))
        u, new_state, new_p = jax.block_until_ready(one_device(p, g, state))
        runs.append(dict(grads=g, params=p, state=state, updates=u,
                         new_state=new_state, new_params=new_p))
        p, state = new_p, new_state

    # The trajectory: growth after 2 finite steps, backoff on each bad one.
    def trace(field):
        return [np.asarray(getattr(r["new_state"], field)) for r in runs]

    np.testing.assert_array_equal(
        trace("scale"), np.float32([2**10, 2**11, 2**10, 2**10, 2**9, 2**9]))
    np.testing.assert_array_equal(trace("skipped"), [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(trace("skip_count"), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(trace("good_steps"), [1, 0, 0, 1, 0, 1])
    for i in BAD:
        r = runs[i]
        assert bits(r["new_state"].inner_state) == bits(r["state"].inner_state)
        assert bits(r["new_params"]) == bits(r["params"])
    """
)

JIT_SCRIPT = PRELUDE + textwrap.dedent(
    """
    # Sharded jit: the same updates, states and scales as on one device.
    sp = put(params)
    sstate = tx.init(sp)
    for i, r in enumerate(runs):
        g = put(r["grads"])
        if i in BAD:
            # The bad element lives on one shard, of the expected device.
            name, _, _, device = BAD[i]
            holders = [s for s in g[name].addressable_shards
                       if not np.isfinite(np.asarray(s.data)).all()]
            assert [s.device for s in holders] == [mesh.devices[device]], holders
        u, new_state, new_p = jax.block_until_ready(one_device(sp, g, sstate))
        same(r["updates"], u)
        same(r["new_state"], new_state)
        same(r["new_params"], new_p)
        for x in u.values():
            assert x.sharding.is_equivalent_to(shard, x.ndim), x.sharding
        if i in BAD:
            # Skipped everywhere: every shard's update is zero, every shard of
            # the parameters and of the inner state unchanged, bit for bit.
            assert bool(new_state.skipped)
            for name in u:
                shards = u[name].addressable_shards
                assert len(shards) == 8
                assert all((np.asarray(s.data) == 0).all() for s in shards)
                for a, b in zip(sp[name].addressable_shards,
                                new_p[name].addressable_shards, strict=True):
                    assert a.device == b.device and a.index == b.index
                    assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes()
            assert bits(new_state.inner_state) == bits(sstate.inner_state)
        sp, sstate = new_p, new_state
    print("ok")
    """
)

SHARD_MAP_SCRIPT = PRELUDE + textwrap.dedent(
    """
    # shard_map with axis_name: each device sees its slice; the psum makes a
    # non-finite element on one device skip the step on all 8.
    local_tx = make_tx("d")
    state_specs = specs(local_tx.init(params))

    def local(p, g, s):
        u, s = local_tx.update(g, s, p)
        stat = jstab.statistics(s)["dynamic_loss_scale/scale"]
        return u, s, optax.apply_updates(p, u), s.scale[None], stat[None]

    f = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P("d"), P("d"), state_specs),
        out_specs=(P("d"), state_specs, P("d"), P("d"), P("d"))))
    sp, sstate = put(params), put(local_tx.init(params))
    for i, r in enumerate(runs):
        u, new_state, new_p, scales, stats = jax.block_until_ready(
            f(sp, put(r["grads"]), sstate))
        same(r["updates"], u)
        same(r["new_state"], new_state)
        same(r["new_params"], new_p)
        # Every device holds the same scale, and jstab.statistics reports it.
        want = np.full(8, r["new_state"].scale, np.float32)
        np.testing.assert_array_equal(scales, want)
        np.testing.assert_array_equal(stats, want)
        if i in BAD:
            assert bool(new_state.skipped)
            for x in u.values():
                assert all((np.asarray(s.data) == 0).all()
                           for s in x.addressable_shards)
            assert bits(new_state.inner_state) == bits(sstate.inner_state)
            assert bits(new_p) == bits(sp)
        sp, sstate = new_p, new_state

    # Without axis_name each device decides alone: on the NaN step only
    # device 5 skips and backs off, the 7 others apply the step and keep
    # their scale. The devices disagree, and the run leaves one device.
    bare_tx = make_tx()

    def bare(p, g, s):
        u, s = bare_tx.update(g, s, p)
        stat = jstab.statistics(s)["dynamic_loss_scale/scale"]
        return u, s.scale[None], s.skipped[None], stat[None]

    f = jax.jit(jax.shard_map(
        bare, mesh=mesh, in_specs=(P("d"), P("d"), state_specs),
        out_specs=(P("d"), P("d"), P("d"), P("d"))))
    r = runs[2]
    u, scales, skipped, stats = jax.block_until_ready(
        f(put(r["params"]), put(r["grads"]), put(r["state"])))
    before = float(r["state"].scale)
    assert before == 2**11
    want = np.full(8, before, np.float32)
    want[5] = before / 2
    np.testing.assert_array_equal(scales, want)
    np.testing.assert_array_equal(stats, want)
    np.testing.assert_array_equal(skipped, np.arange(8) == 5)
    w, b = np.asarray(u["w"], np.float32), np.asarray(u["b"], np.float32)
    assert (w[40:48] == 0).all() and (b[10:12] == 0).all()
    rest = np.r_[0:40, 48:64]
    assert (np.abs(w[rest]) > 0).all(), w
    assert (np.abs(b[np.r_[0:10, 12:16]]) > 0).all(), b
    assert (np.asarray(r["updates"]["w"]) == 0).all()  # one device: all skip
    print("ok")
    """
)


def test_sharded_jit_matches_one_device(run_on_eight_devices):
    run_on_eight_devices(JIT_SCRIPT)


def test_shard_map_needs_axis_name(run_on_eight_devices):
    run_on_eight_devices(SHARD_MAP_SCRIPT)
