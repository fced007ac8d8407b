# XLA flags for training on NVIDIA GPUs: `source configs/gpu/xla_flags.sh` before python3 -m MaxText.train.
# They let XLA overlap collectives with compute and use larger fused kernels; drop one to debug a hang or OOM.
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_enable_command_buffer= \
  --xla_gpu_enable_highest_priority_async_stream=true \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864"
# Let JAX take most of the GPU memory up front (fragmentation costs more than the reserve saves).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
