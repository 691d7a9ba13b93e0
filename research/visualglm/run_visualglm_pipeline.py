"""VisualGLM through a pipeline object (MindFormers' `run_visualglm_pipeline.py`).

    python -m research.visualglm.run_visualglm_pipeline --config CONFIG --batch_size 2 \
        --use_past True --seq_length 32 --image_path a.png,b.png --prompt "描述这张图片。"

The pipeline takes {"image": path(s), "prompt": text(s)} and answers in batches of
`--batch_size` pairs, each batch one forward pass of the model.
"""
import time

from research.common.runtime import cli_main
from research.visualglm.inference import (VisualGLMImageToTextGenerationPipeline,
                                          pairs_and_model_from_arguments, visualglm_parser)


@cli_main
def main(argv=None):
    args = visualglm_parser(__doc__).parse_args(argv)
    pairs, chat = pairs_and_model_from_arguments(args)
    print(f"device: {chat.device}; {chat.describe_weights()}")
    task = VisualGLMImageToTextGenerationPipeline(chat, batch_size=args.batch_size, english=args.english,
                                                  max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    results = task({"image": [p[0] for p in pairs], "prompt": [p[1] for p in pairs]})
    print(results)
    print(f"{len(results)} answers in {time.perf_counter() - start:.2f} s "
          f"(batch_size={args.batch_size})")
    return results


if __name__ == "__main__":
    main()
