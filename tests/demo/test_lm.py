"""Part F of the demo: loss spikes in a small language model."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jstab.demo import data, gpt, lm

TINY = lm.Budget(
    settings=(
        lm.Setting(
            "aggressive + corrupted",
            lm.AGGRESSIVE_LR,
            ("none", "clip_by_global_norm(1)"),
            corrupt_at=(40, 41, 42),
        ),
    ),
    steps=70,
    seeds=2,
    layers=1,
    width=16,
    heads=2,
    context=16,
    batch=8,
    warmup=5,
    eval_windows=16,
)


def test_sweep_gives_finite_rows_and_is_deterministic(tmp_path):
    rows = lm.sweep(TINY, seed=0)
    assert [(r.setting, r.rule) for r in rows] == [
        ("aggressive + corrupted", "none"),
        ("aggressive + corrupted", "clip_by_global_norm(1)"),
    ]
    for r in rows:
        assert r.valid_loss.shape == r.diverged.shape == r.recovery.shape == (2,)
        assert np.isfinite(r.valid_loss).all() and np.isfinite(r.loss).all()
        assert np.isfinite(r.recovery).all()
        assert r.loss.shape == (TINY.steps,) and len(r.spikes) == 2
        # Learning happened: the final validation loss is below log(vocab).
        assert (r.valid_loss < math.log(len(data.corpus().chars))).all()
        assert not r.diverged.any()
        assert r.skipped is None
    assert rows[0].clipped is None
    assert rows[1].clipped.shape == (2,) and (rows[1].clipped >= 0).all()
    lm.write(rows, TINY, tmp_path, seconds=1.0, seed=0)
    assert (tmp_path / "lm.md").read_text().startswith(lm.TITLE)
    record = json.loads((tmp_path / "lm.json").read_text())
    assert record["budget"]["steps"] == TINY.steps
    assert record["spike"] == {"window": lm.WINDOW, "k": lm.K}
    assert len(record["rows"]) == 2
    assert (tmp_path / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The corrupted burst's first step has the highest loss of the run's
    # second half.
    loss = rows[0].loss
    assert loss[40] == loss[30:].max()
    # Deterministic given the seed (the same program compiled again).
    again = lm.measure(TINY.settings[0], "none", TINY, seed=0)
    np.testing.assert_array_equal(again.loss, rows[0].loss)
    np.testing.assert_array_equal(again.valid_loss, rows[0].valid_loss)


def test_spike_counter_counts_a_synthetic_spike():
    rng = np.random.default_rng(0)
    noise = 3.0 + 0.05 * rng.standard_normal(400)
    found = set(lm.spike_steps(noise).tolist())
    assert len(found) <= 2  # noise alone: see test_spike_counter_ignores_noise
    loss = noise.copy()
    loss[300] += 1.0  # 20 standard deviations
    assert set(lm.spike_steps(loss).tolist()) == found | {300}
    assert lm.count_spikes(loss) == len(found | {300})
    # The same jump at an excluded (corrupted) step is not counted.
    assert 300 not in lm.spike_steps(loss, exclude=(300,))
    # A jump within the first window only fills the window.
    early = noise.copy()
    early[10] += 1.0
    assert 10 not in lm.spike_steps(early)


def test_spike_counter_ignores_noise():
    # Median + 5 MAD is about 3.4 standard deviations of Gaussian noise, and
    # the median and MAD of 50 values are noisy: the counter finds about 1.5
    # spikes per 1000 steps of pure noise (measured over 200 series; 1.85 in
    # these 20). Far fewer than steps: the rate is about 0.2%.
    rng = np.random.default_rng(1)
    counts = [lm.count_spikes(rng.standard_normal(1000)) for _ in range(20)]
    assert sum(counts) <= 60
    assert max(counts) <= 10
    # A falling loss with noise has no spikes either.
    falling = np.linspace(4, 2, 1000) + 0.05 * rng.standard_normal(1000)
    assert lm.count_spikes(falling) == 0


def test_spike_counter_stops_at_a_divergence():
    loss = np.full(200, 2.0) + 0.01 * np.random.default_rng(2).standard_normal(200)
    loss[120] = 10.0
    loss[150:] = np.nan
    assert lm.spike_steps(loss).tolist() == [120]


def test_recovery_counts_the_steps_back_to_the_level():
    loss = np.full(100, 2.0)
    loss[60:63] = 9.0
    loss[63:70] = 3.0  # recovered at step 70: 8 steps after the burst's last
    assert lm.recovery(loss, (60, 61, 62)) == 8
    assert math.isnan(lm.recovery(loss, ()))


@pytest.mark.parametrize("corruption", ["random", "repeat"])
def test_batches_are_corrupted_exactly_at_the_configured_steps(corruption):
    tokens = data.corpus().train
    options = {"batch": 4, "context": 8, "vocab": len(data.corpus().chars)}
    clean = jax.jit(data.sampler(tokens, **options))
    bad = jax.jit(
        data.sampler(tokens, corrupt_at=(3, 7), corruption=corruption, **options)
    )
    key = jax.random.key(0)
    for step in range(10):
        a, b = clean(key, step), bad(key, step)
        assert b.shape == (4, 9) and b.dtype == jnp.int32
        if step in (3, 7):
            assert not np.array_equal(a, b)
            if corruption == "repeat":
                assert (b == b[:, :1]).all()
        else:
            np.testing.assert_array_equal(a, b)


def test_clean_windows_are_text_of_the_training_split():
    corpus = data.corpus()
    sample = data.sampler(corpus.train, batch=2, context=8, vocab=len(corpus.chars))
    window = np.asarray(sample(jax.random.key(3), 0))[0]
    text = "".join(corpus.chars[i] for i in window)
    assert text in data.text()[: corpus.train.size]
    assert corpus.train.size + corpus.valid.size == len(data.text())


def test_resize_moves_the_bursts_with_the_steps():
    budget = lm.resize(lm.DEFAULT, steps=100, seeds=1)
    assert budget.steps == 100 and budget.seeds == 1
    assert budget.settings[0].corrupt_at == (40, 41, 42, 70, 71, 72)
    assert budget.settings[1].corrupt_at == ()


def _tiny(qk_norm=False):
    shape = gpt.Shape(vocab=11, context=8, layers=2, width=16, heads=2, qk_norm=qk_norm)
    return gpt.GPT(shape, rngs=nnx.Rngs(0))


def test_gpt_is_causal():
    model = _tiny()
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % 11)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_z_loss_adds_its_term():
    model = _tiny()
    windows = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
    logits = model(windows[:, :-1])
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    plain = gpt.loss(model, windows)
    np.testing.assert_allclose(
        gpt.loss(model, windows, 1e-4), plain + 1e-4 * z, rtol=1e-6
    )
    cross = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    np.testing.assert_allclose(plain, cross.mean(), rtol=1e-6)


def test_qk_norm_normalizes_queries_and_keys():
    plain, normed = _tiny(), _tiny(qk_norm=True)
    assert plain.blocks[0].attention.q_norm is None
    assert isinstance(normed.blocks[0].attention.q_norm, nnx.LayerNorm)
    # Scaling the query-key projection changes nothing under QK-norm.
    tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, 11)
    before = normed(tokens)
    for model in (plain, normed):
        kernel = model.blocks[0].attention.qkv.kernel
        kernel[...] = kernel[...].at[:, :32].multiply(10.0)
    np.testing.assert_allclose(normed(tokens), before, rtol=1e-4, atol=1e-4)
    assert not np.allclose(plain(tokens), _tiny()(tokens), atol=1e-3)


@pytest.mark.parametrize("rule", lm.RULES)
def test_every_rule_takes_the_loss_and_steps(rule):
    params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
    tx = lm.optimizer(rule, 1e-2, lm.DEFAULT)
    state = tx.init(params)
    grads = {"w": jnp.full((3, 3), 0.5), "b": jnp.ones(3)}
    for _ in range(3):
        updates, state = tx.update(grads, state, params, loss=jnp.float32(2.0))
    assert all(jnp.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rule"):
        lm.optimizer("sgd", 1e-2, lm.DEFAULT)
