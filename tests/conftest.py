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

The test processes (pytest-xdist's workers, the scripts run on eight
devices, the notebooks' kernels, `jstab demo`) also compile many of the same
programs: one-device references, the demo's and the notebooks' models. They
share them through JAX's persistent compilation cache, in a directory made
for this run and removed at its end (set JAX_COMPILATION_CACHE_DIR to choose
one). On the 2-core machine the whole suite took 399 s without it and 332 s
with it, the same 817 tests.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

if not os.environ.get("JSTAB_TEST_XLA_OPT"):
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

# The first process (pytest itself, before xdist starts its workers) makes
# the directory; the processes it starts inherit the variables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.mkdtemp(prefix="jstab-xla-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    # Every program, not only those compiled in more than a second.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture
def run_on_eight_devices():
    """Runs a Python script in a subprocess that sees 8 virtual CPU devices.

    The device count must be set before JAX is imported, and the rest of the
    suite runs on one device. ``args`` are the script's ``sys.argv[1:]``.
    The script must print "ok" last.

    Scripts wait for each step that communicates (``jax.block_until_ready``):
    the 8 devices share the machine's threads, and steps queued ahead whose
    collectives wait for one another can starve them. On 2 cores, training
    a 16-layer FSDP model without waiting aborted in 4 runs of 5 (XLA's
    40 s rendezvous timeout); waiting for each step, it ran.
    """

    def run(script: str, *args: str) -> None:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        )
        env["JAX_PLATFORMS"] = "cpu"
        result = subprocess.run(
            [sys.executable, "-c", script, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stdout.strip().endswith("ok")

    return run
