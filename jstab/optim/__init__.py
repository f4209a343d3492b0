"""Optimizers that guard against gradient spikes, as Optax transformations."""

from jstab.optim._spam import ScaleBySpamState, scale_by_spam, spam

__all__ = ["ScaleBySpamState", "scale_by_spam", "spam"]
