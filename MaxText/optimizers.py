"""Learning-rate schedules and the optax chain: clip -> AdamW(schedule)."""

from typing import Any, Optional

import optax


def create_learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine / constant / warmup-stable-decay (wsd).

  Past `learning_rate_schedule_steps` the schedule holds its final value, so `steps` may exceed it.
  """
  peak = config.learning_rate
  total = config.learning_rate_schedule_steps
  warmup = config.warmup_steps
  final = peak * config.cosine_learning_rate_final_fraction
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = total - warmup
  if config.lr_schedule_type == "constant":
    after = optax.constant_schedule(peak)
  elif config.lr_schedule_type == "cosine":
    after = optax.cosine_decay_schedule(peak, max(rest, 1), alpha=config.cosine_learning_rate_final_fraction)
  else:  # wsd: hold the peak, then decay over the last wsd_decay_steps_fraction of the schedule.
    decay = int(config.wsd_decay_steps_fraction * total)
    if config.wsd_decay_style == "linear":
      decay_fn = optax.linear_schedule(peak, final, max(decay, 1))
    else:
      decay_fn = optax.cosine_decay_schedule(peak, max(decay, 1), alpha=config.cosine_learning_rate_final_fraction)
    after = optax.join_schedules([optax.constant_schedule(peak), decay_fn], [rest - decay])
  if warmup == 0:
    return after
  return optax.join_schedules([warmup_fn, after], [warmup])


def create_optimizer(
    config, weight_decay_mask: Optional[Any] = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> AdamW(schedule). `weight_decay_mask`: a params-shaped tree of bools (False: no decay), e.g. for
  parameters a rule sets rather than the gradient (model_creation.weight_decay_mask)."""
  schedule = create_learning_rate_schedule(config)
  adamw = optax.adamw(
      learning_rate=schedule,
      b1=config.adam_b1,
      b2=config.adam_b2,
      eps=config.adam_eps,
      eps_root=config.adam_eps_root,
      weight_decay=config.adam_weight_decay,
      mu_dtype=config.mu_dtype,
      mask=weight_decay_mask,
  )
  if config.gradient_clipping_threshold > 0:
    return optax.chain(optax.clip_by_global_norm(config.gradient_clipping_threshold), adamw), schedule
  return adamw, schedule
