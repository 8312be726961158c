"""Invented names from syllables, so no pretrained knowledge can answer a task-world question.

Every name ends in a syllable whose rhyme no English stemmer strips (`-ak`, `-orn`, ...; never
`-er`, `-al`, `-s`, `-e`), so BM25 with stemming keeps distinct names distinct. Uniqueness is
checked on the lower-cased token: no word is ever the name of two things.
"""

from __future__ import annotations

import random

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "z", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_INNER_CODAS = ("", "", "", "n", "r", "l")
_FINAL_RHYMES = ("ak", "ek", "ik", "ok", "uk", "ax", "ix", "ox", "un", "on", "or", "ur", "ar",
                 "im", "om", "um", "ath", "oth", "orn", "ard", "und", "ish", "av", "ov")


class NameGenerator:
  """Draws capitalised one-word names, never repeating a word it has already given out."""

  def __init__(self, rng: random.Random, reserved: tuple[str, ...] = ()):
    self._rng = rng
    self._used: set[str] = {w.lower() for w in reserved}

  def word(self, syllables: int = 2) -> str:
    """A fresh word of `syllables` syllables (the last one from the safe rhymes)."""
    if syllables < 2:
      raise ValueError(f"names need at least 2 syllables, got {syllables}")
    rng = self._rng
    for _ in range(1000):
      parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_INNER_CODAS)
               for _ in range(syllables - 1)]
      parts.append(rng.choice(_ONSETS) + rng.choice(_FINAL_RHYMES))
      word = "".join(parts)
      if word not in self._used:
        self._used.add(word)
        return word.capitalize()
    raise RuntimeError(f"ran out of fresh {syllables}-syllable names")

  def words(self, n: int, syllables: int = 2) -> list[str]:
    return [self.word(syllables) for _ in range(n)]
