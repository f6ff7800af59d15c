"""Rounds over a simulated 4-device ``clients`` mesh, checked against independent math.

* one client, no quantization: SplitFed-V1 and the sequential server give the same
  parameters as centralized training of the whole model (the split is exact), and a
  round compiles once;
* four clients on four devices: the sequential server equals a plain loop over the
  clients on one device (client forwards, server steps in client order, client
  backwards, averaging);
* eight clients, two per device (vmap or unrolled): FedAvg equals the sample-weighted numpy average of
  eight independently trained models.
"""

SETUP = """
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from picpq_jax import models
from picpq_jax.federated import rounds, split as fsplit, steps as fsteps
from picpq_jax.train import create_train_state, sgd_nesterov, train_step

assert jax.device_count() == 4, jax.devices()
LR, E, B = 0.05, 2, 4
model = models.get_model("resnet8")
variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
tx = sgd_nesterov(1.0)
pre = lambda key, x: jnp.asarray(x, jnp.float32) / 255.0 - 0.5  # no augmentation: comparable
rng = np.random.default_rng(0)

def close(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
"""

EXACT = SETUP + """
R = 2
images = rng.integers(0, 256, size=(R, 1, E, B, 32, 32, 3)).astype(np.uint8)
labels = rng.integers(0, 10, size=(R, 1, E, B)).astype(np.int32)

# Independent reference: the library's whole-model train step, R * E times.
ref = create_train_state(variables, sgd_nesterov(LR))
step = jax.jit(functools.partial(train_step, model=model, tx=sgd_nesterov(LR)))
for r in range(R):
  for t in range(E):
    ref, _ = step(ref, pre(None, images[r, 0, t]), labels[r, 0, t])

sm = fsplit.split_model(model, 1)
cv, sv = sm.split(variables)
consts = {"client": fsteps.constants(cv), "server": fsteps.constants(sv)}
mesh = Mesh(np.array(jax.devices()[:1]), ("clients",))
traces = []
def counted(*args):
  traces.append(1)
  return fsteps.split_step(sm, tx, *args)
programs = {"splitfed": rounds.parallel_round(counted, tx, pre, mesh, reset=()),
            "sequential": rounds.sequential_round(sm, tx, pre, mesh, reset_client=False)}
for name, round_fn in programs.items():
  parts = {"client": fsteps.PartState.create(cv, tx), "server": fsteps.PartState.create(sv, tx)}
  parts = jax.device_put(parts, NamedSharding(mesh, P()))  # as run_federated places it
  for r in range(R):
    batch = {"image": images[r], "label": labels[r], "client": np.zeros(1, np.int32),
             "weight": np.full(1, 123.0, np.float32)}
    parts, metrics = round_fn(parts, consts, batch, jnp.full((E,), LR), jax.random.key(r),
                              jnp.int32(32))
  assert float(metrics["count"]) == E * B
  merged = sm.merge({"params": parts["client"].params, "batch_stats": parts["client"].batch_stats},
                    {"params": parts["server"].params, "batch_stats": parts["server"].batch_stats})
  close((merged["params"], merged["batch_stats"]), (ref.params, ref.batch_stats))
  print(name, "matches centralized")
assert len(traces) == 1, traces  # the SplitFed round compiled once for both rounds
print("OK")
"""

FEDAVG = SETUP + """
K = 8
images = rng.integers(0, 256, size=(K, 1, B, 32, 32, 3)).astype(np.uint8)
labels = rng.integers(0, 10, size=(K, 1, B)).astype(np.int32)
counts = np.array([10, 30, 5, 7, 100, 1, 40, 20], np.float32)

# Independent reference: each client's own step, then a float64 numpy weighted mean.
step = jax.jit(functools.partial(train_step, model=model, tx=sgd_nesterov(LR)))
trained = [step(create_train_state(variables, sgd_nesterov(LR)), pre(None, images[k, 0]),
                labels[k, 0])[0] for k in range(K)]
w = counts / counts.sum()
expect = jax.tree.map(lambda *xs: np.tensordot(w, np.stack([np.asarray(x, np.float64) for x in xs]), 1),
                      *[(s.params, s.batch_stats) for s in trained])

mesh = Mesh(np.array(jax.devices()), ("clients",))
batch = {"image": images, "label": labels, "client": np.arange(K, dtype=np.int32), "weight": counts}
for loop in ("vmap", "unroll"):
  round_fn = rounds.parallel_round(functools.partial(fsteps.model_step, model, tx), tx, pre, mesh,
                                   reset=("model",), client_loop=loop)
  parts = {"model": fsteps.PartState.create(variables, tx)}
  out, metrics = round_fn(parts, {"model": fsteps.constants(variables)}, batch,
                          jnp.full((1,), LR), jax.random.key(0), jnp.int32(32))
  close((out["model"].params, out["model"].batch_stats), expect)
  assert float(metrics["count"]) == K * B
  assert len(out["model"].params["head"]["kernel"].sharding.device_set) == 4
  print(loop, "matches numpy")
print("OK")
"""


SEQUENTIAL = SETUP + """
K = 4
images = rng.integers(0, 256, size=(K, E, B, 32, 32, 3)).astype(np.uint8)
labels = rng.integers(0, 10, size=(K, E, B)).astype(np.int32)
order = np.array([2, 0, 3, 1], np.int32)  # client ids of the rows (rows in visiting order)
counts = np.array([5.0, 1.0, 2.0, 4.0], np.float32)
sm = fsplit.split_model(model, 2)
cv, sv = sm.split(variables)
consts = {"client": fsteps.constants(cv), "server": fsteps.constants(sv)}
fresh = lambda: {"client": fsteps.PartState.create(cv, tx), "server": fsteps.PartState.create(sv, tx)}

# Reference: the algorithm as a plain loop on one device.
clients = [fresh()["client"] for _ in range(K)]
server = fresh()["server"]
for t in range(E):
  xs = [pre(None, images[i, t]) for i in range(K)]
  grads = {}
  for i in range(K):  # server turns in the round's order
    h, _, _ = fsteps.client_forward(sm, clients[i], consts["client"], xs[i])
    server, grads[i], _ = fsteps.server_step(sm, tx, server, consts["server"], h, labels[i, t],
                                             jnp.float32(LR), jnp.int32(32))
  for i in range(K):
    _, vjp, stats = fsteps.client_forward(sm, clients[i], consts["client"], xs[i])
    clients[i] = fsteps.client_update(tx, clients[i], vjp, stats, grads[i], jnp.float32(LR))
w = counts / counts.sum()
expect = jax.tree.map(lambda *xs: np.tensordot(w, np.stack([np.asarray(x, np.float64) for x in xs]), 1),
                      *[(c.params, c.batch_stats) for c in clients])

mesh = Mesh(np.array(jax.devices()), ("clients",))
round_fn = rounds.sequential_round(sm, tx, pre, mesh)
parts = jax.device_put(fresh(), NamedSharding(mesh, P()))
batch = {"image": images, "label": labels, "client": order, "weight": counts}
out, metrics = round_fn(parts, consts, batch, jnp.full((E,), LR), jax.random.key(0), jnp.int32(32))
close((out["client"].params, out["client"].batch_stats), expect)
close((out["server"].params, out["server"].batch_stats), (server.params, server.batch_stats))
assert float(metrics["count"]) == K * E * B
print("OK")
"""


def test_sequential_server_on_four_devices_equals_a_plain_loop(on_devices):
  on_devices(SEQUENTIAL, devices=4)


def test_one_client_split_training_equals_centralized(on_devices):
  out = on_devices(EXACT, devices=4)
  assert "splitfed matches centralized" in out and "sequential matches centralized" in out


def test_fedavg_round_equals_numpy_weighted_average_of_clients(on_devices):
  out = on_devices(FEDAVG, devices=4)
  assert "vmap matches numpy" in out and "unroll matches numpy" in out
