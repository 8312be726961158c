"""The single prompt format used by generation, repair, SFT, the reward model, RL and eval.

One chat template (the tokenizer's), one system prompt naming the tags. Every stage builds its
prompt ids with `prompt_ids`, so what the policy was trained on is what it is asked at RL and
eval time, and what the reward model scores is what it was trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
  from autotraj_jax.tir.trajectory import Trajectory

SYSTEM_PROMPT = (
    "Solve step by step. Think in <think> </think>. Run Python in <code> </code> and print the "
    "result, or look a fact up with <search> </search>; the output comes back in <result> </result>. "
    "At most three tool calls. End with <answer>The final answer is \\boxed{...}</answer>.")

TOOL_STOPS: dict[str, str] = {"</code>": "code", "</search>": "search", "</calculator>": "calculator"}
ANSWER_STOP = "</answer>"


def messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
  return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def chat_ids(tokenizer, chat: Sequence[dict[str, str]]) -> list[int]:
  """A chat templated up to the assistant header, as token ids."""
  ids = tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
    ids = ids["input_ids"]
  return list(ids)


def prompt_ids(tokenizer, question: str, system: str = SYSTEM_PROMPT) -> list[int]:
  """Chat-templated policy prompt ending with the assistant header, as token ids."""
  return chat_ids(tokenizer, messages(question, system))


def result_block(output: str) -> str:
  """The text inserted after a tool call (mask 0 in training)."""
  return f"\n<result>\n{output}\n</result>\n"


def stop_strings(tools: Sequence[str]) -> tuple[str, ...]:
  closing = {v: k for k, v in TOOL_STOPS.items()}
  return tuple(closing[t] for t in tools if t in closing) + (ANSWER_STOP,)


# ---- the repairer's prompt ---------------------------------------------------------------------

LOW_QUALITY_SYSTEM = (
    "Rewrite a tool-use solution. Below are a question, an earlier solution that gets the right "
    "answer but is poorly written, and a reviewer's notes. Write a new solution from scratch: brief "
    "reasoning in <think> </think> without hedging, <code> or <search> only when needed (at most "
    "three calls), and one final <answer>The final answer is \\boxed{...}</answer>.")

WRONG_ANSWER_SYSTEM = (
    "Rewrite a tool-use solution. Below are a question, an earlier solution that gets a wrong "
    "answer, and a reviewer's notes. Find the mistake (misreading, logic, arithmetic or tool misuse) "
    "and write a new, correct solution from scratch: brief reasoning in <think> </think>, <code> or "
    "<search> when needed (at most three calls), and one final "
    "<answer>The final answer is \\boxed{...}</answer>.")

QUESTION_ONLY_SYSTEM = (
    "Write a clean tool-use solution to the question below: brief reasoning in <think> </think> without "
    "hedging, <code> or <search> only when needed (at most three calls), and one final "
    "<answer>The final answer is \\boxed{...}</answer>.")

# What the repairer is shown: the paper's repairer sees the trajectory; the authors' code, the question.
REPAIR_CONTEXTS = ("trajectory", "question")


def repair_messages(orig: "Trajectory", show_gold: bool, context: str = "trajectory") -> list[dict[str, str]]:
  """The repairer's chat (and the gold answer only if asked). 'trajectory': the prompt depends on the
  failure and the user turn holds the question, the scored trajectory and its diagnosis. 'question':
  one prompt and the question alone, so a repair is a fresh solve that never sees what went wrong."""
  if context not in REPAIR_CONTEXTS:
    raise ValueError(f"repair.context must be one of {REPAIR_CONTEXTS}, got {context!r}")
  if context == "question":
    system, user, ask = QUESTION_ONLY_SYSTEM, f"Question:\n{orig.question}", "Write the solution."
  else:
    system = WRONG_ANSWER_SYSTEM if orig.quality == "wrong" else LOW_QUALITY_SYSTEM
    notes = orig.diagnosis or ["no specific problem found; make it clearer and shorter"]
    user = (f"Question:\n{orig.question}\n\nEarlier solution:\n{orig.text.strip()}\n\n"
            "Reviewer notes:\n" + "\n".join(f"- {n}" for n in notes))
    ask = "Write the improved solution."
  if show_gold and orig.gold is not None:
    user += f"\n\nThe correct final answer is {orig.gold}."
  user += f"\n\n{ask}"
  return [{"role": "system", "content": system}, {"role": "user", "content": user}]
