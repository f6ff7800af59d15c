"""A tiny BERT weights folder and a tiny SST-2-like dataset for the run/command tests.

The folder holds what :func:`picpq_jax.finetune.load_minilm` reads (random weights
with Hugging Face names from ``conftest.random_hf_bert``, a ``config.json`` and a
word-piece ``tokenizer.json`` built with the ``tokenizers`` package), so
``picpq finetune --weights <folder>`` runs end to end in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.finetune.conftest import random_hf_bert

HIDDEN, LAYERS, INTER, HEADS, POSITIONS = 16, 2, 32, 4, 32
WORDS = ("the a movie film is was good great fun lovely bad awful boring dull "
         "very not quite plot actors").split()
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = len(SPECIAL) + len(WORDS)
POSITIVE, NEGATIVE = ("good", "great", "fun", "lovely"), ("bad", "awful", "boring", "dull")


def make_weights(folder: Path) -> Path:
  """Writes model.safetensors, config.json and tokenizer.json into ``folder``."""
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  folder.mkdir(parents=True, exist_ok=True)
  tensors = random_hf_bert(np.random.default_rng(0), vocab=VOCAB, hidden=HIDDEN,
                           layers=LAYERS, inter=INTER, positions=POSITIONS)
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({
      "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
      "num_attention_heads": HEADS, "intermediate_size": INTER,
      "max_position_embeddings": POSITIONS, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
      "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
      "pad_token_id": 0}))
  vocab = {w: i for i, w in enumerate(SPECIAL + tuple(WORDS))}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
  tok.save(str(folder / "tokenizer.json"))
  return folder


def _sentences(rng: np.random.Generator, n: int, words: tuple[str, ...], label: int
               ) -> list[str]:
  return [f"the {rng.choice(['movie', 'film'])} was {'very ' * int(rng.integers(0, 3))}"
          f"{rng.choice(words)}\t{label}" for _ in range(n)]


def make_sst2(folder: Path, per_class: int = 16) -> Path:
  """train.tsv and dev.tsv (``per_class`` sentences of each label, header first)."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  for name in ("train", "dev"):
    rows = _sentences(rng, per_class, POSITIVE, 1) + _sentences(rng, per_class, NEGATIVE, 0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
  return folder


def bert_param_count() -> int:
  """Parameters of the tiny encoder, counted from the sizes (no pooler)."""
  embeddings = (VOCAB + POSITIONS + 2) * HIDDEN + 2 * HIDDEN
  layer = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * (HIDDEN * INTER) + INTER + HIDDEN + 4 * HIDDEN
  return embeddings + LAYERS * layer
