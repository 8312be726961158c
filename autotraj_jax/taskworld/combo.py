"""`combo`: questions that need searches for facts and then code to combine them.

Three shapes, one per difficulty level: `single` (one search, then code), `pair` (two
independent searches, then code) and `chain` (a search whose result names what to search next,
then code). The code assigns the found values to named variables, so the numbers it uses can be
traced back to the passages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from autotraj_jax.taskworld.entities import Entity
from autotraj_jax.taskworld.lookup import search_step
from autotraj_jax.taskworld.task import CodeStep, Draft, SearchStep, Solution

REFERENCE_YEAR = 2024


class PoolView(Protocol):
  def entity(self, entity_id: str) -> Entity: ...

  def entities_of(self, pool: str, kind: str) -> list[Entity]: ...


def _draft(kind: str, ids: list[str], k: int | None, templates: tuple[str, ...], fields: dict,
           plan: str, steps: list[SearchStep], code: list[str], note: str, answer: int,
           rng: random.Random) -> Draft:
  source = "\n".join(code)
  solution = Solution(plan=plan, steps=tuple(steps) + (CodeStep(source, note),),
                      answer_step=len(steps))
  key = f"combo|{kind}|{'/'.join(ids)}|{k}"
  return Draft(key=key, question=rng.choice(templates).format(**fields), answer=str(answer),
               solution=solution)


def _multiplier(rng: random.Random) -> int:
  return rng.randint(12, 99)


def population_times(w: PoolView, pool: str, rng: random.Random) -> Draft:
  t, k = rng.choice(w.entities_of(pool, "town")), _multiplier(rng)
  pop = int(t.facts["population"])
  return _draft("population_times", [t.id], k, (
      "What is the population of {t} multiplied by {k}?",
      "If every person in {t} plants {k} trees, how many trees are planted?"),
    dict(t=t.name, k=k), f"I need the population of {t.name}, then I multiply it by {k} with Python.",
    [search_step(t, ("population",))], [f"population = {pop}", f"print(population * {k})"],
    f"the population times {k}", pop * k, rng)


def employees_times(w: PoolView, pool: str, rng: random.Random) -> Draft:
  c, k = rng.choice(w.entities_of(pool, "company")), _multiplier(rng)
  n = int(c.facts["employees"])
  return _draft("employees_times", [c.id], k, (
      "If each employee of {c} earns {k} coins a day, how many coins does {c} pay per day?",
      "What is the number of employees of {c} multiplied by {k}?"),
    dict(c=c.name, k=k),
    f"I need the number of employees of {c.name}, then I multiply it by {k} with Python.",
    [search_step(c, ("employees",))], [f"employees = {n}", f"print(employees * {k})"],
    f"the employees times {k}", n * k, rng)


def age_in_reference_year(w: PoolView, pool: str, rng: random.Random) -> Draft:
  p, k = rng.choice(w.entities_of(pool, "person")), _multiplier(rng)
  born = int(p.facts["birth_year"])
  y = REFERENCE_YEAR
  return _draft("age_in_reference_year", [p.id], k, (
      "How many years passed between the birth of {p} and the year {y}, multiplied by {k}?",
      "Multiply the number of years from the birth of {p} to {y} by {k}."),
    dict(p=p.name, k=k, y=y),
    f"I need the birth year of {p.name}, then I compute ({y} - year) times {k} with Python.",
    [search_step(p, ("birth_year",))], [f"born = {born}", f"print(({y} - born) * {k})"],
    f"the years since the birth times {k}", (y - born) * k, rng)


def founding_birth_gap(w: PoolView, pool: str, rng: random.Random) -> Draft:
  c, p, k = rng.choice(w.entities_of(pool, "company")), rng.choice(w.entities_of(pool, "person")), \
      _multiplier(rng)
  founded, born = int(c.facts["founded"]), int(p.facts["birth_year"])
  return _draft("founding_birth_gap", [c.id, p.id], k, (
      "How many years passed between the founding of {c} and the birth of {p}, multiplied by {k}?",
      "Multiply the number of years between the birth of {p} and the founding of {c} by {k}."),
    dict(c=c.name, p=p.name, k=k),
    f"I need the founding year of {c.name} and the birth year of {p.name}, then I multiply "
    f"the gap by {k}.",
    [search_step(c, ("founded",)), search_step(p, ("birth_year",))],
    [f"founded = {founded}", f"born = {born}", f"print(abs(founded - born) * {k})"],
    f"the gap in years times {k}", abs(founded - born) * k, rng)


def population_gap(w: PoolView, pool: str, rng: random.Random) -> Draft:
  t, u = rng.sample(w.entities_of(pool, "town"), 2)
  a, b = int(t.facts["population"]), int(u.facts["population"])
  return _draft("population_gap", sorted([t.id, u.id]), None, (
      "What is the difference between the populations of {t} and {u}?",
      "By how many people do the populations of {t} and {u} differ?"),
    dict(t=t.name, u=u.name),
    f"I need the populations of {t.name} and {u.name}, then I compute their difference.",
    [search_step(t, ("population",)), search_step(u, ("population",))],
    [f"population_a = {a}", f"population_b = {b}", "print(abs(population_a - population_b))"],
    "the difference", abs(a - b), rng)


def payroll_pair(w: PoolView, pool: str, rng: random.Random) -> Draft:
  c, d = rng.sample(w.entities_of(pool, "company"), 2)
  k = _multiplier(rng)
  a, b = int(c.facts["employees"]), int(d.facts["employees"])
  return _draft("payroll_pair", sorted([c.id, d.id]), k, (
      "If each employee of {c} and of {d} earns {k} coins a day, how many coins do they earn "
      "together per day?",
      "What is the total number of employees of {c} and {d} multiplied by {k}?"),
    dict(c=c.name, d=d.name, k=k),
    f"I need the numbers of employees of {c.name} and {d.name}, then their sum times {k}.",
    [search_step(c, ("employees",)), search_step(d, ("employees",))],
    [f"employees_a = {a}", f"employees_b = {b}", f"print((employees_a + employees_b) * {k})"],
    f"the sum times {k}", (a + b) * k, rng)


def founder_age(w: PoolView, pool: str, rng: random.Random) -> Draft:
  c, k = rng.choice(w.entities_of(pool, "company")), _multiplier(rng)
  founder = w.entity(c.links["founder"])
  founded, born = int(c.facts["founded"]), int(founder.facts["birth_year"])
  return _draft("founder_age", [c.id], k, (
      "How old was the founder of {c} when {c} was founded, multiplied by {k}?",
      "Multiply the age of the founder of {c} at the founding of {c} by {k}."),
    dict(c=c.name, k=k),
    f"I need the founding year and the founder of {c.name}, then the founder's birth year.",
    [search_step(c, ("founded", "founder")), search_step(founder, ("birth_year",))],
    [f"founded = {founded}", f"born = {born}", f"print((founded - born) * {k})"],
    f"the age at the founding times {k}", (founded - born) * k, rng)


def home_town_population_times(w: PoolView, pool: str, rng: random.Random) -> Draft:
  c, k = rng.choice(w.entities_of(pool, "company")), _multiplier(rng)
  town = w.entity(c.links["headquarters"])
  pop = int(town.facts["population"])
  return _draft("home_town_population_times", [c.id], k, (
      "What is the population of the town where {c} is based, multiplied by {k}?",
      "If every person in the home town of {c} buys {k} items, how many items are bought?"),
    dict(c=c.name, k=k), f"I need the town where {c.name} is based, then its population times {k}.",
    [search_step(c, ("headquarters",)), search_step(town, ("population",))],
    [f"population = {pop}", f"print(population * {k})"], f"the population times {k}", pop * k, rng)


def birthplace_age(w: PoolView, pool: str, rng: random.Random) -> Draft:
  p, k = rng.choice(w.entities_of(pool, "person")), _multiplier(rng)
  town = w.entity(p.links["birthplace"])
  born, founded = int(p.facts["birth_year"]), int(town.facts["founded"])
  return _draft("birthplace_age", [p.id], k, (
      "How many years passed between the founding of the town where {p} was born and the birth "
      "of {p}, multiplied by {k}?",
      "How old was the birthplace of {p} when {p} was born? Multiply that by {k}."),
    dict(p=p.name, k=k),
    f"I need the birthplace and the birth year of {p.name}, then when that town was founded.",
    [search_step(p, ("birthplace", "birth_year")), search_step(town, ("founded",))],
    [f"born = {born}", f"founded = {founded}", f"print((born - founded) * {k})"],
    f"the age of the town times {k}", (born - founded) * k, rng)


SHAPES: dict[str, tuple[Callable[[PoolView, str, random.Random], Draft], ...]] = {
  "single": (population_times, employees_times, age_in_reference_year),
  "pair": (founding_birth_gap, population_gap, payroll_pair),
  "chain": (founder_age, home_town_population_times, birthplace_age),
}


def combo_draft(w: PoolView, pool: str, shape: str, rng: random.Random) -> Draft:
  if shape not in SHAPES:
    raise ValueError(f"combo shape must be one of {sorted(SHAPES)}, got {shape!r}")
  return rng.choice(SHAPES[shape])(w, pool, rng)
