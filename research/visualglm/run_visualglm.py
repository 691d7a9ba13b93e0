"""Answer questions about images with VisualGLM (MindFormers' `run_visualglm.py`).

    python -m research.visualglm.run_visualglm --config CONFIG --image_path IMAGE --prompt "描述这张图片。"

Several images: repeat --image_path/--prompt or give comma-separated lists as MindFormers'
script takes them; `--batch_size N` answers N pairs in one batched forward pass (default 1:
one by one). `--seq_length` is the text length as in MindFormers: the GLM's static length is
seq_length + the 32 image tokens. A bare config name is looked up in configs/visualglm/.
"""
import argparse
import time

from research.common.checkpoint import read_checkpoint
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig
from research.common.lora import load_lora_checkpoint
from research.common.runtime import cli_main, init_context, str2bool
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.modeling_visualglm import VisualGLMImageToTextGeneration, add_glm_lora
from research.visualglm.processing_visualglm import build_processor, postprocess_response
from research.visualglm.run_glm import check_special_ids

DEFAULT_CONFIG = "run_visualglm_6b_image_to_text_generation.yaml"
DEFAULT_IMAGE = "examples/visualglm/shapes.png"
DEFAULT_PROMPT = "描述这张图片。"


def add_model_arguments(parser):
    """Flags shared by the VisualGLM inference scripts."""
    parser.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                        help="YAML path or a name in configs/visualglm/")
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--use_past", type=str2bool, default=None, help="KV cache (overrides YAML)")
    parser.add_argument("--seq_length", type=int, default=None,
                        help="text tokens; the GLM length is this + the image tokens (overrides YAML)")
    parser.add_argument("--do_sample", type=str2bool, default=None, help="sample (overrides YAML)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")


def add_input_arguments(parser):
    parser.add_argument("--image_path", action="append", default=None,
                        help=f"image file (default {DEFAULT_IMAGE}); repeat or comma-separate for several")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"question (default {DEFAULT_PROMPT}); one per image")
    parser.add_argument("--batch_size", type=int, default=1, help="pairs per forward pass")


def image_prompt_pairs(args):
    """(image, prompt) pairs from the flags; one prompt is used for every image."""
    images = [p for value in (args.image_path or [DEFAULT_IMAGE]) for p in value.split(",") if p]
    prompts = args.prompt or [DEFAULT_PROMPT]
    if len(prompts) == 1 and len(images) > 1 and len(prompts[0].split(",")) == len(images):
        prompts = prompts[0].split(",")
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise UserInputError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, "
                             f"or one per image")
    if args.batch_size <= 0:
        raise UserInputError(f"--batch_size must be positive, got {args.batch_size}")
    return list(zip(images, prompts))


def build_visualglm(args, lora_checkpoint=None):
    """(config, model with its checkpoints, processor, loaded parts, device) from YAML + flags.

    With `lora_checkpoint` (a trainable-only checkpoint written by fine-tuning), LoRA as
    `text_config.pet_config` describes it is added to the GLM and loaded from that file.
    """
    yaml_config, config = load_visualglm_config(args.config)
    device = init_context(yaml_config, args.device_id)
    text = config.text_config
    if args.seq_length is not None:
        if args.seq_length <= 0:
            raise UserInputError(f"--seq_length must be positive, got {args.seq_length}")
        text.seq_length = args.seq_length + config.image_length
    for field in ("use_past", "do_sample", "top_k", "top_p"):
        if getattr(args, field) is not None:
            setattr(text, field, getattr(args, field))
    text.validate()
    config.validate()
    model = VisualGLMImageToTextGeneration(config)
    model.set_train(False)
    loaded = model.load_checkpoints()
    if lora_checkpoint:
        if not text.pet_config:
            raise UserInputError(f"{yaml_config.source.path}: text_config.pet_config is not set; it "
                                 f"must describe the LoRA that {lora_checkpoint} was trained with")
        add_glm_lora(model, yaml_config.source)
        load_lora_checkpoint(model, read_checkpoint(lora_checkpoint, "LoRA checkpoint"),
                             f"LoRA checkpoint {lora_checkpoint}")
        loaded.append("LoRA checkpoint")
    processor = build_processor(yaml_config.get("processor") or {}, config.image_length)
    if processor.image_processor.image_size != config.vision_config.image_size:
        raise UserInputError(
            f"processor.image_processor.image_size ({processor.image_processor.image_size}) must "
            f"equal vision_config.image_size ({config.vision_config.image_size})")
    check_special_ids(text, processor.tokenizer)
    return config, model, processor, loaded, device


def generation_settings(config, tokenizer, max_new_tokens=None):
    text = config.text_config
    return GenerationConfig(
        max_new_tokens=max_new_tokens, max_length=text.max_decode_length, do_sample=text.do_sample,
        top_k=text.top_k, top_p=text.top_p, temperature=text.temperature,
        repetition_penalty=text.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, valid_vocab_size=tokenizer.vocab_size,
        use_past=text.use_past)


def describe_weights(loaded):
    if len(loaded) >= 3:
        return "weights: " + ", ".join(loaded)
    missing = 3 - len(loaded)
    return (f"weights: {', '.join(loaded) or 'none'}; {missing} part(s) without a checkpoint keep "
            f"their random initialisation (UNTRAINED: the answers are noise)")


def answer(model, processor, config, pairs, settings, english=False, histories=None):
    """Answers for a list of (image, query) pairs in one batch; returns (prompts, answers)."""
    images, queries = [p[0] for p in pairs], [p[1] for p in pairs]
    inputs = processor(images, queries, histories=histories, english=english,
                       max_length=config.text_config.seq_length)
    outputs = model.generate(inputs["input_ids"], inputs["pre_image_lengths"],
                             inputs["pixel_values"], settings)
    answers = [postprocess_response(processor.tokenizer.decode(ids)) for ids in outputs]
    return inputs["prompts"], answers, sum(len(ids) for ids in outputs)


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_input_arguments(parser)
    args = parser.parse_args(argv)
    pairs = image_prompt_pairs(args)
    config, model, processor, loaded, device = build_visualglm(args)
    print(f"device: {device}; {describe_weights(loaded)}")
    settings = generation_settings(config, processor.tokenizer, args.max_new_tokens)
    results, new_tokens = [], 0
    start = time.perf_counter()
    for first in range(0, len(pairs), args.batch_size):
        prompts, answers, count = answer(model, processor, config,
                                         pairs[first:first + args.batch_size], settings, args.english)
        results += [prompt + reply for prompt, reply in zip(prompts, answers)]
        new_tokens += count
    seconds = time.perf_counter() - start
    print(results)
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"batch_size={args.batch_size}, use_past={config.text_config.use_past})")
    return results


if __name__ == "__main__":
    main()
