"""An LLMBackend that replays scripted model turns, for testing the tool loop without a model.

Each prompt maps to a list of turn texts; the turn is the number of `<result>` blocks already in
the context. The turn's text is tokenised and cut at the first stop string exactly as a real
backend would, so the loop sees real token ids, stop reasons and budgets.
"""

from __future__ import annotations

from autotraj_jax.engine.backend import Completion, GenerationRequest, find_stop


class ScriptedBackend:

  def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]]):
    self.tokenizer = tokenizer
    self.scripts = scripts
    self.calls: list[int] = []          # batch size of every generate call
    self.emitted: dict[tuple[int, ...], list[list[int]]] = {}

  def _script(self, ids: tuple[int, ...]) -> tuple[tuple[int, ...], list[str]]:
    for prompt, turns in self.scripts.items():
      if ids[:len(prompt)] == prompt:
        return prompt, turns
    raise KeyError("no script for this prompt")

  def generate(self, requests):
    self.calls.append(len(requests))
    return [self._one(r) for r in requests]

  def _one(self, req: GenerationRequest) -> Completion:
    prompt, turns = self._script(req.prompt_ids)
    context = self.tokenizer.decode(list(req.prompt_ids[len(prompt):]))
    turn = context.count("<result>")
    text = turns[min(turn, len(turns) - 1)]
    ids = list(self.tokenizer.encode(text, add_special_tokens=False))
    reason, matched = "eos", None
    for k in range(1, len(ids) + 1):
      hit = find_stop(self.tokenizer.decode(ids[:k]), req.stop)
      if hit is not None:
        ids, reason, matched = ids[:k], "stop", hit[1]
        break
    if len(ids) > req.sampling.max_new_tokens:
      ids, reason, matched = ids[:req.sampling.max_new_tokens], "length", None
    elif reason == "eos":
      ids = ids + [self.tokenizer.eos_token_id]
    self.emitted.setdefault(prompt, []).append(ids)
    return Completion(token_ids=ids, logprobs=[-0.5] * len(ids), text=self.tokenizer.decode(ids),
                      finish_reason=reason, matched_stop=matched)
