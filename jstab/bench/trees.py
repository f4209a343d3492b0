"""Parameter trees shaped like the models people clip: what the benchmark times.

Each builder returns a flat ``{name: shape}`` dict; :func:`make` turns one into
float32 parameters and a gradient whose global L2 norm is
``GRAD_NORM`` (elements of about 1e-3), so that every clipping rule the
benchmark times acts at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

Shapes = dict[str, tuple[int, ...]]

GRAD_NORM = 10.0


def resnet50(div: int = 1, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> Shapes:
    """A ResNet-50's parameters (25.6M in 161 leaves), widths divided by ``div``.

    Convolution kernels ``(k, k, in, out)``, a scale and a bias per batch
    norm, and the 1000-way classifier, as in He et al. (2016); ``blocks``
    bottleneck blocks per stage.
    """
    shapes: Shapes = {}

    def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
        shapes[f"{name}/kernel"] = (k, k, cin, cout)
        shapes[f"{name}/bn/scale"] = (cout,)
        shapes[f"{name}/bn/bias"] = (cout,)

    cin = 64 // div
    conv_bn("stem", 7, 3, cin)
    stages = zip(blocks, [64, 128, 256, 512], strict=True)
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
    shapes["head/kernel"] = (cin, 1000)
    shapes["head/bias"] = (1000,)
    return shapes


def transformer(
    d_model: int = 512,
    blocks: int = 12,
    vocab: int = 32000,
    context: int = 1024,
    mlp_ratio: int = 4,
) -> Shapes:
    """A GPT-style decoder: embeddings and ``blocks`` pre-norm blocks.

    The defaults give 54.7M parameters in 196 leaves: token and position
    embeddings, per block a layer norm, query/key/value/output projections
    with biases, a layer norm and a two-layer MLP, then a final layer norm
    (the output projection is tied to the token embedding).
    """
    d, h = d_model, mlp_ratio * d_model
    shapes: Shapes = {"embed/token": (vocab, d), "embed/position": (context, d)}
    for b in range(blocks):
        name = f"block{b}"
        shapes[f"{name}/ln1/scale"] = (d,)
        shapes[f"{name}/ln1/bias"] = (d,)
        for proj in ("query", "key", "value", "out"):
            shapes[f"{name}/attention/{proj}/kernel"] = (d, d)
            shapes[f"{name}/attention/{proj}/bias"] = (d,)
        shapes[f"{name}/ln2/scale"] = (d,)
        shapes[f"{name}/ln2/bias"] = (d,)
        shapes[f"{name}/mlp/in/kernel"] = (d, h)
        shapes[f"{name}/mlp/in/bias"] = (h,)
        shapes[f"{name}/mlp/out/kernel"] = (h, d)
        shapes[f"{name}/mlp/out/bias"] = (d,)
    shapes["final_ln/scale"] = (d,)
    shapes["final_ln/bias"] = (d,)
    return shapes


def tiny(leaves: int = 2000, size: int = 256) -> Shapes:
    """``leaves`` vectors of ``size``: where the cost is per leaf, not per byte."""
    return {f"leaf{i:04d}": (size,) for i in range(leaves)}


#: The built-in trees: full size, and ``--quick`` size (a few hundred
#: thousand parameters in a few dozen leaves: compiling is what takes time).
TREES: dict[str, tuple[Callable[[], Shapes], Callable[[], Shapes]]] = {
    "resnet": (resnet50, lambda: resnet50(div=8, blocks=(1, 1, 1, 1))),
    "transformer": (
        transformer,
        lambda: transformer(d_model=64, blocks=2, vocab=2000, context=128),
    ),
    "tiny": (tiny, lambda: tiny(leaves=100)),
}


def gradient_like(
    params: chex.ArrayTree, seed: int = 1, grad_norm: float = GRAD_NORM
) -> chex.ArrayTree:
    """Normal noise shaped like ``params`` (leaf dtypes kept), of norm ``grad_norm``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [
        jax.random.normal(k, x.shape, jnp.float32)
        for k, x in zip(keys, leaves, strict=True)
    ]
    norm = np.sqrt(sum(float(jnp.sum(n * n)) for n in noise))
    scale = np.float32(grad_norm / max(norm, 1e-30))
    out = [(n * scale).astype(x.dtype) for n, x in zip(noise, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)


def make(
    shapes: Shapes, seed: int = 0, grad_norm: float = GRAD_NORM
) -> tuple[dict, dict]:
    """Float32 parameters (normal times 0.02) and a gradient of norm ``grad_norm``.

    Names with ``/`` become nested dicts, as Flax lays parameters out.
    """
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = _nest(
        {
            name: 0.02 * jax.random.normal(key, shape, jnp.float32)
            for key, (name, shape) in zip(keys, shapes.items(), strict=True)
        }
    )
    return params, gradient_like(params, seed + 1, grad_norm)


def _nest(flat: dict[str, chex.Array]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
