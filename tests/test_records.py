"""The record layer: typed, versioned stage-1 records, strict field checks, the metrics log."""

import copy
import json

import pytest

from autotraj_jax.metrics import MetricWriter, read_metrics
from autotraj_jax.tir.records import JsonlAppender, RecordError, iter_records, resume, write_json, write_jsonl
from autotraj_jax.tir.trajectory import (
  PreferencePair,
  RepairRecord,
  Segment,
  ToolCall,
  Trajectory,
  iter_pairs,
  iter_repairs,
  iter_trajectories,
)


def traj(tid="q1#0", qid="q1", **kw):
  return Trajectory(
      id=tid, question_id=qid, question="6*7?", prompt_ids=[1, 2, 3],
      segments=[Segment("model", [4, 5], "<code>x</code>", [-0.1, -0.2]), Segment("tool", [6], "<result>42</result>"),
                Segment("model", [7], "<answer>42</answer>", [-0.3])],
      tool_calls=[ToolCall("code", "x", "42", True, 0.01)], finish_reason="answer", answer="42",
      scores={"total": 0.9}, diagnosis=["slow"], provenance={"source": "generated"},
      **{"gold": "42", "quality": "high", **kw})


def lines(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


# ---- Trajectory.from_dict: every field, at any depth -------------------------------------------

BAD_TRAJECTORIES = [
    (lambda d: d.update(prompt_ids=["a"]), r"field prompt_ids\[0\] must be int, got str"),
    (lambda d: d.update(prompt_ids=[1, True]), r"field prompt_ids\[1\] must be int, got bool"),
    (lambda d: d.update(prompt_ids=[1.5]), r"field prompt_ids\[0\] must be int, got float"),
    (lambda d: d.update(prompt_ids="123"), r"field prompt_ids must be a list, got str"),
    (lambda d: d["segments"][1].update(token_ids=[6, "7"]), r"field segments\[1\]\.token_ids\[1\] must be int"),
    (lambda d: d["segments"][0].update(token_ids=[False, 5]),
     r"field segments\[0\]\.token_ids\[0\] must be int, got bool"),
    (lambda d: d["segments"][0].update(logprobs=[-0.1, "x"]), r"field segments\[0\]\.logprobs\[1\] must be a number"),
    (lambda d: d["segments"][0].update(logprobs=[-0.1, None]),
     r"field segments\[0\]\.logprobs\[1\] must be a number, got null"),
    (lambda d: d["segments"][0].update(logprobs=[-0.1]), r"field segments\[0\]\.logprobs has 1 entries for 2 tokens"),
    (lambda d: d["segments"][2].update(text=7), r"field segments\[2\]\.text must be str, got int"),
    (lambda d: d["segments"][2].update(kind="user"), r"field segments\[2\]\.kind must be one of 'model', 'tool'"),
    (lambda d: d["segments"].__setitem__(0, "text"), r"field segments\[0\] must be an object, got str"),
    (lambda d: d["segments"][1].pop("token_ids"), r"missing field segments\[1\]\.token_ids"),
    (lambda d: d.update(gold=5), r"field gold must be a string, a non-empty list of strings or null, got int"),
    (lambda d: d.update(gold=["42", 42]), r"field gold\[1\] must be str, got int"),
    (lambda d: d.update(gold=[]), r"field gold must be .* got an empty list"),
    (lambda d: d.update(version="1"), r"field version must be int, got str"),
    (lambda d: d.update(version=True), r"field version must be int, got bool"),
    (lambda d: d.update(version=2), r"unsupported trajectory schema version 2"),
    (lambda d: d.update(id=3), r"field id must be str, got int"),
    (lambda d: d.update(answer=42), r"field answer must be str, got int"),
    (lambda d: d.update(scores={"total": "high"}), r"field scores\.total must be a number, got str"),
    (lambda d: d.update(diagnosis="slow"), r"field diagnosis must be a list, got str"),
    (lambda d: d.update(provenance=[]), r"field provenance must be an object, got list"),
    (lambda d: d["tool_calls"][0].update(ok="yes"), r"field tool_calls\[0\]\.ok must be bool, got str"),
    (lambda d: d["tool_calls"][0].update(elapsed_s="1s"), r"field tool_calls\[0\]\.elapsed_s must be a number"),
    (lambda d: d["tool_calls"][0].update(error=1), r"field tool_calls\[0\]\.error must be str, got int"),
]


@pytest.mark.parametrize("mutate, message", BAD_TRAJECTORIES, ids=[m for _, m in BAD_TRAJECTORIES])
def test_wrong_typed_trajectory_fields_name_file_line_and_path(tmp_path, mutate, message):
  good = traj().to_dict()
  bad = copy.deepcopy(good)
  mutate(bad)
  path = lines(tmp_path / "t.jsonl", [good, bad])
  with pytest.raises(RecordError, match=r"t\.jsonl:2: " + message):
    list(iter_trajectories(path))


def test_trajectory_round_trip_and_lenient_optional_fields(tmp_path):
  t = traj(gold=["42", "forty-two"])
  assert Trajectory.from_dict(json.loads(t.to_json())) == t
  minimal = {"id": "a", "question_id": "q", "question": "?", "prompt_ids": [1], "segments": []}
  back = Trajectory.from_dict(minimal)
  assert back.gold is None and back.tool_calls == [] and back.version == 1 and back.domain == "math"
  assert Trajectory.from_dict({**minimal, "future_field": 1}).id == "a"  # unknown keys are ignored
  with pytest.raises(RecordError, match=r"^record: expected a trajectory object, got list"):
    Trajectory.from_dict([1])


# ---- iter_records: bytes, cut lines ------------------------------------------------------------


def test_non_utf8_line_names_file_and_line(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_bytes(traj().to_json().encode() + b"\n" + b'{"id": "caf\xe9"}\n')
  with pytest.raises(RecordError, match=r"t\.jsonl:2: not UTF-8 \(byte 0xe9 at column 12\)"):
    list(iter_trajectories(path))


def test_cut_last_line_is_skipped_or_kept_on_request(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_bytes(b'{"a": 1}\n\n{"a": 2}')
  assert list(iter_records(path)) == [{"a": 1}]
  assert list(iter_records(path, keep_unterminated=True)) == [{"a": 1}, {"a": 2}]
  path.write_bytes(b'{"a": 1}\n{"a": ')
  with pytest.raises(RecordError, match=r"r\.jsonl:2: invalid JSON"):
    list(iter_records(path, keep_unterminated=True))


def test_writers_are_atomic_and_resume_drops_incomplete_groups(tmp_path):
  path = tmp_path / "out" / "x.jsonl"
  assert write_jsonl(path, [{"k": "a"}, traj()]) == 2
  assert not (tmp_path / "out" / "x.jsonl.tmp").exists()
  with JsonlAppender(path) as w:
    w.write({"k": "b", "n": 1})
  with open(path, "a") as f:
    f.write('{"k": "b", "n"')  # killed mid-write
  kept, done = resume(path, lambda d, where: d, key=lambda d: d.get("k", "traj"),
                      complete=lambda g: len(g) >= 1 and g[-1].get("n", 2) == 2)
  assert done == {"a", "traj"} and [d.get("k") for d in kept] == ["a", None]
  assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2
  write_json(tmp_path / "s.json", {"x": [1]})
  assert json.loads((tmp_path / "s.json").read_text()) == {"x": [1]}


# ---- RepairRecord / PreferencePair -------------------------------------------------------------


def repair_record(accepted=True):
  orig = traj("q1#1", quality="low")
  attempts = [(traj("q1#1/repair0"), ["score 0.5 below 0.86"]), (traj("q1#1/repair1"), [])]
  return RepairRecord(original_id=orig.id, accepted=accepted, repaired=attempts[1][0] if accepted else None,
                      attempts=attempts if accepted else attempts[:1])


def test_repair_record_layout_round_trip_and_reader(tmp_path):
  rec = repair_record()
  d = rec.to_dict()
  # Today's repairs.jsonl layout, plus the version.
  assert list(d) == ["original_id", "accepted", "repaired", "attempts", "version"]
  assert d["repaired"] == rec.repaired.to_dict() and d["version"] == 1
  assert d["attempts"] == [{"trajectory": t.to_dict(), "reasons": r} for t, r in rec.attempts]
  assert RepairRecord.from_dict(json.loads(json.dumps(d))) == rec
  legacy = {k: v for k, v in d.items() if k != "version"}  # files written before records had versions
  hard = repair_record(accepted=False).to_dict()
  path = lines(tmp_path / "repairs.jsonl", [legacy, hard])
  back = list(iter_repairs(path))
  assert back[0] == rec and back[1].repaired is None and back[1].attempts[0][1] == ["score 0.5 below 0.86"]


BAD_REPAIRS = [
    (lambda d: d.update(accepted="true"), r"field accepted must be bool, got str"),
    (lambda d: d.update(accepted=False), r"field accepted is false but repaired is a trajectory"),
    (lambda d: d.update(repaired=None), r"field accepted is true but repaired is null"),
    (lambda d: d["repaired"].update(prompt_ids=["a"]), r"field repaired\.prompt_ids\[0\] must be int, got str"),
    (lambda d: d["attempts"][1]["trajectory"]["segments"][0].update(token_ids=[1.0]),
     r"field attempts\[1\]\.trajectory\.segments\[0\]\.token_ids\[0\] must be int, got float"),
    (lambda d: d["attempts"][0].update(reasons="bad"), r"field attempts\[0\]\.reasons must be a list, got str"),
    (lambda d: d["attempts"][0].pop("trajectory"), r"missing field attempts\[0\]\.trajectory"),
    (lambda d: d.pop("original_id"), r"missing field original_id"),
    (lambda d: d.update(version="1"), r"field version must be int, got str"),
    (lambda d: d.update(version=3), r"unsupported repair record schema version 3"),
]


@pytest.mark.parametrize("mutate, message", BAD_REPAIRS, ids=[m for _, m in BAD_REPAIRS])
def test_bad_repair_records(tmp_path, mutate, message):
  bad = repair_record().to_dict()
  mutate(bad)
  with pytest.raises(RecordError, match=r"repairs\.jsonl:1: " + message):
    list(iter_repairs(lines(tmp_path / "repairs.jsonl", [bad])))


def pair():
  return PreferencePair(id="q1#1>q1#1/repair0", question_id="q1", failure_type="low",
                        chosen=traj("q1#1/repair0"), rejected=traj("q1#1", quality="low"))


def test_preference_pair_layout_round_trip_and_reader(tmp_path):
  p = pair()
  d = p.to_dict()
  assert list(d) == ["id", "question_id", "failure_type", "chosen", "rejected", "version"]
  assert d["chosen"] == p.chosen.to_dict() and d["rejected"] == p.rejected.to_dict()
  legacy = {k: v for k, v in d.items() if k != "version"}
  assert list(iter_pairs(lines(tmp_path / "pairs.jsonl", [d, legacy]))) == [p, p]


BAD_PAIRS = [
    (lambda d: d.update(failure_type="high"), r"field failure_type must be one of 'low', 'wrong', got 'high'"),
    (lambda d: d["chosen"].update(question_id="q2"), r"field chosen\.question_id is 'q2' but the pair's question_id"),
    (lambda d: d["rejected"].update(gold=5), r"field rejected\.gold must be a string"),
    (lambda d: d.update(chosen="q1#0"), r"field chosen must be an object, got str"),
    (lambda d: d.pop("id"), r"missing field id"),
]


@pytest.mark.parametrize("mutate, message", BAD_PAIRS, ids=[m for _, m in BAD_PAIRS])
def test_bad_pairs(tmp_path, mutate, message):
  bad = pair().to_dict()
  mutate(bad)
  with pytest.raises(RecordError, match=r"pairs\.jsonl:1: " + message):
    list(iter_pairs(lines(tmp_path / "pairs.jsonl", [bad])))


# ---- metrics.jsonl ------------------------------------------------------------------------------


def _log(logdir, steps, start_step=None, **extra):
  w = MetricWriter(logdir, start_step, tensorboard=False)
  for s in steps:
    w.write(s, {"loss": float(s), **extra})
  w.close()


def test_resumed_metric_writer_logs_each_step_once(tmp_path):
  _log(tmp_path, range(1, 11))                    # killed after step 10, last checkpoint at 6
  _log(tmp_path, range(7, 13), start_step=6, again=1.0)
  raw = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in raw] == list(range(1, 13))
  assert all(("again" in r) == (r["step"] > 6) for r in raw)
  assert read_metrics(tmp_path) == raw


def test_resumed_metric_writer_drops_a_cut_line_and_purges_tensorboard(tmp_path):
  _log(tmp_path, [1, 2])
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  _log(tmp_path, [3])                              # appending never glues onto the cut line
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  w = MetricWriter(tmp_path, 2)                    # TensorBoard is told to forget steps > 2
  assert w._tb is not None and w._tb.purge_step == 3  # pylint: disable=protected-access
  w.close()
  with pytest.raises(ValueError, match="start_step"):
    MetricWriter(tmp_path, -1, tensorboard=False)


def test_read_metrics_keeps_the_last_record_of_a_repeated_step(tmp_path):
  rows = [{"step": 1, "time": 0, "loss": 3.0}, {"step": 2, "time": 0, "loss": 2.0},
          {"step": 2, "time": 0, "eval/acc": 0.5},    # same step, other metrics: kept
          {"step": 3, "time": 0, "loss": 1.0},
          {"step": 2, "time": 1, "loss": 2.5},         # an old file: the resumed run logged step 2 again
          {"step": 3, "time": 1, "loss": 1.5}]
  lines(tmp_path / "metrics.jsonl", rows)
  got = read_metrics(tmp_path)
  assert [(r["step"], r.get("loss", r.get("eval/acc"))) for r in got] == [(1, 3.0), (2, 0.5), (2, 2.5), (3, 1.5)]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 1}\n')
  with pytest.raises(RecordError, match=r"metrics\.jsonl:2: a metrics record needs an int field step"):
    read_metrics(tmp_path)
