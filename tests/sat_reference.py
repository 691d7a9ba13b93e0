"""Builds SwissArmyTransformer (SAT) reference models on CPU for parity tests.

SAT 0.4.12 imports a triton rotary kernel when `sat` is imported; triton has no CPU backend
and the GLM paths tested here never call it, so a stand-in module is registered first.
"""
import argparse
import os
import socket
import sys
import types


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _prepare_sat_import():
    """SAT sets up a one-process torch.distributed group: give it a free port."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", _free_port())
    name = "sat.model.position_embedding.triton_rotary"
    if name not in sys.modules:
        stub = types.ModuleType(name)

        def apply_rotary(*_args, **_kwargs):
            raise RuntimeError("the triton rotary kernel is not available on CPU")

        stub.apply_rotary = apply_rotary
        sys.modules[name] = stub


def sat_chatglm_model(config, seed=0, std=0.2):
    """SAT ChatGLMModel (GLM-6B v1) with the shapes of a GLMConfig and seeded random weights.

    `std` 0.2 gives a tiny model strongly varying logits; at real widths use about 0.02 (the
    6B's init std), or attention scores grow so large that softmax turns one-hot."""
    _prepare_sat_import()
    import torch
    from sat.model.official.chatglm_model import ChatGLMModel

    args = argparse.Namespace(
        num_layers=config.num_layers, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads, max_sequence_length=config.seq_length,
        inner_hidden_size=config.inner_hidden_size, hidden_size_per_attention_head=None,
        layernorm_order="post", layernorm_epsilon=config.layernorm_epsilon,
        model_parallel_size=1, skip_init=False, use_bias=True, use_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
        gmask_token_id=config.gmask_token_id, pad_token_id=config.pad_token_id)
    model = ChatGLMModel(args).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = std if "layernorm" not in name else 0.1
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(noise + (1.0 if name.endswith("layernorm.weight") else 0.0))
    return model
