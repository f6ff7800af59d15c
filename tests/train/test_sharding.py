"""Data-parallel training over a (simulated) 4-device mesh computes the same step as
one device: the batch is sharded, BN statistics and gradients are global."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from picpq_jax import models
    from picpq_jax.train import create_train_state, sgd_nesterov, train_step

    assert jax.device_count() == 4, jax.devices()
    model = models.get_model("resnet8")
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    tx = sgd_nesterov(0.01)  # at 0.1, 1e-7 reduction-order noise grows to 1e-4 in 3 steps
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                rng.integers(0, 10, size=8).astype(np.int32)) for _ in range(3)]
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))

    def run(state_sharding, data_sharding):
      state = jax.device_put(create_train_state(variables, tx), state_sharding)
      for x, y in batches:
        state, _ = step(state, jax.device_put(x, data_sharding), jax.device_put(y, data_sharding))
      return state

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = run(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
    single = run(jax.devices()[0], jax.devices()[0])
    leaf = jax.tree.leaves(sharded.params)[0]
    assert len(leaf.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    print("OK")
""")


def test_four_device_data_parallel_step_equals_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
