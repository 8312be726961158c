"""Name -> function tables, so an ablation is a config edit: a new quality scorer, reward
component, advantage estimator, loss aggregation or KL estimator is one registered function,
never an edit of the code that uses it."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
  """A dict of named entries of one kind, with a decorator to add to it and lookups whose errors
  list what is registered."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator adding `name`; a second, different entry under the same name is an error."""
    def deco(entry: T) -> T:
      if name in self and self[name] is not entry:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self[name] = entry
      return entry
    return deco

  def check(self, name: str, field: str) -> None:
    """Raises a one-line ValueError naming the config field when `name` is not registered."""
    if name not in self:
      raise ValueError(f"{field} must be a registered {self.kind} ({', '.join(sorted(self))}), got {name!r}")

  def lookup(self, name: str) -> T:
    if name not in self:
      raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self))}")
    return self[name]
