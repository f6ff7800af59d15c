"""Reproducer: XLA's SPMD partitioner and a vmapped 1x1 convolution with per-member kernels.

``jax.vmap`` of a convolution over a batch of kernels lowers to one grouped
convolution (``feature_group_count`` = the batch). Jitted with the kernels and inputs
sharded over 2 devices along that batch, a 1x1 kernel gives wrong values (2 -> 4
channels) or fails to compile (2 -> 7 channels: "output feature dimension (28) ... not
divisible by feature_group_count (8)"), while 3x3 kernels agree exactly. It is why
``csi.methods.reconstruct_program`` runs on one device (CRNet's encoder has a 1x1
conv). Seen with jax/jaxlib 0.10.2 (Python 3.11) and 0.12.1 (Python 3.12) on CPU::

  PYTHONPATH=. python experiments/csi/xla_grouped_conv.py
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def conv(w, x):
  """``x [N, 32, 32, cin]`` with ``w [k, k, cin, cout]``, SAME padding."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  mesh = Mesh(np.array(jax.devices()[:2]), ("members",))
  sharded = lambda a: jax.device_put(a, NamedSharding(mesh, P("members")))
  rng = np.random.default_rng(0)
  program = jax.jit(jax.vmap(conv))
  print(f"jax {jax.__version__}; 8 members, kernels and inputs sharded over 2 devices")
  for cin, cout, k in ((2, 2, 3), (2, 4, 3), (2, 4, 1), (2, 2, 1), (2, 7, 1)):
    w = rng.normal(size=(8, k, k, cin, cout)).astype(np.float32)
    x = rng.normal(size=(8, 16, 32, 32, cin)).astype(np.float32)
    expected = np.asarray(program(w, x))
    try:
      got = np.asarray(program(sharded(w), sharded(x)))
      result = f"max |sharded - one device| = {np.abs(got - expected).max():.3g}"
    except Exception as e:  # the partitioner's invalid program, reported as is
      result = "fails: " + str(e).splitlines()[0][:110]
    print(f"{k}x{k} conv {cin} -> {cout}: {result}")


if __name__ == "__main__":
  main()
