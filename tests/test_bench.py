"""jstab bench: the trees, the traffic model, the timing method, the CLI.

No assertion here is about speed: timings on a shared CI machine say
nothing. The tests check what the benchmark computes and reports.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jstab import bench
from jstab.bench import timing, trees, variants

DEFAULT = list(variants.default())


def test_built_in_trees_have_the_sizes_they_claim():
    resnet, transformer, tiny = trees.resnet50(), trees.transformer(), trees.tiny()
    size = lambda s: sum(math.prod(x) for x in s.values())  # noqa: E731
    assert (len(resnet), size(resnet)) == (161, 25_557_032)  # torchvision's count
    assert (len(transformer), size(transformer)) == (196, 54_737_920)
    assert (len(tiny), size(tiny)) == (2000, 512_000)
    for full, quick in trees.TREES.values():
        assert len(quick()) < len(full()) and size(quick()) < size(full())


def test_make_nests_names_and_scales_the_gradient_to_the_norm():
    params, grads = trees.make({"a/b/kernel": (3, 4), "a/bias": (4,), "c": (5,)})
    assert jax.tree.structure(params) == jax.tree.structure(grads)
    assert params["a"]["b"]["kernel"].shape == (3, 4) and params["c"].shape == (5,)
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    assert norm == pytest.approx(trees.GRAD_NORM, rel=1e-6)


@pytest.mark.parametrize(
    ("tx", "want"),
    [
        (optax.adam(1e-3), 7),  # reads g, p, mu, nu; writes p, mu, nu
        (optax.sgd(1e-3), 3),  # reads g, p; writes p
        (optax.sgd(1e-3, momentum=0.9), 5),
    ],
)
def test_passes_count_the_gradient_sized_arrays_a_step_moves(tx, want):
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    assert variants.passes(tx, params) == want
    assert variants.traffic_floor(want, 1) == pytest.approx((want + 1) / want)
    assert variants.traffic_floor(want, None) is None


class _Clock:
    """A fake step with given durations, recording the order it ran in."""

    def __init__(self, name, durations, log):
        self.name, self.durations, self.log, self.times = name, durations, log, []
        self.faults, self.last_faults = [], None

    def __call__(self):
        self.log.append(self.name)
        return self.durations[len(self.log) - 1]


def test_pairs_alternate_and_each_ratio_is_taken_within_its_pair():
    log = []
    # warm-up A B, then rounds A B | B A | A B
    durations = [9, 9, 1.0, 2.0, 6.0, 3.0, 1.5, 1.5]
    base, other = _Clock("A", durations, log), _Clock("B", durations, log)
    ratios = timing.paired(base, other, repeats=3, warmup=1)
    assert log == ["A", "B", "A", "B", "B", "A", "A", "B"]
    assert ratios == [2.0, 2.0, 1.0]
    assert base.times == [1.0, 3.0, 1.5] and other.times == [2.0, 6.0, 1.5]
    assert timing.noise(base) == [3.0, 0.5]


def test_compiled_steps_feed_their_donated_outputs_back():
    def step(params, count, grads):
        return params - grads, count + 1

    run = timing.Compiled(step, (jnp.ones(3), jnp.zeros(()), jnp.ones(3)), (0, 1))
    for _ in range(3):
        assert run() > 0
    params, count, grads = run.args
    np.testing.assert_array_equal(params, [-2.0, -2.0, -2.0])
    assert int(count) == 3 and float(grads[0]) == 1.0
    assert run.compile_s > 0 and run.fusions() >= 1


@pytest.mark.skipif(timing.resource is None, reason="no page-fault counter here")
def test_page_faults_count_the_fresh_memory_a_step_writes():
    # The same step, writing a 64 MB result to new memory at every call, or
    # in place over its donated input.
    x = jnp.ones(2**24)
    fresh = timing.Compiled(lambda x: (x * 2,), (x,), ())
    in_place = timing.Compiled(lambda x: (x * 2,), (x,), (0,))
    for _ in range(3):
        fresh(), in_place()
    pages = x.nbytes // timing.resource.getpagesize()
    assert fresh.last_faults > pages // 2, (fresh.last_faults, pages)
    assert in_place.last_faults < pages // 10, (in_place.last_faults, pages)
    ratios = timing.paired(in_place, fresh, repeats=2, warmup=0)
    assert len(fresh.faults) == len(in_place.faults) == len(ratios) == 2
    row = timing.summarize("fresh", fresh, ratios, 1.0, None, False)
    assert row.faults == np.median(fresh.faults) > pages // 2


def test_optimizer_step_times_a_user_tree_and_user_variants():
    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    mine = optax.chain(optax.clip(0.1), optax.sgd(0.1))
    table = bench.optimizer_step(
        params,
        optimizer="sgd",
        variants={
            "mine": mine,
            "global": variants.default()["jstab.clip_by_global_norm"],
        },
        repeats=2,
        warmup=1,
        fusions=True,
        name="user",
    )
    assert [t.variant for t in table.timings] == ["optax.sgd", "mine", "global"]
    assert (table.name, table.step, table.leaves, table.parameters) == (
        "user",
        "optimizer",
        2,
        136,
    )
    assert table.traffic_mb == pytest.approx(3 * 136 * 4 / 1e6)
    floors = [t.floor for t in table.timings]
    assert floors == [1.0, None, pytest.approx(4 / 3)]
    assert all(t.fusions >= 1 for t in table.timings)
    assert "user: optimizer step, optax.sgd" in bench.format_table(table)


def test_bad_names_are_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown names"):
        bench.optimizer_step({"w": jnp.ones(2)}, variants=["jstab.clip_by_magic"])
    with pytest.raises(ValueError, match="unknown trees"):
        bench.run(["vgg"])
    with pytest.raises(ValueError, match="`optimizer` must be"):
        bench.run(["tiny"], optimizer="rmsprop")
    with pytest.raises(ValueError, match="repeats"):
        bench.optimizer_step({"w": jnp.ones(2)}, repeats=0)


def test_cli_refuses_an_unknown_variant():
    done = subprocess.run(
        [sys.executable, "-m", "jstab", "bench", "--variants", "nope"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown --variants ['nope']" in done.stderr


def test_quick_bench_writes_a_complete_record(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "jstab", "bench", "--quick", "--json", str(out)]
    done = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]
    record = json.loads(out.read_text())
    machine = record["machine"]
    assert machine["backend"] == jax.default_backend() and machine["cpu_cores"] >= 1
    # The tests share a compilation cache (conftest); the CLI compiles anew.
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] and not machine["compilation_cache"]
    tables = record["tables"]
    assert [t["name"] for t in tables] == ["resnet", "transformer", "tiny", "mlp"]
    assert [t["step"] for t in tables] == ["optimizer"] * 3 + ["training"]
    for table in tables:
        names = [row["variant"] for row in table["timings"]]
        assert names == ["optax.adam", *DEFAULT]
        assert table["repeats"] == bench.QUICK_REPEATS
        assert table["leaves"] > 0 and table["parameters"] > 0
        for row in table["timings"]:
            for key in ("median_ms", "min_ms", "max_ms", "ratio", "ratio_min",
                        "ratio_max", "compile_s", "compile_ratio"):  # fmt: skip
                assert math.isfinite(row[key]) and row[key] > 0, (row, key)
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
            assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["floor"] is None or row["floor"] >= 1.0
            counted = timing.resource is not None
            assert (row["faults"] >= 0) if counted else row["faults"] is None
        assert table["timings"][0]["compile_ratio"] == 1.0
    for name in ("resnet", "transformer", "tiny", "mlp"):
        assert f"{name}: " in done.stdout
