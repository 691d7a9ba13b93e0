"""Answer with a LoRA fine-tuned VisualGLM (MindFormers' `run_visualglm_with_lora.py`).

    python -m research.visualglm.run_visualglm_with_lora --lora_checkpoint CKPT \
        --config run_visualglm_lora.yaml --image_path IMAGE --prompt "这张图片的背景里有什么内容？"

CKPT is a trainable-only checkpoint from fine-tuning (`output/checkpoint_trainable/rank_0/`;
a folder means its newest file). `--merge OUT.ckpt` folds LoRA into the GLM weights and writes
them as a plain GLM checkpoint (for deployment without LoRA), then answers with the merged model.
"""
import argparse
import glob
import os
import re

from research.common.convert import save_checkpoint_atomic
from research.common.errors import UserInputError
from research.common.lora import merge_lora
from research.common.runtime import cli_main
from research.visualglm.run_visualglm import (add_input_arguments, add_model_arguments, answer,
                                              build_visualglm, describe_weights,
                                              generation_settings, image_prompt_pairs)


def latest_checkpoint(path):
    """`path` itself, or the checkpoint with the highest step in a folder."""
    if not os.path.isdir(path):
        return path
    files = glob.glob(os.path.join(path, "*.ckpt"))
    if not files:
        raise UserInputError(f"no .ckpt file in {path}")

    def step(name):
        numbers = re.findall(r"-(\d+)\.ckpt$", name)
        return (int(numbers[0]) if numbers else -1, os.path.getmtime(name))

    return max(files, key=step)


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_checkpoint", required=True, help="trainable-only LoRA checkpoint or its folder")
    parser.add_argument("--merge", default=None, help="write the merged GLM checkpoint here")
    add_model_arguments(parser)
    add_input_arguments(parser)
    parser.set_defaults(config="run_visualglm_lora.yaml")
    args = parser.parse_args(argv)
    pairs = image_prompt_pairs(args)
    config, model, processor, loaded, device = build_visualglm(
        args, lora_checkpoint=latest_checkpoint(args.lora_checkpoint))
    if args.merge:
        merged = merge_lora(model.llm_model)
        glm = {p.name[len("llm_model."):]: p.asnumpy() for p in model.llm_model.get_parameters()}
        save_checkpoint_atomic(glm, args.merge)
        print(f"merged LoRA into {merged} layers; GLM checkpoint written to {args.merge}")
    print(f"device: {device}; {describe_weights(loaded)}")
    settings = generation_settings(config, processor.tokenizer, args.max_new_tokens)
    answers = []
    for first in range(0, len(pairs), args.batch_size):
        answers += answer(model, processor, config, pairs[first:first + args.batch_size], settings,
                          args.english)[1]
    print(answers)
    return answers


if __name__ == "__main__":
    main()
