"""The synthetic task world: a generated corpus and seeded, disjoint task splits.

Disjointness rule (what keeps a test question new to a model trained on the train split):

* Every entity belongs to exactly one split pool, fixed when the world is generated; links
  (birthplace, founder, home town) only join entities of the same pool. A `lookup` or `combo`
  task of split S names and retrieves only pool-S entities, so no entity that a test question
  names or needs a passage of is named or retrieved by any train question.
* An `arith` task belongs to the split its key hashes to (the key is its theme and operand
  sequence, not its wording), so the same numbers never appear in two splits, however phrased.
* Within a split no key and no question text repeats; across splits no question text repeats
  (this follows from the two rules above).

The corpus holds every pool's passages: retrieval over it is the same for all splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from autotraj_jax.taskworld.arith import arith_draft
from autotraj_jax.taskworld.combo import combo_draft
from autotraj_jax.taskworld.entities import Entity, build_entities
from autotraj_jax.taskworld.lookup import PATHS, lookup_draft
from autotraj_jax.taskworld.lookup import Path as LookupPath
from autotraj_jax.taskworld.task import FAMILIES, Draft, Task

DEFAULT_POOLS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
DEFAULT_NUM_ENTITIES = 1500
DEFAULT_SIZES: dict[str, int] = {"train": 4000, "validation": 500, "test": 500}
_MAX_TRIES = 2000


@dataclasses.dataclass(frozen=True)
class Level:
  """What one difficulty level means for each family."""

  arith_steps: int
  arith_digits: int
  lookup_hops: int
  combo_shape: str


LEVELS: dict[int, Level] = {
  1: Level(arith_steps=2, arith_digits=3, lookup_hops=1, combo_shape="single"),
  2: Level(arith_steps=3, arith_digits=4, lookup_hops=2, combo_shape="pair"),
  3: Level(arith_steps=4, arith_digits=5, lookup_hops=3, combo_shape="chain"),
}
DOMAINS: dict[str, str] = {"arith": "math", "lookup": "qa", "combo": "math"}


def _levels(difficulty: int | Sequence[int] | None) -> tuple[int, ...]:
  levels = tuple(LEVELS) if difficulty is None else \
      (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
  bad = [d for d in levels if d not in LEVELS]
  if not levels or bad:
    raise ValueError(f"difficulty must be among {sorted(LEVELS)} (or None for all), got {difficulty!r}")
  return levels


def _families(families: Iterable[str]) -> tuple[str, ...]:
  families = tuple(families)
  bad = [f for f in families if f not in FAMILIES]
  if not families or bad:
    raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
  return families


class TaskWorld:
  """Entities, their corpus, and task generation for the split pools.

  Same `seed`, `num_entities` and `pools` give the same world. About `num_entities / 3` of each
  kind are split over the pools in proportion to their weights (at least a few per pool).
  """

  def __init__(self, seed: int = 0, num_entities: int = DEFAULT_NUM_ENTITIES,
               pools: Mapping[str, float] | None = None):
    pools = dict(DEFAULT_POOLS if pools is None else pools)
    if not pools or any(not re.fullmatch(r"[\w-]+", p) or not w > 0 for p, w in pools.items()):
      raise ValueError(f"pools must map split names ([A-Za-z0-9_-]) to positive weights, got {pools}")
    if num_entities < 3:
      raise ValueError(f"num_entities must be >= 3, got {num_entities}")
    self.seed, self.num_entities, self.pools = int(seed), int(num_entities), pools
    self.entities: list[Entity] = build_entities(self.seed, pools, self.num_entities)
    self._by_id = {e.id: e for e in self.entities}
    self._by_pool: dict[tuple[str, str], list[Entity]] = {}
    for e in sorted(self.entities, key=lambda e: e.id):
      self._by_pool.setdefault((e.pool, e.kind), []).append(e)
    self.corpus: dict[str, str] = {e.id: e.passage() for e in self.entities}

  def entity(self, entity_id: str) -> Entity:
    return self._by_id[entity_id]

  def entities_of(self, pool: str, kind: str) -> list[Entity]:
    return self._by_pool.get((pool, kind), [])

  def corpus_records(self) -> list[dict[str, str]]:
    return [{"id": i, "contents": c} for i, c in self.corpus.items()]

  def pool_of_key(self, key: str) -> str:
    """The pool an entity-free key (an arith problem) belongs to, by a seeded hash."""
    digest = hashlib.sha256(f"{self.seed}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64 * sum(self.pools.values())
    for pool, weight in self.pools.items():
      if u < weight:
        return pool
      u -= weight
    return next(reversed(self.pools))

  def tasks(self, split: str, n: int, *, families: Iterable[str] = FAMILIES,
            difficulty: int | Sequence[int] | None = None, seed: int | None = None) -> list[Task]:
    """`n` distinct tasks of `split`, families and levels in equal turns, in shuffled order."""
    if split not in self.pools:
      raise ValueError(f"split {split!r} is not a pool of this world; pools: {list(self.pools)}")
    families, levels = _families(families), _levels(difficulty)
    rng = random.Random(f"taskworld/{self.seed if seed is None else seed}/tasks/{split}")
    lookups: dict[int, list[tuple[LookupPath, Entity]]] = {}
    keys: set[str] = set()
    questions: set[str] = set()
    made: list[tuple[str, int, Draft]] = []
    for i in range(n):
      family = families[i % len(families)]
      level = levels[(i // len(families)) % len(levels)]
      for _ in range(_MAX_TRIES):
        if family == "lookup":
          draft = self._next_lookup(split, LEVELS[level].lookup_hops, lookups, rng)
        elif family == "arith":
          draft = arith_draft(rng, LEVELS[level].arith_steps, LEVELS[level].arith_digits)
          if self.pool_of_key(draft.key) != split:
            continue
        else:
          draft = combo_draft(self, split, LEVELS[level].combo_shape, rng)
        if draft.key not in keys and draft.question not in questions:
          break
      else:
        raise ValueError(f"could not find {n} distinct tasks for split {split!r} "
                         f"({family}, level {level}); raise num_entities")
      keys.add(draft.key)
      questions.add(draft.question)
      made.append((family, level, draft))
    rng.shuffle(made)
    return [Task(id=f"taskworld-{split}-{i}", family=family, question=d.question, answer=d.answer,
                 domain=DOMAINS[family], difficulty=level, solution=d.solution, split=split)
            for i, (family, level, d) in enumerate(made)]

  def _next_lookup(self, pool: str, hops: int, cache: dict[int, list[tuple[LookupPath, Entity]]],
                   rng: random.Random) -> Draft:
    """Lookup questions are drawn without replacement from all (path, start) pairs of the pool."""
    if hops not in cache:
      cache[hops] = [(path, e) for path in PATHS[hops] for e in self.entities_of(pool, path[0])]
      rng.shuffle(cache[hops])
    if not cache[hops]:
      raise ValueError(f"split {pool!r} has no {hops}-hop lookup questions left; raise num_entities")
    path, start = cache[hops].pop()
    return lookup_draft(self, path, start, rng)


def make_splits(seed: int = 0, sizes: Mapping[str, int] | None = None, *,
                families: Iterable[str] = FAMILIES, difficulty: int | Sequence[int] | None = None,
                num_entities: int = DEFAULT_NUM_ENTITIES, pools: Mapping[str, float] | None = None,
                world: TaskWorld | None = None) -> dict[str, list[Task]]:
  """Tasks per split (keys of `sizes`, each a pool of the world), disjoint by the module's rule.

  The world is `TaskWorld(seed, num_entities, pools)` unless one is given. Each split has its
  own random stream, so one split's size does not change another split's tasks.
  """
  sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
  world = world if world is not None else TaskWorld(seed, num_entities, pools)
  return {split: world.tasks(split, n, families=families, difficulty=difficulty, seed=seed)
          for split, n in sizes.items()}


def _write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_world(out_dir: str | os.PathLike, seed: int = 0, sizes: Mapping[str, int] | None = None, *,
                families: Iterable[str] = FAMILIES, difficulty: int | Sequence[int] | None = None,
                num_entities: int = DEFAULT_NUM_ENTITIES,
                pools: Mapping[str, float] | None = None) -> dict[str, Path]:
  """Writes `corpus.jsonl`, one `<split>.jsonl` per split and `world.json` (the parameters).

  Returns the written paths by name ('corpus', each split, 'world'). Same arguments, same bytes.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
  families = _families(families)
  world = TaskWorld(seed, num_entities, pools)
  splits = make_splits(seed, sizes, families=families, difficulty=difficulty, world=world)
  paths = {"corpus": out / "corpus.jsonl"}
  _write_jsonl(paths["corpus"], world.corpus_records())
  for split, tasks in splits.items():
    paths[split] = out / f"{split}.jsonl"
    _write_jsonl(paths[split], (t.to_record() for t in tasks))
  params = {"seed": seed, "num_entities": num_entities, "pools": world.pools, "sizes": sizes,
            "families": list(families), "difficulty": list(_levels(difficulty))}
  paths["world"] = out / "world.json"
  paths["world"].write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
  return paths


def read_split(path: str | os.PathLike) -> list[Task]:
  """Tasks of a split file written by `write_world`."""
  with open(path, encoding="utf-8") as f:
    return [Task.from_record(json.loads(line)) for line in f if line.strip()]


def read_corpus(path: str | os.PathLike) -> dict[str, str]:
  """Passage id -> contents of a `corpus.jsonl`."""
  with open(path, encoding="utf-8") as f:
    return {r["id"]: r["contents"] for r in map(json.loads, filter(str.strip, f))}
