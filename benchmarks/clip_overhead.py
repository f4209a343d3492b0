"""What a clipping transform costs inside one jit-compiled optimizer step.

Each variant is one Optax ``GradientTransformation``: ``optax.adam(1e-3)`` alone
(the baseline) or ``optax.chain(clip, optax.adam(1e-3))`` for a jstab or an
Optax clipping transform. The step (update plus ``optax.apply_updates``) is
jitted with the parameters and optimizer state donated, as in a real training
step, on a ResNet-50-shaped tree of float32 parameters (~25M in 161 leaves)
whose gradient has a global L2 norm of 10 (elements of about 2e-3), so that
every rule clips at every step, except the row marked "(none)": the value
rule with a bound no element reaches, which skips counting clipped elements.

Every round times the baseline immediately before each clipped variant, and
the ratio of the two is taken per pair. The ratios are what matter: they are
paired within one run on one machine; absolute times are not comparable
across machines or runs. For reference, Adam moves 7 gradient-sized arrays per
step (reads g, mu, nu, params; writes mu, nu, params) and a global norm adds
one read, so a memory-bound floor for global-norm clipping is 8/7 = 1.14.

Run it with::

    python benchmarks/clip_overhead.py            # full tree, 30 rounds
    python benchmarks/clip_overhead.py --quick    # 1/4 channel widths, 5 rounds
    python benchmarks/clip_overhead.py --repeats 50 --json results.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jstab

GRAD_NORM = 10.0
TRAFFIC_FLOOR = 8 / 7  # Adam: 7 array passes; global norm: one more read.


def resnet50_shapes(div: int = 1) -> dict[str, tuple[int, ...]]:
    """Shapes of a ResNet-50's parameters, channel widths divided by ``div``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
        shapes[f"{name}/kernel"] = (k, k, cin, cout)
        shapes[f"{name}/bn_scale"] = (cout,)
        shapes[f"{name}/bn_bias"] = (cout,)

    cin = 64 // div
    conv_bn("stem", 7, 3, cin)
    stages = zip([3, 4, 6, 3], [64, 128, 256, 512], strict=True)
    for stage, (blocks, width) in enumerate(stages):
        width //= div
        for block in range(blocks):
            name = f"stage{stage + 1}/block{block}"
            conv_bn(f"{name}/conv1", 1, cin, width)
            conv_bn(f"{name}/conv2", 3, width, width)
            conv_bn(f"{name}/conv3", 1, width, 4 * width)
            if block == 0:
                conv_bn(f"{name}/proj", 1, cin, 4 * width)
            cin = 4 * width
    shapes["dense/kernel"] = (cin, 1000)
    shapes["dense/bias"] = (1000,)
    return shapes


def make_trees(div: int) -> tuple[dict, dict]:
    """Deterministic parameters (normal * 0.01) and gradients of norm 10."""
    shapes = resnet50_shapes(div)
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    params, grads = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        params[name] = 0.01 * jax.random.normal(keys[2 * i], shape, jnp.float32)
        grads[name] = jax.random.normal(keys[2 * i + 1], shape, jnp.float32)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in grads.values()))
    grads = jax.tree.map(lambda g: g * (GRAD_NORM / norm), grads)
    return params, grads


def variants() -> dict[str, optax.GradientTransformation]:
    adam = optax.adam(1e-3)
    clips = {
        "jstab.clip_by_global_norm": jstab.clip_by_global_norm(1.0),
        "jstab.clip_by_value": jstab.clip_by_value(1e-3),
        "jstab.clip_by_value (none)": jstab.clip_by_value(1.0),
        "jstab.clip_by_range": jstab.clip_by_range(-1e-3, 1e-3),
        "jstab.clip_by_layer_norm": jstab.clip_by_layer_norm(0.1),
        "jstab.adaptive_grad_clip": jstab.adaptive_grad_clip(0.01),
        "jstab.autoclip": jstab.autoclip(10.0, history=1000),
        "jstab.zclip": jstab.zclip(),
        "jstab.monitor_gradients": jstab.monitor_gradients(),
        # The functional twin, as a hand-written loop calls it.
        "jstab.clip_grad_norm": optax.stateless(
            lambda g, _: jstab.clip_grad_norm(g, 1.0)[0]
        ),
        "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
        "optax.clip": optax.clip(1e-3),
        "optax.clip_by_block_rms": optax.clip_by_block_rms(1e-4),
        "optax.adaptive_grad_clip": optax.adaptive_grad_clip(0.01),
    }
    chained = {name: optax.chain(clip, adam) for name, clip in clips.items()}
    # A wrapper, not a link of the chain: it holds Adam's state.
    wrapped = {
        "jstab.skip_on_spike": jstab.skip_on_spike(adam, z_thresh=3.0),
        "optax.apply_if_finite": optax.apply_if_finite(adam, 3),
    }
    return {"optax.adam (baseline)": adam} | chained | wrapped


class Runner:
    """One variant: its compiled step and its own (donated) params and state."""

    def __init__(self, tx: optax.GradientTransformation, params, grads):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        self.grads = grads
        start = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=(0, 1))
        self.step = jitted.lower(self.params, self.state, grads).compile()
        self.compile_s = time.perf_counter() - start
        self.times: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        out = self.step(self.params, self.state, self.grads)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        self.params, self.state = out
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument(
        "--quick", action="store_true", help="1/4 channel widths and 5 rounds"
    )
    parser.add_argument("--json", metavar="FILE", help="also write results as JSON")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated substrings: time only the variants whose name "
        "contains one (and the baseline), e.g. autoclip,zclip,global_norm",
    )
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats

    params, grads = make_trees(div=4 if args.quick else 1)
    leaves = jax.tree.leaves(params)
    header = {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "jstab": jstab.__version__,
        "device": str(jax.devices()[0]),
        "leaves": len(leaves),
        "parameters": int(sum(x.size for x in leaves)),
        "repeats": repeats,
        "floor_ratio": TRAFFIC_FLOOR,
    }
    for key, value in list(header.items())[:-1]:
        print(f"{key:>11}: {value}")
    print(f"{'floor':>11}: {TRAFFIC_FLOOR:.2f} (8/7: Adam moves 7 arrays, a norm 1)")

    chosen = variants()
    if args.only:
        keys = args.only.split(",")
        chosen = {
            name: tx
            for name, tx in chosen.items()
            if "baseline" in name or any(k in name for k in keys)
        }
    runners = {name: Runner(tx, params, grads) for name, tx in chosen.items()}
    for runner in runners.values():  # warm-up
        runner()
        runner()

    base_name, base = next(iter(runners.items()))
    ratios: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            if runner is base:
                continue
            t_base, t = base(), runner()
            base.times.append(t_base)
            runner.times.append(t)
            ratios[name].append(t / t_base)
        # Baseline against itself: consecutive baseline calls, a noise floor.
        recent = base.times[-(len(runners) - 1) :]
        pairs = zip(recent[:-1], recent[1:], strict=True)
        ratios[base_name] += [b / a for a, b in pairs]

    rows = [
        {
            "variant": name,
            "median_ms": 1e3 * float(np.median(runner.times)),
            "median_ratio": float(np.median(ratios[name])),
            "min_ratio": min(ratios[name]),
            "max_ratio": max(ratios[name]),
            "compile_s": runner.compile_s,
        }
        for name, runner in runners.items()
    ]

    print(
        f"\n{'variant':<28}{'median ms':>10}{'ratio':>8}  {'[min, max]':<14}"
        f"{'compile s':>9}"
    )
    for row in rows:
        spread = f"[{row['min_ratio']:.2f}, {row['max_ratio']:.2f}]"
        print(
            f"{row['variant']:<28}{row['median_ms']:>10.2f}"
            f"{row['median_ratio']:>8.2f}  {spread:<14}{row['compile_s']:>9.2f}"
        )
    print("(baseline ratio: consecutive baseline calls against each other)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
