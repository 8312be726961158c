"""The multi-turn tool loop: generate until a tool's closing tag, `</answer>`, EOS or the budget;
run the tool; append its result as mask-0 tokens; continue.

Every live trajectory, whatever its turn, goes into one `backend.generate` call per round, and
the round's tool calls run concurrently. Each request carries the trajectory's whole context;
the backend reuses the KV of earlier turns by prefix, and finished contexts are released. Limits
keep a trajectory well formed: over the call limit the model gets a result saying so, and the
token budget counts model and tool tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
from typing import Callable, Mapping, Sequence

from tqdm.auto import tqdm

from autotraj_jax.distributed import from_primary, is_primary
from autotraj_jax.engine.backend import (
  PROMPT_TOO_LONG,
  GenerationRequest,
  LLMBackend,
  SamplingParams,
  generate_on_all_hosts,
  release_contexts,
)
from autotraj_jax.questions import Query  # re-exported: rollouts take questions as loaded
from autotraj_jax.tir import prompts
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.tools import Tool, ToolResult, safe_call, truncate_middle
from autotraj_jax.tir.trajectory import Segment, ToolCall, Trajectory

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  max_tool_calls: int = 3
  max_response_tokens: int = 1024   # model + tool tokens after the prompt
  max_tokens_per_turn: int = 512
  max_tool_output_chars: int = 1000
  tool_workers: int = 4
  sampling: SamplingParams = SamplingParams()

  def __post_init__(self):
    if self.max_tool_calls < 0 or self.max_response_tokens <= 0 or self.max_tokens_per_turn <= 0:
      raise ValueError(f"invalid rollout limits: {self}")


@dataclasses.dataclass
class _Live:
  traj: Trajectory
  context: list[int]
  calls: int = 0
  used: int = 0
  turn: int = 0


def limit_message(max_calls: int) -> str:
  return f"Tool call limit reached ({max_calls} calls). Answer with what you have."


def _seed(base: int | None, traj_id: str, turn: int) -> int | None:
  if base is None:
    return None
  h = hashlib.sha256(f"{base}/{traj_id}/{turn}".encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _tool_input(model_text_since_result: str, tool: str, closing: str) -> str | None:
  end = model_text_since_result.rfind(closing)
  start = model_text_since_result.rfind(f"<{tool}>", 0, end if end >= 0 else None)
  if start < 0 or end < 0:
    return None
  return model_text_since_result[start + len(tool) + 2:end].strip("\n")


def run_rollouts(backend: LLMBackend, tokenizer, queries: Sequence[Query], tools: Mapping[str, Tool],
                 cfg: RolloutConfig, *, samples_per_query: int = 1, id_prefix: str = "",
                 system_prompt: str = prompts.SYSTEM_PROMPT, progress: bool | str = False,
                 provenance: Mapping[str, object] | None = None,
                 prompt_builder: Callable[[Query], list[int]] | None = None,
                 on_finish: Callable[[int], None] | None = None) -> list[Trajectory]:
  """`samples_per_query` trajectories per query, in query order.

  `prompt_builder` replaces the policy prompt (the repairer's prompt holds the bad trajectory);
  the returned trajectories then carry that prompt, and callers re-attach the policy prompt.
  `progress` shows a bar (a string names it); `on_finish(n)` is told each time n trajectories end.
  """
  stops = prompts.stop_strings(list(tools))
  live = _start(tokenizer, queries, samples_per_query, id_prefix, system_prompt, provenance, prompt_builder)
  finished: list[Trajectory] = [s.traj for s in live]
  bar = tqdm(total=len(live), desc=progress if isinstance(progress, str) else "rollout",
             disable=not progress or not is_primary(), dynamic_ncols=True, unit="traj")
  pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.tool_workers))
  too_long: list[tuple[str, int]] = []
  try:
    while live:
      completions = generate_on_all_hosts(backend, [_request(s, cfg, stops) for s in live])
      pending, still = _advance(live, completions, cfg, too_long)
      # Process 0 runs the tools and the other hosts take its results, so no host drifts.
      results = from_primary(list(pool.map(lambda job: _call(tools, cfg, *job), pending)) if is_primary() else None)
      for (s, tool, text), result in zip(pending, results):
        if _insert_result(s, tool, text, result, tokenizer, cfg):
          still.append(s)
      kept = {id(s) for s in still}
      # Finished contexts will not be continued: the backend may free their prefix-cache rows.
      release_contexts(backend, [s.context for s in live if id(s) not in kept])
      bar.update(len(live) - len(still))
      if on_finish is not None and len(live) > len(still):
        on_finish(len(live) - len(still))
      live = still
    if too_long:
      _warn_too_long(too_long)
  finally:
    pool.shutdown(wait=True)
    bar.close()
    _close_sessions(tools, finished)
  return finished


def _start(tokenizer, queries: Sequence[Query], samples_per_query: int, id_prefix: str, system_prompt: str,
           provenance: Mapping[str, object] | None, prompt_builder: Callable[[Query], list[int]] | None
           ) -> list[_Live]:
  live = []
  for q in queries:
    p_ids = prompt_builder(q) if prompt_builder else prompts.prompt_ids(tokenizer, q.question, system_prompt)
    for k in range(samples_per_query):
      gold = list(q.gold) if isinstance(q.gold, tuple) else q.gold  # as it reads back from JSON
      traj = Trajectory(id=f"{id_prefix}{q.id}#{k}", question_id=q.id, question=q.question, prompt_ids=p_ids,
                        gold=gold, domain=q.domain, provenance={"source": "generated", **(provenance or {})})
      live.append(_Live(traj, list(p_ids)))
  return live


def _request(s: _Live, cfg: RolloutConfig, stops: tuple[str, ...]) -> GenerationRequest:
  budget = cfg.max_response_tokens - s.used
  sampling = dataclasses.replace(cfg.sampling, max_new_tokens=min(cfg.max_tokens_per_turn, budget),
                                 seed=_seed(cfg.sampling.seed, s.traj.id, s.turn))
  return GenerationRequest(tuple(s.context), sampling, stop=stops)


def _advance(live: Sequence[_Live], completions, cfg: RolloutConfig, too_long: list[tuple[str, int]]
             ) -> tuple[list[tuple[_Live, str, str | None]], list[_Live]]:
  """Appends each completion; returns (tool calls to run, trajectories that go on without one)."""
  pending: list[tuple[_Live, str, str | None]] = []
  still: list[_Live] = []
  for s, c in zip(live, completions):
    if c.finish_reason == PROMPT_TOO_LONG:  # ends this trajectory, never the batch
      too_long.append((s.traj.id, len(s.context)))
      _finish(s, PROMPT_TOO_LONG)
      continue
    s.turn += 1
    s.traj.segments.append(Segment("model", list(c.token_ids), c.text, c.logprobs))
    s.context += c.token_ids
    s.used += len(c.token_ids)
    if c.finish_reason == "stop" and c.matched_stop in prompts.TOOL_STOPS:
      tool = prompts.TOOL_STOPS[c.matched_stop]
      pending.append((s, tool, _tool_input(_text_since_result(s.traj), tool, c.matched_stop)))
    elif c.finish_reason == "stop" and c.matched_stop == prompts.ANSWER_STOP:
      _finish(s, "answer")
    elif c.finish_reason == "eos":
      _finish(s, "eos")
    elif s.used >= cfg.max_response_tokens:
      _finish(s, "budget")
    else:
      still.append(s)  # cut by the per-turn limit: keep generating next round
  return pending, still


def _insert_result(s: _Live, tool: str, text: str | None, result: ToolResult, tokenizer, cfg: RolloutConfig) -> bool:
  """Appends a tool result as mask-0 tokens; False when it ends the trajectory (the budget)."""
  s.calls += 1
  block = prompts.result_block(truncate_middle(result.output, cfg.max_tool_output_chars))
  ids = list(tokenizer.encode(block, add_special_tokens=False))
  room = cfg.max_response_tokens - s.used
  cut = len(ids) > room
  ids = ids[:max(room, 0)]
  s.traj.segments.append(Segment("tool", ids, tokenizer.decode(ids)))
  s.traj.tool_calls.append(ToolCall(tool=tool, input=text or "", output=result.output, ok=result.ok,
                                    elapsed_s=result.elapsed_s, error=result.error))
  s.context += ids
  s.used += len(ids)
  if cut or s.used >= cfg.max_response_tokens:
    _finish(s, "budget")
    return False
  return True


def _close_sessions(tools: Mapping[str, Tool], finished: Sequence[Trajectory]) -> None:
  for t in tools.values():
    close = getattr(t, "close_session", None)
    if close is not None:
      for traj in finished:
        try:
          close(traj.id)
        except Exception:  # a tool's cleanup must not lose finished trajectories
          pass


def _text_since_result(traj: Trajectory) -> str:
  out = []
  for seg in reversed(traj.segments):
    if seg.kind == "tool":
      break
    out.append(seg.text)
  return "".join(reversed(out))


def _call(tools: Mapping[str, Tool], cfg: RolloutConfig, s: _Live, tool: str, text: str | None) -> ToolResult:
  if s.calls >= cfg.max_tool_calls:
    return ToolResult(output=limit_message(cfg.max_tool_calls), ok=False, elapsed_s=0.0, error="call limit")
  if text is None:
    return ToolResult(output=f"No <{tool}> block to run.", ok=False, elapsed_s=0.0, error="no opening tag")
  return safe_call(tool, lambda: tools[tool](text, session=s.traj.id))


def _warn_too_long(cases: Sequence[tuple[str, int]]) -> None:
  """One warning per call, however many trajectories it ended."""
  (first, length), n = cases[0], len(cases)
  log.warning("%d trajector%s ended with finish_reason %r (first: %s, context of %d tokens): the backend "
              "cannot take such prompts; raise engine.prompt_buckets (or the server's context length)",
              n, "y" if n == 1 else "ies", PROMPT_TOO_LONG, first, length)


def _finish(s: _Live, reason: str) -> None:
  s.traj.finish_reason = reason
  s.traj.answer = extract_answer(s.traj.text)
