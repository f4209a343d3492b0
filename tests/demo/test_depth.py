"""Part G of the demo: residual MLPs without normalization, at depth."""

import fcntl
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jstab.demo import data, depth

REMEDIES = ("gpt2", "fixup", "ResidualGate", "batch norm")
# Two depths and every variant: what the claims below compare.
SWEEP = depth.Budget(depths=(8, 32), steps=50)


@pytest.fixture(scope="session")
def split():
    return data.digits()


@pytest.fixture(scope="session")
def rows(tmp_path_factory, worker_id, split):
    """One ``SWEEP`` for the whole session, whichever pytest-xdist workers
    draw these tests: the first to take the lock runs it and pickles its
    rows into the session's shared folder, the others wait and read them
    (as ``quick_run`` in ``test_demo_cli.py``)."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the session's folder, above each worker's
    found = shared / "depth-quick.pickle"
    with open(shared / "depth-quick.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not found.exists():
            rows = depth.sweep(SWEEP, seed=0, split=split)
            found.write_bytes(pickle.dumps(rows))
    return pickle.loads(found.read_bytes())


def _row(rows, variant: str, blocks: int) -> depth.Row:
    (found,) = [r for r in rows if r.variant == variant and r.depth == blocks]
    return found


def _init(variants, blocks: int, x, seed: int = 0) -> list:
    """Each variant's variables from the same key (one model each)."""
    models = [depth.network(v, blocks) for v in variants]
    keys = jax.random.split(jax.random.key(seed), 1)
    stacked = depth._initialize(models, keys, x)
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(models))]


def test_quick_sweep_has_every_variant_at_every_depth_in_order(rows):
    expected = [(d, v) for d in SWEEP.depths for v in depth.VARIANTS]
    assert [(r.depth, r.variant) for r in rows] == expected
    for r in rows:
        assert r.accuracy.shape == r.ratio.shape == (SWEEP.seeds,)
        assert r.shared == (r.variant in depth.GROUPS[0])
        assert r.seconds > 0


@pytest.mark.parametrize("variant", REMEDIES)
def test_remedies_give_finite_numbers_and_learn_at_every_depth(rows, variant):
    for blocks in SWEEP.depths:
        r = _row(rows, variant, blocks)
        for values in (r.stream_std, r.ratio, r.train_loss, r.accuracy):
            assert np.all(np.isfinite(values)), (blocks, values)
        assert r.diverged == 0
        assert np.mean(r.accuracy) > 0.5, (blocks, r.accuracy)


def test_unscaled_stream_grows_by_sqrt3_per_block_and_scaled_ones_stay_bounded(rows):
    shallow, deep = SWEEP.depths
    std = {
        v: [float(np.median(_row(rows, v, d).stream_std)) for d in (shallow, deep)]
        for v in depth.VARIANTS
    }
    # He's branch has a variance gain of 2: each block multiplies the
    # stream's variance by 3, its std by √3.
    growth = math.log(std["He, unscaled"][1] / std["He, unscaled"][0])
    expected = (deep - shallow) / 2 * math.log(3)
    assert abs(growth / expected - 1) < 0.25, (growth, expected)
    stream_in = std["fixup"][0]  # W2 = 0: the input projection's output
    for variant in ("gpt2", "fixup", "ResidualGate"):
        assert max(std[variant]) < 2 * stream_in, (variant, std[variant])
    assert std["He, unscaled"][1] > 1e4 * max(std["gpt2"])


def test_blocks_that_start_as_the_identity_have_a_ratio_of_one(rows):
    for blocks in SWEEP.depths:
        for variant in ("fixup", "ResidualGate"):
            np.testing.assert_allclose(_row(rows, variant, blocks).ratio, 1.0)
        assert np.all(_row(rows, "He, unscaled", blocks).ratio > 10)


def _unrolled_norms(params, x, y, blocks: int) -> np.ndarray:
    """‖∂L/∂h_l‖ for every block of an unscaled network, in a Python loop."""
    p = params["params"]

    def block(h, i):
        inner, outer = p["blocks"]["inner"], p["blocks"]["outer"]
        branch = jax.nn.relu(h @ inner["kernel"][i] + inner["bias"][i])
        return h + branch @ outer["kernel"][i] + outer["bias"][i]

    def loss_from(h, first):  # the loss as a function of the stream at `first`
        for i in range(first, blocks):
            h = block(h, i)
        logits = h @ p["head"]["kernel"] + p["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    h = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    norms = []
    for first in range(blocks):
        norms.append(jnp.linalg.norm(jax.grad(loss_from)(h, first)))
        h = block(h, first)
    return np.asarray(norms)


def test_stream_gradients_from_zero_perturbations_match_an_unrolled_network(split):
    blocks = 6
    x, y = jnp.asarray(split.x_train[:64]), jnp.asarray(split.y_train[:64])
    (variables,) = _init(["He, unscaled"], blocks, x[:2])
    model = depth.network("He, unscaled", blocks)
    _, norms = depth.at_init(model, variables, x, y)
    expected = _unrolled_norms(variables, x, y, blocks)
    assert expected[0] > 5 * expected[-1]  # the gradient grows backwards
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    np.testing.assert_allclose(
        norms[0] / norms[-1], expected[0] / expected[-1], rtol=1e-4
    )


def test_gpt2_and_fixup_kernels_are_hes_draw_times_the_depth_factor(split):
    blocks = 10
    he, gpt2, fixup = (
        v["params"]["blocks"]
        for v in _init(["He, unscaled", "gpt2", "fixup"], blocks, split.x_train[:2])
    )
    np.testing.assert_array_equal(gpt2["inner"]["kernel"], he["inner"]["kernel"])
    np.testing.assert_allclose(
        gpt2["outer"]["kernel"],
        he["outer"]["kernel"] / math.sqrt(2 * blocks),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        fixup["inner"]["kernel"], he["inner"]["kernel"] / math.sqrt(blocks), rtol=1e-6
    )
    assert not np.any(fixup["outer"]["kernel"])
    # He's draw: std √(2 / 64), a different draw in every block.
    kernel = np.asarray(he["outer"]["kernel"])
    assert abs(kernel.std() / math.sqrt(2 / 64) - 1) < 0.05
    assert not np.array_equal(kernel[0], kernel[1])


def test_gated_network_starts_as_its_input_projection(split):
    x = jnp.asarray(split.x_train[:32])
    (variables,) = _init(["ResidualGate"], 6, x[:2])
    p = variables["params"]
    assert np.all(p["blocks"]["gate"]["alpha"] == 0)
    _, state = depth.network("ResidualGate", 6).apply(
        variables, x, mutable=["intermediates"]
    )
    (stream,) = state["intermediates"]["stream"]
    np.testing.assert_array_equal(stream, x @ p["embed"]["kernel"] + p["embed"]["bias"])


def test_measure_is_deterministic_given_the_seed(rows, split):
    again = depth.measure(("ResidualGate",), 8, SWEEP, seed=0, split=split)
    (first,) = again
    r = _row(rows, "ResidualGate", 8)
    for field in ("stream_std", "ratio", "train_loss", "accuracy"):
        np.testing.assert_array_equal(getattr(first, field), getattr(r, field))


def test_measure_rejects_variants_without_one_apply_function(split):
    with pytest.raises(ValueError, match="apply function"):
        depth.measure(("gpt2", "batch norm"), 4, depth.QUICK, split=split)


def test_write_makes_the_table_the_record_and_the_plot(rows, tmp_path):
    depth.write(rows, SWEEP, tmp_path, seed=0)
    table = (tmp_path / "depth.md").read_text()
    assert table.startswith(depth.TITLE)
    for r in rows:
        assert f"| {r.depth} " in table and f"| {r.variant} " in table
    assert table.count("(shared)") == len(SWEEP.depths) * len(depth.GROUPS[0])
    record = json.loads((tmp_path / "depth.json").read_text())
    assert record["budget"] == json.loads(json.dumps(vars(SWEEP)))
    assert record["seed"] == 0
    assert len(record["rows"]) == len(rows)
    first = record["rows"][0]
    assert first["accuracy"] == [float(a) for a in rows[0].accuracy]
    png = (tmp_path / "depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_run_their_variants_only():
    assert depth.groups(depth.QUICK) == [depth.GROUPS[0]]
    assert depth.groups(depth.DEFAULT) == list(depth.GROUPS)
    partial = depth.Budget(variants=("gpt2", "batch norm"))
    assert depth.groups(partial) == [("gpt2",), ("batch norm",)]
    assert set(depth.FULL.depths) > set(depth.DEFAULT.depths)
