"""`arith`: multi-step word problems whose numbers are too large to work out mentally.

The difficulty knobs are `steps` (operations after the starting quantity; the first is always a
multiplication, the last may be a division, remainder or pricing) and `digits` (digits of the
starting quantity; the other operands scale with it). The answer is computed here with Python
integers and, separately, by running the reference code at verification time.
"""

from __future__ import annotations

import random

from autotraj_jax.taskworld.task import CodeStep, Draft, Solution

# (place, container, containers, item, items); `items` doubles as the code's variable name.
THEMES: tuple[tuple[str, str, str, str, str], ...] = (
  ("A warehouse", "crate", "crates", "bolt", "bolts"),
  ("A library", "shelf", "shelves", "book", "books"),
  ("A factory", "machine", "machines", "part", "parts"),
  ("A harbor", "ship", "ships", "barrel", "barrels"),
  ("A school", "classroom", "classrooms", "pencil", "pencils"),
  ("An orchard", "row", "rows", "tree", "trees"),
  ("A bakery", "tray", "trays", "cookie", "cookies"),
  ("A mine", "cart", "carts", "stone", "stones"),
  ("A farm", "field", "fields", "plant", "plants"),
  ("A depot", "truck", "trucks", "parcel", "parcels"),
  ("A city", "building", "buildings", "window", "windows"),
  ("A garden", "bed", "beds", "flower", "flowers"),
)

_START = ("{place} has {a} {containers}.", "{place} holds {a} {containers}.")
_MUL = ("Each {container} holds {x} {items}.", "There are {x} {items} in each {container}.",
        "Every {container} has {x} {items}.")
_ADD = ("Then {x} more {items} arrive.", "Later {x} {items} are added.")
_SUB = ("Then {x} {items} are removed.", "Later {x} {items} are taken away.")
_ASK = ("How many {items} are there now?", "How many {items} are there in total?")
_DIV = ("The {items} are packed into boxes of {x}. How many full boxes are there?",
        "They are packed into boxes of {x}. How many boxes are filled completely?")
_MOD = ("The {items} are packed into boxes of {x}. How many {items} are left over?",
        "They are packed into boxes of {x}. How many {items} do not fit into a full box?")
_VALUE = ("Each {item} is worth {x} coins. What is the total value in coins?",
          "Each {item} sells for {x} coins. How many coins are they worth together?")

_WORDS = {"mul": "times {x}", "add": "plus {x}", "sub": "minus {x}", "div": "divided by {x} rounded down",
          "mod": "the remainder modulo {x}", "value": "times {x}"}
_FINAL_OPS = ("add", "sub", "div", "mod", "value")
MAX_STEPS = 6
DIGITS_RANGE = (2, 8)


def _number(rng: random.Random, digits: int) -> int:
  return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def arith_draft(rng: random.Random, steps: int, digits: int) -> Draft:
  """One word problem with `steps` operations on `digits`-digit numbers."""
  if not 1 <= steps <= MAX_STEPS:
    raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
  if not DIGITS_RANGE[0] <= digits <= DIGITS_RANGE[1]:
    raise ValueError(f"digits must be in {DIGITS_RANGE[0]}..{DIGITS_RANGE[1]}, got {digits}")
  theme = rng.randrange(len(THEMES))
  place, container, containers, item, items = THEMES[theme]
  names = dict(place=place, container=container, containers=containers, item=item, items=items)
  a, b = _number(rng, digits), _number(rng, max(2, digits - 1))
  total = a * b
  ops = [("mul", b)]
  text = [rng.choice(_START).format(a=a, **names), rng.choice(_MUL).format(x=b, **names)]
  code = [f"{items} = {a} * {b}"]
  ask = rng.choice(_ASK).format(**names)
  result = f"print({items})"
  for i in range(1, steps):
    op = rng.choice(_FINAL_OPS if i == steps - 1 else ("add", "sub"))
    if op == "sub" and total <= 10 ** digits:
      op = "add"  # keep every count positive
    if op in ("add", "sub"):
      x = _number(rng, digits)
      total = total + x if op == "add" else total - x
      text.append(rng.choice(_ADD if op == "add" else _SUB).format(x=x, **names))
      code.append(f"{items} = {items} {'+' if op == 'add' else '-'} {x}")
    else:
      x = rng.randint(12, 99)
      template, symbol = {"div": (_DIV, "//"), "mod": (_MOD, "%"), "value": (_VALUE, "*")}[op]
      ask = rng.choice(template).format(x=x, **names)
      result = f"print({items} {symbol} {x})"
      total = {"div": total // x, "mod": total % x, "value": total * x}[op]
    ops.append((op, x))
  code.append(result)
  steps_text = ", ".join(_WORDS[op].format(x=x) for op, x in ops)
  plan = f"The numbers are large, so I compute {a} {steps_text} with Python."
  solution = Solution(plan=plan, steps=(CodeStep("\n".join(code), "the result"),), answer_step=0)
  key = f"arith|{theme}|{a}|" + "|".join(f"{op}{x}" for op, x in ops)
  return Draft(key=key, question=" ".join(text + [ask]), answer=str(total), solution=solution)
