"""Trajectory special tokens, the one chat template, and a small locally trained tokenizer.

Tests and the CPU demo need a tokenizer without a model hub, so a byte-level BPE is trained
here from text generated in code. Real checkpoints (Qwen2.5) ship their own tokenizer; they
split the TIR tags into several tokens, so nothing downstream may assume a tag is one id.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

# Chat markers (special: dropped by `decode(..., skip_special_tokens=True)`).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

# Tool-integrated-reasoning tags: added but not special, so decoded trajectories keep them.
TIR_TAGS: tuple[str, ...] = (
    "<think>", "</think>", "<code>", "</code>", "<search>", "</search>",
    "<result>", "</result>", "<answer>", "</answer>",
)

# ChatML, as Qwen uses it; the same template serves generation, SFT, RL and eval.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_FILE = "tokenizer.json"


def _number_chunks(repeats: int = 40) -> Iterator[str]:
  """Every 1-3 digit string, `repeats` times: frequent enough that BPE makes each one token."""
  chunks = [f"{i:0{w}d}" for w in (1, 2, 3) for i in range(10 ** w)]
  for _ in range(repeats):
    yield " ".join(chunks)


def _backend(vocab_size: int, texts: Iterable[str]) -> "Tokenizer":
  """Byte-level BPE with numbers cut into 1-3 digit tokens from the left; all chat tokens and tags
  get ids 0..12. A number is then a few tokens that read the same wherever it stands, which is what
  a small model needs to copy it from a question or a tool result."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

  reserved = CHAT_TOKENS + TIR_TAGS
  if vocab_size < 256 + len(reserved):
    raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte "
                     f"tokens plus {len(reserved)} reserved tokens")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  added = [AddedToken(t, special=True, normalized=False) for t in reserved]
  # Registered before training so the corpus is split around them and no merge learns a tag.
  tok.add_special_tokens(added)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=added, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(itertools.chain(texts, _number_chunks()), trainer)
  # The trainer marks every reserved token special; tags must survive skip_special_tokens.
  spec = json.loads(tok.to_str())
  for entry in spec["added_tokens"]:
    entry["special"] = entry["content"] in CHAT_TOKENS
  return Tokenizer.from_str(json.dumps(spec))


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
    f.write("\n")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike,
                    vocab_size: int = 2048) -> "PreTrainedTokenizerFast":
  """Train a byte-level BPE on `texts` and save it as an HF tokenizer directory.

  The same texts give byte-identical files, so fixtures built from it are reproducible.
  Returns the `transformers.PreTrainedTokenizerFast` loaded back from `out_dir`.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  backend = _backend(vocab_size, texts)
  backend.save(os.path.join(out_dir, TOKENIZER_FILE), pretty=True)
  # Written by hand (not save_pretrained) so every file is stable across library versions.
  _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": ENDOFTEXT,
      "pad_token": ENDOFTEXT,
      "bos_token": None,
      "unk_token": None,
      "chat_template": CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 32768,
      "split_special_tokens": False,
  })
  _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
      "eos_token": ENDOFTEXT,
      "pad_token": ENDOFTEXT,
      "additional_special_tokens": list(CHAT_TOKENS[1:]),
  })
  return load_tokenizer(out_dir)


JSON_SIDECARS = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.json")


class TokenizerError(ValueError):
  """A tokenizer directory that is missing, incomplete or corrupt; the message names the file."""


def check_tokenizer_dir(path: str | os.PathLike) -> None:
  """Raises naming the file unless `path` holds a readable HF tokenizer.

  FileNotFoundError for a missing directory or tokenizer.json, `TokenizerError` for a corrupt file.

  Why: transformers reports a corrupt file as a bare JSONDecodeError without its path.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path} does not exist; train one with "
                         f"autotraj_jax.tokenizer.build_demo_tokenizer or point to an HF model dir")
  main_file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(main_file):
    raise FileNotFoundError(f"{main_file} is missing; expected an HF tokenizer directory")
  for name in JSON_SIDECARS:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      continue
    try:
      with open(file, encoding="utf-8") as f:
        json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise TokenizerError(f"{file}: not a valid JSON tokenizer file ({e})") from None
  from tokenizers import Tokenizer

  try:
    Tokenizer.from_file(main_file)
  except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception
    raise TokenizerError(f"{main_file}: not a valid tokenizer ({e})") from None


def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerFast":
  """`AutoTokenizer` from a local directory, with a pad token guaranteed (eos if none).

  Missing or corrupt files raise as in `check_tokenizer_dir`, naming the file.
  """
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  path = os.fspath(path)
  check_tokenizer_dir(path)
  # Ours say PreTrainedTokenizerFast: loaded as written. Through AutoTokenizer, an exported model
  # directory's config.json (model_type qwen2) would make it a Qwen2Tokenizer, which re-splits
  # numbers into single digits unlike the tokenizer.json the model was trained with.
  cls = PreTrainedTokenizerFast if _tokenizer_class(path) == "PreTrainedTokenizerFast" else AutoTokenizer
  try:
    tok = cls.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise TokenizerError(f"tokenizer at {path} has neither a pad nor an eos token")
    tok.pad_token = tok.eos_token
  return tok


def _tokenizer_class(path: str) -> str | None:
  try:
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      return json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None  # AutoTokenizer decides (and reports a corrupt file)


_NAMES = ("Alice", "Bob", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon")
_ITEMS = ("apples", "books", "coins", "eggs", "marbles", "pencils", "stamps", "tickets")
_PLACES = ("Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito")
# Common words, so the BPE learns real English pieces rather than only digits and tags.
_WORDS = """
the of and to in is was for that with as on by at from it an be this which or are have had not
but what all were when we there can more if no out so said each about how up them then she many
some would other into has her two like him see time could make than first been its who now people
my made over did down only way find use may water long little very after words called just where
most know get through back much before go good new write our used me man too any day same right
look think also around another came come work three word must because does part even place well
such here take why things help put years different away again off went old number great tell men
say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
looked show large often together asked house don't world going want school important until form
food keep children feet land side without boy once animals life enough took sometimes four head
above kind began almost live page got earth need far hand high year mother light parts country
father let night following picture being study second eyes soon times story boys since white days
paper hard near sentence better best across during today others however sure means knew try told
young miles sun ways thing whole hear example heard several change answer room sea against top
turned learn point city play toward five using himself usually money seen car morning problem
solution equation integer fraction decimal percent remainder divide multiply subtract add total
average ratio probability triangle circle square area perimeter volume angle degree function
variable value result compute calculate evaluate simplify factor prime digit sum product difference
quotient minimum maximum median sequence series matrix vector derivative integral limit polynomial
python code print return import range list dict string float round len sorted append lambda class
def yield while assert except raise finally global continue break true false none error output
search query document passage evidence retrieve tool call observation reasoning verify check final
question correct wrong repair trajectory reward model policy train step batch token sample
""".split()
_SENTENCES = (
    "Let me think about this step by step.",
    "I will use Python to check the arithmetic.",
    "The tool returned the result, so the answer follows.",
    "First, compute the total. Then, subtract what was used.",
    "I should search for the missing fact before answering.",
    "The result matches my estimate, which is a good sign.",
    "That was wrong; let me fix the code and run it again.",
    "The question asks for the final number only.",
)


def _arith(rng: random.Random) -> str:
  a, b = rng.randint(0, 9999), rng.randint(1, 999)
  op = rng.choice("+-*/")
  value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 4)}[op]
  return f"{a} {op} {b} = {value}"


def _snippet(rng: random.Random) -> str:
  a, b, n = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 20)
  return rng.choice((
      f"print({a}*{b})",
      f"x = {a}\ny = {b}\nprint(x + y)",
      f"import math\nprint(math.sqrt({a * a}))",
      f"total = 0\nfor i in range({n}):\n    total += i * {a}\nprint(total)",
      f"def f(n):\n    return n * n + {b}\n\nprint(f({n}))",
      f"nums = [{a}, {b}, {n}]\nprint(sum(nums) / len(nums))",
      f"from fractions import Fraction\nprint(Fraction({a}, {b}))",
      f"print(round({a} / {b}, 3))",
  ))


def _question(rng: random.Random) -> tuple[str, str, str]:
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  a, b = rng.randint(2, 99), rng.randint(2, 99)
  q = rng.choice((
      f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
      f"{name} packs {a} boxes with {b} {item} each. How many {item} are there in total?",
      f"What is {a} times {b}?",
  ))
  code = f"print({a} + {b})" if "buys" in q else f"print({a} * {b})"
  ans = str(a + b) if "buys" in q else str(a * b)
  return q, code, ans


def _trajectory(rng: random.Random) -> str:
  q, code, ans = _question(rng)
  think = " ".join(rng.sample(_SENTENCES, 2))
  body = (f"<think>{think}</think>\n<code>\n{code}\n</code>\n<result>\n{ans}\n</result>\n"
          f"<answer>The answer is \\boxed{{{ans}}}.</answer>")
  if rng.random() < 0.3:
    place = rng.choice(_PLACES)
    body = (f"<think>I need a fact about {place}.</think>\n<search>population of {place}</search>\n"
            f"<result>{place} has about {rng.randint(1, 30)} million people.</result>\n" + body)
  return f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{body}{IM_END}\n{ENDOFTEXT}"


def _latex(rng: random.Random) -> str:
  a, b = rng.randint(1, 99), rng.randint(2, 99)
  return rng.choice((
      f"$\\frac{{{a}}}{{{b}}}$", f"$\\sqrt{{{a}}}$", f"$x^{{{b}}} + {a}x$",
      f"\\boxed{{{a}}}", f"$\\left({a}, {b}\\right)$", f"$\\pi r^2 = {a}\\pi$",
  ))


def _prose(rng: random.Random) -> str:
  words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
  words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
  text = " ".join(words)
  return text[0].upper() + text[1:] + rng.choice(".?!")


def _iter_demo(num_docs: int, seed: int) -> Iterator[str]:
  rng = random.Random(seed)
  makers = (_arith, _snippet, _trajectory, _latex, _prose, _prose,
            lambda r: " ".join(r.sample(_SENTENCES, 3)),
            lambda r: f"The number is {r.randint(0, 10**9)}, or {r.random():.6f} as a fraction.")
  for _ in range(num_docs):
    yield "\n".join(rng.choice(makers)(rng) for _ in range(4))


def demo_tokenizer_corpus(num_docs: int = 4000, seed: int = 0) -> list[str]:
  """Deterministic text mixing arithmetic, Python, LaTeX and ChatML trajectories with tags."""
  return list(_iter_demo(num_docs, seed))


def build_demo_tokenizer(out_dir: str | os.PathLike,
                         vocab_size: int = 2048) -> "PreTrainedTokenizerFast":
  """Train the demo tokenizer (a few seconds) into `out_dir`."""
  return train_tokenizer(demo_tokenizer_corpus(), out_dir, vocab_size=vocab_size)
