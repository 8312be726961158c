"""`lookup`: questions answered by one to three searches that follow links between entities.

A question is a path: a starting kind, the link attributes to follow, and the attribute asked,
e.g. `("company", "founder", "birthplace", "population")` = "What is the population of the town
where the founder of X was born?". Each hop is one search whose query is the entity's name plus
the attribute's keyword; the name of the next entity is read from the previous passage.
"""

from __future__ import annotations

import random
from typing import Protocol

from autotraj_jax.taskworld.entities import ATTRIBUTES, LINKS, Entity
from autotraj_jax.taskworld.task import Draft, SearchStep, Solution

Path = tuple[str, ...]

QUESTIONS: dict[Path, tuple[str, ...]] = {
  ("town", "founded"): ("In what year was {x} founded?", "When was the town of {x} founded?"),
  ("town", "population"): ("What is the population of {x}?", "How many people live in {x}?"),
  ("town", "region"): ("In which region is {x}?", "Which region is the town of {x} in?"),
  ("person", "birth_year"): ("In what year was {x} born?", "When was {x} born?"),
  ("person", "birthplace"): ("Where was {x} born?", "In which town was {x} born?"),
  ("person", "profession"): ("What is the profession of {x}?", "What does {x} work as?"),
  ("company", "founded"): ("In what year was {x} founded?", "When was {x} founded?"),
  ("company", "founder"): ("Who founded {x}?", "Who is the founder of {x}?"),
  ("company", "headquarters"): ("Where is {x} based?", "In which town is {x} based?"),
  ("company", "employees"): ("How many employees does {x} have?", "How many people work at {x}?"),
  ("company", "founder", "birth_year"): (
    "In what year was the founder of {x} born?", "When was the founder of {x} born?"),
  ("company", "founder", "birthplace"): (
    "Where was the founder of {x} born?", "In which town was the founder of {x} born?"),
  ("company", "founder", "profession"): (
    "What is the profession of the founder of {x}?", "What does the founder of {x} work as?"),
  ("company", "headquarters", "founded"): (
    "When was the town where {x} is based founded?", "In what year was the home town of {x} founded?"),
  ("company", "headquarters", "population"): (
    "What is the population of the town where {x} is based?",
    "How many people live in the town where {x} is based?"),
  ("company", "headquarters", "region"): (
    "In which region is the town where {x} is based?", "In which region is {x} based?"),
  ("person", "birthplace", "founded"): (
    "When was the birthplace of {x} founded?", "In what year was the town where {x} was born founded?"),
  ("person", "birthplace", "population"): (
    "What is the population of the town where {x} was born?",
    "How many people live in the birthplace of {x}?"),
  ("person", "birthplace", "region"): (
    "In which region was {x} born?", "In which region is the birthplace of {x}?"),
  ("company", "founder", "birthplace", "founded"): (
    "When was the birthplace of the founder of {x} founded?",
    "In what year was the town where the founder of {x} was born founded?"),
  ("company", "founder", "birthplace", "population"): (
    "What is the population of the town where the founder of {x} was born?",
    "How many people live in the birthplace of the founder of {x}?"),
  ("company", "founder", "birthplace", "region"): (
    "In which region was the founder of {x} born?",
    "In which region is the birthplace of the founder of {x}?"),
}

PATHS: dict[int, tuple[Path, ...]] = {
  hops: tuple(p for p in QUESTIONS if len(p) - 1 == hops) for hops in (1, 2, 3)}


class EntityLookup(Protocol):
  def entity(self, entity_id: str) -> Entity: ...


def search_step(entity: Entity, attributes: tuple[str, ...]) -> SearchStep:
  """A search for `entity` whose passage states `attributes` (the first one picks the keyword)."""
  keyword = ATTRIBUTES[(entity.kind, attributes[0])].keyword
  query = f"{entity.name} {keyword}".strip()
  return SearchStep(query=query, passage_id=entity.id, subject=entity.name,
                    facts=tuple((a, entity.facts[a]) for a in attributes))


def needs(step: SearchStep) -> str:
  """'the founding year and the founder of X': what a search step is for, in words."""
  kind = step.passage_id.split("-", 1)[0]
  nouns = " and the ".join(ATTRIBUTES[(kind, a)].noun for a, _ in step.facts)
  return f"the {nouns} of {step.subject}"


def lookup_draft(world: EntityLookup, path: Path, start: Entity, rng: random.Random) -> Draft:
  """The question that follows `path` from `start`, solved by one search per hop."""
  if path not in QUESTIONS or start.kind != path[0]:
    raise ValueError(f"no lookup question for path {path} starting at a {start.kind}")
  steps = []
  entity = start
  for attribute in path[1:-1]:
    if (entity.kind, attribute) not in LINKS:
      raise ValueError(f"{entity.kind}.{attribute} is not a link")
    steps.append(search_step(entity, (attribute,)))
    entity = world.entity(entity.links[attribute])
  steps.append(search_step(entity, (path[-1],)))
  first = needs(steps[0])
  plan = (f"I need to find {first}, so I search for it." if len(steps) == 1
          else f"I need to find {first} first.")
  solution = Solution(plan=plan, steps=tuple(steps), answer_step=len(steps) - 1,
                      answer_attribute=path[-1])
  return Draft(key=f"lookup|{'/'.join(path)}|{start.id}",
               question=rng.choice(QUESTIONS[path]).format(x=start.name),
               answer=entity.facts[path[-1]], solution=solution)
