"""The single prompt format used by generation, repair, SFT, the reward model, RL and eval.

One chat template (the tokenizer's), one system prompt naming the tags. Every stage builds its
prompt ids with `prompt_ids`, so what the policy was trained on is what it is asked at RL and
eval time, and what the reward model scores is what it was trained on.
"""

from __future__ import annotations

from typing import Sequence

SYSTEM_PROMPT = (
    "Solve step by step. Think in <think> </think>. Run Python in <code> </code> and print the "
    "result, or look a fact up with <search> </search>; the output comes back in <result> </result>. "
    "At most three tool calls. End with <answer>The final answer is \\boxed{...}</answer>.")

TOOL_STOPS: dict[str, str] = {"</code>": "code", "</search>": "search", "</calculator>": "calculator"}
ANSWER_STOP = "</answer>"


def messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
  return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def prompt_ids(tokenizer, question: str, system: str = SYSTEM_PROMPT) -> list[int]:
  """Chat-templated prompt ending with the assistant header, as token ids."""
  ids = tokenizer.apply_chat_template(messages(question, system), add_generation_prompt=True,
                                      tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
    ids = ids["input_ids"]
  return list(ids)


def result_block(output: str) -> str:
  """The text inserted after a tool call (mask 0 in training)."""
  return f"\n<result>\n{output}\n</result>\n"


def stop_strings(tools: Sequence[str]) -> tuple[str, ...]:
  closing = {v: k for k, v in TOOL_STOPS.items()}
  return tuple(closing[t] for t in tools if t in closing) + (ANSWER_STOP,)
