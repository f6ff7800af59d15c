"""Text data: labelled sentences (SST-2 or any TSV) and a character-level corpus.

Sentences: :func:`load_tsv` reads ``sentence<TAB>label`` files with a header
line (GLUE's SST-2 layout), :func:`k_shot` draws k examples per class by seed,
:class:`TokenCache` tokenizes a dataset once per ``max_len`` and keeps the
arrays in memory, and :func:`text_batches` iterates them in a seeded order
(the order of :func:`picpq_jax.data.batch_indices`, so step ``k`` of a resumed
run is the batch an uninterrupted run would have seen).

Characters: :class:`CharVocab` maps a text's characters to ids and back,
:func:`split_ids` cuts the ids into train/validation, and
:func:`random_windows` draws next-token training windows with a ``jax.random``
key (jitted).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.data.embedded import embedded_text_dir
from picpq_jax.data.pipeline import batch_indices, steps_per_epoch
from picpq_jax.errors import UserError

MAX_LABEL = 9999  # the largest class id a TSV label may hold

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
  """Labelled sentences in host memory.

  Attributes:
    sentences: N strings.
    labels: int32 [N], class ids in ``[0, num_classes)``.
    source: where they came from (for messages).
  """
  sentences: tuple[str, ...]
  labels: np.ndarray
  source: str = ""

  def __len__(self) -> int:
    return len(self.sentences)

  @property
  def num_classes(self) -> int:
    """``max(label) + 1`` (0 for an empty set)."""
    return int(self.labels.max()) + 1 if len(self.labels) else 0

  def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
    """The examples at ``indices``, in that order."""
    indices = np.asarray(indices, np.int64)
    return TextDataset(tuple(self.sentences[i] for i in indices), self.labels[indices],
                       self.source)


def load_tsv(path: str | os.PathLike) -> TextDataset:
  """Reads a ``sentence<TAB>label`` file whose first line is a header.

  Every later line holds a non-empty sentence, one tab, and an integer label
  in ``0..MAX_LABEL`` (ASCII digits) (surrounding spaces of the sentence are stripped; blank lines
  are skipped). No quoting: a sentence must not contain a tab.

  Args:
    path: the ``.tsv`` file (e.g. SST-2's ``train.tsv``).

  Returns:
    :class:`TextDataset` with the rows in file order.

  Raises:
    UserError: the file is missing, has no header, or a row is malformed
      (the message names file and line number).
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"{path} not found: pass a tab-separated file with a header line "
                    "'sentence<TAB>label'")
  lines = path.read_text(encoding="utf-8").splitlines()
  if not lines or len(lines[0].split("\t")) != 2 or lines[0].split("\t")[1].strip().isdigit():
    raise UserError(f"{path}:1: the first line must be a two-column header such as "
                    "'sentence<TAB>label'")
  sentences, labels = [], []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if (len(fields) != 2 or not fields[0].strip()
        or not re.fullmatch(r"[0-9]{1,%d}" % len(str(MAX_LABEL)), fields[1].strip())
        or int(fields[1]) > MAX_LABEL):
      raise UserError(f"{path}:{number}: expected 'sentence<TAB>label' with a non-empty "
                      f"sentence and an integer label in 0..{MAX_LABEL}, got {line[:60]!r}")
    sentences.append(fields[0].strip())
    labels.append(int(fields[1]))
  return TextDataset(tuple(sentences), np.asarray(labels, np.int32), str(path))


def _resolve(data: str | os.PathLike) -> Path:
  """``"embedded"`` -> the bundled text folder; any other path as a Path."""
  return embedded_text_dir() if str(data) == "embedded" else Path(data).expanduser()


class SST2Paths(NamedTuple):
  """The two SST-2 files."""
  train: Path
  dev: Path


def sst2_paths(data: str | os.PathLike) -> SST2Paths:
  """SST-2's ``train.tsv`` and ``dev.tsv`` under ``data``.

  Args:
    data: the ``sst2`` folder itself, or a folder holding ``sst2/`` (such as
      ``../shared/data``); ``"embedded"``: the sample that ships in the package.

  Raises:
    UserError: neither layout holds both files.
  """
  data = _resolve(data)
  for folder in (data, data / "sst2"):
    paths = SST2Paths(folder / "train.tsv", folder / "dev.tsv")
    if paths.train.is_file() and paths.dev.is_file():
      return paths
  raise UserError(f"no SST-2 train.tsv and dev.tsv in {data} or {data / 'sst2'}: pass the "
                  "folder holding them (GLUE SST-2, header 'sentence<TAB>label')")


def k_shot(ds: TextDataset, k: int, seed: int) -> TextDataset:
  """k examples of every class, drawn without replacement by ``seed``.

  For each class c (ascending), ``np.random.default_rng([seed, c])`` permutes
  that class's indices and the first k are kept; the result is sorted by
  index (file order), so it is a function of ``(ds, k, seed)`` only and a
  larger k with the same seed keeps every example of a smaller one.

  Args:
    ds: the full set.
    k: examples per class, >= 1.
    seed: a non-negative int.

  Returns:
    ``k * num_classes`` examples.

  Raises:
    UserError: k < 1, or a class with fewer than k examples.
  """
  if k < 1:
    raise UserError(f"k must be at least 1 example per class, got {k}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserError(f"seed must be a non-negative int, got {seed!r}")
  chosen = []
  for c in range(ds.num_classes):
    members = np.flatnonzero(ds.labels == c)
    if len(members) < k:
      raise UserError(f"class {c} of {ds.source or 'the dataset'} has {len(members)} "
                      f"examples, fewer than k={k}; lower k")
    chosen.append(members[np.random.default_rng([seed, c]).permutation(len(members))[:k]])
  return ds.subset(np.sort(np.concatenate(chosen)))


def held_out(ds: TextDataset, exclude: TextDataset, size: int, seed: int = 0) -> TextDataset:
  """A fixed sample of ``size`` examples of ``ds`` whose sentences are not in
  ``exclude`` (in file order): a validation split carved from training data.

  The candidates (every example whose sentence text does not occur in ``exclude``,
  so duplicates of a training sentence are left out too) are permuted by
  ``np.random.default_rng([seed, 2])`` and the first ``size`` kept (all when
  ``size`` is 0 or larger than the candidates).
  """
  taken = set(exclude.sentences)
  candidates = np.array([i for i, s in enumerate(ds.sentences) if s not in taken], np.int64)
  chosen = candidates[np.random.default_rng([seed, 2]).permutation(len(candidates))]
  return ds.subset(np.sort(chosen[:size] if size else chosen))


class Tokenizer(Protocol):
  """What :class:`TokenCache` needs (``BertTokenizer`` is one)."""

  def __call__(self, texts: Sequence[str], max_len: int, pad_to_longest: bool = False
              ) -> dict[str, np.ndarray]:
    ...


class TokenizedText(NamedTuple):
  """A tokenized :class:`TextDataset`.

  Attributes:
    input_ids: int32 [N, L].
    attention_mask: int32 [N, L].
    labels: int32 [N].
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray


class TokenCache:
  """Tokenizes each (dataset, ``max_len``) once and keeps the arrays in memory.

  Datasets are keyed by their sentences, so equal subsets share an entry.
  The length L is the dataset's longest tokenized sentence capped at
  ``max_len`` (``pad_to_max=False``, less compute for short sentences) or
  ``max_len`` exactly; either way every batch of one dataset has one shape.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self._cache: dict[tuple, TokenizedText] = {}

  def __call__(self, ds: TextDataset, max_len: int, pad_to_max: bool = False
              ) -> TokenizedText:
    """The :class:`TokenizedText` of ``ds`` (computed on first use)."""
    key = (ds.sentences, max_len, pad_to_max)
    if key not in self._cache:
      batch = self.tokenizer(ds.sentences, max_len, pad_to_longest=not pad_to_max)
      self._cache[key] = TokenizedText(batch["input_ids"], batch["attention_mask"],
                                       np.asarray(ds.labels, np.int32))
    cached = self._cache[key]
    return cached._replace(labels=np.asarray(ds.labels, np.int32))

  def __len__(self) -> int:
    return len(self._cache)


def _gather(data: TokenizedText, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Rows at ``indices`` int [B] (``-1``: padding, all zeros, mask False)."""
  valid = indices >= 0
  safe = np.where(valid, indices, 0)
  batch = {"input_ids": data.input_ids[safe] * valid[:, None],
           "attention_mask": data.attention_mask[safe] * valid[:, None],
           "label": data.labels[safe] * valid, "mask": valid}
  return batch


def text_batches(data: TokenizedText, batch_size: int, seed: int, start_step: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True,
                 epochs: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches of a tokenized dataset, epoch after epoch, from ``start_step`` on.

  Step ``s`` is batch ``s % S`` of epoch ``s // S`` (``S`` batches per
  epoch), in the order :func:`picpq_jax.data.batch_indices` gives for
  ``(seed, epoch)``.

  Args:
    data: N examples.
    batch_size: B.
    seed: a non-negative int; the same seed gives the same batches.
    start_step: first step to yield (resume).
    shuffle: permute the examples every epoch; False keeps file order.
    drop_remainder: drop each epoch's last partial batch; otherwise it is
      padded with rows whose ``mask`` is False (``attention_mask`` all 0).
    epochs: stop after this many epochs; None: endless.

  Returns:
    An iterator of ``{"input_ids": int32 [B, L], "attention_mask": int32
    [B, L], "label": int32 [B], "mask": bool [B]}``.
  """
  if start_step < 0:
    raise UserError(f"start_step must be non-negative, got {start_step}")
  steps = steps_per_epoch(len(data.labels), batch_size, drop_remainder)
  batch_indices(len(data.labels), batch_size, seed, 0, shuffle, drop_remainder)  # Validates.
  return _text_batches(data, batch_size, seed, start_step, shuffle, drop_remainder,
                       steps * epochs if epochs is not None else None, steps)


def _text_batches(data, batch_size, seed, step, shuffle, drop_remainder, stop, steps):
  epoch, order = -1, None
  while stop is None or step < stop:
    if step // steps != epoch:
      epoch = step // steps
      order = batch_indices(len(data.labels), batch_size, seed, epoch, shuffle, drop_remainder)
    yield _gather(data, order[step % steps])
    step += 1


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: Sequence[int]
                   ) -> dict[str, np.ndarray]:
  """``batch`` with ``input_ids`` and ``attention_mask`` ``[..., L]`` cut to ``[...,
  L']``, ``L'`` the smallest of ``buckets`` that holds the batch's longest sentence
  (``L`` when none below ``L`` does). Padding is on the right, so only padding is cut
  and a model that masks it gives the same outputs; other entries are unchanged."""
  length = batch["input_ids"].shape[-1]
  longest = int(np.max(np.sum(batch["attention_mask"] != 0, axis=-1), initial=0))
  cut = min([b for b in buckets if longest <= b < length], default=length)
  if cut == length:
    return batch
  return {**batch, "input_ids": batch["input_ids"][..., :cut],
          "attention_mask": batch["attention_mask"][..., :cut]}


def eval_text_batches(data: TokenizedText, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass in order, every example once; the last batch padded (``mask`` False)."""
  return text_batches(data, batch_size, seed=0, shuffle=False, drop_remainder=False, epochs=1)


# ---------------------------------------------------------------------------
# Character-level corpus (tinyshakespeare).


def load_text(path: str | os.PathLike) -> str:
  """A UTF-8 text file's contents; UserError naming the path when missing or empty."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"{path} not found: pass a UTF-8 text file (e.g. tinyshakespeare.txt)")
  text = path.read_text(encoding="utf-8")
  if not text:
    raise UserError(f"{path} is empty: pass a text with some characters")
  return text


def tinyshakespeare_path(data: str | os.PathLike) -> Path:
  """``tinyshakespeare.txt`` in ``data``, ``data/text`` (e.g. ``../shared/data``), or ``data`` itself;
  ``"embedded"``: the first 100,000 characters that ship in the package."""
  data = _resolve(data)
  for path in (data, data / "tinyshakespeare.txt", data / "text" / "tinyshakespeare.txt"):
    if path.is_file():
      return path
  raise UserError(f"no tinyshakespeare.txt at {data}, {data}/tinyshakespeare.txt or "
                  f"{data}/text/tinyshakespeare.txt: pass the file or its folder")


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """A character vocabulary: id ``i`` is ``chars[i]`` (sorted unique characters).

  Attributes:
    chars: the characters, each once.
  """
  chars: str

  @classmethod
  def from_text(cls, text: str) -> CharVocab:
    """The sorted set of ``text``'s characters."""
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    """Number of ids (the model's vocabulary size)."""
    return len(self.chars)

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {c: i for i, c in enumerate(self.chars)}

  def encode(self, text: str) -> np.ndarray:
    """int32 [len(text)] ids; UserError on a character outside the vocabulary."""
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise UserError(f"character {e.args[0]!r} is not in the vocabulary of "
                      f"{self.size} characters; build the vocabulary from a text "
                      "that contains it") from None

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of ids int [T]."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise UserError(f"ids must lie in [0, {self.size}), got range "
                      f"[{ids.min()}, {ids.max()}]")
    return "".join(self.chars[i] for i in ids.reshape(-1))


def split_ids(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous split: the first ``1 - val_fraction`` for training, the rest validation.

  Args:
    ids: int [N].
    val_fraction: in (0, 1).

  Returns:
    ``(train [N - V], val [V])`` with ``V = int(N * val_fraction)``.
  """
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"val_fraction must lie in (0, 1), got {val_fraction}")
  cut = len(ids) - int(len(ids) * val_fraction)
  return ids[:cut], ids[cut:]


@functools.partial(jax.jit, static_argnames=("batch_size", "context"))
def random_windows(key: Array, ids: Array, batch_size: int, context: int
                  ) -> tuple[Array, Array]:
  """Random next-token windows: inputs and the same windows shifted by one.

  Starts are ``jax.random.randint(key, (B,), 0, N - T)``; row b is
  ``x = ids[s_b : s_b + T]``, ``y = ids[s_b + 1 : s_b + T + 1]``.

  Args:
    key: PRNG key.
    ids: int [N] with N > T.
    batch_size: B.
    context: T, the window length.

  Returns:
    ``(x, y)``, each int32 [B, T].
  """
  if ids.shape[0] <= context:
    raise UserError(f"the text has {ids.shape[0]} ids, not more than the context of "
                    f"{context}; lower the context")
  starts = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - context)
  window = lambda s: jax.lax.dynamic_slice(ids, (s,), (context + 1,))
  rows = jax.vmap(window)(starts).astype(jnp.int32)
  return rows[:, :-1], rows[:, 1:]
