"""The local tokenizer: round trips, single-id tags, the chat template, determinism."""

import os

import pytest
from transformers import AutoTokenizer

from autotraj_jax import tokenizer as tk

TIR_TEXT = ("<think>Let me compute 12*34 and check ½ ≈ 0.5.</think>\n<code>\nprint(12*34)\n</code>\n"
            "<result>\n408\n</result>\n<search>capital of Perú</search>\n<result>Lima</result>\n"
            "<answer>The answer is $\\boxed{\\frac{408}{1}}$ 中文.</answer>")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_tok")
  tk.build_demo_tokenizer(out)
  return out


@pytest.fixture(scope="module")
def tok(demo_dir):
  return tk.load_tokenizer(demo_dir)


def test_round_trip_keeps_tags(tok):
  ids = tok.encode(TIR_TEXT, add_special_tokens=False)
  assert tok.decode(ids) == TIR_TEXT
  # Tags are not special: skipping special tokens must not drop them.
  assert tok.decode(ids, skip_special_tokens=True) == TIR_TEXT


def test_tags_and_markers_are_single_ids(tok):
  seen = set()
  for tag in tk.TIR_TAGS + tk.CHAT_TOKENS:
    ids = tok.encode(tag, add_special_tokens=False)
    assert len(ids) == 1, (tag, ids)
    assert tok.convert_ids_to_tokens(ids[0]) == tag
    seen.add(ids[0])
  assert len(seen) == len(tk.TIR_TAGS) + len(tk.CHAT_TOKENS)
  assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"


def test_vocab_and_special_tokens(tok):
  assert len(tok) == 2048
  assert tok.eos_token == tok.pad_token == tk.ENDOFTEXT
  assert tok.pad_token_id == tok.convert_tokens_to_ids(tk.ENDOFTEXT)
  assert tok.bos_token is None



def test_numbers_are_cut_into_three_digit_chunks_that_read_the_same_everywhere(tok):
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  assert enc("1234567") == enc("123") + enc("456") + enc("7")
  number = enc("66741")
  for text in ("x = 66741\n", "has 66741 people.", "\\boxed{66741}", "<result>\n66741\n</result>", "a66741b"):
    ids = enc(text)
    assert any(ids[i:i + len(number)] == number for i in range(len(ids))), text


def test_chat_template(tok):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
  expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
  assert tok.apply_chat_template(messages, tokenize=False) == expected
  prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert prompt == expected + "<|im_start|>assistant\n"
  assert tok.chat_template == tk.CHAT_TEMPLATE


def test_directory_loads_with_auto_tokenizer(demo_dir):
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert os.path.isfile(demo_dir / name), name
  tok = AutoTokenizer.from_pretrained(str(demo_dir))
  assert tok.decode(tok.encode(TIR_TEXT, add_special_tokens=False)) == TIR_TEXT


def test_a_model_directory_tokenizes_as_its_tokenizer_json(demo_dir, tmp_path):
  # Next to a Qwen2 config.json (as in an exported policy), AutoTokenizer would build a
  # Qwen2Tokenizer that splits numbers into single digits, unlike what the model was trained on.
  import json
  import shutil
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(demo_dir / name, tmp_path / name)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
  text = "The company has 2148 employees; 66741 + 9 = 66750."
  exported, source = tk.load_tokenizer(tmp_path), tk.load_tokenizer(demo_dir)
  assert exported.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)
  assert exported.chat_template == source.chat_template and exported.eos_token == source.eos_token


def test_training_is_deterministic(tmp_path):
  corpus = tk.demo_tokenizer_corpus(num_docs=300)
  assert corpus == tk.demo_tokenizer_corpus(num_docs=300)
  tk.train_tokenizer(corpus, tmp_path / "a", vocab_size=512)
  tk.train_tokenizer(iter(corpus), tmp_path / "b", vocab_size=512)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_missing_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tk.load_tokenizer(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tk.load_tokenizer(tmp_path / "empty")


def test_vocab_too_small(tmp_path):
  with pytest.raises(ValueError, match="too small"):
    tk.train_tokenizer(["abc"], tmp_path, vocab_size=100)


def test_every_number_chunk_is_one_token_at_the_demo_vocab_size(tmp_path):
  tok = tk.build_demo_tokenizer(tmp_path, vocab_size=4096)
  for width in (1, 2, 3):
    for i in range(10 ** width):
      assert len(tok.encode(f"{i:0{width}d}", add_special_tokens=False)) == 1, i
