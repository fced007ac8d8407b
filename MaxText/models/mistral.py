"""Mistral: the Llama layer; its sliding-window attention comes from the `sliding_window_size` config key."""

from MaxText.models.llama2 import LlamaDecoderLayer

DecoderLayer = LlamaDecoderLayer
