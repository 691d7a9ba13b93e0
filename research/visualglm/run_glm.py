"""Text chat with the GLM-6B language model of VisualGLM (no image).

    python run_glm.py --config run_glm_tiny_text_generation.yaml --prompt "你好"

The YAML names the model (`model.model_config` GLMConfig, `model.arch`), its checkpoint and
the tokenizer, as MindFormers configs do; a bare config name is looked up in configs/visualglm/.
"""
import argparse
import time

from research.common.runtime import add_generation_arguments, cli_main, str2bool
from research.visualglm.inference import DEFAULT_GLM_CONFIG, load_glm


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, DEFAULT_GLM_CONFIG, "configs/visualglm/")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="the question (default 你好); give it several times for a batch")
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")
    parser.add_argument("--seq_length", type=int, default=None, help="static length (overrides YAML)")
    parser.add_argument("--checkpoint", default=None, help="converted GLM checkpoint (overrides YAML)")
    args = parser.parse_args(argv)
    chat = load_glm(args.config, device_id=args.device_id, seq_length=args.seq_length,
                    use_past=args.use_past, do_sample=args.do_sample, checkpoint=args.checkpoint)
    print(f"device: {chat.device}; weights: "
          + (chat.config.checkpoint_name_or_path if chat.loaded else
             "none given, random initialisation (UNTRAINED: the answers are noise)"))
    start = time.perf_counter()
    replies = chat.answer(args.prompts or ["你好"], english=args.english, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    print([reply.prompt + reply.answer for reply in replies])
    new_tokens = sum(len(reply.token_ids) for reply in replies)
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"use_past={chat.config.use_past})")
    return [reply.answer for reply in replies]


if __name__ == "__main__":
    main()
