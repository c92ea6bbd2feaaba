"""QLoRA for a causal language model: a Llama-architecture decoder adapted to a new domain.

No pretrained Llama can be downloaded here, so the example makes its own base model first:
a small byte-level Llama (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) is
trained in float32 on English sentences (examples/data/paraphrase_pairs.tsv). Then the QLoRA
recipe runs exactly as it would on a real checkpoint: every projection is quantized to NF4 with
double quantization, LoRA adapters go on q, k, v, o, gate, up and down, each block is
rematerialized (gradient checkpointing through the 4-bit layers), and only the adapters train,
with 8-bit AdamW, on a new domain -- Python source code (the standard library's ``argparse``).
Held-out loss on that domain is shown before and after; the adapter is saved with Orbax and
reloaded.

  python examples/llama_qlora.py                 # a few minutes on a CPU
  python examples/llama_qlora.py --device gpu --hidden 512 --layers 8 --seq 256

The same code fine-tunes a TinyLlama-1.1B-sized model (``LlamaConfig.tinyllama_1_1b()``); see
benchmarks/qlora_step.py for its step time.
"""

from __future__ import annotations

import argparse
import csv
import functools
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxquant import nn as jqnn
from jaxquant import optim as jqoptim
from jaxquant.models import LLAMA_LORA_TARGETS, LlamaConfig, LlamaForCausalLM, causal_lm_loss

as_pure = getattr(nnx, "as_pure", None) or nnx.pure
DATA = pathlib.Path(__file__).parent / "data" / "paraphrase_pairs.tsv"


def english_bytes() -> np.ndarray:
  with open(DATA, newline="", encoding="utf-8") as f:
    sentences = sorted({r[k] for r in csv.DictReader(f, delimiter="\t")
                        for k in ("sentence1", "sentence2")})
  return np.frombuffer("\n".join(sentences).encode(), np.uint8)


def python_bytes() -> np.ndarray:
  return np.frombuffer(inspect.getsource(argparse).encode(), np.uint8)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
  while True:
    starts = rng.integers(0, len(data) - seq, batch)
    yield jnp.asarray(np.stack([data[s:s + seq] for s in starts]).astype(np.int32))


def make_step(graphdef, tx):
  """A jitted step on the trainable arrays (``params``); ``rest`` of the model is frozen."""
  def loss_fn(params, rest, ids):
    return causal_lm_loss(nnx.merge(graphdef, params, rest)(ids), ids)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, rest, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, ids)
    if isinstance(tx, jqoptim.Optimizer8bit):
      params, opt_state = jqoptim.update_and_apply(tx, grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return step


def train(model, filt, tx, data, args, desc):
  graphdef, params, rest = nnx.split(model, filt, ...)
  params = as_pure(params)
  opt_state = tx.init(params)
  step = make_step(graphdef, tx)
  it = batches(data, args.batch_size, args.seq, np.random.default_rng(args.seed))
  bar = tqdm(range(args.steps), desc=desc, unit="step")
  for _ in bar:
    params, opt_state, loss = step(params, opt_state, rest, next(it))
    bar.set_postfix(loss=f"{float(loss):.3f}")
  bar.close()
  nnx.update(model, params)


@nnx.jit
def _eval_loss(model, ids):
  return causal_lm_loss(model(ids), ids)


def eval_loss(model, data: np.ndarray, seq: int) -> float:
  n = (len(data) - 1) // seq
  ids = jnp.asarray(data[:n * seq].reshape(n, seq).astype(np.int32))
  return float(np.mean([_eval_loss(model, ids[i:i + 16]) for i in range(0, n, 16)]))


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, all checked here: a bad one stops the run before the base model trains."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 64")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--base-steps", type=int, default=150, help="float pre-training steps")
  p.add_argument("--steps", type=int, default=100, help="QLoRA steps")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2 r)")
  p.add_argument("--lr", type=float, default=2e-3, help="8-bit AdamW learning rate")
  p.add_argument("--device", "--platform", dest="device", default=None,
                 help="JAX platform: cpu, gpu, tpu (default: JAX's choice)")
  p.add_argument("--out", default="qlora_llama_out", help="where the adapter is saved")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.hidden < 64 or args.hidden % 64:
    p.error(f"--hidden must be a positive multiple of 64 (NF4 blocks of 64), got {args.hidden}")
  for name, low in (("layers", 1), ("seq", 2), ("batch_size", 1), ("base_steps", 0),
                    ("steps", 0), ("rank", 1)):
    if getattr(args, name) < low:
      p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
  if not args.lr > 0:
    p.error(f"--lr must be > 0, got {args.lr}")
  shortest = min(len(english_bytes()), int(0.1 * len(python_bytes())))
  if args.seq >= shortest:
    p.error(f"--seq must be < {shortest} (the held-out text's length in bytes), got {args.seq}")
  try:
    llama_config(args)
  except ValueError as e:  # e.g. heads of 32 that the KV heads (hidden / 128) do not divide
    p.error(f"--hidden {args.hidden} gives no valid model: {e}")
  return args


def llama_config(args: argparse.Namespace) -> LlamaConfig:
  """The model the flags describe: heads of 32, one KV head per 128 of ``--hidden``."""
  return LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                     num_layers=args.layers, num_heads=args.hidden // 32,
                     num_kv_heads=max(1, args.hidden // 128), max_position=args.seq,
                     remat="full")


def main(argv=None):
  args = parse_args(argv)
  if args.device:
    jax.config.update("jax_platforms", args.device)
  cfg = llama_config(args)
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; model: {cfg.num_params():,} "
        f"parameters, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads")

  english, code = english_bytes(), python_bytes()
  split = int(0.9 * len(code))
  code_train, code_test = code[:split], code[split:]
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
  base_args = argparse.Namespace(**{**vars(args), "steps": args.base_steps})
  train(model, nnx.Param, optax.adamw(3e-3), english, base_args, "base model (float32)")
  print(f"base model: loss on English {eval_loss(model, english, args.seq):.3f}, on held-out "
        f"Python {eval_loss(model, code_test, args.seq):.3f} nats/byte")

  qcfg = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                          skip_modules=("lm_head",), quantize_embeddings=False)
  _, summary = jqnn.quantize_model(model, qcfg, return_summary=True)
  print(f"NF4+DQ: {len(summary.layers)} projections {summary.bytes_before:,} B -> "
        f"{summary.bytes_after:,} B")
  lcfg = jqnn.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=LLAMA_LORA_TARGETS)
  jqnn.add_lora(model, lcfg, rngs=args.seed)
  before = eval_loss(model, code_test, args.seq)
  print(f"NF4 model, held-out Python loss {before:.3f}")
  train(model, nnx.LoRAParam, jqoptim.adamw8bit(args.lr, min_8bit_size=1024), code_train,
        args, "QLoRA on Python")
  after = eval_loss(model, code_test, args.seq)
  print(f"after QLoRA: held-out Python loss {before:.3f} -> {after:.3f} nats/byte")

  path = jqnn.save_lora(pathlib.Path(args.out).absolute() / "adapter", model, force=True)
  fresh = nnx.clone(model)
  for _, layer in jqnn.lora_modules(fresh):
    layer.lora_b.set_value(jnp.zeros_like(layer.lora_b[...]))
  jqnn.load_lora(path, fresh)
  again = eval_loss(fresh, code_test, args.seq)
  print(f"adapter saved to {path} and reloaded: loss {again:.3f}")
  if abs(again - after) > 1e-5:
    raise SystemExit("the reloaded adapter does not reproduce the fine-tuned model")
  return dict(before=before, after=after)


if __name__ == "__main__":
  main()
