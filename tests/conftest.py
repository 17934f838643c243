import os
from pathlib import Path

# Tests run on the CPU, single-threaded XLA would be slower: leave defaults, but keep
# JAX from grabbing a GPU's memory if one exists.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Most of the suite's time is XLA compiling programs that other tests (and the other
# xdist worker) have compiled already: share them through JAX's persistent compilation
# cache, keyed by the program itself, so a hit is the same program. Set in the
# environment too, for the tests that start fedsim in a subprocess.
CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment it reads)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)
