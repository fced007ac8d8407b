"""Peak host memory of the Hugging Face converters on a ~1 GB checkpoint built locally (no download, no torch).

    python3 benchmarks/conversion_memory.py [--workdir=/tmp/conversion_memory] [--keep]

Writes a Llama-architecture checkpoint of random bfloat16 weights (about 500M parameters, two safetensors shards
with an index), converts it with to_maxtext (scanned and unscanned, bfloat16) and back with to_huggingface, each in
a fresh process, and prints each process's peak RSS next to the bare import cost of the same process and the sizes
that bound it: the largest tensor, and the largest parameter stacked over all layers.
"""

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsWriter  # pylint: disable=wrong-import-position

# ~1.0 GB in bfloat16: 16 layers of hidden 1536 (12 query / 4 kv heads of 128), MLP 4096, vocab 32000, untied.
DIMS = dict(hidden=1536, heads=12, kv_heads=4, head_dim=128, mlp=4096, layers=16, vocab=32000)


def build_checkpoint(directory: pathlib.Path) -> dict:
  d = DIMS
  e, q, kv, m = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["mlp"]
  shapes = {"model.embed_tokens.weight": (d["vocab"], e), "model.norm.weight": (e,), "lm_head.weight": (d["vocab"], e)}
  for i in range(d["layers"]):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (e,),
        p + "post_attention_layernorm.weight": (e,),
        p + "self_attn.q_proj.weight": (q, e),
        p + "self_attn.k_proj.weight": (kv, e),
        p + "self_attn.v_proj.weight": (kv, e),
        p + "self_attn.o_proj.weight": (e, q),
        p + "mlp.gate_proj.weight": (m, e),
        p + "mlp.up_proj.weight": (m, e),
        p + "mlp.down_proj.weight": (e, m),
    }
  dtype = np.dtype(ml_dtypes.bfloat16)
  writer = SafetensorsWriter(directory, [(k, s, dtype) for k, s in shapes.items()], max_shard_bytes=600 * 10**6)
  rng = np.random.default_rng(0)
  for name, shape in shapes.items():
    writer.write(name, (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype))
  writer.close()
  config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": e,
      "intermediate_size": m,
      "num_hidden_layers": d["layers"],
      "num_attention_heads": d["heads"],
      "num_key_value_heads": d["kv_heads"],
      "head_dim": d["head_dim"],
      "vocab_size": d["vocab"],
      "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0,
      "tie_word_embeddings": False,
      "hidden_act": "silu",
      "torch_dtype": "bfloat16",
  }
  (directory / "config.json").write_text(json.dumps(config))
  sizes = {k: int(np.prod(s)) * 2 for k, s in shapes.items()}
  stacked = max(
      sum(v for k, v in sizes.items() if k.endswith(suffix)) for suffix in ("gate_proj.weight", "q_proj.weight")
  )
  return {"total": sum(sizes.values()), "largest_tensor": max(sizes.values()), "largest_stacked": stacked}


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
  """(peak RSS in MB, seconds) of a fresh `python3 args...` (each measured in its own wrapper process)."""
  code = (
      "import resource, subprocess, sys, time; t = time.time();"
      f"subprocess.run({[sys.executable, *args]!r}, check=True, cwd={str(REPO)!r},"
      " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
      "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t)"
  )
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
  return float(out[0]), float(out[1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/conversion_memory")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  work = pathlib.Path(args.workdir)
  shutil.rmtree(work, ignore_errors=True)
  (work / "hf").mkdir(parents=True)
  start = time.time()
  sizes = build_checkpoint(work / "hf")
  print(f"built {sizes['total'] / 1e9:.2f} GB checkpoint in {time.time() - start:.0f}s", flush=True)
  imports = "import MaxText.utils.ckpt_conversion.to_maxtext, MaxText.utils.ckpt_conversion.to_huggingface"
  baseline, _ = peak_rss_mb(["-c", imports])
  rows = [("imports only (baseline)", baseline, 0.0)]
  for scan in ("true", "false"):
    out = work / f"mt_{scan}"
    cmd = ["-m", "MaxText.utils.ckpt_conversion.to_maxtext", f"hf_model_path={work / 'hf'}", f"output_directory={out}"]
    rss, secs = peak_rss_mb([*cmd, f"scan_layers={scan}", "weight_dtype=bfloat16"])
    rows.append((f"to_maxtext scan_layers={scan}", rss, secs))
  rss, secs = peak_rss_mb(
      [
          "-m",
          "MaxText.utils.ckpt_conversion.to_huggingface",
          str(work / "mt_true" / "model.yml"),
          f"load_parameters_path={work / 'mt_true' / 'params'}",
          f"hf_output_path={work / 'back'}",
          "weight_dtype=bfloat16",
      ]
  )
  rows.append(("to_huggingface (scanned params)", rss, secs))
  mb = 1e6
  print(
      f"checkpoint {sizes['total'] / mb:.0f} MB; largest tensor {sizes['largest_tensor'] / mb:.0f} MB;"
      f" largest parameter stacked over layers {sizes['largest_stacked'] / mb:.0f} MB"
  )
  print(f"{'process':34s} {'peak RSS MB':>12s} {'over baseline':>14s} {'seconds':>8s}")
  for name, rss, secs in rows:
    print(f"{name:34s} {rss:12.0f} {rss - baseline:14.0f} {secs:8.1f}")
  if not args.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  main()
