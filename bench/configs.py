"""Transformers config dicts (with ``model_type``) of the model shapes the benchmarks build.

Why one place: both benchmarks build GPT-2-shaped models from configs (no downloads); the
shape arguments differ per preset, the dict's layout does not.
"""

from __future__ import annotations

from typing import Any


def gpt2(
    n_layer: int, n_head: int, n_embd: int, n_positions: int, dropout: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """A GPT-2 config: ``dropout`` for residual, attention and embedding dropout alike;
    ``extra`` (vocab_size, token ids…) added as is."""
    return {
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "n_positions": n_positions,
        "resid_pdrop": dropout,
        "attn_pdrop": dropout,
        "embd_pdrop": dropout,
        **extra,
    }


def opt(layers: int, heads: int, hidden: int, ffn: int) -> dict[str, Any]:
    """As facebook/opt-*'s config.json (dropout 0.1, attention dropout 0, pre-LN, 2048
    positions, the 50272-token vocabulary)."""
    return {
        "model_type": "opt",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_size": hidden,
        "ffn_dim": ffn,
        "word_embed_proj_dim": hidden,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "do_layer_norm_before": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
    }
