"""Every transform on 8 (virtual CPU) devices, in the three usual layouts.

A small MLP is trained for a few steps with each transform chained before
Adam, once on one device and once sharded over a mesh:

* data parallel: parameters and optimizer state replicated, the batch split
  over ``"data"`` (8 devices);
* FSDP: parameters, gradients and optimizer state split over ``"data"`` on
  their first axis, the batch too (8 devices);
* tensor parallel: kernels split over ``"model"`` (alternately by output and
  by input, as in Megatron's MLP), the batch over ``"data"``, on a
  ``("data", "model") = (2, 4)`` mesh.

The parameters and states must agree with one device's to 1e-6 relative and
keep their shardings. Then the compiled update step (clip and Adam, given
the gradient) is read: its only collectives are all-reduces of scalars and
of small vectors (partial sums of norms, counts), or for a variadic
reduction (the value rules', AGC's) an all-gather of one partial result per
device; never an all-gather of a gradient-sized array.

The scripts run in a subprocess (the ``run_on_eight_devices`` fixture).
"""

import textwrap

import pytest
from _compare import COMPARE

COMMON = COMPARE + textwrap.dedent(
    """
    import re, sys
    import jax, jax.numpy as jnp, numpy as np, optax, jstab
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    LAYOUT = sys.argv[1]

    SIZES = [32, 64, 64, 16]
    rng = np.random.default_rng(0)
    params = {}
    for i, (m, n) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m),
                                      jnp.float32)
        params[f"b{i}"] = jnp.zeros((n,), jnp.float32)
    # Five batches; the last is a spike, its inputs 30 times larger.
    SCALES = [1.0, 1.0, 1.0, 1.0, 30.0]
    X = [jnp.asarray(rng.normal(size=(64, SIZES[0])) * s, jnp.float32)
         for s in SCALES]
    Y = [jnp.asarray(rng.normal(size=(64, SIZES[-1])), jnp.float32)
         for _ in SCALES]

    def loss(p, x, y):
        for i in range(len(SIZES) - 1):
            x = x @ p[f"w{i}"] + p[f"b{i}"]
            x = jnp.tanh(x) if i < len(SIZES) - 2 else x
        return jnp.mean((x - y) ** 2)

    def transforms():
        adam = optax.adam(1e-2)
        return {
            "global_norm": optax.chain(jstab.clip_by_global_norm(0.5), adam),
            "layer_norm": optax.chain(
                jstab.clip_by_layer_norm(0.2, per="module"), adam),
            "value": optax.chain(jstab.clip_by_value(0.02), adam),
            "agc": optax.chain(jstab.adaptive_grad_clip(0.02), adam),
            "autoclip": optax.chain(jstab.autoclip(50.0, history=4), adam),
            "zclip": optax.chain(jstab.zclip(z_thresh=1.5, warmup_steps=2),
                                 adam),
            "skip": jstab.skip_on_spike(adam, z_thresh=2.0, warmup_steps=2),
            "monitor": optax.chain(jstab.monitor_gradients(exploding_norm=1.0),
                                   adam),
        }

    def layout(axis_type):
        # The mesh, the parameters' shardings and the batch's.
        if LAYOUT == "tp":
            mesh = jax.make_mesh((2, 4), ("data", "model"),
                                 axis_types=(axis_type,) * 2)
            # Megatron's MLP: a kernel's outputs split, then the next one's
            # inputs.
            specs = {"w0": P(None, "model"), "b0": P("model"),
                     "w1": P("model", None), "b1": P(),
                     "w2": P(None, "model"), "b2": P("model")}
        else:
            mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
            split = P("data") if LAYOUT == "fsdp" else P()
            specs = {k: split for k in params}
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        return mesh, shardings, NamedSharding(mesh, P("data"))
    """
)

TRAIN = COMMON + textwrap.dedent(
    """
    def run(tx, place, shardings, batches=None):
        \"\"\"Five steps from ``params``: given gradients, or from ``batches``.

        Returns the parameters, the state and the compiled program's text.
        \"\"\"
        p = place(params, shardings)
        # Eagerly, as users do: zeros_like keeps each parameter's sharding
        # (under jit with an Auto mesh the state would come out replicated).
        state = tx.init(p)

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        def train_step(p, s, x, y):
            return step(p, s, jax.grad(loss)(p, x, y))

        if batches is None:
            args = [(place(g, shardings),) for g in GRADS]
        else:
            args = [(place(x, batches), place(y, batches)) for x, y in zip(X, Y)]
        f = jax.jit(step if batches is None else train_step)
        hlo = f.lower(p, state, *args[0]).compile().as_text()
        for a in args:
            p, state = jax.block_until_ready(f(p, state, *a))
        return (p, state), hlo

    # Collectives in compiled HLO: the result's shape, the operation.
    COLLECTIVE = re.compile(
        r"^\\s*(?:ROOT )?\\S+ = (.*?) (all-gather|all-reduce|all-to-all"
        r"|collective-permute|reduce-scatter)(?:-start)?\\(", re.M)

    def collectives(hlo):
        \"\"\"(operation, elements of its largest array) for each collective.\"\"\"
        for shape, op in COLLECTIVE.findall(hlo):
            dims = re.findall(r"\\[([\\d,]*)\\]", shape)
            yield op, max(int(np.prod([int(d) for d in x.split(",") if d]))
                          for x in dims)

    one = jax.devices()[0]
    on_one = lambda t, s: jax.device_put(t, one)
    GRADS = [jax.jit(jax.grad(loss))(params, x, y) for x, y in zip(X, Y)]
    UNITS = max(SIZES)
    TX = transforms()
    want = {k: run(tx, on_one, None)[0] for k, tx in TX.items()}
    trained = {k: run(tx, on_one, None, one)[0] for k, tx in TX.items()}
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh, shardings, batches = layout(axis_type)
        with jax.set_mesh(mesh):
            if axis_type == AxisType.Explicit:
                # The check below sees a gather: replicating a split gradient.
                replicate = jax.jit(lambda g: jax.tree.map(
                    lambda x: jax.sharding.reshard(x, P()), g))
                g = jax.device_put(GRADS[0], shardings)
                ops = list(collectives(replicate.lower(g).compile().as_text()))
                assert (LAYOUT == "dp") != any(n > UNITS for _, n in ops), ops
            for name, tx in TX.items():
                # The same gradients in, the same parameters and state out.
                got, hlo = run(tx, jax.device_put, shardings)
                compare(name, want[name], got, "elementwise")
                # Parameters and Adam's moments keep the parameters' shardings.
                mu, nu = (optax.tree.get(got[1], m) for m in ("mu", "nu"))
                for tree in (got[0], mu, nu):
                    for k, sharding in shardings.items():
                        assert tree[k].sharding.is_equivalent_to(sharding, 2), (
                            name, k, tree[k].sharding)
                # Norms are combined as partial results: all-reduces of
                # scalars or of one value per unit (AGC's), or, for a variadic
                # reduction (the value rules' maximum and count, AGC's sum of
                # squares and count per kernel), an all-gather of one result
                # of each per device; never a kernel moved.
                ops = list(collectives(hlo))
                assert all(n <= UNITS for _, n in ops), (name, axis_type, ops)
                variadic = name in ("value", "agc")
                assert variadic or all(op == "all-reduce" for op, _ in ops), (
                    name, axis_type, ops)
                if LAYOUT != "dp" and name == "global_norm":
                    assert ops, hlo
                if axis_type == AxisType.Explicit:
                    continue  # the model would have to name its shardings
                # Whole training steps, the batch split over "data": the
                # gradients themselves differ in their last bits (Adam's nu
                # by 1.2e-6 of its norm after five steps, measured).
                got, _ = run(tx, jax.device_put, shardings, batches)
                compare(name, trained[name], got, "norm")

    # Each rule acted in these five steps, on the spike at least.
    for name, (_, state) in want.items():
        acted = [optax.tree.get(state, key, None)
                 for key in ("clip_count", "skip_count", "exploding")]
        assert any(np.any(a) for a in acted if a is not None), name
    print("ok")
    """
)


@pytest.mark.parametrize("layout", ["dp", "fsdp", "tp"])
def test_every_transform_matches_one_device(run_on_eight_devices, layout):
    run_on_eight_devices(TRAIN, layout)
