"""HF safetensors import/export, checked against transformers' PyTorch models on CPU."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autotraj_jax import convert
from autotraj_jax import sharding as shd
from autotraj_jax.models import build, causal_mask, gather_last, get_preset, hf, init_model, merge

REPO = pathlib.Path(__file__).resolve().parents[1]
V = 256
PAD = 0
SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _randomize_torch(model, seed: int):
  """Non-trivial weights everywhere (HF init leaves biases 0 and norms 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
  return model.eval()


def _randomize_jax(params, seed: int):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, x.shape, x.dtype) * 0.1 + (1.0 if "norm" in shd.path_str(p) else 0.0)
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def _make_tokenizer(directory: pathlib.Path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(directory)


def _batch(L: int = 9, seed: int = 0):
  """Two rows: one full, one right-padded to length 6 (pad tokens never appear inside)."""
  tokens = np.random.RandomState(seed).randint(3, V, (2, L))
  valid = np.ones((2, L), bool)
  valid[1, 6:] = False
  tokens[~valid] = PAD
  return tokens, valid


def _hf_logits(model, tokens, valid):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)))
  return out.logits.numpy()


def _our_logits(cfg, kind, params, tokens, valid):
  model = merge(build.abstract_model(cfg, kind)[0], params)
  B, L = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  out = model(jnp.asarray(tokens), pos, causal_mask(jnp.asarray(valid)))
  return np.asarray(out if kind == "scalar" else out[0])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Tiny random HF models saved as safetensors: Qwen2 (untied, with tokenizer), Llama tied,
  Llama untied with head_dim != hidden / heads."""
  root = tmp_path_factory.mktemp("hf")
  t = transformers
  specs = {
      "qwen2": t.Qwen2ForCausalLM(t.Qwen2Config(
          **SHAPE, tie_word_embeddings=False, pad_token_id=PAD,
          rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
      "llama_tied": t.LlamaForCausalLM(t.LlamaConfig(**SHAPE, tie_word_embeddings=True)),
      "llama_hd32": t.LlamaForCausalLM(t.LlamaConfig(**SHAPE, head_dim=32, rms_norm_eps=1e-5,
                                                     tie_word_embeddings=False)),
  }
  dirs = {}
  for i, (name, model) in enumerate(specs.items()):
    _randomize_torch(model, seed=i).save_pretrained(root / name, safe_serialization=True)
    dirs[name] = root / name
  _make_tokenizer(dirs["qwen2"])
  return dirs


@pytest.mark.parametrize("name", ["qwen2", "llama_tied", "llama_hd32"])
def test_import_matches_transformers(hf_dirs, name):
  cfg, kind, params = hf.load_hf(hf_dirs[name])
  assert kind == "causal_lm"
  assert cfg.architecture == name.split("_")[0]
  assert cfg.tie_embeddings == (name == "llama_tied")
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  if name == "qwen2":
    assert cfg.rope_theta == 1e6 and cfg.qkv_bias
  if name == "llama_hd32":
    assert cfg.head_dim == 32 and cfg.rms_norm_eps == 1e-5 and not cfg.qkv_bias
  tokens, valid = _batch()
  ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval(), tokens, valid)
  ours = _our_logits(cfg, kind, params, tokens, valid)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_cli_round_trip(hf_dirs, tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"

  def run(*args):
    r = subprocess.run([sys.executable, "-m", "autotraj_jax.convert", *map(str, args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout

  line = run("--from-hf", hf_dirs["qwen2"], "--to-checkpoint", ckpt, "--mesh", "fsdp=4,tp=2")
  assert str(ckpt) in line and "params" in line and "float32" in line
  line = run("--from-checkpoint", ckpt, "--to-hf", out)
  assert str(out) in line
  assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
  assert json.loads((out / "config.json").read_text())["pad_token_id"] == PAD

  tokens, valid = _batch(seed=1)
  ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"]).eval(), tokens, valid)
  got = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), tokens, valid)
  np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_scalar_export_loads_as_sequence_classifier(hf_dirs, tmp_path):
  # Llama with attention_bias: the export must also supply the zero o_proj bias HF expects.
  cfg = get_preset("tiny", architecture="llama", vocab_size=V, qkv_bias=True)
  _, params = init_model(cfg, "scalar")
  params = _randomize_jax(params, seed=3)
  hf.save_hf(tmp_path, params, cfg, kind="scalar", tokenizer_dir=hf_dirs["qwen2"])
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  assert config["pad_token_id"] == PAD

  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
  tokens, valid = _batch(seed=2)
  ref = _hf_logits(model, tokens, valid)[:, 0]
  values = _our_logits(cfg, "scalar", params, tokens, valid)
  ours = np.asarray(gather_last(jnp.asarray(values), jnp.asarray(valid.sum(1) - 1)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

  cfg2, kind, params2 = hf.load_hf(tmp_path)
  assert kind == "scalar" and cfg2 == cfg
  _assert_trees_equal(params2, params)


@pytest.mark.parametrize("mesh_spec", ["fsdp=4,tp=2", "fsdp=8"])
@pytest.mark.parametrize("name", ["qwen2", "llama_hd32"])
def test_import_onto_mesh(hf_dirs, name, mesh_spec):
  assert jax.device_count() >= 8, "tests/conftest.py must force 8 host devices"
  mesh = shd.make_mesh(shd.MeshConfig.parse(mesh_spec), jax.devices()[:8])
  cfg, _, ref = hf.load_hf(hf_dirs[name])
  _, _, params = hf.load_hf(hf_dirs[name], mesh=mesh)
  _assert_trees_equal(params, ref)
  want = shd.param_shardings(build.abstract_model(cfg)[1], mesh)
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  q = params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert len({d.id for d in q.sharding.device_set}) == 8
  assert q.addressable_shards[0].data.shape[0] < q.shape[0]  # really split, not replicated


def test_layout_reads_any_block():
  """Layout.read of an arbitrary block equals the same block of the fully converted tensor."""
  cfg = get_preset("tiny", tie_embeddings=False)
  _, params = init_model(cfg, "scalar")
  rng = np.random.RandomState(0)
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    lay = hf.layout_for(shd.path_str(path), x.shape)
    full = rng.randn(*lay.hf_shape).astype(np.float32)
    ours = np.asarray(lay.read(lambda idx, full=full: full[idx], tuple(slice(0, n) for n in x.shape)))
    np.testing.assert_array_equal(lay.to_hf(ours), full)
    for _ in range(3):
      idx = []
      for n in x.shape:
        a = rng.randint(0, n)
        idx.append(slice(a, rng.randint(a + 1, n + 1)))
      np.testing.assert_array_equal(lay.read(lambda i, full=full: full[i], tuple(idx)), ours[tuple(idx)])


def test_multi_shard_export_and_reload(hf_dirs, tmp_path):
  cfg, kind, params = hf.load_hf(hf_dirs["llama_hd32"])
  hf.save_hf(tmp_path, params, cfg)  # one file first: the sharded save below must replace it
  assert (tmp_path / "model.safetensors").is_file()
  files = hf.save_hf(tmp_path, params, cfg, max_shard_bytes=40_000)
  assert len(files) > 3 and not (tmp_path / "model.safetensors").exists()
  assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(files)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(files)
  assert "lm_head.weight" in index["weight_map"]

  cfg2, kind2, params2 = hf.load_hf(tmp_path)
  assert (cfg2, kind2) == (cfg, kind)
  _assert_trees_equal(params2, params)
  tokens, valid = _batch(seed=4)
  ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama_hd32"]).eval(), tokens, valid)
  got = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens, valid)
  np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_bfloat16_import_and_export(hf_dirs, tmp_path):
  cfg, _, params = hf.load_hf(hf_dirs["llama_tied"], dtype="bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  hf.save_hf(tmp_path, params, cfg)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  assert "lm_head.weight" not in json.dumps(_safetensors_keys(tmp_path / "model.safetensors"))
  cfg2, _, params2 = hf.load_hf(tmp_path)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert model.dtype == torch.bfloat16


def _safetensors_keys(path):
  from safetensors import safe_open
  with safe_open(str(path), framework="numpy") as f:
    return list(f.keys())


# ---------------------------------------------------------------- errors

def _copy_model(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for name in ("config.json", "model.safetensors"):
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


def test_config_errors():
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*gpt2.*Qwen2ForCausalLM"):
    hf.config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    hf.config_from_hf({"model_type": "gpt2"})
  base = {**SHAPE, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
  with pytest.raises(ValueError, match="'yarn'"):
    hf.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
  with pytest.raises(ValueError, match="'linear'"):
    hf.config_from_hf({**base, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert hf.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})[0].rope_theta == 5e5
  with pytest.raises(ValueError, match="num_labels=1"):
    hf.config_from_hf({**base, "architectures": ["LlamaForSequenceClassification"],
                       "id2label": {"0": "A", "1": "B"}})


def test_load_errors(hf_dirs, tmp_path):
  src = hf_dirs["qwen2"]
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    hf.load_hf(gpt2)

  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(tmp_path / "nowhere")

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_bytes((src / "config.json").read_bytes())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_hf(no_weights)

  truncated = _copy_model(src, tmp_path / "truncated")
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"{truncated}/model.safetensors"):
    hf.load_hf(truncated)

  garbage = _copy_model(src, tmp_path / "garbage")
  (garbage / "model.safetensors").write_bytes(b"\x00" * 3)
  with pytest.raises(ValueError, match="cannot read safetensors file"):
    hf.load_hf(garbage)

  from safetensors.numpy import load_file, save_file
  missing_key = _copy_model(src, tmp_path / "missing_key")
  tensors = load_file(missing_key / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, missing_key / "model.safetensors")
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    hf.load_hf(missing_key)

  wrong_shape = _copy_model(src, tmp_path / "wrong_shape")
  config = json.loads((wrong_shape / "config.json").read_text())
  (wrong_shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
  with pytest.raises(ValueError, match=r"down_proj\.weight.*shape \[64, 128\], expected \[64, 96\]"):
    hf.load_hf(wrong_shape)


def test_missing_shard_named(hf_dirs, tmp_path):
  cfg, _, params = hf.load_hf(hf_dirs["qwen2"])
  files = hf.save_hf(tmp_path, params, cfg, max_shard_bytes=100_000)
  (tmp_path / files[1]).unlink()
  with pytest.raises(FileNotFoundError, match=files[1]):
    hf.load_hf(tmp_path)


def test_save_rejects_params_of_another_config(hf_dirs, tmp_path):
  cfg, _, params = hf.load_hf(hf_dirs["qwen2"])
  with pytest.raises(ValueError, match="do not match"):
    hf.save_hf(tmp_path, params, cfg.replace(intermediate_size=96))
  with pytest.raises(ValueError, match="do not match"):
    hf.save_hf(tmp_path, params, cfg, kind="scalar")


def test_cli_bad_input_exits_2(hf_dirs, tmp_path, capsys):
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  cases = [
      (["--from-hf", str(tmp_path / "nowhere"), "--to-checkpoint", str(tmp_path / "c1")], "does not exist"),
      (["--from-hf", str(gpt2), "--to-checkpoint", str(tmp_path / "c2")], "gpt2"),
      (["--from-hf", str(hf_dirs["qwen2"]), "--to-checkpoint", str(tmp_path / "c3"), "--mesh", "fsdp=3"],
       "fsdp"),
      (["--from-checkpoint", str(tmp_path / "nowhere"), "--to-hf", str(tmp_path / "h1")], "does not exist"),
      (["--from-hf", str(hf_dirs["qwen2"]), "--to-hf", str(hf_dirs["llama_tied"])], "not empty"),
  ]
  for argv, message in cases:
    assert convert.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("convert: error:") and message in err and "Traceback" not in err
  with pytest.raises(SystemExit) as e:
    convert.main(["--from-hf", "x"])  # no target: argparse's own usage error
  assert e.value.code == 2
