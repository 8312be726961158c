"""The library's stages, by name: the demo's stand-ins for downloads, stage 2, eval and results.

`experiments/main.py` joins this table with `data_gen.stages.STAGES` (stage 1); nothing registers
itself on import. Each entry says which config fields and workdir files the stage depends on, so
a finished stage whose inputs changed is caught (see `runner`).
"""

from __future__ import annotations

from autotraj_jax.pipeline import demo, evaluate, results, rl, rm, sft
from autotraj_jax.pipeline.runner import Stage

_SERVING = ("backend", "sglang.urls", "engine", "mesh", "tools", "model.tokenizer_dir", "seed")


def _node(c, kind: str, v: str):
  """The top-level fields of `kind`'s node for variant `v` (enough to name its inputs)."""
  return c[kind] if not v else {**c[kind].to_dict(), **c[f"{kind}_variants"][v].to_dict()}


def _trained(kind: str):
  """Workdir inputs of a trainer stage whose node names the model it starts from in `init`."""
  return lambda c, v: (f"{_node(c, kind, v)['init']}/checkpoints",)


STAGES: dict[str, Stage] = {
    "world": Stage(demo.world_stage, reads=lambda c, v: ("world",), outputs=lambda c, v: ("world",), host_only=True),
    "tokenizer": Stage(demo.tokenizer_stage, reads=lambda c, v: ("tokenizer", "model.hf_dir"),
                       inputs=lambda c, v: ("world",), outputs=lambda c, v: ("tokenizer",), host_only=True),
    "warmstart": Stage(demo.warmstart_stage,
                       reads=lambda c, v: ("warmstart", "model", "repairer.hf_dir", "generate.num_queries", "mesh",
                                           "seed"),
                       inputs=lambda c, v: ("world", "tokenizer"),
                       outputs=lambda c, v: (c.warmstart.name, *(("repairer",) if c.repairer.hf_dir else ()))),
    "export_policy": Stage(demo.export_policy_stage, reads=lambda c, v: ("export_dir",),
                           inputs=lambda c, v: (f"{c.warmstart.name}/checkpoints",)),
    "eval": Stage(evaluate.eval_stage,
                  reads=lambda c, v: ("eval", "policy", "scoring", *_SERVING, f"data.{c.eval.split}_file"),
                  inputs=lambda c, v: (f"{v or 'policy'}/checkpoints" if v != "base" else "policy/checkpoints",),
                  outputs=lambda c, v: (f"eval/{v or c.eval.name}.json",)),
    "eval_files": Stage(evaluate.eval_files_stage,
                        reads=lambda c, v: ("eval", "policy", "scoring", "model.hf_dir", *_SERVING),
                        inputs=lambda c, v: (f"{v or 'policy'}/checkpoints", "tokenizer"),
                        outputs=lambda c, v: (f"eval/{v}" if v else "eval/results.json",)),
    "sft": Stage(sft.sft_stage, reads=lambda c, v: ("sft", f"sft_variants.{v}", "heldout_fraction", "mesh", "seed"),
                 inputs=lambda c, v: (sft.sft_file(_node(c, "sft", v)["data"]), *_trained("sft")(c, v)),
                 outputs=lambda c, v: (f"sft_{v}",)),
    "rm": Stage(rm.rm_stage, reads=lambda c, v: ("rm", "heldout_fraction", "mesh", "seed"),
                inputs=lambda c, v: ("pairs.jsonl", *_trained("rm")(c, v)), outputs=lambda c, v: ("rm",)),
    "rl": Stage(rl.rl_stage, reads=lambda c, v: ("rl", f"rl_variants.{v}", *_SERVING),
                inputs=lambda c, v: _trained("rl")(c, v), outputs=lambda c, v: (f"rl_{v}",)),
    "results": Stage(results.results_stage, reads=lambda c, v: ("results",), always=True, host_only=True),
}
