"""One behavioural suite for every LLMBackend: the in-process JAX engine and an sglang-jax server
serving the same weights must agree on stop strings, finish reasons, logprobs and token ids."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sglang_server
from test_sglang_backend import _peaked

from autotraj_jax.engine import EngineConfig, GenerationRequest, JaxEngine, SamplingParams
from autotraj_jax.models import causal_mask, get_preset, init_model, merge
from autotraj_jax.models.hf import save_hf
from autotraj_jax.tokenizer import build_demo_tokenizer

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp("contract")
  tok = build_demo_tokenizer(root / "tokenizer")
  cfg = get_preset("demo")
  graphdef, params = init_model(cfg, seed=1)
  params = _peaked(params)
  save_hf(root / "model", params, cfg, tokenizer_dir=root / "tokenizer",
          token_ids={"eos_token_id": tok.eos_token_id})
  prompts = [tuple(tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"))
             for q in ("What is 12 times 7?", "Search the population of Oslo.", "print(2 + 2)")]

  def reference(prompt, output):
    ids = jnp.asarray([list(prompt) + list(output)])
    L = ids.shape[1]
    logits, _ = merge(graphdef, params)(ids, jnp.arange(L)[None], causal_mask(jnp.ones((1, L), bool)))
    lp = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1])
    return np.asarray(jnp.take_along_axis(lp, jnp.asarray(output)[:, None], axis=1)[:, 0])

  return types.SimpleNamespace(root=root, tok=tok, cfg=cfg, graphdef=graphdef, params=params,
                               prompts=prompts, reference=reference)


# sglang-jax 0.1.0rc0 sometimes (in about half of the runs here, also on a quiet machine) serves
# greedy tokens that the same weights, teacher-forced, give logprobs of -5 to -20: its contract
# results are reported, not required, until that is understood.
_SGLANG_FLAKY = pytest.mark.xfail(reason="sglang-jax 0.1.0rc0 intermittently serves outputs that disagree "
                                  "with the saved weights", strict=False)


@pytest.fixture(scope="module", params=["jax", pytest.param("sglang", marks=[pytest.mark.sglang, _SGLANG_FLAKY])])
def backend(request, weights):
  if request.param == "jax":
    yield JaxEngine(weights.graphdef, weights.params, weights.cfg, weights.tok,
                    config=EngineConfig(batch_buckets=(4,), prompt_buckets=(32,), new_token_buckets=(16,),
                                        chunk_steps=4))
    return
  if sglang_server.find_python312() is None:
    pytest.skip("sglang-jax needs Python 3.12 and none was found (set AUTOTRAJ_PYTHON312)")
  from autotraj_jax.engine.sglang_backend import SGLangBackend
  with sglang_server.running_server(weights.root / "model") as url:
    with SGLangBackend(url, weights.tok, max_concurrency=4, timeout_s=300) as b:
      yield b


def test_token_ids_text_and_logprobs(backend, weights):
  outs = backend.generate([GenerationRequest(p, GREEDY) for p in weights.prompts])
  assert len(outs) == len(weights.prompts)
  for p, c in zip(weights.prompts, outs):
    assert 0 < len(c.token_ids) <= MAX_NEW and c.finish_reason in ("length", "eos")
    assert c.text == weights.tok.decode(c.token_ids)  # ids are the truth; text derives from them
    assert len(c.logprobs) == len(c.token_ids)
    np.testing.assert_allclose(c.logprobs, weights.reference(p, c.token_ids), atol=1e-3)
  no_lp = backend.generate([GenerationRequest(weights.prompts[0], GREEDY, return_logprobs=False)])[0]
  assert no_lp.logprobs is None and no_lp.token_ids == outs[0].token_ids


def test_stop_string_is_kept_and_reported(backend, weights):
  p = weights.prompts[0]
  ids = backend.generate([GenerationRequest(p, GREEDY)])[0].token_ids
  k = next(k for k in range(1, len(ids)) if weights.tok.decode([ids[k]]).strip()
           and weights.tok.decode([ids[k]]) not in weights.tok.decode(ids[:k]))
  stop = weights.tok.decode([ids[k]])
  c = backend.generate([GenerationRequest(p, GREEDY, stop=(stop,))])[0]
  assert c.finish_reason == "stop" and c.matched_stop == stop
  assert c.token_ids == ids[:k + 1] and c.text.endswith(stop)


def test_stop_token_and_length(backend, weights):
  p = weights.prompts[1]
  ids = backend.generate([GenerationRequest(p, GREEDY)])[0].token_ids
  c = backend.generate([GenerationRequest(p, GREEDY, stop_token_ids=(ids[2],))])[0]
  assert c.finish_reason == "eos" and c.token_ids[-1] == ids[2] and len(c.token_ids) == ids.index(ids[2]) + 1
  short = backend.generate([GenerationRequest(p, SamplingParams(temperature=0.0, max_new_tokens=3))])[0]
  assert short.finish_reason == "length" and short.token_ids == ids[:3]


def test_batch_keeps_request_order(backend, weights):
  reqs = [GenerationRequest(p, GREEDY) for p in weights.prompts[::-1]]
  together = backend.generate(reqs)
  alone = [backend.generate([r])[0] for r in reqs]
  assert [c.token_ids for c in together] == [c.token_ids for c in alone]
