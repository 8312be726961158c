"""Fixed JSONL question files as TFDS datasets read by random access, without TensorFlow.

A JSONL file is prepared once into ArrayRecord by a `GeneratorBasedBuilder` and then opened
with `tfds.data_source`, which gives `len()` and `source[i]` for shuffling, sharding across
hosts and resuming at a record index. TFDS writes `tf.train.Example` protos with its own
protobuf copies and reads ArrayRecord with numpy, so TensorFlow is never imported.

Each preparation lives under `<data_dir>/autotraj_qa/<name>-<split>-<hash>/1.0.0`, keyed by the
file's content hash, so an edited file gets a fresh build and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from autotraj_jax.questions import QA_FIELDS, read_jsonl  # re-exported: the JSONL reader lives there

BUILDER_NAME = "autotraj_qa"
VERSION = "1.0.0"
_KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev")


class AutotrajQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One JSONL file of string QA records as a single split, in file order.

  Not registered by name: it is only built here, and read back from its files.
  """

  VERSION = tfds.core.Version(VERSION)
  name = BUILDER_NAME

  def __init__(self, *, jsonl_path: str, split_name: str, **kwargs: Any):
    self._jsonl_path = jsonl_path
    self._split_name = split_name
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file to find (the data is local); TFDS's own lookup needs the
    # `importlib_resources` backport on Python >= 3.9 for builders defined in a package.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Question/answer records from a JSONL file (AutoTraj benchmarks format).",
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in QA_FIELDS}),
        disable_shuffling=True,  # record i is line i: stable indices for resuming
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data is local
    return {self._split_name: self._generate_examples()}

  def _generate_examples(self):
    fields = {k: str for k in QA_FIELDS}
    for i, record in enumerate(read_jsonl(self._jsonl_path, fields)):
      yield i, {k: record[k] for k in QA_FIELDS}


class QaRecords(Sequence):
  """Random-access view of a prepared split whose records are dicts of `str`.

  Wraps the TFDS data source (bytes) and decodes UTF-8; `__getitems__` serves batched
  reads (grain, torch-style loaders).
  """

  def __init__(self, source: Sequence[dict], *, name: str, split: str, path: str):
    self.source = source
    self.name, self.split, self.path = name, split, path

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"record {index} out of range for {self.name}/{self.split} ({n} records)")
    return _decode(self.source[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [_decode(r) for r in self.source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f"QaRecords(name={self.name!r}, split={self.split!r}, len={len(self)}, path={self.path!r})"


def _decode(record: Mapping[str, Any]) -> dict[str, str]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _clean(text: str) -> str:
  # TFDS config names allow [\w+.-], split names [\w-].
  return re.sub(r"[^\w-]", "_", text) or "data"


def _default_name_split(path: str) -> tuple[str, str]:
  """'gsm8k-test.jsonl' -> ('gsm8k', 'test'); an unknown suffix means the 'train' split."""
  stem = os.path.basename(path)
  stem = stem[:-len(".jsonl")] if stem.endswith(".jsonl") else os.path.splitext(stem)[0]
  base, sep, tail = stem.rpartition("-")
  if sep and base and tail in _KNOWN_SPLITS:
    return base, tail
  return stem, "train"


def jsonl_data_source(jsonl_path: str | os.PathLike, *, data_dir: str | os.PathLike,
                      name: str | None = None, split: str | None = None) -> QaRecords:
  """Prepare `jsonl_path` once (cached by content hash) and open it for random access.

  `name` and `split` default to `<name>-<split>.jsonl` in the file name (else the stem and
  'train'). Fields other than QA_FIELDS are not stored.
  """
  jsonl_path = os.path.abspath(os.fspath(jsonl_path))
  if not os.path.isfile(jsonl_path):
    raise FileNotFoundError(f"JSONL file {jsonl_path!r} does not exist")
  default_name, default_split = _default_name_split(jsonl_path)
  name = _clean(name or default_name)
  split = _clean(split or default_split)
  data_dir = os.fspath(data_dir)
  config = tfds.core.BuilderConfig(
      name=f"{name}-{split}-{_file_digest(jsonl_path)[:16]}",
      description=f"{os.path.basename(jsonl_path)} as split {split!r}")
  prepared = os.path.join(data_dir, BUILDER_NAME, config.name, VERSION, "dataset_info.json")
  # TFDS renames a finished build into place, so its info file means a complete build.
  if not os.path.isfile(prepared):
    builder = AutotrajQa(jsonl_path=jsonl_path, split_name=split, config=config,
                         data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  source = tfds.data_source(f"{BUILDER_NAME}/{config.name}:{VERSION}", split=split,
                            data_dir=data_dir, download=False)
  return QaRecords(source, name=name, split=split, path=jsonl_path)


def benchmark_source(name: str, split: str = "test", *, data_dir: str | os.PathLike,
                     benchmarks_dir: str | os.PathLike) -> QaRecords:
  """A benchmark file `<benchmarks_dir>/<name>-<split>.jsonl` (e.g. gsm8k-test) as a source."""
  path = os.path.join(os.fspath(benchmarks_dir), f"{name}-{split}.jsonl")
  if not os.path.isfile(path):
    have = sorted(f[:-len(".jsonl")] for f in os.listdir(benchmarks_dir) if f.endswith(".jsonl")) \
        if os.path.isdir(benchmarks_dir) else []
    raise FileNotFoundError(f"no benchmark file {path!r}; available: {have}")
  return jsonl_data_source(path, data_dir=data_dir, name=name, split=split)
