"""The one typed pipeline config: every field any stage reads, with its default, unit and meaning.

`SCHEMA` declares each field once (`F(default, doc, check)`); `base_config()` turns it into the
`ml_collections.ConfigDict` that `experiments/configs/*.py` edit, `describe` prints it with the
comments (`main.py --show`), `apply_override` parses `--config.a.b=value` against the declared type,
and `validate` checks a finished config before any stage runs: an unknown key anywhere (also
inside a `*_variants` entry) names the closest valid key, and sizes, choices and paths are
checked with a one-line message naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
from typing import Any, Callable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config mistake; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class F:
  """A field: its default, a one-line description (with the unit) and an optional check."""

  default: Any
  doc: str
  check: Callable[[Any], str | None] | None = None
  open: bool = False   # a free-form dict (its keys are checked where it is used)
  path: bool = False   # the check looks at the file system (skipped by `--show`)


@dataclasses.dataclass(frozen=True)
class Variants:
  """Named partial overrides of section `of`: each entry may set any field of that section."""

  of: str
  default: Mapping[str, Mapping[str, Any]]
  doc: str


# ---- checks -------------------------------------------------------------------------------------


def positive(v: Any) -> str | None:
  return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else "must be > 0"


def nonneg(v: Any) -> str | None:
  return None if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else "must be >= 0"


def unit_interval(v: Any) -> str | None:
  return None if isinstance(v, (int, float)) and 0 <= v <= 1 else "must be in [0, 1]"


def top_p_range(v: Any) -> str | None:
  return None if isinstance(v, (int, float)) and 0 < v <= 1 else "must be in (0, 1]"


def buckets(v: Any) -> str | None:
  ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(b, int) and b > 0 for b in v)
  return None if ok and list(v) == sorted(set(v)) else "must be a non-empty ascending tuple of positive ints"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
  return lambda v: None if v in choices else f"must be one of {choices}"


def subset_of(*choices: Any) -> Callable[[Any], str | None]:
  return lambda v: None if all(x in choices for x in v) else f"must be a tuple of {choices}"


def file_or_empty(v: Any) -> str | None:
  return None if not v or os.path.isfile(os.path.expanduser(v)) else f"file {v!r} does not exist"


def question_files(v: Any) -> str | None:
  """Every named question file exists and is valid (ids, fields, domains), checked before any stage."""
  from autotraj_jax.questions import load_questions
  for f in (v if isinstance(v, (tuple, list)) else (v,)):
    if not f:
      continue
    if not os.path.isfile(os.path.expanduser(f)):
      return f"file {f!r} does not exist"
    try:
      load_questions(os.path.expanduser(f))
    except ValueError as e:
      return str(e)
  return None


def dir_or_empty(v: Any) -> str | None:
  return None if not v or os.path.isdir(os.path.expanduser(v)) else f"directory {v!r} does not exist"


def tokenizer_dir_or_empty(v: Any) -> str | None:
  if not v or os.path.isfile(os.path.join(os.path.expanduser(v), "tokenizer.json")):
    return None
  return f"{v!r} holds no tokenizer (tokenizer.json)"


def hf_dir_or_empty(v: Any) -> str | None:
  if not v:
    return None
  if not os.path.isfile(os.path.join(os.path.expanduser(v), "config.json")):
    return f"{v!r} holds no HF checkpoint (config.json)"
  return None


def mesh_axis(v: Any) -> str | None:
  return None if isinstance(v, int) and (v > 0 or v == -1) else "must be a positive size or -1 (all remaining devices)"


# ---- the schema ----------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_POLICY = os.path.join(ROOT, "assets", "demo_policy")
DEMO_REPAIRER = os.path.join(ROOT, "assets", "demo_repairer")


def rollout(temperature: float, top_p: float = 1.0, **kw: Any) -> dict[str, F]:
  """Sampling and limits of the multi-turn tool loop (generate, repair, eval, rl)."""
  out = dict(
      temperature=F(temperature, "sampling temperature (0: greedy)", nonneg),
      top_p=F(top_p, "nucleus sampling mass (1: off)", top_p_range),
      top_k=F(-1, "sample among the k most likely tokens (-1: off)",
              lambda v: None if isinstance(v, int) and (v > 0 or v == -1) else "must be -1 or > 0"),
      max_tool_calls=F(3, "tool calls per trajectory; later calls get a 'limit reached' result", nonneg),
      max_tokens_per_turn=F(96, "new tokens per generation round (a cut turn continues next round)", positive),
      max_response_tokens=F(384, "model + tool tokens after the prompt, in total", positive),
      max_tool_output_chars=F(600, "tool output kept per call, in characters (middle elided)", positive),
  )
  for k, v in kw.items():
    out[k] = dataclasses.replace(out[k], default=v)
  return out


def trainer(steps: int, batch_size: int, buckets_: tuple[int, ...], lr: float, warmup: int, *,
            weight_decay: float = 0.0, log_every: int = 10, checkpoint_every: int = 100) -> dict[str, F]:
  """The fields every trainer node shares (warmstart, sft, rm)."""
  return dict(
      steps=F(steps, "optimizer steps (ignored when epochs > 0)", positive),
      epochs=F(0.0, "passes over the training set; > 0 sets the steps from the data size", nonneg),
      batch_size=F(batch_size, "sequences (RM: pairs) per optimizer step, all hosts together", positive),
      micro_batch_size=F(0, "gradient-accumulation micro-batch (0: none)", nonneg),
      buckets=F(buckets_, "padded sequence lengths in tokens; a batch pads to the smallest that fits", buckets),
      pack=F(True, "pack several sequences per row (segment ids): fewer padded tokens, the same losses"),
      learning_rate=F(lr, "peak learning rate (linear warmup, cosine decay)", nonneg),
      warmup_steps=F(warmup, "linear warmup steps", nonneg),
      warmup_ratio=F(0.0, "warmup as a share of the steps; > 0 overrides warmup_steps", unit_interval),
      weight_decay=F(weight_decay, "AdamW weight decay (not on norms and biases)", nonneg),
      grad_clip=F(1.0, "global gradient-norm clip (0: off)", nonneg),
      log_every=F(log_every, "steps between metric records", positive),
      checkpoint_every=F(checkpoint_every, "steps between checkpoints (a killed run resumes from the last)",
                         positive),
  )


def lora() -> dict[str, F]:
  return dict(rank=F(0, "LoRA rank (0: full fine-tuning); adapters are merged on export", nonneg),
              alpha=F(16.0, "LoRA scale numerator (scale = alpha / rank)", positive),
              targets=F(("q_proj", "k_proj", "v_proj", "o_proj"), "regexes of kernels that get adapters"))


SCHEMA: dict[str, Any] = dict(
    workdir=F("", "directory every stage reads and writes (required)"),
    seed=F(0, "seed of initialisation, sampling, data order and held-out questions"),
    distributed=F(False, "call jax.distributed.initialize() first (TPU pods, multi-GPU hosts; on CPU it reads "
                  "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"),
    compilation_cache_dir=F("~/.cache/autotraj/xla", "persistent XLA compilation cache ('' disables it)"),
    stages=F(("world", "tokenizer", "warmstart", "generate", "score", "repair", "datasets", "eval"),
             "stages to run, in order; 'kind:variant' applies <kind>_variants[variant] (main.py --help lists them)"),
    redo=F((), "stages to run again, with every stage after them in `stages`; their outputs are replaced"),
    backend=F("jax", "generation backend: 'jax' (in-process engine) or 'sglang' (a server)", one_of("jax", "sglang")),
    heldout_fraction=F(0.1, "share of stage-1 questions held out of SFT and RM training, for their eval",
                       lambda v: None if isinstance(v, (int, float)) and 0 <= v < 1 else "must be in [0, 1)"),
    export_dir=F("", "export_policy: the HF directory written (bf16 safetensors + tokenizer)"),
    mesh=dict(data=F(1, "pure data-parallel axis size (-1: all remaining devices)", mesh_axis),
              fsdp=F(-1, "data-parallel axis with sharded params and optimizer state", mesh_axis),
              tp=F(1, "tensor-parallel axis (heads, MLP width, vocab)", mesh_axis)),
    sglang=dict(urls=F((), "SGLang servers (backend='sglang'), e.g. http://127.0.0.1:30000; with several, requests "
                       "are balanced over them and retried on another when one dies (a,b on the command line)"),
                max_concurrency=F(32, "requests in flight per server", positive)),
    data=dict(train_file=F("", "question JSONL for stage 1 and RL ('': the generated world's split)", question_files,
                           path=True),
              validation_file=F("", "question JSONL for validation ('': the world's)", question_files, path=True),
              test_file=F("", "question JSONL for eval ('': the world's)", question_files, path=True)),
    world=dict(seed=F(0, "seed of the synthetic task world (fixed across run seeds)"),
               train=F(20000, "training tasks", positive), validation=F(100, "validation tasks", positive),
               test=F(400, "test tasks", positive),
               families=F(("arith", "lookup", "combo"), "task families",
                          subset_of("arith", "lookup", "combo")),
               difficulty=F((1, 2), "difficulty levels mixed in every split", subset_of(1, 2, 3)),
               num_entities=F(3000, "invented people, towns and companies in the corpus", positive)),
    tokenizer=dict(vocab_size=F(4096, "BPE vocabulary of the locally trained tokenizer", positive),
                   num_tasks=F(1500, "rendered tasks in the tokenizer's training text", positive),
                   copy_from=F("", "HF directory whose tokenizer the tokenizer stage copies ('': model.hf_dir's, "
                               "or a BPE trained on the world when that is empty too)", tokenizer_dir_or_empty,
                               path=True)),
    model=dict(hf_dir=F(DEMO_POLICY, "HF checkpoint of the starting policy (weights, tokenizer, chat template); "
                        "default: the shipped demo policy; '' warm-starts the demo policy from scratch",
                        hf_dir_or_empty, path=True),
               param_dtype=F("float32", "dtype of imported weights ('bfloat16' for large models)",
                             one_of("float32", "bfloat16")),
               remat=F("none", "activation rematerialisation of each block: none, full, dots (keep matmuls)",
                       one_of("none", "full", "dots")),
               logits_chunk=F(0, "positions per chunk of the LM head + loss (0: whole sequence); bounds the "
                              "fp32 [B, L, vocab] logits of large vocabularies", nonneg),
               preset=F("demo", "model preset (autotraj_jax/models/config.py) of a policy trained from scratch"),
               tokenizer_dir=F("", "HF tokenizer directory ('': the workdir's tokenizer/)", dir_or_empty,
                               path=True)),
    warmstart=dict(
        name=F("policy", "model it trains, by name in the workdir ('repairer': a repairer, exported the same way)",
               one_of("policy", "repairer")),
        init_from=F("", "HF checkpoint whose weights the warm-start fine-tunes (it must share the tokenizer); "
                    "'': model.preset initialised at random", hf_dir_or_empty, path=True),
        num_tasks=F(19000, "warm-start training tasks (disjoint from stage-1 questions)", positive),
        **trainer(4000, 16, (256, 384, 512, 1024), 3e-3, 50, weight_decay=0.01, log_every=10, checkpoint_every=100),
        repair_fraction=F(0.2, "share of warm-start examples that are repair demonstrations", unit_interval),
        repair_flaws=F(("hedge", "repeat_call", "failed_call", "verbose", "broken_tags", "guess", "copy_error"),
                       "flaws of the originals of repair demonstrations (drawn uniformly)",
                       subset_of("hedge", "repeat_call", "failed_call", "verbose", "broken_tags", "guess",
                                 "copy_error")),
        flaws=dict(hedge=F(0.15, "rate of hedging words in reasoning", unit_interval),
                   repeat_call=F(0.12, "rate of a repeated identical tool call", unit_interval),
                   failed_call=F(0.10, "rate of a failing tool call", unit_interval),
                   verbose=F(0.12, "rate of padded, verbose reasoning", unit_interval),
                   broken_tags=F(0.03, "rate of a broken tag", unit_interval),
                   guess=F(0.03, "rate of answering without a tool", unit_interval),
                   copy_error=F(0.0, "rate of a final answer miscopied from a correct tool result",
                                unit_interval))),
    policy=dict(name=F("demo-policy", "name recorded in provenance"),
                checkpoint=F("", "checkpoint dir of the policy ('': <workdir>/policy)", dir_or_empty, path=True),
                sglang_urls=F((), "servers of the policy (empty: sglang.urls)")),
    repairer=dict(name=F("demo-policy", "name recorded in provenance"),
                  hf_dir=F("", "HF checkpoint the warmstart stage imports as the repairer (e.g. assets/demo_repairer; "
                           "it must share the policy's tokenizer); '': the checkpoint below", hf_dir_or_empty,
                           path=True),
                  checkpoint=F("", "checkpoint dir of the repairer ('': <workdir>/repairer, else the policy)",
                               dir_or_empty, path=True),
                  sglang_urls=F((), "servers of the repairer (empty: sglang.urls)")),
    engine=dict(batch_buckets=F((8, 16, 32, 64), "padded batch sizes of the in-process engine; none below 8, "
                                "since the last few live trajectories of a rollout would otherwise compile their "
                                "own shapes (~3 s each on CPU) to save ~1 ms a step", buckets),
                prompt_buckets=F((128, 256, 384, 512, 768, 1024, 2048), "padded prompt lengths in tokens; a "
                                 "longer prompt is recorded as a failure (finish reason prompt_too_long)", buckets),
                new_token_buckets=F((96, 256, 512), "padded new-token budgets per call", buckets),
                extend_buckets=F((128, 512, 1024, 2048), "padded lengths of new prompt tokens on top of a "
                                 "cached prefix (a tool result and the next turn); coarse, since each bucket "
                                 "compiles a prefill", buckets),
                chunk_steps=F(32, "decode steps per jitted call between stop checks", positive),
                cache_multiple=F(128, "KV slots of a decode call rounded up to a multiple of this, so calls "
                                 "with other prefix/prompt buckets share a compiled decode loop", positive),
                prefix_cache_rows=F(256, "KV rows kept across calls, so the next turn of a rollout prefills only "
                                    "its new tokens (0: off); at least the live trajectories of a round", nonneg),
                prefix_cache_len=F(1024, "token slots per prefix-cache row", positive),
                prefix_cache_mb=F(2048, "device memory cap of the prefix cache, in MiB (fewer rows if needed)",
                                  positive),
                prefix_min_match=F(32, "shortest shared prefix worth reusing, in tokens", positive)),
    tools=dict(names=F(("code", "search"), "tools the model may call", subset_of("code", "search", "calculator")),
               code_timeout_s=F(5.0, "wall-clock limit of one code call, in seconds", positive),
               code_workers=F(2, "sandbox worker processes", positive),
               search_top_k=F(1, "passages returned per search", positive),
               search_url=F("", "a FlashRAG-style retrieval server ('': local BM25 over tools.corpus)"),
               corpus=F("", "JSONL corpus for local BM25 ('': the generated world's)", file_or_empty, path=True)),
    generate=dict(split=F("train", "question split", one_of("train", "validation", "test")),
                  num_queries=F(300, "questions (0: all)", nonneg),
                  samples_per_query=F(4, "candidate trajectories per question", positive),
                  chunk_queries=F(64, "questions per batch of rollouts (and per resumable append)", positive),
                  **rollout(0.8, 0.95)),
    scoring=dict(preset=F("autotraj", "scoring preset: 'autotraj' or 'reference' (the authors')",
                          one_of("autotraj", "reference")),
                 overrides=F({}, "ScoringConfig fields to override (weights, floors, thresholds)", open=True)),
    repair=dict(attempts=F(2, "repair attempts per original", positive),
                show_gold=F(False, "tell the repairer the gold answer"),
                context=F("trajectory", "what the repairer sees: 'trajectory' (question, earlier solution, reviewer "
                          "notes) or 'question' (only the question, as the authors' code)",
                          one_of("trajectory", "question")),
                accept_threshold=F(0.86, "quality total a repair of a low-quality original must reach",
                                   unit_interval),
                accept_threshold_wrong=F(0.8, "quality total a repair of a wrong original must reach", unit_interval),
                require_improvement=F(True, "a repair of a low-quality original must beat its total"),
                retry_temperature=F(0.7, "temperature of attempts after the first", nonneg),
                chunk=F(64, "originals per batch of repairs", positive),
                max_originals=F(0, "originals repaired, low-quality first (0: all)", nonneg),
                **rollout(0.0)),
    repair_variants=Variants("repair", dict(question=dict(context="question")),
                             "repair:NAME repairs the same originals with repair_variants[NAME] on top, into "
                             "repairs_NAME.jsonl (datasets:NAME builds sft_NAME.jsonl, pairs_NAME.jsonl from it)"),
    eval=dict(name=F("base", "eval name of a plain `eval` stage (eval:NAME sets it)"),
              files=F((), "question JSONL files of the eval_files stage, one table row each (a,b,c on the "
                      "command line)", question_files, path=True),
              split=F("test", "question split", one_of("train", "validation", "test")),
              max_questions=F(400, "questions (0: all)", nonneg),
              maj_k=F(1, "> 1: also sample k answers and report maj@k", positive),
              **rollout(0.0)),
    sft=dict(init=F("policy", "model it starts from, by name in the workdir"),
             data=F("autotraj", "'autotraj' (high + repaired), 'high_only' or 'autotraj_question' (high + the "
                    "repairs of repair:question, from sft_question.jsonl)",
                    one_of("autotraj", "high_only", "autotraj_question")),
             mask_tool_results=F(True, "loss on model-written tokens only"),
             **trainer(60, 16, (256, 384, 512, 1024), 3e-4, 5, log_every=5, checkpoint_every=30),
             eval_every=F(20, "steps between held-out losses (0: only at the end; accuracy: at the end)", nonneg),
             eval_questions=F(32, "validation questions for greedy accuracy during training", nonneg),
             lora=lora()),
    sft_variants=Variants("sft", dict(high_only=dict(data="high_only"), autotraj=dict(data="autotraj"),
                                      autotraj_question=dict(data="autotraj_question")),
                          "sft:NAME trains `sft` with sft_variants[NAME] on top"),
    rm=dict(init=F("sft_autotraj", "model the RM starts from (a fresh scalar head), by name in the workdir"),
            **trainer(60, 8, (256, 512, 1024), 5e-4, 6, log_every=10, checkpoint_every=30),
            margin_low=F(0.0, "margin a repair must win by over a low-quality original", nonneg),
            margin_wrong=F(0.0, "margin a repair must win by over a wrong original", nonneg),
            center_coef=F(0.01, "weight of (r_c + r_r)^2, which keeps scores centred at 0", nonneg),
            eval_every=F(20, "steps between held-out pair accuracy (0: only at the end)", nonneg),
            max_score_samples=F(200, "held-out candidates per quality scored for the report", nonneg),
            lora=lora()),
    rl=dict(init=F("sft_autotraj", "policy it starts from, by name in the workdir"),
            rm=F("rm", "reward model used when the rewards weight 'rm'"),
            split=F("train", "question split of the rollouts", one_of("train", "validation", "test")),
            max_questions=F(300, "questions drawn from (0: all); the stage-1 questions by default", nonneg),
            steps=F(20, "RL steps (rollout + update)", positive),
            prompts_per_step=F(8, "questions per step", positive),
            samples_per_prompt=F(4, "rollouts per question (the group)", positive),
            minibatches=F(2, "optimizer steps per RL step", positive),
            micro_batch_size=F(0, "gradient-accumulation micro-batch (0: none)", nonneg),
            buckets=F((256, 384, 512), "padded sequence lengths in tokens", buckets),
            pack=F(True, "pack several trajectories per row in the update (segment ids): the same losses"),
            learning_rate=F(1e-4, "policy learning rate (constant after warmup)", nonneg),
            warmup_steps=F(0, "warmup optimizer steps", nonneg),
            grad_clip=F(1.0, "global gradient-norm clip", nonneg),
            critic_learning_rate=F(5e-5, "PPO critic learning rate", nonneg),
            critic_warmup=F(2, "PPO: steps that train only the critic", nonneg),
            checkpoint_every=F(5, "steps between checkpoints", positive),
            advantage=F("dr_grpo", "advantage estimator: grpo (group z-score), dr_grpo (mean-centred: reward "
                        "weights keep their meaning in uniform-outcome groups), rloo, gae (PPO with a critic)"),
            clip_low=F(0.2, "ratio clip below 1", nonneg),
            clip_high=F(0.28, "ratio clip above 1 (DAPO clip-higher)", nonneg),
            agg=F("token-mean", "loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
            filter_uniform_groups=F(False, "drop groups whose rewards are all equal (DAPO)"),
            kl_coef=F(0.0, "KL(policy || reference) weight", nonneg),
            kl_kind=F("k3", "KL estimator: k1, k2, k3"),
            kl_in_reward=F(False, "subtract the KL from the reward instead of adding it to the loss"),
            entropy_coef=F(0.0, "entropy bonus weight", nonneg),
            gamma=F(1.0, "PPO discount", unit_interval),
            lam=F(0.95, "PPO GAE lambda", unit_interval),
            value_clip=F(0.2, "PPO value clip", nonneg),
            whiten_advantages=F(True, "PPO: whiten GAE advantages over the batch"),
            rewards=dict(
                combination=F("weighted", "'weighted' sum of components or the authors' 'reference' rule"),
                weights=dict(outcome=F(1.0, "weight of answer correctness (1/0)"),
                             format=F(0.5, "weight of the format penalty (0 valid, format_penalty if not)"),
                             rm=F(0.0, "weight of the (normalised) reward-model score")),
                rm_norm=F("batch", "RM score normalisation: none, batch, running", one_of("none", "batch", "running")),
                rm_clip=F(3.0, "clip of the normalised RM score", positive),
                outcome_metric=F("equiv", "equiv (1/0), f1 (token F1 for QA), f1_all", one_of("equiv", "f1", "f1_all")),
                format_penalty=F(-1.0, "reward of a badly formatted response (<= 0)"),
                format_penalty_per_violation=F(None, "if set: penalty per violation, floored at format_penalty"),
                reference_rm_coef=F(0.2, "reference rule: RM bonus coefficient"),
                reference_cap=F(3.0, "reference rule: cap of outcome + bonus", positive),
                rm_timeout_s=F(120.0, "seconds before an RM call counts as failed", positive),
                max_rm_failures=F(5, "RM failures tolerated (reward 0 for that batch) before stopping", nonneg)),
            **rollout(1.0)),
    rl_variants=Variants("rl", dict(outcome_format=dict(), autotraj=dict(rewards=dict(weights=dict(rm=0.2))),
                                    ppo=dict(advantage="gae")),
                         "rl:NAME trains `rl` with rl_variants[NAME] on top"),
    results=dict(rows=F((("base policy", "base"), ("SFT high-quality only", "sft_high_only"),
                         ("SFT high + repaired, repairer sees question only", "sft_autotraj_question"),
                         ("AutoTraj SFT (high + repaired)", "sft_autotraj"),
                         ("RL outcome + format", "rl_outcome_format"),
                         ("AutoTraj RL (outcome + format + RM)", "rl_autotraj")),
                        "table rows: (label, eval name)"),
                 curves=F(("outcome_format", "autotraj"), "RL variants whose training curves are plotted")),
)


# ---- building, describing, overriding, validating ------------------------------------------------


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in schema.items():
    if isinstance(v, F):
      out[k] = dict(v.default) if v.open else v.default
    elif isinstance(v, Variants):
      out[k] = {name: dict(patch) for name, patch in v.default.items()}
    else:
      out[k] = _defaults(v)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every declared field at its default; configs edit what they need."""
  return ml_collections.ConfigDict(_defaults(SCHEMA))


def _lookup(path: list[str]) -> Any:
  """The schema entry at `path` (variant entries resolve to their section's schema), or None."""
  node: Any = SCHEMA
  for i, part in enumerate(path):
    if isinstance(node, Variants):
      node = SCHEMA[node.of]  # path[i] is the variant name: continue in the section's schema
      continue
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _closest(path: list[str]) -> str:
  parent = _lookup(path[:-1]) if len(path) > 1 else SCHEMA
  if isinstance(parent, Variants):
    parent = SCHEMA[parent.of]
  names = list(parent) if isinstance(parent, dict) else []
  match = difflib.get_close_matches(path[-1], names, n=1, cutoff=0.5)
  return f"; did you mean {match[0]!r}?" if match else (f"; valid: {', '.join(sorted(names))}" if names else "")


def unknown_key_error(path: list[str]) -> ConfigError:
  where = ".".join(path)
  inside = next((i for i, p in enumerate(path[:-1]) if isinstance(_lookup(path[:i + 1]), Variants)), None)
  extra = f" (entries of {'.'.join(path[:inside + 1])} take the fields of `{_lookup(path[:inside + 1]).of}`)" \
      if inside is not None else ""
  return ConfigError(f"unknown config field {path[-1]!r} in config.{where}{extra}{_closest(path)}")


def parse_value(raw: str, like: Any) -> Any:
  """A command-line value read as the declared field's type (`like` is its current value)."""
  if isinstance(like, str):
    try:
      v = ast.literal_eval(raw)
      return v if isinstance(v, str) else raw
    except (ValueError, SyntaxError):
      return raw
  if isinstance(like, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected True or False, got {raw!r}")
  try:
    v = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if like is None:
      return raw
    if isinstance(like, tuple):  # a,b,c: a tuple of strings (file lists)
      return tuple(p.strip() for p in raw.split(",") if p.strip())
    raise ValueError(f"cannot read {raw!r} as {type(like).__name__}") from None
  if isinstance(like, (dict, ml_collections.ConfigDict)) and isinstance(v, dict):  # an open dict field
    return v
  if isinstance(like, float) and isinstance(v, int) and not isinstance(v, bool):
    return float(v)
  if isinstance(like, tuple) and isinstance(v, (list, tuple)):
    return tuple(v)
  if isinstance(like, tuple) and not isinstance(v, (list, tuple)):
    return (v,)
  if like is not None and not isinstance(v, type(like)):
    raise ValueError(f"expected {type(like).__name__}, got {raw!r}")
  return v


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """`--config.<dotted>=<raw>`: sets a declared field, read as its type; unknown keys are errors."""
  path = dotted.split(".")
  entry = _lookup(path)
  if entry is None:
    raise unknown_key_error(path)
  if isinstance(entry, (dict, Variants)) :
    raise ConfigError(f"config.{dotted} is a section, not a field: set one of its fields (--show lists them)")
  node = config
  for part in path[:-1]:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  current = node[path[-1]] if path[-1] in node else entry.default
  try:
    value = parse_value(raw, current)
  except ValueError as e:
    raise ConfigError(f"config.{dotted}: {e}") from None
  with node.ignore_type():
    node[path[-1]] = value


def validate(config: ml_collections.ConfigDict, *, require_workdir: bool = True, check_paths: bool = True) -> None:
  """Raises ConfigError on the first unknown key or bad value, naming the field."""
  _check(config.to_dict(), SCHEMA, [], check_paths)
  if require_workdir and not config.workdir:
    raise ConfigError("config.workdir is not set: pass --config.workdir=DIR")
  for name in config.stages:
    kind, _, variant = name.partition(":")
    if variant and f"{kind}_variants" in config and variant not in config[f"{kind}_variants"]:
      raise ConfigError(f"config.stages: {name!r} names no entry of config.{kind}_variants "
                        f"({', '.join(sorted(config[f'{kind}_variants']))})")
  for node in ("warmstart", "sft", "rm", "rl"):
    steps, warmup = config[node].steps, config[node].warmup_steps
    if warmup > steps:
      raise ConfigError(f"config.{node}.warmup_steps = {warmup} exceeds config.{node}.steps = {steps}")
  if config.warmstart.name == "repairer" and config.repairer.hf_dir:
    raise ConfigError("config.repairer.hf_dir is set while config.warmstart.name = 'repairer' trains one: "
                      "pick one source of the repairer")
  if config.warmstart.init_from and config.model.hf_dir:
    raise ConfigError("config.warmstart.init_from is set while config.model.hf_dir makes the warmstart stage "
                      "import a checkpoint and train nothing: set --config.model.hf_dir=''")


def _check(values: Mapping[str, Any], schema: Mapping[str, Any], path: list[str], check_paths: bool) -> None:
  for key, value in values.items():
    entry = schema.get(key)
    here = path + [key]
    if entry is None:
      raise unknown_key_error(here)
    if isinstance(entry, Variants):
      if not isinstance(value, Mapping):
        raise ConfigError(f"config.{'.'.join(here)} must map variant names to field overrides")
      for name, patch in value.items():
        _check(patch, SCHEMA[entry.of], here + [name], check_paths)
    elif isinstance(entry, dict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"config.{'.'.join(here)} is a section; got {value!r}")
      _check(value, entry, here, check_paths)
    elif entry.check is None or entry.open or (entry.path and not check_paths):
      continue
    elif problem := entry.check(value):
      raise ConfigError(f"config.{'.'.join(here)} = {value!r}: {problem}")


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field with its value and comment, one per line (`main.py --show`)."""
  lines: list[str] = []

  def walk(values: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, entry in schema.items():
      name = f"{prefix}{key}"
      value = values.get(key) if isinstance(values, Mapping) else None
      if isinstance(entry, dict):
        walk(value or {}, entry, f"{name}.")
      else:
        lines.append(f"{name} = {value!r}  # {entry.doc}")

  walk(config.to_dict(), SCHEMA, "")
  return "\n".join(lines)
