"""AutoTraj on Qwen2.5-7B-Instruct: both stages with the authors' settings, on TPU v5p-16 or 8 x H100.

    # 1. Serve the base model for stage 1 (GPU: SGLang; TPU: sglang-jax, see tpu/README.md):
    python -m sglang.launch_server --model-path $HF_DIR --tp 4 --port 30000
    # 2. Run every stage (stage 2 trains in-process on the mesh; multi-host TPU: tpu/launch.sh):
    python experiments/main.py --config experiments/configs/qwen2_5_7b.py --config.workdir=$RUN \\
        --config.model.hf_dir=$HF_DIR [--config.distributed=True]

Hardware: 8 chips with >= 80 GiB each (TPU v5p-16 slice = 8 chips on 2 hosts, or 8 x H100 80 GB),
mesh fsdp=8, bf16 weights, full remat, chunked logits. `python -m autotraj_jax.aot --config
experiments/configs/qwen2_5_7b.py --devices 8 --chip v5p` prints per-device memory per stage
(on CPU its training-step figures are upper bounds; see tpu/README.md). Data as in
qwen2_5_1_5b.py. Expected runtime (an estimate, not a measurement): stage 1 about 6 h on one
8-GPU server; SFT and RM about 2 h; 833 GRPO steps about 1-2 days. Expected result: the eval
tables under eval/base, eval/sft_autotraj and eval/rl_autotraj.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen2_5_common import REQUIRED, recipe  # noqa: E402


def get_config():
  c = recipe(hf_dir=REQUIRED, mesh=dict(data=1, fsdp=8, tp=1))
  c.model.preset = "qwen2.5-7b"  # the shapes `autotraj_jax.aot` compiles for
  return c
