"""Compiled memory of one fine-tuning step per method, on an all-MiniLM-L6-v2-sized model.

Nothing is trained and no weights are loaded: the step of each method is compiled for
the shapes of a :class:`~picpq_jax.finetune.BertClassifier` with the MiniLM config
(22.7M parameters, 2 classes) and a batch of ``B`` sequences of ``L`` tokens, and
XLA's buffer assignment (``memory_analysis()``) is read. The buffers do not depend on
the weights' values, so this is the memory the real run's step needs; the real run
(accuracy, step time, peak RSS) is the integration experiment's business.

Command (from the repo root):

    .venv/bin/python -m experiments.finetune.method_memory [--batch 16] [--length 64]

prints a table and writes ``experiments/finetune/results/method_memory.json``.
``--small`` uses a 2-layer, 128-wide model with a 1,000-word vocabulary instead;
``--dropout`` trains with the model's dropout (off by default, as in MeZO's runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from picpq_jax.federated.comm import tree_bytes
from picpq_jax.finetune import lora, mezo, peft, qlora
from picpq_jax.finetune.bert import BertClassifier, BertConfig
from picpq_jax.finetune.memory import compiled_memory

RESULTS = Path(__file__).resolve().parent / "results"
HEAD = "^head/"


def _loss(model, dropout: bool):
  def loss_fn(params, batch, key, prompt=None):
    train = dropout and key is not None
    logits = model.apply({"params": params}, batch["ids"], batch["mask"], prompt=prompt,
                         deterministic=not train, rngs={"dropout": key} if train else None)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss_fn


def _methods():
  return {
      "full": peft.full(),
      "bitfit": peft.bitfit(HEAD),
      "prompt": peft.train_also(peft.prompt(20), HEAD),
      "lora": peft.train_also(lora.method("query|value", 8, 16.0), HEAD),
      "qlora4": peft.train_also(qlora.method("query|value", 8, 16.0, bits=4), HEAD),
      "qlora8": peft.train_also(qlora.method("query|value", 8, 16.0, bits=8), HEAD),
  }


def measure(config: BertConfig, batch_size: int, length: int, dropout: bool) -> list[dict]:
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  batch = {"ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
           "mask": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  rows = []
  for remat in (False, True):
    model = BertClassifier(config, 2, remat=remat)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32),
                            jnp.ones((1, length), jnp.int32))["params"]
    loss_fn = _loss(model, dropout)
    for name, method in _methods().items():
      if remat and name not in ("full", "lora"):
        continue
      frozen, trainable = jax.eval_shape(method.init, jax.random.key(0), params)
      common = {"method": name, "remat_layers": remat,
                "trainable_params": peft.trainable_count(trainable),
                "frozen_bytes": tree_bytes(frozen), "trainable_bytes": tree_bytes(trainable)}
      policies = {"": False}
      if name.startswith("qlora") and not remat:
        policies["+recompute-dequantized"] = qlora.RECOMPUTE_DEQUANTIZED
      for suffix, policy in policies.items():
        train = peft.make_train_step(loss_fn, optax.adam(1e-4), method, remat=policy)
        state = jax.eval_shape(train.init, trainable)
        rows.append({**common, "method": name + suffix, "optimizer": "adam",
                     "opt_state_bytes": tree_bytes(state),
                     **compiled_memory(train.step, frozen, trainable, state, batch, key)})
      if name in ("full", "lora") and not remat:
        zo = mezo.make_step(loss_fn, method, eps=1e-3, n=1)
        lr = jax.ShapeDtypeStruct((), jnp.float32)
        rows.append({**common, "method": f"mezo-{name}", "optimizer": "zeroth-order",
                     "opt_state_bytes": 0,
                     **compiled_memory(zo.step, frozen, trainable, batch, key, lr)})
    if not remat:  # the floor: one forward pass (evaluation)
      forward = jax.jit(lambda p, b: loss_fn(p, b, None))
      rows.append({"method": "inference", "remat_layers": False, "optimizer": "-",
                   "trainable_params": 0, "frozen_bytes": tree_bytes(params),
                   "trainable_bytes": 0, "opt_state_bytes": 0,
                   **compiled_memory(forward, params, batch)})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--dropout", action="store_true",
                      help="train with the model's dropout (its masks' random bits need "
                           "temporaries of their own)")
  args = parser.parse_args()
  config = (BertConfig(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4,
                       intermediate_size=512) if args.small else BertConfig())
  rows = measure(config, args.batch, args.length, args.dropout)
  mib = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
  print(f"{'method':34} {'remat':5} {'trainable':>10} {'args MiB':>8} {'temp MiB':>8} "
        f"{'peak MiB':>8}")
  for r in rows:
    print(f"{r['method']:34} {str(r['remat_layers']):5} {r['trainable_params']:10d} "
          f"{mib(r['argument_bytes'])} {mib(r['temp_bytes'])} {mib(r['peak_bytes'])}")
  RESULTS.mkdir(parents=True, exist_ok=True)
  name = "method_memory" + ("_small" if args.small else "") + ("_dropout" if args.dropout else "")
  out = RESULTS / f"{name}.json"
  out.write_text(json.dumps({"batch": args.batch, "length": args.length, "dropout": args.dropout,
                             "config": dataclasses.asdict(config),
                             "backend": jax.default_backend(), "jax": jax.__version__,
                             "machine": platform.machine(), "rows": rows}, indent=1))
  print("wrote", out)


if __name__ == "__main__":
  main()
