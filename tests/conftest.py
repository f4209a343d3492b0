"""Test-wide settings, applied before JAX is imported by any test module.

XLA's CPU backend spends most of a small test's time compiling: with JAX's
default partitionable Threefry, one `jax.random.normal` program takes about
3.5 s to compile at the default optimization level on this project's 2-core
CI machine and 0.2 s at level 0. The suite compiles hundreds of small
programs and runs each once, so it compiles at level 0. Results then differ
from the optimized build by at most an ulp or two (measured on he_normal,
truncated_normal, orthogonal: fused multiply-adds differ), far inside every
tolerance of the suite. Benchmarks never run under this setting. Set
JSTAB_TEST_XLA_OPT=1 to keep XLA's defaults.
"""

import os

if not os.environ.get("JSTAB_TEST_XLA_OPT"):
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
