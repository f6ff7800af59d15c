"""Step time and compiled memory of MeZO over the model's top, on activations cached below.

For each k (seed 0's k-shot draw of SST-2, the label head): the MeZO step
(``mezo.make_step``, n = 1, as ``picpq finetune`` builds it) over the head alone
(``--zo-part head``), the head and the top 1 or 2 encoder blocks (``--zo-layers``),
and ``--zo-part ffn`` (LoRA r 8 on the top block's feed-forward output, its LayerNorm
and the head), each at batch 16 and at the full batch of 2k examples: the median of
``--repeats`` timed steps after one warm-up, the compiled step's arguments and
temporaries (``memory_analysis()``) and the bytes of the cached activations. One
process, the variants round-robin per repeat. Writes ``results/top_step_time.json``.

The whole-model variants ``norm`` (``--zo-part norm``), ``lora r1 qv`` and ``lora r1
ffn`` (``--zo-part lora --rank 1`` on query/value or on every block's feed-forward
output) run at batch 16 with the sequences cut (or padded) to each of ``--lengths``
and to the k-shot set's own longest (what every step cost before ``--zo-buckets``);
``bucket_shares_batch16`` says how often each cut length comes up in the run's
batches, so their mix gives the mean step:

    PYTHONPATH=. python -m experiments.finetune.top_step_time --data ../shared/data/sst2 \
        --ks 16 --variants 'norm,lora r1 qv,lora r1 ffn' --name whole_step_time
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
from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.finetune.pretrained import load_minilm, load_tokenizer
from picpq_jax.finetune.run import build_method, classifier_loss
from picpq_jax.finetune.text import (TextDataset, TokenCache, k_shot, load_tsv, sst2_paths,
                                     text_batches, trim_to_bucket)

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("It was terrible.", "It was great.")
# --zo-part norm and lora (rank 1) through the whole model: (part, rank, targets)
WHOLE = {"norm": ("norm", 8, "query|value"), "lora r1 qv": ("lora", 1, "query|value"),
         "lora r1 ffn": ("lora", 1, "mlp/output")}


def at_length(rows, size: int, length: int) -> dict:
  """The first ``size`` rows cut or zero-padded to ``length`` tokens (shapes for timing)."""
  def fit(a):
    a = a[:size, :length]
    return jnp.asarray(np.pad(a, ((0, 0), (0, length - a.shape[1]))))
  return {"input_ids": fit(rows.input_ids), "attention_mask": fit(rows.attention_mask),
          "label": jnp.asarray(rows.labels[:size])}


def bucket_shares(train_tok, batch: int, buckets, seed: int = 0, steps: int = 2000) -> dict:
  """How often each cut length comes up over ``steps`` of ``picpq finetune``'s batches."""
  lengths = [trim_to_bucket(b, buckets)["input_ids"].shape[1]
             for _, b in zip(range(steps), text_batches(train_tok, batch, seed))]
  return {int(v): lengths.count(v) / steps for v in sorted(set(lengths))}


def variant(model, start, train_tok, name):
  """``(rows, loss_fn, method)`` of one variant, as ``picpq finetune`` builds them."""
  n = model.config.num_layers
  if name in WHOLE:  # the whole model's forward on the tokens
    part, rank, targets = WHOLE[name]
    method = build_method(part, FinetuneConfig(rank=rank, targets=targets))
    return train_tok, classifier_loss(model), method
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
  parser.add_argument("--lengths", default="16,32,64", help="whole-model variants (norm, "
                      "lora r1 qv, lora r1 ffn): batch 16 cut or padded to these token "
                      "lengths, besides the k-shot set's own longest")
  parser.add_argument("--name", default="top_step_time", help="results/<name>.json")
  args = parser.parse_args()
  args.lengths = [int(v) for v in args.lengths.split(",")]
  t0 = time.time()
  train_all = load_tsv(sst2_paths(args.data).train)
  pre, cache = load_minilm(None), TokenCache(load_tokenizer(None))
  model = BertClassifier(pre.config, 2, "sentence")
  params = init_classifier(jax.random.key(0), model, pre.params)
  tokenize = lambda texts: cache(TextDataset(tuple(texts), np.zeros(len(texts), np.int32)), 64)  # noqa: E731
  out, shares = [], {}
  for k in (int(v) for v in args.ks.split(",")):
    train_tok = cache(k_shot(train_all, k, 0), 64)
    shares[k] = bucket_shares(train_tok, 16, FinetuneConfig().buckets)
    start = heads.start_head("labels", model, params, tokenize, train_tok, prompts=PROMPTS)
    runs = []
    for name in args.variants.split(","):
      rows, loss_fn, method = variant(model, start, train_tok, name)
      frozen, theta = method.init(jax.random.key(1), start)
      step = mezo.make_step(loss_fn, method, donate=False)
      shapes = ([(16, n) for n in sorted({*args.lengths, rows.input_ids.shape[1]})]
                if name in WHOLE else [(16, None), (2 * k, None)])
      for size, length in shapes:
        batch = (at_length(rows, size, length) if length else
                 {"input_ids": jnp.asarray(rows.input_ids[:size]),
                  "attention_mask": jnp.asarray(rows.attention_mask[:size]),
                  "label": jnp.asarray(rows.labels[:size])})
        lr = jnp.float32(1e-4)
        compiled = step.step.lower(frozen, theta, batch, jax.random.key(0), lr).compile()
        mem = compiled.memory_analysis()
        jax.block_until_ready(compiled(frozen, theta, batch, jax.random.key(0), lr))
        runs.append({"k": k, "variant": name, "batch": size, "tokens": batch["input_ids"].shape[1],
                     "compiled": compiled,
                     "args": (frozen, theta, batch), "times": [],
                     "trainable_params": peft.trainable_count(theta),
                     "cache_bytes": getattr(loss_fn, "cache_bytes", 0),
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
      print(f"k={k} {r['variant']:14s} batch {r['batch']:4d} x {r['tokens']:3d}: "
            f"{r['median_step_s'] * 1e3:8.1f} ms"
            f"  args {r['argument_bytes'] / 2**20:6.1f} MiB temp {r['temp_bytes'] / 2**20:6.1f}"
            f" MiB cache {r['cache_bytes'] / 2**20:6.1f} MiB"
            f"  trainable {r['trainable_params']:,}", flush=True)
      out.append(r)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{args.name}.json").write_text(json.dumps({
      "command": "python -m experiments.finetune.top_step_time " + shlex.join(sys.argv[1:]),
      "cpu": cpu_model(), "load": os.getloadavg(), "wall_time_s": time.time() - t0,
      "bucket_shares_batch16": shares, "rows": out}, indent=1))


if __name__ == "__main__":
  main()
