"""The question-only repairer (the authors' code) next to the paper's: its prompt, its stage variant
`repair:question` / `datasets:question` with files of its own, and the SFT set drawn from them."""

import json
import os

import pytest
from scripted_backend import ScriptedBackend
from test_rollout import EchoTool

from autotraj_jax.pipeline import builders
from autotraj_jax.pipeline import config as C
from autotraj_jax.pipeline.runner import fingerprint, run_stages
from autotraj_jax.pipeline.sft import select_sft, sft_file
from autotraj_jax.pipeline.stages import STAGES as LIBRARY
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.scoring import LOW, PRESETS, WRONG, score_group
from autotraj_jax.tir import prompts, records
from autotraj_jax.tir.format import extract_answer
from autotraj_jax.tir.prompts import repair_messages
from autotraj_jax.tir.trajectory import Segment, ToolCall, Trajectory, iter_repairs, iter_trajectories
from data_gen.repair import repair_queue
from data_gen.stages import STAGES, datasets_stage, repair_stage

QUESTION = "What is 6*7?"
CLEAN = ["<think>multiply</think>\n<code>print(6*7)</code>",
         "<think>done</think>\n<answer>The final answer is \\boxed{42}</answer>"]


def scored_originals(tok):
  """A low-quality (hedging) and a wrong original of one question, scored; real token ids."""
  def traj(tid, first, result, final):
    pieces = [("model", first), ("tool", prompts.result_block(result)), ("model", final)]
    segs = [Segment(kind, list(tok.encode(text, add_special_tokens=False)), text) for kind, text in pieces]
    call = ToolCall("code", first.split("<code>")[1].split("</code>")[0], result, True, 0.0)
    t = Trajectory(id=tid, question_id="q1", question=QUESTION, prompt_ids=prompts.prompt_ids(tok, QUESTION),
                   segments=segs, tool_calls=[call], gold="42", finish_reason="answer")
    t.answer = extract_answer(t.text)
    return t

  low = traj("q1#0", "<think>maybe it is 6*7, probably</think>\n<code>print(6*7)</code>", "42",
             "<think>maybe 42</think>\n<answer>The final answer is \\boxed{42}</answer>")
  wrong = traj("q1#1", "<think>guess</think>\n<code>print(6*8)</code>", "48",
               "<think>ok</think>\n<answer>The final answer is \\boxed{48}</answer>")
  score_group([low, wrong], PRESETS["autotraj"])
  assert (low.quality, wrong.quality) == (LOW, WRONG) and low.diagnosis
  return [low, wrong]


# ---- the prompt -----------------------------------------------------------------------------------

def test_the_question_only_prompt_holds_the_question_and_nothing_of_the_original(demo_tokenizer):
  low, wrong = scored_originals(demo_tokenizer)
  for orig in (low, wrong):
    system, user = (m["content"] for m in repair_messages(orig, show_gold=False, context="question"))
    assert QUESTION in user and system == prompts.QUESTION_ONLY_SYSTEM
    chat = system + user
    assert orig.text.strip() not in chat and "Earlier solution" not in chat and "Reviewer notes" not in chat
    for seg in orig.segments:
      assert seg.text.strip() not in chat
    for note in orig.diagnosis:
      assert note not in chat
    assert "The correct final answer" not in user
  assert "The correct final answer is 42." in repair_messages(wrong, show_gold=True, context="question")[1]["content"]


def test_the_trajectory_prompt_holds_the_question_the_original_and_its_diagnosis(demo_tokenizer):
  low, wrong = scored_originals(demo_tokenizer)
  for orig, system in ((low, prompts.LOW_QUALITY_SYSTEM), (wrong, prompts.WRONG_ANSWER_SYSTEM)):
    msgs = repair_messages(orig, show_gold=False, context="trajectory")
    user = msgs[1]["content"]
    assert msgs[0]["content"] == system and QUESTION in user and orig.text.strip() in user
    assert all(note in user for note in orig.diagnosis)
    assert repair_messages(orig, False) == msgs  # the paper's repairer stays the default
  with pytest.raises(ValueError, match="repair.context"):
    repair_messages(low, False, context="diagnosis")


# ---- the config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda c: c.repair.update(context="diagnosis"),
     r"^config.repair.context = 'diagnosis': must be one of \('trajectory', 'question'\)$"),
    (lambda c: c.repair_variants.question.update(context="both"), r"^config.repair_variants.question.context = 'both'"),
    (lambda c: c.update(stages=("repair:nope",)), r"repair:nope.*repair_variants"),
    (lambda c: c.sft_variants.autotraj_question.update(data="question"), r"config.sft_variants.autotraj_question.data"),
])
def test_bad_repair_contexts_and_variants_are_refused_naming_the_field(edit, message):
  c = C.base_config()
  c.workdir = "/tmp/w"
  edit(c)
  with pytest.raises(C.ConfigError, match=message):
    C.validate(c)


def test_the_plain_stages_depend_on_and_write_what_they_did_and_the_variants_their_own_files():
  c = C.base_config()
  repair, datasets, sft = STAGES["repair"], STAGES["datasets"], LIBRARY["sft"]
  assert repair.reads(c, "") == ("repair", "repairer", "scoring", "backend", "sglang.urls", "engine", "mesh",
                                 "tools", "model.tokenizer_dir", "seed")
  assert "repair_variants.question" in repair.reads(c, "question")
  assert (repair.inputs(c, ""), repair.outputs(c, "")) == (("scored.jsonl",), ("repairs.jsonl",))
  assert repair.outputs(c, "question") == ("repairs_question.jsonl",)
  assert datasets.inputs(c, "") == ("scored.jsonl", "repairs.jsonl")
  assert datasets.outputs(c, "") == ("sft.jsonl", "pairs.jsonl", "hard_cases.jsonl", "report")
  assert datasets.inputs(c, "question") == ("scored.jsonl", "repairs_question.jsonl")
  assert datasets.outputs(c, "question") == ("sft_question.jsonl", "pairs_question.jsonl",
                                             "hard_cases_question.jsonl", "report_question")
  assert sft.inputs(c, "autotraj") == ("sft.jsonl", "policy/checkpoints")
  assert sft.inputs(c, "high_only") == ("sft.jsonl", "policy/checkpoints")
  assert sft.inputs(c, "autotraj_question") == ("sft_question.jsonl", "policy/checkpoints")


def test_select_sft_of_the_question_only_set_keeps_its_repairs():
  def traj(tid, source):
    return Trajectory(id=tid, question_id=tid, question="q", prompt_ids=[1], provenance={"source": source})

  trajs = [traj("a", "generated"), traj("b", "repaired")]
  assert [t.id for t in select_sft(trajs, "autotraj_question")] == ["a", "b"]
  assert [t.id for t in select_sft(trajs, "high_only")] == ["a"]
  assert (sft_file("autotraj_question"), sft_file("autotraj")) == ("sft_question.jsonl", "sft.jsonl")
  with pytest.raises(ValueError, match="sft.data"):
    sft_file("question")


# ---- the variant stages ---------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, demo_tokenizer, monkeypatch):
  """A workdir with scored.jsonl and a repairs.jsonl of the plain stage; a scripted repairer that
  answers only the question-only prompt (any other prompt is a KeyError)."""
  tok = demo_tokenizer
  scored = scored_originals(tok)
  records.write_jsonl(tmp_path / "scored.jsonl", scored)
  with open(tmp_path / "repairs.jsonl", "w") as f:
    f.write('{"not": "read by the variant"}\n')
  script = tuple(prompts.chat_ids(tok, repair_messages(scored[0], show_gold=False, context="question")))
  backend = ScriptedBackend(tok, {script: CLEAN})
  monkeypatch.setattr(builders, "make_backend", lambda config, wd, role="policy", model=None: (tok, backend))
  monkeypatch.setattr(builders, "make_tools", lambda config, wd: {"code": EchoTool()})
  c = C.base_config()
  c.workdir = str(tmp_path)
  c.tools.names = ("code",)
  c.stages = ("repair:question", "datasets:question")
  return c, tmp_path, scored, backend


def test_repair_question_repairs_the_same_queue_into_its_own_files(workdir):
  c, wd, scored, backend = workdir
  before = (wd / "repairs.jsonl").read_bytes()
  C.validate(c)
  run_stages(c, STAGES)
  assert (wd / "repairs.jsonl").read_bytes() == before
  assert not any(os.path.exists(wd / f) for f in ("sft.jsonl", "pairs.jsonl", "hard_cases.jsonl", "report"))
  repairs = list(iter_repairs(str(wd / "repairs_question.jsonl")))
  assert [r.original_id for r in repairs] == [t.id for t in repair_queue(scored, c.repair.max_originals)]
  assert all(r.accepted and r.repaired.prompt_ids == scored[0].prompt_ids for r in repairs)
  sft = list(iter_trajectories(str(wd / "sft_question.jsonl")))
  assert [t.provenance["source"] for t in sft] == ["repaired"]  # the two repairs are one response
  pairs = [json.loads(line) for line in open(wd / "pairs_question.jsonl")]
  assert sorted(p["rejected"]["id"] for p in pairs) == ["q1#0", "q1#1"]
  assert json.loads((wd / "report_question" / "stats.json").read_text())["repairs_accepted"] == 2
  assert sorted(os.listdir(wd / ".done")) == ["datasets:question", "repair:question"]
  marker = Workdir(str(wd)).marker("repair:question")
  assert marker["fingerprint"] == fingerprint(STAGES["repair"], c, Workdir(str(wd)), "question")
  assert marker["fingerprint"]["values"]["repair_variants.question"] == {"context": "question"}
  calls = len(backend.calls)
  run_stages(c, STAGES)  # done: nothing runs again
  assert len(backend.calls) == calls


def test_repair_question_resumes_without_repeating_an_original(workdir):
  c, wd, scored, backend = workdir
  out = wd / "repairs_question.jsonl"
  repair_stage(c, Workdir(str(wd)), "question")
  first, second = out.read_text().splitlines(keepends=True)
  out.write_text(first)  # killed after the first original
  calls = len(backend.calls)
  repair_stage(c, Workdir(str(wd)), "question")
  assert [r.original_id for r in iter_repairs(str(out))] == ["q1#0", "q1#1"]
  assert backend.calls[:calls] == [2, 2] and backend.calls[calls:] == [1, 1]  # only the second, again
  assert out.read_text().splitlines(keepends=True)[1] == second


def test_datasets_of_an_unknown_variant_is_refused(workdir):
  c, wd, _, _ = workdir
  with pytest.raises(C.ConfigError, match=r"'datasets:nope'.*repair_variants"):
    datasets_stage(c, Workdir(str(wd)), "nope")
