"""clip_by_block_rms on 8 (virtual CPU) devices: sharded jit and shard_map.

The script runs in a subprocess (the ``run_on_eight_devices`` fixture of
``tests/conftest.py``).
"""

import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jstab.clipping._block_rms import clip_by_block_rms

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    g = {
        "w": jnp.asarray(rng.normal(size=(64, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16,)) * 3, jnp.float32),
        "h": jnp.asarray(rng.normal(size=(8, 4)) * 0.1, jnp.float32),
    }
    # Sums of squares that overflow (1e25) or are too small to trust
    # (1e-18) take the rescaled pass; θ scales along.
    for scale in [1.0, 1e25, 1e-18]:
        gi = jax.tree.map(lambda x: x * scale, g)
        tx = clip_by_block_rms(0.5 * scale)
        want, want_state = tx.update(gi, tx.init(gi))
        assert want_state.clipped == np.float32(2 / 3), want_state.clipped
        # Under jit with sharded arrays: the same as one device.
        got, state = jax.jit(tx.update)(jax.device_put(gi, shard), tx.init(gi))
        for a, b in zip(jax.tree.leaves((want, want_state)),
                        jax.tree.leaves((got, state))):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
        assert got["w"].sharding.is_equivalent_to(shard, 2)

        # Inside shard_map each device sees 1/8 of every leaf; axis_name
        # makes each RMS global: psum of squares, global element counts.
        def run(axis_name):
            tx = clip_by_block_rms(0.5 * scale, axis_name=axis_name)

            def local(g, state):
                return tx.update(g, state)

            # Without axis_name the state differs from device to device:
            # not checked, P() returns the first device's.
            f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P()),
                                      out_specs=(P("d"), P()),
                                      check_vma=axis_name is not None))
            return f(jax.device_put(gi, shard), tx.init(gi))

        out, sstate = run("d")
        for a, b in zip(jax.tree.leaves((want, want_state)),
                        jax.tree.leaves((out, sstate))):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)

        # Without axis_name, each device clips by the RMS of its own slice:
        # another result (the state keeps one device's local RMS).
        out, local_state = run(None)
        assert not np.allclose(local_state.norm["w"], want_state.norm["w"],
                               rtol=1e-3, atol=0), local_state.norm
        assert not all(np.allclose(a, b, rtol=1e-3, atol=0) for a, b in
                       zip(jax.tree.leaves(out), jax.tree.leaves(want)))

    # A few steps with a spike, one trace each way.
    tx = clip_by_block_rms(1.0, axis_name="d")
    ref = clip_by_block_rms(1.0)
    smap = jax.jit(jax.shard_map(lambda g, s: tx.update(g, s), mesh=mesh,
                                 in_specs=(P("d"), P()), out_specs=(P("d"), P())))
    state, sstate = ref.init(g), tx.init(g)
    for s in [0.2, 0.3, 20.0, 0.25]:
        gi = jax.tree.map(lambda x: x * s, g)
        want, state = ref.update(gi, state)
        out, sstate = smap(jax.device_put(gi, shard), sstate)
        jax.block_until_ready(out)
        for a, b in zip(jax.tree.leaves((want, state)),
                        jax.tree.leaves((out, sstate))):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
    assert int(sstate.clip_count) == 1 and int(sstate.count) == 4
    print("ok")
    """
)


def test_sharded_jit_and_shard_map_match_one_device(run_on_eight_devices):
    run_on_eight_devices(SCRIPT)
