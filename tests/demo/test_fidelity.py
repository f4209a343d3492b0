"""What the demo's rows claim: each clipped or skipped row runs beside its
baseline, and clipping rescues a network whose gradient explodes in
training."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jstab
from jstab.demo import experiments

_BY_NAME = {c.name: c for c in experiments.CONFIGS}
_SELECTIONS = {
    "quick": lambda c: c.quick,
    "default": lambda c: not c.full,
    "full": lambda c: True,
}


def _clips_or_skips(config: experiments.Config) -> bool:
    """Whether the row's optimizer counts clipped or skipped steps, as
    :func:`experiments.measure` reads them."""
    tx = experiments.optimizer(config)
    stats = jstab.statistics(tx.init({"w": jnp.zeros(2)}))
    return any(k.endswith(("/clip_count", "/skip_count")) for k in stats)


def test_row_names_are_unique():
    assert len(_BY_NAME) == len(experiments.CONFIGS)


@pytest.mark.parametrize("selection", list(_SELECTIONS))
def test_every_clipped_or_skipped_row_runs_beside_its_baseline(selection):
    chosen = _SELECTIONS[selection]
    rows = [c for c in experiments.CONFIGS if chosen(c)]
    checked = 0
    for config in rows:
        if not _clips_or_skips(config):
            assert config.baseline is None, config.name
            continue
        checked += 1
        assert config.baseline in _BY_NAME, config.name
        base = _BY_NAME[config.baseline]
        assert chosen(base), (config.name, base.name)
        assert not _clips_or_skips(base), base.name
        assert base.clip is None and not base.loss_scaling, base.name
        for field in ("task", "model", "optimizer", "dtype", "part", "lsuv"):
            assert getattr(base, field) == getattr(config, field), (config.name, field)
    assert checked >= 2  # not vacuous: the rescue pair and loss scaling


def test_the_rescue_pair_is_quick_and_differs_only_by_the_clip():
    clipped = next(
        c
        for c in experiments.CONFIGS
        if c.name.startswith("ReLU + He, SGD") and c.clip is not None
    )
    assert clipped.quick and clipped.table == "digits"
    assert _BY_NAME[clipped.baseline].quick


def test_sgd_explodes_relu_he_in_training_and_the_global_norm_clip_rescues_it():
    clipped = next(
        c
        for c in experiments.CONFIGS
        if c.name.startswith("ReLU + He, SGD") and c.clip is not None
    )
    plain = _BY_NAME[clipped.baseline]
    budget = experiments.QUICK
    sound = experiments.measure(plain, budget)
    # Sound at initialization: the gradient neither vanishes nor explodes.
    assert sound.diagnosis == "ok"
    # Unclipped, every seed ends at a non-finite loss or at chance.
    for loss, accuracy in zip(sound.train_loss, sound.metric, strict=True):
        assert not math.isfinite(loss) or accuracy < 0.2, (loss, accuracy)
    rescued = experiments.measure(clipped, budget)
    assert np.all(np.isfinite(rescued.train_loss))
    assert np.all(rescued.metric > 0.6), rescued.metric
    assert np.all(rescued.clipped > 0)
