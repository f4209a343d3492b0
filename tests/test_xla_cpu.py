"""The CPU forms of ``jstab._xla_cpu`` give the plain path's results.

Each of the six reductions is compared with its plain form in
``jstab._numerics`` on awkward inputs (many small leaves of one size, a leaf
too big to stack, half precision, overflowing and underflowing values, NaN),
and every transform is run with the CPU forms on (``JSTAB_XLA_CPU`` unset)
and off (``none``). Maxima, counts and copies are equal bit for bit; sums of
squares, added in another order, to a few ulps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstab
from jstab import _numerics, _xla_cpu


def _leaves():
    rng = np.random.default_rng(0)
    scales = [1.0, 1e30, 3e-19, 0.0, 1e-3]
    leaves = [
        jnp.asarray(rng.normal(size=8) * scales[i % 5], jnp.float32) for i in range(150)
    ]
    leaves[7] = leaves[7].at[3].set(jnp.nan)
    leaves.append(jnp.asarray(rng.normal(size=(3, 3)), jnp.float32))
    leaves.append(jnp.asarray(rng.normal(size=(130, 130)), jnp.float32))  # > 2**14
    leaves.append(jnp.asarray(rng.normal(size=(8,)) * 300, jnp.float16))
    leaves.append(jnp.asarray(rng.normal(size=(2, 4)), jnp.bfloat16))
    return leaves


def _groups(n):
    groups = [[i] for i in range(n)]
    groups[70:70] = [[150], [0, 150, 151], [1, 2], list(range(100, 140))]
    return groups


def _both(name, plain, *operands, **static):
    cpu = jax.jit(lambda *ops: getattr(_xla_cpu, name)(*ops, **static))(*operands)
    ref = jax.jit(lambda *ops: plain(*ops, **static))(*operands)
    return cpu, ref


@pytest.mark.parametrize("kind", ["sumsq", "maxabs", "nonfinite"])
@pytest.mark.parametrize("with_r", [False, True])
def test_group_reduce(kind, with_r):
    leaves = _leaves()
    groups = tuple(tuple(g) for g in _groups(len(leaves)))
    r = jnp.linspace(0.5, 2.0, len(groups)) if with_r and kind == "sumsq" else None
    dtype = jnp.int32 if kind == "nonfinite" else jnp.float32
    cpu, ref = _both(
        "group_reduce", _numerics._group_reduce, leaves, r,
        groups=groups, dtype=dtype, kind=kind,
    )  # fmt: skip
    assert cpu.dtype == ref.dtype and cpu.shape == ref.shape == (len(groups),)
    if kind == "sumsq":
        np.testing.assert_allclose(cpu, ref, rtol=4e-7)
    else:
        np.testing.assert_array_equal(cpu, ref)


def test_unstack_copies_bits():
    x = jnp.asarray([-0.0, 0.0, np.nan, -np.inf, 3e-45, -1.5] * 25, jnp.float32)
    halves = jnp.asarray([-0.0, 1e-39, np.nan, 2.0, -np.inf] * 30, jnp.bfloat16)
    vectors = (x, x > 0, jnp.arange(150, dtype=jnp.int32), halves)
    cpu, ref = _both("unstack", _numerics._unstack, vectors)
    for a, b in zip(cpu, ref, strict=True):
        a, b = np.asarray(jnp.stack(a)), np.asarray(jnp.stack(b))
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_element_statistics(symmetric):
    leaves = [x for x in _leaves() if x.dtype == jnp.float32]
    lo = None if symmetric else jnp.float32(-0.5)
    hi = jnp.float32(0.7)
    cpu, ref = _both(
        "element_statistics", _numerics._element_statistics, leaves, lo, hi,
        dtype=jnp.float32,
    )  # fmt: skip
    for a, b in zip(cpu, ref, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_count_positive():
    leaves = _leaves() + [jnp.zeros((0,), jnp.float32)]
    leaves = [x - jnp.asarray(0.1, x.dtype) for x in leaves]  # some negative
    cpu, ref = _both("count_positive", _numerics._count_positive, leaves)
    assert cpu.dtype == ref.dtype == jnp.int32
    assert 0 < int(ref) < sum(x.size for x in leaves)
    assert int(cpu) == int(ref)
    assert int(_xla_cpu.count_positive([])) == int(_numerics._count_positive([])) == 0


def test_sumsq_and_count():
    units = jnp.asarray(np.random.default_rng(1).random((1, 3, 40)), jnp.float32)
    limit = jnp.full((1, 1, 40), 0.5, jnp.float32)
    (s, n), (s_ref, n_ref) = _both(
        "sumsq_and_count", _numerics._sumsq_and_count, units, limit
    )
    np.testing.assert_allclose(s, s_ref, rtol=4e-7)
    assert n.dtype == n_ref.dtype == jnp.int32 and int(n) == int(n_ref)


RULES = {
    "clip_by_value": lambda: jstab.clip_by_value(0.5),
    "clip_by_range": lambda: jstab.clip_by_range(-0.3, 0.6),
    "clip_by_global_norm": lambda: jstab.clip_by_global_norm(3.0),
    "clip_by_layer_norm": lambda: jstab.clip_by_layer_norm(0.5),
    "clip_by_layer_norm module": lambda: jstab.clip_by_layer_norm(0.5, per="module"),
    "adaptive_grad_clip": lambda: jstab.adaptive_grad_clip(0.05),
    "autoclip": lambda: jstab.autoclip(history=3),
    "zclip": lambda: jstab.zclip(warmup_steps=2),
    "skip_on_spike": lambda: jstab.skip_on_spike(optax.adam(0.1), z_thresh=1.0),
    "monitor_gradients": lambda: jstab.monitor_gradients(),
    "clip_by_block_rms": lambda: jstab.clip_by_block_rms(0.5),
    "adagc": lambda: jstab.adagc(warmup_steps=2),
    "scale_by_spam": lambda: jstab.scale_by_spam(spike_threshold=2.0),
}


def _model_tree(seed):
    rng = np.random.default_rng(seed)
    tree = {
        f"Dense_{i}": {"kernel": rng.normal(size=(8, 8)), "bias": rng.normal(size=8)}
        for i in range(70)
    }
    tree["Conv_0"] = {"kernel": rng.normal(size=(3, 3, 4, 8)) * 1e-20}
    tree["head"] = {"kernel": rng.normal(size=(150, 120))}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run(build):
    tx = build()
    params = _model_tree(0)
    state = tx.init(params)
    outs = []
    for step in range(4):
        factor = 10.0 if step == 3 else 1.0  # a spike at the last step
        g = jax.tree.map(lambda x, f=factor: x * f, _model_tree(step + 1))
        out, state = jax.jit(tx.update)(g, state, params)
        outs.append(out)
    return outs, state


@pytest.mark.parametrize("name", list(RULES))
def test_every_transform_gives_the_same_results_on_both_paths(name, monkeypatch):
    monkeypatch.setenv("JSTAB_XLA_CPU", "all")
    fast = _run(RULES[name])
    monkeypatch.setenv("JSTAB_XLA_CPU", "none")
    plain = _run(RULES[name])
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=0)
        else:
            np.testing.assert_array_equal(a, b)


def test_the_cpu_forms_are_lowered_only_for_the_cpu(monkeypatch):
    tx = jstab.monitor_gradients()
    g = _model_tree(1)
    traced = jax.jit(tx.update).trace(g, tx.init(g))
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "optimization_barrier" in cpu
    for platform in ("cuda", "tpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "optimization_barrier" not in text
    monkeypatch.setenv("JSTAB_XLA_CPU", "none")
    tx = jstab.monitor_gradients()  # a new function: jit caches its traces
    traced = jax.jit(tx.update).trace(g, tx.init(g))
    assert "optimization_barrier" not in traced.lower().as_text()


def test_the_environment_variable(monkeypatch):
    for value, want in [("all", True), ("none", False), ("watch, unstack", True)]:
        monkeypatch.setenv("JSTAB_XLA_CPU", value)
        assert _xla_cpu.enabled("unstack") is want
    monkeypatch.setenv("JSTAB_XLA_CPU", "watch")
    assert not _xla_cpu.enabled("unstack")
    monkeypatch.setenv("JSTAB_XLA_CPU", "stacking")
    with pytest.raises(ValueError, match="JSTAB_XLA_CPU names"):
        _xla_cpu.enabled("unstack")
