"""AutoTraj on Qwen2.5-1.5B-Instruct: both stages with the authors' settings, on one TPU v5e-8 host or 8 GPUs.

    # 1. Serve the base model for stage 1 (GPU: SGLang; TPU: sglang-jax, see tpu/README.md):
    python -m sglang.launch_server --model-path $HF_DIR --port 30000
    # 2. Run every stage (stage 2 trains in-process on the mesh):
    python experiments/main.py --config experiments/configs/qwen2_5_1_5b.py --config.workdir=$RUN \\
        --config.model.hf_dir=$HF_DIR [--config.sglang.urls=http://host1:30000,http://host2:30000]

Hardware: 8 chips with >= 16 GiB each (TPU v5e-8, or 8 x A100/H100), mesh fsdp=8, bf16 weights,
full remat, chunked logits. Data: GSM8K train for stage 1 and RL (`data.train_file`), MATH-500
for validation, and GSM8K / MATH-500 / AIME24 / AMC23 test as eval sets (`eval.files`), read from
../shared/data/benchmarks or $AUTOTRAJ_BENCHMARKS. Check that it compiles and fits first:
`python -m autotraj_jax.aot --config experiments/configs/qwen2_5_1_5b.py --devices 8 --chip v5e`.
Expected runtime (an estimate, not a measurement): stage 1 about 2 h on one GPU server for
7,473 x 2 candidates; SFT and RM under 1 h; 833 GRPO steps about 10-15 h. Expected result: the
eval tables under eval/base, eval/sft_autotraj and eval/rl_autotraj.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen2_5_common import REQUIRED, recipe  # noqa: E402


def get_config():
  c = recipe(hf_dir=REQUIRED, mesh=dict(data=1, fsdp=8, tp=1))
  c.model.preset = "qwen2.5-1.5b"  # the shapes `autotraj_jax.aot` compiles for
  return c
