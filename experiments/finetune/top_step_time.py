"""Step time and compiled memory of MeZO over the model's top, on activations cached below.

For each k (seed 0's k-shot draw of SST-2, the label head): the MeZO step
(``mezo.make_step``, n = 1, as ``picpq finetune`` builds it) over the head alone
(``--zo-part head``), the head and the top 1 or 2 encoder blocks (``--zo-layers``),
and ``--zo-part ffn`` (LoRA r 8 on the top block's feed-forward output, its LayerNorm
and the head), each at batch 16 and at the full batch of 2k examples: the median of
``--repeats`` timed steps after one warm-up, the compiled step's arguments and
temporaries (``memory_analysis()``) and the bytes of the cached activations. One
process, the variants round-robin per repeat. Writes ``results/top_step_time.json``.

    PYTHONPATH=. python -m experiments.finetune.top_step_time --data ../shared/data/sst2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import cpu_model
from picpq_jax.finetune import heads, mezo, peft
from picpq_jax.finetune.bert import BertClassifier, init_classifier
from picpq_jax.finetune.pretrained import load_minilm, load_tokenizer
from picpq_jax.finetune.text import TextDataset, TokenCache, k_shot, load_tsv, sst2_paths

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("It was terrible.", "It was great.")


def variant(model, start, train_tok, name):
  """``(rows, loss_fn, method)`` of one variant, as ``picpq finetune`` builds them."""
  n = model.config.num_layers
  if name == "ffn":
    rows, loss_fn = heads.ffn_loss(model, start, train_tok, 16.0)
    return rows, loss_fn, heads.ffn_method(n, 8, 16.0)[0]
  layers = {"head": 0, "head+1 block": 1, "head+2 blocks": 2}[name]
  rows, loss_fn = heads.embedded_loss(model, start, train_tok, 0.0, layers)
  return rows, loss_fn, peft.only(heads.top_pattern(layers, n), "head")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--ks", default="16,64")
  parser.add_argument("--variants", default="head,ffn,head+1 block,head+2 blocks")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  t0 = time.time()
  train_all = load_tsv(sst2_paths(args.data).train)
  pre, cache = load_minilm(None), TokenCache(load_tokenizer(None))
  model = BertClassifier(pre.config, 2, "sentence")
  params = init_classifier(jax.random.key(0), model, pre.params)
  tokenize = lambda texts: cache(TextDataset(tuple(texts), np.zeros(len(texts), np.int32)), 64)  # noqa: E731
  out = []
  for k in (int(v) for v in args.ks.split(",")):
    train_tok = cache(k_shot(train_all, k, 0), 64)
    start = heads.start_head("labels", model, params, tokenize, train_tok, prompts=PROMPTS)
    runs = []
    for name in args.variants.split(","):
      rows, loss_fn, method = variant(model, start, train_tok, name)
      frozen, theta = method.init(jax.random.key(1), start)
      step = mezo.make_step(loss_fn, method, donate=False)
      for size in (16, 2 * k):
        batch = {"input_ids": jnp.asarray(rows.input_ids[:size]),
                 "attention_mask": jnp.asarray(rows.attention_mask[:size]),
                 "label": jnp.asarray(rows.labels[:size])}
        lr = jnp.float32(1e-4)
        compiled = step.step.lower(frozen, theta, batch, jax.random.key(0), lr).compile()
        mem = compiled.memory_analysis()
        jax.block_until_ready(compiled(frozen, theta, batch, jax.random.key(0), lr))
        runs.append({"k": k, "variant": name, "batch": size, "compiled": compiled,
                     "args": (frozen, theta, batch), "times": [],
                     "trainable_params": peft.trainable_count(theta),
                     "cache_bytes": loss_fn.cache_bytes,
                     "argument_bytes": mem.argument_size_in_bytes,
                     "temp_bytes": mem.temp_size_in_bytes})
    for i in range(args.repeats):  # round-robin: load drifts hit every variant alike
      for r in runs:
        frozen, theta, batch = r["args"]
        t = time.perf_counter()
        jax.block_until_ready(r["compiled"](frozen, theta, batch, jax.random.key(i + 1), lr))
        r["times"].append(time.perf_counter() - t)
    for r in runs:
      r.pop("compiled"), r.pop("args")
      r["median_step_s"] = statistics.median(r["times"])
      print(f"k={k} {r['variant']:14s} batch {r['batch']:4d}: {r['median_step_s'] * 1e3:8.1f} ms"
            f"  args {r['argument_bytes'] / 2**20:6.1f} MiB temp {r['temp_bytes'] / 2**20:6.1f}"
            f" MiB cache {r['cache_bytes'] / 2**20:6.1f} MiB"
            f"  trainable {r['trainable_params']:,}", flush=True)
      out.append(r)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "top_step_time.json").write_text(json.dumps({
      "command": "python -m experiments.finetune.top_step_time " + shlex.join(sys.argv[1:]),
      "cpu": cpu_model(), "load": os.getloadavg(), "wall_time_s": time.time() - t0,
      "rows": out}, indent=1))


if __name__ == "__main__":
  main()
