"""Weighted averaging under shard_map, the clients mesh, and multi-host detection."""

import numpy as np
import pytest

from picpq_jax.federated import averaging, distributed

AVERAGE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from picpq_jax.errors import UserError
from picpq_jax.federated import averaging, distributed

rng = np.random.default_rng(0)
tree = {"w": rng.normal(size=(8, 3, 2)).astype(np.float32),
        "b": [rng.normal(size=(8,)).astype(np.float32)],
        "count": np.full((8,), 5, np.int32)}
weights = rng.uniform(0, 10, size=8).astype(np.float32)
weights[3] = 0.0  # a client left out of the round
expect = {k: np.tensordot(weights / weights.sum(), np.asarray(v, np.float64), 1)
          for k, v in (("w", tree["w"]), ("b", tree["b"][0]))}
mesh = distributed.clients_mesh(8)  # 2 clients per device
assert mesh.size == 4
f = jax.jit(jax.shard_map(lambda t, w: averaging.weighted_average(t, w, "clients"), mesh=mesh,
                          in_specs=(P("clients"), P("clients")), out_specs=P()))
out = f(tree, weights)
np.testing.assert_allclose(out["w"], expect["w"], rtol=1e-5)
np.testing.assert_allclose(out["b"][0], expect["b"], rtol=1e-5)
assert int(out["count"]) == 5
assert distributed.clients_mesh(6).size == 3
assert distributed.clients_mesh(8, devices=2).size == 2
for bad in ((8, 3), (8, 5)):
  try:
    distributed.clients_mesh(*bad)
  except UserError as e:
    print("error:", e)
  else:
    raise AssertionError(bad)
print("OK")
"""


def test_weighted_average_over_four_devices_matches_numpy(on_devices):
  out = on_devices(AVERAGE, devices=4)
  assert "do not split over 3 devices" in out and "--devices=5 is out of range" in out


def test_weighted_average_without_mesh_and_fedavg_weights():
  x = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
  out = averaging.weighted_average({"x": x}, np.array([1.0, 3.0]))
  np.testing.assert_allclose(np.asarray(out["x"]), [2.5, 5.0])
  np.testing.assert_allclose(averaging.fedavg_weights([10, 30, 60]), [0.1, 0.3, 0.6])


@pytest.mark.parametrize("env,expect", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    ({"SLURM_NTASKS": "8"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
])
def test_multihost_detection(env, expect):
  assert distributed.distributed_env(env) == expect


def test_single_host_does_not_initialize():
  assert distributed.initialize_if_multihost({}) is False
