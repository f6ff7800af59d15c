"""Which start: label prompts (zero-shot) and ridge probes, scored on training data.

The label-prompt head and the ridge probe of :mod:`picpq_jax.finetune.heads` are
scored on ``--eval-size`` sentences of SST-2's ``train.tsv`` outside the k-shot
training examples of ``--seed`` (:func:`picpq_jax.finetune.text.held_out`, as
``picpq finetune --eval-split train``); dev is not read. Every sentence is embedded
once by the pretrained all-MiniLM-L6-v2.

Command (from the repo root; a few minutes on a loaded 2-core CPU):

    PYTHONPATH=. python -m experiments.finetune.starts --data ../shared/data/sst2

writes ``results/starts.json`` and ``results/starts.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from picpq_jax.finetune import heads
from picpq_jax.finetune.bert import BertEncoder
from picpq_jax.finetune.pretrained import load_minilm, load_tokenizer
from picpq_jax.finetune.text import TextDataset, TokenCache, held_out, k_shot, load_tsv, sst2_paths

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("terrible|great", "It was terrible.|It was great.",
           "This is a negative review.|This is a positive review.",
           "A bad movie.|A good movie.", "negative|positive")


def accuracy(dense: dict, x: np.ndarray, y: np.ndarray) -> float:
  logits = x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  return float(np.mean(logits.argmax(1) == y))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--ks", default="16,64")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--l2", default="0.1,1,10")
  parser.add_argument("--eval-size", type=int, default=500)
  parser.add_argument("--max-len", type=int, default=64)
  args = parser.parse_args()
  ks, seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
  l2s = [float(v) for v in args.l2.split(",")]
  train_all = load_tsv(sst2_paths(args.data).train)
  pre, cache = load_minilm(), TokenCache(load_tokenizer())
  encoder = BertEncoder(pre.config)
  embed = lambda ds: heads.sentence_embeddings(encoder, pre.params, cache(ds, args.max_len))  # noqa: E731
  texts = lambda t: TextDataset(tuple(t), np.zeros(len(t), np.int32))  # noqa: E731
  # The held-out sentences of the largest k-shot draw of seed 0 (a subset of every
  # smaller one's, since a larger k keeps every example of a smaller one).
  held = held_out(train_all, k_shot(train_all, max(ks), seeds[0]), args.eval_size)
  x_held, y_held = embed(held), held.labels
  out = {"prompts": {}, "probe": {}}
  for pair in PROMPTS:
    dense = heads.label_head(embed(texts(pair.split("|"))), 20.0)
    out["prompts"][pair] = accuracy(dense, x_held, y_held)
  taken = set(held.sentences)
  for k in ks:
    for seed in seeds:
      shots = k_shot(train_all, k, seed)
      keep = [i for i, s in enumerate(shots.sentences) if s not in taken]
      shots = shots.subset(keep)
      x = embed(shots)
      for l2 in l2s:
        acc = accuracy(heads.ridge_probe(x, shots.labels, 2, l2), x_held, y_held)
        out["probe"].setdefault(f"k={k} l2={l2:g}", []).append(acc)
  command = "python -m experiments.finetune.starts " + shlex.join(sys.argv[1:])
  lines = [f"# Starts scored on {len(held)} held-out training sentences\n",
           f"Command: `{command}`\n", "| label prompts (class 0 \\| class 1) | accuracy |",
           "|---|---|"]
  bar = " \\| "  # a "|" inside a markdown table cell
  lines += [f"| {p.replace('|', bar)} | {a:.3f} |" for p, a in out["prompts"].items()]
  lines += ["", f"| ridge probe | accuracy, seeds {args.seeds} (mean) |", "|---|---|"]
  lines += [f"| {name} | {', '.join(f'{a:.3f}' for a in accs)} ({np.mean(accs):.3f}) |"
            for name, accs in out["probe"].items()]
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "starts.json").write_text(json.dumps({"command": command, **out}, indent=1))
  (RESULTS / "starts.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
