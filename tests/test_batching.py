"""Length-grouped batching: every example each epoch, a new grouping per epoch, hosts that load
disjoint rows of the same global batches and an iterator position that a checkpoint restores exactly."""

import numpy as np
import pytest

from autotraj_jax.checkpoint import Checkpointer
from autotraj_jax.training import data as data_lib

N, B = 45, 8  # 45 examples: 5 full batches and a partial one


def examples(n=N, seed=0):
  """Sequences of few distinct lengths (ties), each carrying its index."""
  rng = np.random.default_rng(seed)
  lengths = rng.choice([4, 9, 17, 30], size=n)
  return [{"tokens": list(range(1, int(k) + 1)), "loss_mask": [1] * int(k), "id": i} for i, k in enumerate(lengths)]


def ids(xs, buckets, pad_id):
  return {"ids": np.asarray([x["id"] for x in xs], np.int32)}


def stream(data, **kw):
  kw = {"batch_size": B, "buckets": (32,), "seed": 3, "group_by_length": True, "collate_fn": ids, **kw}
  return iter(data_lib.batch_dataset(data, **kw))


def take(it, n):
  return [next(it)["ids"].tolist() for _ in range(n)]


def test_every_example_appears_each_epoch_and_batches_are_full():
  data = examples()
  per_epoch = data_lib.batches_per_epoch(N, B)
  assert per_epoch == 6
  batches = take(stream(data), 3 * per_epoch)
  assert all(len(b) == B for b in batches)
  for e in range(3):
    seen = [i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b]
    assert set(seen) == set(range(N))                   # the longest examples too
    assert len(seen) - len(set(seen)) == per_epoch * B - N  # only the fill repeats


def test_the_grouping_changes_between_epochs():
  per_epoch = data_lib.batches_per_epoch(N, B)
  batches = take(stream(examples()), 2 * per_epoch)
  first, second = ({frozenset(b) for b in batches[:per_epoch]}, {frozenset(b) for b in batches[per_epoch:]})
  assert first != second
  assert take(stream(examples()), 2 * per_epoch) == batches  # and is a function of the seed


def test_batches_keep_similar_lengths():
  data = examples(400, seed=1)
  lengths = [len(d["tokens"]) for d in data]
  batches = data_lib.length_grouped_batches(lengths, B, seed=0, window=4, epoch=2)
  spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
  rand = np.mean([np.ptp([lengths[i] for i in b]) for b in np.array_split(np.arange(400), 50)])
  assert spread < rand / 2


def ids_and_length(xs, buckets, pad_id):
  """The ids and the padded length `collate` would choose for these examples."""
  length = data_lib.pick_bucket(max(len(x["tokens"]) for x in xs), sorted(buckets))
  return {"ids": np.asarray([x["id"] for x in xs], np.int32), "length": np.full(len(xs), length, np.int32)}


@pytest.mark.parametrize("grouped", [False, True])
def test_hosts_load_their_rows_of_the_global_batches(grouped):
  """Two hosts, each loading its rows of every global batch, together load the batches one host
  would, padded to the bucket of the whole batch even where their own rows are all short."""
  rng = np.random.default_rng(5)
  lengths = rng.choice([4, 9, 30], size=N, p=[0.6, 0.3, 0.1])  # few long ones: hosts' rows differ
  data = [{"tokens": [1] * int(k), "loss_mask": [1] * int(k), "id": i} for i, k in enumerate(lengths)]
  kw = {"buckets": (8, 16, 32), "collate_fn": ids_and_length, "group_by_length": grouped}
  n = 2 * data_lib.batches_per_epoch(N, B)
  whole = [next(it) for it in [stream(data, **kw)] for _ in range(n)]
  rows = ([0, 2, 4, 6], [7, 5, 3, 1])
  hosts = [[next(it) for it in [stream(data, rows=r, **kw)] for _ in range(n)] for r in rows]
  disagree = 0
  for k, full in enumerate(whole):
    for r, host in zip(rows, hosts):
      np.testing.assert_array_equal(host[k]["ids"], full["ids"][r])
      np.testing.assert_array_equal(host[k]["length"], full["length"][:len(r)])
      disagree += data_lib.pick_bucket(max(lengths[i] for i in host[k]["ids"]), (8, 16, 32)) != full["length"][0]
  assert len({int(b["length"][0]) for b in whole}) > 1  # batches of several buckets
  if not grouped:
    assert disagree  # padding by its own rows alone, a host would have disagreed with the other


def test_rows_must_be_distinct_positions_of_a_batch():
  for rows in ([], [0, 0], [8], [-1]):
    with pytest.raises(ValueError, match=r"rows must be distinct positions in \[0, 8\)"):
      stream(examples(), rows=rows)


def test_unshuffled_epochs_repeat_and_finite_epochs_end():
  data = examples()
  per_epoch = data_lib.batches_per_epoch(N, B)
  batches = take(stream(data, shuffle=False), 2 * per_epoch)
  assert batches[:per_epoch] == batches[per_epoch:]
  assert len(list(stream(data, num_epochs=2))) == 2 * per_epoch


def test_resume_from_a_checkpointed_iterator_continues_identically(tmp_path):
  data = examples()
  it = stream(data)
  take(it, 4)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(4, params={"w": np.zeros(2, np.float32)}, meta={}, data_iter=it, force=True)
  ckpt.wait()
  ckpt.close()
  expected = take(it, 10)  # crosses into the next epoch
  again = stream(data)
  take(again, 1)  # somewhere else: the restore must set the position, not keep it
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.restore(params_like={"w": np.zeros(2, np.float32)}, data_iter=again)
  ckpt.close()
  assert take(again, 10) == expected == take(stream(data), 14)[4:]
