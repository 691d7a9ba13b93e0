"""ChatGLM2 against transformers' GlmForCausalLM: the same weights, the same threads, one run.

    python benchmarks/chatglm2_perf.py [--preset medium|tiny] [--new_tokens N] [--threads T]

transformers' GLM (the GLM-4 family's code) is ChatGLM2's architecture under other names
(tests/chatglm2/test_chatglm2_parity.py explains the correspondence), so a GlmForCausalLM
with seeded random weights (std 0.02, RMSNorm weights 1 +- 0.2) is the reference: its state
dict, renamed to HF THUDM/chatglm2-6b's keys, goes through convert_chatglm2's table into our
ChatGLM2ForConditionalGeneration (GRAPH mode). Both decode greedily with their KV cache and
no eos (the GlmConfig has eos_token_id None), so both produce every requested token; the
transformers side uses its default attention (sdpa).

Measured as benchmarks/measure.py's compare_decoding says, ours first, then transformers':
decode tokens/s at batch 1 and 8 (--new_tokens new tokens), the first-token latency of one long
prompt, the peak RSS while generating, the fraction of the decode floor (weight bytes per token
over the copy bandwidth) reached at batch 1, and whether the greedy tokens match but for
float32 near-ties ("tokens match: yes/no"; each parting printed with its logit gap).
Prints a table with the issue's goals (decode batch 1 >= 1.0x transformers, batch 8 >= 2x,
first token <= 1x) and writes it to compare_chatglm2.csv in --output_dir.

Presets: medium (hidden 2048, 8 layers, 16 heads of 128, 2 KV groups, SwiGLU 5504, vocab
65024, float32, seq_length 1024; 32-token prompts, 32 new tokens, a 512-token prompt for the
first token) and tiny (ChatGLM2Config.from_name("tiny"); 8-token prompts, 8 new tokens, a
32-token prompt), which runs in well under a minute.
"""
import os
import sys

import numpy as np
from transformers import GlmConfig, GlmForCausalLM

# This checkout's packages (research), whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.measure import PAD, Preset, compare_decoding, print_table, randomised, run_comparison, write_table

from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.convert_chatglm2 import chatglm2_rows
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from research.common.checkpoint import load_params_into_net
from research.common.convert import apply_table


def chatglm2_medium():
    """ChatGLM2-6B's architecture at hidden 2048: 8 layers, 16 heads of 128 with 2 KV groups,
    a SwiGLU of 5504 (about 8/3 x 2048), the 6B's vocabulary, float32."""
    return ChatGLM2Config(num_layers=8, padded_vocab_size=65024, hidden_size=2048, ffn_hidden_size=5504,
                          kv_channels=128, num_attention_heads=16, multi_query_group_num=2,
                          seq_length=1024, param_init_type="float32", compute_dtype="float32",
                          use_past=True, do_sample=False)


def description(config: ChatGLM2Config):
    """What the preset line says of our model."""
    return (f"hidden {config.hidden_size}, {config.num_layers} layers, "
            f"{config.num_attention_heads} heads x {config.kv_channels}, {config.kv_heads} KV groups, "
            f"ffn {config.ffn_hidden_size}, vocab {config.padded_vocab_size}, {config.compute_dtype}")


PRESETS = {
    "medium": Preset(chatglm2_medium, prompt=32, long_prompt=512, new_tokens=32),
    "tiny": Preset(lambda: ChatGLM2Config.from_name("tiny"), prompt=8, long_prompt=32, new_tokens=8),
}


# ---- the two models on the same weights -------------------------------------------------------

def glm_config(config: ChatGLM2Config):
    """GlmForCausalLM's config of a ChatGLM2 (RoPE on half of each head as interleaved pairs)."""
    return GlmConfig(vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.multi_query_group_num, head_dim=config.kv_channels,
                     partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False,
                     rms_norm_eps=config.layernorm_epsilon, rope_theta=10000.0 * config.rope_ratio,
                     max_position_embeddings=config.seq_length, pad_token_id=PAD, eos_token_id=None,
                     bos_token_id=None, attn_implementation="sdpa")


def transformers_model(config: ChatGLM2Config, seed=0):
    """GlmForCausalLM with seeded random weights (measure.randomised): std 0.02, RMSNorm weights 1 +- 0.2."""
    return randomised(GlmForCausalLM(glm_config(config)), seed)


def chatglm2_weights(model: GlmForCausalLM, config: ChatGLM2Config):
    """Our parameters holding `model`'s weights: its names become HF THUDM/chatglm2-6b's
    (q, k, v rows concatenated into query_key_value), then convert_chatglm2's table applies."""
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hf = {"transformer.embedding.word_embeddings.weight": weights.pop("model.embed_tokens.weight"),
          "transformer.encoder.final_layernorm.weight": weights.pop("model.norm.weight"),
          "transformer.output_layer.weight": weights.pop("lm_head.weight")}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            hf[dst + f"self_attention.query_key_value.{kind}"] = np.concatenate(
                [weights.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        hf[dst + "self_attention.dense.weight"] = weights.pop(src + "self_attn.o_proj.weight")
        hf[dst + "mlp.dense_h_to_4h.weight"] = weights.pop(src + "mlp.gate_up_proj.weight")
        hf[dst + "mlp.dense_4h_to_h.weight"] = weights.pop(src + "mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            hf[dst + norm + ".weight"] = weights.pop(src + norm + ".weight")
    if weights:
        raise ValueError(f"GlmForCausalLM weights without a ChatGLM2 name: {sorted(weights)}")
    return apply_table(hf, chatglm2_rows(config), what="GlmForCausalLM's weights")


def our_model(config: ChatGLM2Config, reference: GlmForCausalLM):
    """Our ChatGLM2 holding the reference's weights."""
    model = ChatGLM2ForConditionalGeneration(config)
    model.set_train(False)
    load_params_into_net(model, chatglm2_weights(reference, config))
    return model


def models(config: ChatGLM2Config):
    """(ours, its embedding table, transformers') holding the same seeded random weights."""
    reference = transformers_model(config)
    ours = our_model(config, reference)
    return ours, ours.transformer.embedding.embedding_weight, reference


# ---- the comparison -----------------------------------------------------------------------------

def compare(args):
    preset = PRESETS[args.preset]
    config = preset.config()
    rows, match = compare_decoding(args, preset, config, models, description(config))
    print_table(rows)
    print(f"tokens match: {'yes' if match else 'no'}")
    write_table(rows, args.output_dir, "compare_chatglm2.csv")
    return 0


def main(argv=None):
    return run_comparison(compare, __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
