"""DPO (use_dpo): preference pairs become two-segment rows, the loss is log 2 when policy = reference, the loss and
gradients equal a direct implementation of the DPO formula on each answer alone, and training raises the margin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import pyconfig, sharding, train, training
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import tokenizer as tokenizers
from MaxText.tests.test_sft import CHATML, WORDS, first_batch, write_jsonl, write_tokenizer


@pytest.fixture(scope="module", name="tok_dir")
def _tok_dir(tmp_path_factory):
  return write_tokenizer(tmp_path_factory.mktemp("dpo_tok") / "chatml", CHATML)


def make_pairs(n, seed=0):
  """The preferred answer repeats the prompt's first word twice; the rejected one is other words."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = list(rng.choice(WORDS[:8], size=3))
    out.append(
        {
            "prompt": " ".join(words),
            "chosen": f"{words[0]} {words[0]}",
            "rejected": " ".join(rng.choice(WORDS[8:], size=2)),
        }
    )
  return out


def dpo_config(tok_dir, data, *args, **kw):
  values = dict(
      model_name="tests/tiny-llama",
      per_device_batch_size=0.5,  # 4 pairs on the 8 test devices
      max_target_length=48,
      tokenizer_type="huggingface",
      tokenizer_path=str(tok_dir),
      vocab_size=64,
      dataset_type="grain",
      grain_train_files=str(data),
      grain_eval_files="",
      train_data_columns=["prompt", "chosen", "rejected"],
      use_dpo=True,
      dtype="float32",
      weight_dtype="float32",
      enable_checkpointing=False,
      log_config=False,
      enable_tensorboard=False,
  )
  values.update(kw)
  return pyconfig.initialize(["", "base.yml", *args], **values)


def test_each_row_is_a_pair_with_only_the_answers_as_targets(tok_dir, tmp_path):
  pairs = make_pairs(8)
  batch = first_batch(dpo_config(tok_dir, write_jsonl(tmp_path / "p.jsonl", pairs)))
  tok = tokenizers.load_tokenizer(tokenizers.TokenizerSpec("huggingface", str(tok_dir)))
  by_prompt = {p["prompt"]: p for p in pairs}
  for row in range(batch["inputs"].shape[0]):
    seg, tseg = batch["inputs_segmentation"][row], batch["targets_segmentation"][row]
    assert set(np.unique(seg)) == {0, 1, 2}
    chosen = tok.decode(batch["inputs"][row][seg == 1]).split()
    rejected = tok.decode(batch["inputs"][row][seg == 2]).split()
    prompt = " ".join(chosen[2:5])
    assert rejected[2:5] == chosen[2:5]  # the same prompt in both
    record = by_prompt[prompt]
    assert tok.decode(batch["targets"][row][tseg == 1]).split() == record["chosen"].split() + ["<|im_end|>"]
    assert tok.decode(batch["targets"][row][tseg == 2]).split() == record["rejected"].split() + ["<|im_end|>"]


def _answer_logp(model, tokens, targets_mask):
  """log p(answer | prompt) of one sequence run alone: sum of next-token log-probs where targets_mask is set."""
  positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)[None]
  logits = model(tokens[None], positions, None)[0].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
  return (picked * targets_mask[1:]).sum()


def test_loss_and_gradients_equal_the_dpo_formula(tok_dir, tmp_path):
  config = dpo_config(tok_dir, write_jsonl(tmp_path / "p.jsonl", make_pairs(8)), dpo_beta=0.5, dpo_label_smoothing=0.1)
  batch = first_batch(config)
  setup = training.TrainSetup(config, sharding.create_mesh(config))
  params = jax.device_get(setup.init_state()["params"])
  noise = jax.tree.map(lambda x: 0.05 * np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype), params)
  reference = jax.tree.map(lambda x, n: x + n, params, noise)

  def ours(p, ref):
    total, aux = training.loss_sums(setup, p, batch, None, True, aux_losses=False, reference=ref)
    return total, aux["total_weights"]

  (loss_sum, pairs), grads = jax.value_and_grad(ours, has_aux=True)(params, reference)
  assert int(pairs) == batch["inputs"].shape[0]
  same, _ = ours(params, params)
  np.testing.assert_allclose(float(same) / float(pairs), np.log(2.0), rtol=1e-6)

  # Direct: each answer alone (no packing, no segment ids), the DPO formula written out.
  rows = []
  for row in range(batch["inputs"].shape[0]):
    seg, tseg = batch["inputs_segmentation"][row], batch["targets_segmentation"][row]
    for s in (1, 2):
      tokens = batch["inputs"][row][seg == s]
      # targets_segmentation marks position i when token i + 1 is an answer token: shift to mark the tokens.
      answer = np.concatenate([[0], (tseg[seg == s] == s)[:-1]]).astype(np.float32)
      rows.append((tokens, answer))
  beta, eps = 0.5, 0.1

  def direct(p, ref):
    policy_model = nnx.merge(setup.graphdef, nnx.State(p), setup.rest)
    ref_model = nnx.merge(setup.graphdef, nnx.State(ref), setup.rest)
    total = 0.0
    for i in range(0, len(rows), 2):
      (c, cm), (r, rm) = rows[i], rows[i + 1]
      chosen = _answer_logp(policy_model, c, cm) - _answer_logp(ref_model, c, cm)
      rejected = _answer_logp(policy_model, r, rm) - _answer_logp(ref_model, r, rm)
      z = beta * (chosen - rejected)
      total += -(1 - eps) * jnp.log(jax.nn.sigmoid(z)) - eps * jnp.log(jax.nn.sigmoid(-z))
    return total

  want, want_grads = jax.value_and_grad(direct)(params, reference)
  np.testing.assert_allclose(float(loss_sum), float(want), rtol=1e-5)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["lora_rank=4"]], ids=["full", "lora"])
def test_training_raises_the_margin_from_log_2(tok_dir, tmp_path, extra):
  data = write_jsonl(tmp_path / "p.jsonl", make_pairs(64, seed=2))
  config = dpo_config(
      tok_dir,
      data,
      f"base_output_directory={tmp_path}",
      *extra,
      run_name="dpo",
      steps=25,
      learning_rate=1e-2,
      warmup_steps_fraction=0.0,
      dpo_beta=0.5,
  )
  history = train.train(config)
  assert history[0]["learning/loss"] == pytest.approx(np.log(2.0), rel=1e-5)
  assert history[0]["learning/dpo_reward_margin"] == pytest.approx(0.0, abs=1e-5)
  assert history[-1]["learning/dpo_reward_margin"] > 1.0
  assert history[-1]["learning/dpo_accuracy"] >= 0.75
  assert history[-1]["learning/loss"] < 0.5


def test_bad_dpo_settings_are_config_errors(tok_dir, tmp_path):
  data = write_jsonl(tmp_path / "p.jsonl", make_pairs(8))
  with pytest.raises(ConfigError, match=r"train_data_columns: use_dpo reads \[prompt, chosen, rejected\]"):
    dpo_config(tok_dir, data, train_data_columns=["prompt", "chosen"])
  with pytest.raises(ConfigError, match="use_dpo: trains on preference pairs; use_sft"):
    dpo_config(tok_dir, data, use_sft=True)
  with pytest.raises(ConfigError, match="load_full_state_path: a DPO run starts from load_parameters_path"):
    dpo_config(tok_dir, data, load_full_state_path=str(tmp_path))
  bad = [{"prompt": "alpha", "chosen": [{"role": "user", "content": "beta"}], "rejected": "gamma"}] * 8
  with pytest.raises(ConfigError, match="use_dpo: .*column 'chosen' has no assistant message"):
    first_batch(dpo_config(tok_dir, write_jsonl(tmp_path / "bad.jsonl", bad)))
