"""Parameter kinds the trainer treats differently from ordinary weights."""

from flax import nnx


class RuleUpdated(nnx.Param):
  """A parameter that its module's `post_update` rule sets after each step (e.g. a MoE selection bias).

  It gets no gradient; the optimizer applies no weight decay to it, so only the rule moves it.
  """


def trained_by_optimizer(variable) -> bool:
  """Whether the optimizer's full update (weight decay included) applies to a parameter variable."""
  return not isinstance(variable, RuleUpdated)
