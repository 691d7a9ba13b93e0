"""Text chat with the GLM-6B language model of VisualGLM (no image).

    python run_glm.py --config run_glm_tiny_text_generation.yaml --prompt "你好"

The YAML names the model (`model.model_config` GLMConfig, `model.arch`), its checkpoint and
the tokenizer, as MindFormers configs do; a bare config name is looked up in configs/visualglm/.
"""
import argparse
import time

import numpy as np

from research.common.config import load_config, resolve_config_path
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from research.common.runtime import (MODELS, TOKENIZER, build_registered, cli_main, init_context,
                                     load_weights, resolve_path, str2bool)
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.processing_visualglm import chat_prompt, postprocess_response
from research.visualglm import modeling_glm, tokenization_chatglm  # noqa: F401  (registration)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="run_glm_6b_text_generation.yaml")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="the question (default 你好); give it several times for a batch")
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--use_past", type=str2bool, default=None, help="KV cache (overrides YAML)")
    parser.add_argument("--seq_length", type=int, default=None, help="static length (overrides YAML)")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--do_sample", type=str2bool, default=None, help="sample (overrides YAML)")
    parser.add_argument("--checkpoint", default=None, help="converted GLM checkpoint (overrides YAML)")
    args = parser.parse_args(argv)
    args.prompts = args.prompts or ["你好"]
    return args


def check_special_ids(config, tokenizer):
    """The model's special ids must be the tokenizer's, or prompts would be mis-positioned."""
    pairs = [("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
             ("mask_token_id", tokenizer.mask_token_id), ("gmask_token_id", tokenizer.gmask_token_id)]
    wrong = [f"{name}: config {getattr(config, name)}, tokenizer {value}"
             for name, value in pairs if getattr(config, name) != value]
    if wrong:
        raise UserInputError("model_config special ids do not match the tokenizer file: "
                             + "; ".join(wrong))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserInputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {config.vocab_size}")


def build_glm(args):
    """Config, model (with weights) and tokenizer from the YAML and the command line."""
    config_path = resolve_config_path(args.config, "visualglm")
    yaml_config = load_config(config_path)
    device = init_context(yaml_config, args.device_id)
    model_node = yaml_config.get("model") or {}
    glm_config = GLMConfig.from_dict(model_node.get("model_config"), "model.model_config",
                                     yaml_config.source)
    for field in ("use_past", "seq_length", "do_sample"):
        value = getattr(args, field)
        if value is not None:
            setattr(glm_config, field, value)
    if args.checkpoint is not None:
        glm_config.checkpoint_name_or_path = args.checkpoint
    glm_config.validate()
    arch = (model_node.get("arch") or {}).get("type", "GLMForConditionalGeneration")
    model = build_registered(MODELS, arch, glm_config)
    model.set_train(False)
    loaded = load_weights(model, glm_config.checkpoint_name_or_path, "GLM checkpoint")
    tokenizer_node = dict((yaml_config.get("processor") or {}).get("tokenizer") or {})
    if not tokenizer_node.get("vocab_file"):
        raise UserInputError(f"{config_path}: processor.tokenizer.vocab_file is not set")
    tokenizer_node["vocab_file"] = resolve_path(tokenizer_node["vocab_file"], "tokenizer vocab_file")
    tokenizer = build_registered(TOKENIZER, tokenizer_node.pop("type", "ChatGLMTokenizer"),
                                 **tokenizer_node)
    check_special_ids(glm_config, tokenizer)
    return glm_config, model, tokenizer, loaded, device


@cli_main
def main(argv=None):
    args = parse_args(argv)
    config, model, tokenizer, loaded, device = build_glm(args)
    print(f"device: {device}; weights: "
          + (config.checkpoint_name_or_path if loaded else
             "none given, random initialisation (UNTRAINED: the answers are noise)"))
    prompts = [chat_prompt(p, english=args.english) for p in args.prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    settings = GenerationConfig(
        max_new_tokens=args.max_new_tokens, max_length=config.max_decode_length,
        do_sample=config.do_sample, top_k=config.top_k, top_p=config.top_p,
        temperature=config.temperature, repetition_penalty=config.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        valid_vocab_size=tokenizer.vocab_size, use_past=config.use_past)
    start = time.perf_counter()
    outputs = generate(model, ids, settings)
    seconds = time.perf_counter() - start
    answers = [postprocess_response(tokenizer.decode(out)) for out in outputs]
    print([prompt + answer for prompt, answer in zip(prompts, answers)])
    new_tokens = int(np.sum([len(out) for out in outputs]))
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"use_past={config.use_past})")
    return answers


if __name__ == "__main__":
    main()
