"""Sentence TSVs, k-shot sampling, token cache, batching, and the character corpus."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from picpq_jax.errors import UserError
from picpq_jax.finetune import (CharVocab, TextDataset, TokenCache, TokenizedText,
                                eval_text_batches, k_shot, load_text, load_tsv, random_windows,
                                split_ids, sst2_paths, text_batches, tinyshakespeare_path)
from picpq_jax.finetune.text import trim_to_bucket
from tests.conftest import SHARED_DATA, require


def write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def labelled(labels) -> TextDataset:
  labels = np.asarray(labels, np.int32)
  return TextDataset(tuple(f"s{i}" for i in range(len(labels))), labels, "test")


# --- TSV ----------------------------------------------------------------------


def test_tsv_rows_in_order_header_and_blank_lines_skipped(tmp_path):
  path = write(tmp_path / "a.tsv", "sentence\tlabel\nit 's good \t1\n\nbad , bad\t0\nmeh\t2\n")
  ds = load_tsv(path)
  assert ds.sentences == ("it 's good", "bad , bad", "meh")
  np.testing.assert_array_equal(ds.labels, [1, 0, 2])
  assert ds.labels.dtype == np.int32 and ds.num_classes == 3 and len(ds) == 3


@pytest.mark.parametrize("row", ["no tab here", "two\ttabs\t1", "label\tx", "\t1", "neg\t-1"])
def test_malformed_row_names_file_and_line(tmp_path, row):
  path = write(tmp_path / "bad.tsv", f"sentence\tlabel\nfine\t0\n{row}\nfine\t1\n")
  with pytest.raises(UserError, match=rf"bad\.tsv:3: expected"):
    load_tsv(path)


def test_missing_header_or_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match=r"x\.tsv:1: the first line must be a two-column header"):
    load_tsv(write(tmp_path / "x.tsv", "good movie\t1\n"))
  with pytest.raises(UserError, match="not found"):
    load_tsv(tmp_path / "absent.tsv")


def test_sst2_paths_accepts_the_folder_or_its_parent(tmp_path):
  folder = tmp_path / "sst2"
  folder.mkdir()
  for name in ("train.tsv", "dev.tsv"):
    write(folder / name, "sentence\tlabel\nx\t0\n")
  assert sst2_paths(tmp_path).train == folder / "train.tsv"
  assert sst2_paths(folder).dev == folder / "dev.tsv"
  with pytest.raises(UserError, match="no SST-2 train.tsv"):
    sst2_paths(tmp_path / "nowhere")


def test_real_sst2_row_counts():
  paths = sst2_paths(require(SHARED_DATA / "sst2"))
  train, dev = load_tsv(paths.train), load_tsv(paths.dev)
  # ../shared/data/README.md: 60,614 train and 6,735 dev lines, labels 0/1.
  assert (len(train), len(dev)) == (60_614, 6_735)
  assert set(np.unique(train.labels)) == set(np.unique(dev.labels)) == {0, 1}


# --- k-shot ---------------------------------------------------------------------


def test_k_shot_counts_determinism_and_nesting():
  ds = labelled([0, 1, 1, 0, 2, 2, 2, 1, 0, 0, 1, 2, 0])
  few = k_shot(ds, 3, seed=5)
  np.testing.assert_array_equal(np.bincount(few.labels), [3, 3, 3])
  assert few.sentences == k_shot(ds, 3, seed=5).sentences
  assert set(k_shot(ds, 2, seed=5).sentences) <= set(few.sentences)
  assert any(k_shot(ds, 2, seed=s).sentences != k_shot(ds, 2, seed=5).sentences
             for s in range(6, 12))
  members = {s: int(l) for s, l in zip(ds.sentences, ds.labels)}
  assert all(members[s] == l for s, l in zip(few.sentences, few.labels))
  assert list(few.sentences) == sorted(few.sentences, key=ds.sentences.index)


def test_k_shot_too_large_is_a_user_error():
  with pytest.raises(UserError, match="class 1 .* fewer than k=3"):
    k_shot(labelled([0, 0, 0, 1, 1]), 3, seed=0)


# --- token cache and batches ---------------------------------------------------------


class CountingTokenizer:
  """ids = word lengths + 1; counts its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self, texts, max_len, pad_to_longest=False):
    self.calls += 1
    rows = [[len(w) + 1 for w in t.split()][:max_len] for t in texts]
    length = max(map(len, rows)) if pad_to_longest else max_len
    ids = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}


def test_token_cache_tokenizes_once_and_trims_to_the_longest():
  tok = CountingTokenizer()
  cache = TokenCache(tok)
  ds = TextDataset(("a bb", "ccc", "d e f g h"), np.array([0, 1, 0], np.int32))
  out = cache(ds, 4)
  np.testing.assert_array_equal(out.input_ids, [[2, 3, 0, 0], [4, 0, 0, 0], [2, 2, 2, 2]])
  assert cache(ds, 4) is not None and tok.calls == 1
  short = cache(TextDataset(ds.sentences[:2], ds.labels[:2]), 4)
  assert short.input_ids.shape == (2, 2) and tok.calls == 2
  assert cache(ds, 4, pad_to_max=True).input_ids.shape == (3, 4)
  relabelled = cache(TextDataset(ds.sentences, np.array([1, 1, 1], np.int32)), 4)
  np.testing.assert_array_equal(relabelled.labels, [1, 1, 1])
  assert tok.calls == 3


def fake_tokenized(n: int) -> TokenizedText:
  ids = np.arange(n, dtype=np.int32)[:, None] + np.array([[1, 100]], np.int32)
  return TokenizedText(ids, np.ones_like(ids), np.arange(n, dtype=np.int32) % 2)


def test_batches_cover_each_epoch_and_resume_exactly():
  data = fake_tokenized(10)
  stream = text_batches(data, 4, seed=3, drop_remainder=True)
  first = [next(stream) for _ in range(6)]  # 2 batches per epoch, 3 epochs.
  for epoch in range(3):
    seen = np.concatenate([b["input_ids"][:, 0] - 1 for b in first[2 * epoch:2 * epoch + 2]])
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))
  resumed = text_batches(data, 4, seed=3, start_step=3)
  for want in first[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_array_equal(first[0]["label"], (first[0]["input_ids"][:, 0] - 1) % 2)
  other = next(text_batches(data, 4, seed=4))
  assert not np.array_equal(other["input_ids"], first[0]["input_ids"])


def test_eval_batches_visit_each_example_once_with_a_padded_tail():
  batches = list(eval_text_batches(fake_tokenized(10), 4))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[2]["mask"], [True, True, False, False])
  np.testing.assert_array_equal(batches[2]["attention_mask"][2:], 0)
  real = np.concatenate([b["input_ids"][b["mask"], 0] - 1 for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))
  assert len(list(text_batches(fake_tokenized(10), 4, seed=0, epochs=2))) == 4


# --- characters -----------------------------------------------------------------------


def test_char_vocab_round_trip_and_hand_ids():
  vocab = CharVocab.from_text("hello")
  assert vocab.chars == "ehlo" and vocab.size == 4
  np.testing.assert_array_equal(vocab.encode("hello"), [1, 0, 2, 2, 3])
  assert vocab.decode([3, 2, 0]) == "ole"
  with pytest.raises(UserError, match="'z' is not in the vocabulary"):
    vocab.encode("hz")
  with pytest.raises(UserError, match="ids must lie"):
    vocab.decode([4])


def test_split_and_random_windows():
  train, val = split_ids(np.arange(100), 0.1)
  assert (len(train), len(val)) == (90, 10) and val[0] == 90
  ids = np.arange(50, dtype=np.int32)
  x, y = random_windows(jax.random.key(0), ids, batch_size=6, context=8)
  assert x.shape == y.shape == (6, 8)
  np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(x)[:, :-1] + 1)
  np.testing.assert_array_equal(y, np.asarray(x) + 1)
  assert int(np.max(y)) <= 49
  x2, _ = random_windows(jax.random.key(0), ids, batch_size=6, context=8)
  np.testing.assert_array_equal(x, x2)
  with pytest.raises(UserError, match="lower the context"):
    random_windows(jax.random.key(0), ids[:8], batch_size=2, context=8)


def test_real_tinyshakespeare():
  text = load_text(tinyshakespeare_path(require(SHARED_DATA)))
  vocab = CharVocab.from_text(text)
  # The corpus as nanoGPT describes it: 1,115,394 characters, 65 distinct.
  assert (len(text), vocab.size) == (1_115_394, 65)
  assert vocab.decode(vocab.encode(text[:200])) == text[:200]


def test_trim_to_bucket_cuts_only_padding_to_the_smallest_bucket_that_fits():
  mask = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
  batch = {"input_ids": mask * 7, "attention_mask": mask, "label": np.array([0, 1])}
  cut = trim_to_bucket(batch, (4, 6, 16))  # longest sentence 5 tokens -> 6
  np.testing.assert_array_equal(cut["attention_mask"], mask[:, :6])
  np.testing.assert_array_equal(cut["input_ids"], 7 * mask[:, :6])
  assert cut["label"] is batch["label"]
  assert trim_to_bucket(batch, (4,)) is batch  # no bucket holds 5 tokens: unchanged
  assert trim_to_bucket(batch, (8, 16)) is batch  # not shorter than the batch
  assert trim_to_bucket(batch, ()) is batch
