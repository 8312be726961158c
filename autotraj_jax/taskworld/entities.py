"""Fictional towns, people and companies, and the corpus passage that states each one's facts.

Entities are grouped into split pools (`train`, `validation`, `test`, ...): a person is born in a
town of their own pool and a company is founded by a person and based in a town of its pool, so
a question that follows these links never leaves its pool. One table (`ATTRIBUTES`) says, per
attribute, how a passage states it, how to read it back, how to search for it and how to say
it in a thought; generation, verification and rendering all use that one table.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping

from autotraj_jax.taskworld.names import NameGenerator

KINDS: tuple[str, ...] = ("town", "person", "company")

PROFESSIONS: tuple[str, ...] = (
  "painter", "engineer", "farmer", "baker", "sailor", "teacher", "doctor", "weaver", "miner",
  "architect", "poet", "merchant", "carpenter", "astronomer", "musician", "lawyer")
COMPANY_SUFFIXES: tuple[str, ...] = (
  "Works", "Labs", "Foundry", "Holdings", "Systems", "Trading", "Mills", "Group")
NUM_REGIONS = 12
NUM_FIRST_NAMES = 160
LAST_YEAR = 2023
MIN_PER_POOL = 4  # each pool needs a few of each kind for two-entity questions

_NAME = r"[A-Z][a-z]+"
_PERSON = rf"{_NAME} {_NAME}"


@dataclasses.dataclass(frozen=True)
class Attribute:
  """How one attribute lives in text.

  `pattern` reads the value back from a passage body (group 1); `keyword` is added to the
  entity name to form the search query; `noun` names the attribute in a plan ("the founding
  year of X"); `sentence` states a found value in a thought.
  """

  noun: str
  keyword: str
  sentence: str
  pattern: re.Pattern[str]


ATTRIBUTES: dict[tuple[str, str], Attribute] = {
  ("town", "founded"): Attribute("founding year", "founded", "{s} was founded in {v}.",
                                 re.compile(r"founded in (\d{4})")),
  ("town", "population"): Attribute("population", "population", "{s} has a population of {v}.",
                                    re.compile(r"population of (\d+)")),
  ("town", "region"): Attribute("region", "region", "{s} is in the {v} region.",
                                re.compile(rf"in the ({_NAME}) region")),
  ("person", "birth_year"): Attribute("birth year", "born", "{s} was born in {v}.",
                                      re.compile(rf"born in (?:{_NAME} in )?(\d{{4}})")),
  ("person", "birthplace"): Attribute("birthplace", "born", "{s} was born in {v}.",
                                      re.compile(rf"born in (?:\d{{4}} in )?({_NAME})")),
  ("person", "profession"): Attribute("profession", "", "{s} is a {v}.",
                                      re.compile(r"(?:is|works as) an? ([a-z]+)")),
  ("company", "founded"): Attribute("founding year", "founded", "{s} was founded in {v}.",
                                    re.compile(rf"founded (?:in |by {_PERSON} in )(\d{{4}})")),
  ("company", "founder"): Attribute("founder", "founder", "{s} was founded by {v}.",
                                    re.compile(rf"founded (?:in \d{{4}} )?by ({_PERSON})")),
  ("company", "headquarters"): Attribute("home town", "based", "{s} is based in {v}.",
                                         re.compile(rf"based in ({_NAME})")),
  ("company", "employees"): Attribute("number of employees", "employees", "{s} has {v} employees.",
                                      re.compile(r"has (\d+) employees")),
}

# Attributes whose value is another entity: (kind, attribute) -> kind of the linked entity.
LINKS: dict[tuple[str, str], str] = {
  ("person", "birthplace"): "town",
  ("company", "founder"): "person",
  ("company", "headquarters"): "town",
}

_PASSAGES: dict[str, tuple[str, ...]] = {
  "town": (
    "{name} is a town in the {region} region. It was founded in {founded} and has a population "
    "of {population}.",
    "{name} is a town in the {region} region, founded in {founded}. It has a population of "
    "{population}.",
  ),
  "person": (
    "{name} is {article} {profession} who was born in {birth_year} in {birthplace}.",
    "{name} was born in {birthplace} in {birth_year}. {first} works as {article} {profession}.",
  ),
  "company": (
    "{name} is a company founded in {founded} by {founder}. It is based in {headquarters} and "
    "has {employees} employees.",
    "{name} was founded by {founder} in {founded}. The company is based in {headquarters} and "
    "has {employees} employees.",
  ),
}


@dataclasses.dataclass(frozen=True)
class Entity:
  """One fictional entity; `facts` holds every attribute as text, `links` the linked ids."""

  id: str
  kind: str
  name: str
  pool: str
  facts: Mapping[str, str]
  links: Mapping[str, str]
  style: int  # which passage template states the facts

  def passage(self) -> str:
    """Corpus contents: the quoted title line, then 1-3 sentences."""
    fields = dict(self.facts, name=self.name, first=self.name.split()[0])
    if self.kind == "person":
      fields["article"] = "an" if self.facts["profession"][0] in "aeiou" else "a"
    return f'"{self.name}"\n' + _PASSAGES[self.kind][self.style].format(**fields)


def kind_of(entity_id: str) -> str:
  """The kind encoded in an entity (= passage) id such as `company-0042`."""
  return entity_id.split("-", 1)[0]


def passage_body(contents: str) -> tuple[str, str]:
  """(title, body) of a corpus passage written by `Entity.passage`."""
  head, _, body = contents.partition("\n")
  return head.strip().strip('"'), body


def extract_fact(contents: str, kind: str, attribute: str) -> str | None:
  """Reads `attribute` back from a passage's text, independently of how it was generated."""
  m = ATTRIBUTES[(kind, attribute)].pattern.search(passage_body(contents)[1])
  return m.group(1) if m else None


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
  return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def pool_counts(pools: Mapping[str, float], num_entities: int) -> dict[str, int]:
  """Entities of each kind per pool: the pool's share of `num_entities / 3`, at least a few."""
  total = sum(pools.values())
  per_kind = num_entities / len(KINDS)
  return {p: max(MIN_PER_POOL, round(per_kind * f / total)) for p, f in pools.items()}


def build_entities(seed: int, pools: Mapping[str, float], num_entities: int) -> list[Entity]:
  """All entities of a world, in a shuffled order; ids number each kind in that order."""
  rng = random.Random(f"taskworld/{seed}/entities")
  names = NameGenerator(rng)
  regions = names.words(NUM_REGIONS, 2)
  first_names = names.words(NUM_FIRST_NAMES, 2)
  drafts: list[dict] = []  # kind, name, pool, facts, links (as draft indices)
  for pool, count in pool_counts(pools, num_entities).items():
    towns, people = [], []
    for _ in range(count):
      towns.append(len(drafts))
      drafts.append(dict(kind="town", name=names.word(rng.choice((2, 2, 3))), pool=pool, links={},
                         facts=dict(founded=str(rng.randint(1100, 1840)),
                                    population=str(_log_uniform(rng, 1200, 950_000)),
                                    region=rng.choice(regions))))
    for _ in range(count):
      people.append(len(drafts))
      name = f"{rng.choice(first_names)} {names.word(rng.choice((2, 2, 3)))}"
      drafts.append(dict(kind="person", name=name, pool=pool,
                         links=dict(birthplace=rng.choice(towns)),
                         facts=dict(birth_year=str(rng.randint(1850, LAST_YEAR - 30)),
                                    profession=rng.choice(PROFESSIONS))))
    for _ in range(count):
      founder = rng.choice(people)
      born = int(drafts[founder]["facts"]["birth_year"])
      founded = born + rng.randint(22, min(60, LAST_YEAR - born))
      drafts.append(dict(kind="company", pool=pool,
                         name=f"{names.word(rng.choice((2, 2, 3)))} {rng.choice(COMPANY_SUFFIXES)}",
                         links=dict(founder=founder, headquarters=rng.choice(towns)),
                         facts=dict(founded=str(founded),
                                    employees=str(_log_uniform(rng, 20, 90_000)))))
  order = list(range(len(drafts)))
  rng.shuffle(order)
  ids: dict[int, str] = {}
  seen = {k: 0 for k in KINDS}
  for i in order:
    kind = drafts[i]["kind"]
    ids[i] = f"{kind}-{seen[kind]:04d}"
    seen[kind] += 1
  entities = []
  for i in order:
    d = drafts[i]
    facts = dict(d["facts"])
    for attr, target in d["links"].items():
      facts[attr] = drafts[target]["name"]
    entities.append(Entity(id=ids[i], kind=d["kind"], name=d["name"], pool=d["pool"], facts=facts,
                           links={a: ids[t] for a, t in d["links"].items()},
                           style=rng.randrange(len(_PASSAGES[d["kind"]]))))
  return entities
