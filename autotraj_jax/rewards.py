"""RL rewards: registered components and how they combine into one scalar per trajectory.

Components (`REWARD_COMPONENTS`, extend with `register_reward`) map a batch of trajectories to
one float each:
- `outcome`: 1/0 answer equivalence ('equiv'); 'f1' uses token F1 for QA domains (math stays
  1/0); 'f1_all' uses token F1 for every domain, as the authors' code does.
- `format`: 0 for a valid response, else a penalty (flat, or per violation with a floor).
- `rm`: a reward-model score from a caller-supplied batch scorer, normalised ('none' | 'batch'
  | 'running').

Combinations (`COMBINATIONS`, extend with `register_combination`) say which components a
config needs and how they make one reward:
- `weighted`: sum of weight * component; symmetric, so a bad RM score lowers the reward too.
- `reference`: the authors' rule: format penalty for a bad format or no boxed answer; else
  f = outcome, r = max(f, clip(f + c * RM, -cap, cap)) when f > 0 (a one-sided, gated bonus,
  capped) and 0 when f = 0.

The RM may be a remote server: a call that raises, hangs past `rm_timeout_s` or returns
malformed scores falls back to 0 for that batch, is logged and counted (per batch in `info`,
cumulatively in `RewardState`), and the run stops with a clear error once failures exceed
`max_rm_failures`, rather than crashing on the first hiccup or training on silence forever.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from autotraj_jax.registry import Registry
from autotraj_jax.tir.answers import QA_DOMAINS, is_equivalent, token_f1
from autotraj_jax.tir.format import extract_answer, validate
from autotraj_jax.tir.trajectory import Trajectory

log = logging.getLogger(__name__)

RMFn = Callable[[list[Trajectory]], Sequence[float]]
NORM_EPS = 1e-6

RM_NORMS = ("none", "batch", "running")
OUTCOME_METRICS = ("equiv", "f1", "f1_all")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How rewards are computed. Weights name registered components (used by 'weighted')."""

  combination: str = "weighted"
  weights: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: {"outcome": 1.0, "format": 1.0})
  rm_norm: str = "none"
  rm_clip: float | None = None              # clip the normalised RM score to [-rm_clip, rm_clip]
  outcome_metric: str = "equiv"
  format_penalty: float = -1.0              # reward of a badly formatted response (the floor)
  format_penalty_per_violation: float | None = None  # if set: per violation, floored at the above
  reference_rm_coef: float = 0.2
  reference_cap: float = 3.0
  rm_timeout_s: float | None = 120.0
  max_rm_failures: int | None = None        # None: never stop; k: stop at failure k + 1

  def __post_init__(self):
    if self.combination not in COMBINATIONS:
      raise ValueError(f"rewards.combination must be a registered combination ({', '.join(sorted(COMBINATIONS))}), "
                       f"got {self.combination!r}")
    unknown = (set(self.weights) | set(self.components)) - set(REWARD_COMPONENTS)
    if unknown:
      raise ValueError(f"unknown reward components {sorted(unknown)}; registered: {sorted(REWARD_COMPONENTS)}")
    if self.rm_norm not in RM_NORMS:
      raise ValueError(f"rm_norm must be one of {RM_NORMS}, got {self.rm_norm!r}")
    if self.outcome_metric not in OUTCOME_METRICS:
      raise ValueError(f"outcome_metric must be one of {OUTCOME_METRICS}, got {self.outcome_metric!r}")
    if self.format_penalty > 0 or (self.format_penalty_per_violation or 0.0) > 0:
      raise ValueError("format penalties are rewards of bad responses and must be <= 0, got "
                       f"{self.format_penalty} and {self.format_penalty_per_violation}")
    if self.rm_clip is not None and self.rm_clip <= 0:
      raise ValueError(f"rm_clip must be positive or None, got {self.rm_clip}")
    if self.reference_cap <= 0:
      raise ValueError(f"reference_cap must be positive, got {self.reference_cap}")
    if self.rm_timeout_s is not None and self.rm_timeout_s <= 0:
      raise ValueError(f"rm_timeout_s must be positive or None, got {self.rm_timeout_s}")
    if self.max_rm_failures is not None and self.max_rm_failures < 0:
      raise ValueError(f"max_rm_failures must be >= 0 or None, got {self.max_rm_failures}")

  @property
  def components(self) -> list[str]:
    """The registered components this config's combination reads, in order."""
    return list(COMBINATIONS[self.combination].needs(self))

  @property
  def uses_rm(self) -> bool:
    return "rm" in self.components


@dataclasses.dataclass
class RewardState:
  """What persists across batches: running RM statistics and the RM failure count.

  Checkpoint it with `to_dict` so a resumed run normalises and counts as before.
  """

  rm_count: int = 0
  rm_mean: float = 0.0
  rm_m2: float = 0.0     # sum of squared deviations from the mean
  rm_failures: int = 0
  batches: int = 0

  @property
  def rm_std(self) -> float:
    return math.sqrt(self.rm_m2 / self.rm_count) if self.rm_count else 0.0

  def update(self, xs: Sequence[float]) -> None:
    """Merges a batch into the running mean / variance (exact, order-independent)."""
    n = len(xs)
    if not n:
      return
    mean = sum(xs) / n
    m2 = sum((x - mean) ** 2 for x in xs)
    total = self.rm_count + n
    delta = mean - self.rm_mean
    self.rm_mean += delta * n / total
    self.rm_m2 += m2 + delta**2 * self.rm_count * n / total
    self.rm_count = total

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RewardState":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class RewardContext:
  """What a component may need beyond the trajectories; components report into `info`."""

  rm_fn: RMFn | None
  state: RewardState
  info: dict[str, Any]


ComponentFn = Callable[[Sequence[Trajectory], RewardConfig, RewardContext], list[float]]
REWARD_COMPONENTS: Registry[ComponentFn] = Registry("reward component")
register_reward = REWARD_COMPONENTS.register


def answer_of(traj: Trajectory) -> str | None:
  """The rollout's extracted answer, or the one in the text if the record has none."""
  return traj.answer if traj.answer is not None else extract_answer(traj.text)


def outcome_score(traj: Trajectory, metric: str) -> float:
  if traj.gold is None:
    return 0.0
  pred = answer_of(traj)
  if metric == "f1_all" or (metric == "f1" and traj.domain in QA_DOMAINS):
    return float(token_f1(traj.gold, pred))
  return 1.0 if is_equivalent(traj.gold, pred, traj.domain) else 0.0


def format_score(num_violations: int, cfg: RewardConfig) -> float:
  if num_violations == 0:
    return 0.0
  if cfg.format_penalty_per_violation is None:
    return cfg.format_penalty
  return max(cfg.format_penalty, cfg.format_penalty_per_violation * num_violations)


@register_reward("outcome")
def outcome_component(trajs, cfg, ctx) -> list[float]:
  return [outcome_score(t, cfg.outcome_metric) for t in trajs]


@register_reward("format")
def format_component(trajs, cfg, ctx) -> list[float]:
  return [format_score(len(validate(t.text)), cfg) for t in trajs]


@register_reward("rm")
def rm_component(trajs, cfg, ctx) -> list[float]:
  """Normalised RM scores; all 0 for a batch whose RM call failed (counted, maybe fatal)."""
  if ctx.rm_fn is None:
    raise ValueError("the reward config uses the reward model but no rm_fn was given")
  batch = list(trajs)
  t0 = time.monotonic()
  raw, error = _call_rm(ctx.rm_fn, batch, cfg.rm_timeout_s)
  ctx.info["rm_elapsed_s"] = time.monotonic() - t0
  if error is not None:
    ctx.state.rm_failures += 1
    ctx.info.update(rm_failures=1, rm_error=error, rm_raw=None)
    limit = cfg.max_rm_failures
    log.warning("reward model failed (%s); RM reward is 0 for this batch of %d (%d failure(s) so far%s)",
                error, len(batch), ctx.state.rm_failures, "" if limit is None else f", limit {limit}")
    if limit is not None and ctx.state.rm_failures > limit:
      raise RuntimeError(f"reward model failed {ctx.state.rm_failures} times, more than "
                         f"max_rm_failures={limit}; last error: {error}")
    return [0.0] * len(batch)
  ctx.info.update(rm_failures=0, rm_error=None, rm_raw=list(raw))
  return normalize_rm(raw, cfg, ctx.state)


def normalize_rm(raw: Sequence[float], cfg: RewardConfig, state: RewardState) -> list[float]:
  """'none' as is; 'batch' z-score in the batch; 'running' z-score with running statistics,
  updated with this batch first (so the first batch is normalised by itself)."""
  xs = [float(x) for x in raw]
  if cfg.rm_norm == "batch" and xs:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    xs = [(x - mean) / (std + NORM_EPS) for x in xs]
  elif cfg.rm_norm == "running":
    state.update(xs)
    xs = [(x - state.rm_mean) / (state.rm_std + NORM_EPS) for x in xs]
  if cfg.rm_clip is not None:
    xs = [min(max(x, -cfg.rm_clip), cfg.rm_clip) for x in xs]
  return xs


def _call_rm(rm_fn: RMFn, batch: list[Trajectory], timeout_s: float | None) -> tuple[list[float], str | None]:
  """(scores, None) or ([], reason). Runs on a daemon thread: a hung scorer is abandoned, never
  joined, so neither this call nor interpreter exit waits on it."""
  box: dict[str, Any] = {}

  def target():
    try:
      box["out"] = rm_fn(batch)
    except BaseException as e:  # reported to the caller, never raised into the training loop
      box["err"] = f"{type(e).__name__}: {e}"

  worker = threading.Thread(target=target, name="reward-model", daemon=True)
  worker.start()
  worker.join(timeout_s)
  if worker.is_alive():
    return [], f"timed out after {timeout_s:g} s"
  if "err" in box:
    return [], box["err"]
  try:
    scores = [float(x) for x in box["out"]]
  except (TypeError, ValueError) as e:
    return [], f"malformed scores ({type(e).__name__}: {e})"
  if len(scores) != len(batch):
    return [], f"returned {len(scores)} scores for {len(batch)} trajectories"
  if not all(math.isfinite(x) for x in scores):
    return [], "returned a non-finite score"
  return scores, None


@dataclasses.dataclass(frozen=True)
class Combination:
  """`needs(cfg)`: the component names to compute; `combine(trajs, components, cfg)`: one reward
  per trajectory from those components' values."""

  needs: Callable[[RewardConfig], Sequence[str]]
  combine: Callable[[Sequence[Trajectory], Mapping[str, list[float]], RewardConfig], list[float]]


COMBINATIONS: dict[str, Combination] = {}


def register_combination(name: str, needs: Callable[[RewardConfig], Sequence[str]]):
  """Decorator registering `combine(trajs, components, cfg) -> rewards` as combination `name`."""
  def deco(fn):
    if name in COMBINATIONS and COMBINATIONS[name].combine is not fn:
      raise ValueError(f"reward combination {name!r} is already registered")
    COMBINATIONS[name] = Combination(needs, fn)
    return fn
  return deco


@register_combination("weighted", needs=lambda cfg: [n for n, w in cfg.weights.items() if w != 0.0])
def weighted_combination(trajs, components, cfg) -> list[float]:
  """Sum of weight * component: symmetric, so a bad RM score lowers the reward too."""
  return [sum(cfg.weights[n] * values[i] for n, values in components.items()) for i in range(len(trajs))]


def reference_reward(fmt_ok: bool, has_answer: bool, outcome: float, rm: float, cfg: RewardConfig) -> float:
  """The authors' rule (PAPER_NOTES 6.3): penalty, else F1 plus a gated, capped, one-sided bonus."""
  if not fmt_ok or not has_answer:
    return cfg.format_penalty
  if outcome <= 0:
    return 0.0
  bonus = min(max(outcome + cfg.reference_rm_coef * rm, -cfg.reference_cap), cfg.reference_cap)
  return max(outcome, bonus)


@register_combination("reference",
                      needs=lambda cfg: ["outcome", "format"] + (["rm"] if cfg.reference_rm_coef != 0.0 else []))
def reference_combination(trajs, components, cfg) -> list[float]:
  rm = components.get("rm", [0.0] * len(trajs))
  return [reference_reward(components["format"][i] == 0.0, answer_of(t) is not None, components["outcome"][i],
                           rm[i], cfg) for i, t in enumerate(trajs)]


def compute_rewards(trajs: Sequence[Trajectory], cfg: RewardConfig, rm_fn: RMFn | None = None,
                    state: RewardState | None = None) -> tuple[list[float], dict[str, list[float]], dict[str, Any]]:
  """(rewards, components, info) for one batch of trajectories.

  `components` maps each computed component name to its per-trajectory values (the RM one
  after normalisation); `info` has `rm_failures` (0/1 for this batch), `rm_failures_total`,
  `rm_error`, `rm_raw` and `rm_elapsed_s` when the RM is used. Pass the same `state` every
  batch for running normalisation and a cumulative failure count; without one, each call
  starts from scratch.
  """
  state = RewardState() if state is None else state
  info: dict[str, Any] = {}
  ctx = RewardContext(rm_fn=rm_fn, state=state, info=info)
  trajs = list(trajs)
  names = cfg.components
  if "rm" in names and rm_fn is None:
    raise ValueError("the reward config uses the reward model ('rm') but no rm_fn was given")
  if not trajs:
    return [], {name: [] for name in names}, info
  components = {name: [float(x) for x in REWARD_COMPONENTS[name](trajs, cfg, ctx)] for name in names}
  for name, values in components.items():
    if len(values) != len(trajs):
      raise ValueError(f"reward component {name!r} returned {len(values)} values for {len(trajs)} trajectories")
  state.batches += 1
  if "rm" in names:
    info["rm_failures_total"] = state.rm_failures
  rewards = [float(r) for r in COMBINATIONS[cfg.combination].combine(trajs, components, cfg)]
  if len(rewards) != len(trajs):
    raise ValueError(f"reward combination {cfg.combination!r} returned {len(rewards)} rewards for {len(trajs)} "
                     "trajectories")
  return rewards, components, info
