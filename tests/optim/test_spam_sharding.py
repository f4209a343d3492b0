"""scale_by_spam on 8 (virtual CPU) devices: sharded jit and shard_map.

Everything but the spike count is elementwise: under ``jax.jit`` with
sharded arrays the run is the one-device run; inside ``jax.shard_map`` the
count is the global one with ``axis_name`` and each device's own without it.
The script runs in a subprocess (``run_on_eight_devices``, tests/conftest.py).
"""

import textwrap

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jstab.optim._spam import ScaleBySpamState, scale_by_spam

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    shapes = {"w": (64, 3), "b": (16,)}

    # Magnitudes in [0.5, 1.5] (no spikes of their own), a reset at step 25,
    # the gate open at steps 20-24; spikes (40x) at steps 21 (w rows 3 and 41:
    # devices 0 and 5) and 23 (b[2]: device 1), and at step 27 (in the gate).
    stream = []
    for t in range(1, 31):
        g = {k: rng.uniform(0.5, 1.5, s) * rng.choice([-1.0, 1.0], s)
             for k, s in shapes.items()}
        if t == 21:
            g["w"][3, 0] *= 40; g["w"][41, 2] *= 40
        if t in (23, 27):
            g["b"][2] *= 40
        stream.append({k: jnp.asarray(v, jnp.float32) for k, v in g.items()})

    def make(axis_name=None):
        return scale_by_spam(b2=0.9, spike_threshold=10.0, reset_interval=25,
                             warmup_steps=3, axis_name=axis_name)

    def close(a, b):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    # One device, unsharded: the reference run.
    ref = make()
    state = ref.init(stream[0])
    one = []
    for g in stream:
        out, state = ref.update(g, state)
        one.append((out, state))
    assert [int(s.spikes) for _, s in one[20:23]] == [2, 0, 1], one[20:23]
    assert int(one[-1][1].reset_count) == 1

    # Sharded jit: the same run, sharded like the gradient.
    step = jax.jit(ref.update)
    state = ref.init(jax.device_put(stream[0], shard))
    for g, (want, want_state) in zip(stream, one):
        out, state = step(jax.device_put(g, shard), state)
        jax.block_until_ready(out)
        close((out, state), (want, want_state))
        assert int(state.spikes) == int(want_state.spikes)
        assert out["w"].sharding.is_equivalent_to(shard, 2)

    specs = ScaleBySpamState(count=P(), mu=P("d"), nu=P("d"), spikes=P(),
                             reset_count=P())

    # shard_map with axis_name: the global count, the same run.
    tx = make("d")
    smap = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(P("d"), specs),
                                 out_specs=(P("d"), specs)))
    state = tx.init(jax.device_put(stream[0], shard))
    for g, (want, want_state) in zip(stream, one):
        out, state = smap(jax.device_put(g, shard), state)
        jax.block_until_ready(out)
        close((out, state), (want, want_state))
        assert int(state.spikes) == int(want_state.spikes)

    # Without axis_name each device counts its own elements: step 21, from
    # the one-device state before it.
    local = make()

    def per_device(g, state):
        out, new = local.update(g, state)
        return out, new.spikes[None]

    smap = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=(P("d"), specs),
                                 out_specs=(P("d"), P("d"))))
    before = jax.device_put(one[19][1], ScaleBySpamState(
        count=NamedSharding(mesh, P()), mu=shard, nu=shard,
        spikes=NamedSharding(mesh, P()), reset_count=NamedSharding(mesh, P())))
    out, counts = smap(jax.device_put(stream[20], shard), before)
    close(out, one[20][0])
    assert np.asarray(counts).tolist() == [1, 0, 0, 0, 0, 1, 0, 0], counts
    # Global with axis_name, from the same state.
    smap = jax.jit(jax.shard_map(make("d").update, mesh=mesh,
                                 in_specs=(P("d"), specs),
                                 out_specs=(P("d"), specs)))
    _, state = smap(jax.device_put(stream[20], shard), before)
    assert int(state.spikes) == 2
    print("ok")
    """
)


def test_sharded_jit_and_shard_map_match_one_device(run_on_eight_devices):
    run_on_eight_devices(SCRIPT)
