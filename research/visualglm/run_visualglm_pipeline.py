"""VisualGLM through a pipeline object (MindFormers' `run_visualglm_pipeline.py`).

    python -m research.visualglm.run_visualglm_pipeline --config CONFIG --batch_size 2 \
        --use_past True --seq_length 32 --image_path a.png,b.png --prompt "描述这张图片。"

The pipeline takes {"image": path(s), "prompt": text(s)} and answers in batches of
`--batch_size` pairs, each batch one forward pass of the model.
"""
import argparse
import time

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.runtime import cli_main
from research.visualglm.run_visualglm import (add_input_arguments, add_model_arguments, answer,
                                              build_visualglm, describe_weights,
                                              generation_settings, image_prompt_pairs)


@MindFormerRegister.register(MindFormerModuleType.PIPELINE)
class VisualGLMImageToTextGenerationPipeline:
    """{"image": ..., "prompt": ...} -> ["<img></img>问：...\\n答：answer", ...]."""

    def __init__(self, model, processor, config, settings, batch_size=1, english=False):
        self.model, self.processor, self.config = model, processor, config
        self.settings, self.batch_size, self.english = settings, batch_size, english

    def __call__(self, inputs):
        images, prompts = inputs["image"], inputs["prompt"]
        images = [images] if isinstance(images, str) else list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        pairs = list(zip(images, prompts))
        results = []
        for first in range(0, len(pairs), self.batch_size):
            texts, answers, _ = answer(self.model, self.processor, self.config,
                                       pairs[first:first + self.batch_size], self.settings,
                                       self.english)
            results += [text + reply for text, reply in zip(texts, answers)]
        return results


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
    task = VisualGLMImageToTextGenerationPipeline(
        model, processor, config, generation_settings(config, processor.tokenizer, args.max_new_tokens),
        batch_size=args.batch_size, english=args.english)
    start = time.perf_counter()
    results = task({"image": [p[0] for p in pairs], "prompt": [p[1] for p in pairs]})
    print(results)
    print(f"{len(results)} answers in {time.perf_counter() - start:.2f} s "
          f"(batch_size={args.batch_size})")
    return results


if __name__ == "__main__":
    main()
