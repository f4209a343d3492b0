"""Orbax checkpoints of jstab states, in the middle of training.

A chain holding every stateful jstab transform (the monitor, AutoClip's ring
buffer, ZClip's running statistics, a clip's counters, a skip wrapper's
moments, Adam inside) is trained for eight steps without a break, and again
with a checkpoint after four: saved with Orbax, dropped, restored into a
fresh state, and trained on. The parameters and the whole state must be
bit-identical. Once on one device, once with parameters and state split over
8 devices (FSDP) and restored onto the same shardings.

The script runs in a subprocess (the ``run_on_eight_devices`` fixture).
"""

import textwrap

from _compare import COMPARE

SCRIPT = COMPARE + textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    import orbax.checkpoint as ocp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    ROOT = sys.argv[1]
    rng = np.random.default_rng(0)
    SHAPES = {"w0": (16, 32), "b0": (32,), "w1": (32, 8), "b1": (8,)}
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
              for k, s in SHAPES.items()}
    X = jnp.asarray(rng.normal(size=(8, 32, 16)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(8, 32, 8)), jnp.float32)
    X = X.at[5].multiply(30.0)  # a spike after the checkpoint

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w0"] + p["b0"])
        return jnp.mean((h @ p["w1"] + p["b1"] - y) ** 2)

    tx = optax.chain(
        jstab.monitor_gradients(),
        jstab.autoclip(50.0, history=3),
        jstab.zclip(z_thresh=1.5, warmup_steps=2),
        jstab.clip_by_global_norm(2.0),
        jstab.skip_on_spike(optax.adam(1e-2), z_thresh=3.0, warmup_steps=2),
    )

    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    def train(p, s, steps):
        for i in steps:
            p, s = jax.block_until_ready(step(p, s, X[i], Y[i]))
        return p, s

    def check(name, sharding):
        p = params if sharding is None else jax.device_put(params, sharding)
        s = tx.init(p)
        want = train(p, s, range(8))

        half = train(p, s, range(4))
        path = f"{ROOT}/{name}"
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, {"params": half[0], "opt_state": half[1]})
        # A fresh process would build the target the same way: the state's
        # structure from tx.init, shapes, dtypes and shardings abstractly.
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": p, "opt_state": tx.init(p)})
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(path, target)
        assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(s)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a, b)
        got = train(restored["params"], restored["opt_state"], range(4, 8))
        compare(name, want, got, "bits")

        # The checkpoint held what the rules had learned: AutoClip's full
        # ring buffer, running moments (ZClip's and the skip's), counts.
        found = dict((k, [v for _, v in optax.tree.get_all_with_path(half[1], k)])
                     for k in ("filled", "var", "samples", "count"))
        assert [int(v) for v in found["filled"]] == [3], found
        assert all(float(v) > 0 for v in found["var"]) and len(found["var"]) == 2
        assert all(int(v) == 4 for v in found["count"]), found

    check("one_device", None)
    # An Auto mesh: XLA gathers the split parameters for the forward pass.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        check("fsdp", NamedSharding(mesh, P("data")))
    print("ok")
    """
)


def test_checkpoint_round_trip_is_bit_identical(run_on_eight_devices, tmp_path):
    run_on_eight_devices(SCRIPT, str(tmp_path))
