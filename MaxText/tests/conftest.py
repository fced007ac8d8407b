"""Test session setup: 8 simulated CPU devices, so sharding tests run anywhere."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
