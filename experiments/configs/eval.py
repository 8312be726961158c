"""Evaluates one model on any benchmark files: one table, a row per file (pass@1, HQ@1, format, tools).

    python experiments/main.py --config experiments/configs/eval.py --config.workdir=/tmp/eval \\
        --config.eval.files=../shared/data/benchmarks/gsm8k-test.jsonl,../shared/data/benchmarks/aime24-test.jsonl \\
        --config.model.hf_dir=assets/demo_policy

Files are JSONL with `id, question, answer, domain` (`answer` may be a list of acceptable answers);
each line is checked by its domain (math: symbolic equivalence; knowledge: normalised exact match).
The model is `model.hf_dir` (an HF directory: the shipped demo policy, an HF export of a run, a real
checkpoint) imported by the tokenizer and warmstart stages; a run's checkpoint instead:
`--config.policy.checkpoint=RUN/rl_autotraj/checkpoints --config.model.tokenizer_dir=RUN/tokenizer
--config.stages="('eval_files',)"`; an SGLang server: `--config.backend=sglang --config.sglang.urls=URL
--config.stages="('tokenizer','eval_files')"`. Tools: Python only; for knowledge questions add
search with `--config.tools.names="('code','search')"` and `--config.tools.search_url=URL` (a
FlashRAG-style retriever) or `--config.tools.corpus=corpus.jsonl` (local BM25). Prompts longer than
the largest `engine.prompt_buckets` are counted as failures (`prompt_too_long`). Writes
W/eval/results.json and W/eval/results.md. Expected runtime with the demo policy on 2 CPU cores:
about 10 s per 100 questions.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_config  # noqa: E402


def get_config():
  c = base_config()
  c.stages = ("tokenizer", "warmstart", "eval_files")
  c.tools.names = ("code",)
  c.eval.update(max_questions=0)
  return c
