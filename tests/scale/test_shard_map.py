"""``axis_name`` inside ``shard_map``, and data parallelism with ``pmap``.

Inside ``shard_map`` each device sees its slice of the gradient, so a
transform that reduces over the whole tree must be told which mesh axes
the slices are spread over. On a ``("data", "model") = (2, 4)`` mesh:

* every leaf split over both axes, ``axis_name=("data", "model")``: each
  global-reduction transform gives one device's result;
* without ``axis_name`` the norm is the shard's own (documented);
* the usual hybrid: the batch split over ``"data"`` and the kernels over
  ``"model"``; gradients are averaged over ``"data"`` (``lax.pmean``), then
  clipped with ``axis_name="model"``.

With ``pmap``, gradients are averaged (``lax.pmean``) before clipping: the
result is the one-device result on the whole batch; clipping each device's
gradient first is not.

The script runs in a subprocess (the ``run_on_eight_devices`` fixture).
"""

import textwrap

from _compare import COMPARE

SCRIPT = COMPARE + textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    SHAPES = {"w0": (16, 32), "b0": (32,), "w1": (32, 8), "b1": (8,)}
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
              for k, s in SHAPES.items()}
    # Four gradients; the last a spike.
    GRADS = [{k: jnp.asarray(rng.normal(size=s) * (30.0 if i == 3 else 1.0),
                             jnp.float32) for k, s in SHAPES.items()}
             for i in range(4)]

    def rules(axis_name=None):
        return {
            "global_norm": jstab.clip_by_global_norm(1.0, axis_name=axis_name),
            "global_inf": jstab.clip_by_global_norm(0.5, ord=jnp.inf,
                                                    axis_name=axis_name),
            "layer_norm": jstab.clip_by_layer_norm(0.5, per="module",
                                                   axis_name=axis_name),
            "autoclip": jstab.autoclip(50.0, history=3, axis_name=axis_name),
            "zclip": jstab.zclip(z_thresh=1.5, warmup_steps=2,
                                 axis_name=axis_name),
            "skip": jstab.skip_on_spike(optax.sgd(0.1), z_thresh=2.0,
                                        warmup_steps=2, axis_name=axis_name),
            "monitor": jstab.monitor_gradients(axis_name=axis_name),
        }

    def steps(tx, update, place=lambda t: t):
        state, out = tx.init(params), []
        for g in GRADS:
            u, state = jax.block_until_ready(update(place(g), state))
            out.append(u)
        return out, state

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    both = ("data", "model")
    BOTH = P(both)
    split = NamedSharding(mesh, BOTH)

    # 1. Every leaf split over both axes: axis_name names them both.
    for (name, ref), tx in zip(rules().items(), rules(both).values()):
        want = steps(ref, jax.jit(ref.update))
        local = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(BOTH, P()),
                                      out_specs=(BOTH, P())))
        got = steps(tx, local, lambda t: jax.device_put(t, split))
        compare(name, want, got, "elementwise")
        acted = [optax.tree.get(want[1], k, None)
                 for k in ("clip_count", "skip_count")]
        assert name == "monitor" or any(np.any(a) for a in acted
                                        if a is not None), name

    # The functions too.
    def functions(t, axis_name=None):
        return (jstab.global_norm(t, axis_name=axis_name),
                jstab.clip_grad_norm(t, 1.0, axis_name=axis_name))

    f = jax.jit(jax.shard_map(lambda t: functions(t, both), mesh=mesh,
                              in_specs=(BOTH,), out_specs=(P(), (BOTH, P()))))
    got = f(jax.device_put(GRADS[0], split))
    compare("functions", functions(GRADS[0]), got, "elementwise")

    # 2. Without axis_name each shard clips by its own slice's norm.
    tx = jstab.clip_by_global_norm(1.0)
    f = jax.jit(jax.shard_map(lambda g: tx.update(g, tx.init(g))[1].norm[None],
                              mesh=mesh, in_specs=(BOTH,), out_specs=BOTH))
    norms = f(jax.device_put(GRADS[0], split))
    slices = [jstab.global_norm({k: np.split(np.asarray(v), 8)[i]
                                 for k, v in GRADS[0].items()})
              for i in range(8)]
    compare("per shard", np.asarray(slices), norms, "elementwise")
    assert not np.allclose(norms, jstab.global_norm(GRADS[0]))

    # 3. FSDP by hand, with data parallelism: the batch split over "data",
    # parameters and state over "model". Each device gathers the parameters,
    # takes the gradient of the loss averaged over "data" (shard_map's
    # autodiff sums the gathered parameters' cotangents over "data": a
    # pmean of the gradients would count them twice) and keeps its slice;
    # the clip combines the slices over "model".
    X = jnp.asarray(rng.normal(size=(4, 32, 16)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(4, 32, 8)), jnp.float32)
    X = X.at[3].multiply(30.0)  # the last batch is a spike

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w0"] + p["b0"])
        return jnp.mean((h @ p["w1"] + p["b1"] - y) ** 2)

    def train(tx, step, place=lambda t, s: t):
        p = place(params, NamedSharding(mesh, P("model")))
        s = tx.init(p)
        for x, y in zip(X, Y):
            x, y = (place(b, NamedSharding(mesh, P("data"))) for b in (x, y))
            p, s = jax.block_until_ready(step(p, s, x, y))
        return p, s

    def one_device(tx):
        def step(p, s, x, y):
            u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
            return optax.apply_updates(p, u), s
        return jax.jit(step)

    def fsdp(tx):
        def step(p, s, x, y):
            full = jax.lax.all_gather(p, "model", axis=0, tiled=True)
            g = jax.grad(lambda q: jax.lax.pmean(loss(q, x, y), "data"))(full)
            i = jax.lax.axis_index("model")
            g = jax.tree.map(lambda g, p: jax.lax.dynamic_slice_in_dim(
                g, i * p.shape[0], p.shape[0]), g, p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        # Adam's moments are split like the parameters; scalars replicated.
        state = tx.init(jax.device_put(params, NamedSharding(mesh, P("model"))))
        specs = jax.tree.map(lambda a: getattr(a.sharding, "spec", P()), state)
        return jax.jit(jax.shard_map(
            step, mesh=mesh, in_specs=(P("model"), specs, P("data"), P("data")),
            out_specs=(P("model"), specs)))

    for name in ("global_norm", "autoclip", "skip"):
        ref, tx = (r[name] if name == "skip" else optax.chain(r[name], optax.adam(1e-2))
                   for r in (rules(), rules("model")))
        want = train(ref, one_device(ref))
        got = train(tx, fsdp(tx), jax.device_put)
        compare(name, want, got, "norm")
        counts = [optax.tree.get(want[1], k, 0) for k in ("clip_count", "skip_count")]
        assert sum(int(c) for c in counts) >= 1, name  # the spike, at least

    # 4. pmap: each device's gradient of its part of the batch, averaged
    # (lax.pmean) before clipping, as one device would on the whole batch.
    # Clipping each part first is a different rule.
    def pmapped(tx, average_first):
        def step(p, s, x, y):
            g = jax.grad(loss)(p, x, y)
            if average_first:
                g = jax.lax.pmean(g, "batch")
                u, s = tx.update(g, s, p)
            else:
                u, s = tx.update(g, s, p)
                u = jax.lax.pmean(u, "batch")
            return optax.apply_updates(p, u), s
        f = jax.pmap(step, axis_name="batch")
        copies = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (8, *a.shape)), t)
        p, s = copies(params), copies(tx.init(params))
        for x, y in zip(X, Y):
            p, s = jax.block_until_ready(
                f(p, s, x.reshape(8, -1, 16), y.reshape(8, -1, 8)))
        return jax.tree.map(lambda a: a[0], (p, s))

    for tx in (optax.chain(jstab.clip_by_global_norm(0.5), optax.sgd(0.1)),
               optax.chain(jstab.autoclip(50.0, history=3), optax.sgd(0.1))):
        want = train(tx, one_device(tx))
        compare("pmap", want, pmapped(tx, average_first=True), "norm")
        assert int(optax.tree.get(want[1], "clip_count")) >= 1
        wrong = pmapped(tx, average_first=False)
        diff = max(float(np.max(np.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(want[0]), jax.tree.leaves(wrong[0])))
        assert diff > 1e-3, diff
    print("ok")
    """
)


def test_shard_map_and_pmap_match_one_device(run_on_eight_devices):
    run_on_eight_devices(SCRIPT)
