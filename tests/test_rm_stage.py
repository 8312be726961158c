import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autotraj_jax import checkpoint
from autotraj_jax import sharding as shd
from autotraj_jax.metrics import read_metrics
from autotraj_jax.models import abstract_model, get_preset
from autotraj_jax.pipeline import rm as rm_pipeline
from autotraj_jax.pipeline.builders import is_held_out
from autotraj_jax.pipeline.config import base_config
from autotraj_jax.pipeline.workdir import Workdir
from autotraj_jax.tir.prompts import prompt_ids
from autotraj_jax.tir.trajectory import PreferencePair, Segment, Trajectory
from autotraj_jax.training import data as data_lib
from autotraj_jax.training import reward_model as rm
from autotraj_jax.training import rm_scorer
from autotraj_jax.training.reward_model import bradley_terry_loss
from autotraj_jax.training.step import init_state, make_train_step

CFG = get_preset("tiny", num_layers=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(cfg, seed):
  """Host-random scalar-model params (no init compile); every weight matters, the head included."""
  graphdef, abstract = abstract_model(cfg, "scalar")
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract)


def init_params(cfg, kind, seed):
  """Params as a fresh model has them (N(0, 0.02) weights, unit norms, zero head), drawn on the
  host: eager init on the fake devices compiles every op and costs seconds."""
  graphdef, abstract = abstract_model(cfg, kind)
  rng = np.random.default_rng(seed)

  def one(path, a):
    name = shd.path_str(path)
    if name.endswith("norm/weight"):
      return jnp.ones(a.shape, a.dtype)
    if name.endswith("bias") or name == "score":
      return jnp.zeros(a.shape, a.dtype)
    return jnp.asarray(rng.normal(size=a.shape) * 0.02, a.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(one, abstract)


_scores = jax.jit(rm_scorer.sequence_scores, static_argnums=0)


def forward_scores(graphdef, params, seqs, L):
  """Scores of sequences in a forward of their own."""
  return np.asarray(_scores(graphdef, params, *rm.pad_sequences(seqs, L, 0)))


# ---- inputs and batches --------------------------------------------------------------------------


def test_rm_input_drops_trailing_end_ids_only():
  t = Trajectory(id="t", question_id="q", question="?", prompt_ids=[5, 0, 6],
                 segments=[Segment("model", [7, 0, 8], "a"), Segment("tool", [9], "r"),
                           Segment("model", [10, 0, 0], "b")])
  assert rm.rm_input(t) == [5, 0, 6, 7, 0, 8, 9, 10, 0, 0]
  assert rm.rm_input(t, {0}) == [5, 0, 6, 7, 0, 8, 9, 10]  # inner pads and the prompt stay
  empty = Trajectory(id="e", question_id="q", question="?", prompt_ids=[5, 0], segments=[Segment("model", [0], "")])
  assert rm.rm_input(empty, {0}) == [5, 0]


def test_collate_pairs_shapes_last_index_and_truncation():
  ex = [{"tokens": [[1, 2, 3], [4, 5]], "margin": 0.5}, {"tokens": [[6] * 7, [7]], "margin": 0.0}]
  b = rm.collate_pairs(ex, (4, 8), pad_id=0)
  assert b["tokens"].shape == (2, 2, 8) and b["valid"].shape == (2, 2, 8)
  np.testing.assert_array_equal(b["last"], [[2, 1], [6, 0]])
  np.testing.assert_array_equal(b["valid"].sum(-1), [[3, 2], [7, 1]])
  np.testing.assert_array_equal(b["tokens"][0, 1, :3], [4, 5, 0])
  np.testing.assert_allclose(b["margin"], [0.5, 0.0])
  assert b["margin"].dtype == np.float32 and b["last"].dtype == np.int32
  # Longer than the largest bucket: capped, the last index the bucket's last position.
  long = rm.collate_pairs([{"tokens": [list(range(1, 12)), [3, 4]], "margin": 0.0}], (4, 8), pad_id=0)
  assert long["tokens"].shape == (1, 2, 8)
  np.testing.assert_array_equal(long["last"], [[7, 1]])
  assert long["valid"][0, 0].all() and long["tokens"][0, 0, -1] == 8
  with pytest.raises(ValueError, match="2 sequences"):
    rm.collate_pairs([{"tokens": [[1]], "margin": 0.0}], (4,), 0)


def test_pair_batches_through_the_data_pipeline():
  rng = np.random.default_rng(0)
  ex = [{"tokens": [rng.integers(1, 50, rng.integers(2, 30)).tolist() for _ in range(2)], "margin": 0.1}
        for _ in range(40)]
  assert data_lib.example_length(ex[0]) == max(map(len, ex[0]["tokens"]))
  assert data_lib.example_length({"tokens": [1, 2, 3]}) == 3
  ds = data_lib.batch_dataset(ex, batch_size=8, buckets=(16, 32), seed=0, group_by_length=True,
                              collate_fn=rm.collate_pairs)
  batch = next(iter(ds))
  assert batch["tokens"].shape[:2] == (8, 2) and batch["last"].shape == (8, 2) and batch["margin"].shape == (8,)
  micro = data_lib.split_micro(batch, 2)
  assert micro["tokens"].shape[:3] == (2, 4, 2) and micro["margin"].shape == (2, 4)


# ---- the loss ------------------------------------------------------------------------------------


def test_one_forward_pair_loss_equals_separate_scores():
  graphdef, params = random_params(CFG, seed=1)
  rng = np.random.default_rng(1)
  ex = [{"tokens": [rng.integers(1, CFG.vocab_size, rng.integers(3, 12)).tolist() for _ in range(2)],
         "margin": float(m)} for m in (0.0, 0.5, 1.0)]
  batch = rm.collate_pairs(ex, (12,), 0)
  s, c, aux = jax.jit(rm.make_rm_loss(graphdef, center_coef=0.1))(params, batch, jax.random.key(0))
  rc = forward_scores(graphdef, params, [e["tokens"][0] for e in ex], 12)
  rr = forward_scores(graphdef, params, [e["tokens"][1] for e in ex], 12)
  assert np.min(np.abs(rc - rr)) > 1e-3  # the pairs really differ
  want = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin=batch["margin"], center_coef=0.1)
  np.testing.assert_allclose(float(s), float(want[0]), rtol=1e-5)
  assert float(c) == 3
  np.testing.assert_allclose(float(aux["margin"]), float(np.sum(rc - rr)), rtol=1e-5, atol=1e-5)


def test_rm_learns_a_marker_token():
  """Chosen sequences contain a marker token, rejected ones do not: held-out accuracy > 0.9."""
  marker = 3
  rng = np.random.default_rng(0)

  def pair():  # the marker replaces one token anywhere: the score must attend back to it
    n = int(rng.integers(4, 14))
    rejected = rng.integers(4, CFG.vocab_size, n).tolist()
    chosen = list(rejected)
    chosen[int(rng.integers(0, n))] = marker
    return {"tokens": [chosen, rejected], "margin": 0.0}

  train, held = [pair() for _ in range(256)], [pair() for _ in range(64)]
  graphdef, params = init_params(CFG, "scalar", seed=0)
  opt = optax.adam(5e-3)
  step = jax.jit(make_train_step(rm.make_rm_loss(graphdef, center_coef=0.01), opt))
  state = init_state(params, opt, seed=0)
  scores = rm_scorer.make_pair_eval(graphdef, held, buckets=(16,), batch_size=64, pad_id=0)
  assert rm_scorer.pair_metrics(*scores(state.params))["pair_accuracy"] < 0.9
  for i in range(30):
    batch = rm.collate_pairs(train[(i * 16) % 256:][:16], (16,), 0)
    state, metrics = step(state, data_lib.split_micro(batch, 1))
  m = rm_scorer.pair_metrics(*scores(state.params))
  assert m["pair_accuracy"] > 0.9 and m["pair_margin"] > 0


# ---- the stage on a tiny synthetic workdir -------------------------------------------------------

RM_CFG = dict(init="policy", steps=4, batch_size=8, micro_batch_size=0, learning_rate=3e-3, warmup_steps=1,
              buckets=(160,), margin_low=0.0, margin_wrong=0.5, center_coef=0.01,
              eval_every=2, max_score_samples=4, log_every=1, checkpoint_every=2)


def make_config(tokenizer_dir, heldout_fraction=0.25, **rm_overrides):
  c = base_config()
  c.model.tokenizer_dir = tokenizer_dir
  c.heldout_fraction = heldout_fraction
  c.rm.update({**RM_CFG, **rm_overrides})
  return c


SEGMENTS = {
    "high": ["<think>I will use Python.</think>\n<code>\nprint({a}*{b})\n</code>", "\n<result>\n{c}\n</result>\n",
             "<answer>The final answer is \\boxed{{{c}}}</answer>"],
    "low": ["<think>Maybe, I guess, let me think again and again.</think>\n<code>\nprint({a}*{b})\n</code>",
            "\n<result>\n{c}\n</result>\n", "<answer>The final answer is \\boxed{{{c}}}</answer>"],
    "wrong": ["<think>I guess.</think>", "<answer>The final answer is \\boxed{{{a}}}</answer>"],
}


def make_traj(tok, qid, k, quality, a, b, eos=False):
  question = f"What is {a} times {b}?"
  segs = []
  for text in SEGMENTS[quality]:
    text = text.format(a=a, b=b, c=a * b)
    ids = tok.encode(text, add_special_tokens=False)
    segs.append(Segment("tool" if "<result>" in text else "model", ids, text))
  if eos:
    segs[-1].token_ids.append(tok.eos_token_id)
  return Trajectory(id=f"{qid}#{k}", question_id=qid, question=question, prompt_ids=prompt_ids(tok, question),
                    segments=segs, quality=quality, finish_reason="eos" if eos else "answer", gold=str(a * b))


def write_inputs(root, tok, num_questions):
  """pairs.jsonl (two pairs per question: low and wrong originals) and scored.jsonl."""
  rng = np.random.default_rng(0)
  pairs, scored = [], []
  for q in range(num_questions):
    a, b, qid = int(rng.integers(2, 99)), int(rng.integers(2, 99)), f"q{q}"
    good = make_traj(tok, qid, 0, "high", a, b, eos=q % 2 == 0)
    low, wrong = make_traj(tok, qid, 1, "low", a, b), make_traj(tok, qid, 2, "wrong", a, b, eos=True)
    scored += [good, low, wrong]
    for orig in (low, wrong):
      pairs.append(PreferencePair(id=f"{orig.id}>{good.id}", question_id=qid, failure_type=orig.quality,
                                  chosen=good, rejected=orig))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "pairs.jsonl"), "w") as f:
    f.writelines(json.dumps(p.to_dict()) + "\n" for p in pairs)
  with open(os.path.join(root, "scored.jsonl"), "w") as f:
    f.writelines(t.to_json() + "\n" for t in scored)
  return pairs


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, demo_tokenizer):
  """A template workdir: inputs and a tiny policy checkpoint, copied by each run."""
  root = str(tmp_path_factory.mktemp("rm_template"))
  pairs = write_inputs(root, demo_tokenizer, num_questions=16)
  cfg = get_preset("tiny", num_layers=1, vocab_size=len(demo_tokenizer))
  _, params = init_params(cfg, "causal_lm", seed=3)
  checkpoint.save_model(os.path.join(root, "policy", "checkpoints"), params, cfg)
  return root, pairs


def copy_workdir(template, dst):
  shutil.copytree(template, dst)
  return Workdir(str(dst))


STAGE_SCRIPT = """
import json, os, signal, subprocess, sys
spec = json.loads(sys.argv[2])
sys.path.insert(0, spec["repo"])
import ml_collections
from autotraj_jax import metrics
from autotraj_jax.pipeline.rm import rm_stage
from autotraj_jax.pipeline.workdir import Workdir

def run(root):
  rm_stage(ml_collections.ConfigDict(spec["config"]), Workdir(root))

if sys.argv[1] == "kill":
  write = metrics.MetricWriter.write
  def killing_write(self, step, scalars):
    write(self, step, scalars)
    if step == spec["kill_at"] and "loss" in scalars:
      os.kill(os.getpid(), signal.SIGKILL)  # mid-run: the step is done but not checkpointed
  metrics.MetricWriter.write = killing_write
  run(spec["cut"])
else:
  run(spec["full"])
  open(spec["full_done"], "w").close()
  seen = {"kill_rc": subprocess.run([sys.executable, __file__, "kill", sys.argv[2]]).returncode}
  ckpts = os.path.join(spec["cut"], "rm", "checkpoints")
  seen["steps_after_kill"] = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  seen["eval_after_kill"] = os.path.exists(os.path.join(spec["cut"], "rm", "eval.json"))
  run(spec["cut"])  # the rerun, in this process
  with open(spec["summary"], "w") as f:
    json.dump(seen, f)
"""


class StageRuns:
  """The stage in a background process: uninterrupted on one workdir copy, then on another one
  in a child SIGKILLed after step 3 (checkpoint at 2), then rerun there. It runs alongside the
  in-process tests; a shared persistent compilation cache spares the later runs the compiles."""

  def __init__(self, template: str, config, base):
    self.full, self.cut = copy_workdir(template, base / "full"), copy_workdir(template, base / "cut")
    self.full_done, self.summary, self.log_path = base / "full_done", base / "summary.json", base / "runs.log"
    spec = {"repo": REPO, "config": config.to_dict(), "full": self.full.root, "cut": self.cut.root, "kill_at": 3,
            "full_done": str(self.full_done), "summary": str(self.summary)}
    script = base / "stage_runs.py"
    script.write_text(STAGE_SCRIPT)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(base / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    with open(self.log_path, "wb") as log:
      self.proc = subprocess.Popen([sys.executable, str(script), "driver", json.dumps(spec)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)

  def log_tail(self) -> str:
    return self.log_path.read_text(errors="replace")[-4000:]

  def wait_full(self, timeout: float) -> Workdir:
    deadline = time.monotonic() + timeout
    while not self.full_done.exists():
      assert self.proc.poll() is None, f"the stage process exited early:\n{self.log_tail()}"
      assert time.monotonic() < deadline, "the uninterrupted stage run did not finish in time"
      time.sleep(0.2)
    return self.full

  def wait_all(self, timeout: float) -> dict:
    assert self.proc.wait(timeout) == 0, self.log_tail()
    return json.loads(self.summary.read_text())

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def stage_runs(stage_inputs, demo_tokenizer_dir, tmp_path_factory):
  """Started with the module so that it overlaps the other tests."""
  template, _ = stage_inputs
  runs = StageRuns(template, make_config(demo_tokenizer_dir), tmp_path_factory.mktemp("rm_runs"))
  yield runs
  runs.stop()


@pytest.fixture(scope="module")
def rm_run(stage_runs, stage_inputs, demo_tokenizer_dir):
  """The uninterrupted run's workdir."""
  return stage_runs.wait_full(timeout=400), make_config(demo_tokenizer_dir), stage_inputs[1]


def test_rm_stage_writes_eval_plot_and_hf(rm_run):
  wd, _, pairs = rm_run
  with open(wd.path("rm", "eval.json")) as f:
    ev = json.load(f)
  assert ev["trained"] and ev["steps"] == 4 and ev["truncated_pairs"] == 0
  held = [p for p in pairs if is_held_out(p.question_id, 0.25, seed=0)]  # the same rule as SFT's
  assert ev["total_pairs"] == len(pairs) and ev["pairs"] + ev["train_pairs"] == len(pairs)
  assert ev["pairs"] == len(held) > 0
  assert 0.0 <= ev["pair_accuracy"] <= 1.0 and np.isfinite(ev["pair_margin"])
  assert set(ev["pair_accuracy_by_failure"]) == {"low", "wrong"}
  assert {q: s["n"] for q, s in ev["scores"].items()} == {"high": 4, "low": 4, "wrong": 4}
  assert all(np.isfinite(s["mean"]) and s["std"] >= 0 for s in ev["scores"].values())
  with open(wd.path("rm", "scores.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  hf_dir = wd.path("rm", "hf")
  config = json.load(open(os.path.join(hf_dir, "config.json")))
  assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] == 0
  assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= set(os.listdir(hf_dir))
  logs = read_metrics(wd.path("rm", "logs"))
  assert [r["step"] for r in logs if "loss" in r] == list(range(1, 5))
  assert [r["step"] for r in logs if "eval/pair_accuracy" in r] == [2, 4]
  cfg, kind, _ = checkpoint.load_model(wd.path("rm", "checkpoints"))
  assert kind == "scalar" and cfg.num_layers == 1


def test_init_rm_params_keeps_the_transformer(stage_inputs, tmp_path):
  template, _ = stage_inputs
  ckpt = os.path.join(template, "policy", "checkpoints")
  _, _, lm = checkpoint.load_model(ckpt)
  cfg, params = rm.init_rm_params(ckpt, seed=0)
  assert set(params) == {"model", "score"} and params["score"].shape == (cfg.hidden_size,)
  for a, b in zip(jax.tree.leaves(params["model"]), jax.tree.leaves(lm["model"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 0 < float(jnp.std(params["score"])) < 0.1
  np.testing.assert_array_equal(rm.init_rm_params(ckpt, seed=0)[1]["score"], params["score"])
  # An untied policy's lm_head is dropped.
  untied = get_preset("tiny", num_layers=1, tie_embeddings=False)
  lm_params = init_params(untied, "causal_lm", seed=1)[1]
  assert "lm_head" in lm_params
  checkpoint.save_model(tmp_path / "untied", lm_params, untied)
  assert set(rm.init_rm_params(tmp_path / "untied", seed=0)[1]) == {"model", "score"}


def test_scorer_matches_training_forward_and_raw_text(rm_run, demo_tokenizer):
  wd, _, pairs = rm_run
  scorer = rm_scorer.RewardModelScorer(wd.path("rm", "checkpoints"), demo_tokenizer, buckets=(128, 160), batch_size=4)
  cfg, _, params = checkpoint.load_model(wd.path("rm", "checkpoints"))
  graphdef, _ = abstract_model(cfg, "scalar")
  ex = [rm.pair_example(p, demo_tokenizer) for p in pairs[:3]]
  rc, rr = jax.jit(lambda p, b: rm.pair_forward(graphdef, p, b))(params, rm.collate_pairs(ex, (160,), 0))
  trajs = [t for p in pairs[:3] for t in (p.chosen, p.rejected)]
  got = scorer(trajs)
  np.testing.assert_allclose(got, np.stack([rc, rr], 1).reshape(-1), rtol=1e-5, atol=1e-5)
  assert np.std(got) > 1e-4
  assert scorer.num_compiles == 2 and scorer.truncated == 0  # the 128 and 160 buckets, batches of 4
  assert scorer(trajs[::-1]) == pytest.approx(got[::-1], abs=1e-6) and scorer.num_compiles == 2
  # Raw text through the chat prompt scores as the Trajectory with the same text.
  t = pairs[1].chosen
  assert t.response_ids[-1] == demo_tokenizer.eos_token_id  # an eos-terminated response
  assert rm.rm_input(t, scorer.end_ids)[len(t.prompt_ids):] == demo_tokenizer.encode(t.text, add_special_tokens=False)
  assert scorer.score_question(t.question, t.text) == pytest.approx(scorer([t])[0], abs=1e-6)
  assert scorer.score_question(t.question, t.text + " Maybe.") != pytest.approx(scorer([t])[0], abs=1e-6)


def test_hf_sequence_classifier_matches(rm_run, demo_tokenizer):
  torch = pytest.importorskip("torch")
  import transformers
  wd, _, pairs = rm_run
  scorer = rm_scorer.RewardModelScorer(wd.path("rm", "checkpoints"), demo_tokenizer, buckets=(160,), batch_size=4)
  trajs = [t for p in pairs[:2] for t in (p.chosen, p.rejected)]
  seqs = [rm.rm_input(t, scorer.end_ids) for t in trajs]
  tokens, valid, _ = rm.pad_sequences(seqs, max(map(len, seqs)), demo_tokenizer.pad_token_id)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(wd.path("rm", "hf")).eval()
  with torch.no_grad():
    ref = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid, dtype=torch.long)).logits
  np.testing.assert_allclose(ref.numpy()[:, 0], scorer(trajs), atol=1e-4, rtol=0)


def test_too_few_pairs_writes_untrained_eval(tmp_path, demo_tokenizer, demo_tokenizer_dir):
  write_inputs(tmp_path, demo_tokenizer, num_questions=3)  # 6 pairs, fewer than a batch of 8
  rm_pipeline.rm_stage(make_config(demo_tokenizer_dir, heldout_fraction=0.0), Workdir(str(tmp_path)))
  with open(tmp_path / "rm" / "eval.json") as f:
    ev = json.load(f)
  assert ev["trained"] is False and "fewer than one batch" in ev["reason"]
  assert ev["total_pairs"] == 6 and ev["train_pairs"] == 6 and ev["pairs"] == 0
  assert not (tmp_path / "rm" / "checkpoints").exists()


def test_rm_stage_resumes_exactly_after_kill(rm_run, stage_runs):
  """Killed after step 3 (checkpoint at 2) and rerun: the uninterrupted run's params, logs and eval."""
  full, _, _ = rm_run
  seen = stage_runs.wait_all(timeout=400)
  assert seen["kill_rc"] == -signal.SIGKILL, stage_runs.log_tail()
  assert seen["steps_after_kill"] == [2] and not seen["eval_after_kill"]
  cut = stage_runs.cut
  _, _, a = checkpoint.load_model(full.path("rm", "checkpoints"))
  _, _, b = checkpoint.load_model(cut.path("rm", "checkpoints"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def by_step(wd):  # the last value logged for each (step, metric): the rerun overwrites step 3
    out = {}
    for r in read_metrics(wd.path("rm", "logs")):
      out.update({(r["step"], k): v for k, v in r.items() if k not in ("step", "time")})
    return out

  assert by_step(cut) == by_step(full)
  with open(full.path("rm", "eval.json")) as f, open(cut.path("rm", "eval.json")) as g:
    assert json.load(f) == json.load(g)
