import os

# Tests run on the CPU, single-threaded XLA would be slower: leave defaults, but keep
# JAX from grabbing a GPU's memory if one exists.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
