"""Input pipeline throughput: tokens/s that create_data_iterators delivers as global jax.Arrays.

    python3 -m benchmarks.input_pipeline_benchmark [--batches=N] [key=value ...]   (from the repo root)

Defaults are the llama-small benchmark settings (seq 512, global batch 8) on the quickstart corpus, with enough
epochs that the data never runs out. Reports all tokens/s (rows x length) and real tokens/s (padding excluded), the
median over batches after warm-up, in the same units as the train step's Tokens/s so they compare directly.
"""

import statistics
import sys
import time

import jax
import numpy as np

from MaxText import pyconfig, sharding
from MaxText.input_pipeline import create_data_iterators

DEFAULTS = {
    "model_name": "llama-small",
    "max_target_length": 512,
    "max_prefill_predict_length": 64,
    "num_epoch": 1000,
    "log_config": False,
}


def main(argv):
  batches, warmup = 200, 10
  overrides = []
  for arg in argv[1:]:
    if arg.startswith("--batches="):
      batches = int(arg.split("=", 1)[1])
    elif arg.startswith("--warmup="):
      warmup = int(arg.split("=", 1)[1])
    else:
      overrides.append(arg)
  given = {a.split("=", 1)[0] for a in overrides}
  defaults = dict(DEFAULTS, per_device_batch_size=8 / jax.device_count())
  config = pyconfig.initialize_or_exit(
      ["", "base.yml"] + [f"{k}={v}" for k, v in defaults.items() if k not in given] + overrides
  )
  mesh = sharding.create_mesh(config)
  start = time.perf_counter()
  train, _ = create_data_iterators(config, mesh)
  setup_s = time.perf_counter() - start
  times, real = [], 0
  for i in range(warmup + batches):
    t = time.perf_counter()
    batch = next(train)
    jax.block_until_ready(batch)
    if i >= warmup:
      times.append(time.perf_counter() - t)
      real += int(np.count_nonzero(np.asarray(batch["inputs_segmentation"])))
  tokens = config.global_batch_size_to_load * config.max_target_length
  median = statistics.median(times)
  streams = config.data_streams or config.global_batch_size_to_load
  print(
      f"dataset_type={config.dataset_type} seq={config.max_target_length} global_batch={config.global_batch_size_to_load}"
      f" data_streams={streams} grain_worker_count={config.grain_worker_count}"
  )
  print(f"setup (first batch included): {setup_s:.2f} s")
  print(f"median batch time: {median * 1e3:.2f} ms over {batches} batches")
  print(f"tokens/s (median): {tokens / median:,.0f}")
  print(f"tokens/s (mean, all batches): {tokens * batches / sum(times):,.0f}")
  print(f"real (non-padding) tokens/s (mean): {real / sum(times):,.0f}  fill: {real / (tokens * batches):.3f}")


if __name__ == "__main__":
  main(sys.argv)
