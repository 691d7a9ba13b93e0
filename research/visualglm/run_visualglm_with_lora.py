"""Answer with a LoRA fine-tuned VisualGLM (MindFormers' `run_visualglm_with_lora.py`).

    python -m research.visualglm.run_visualglm_with_lora --lora_checkpoint CKPT \
        --config run_visualglm_lora.yaml --image_path IMAGE --prompt "这张图片的背景里有什么内容？"

CKPT is a trainable-only checkpoint from fine-tuning (`output/checkpoint_trainable/rank_0/`;
a folder means its newest file). `--merge OUT.ckpt` folds LoRA into the GLM weights and writes
them as a plain GLM checkpoint (for deployment without LoRA), then answers with the merged model.
"""
from research.common.checkpoint import latest_checkpoint
from research.common.runtime import cli_main
from research.visualglm.inference import pairs_and_model_from_arguments, visualglm_parser


@cli_main
def main(argv=None):
    parser = visualglm_parser(__doc__, default_config="run_visualglm_lora.yaml")
    parser.add_argument("--lora_checkpoint", required=True, help="trainable-only LoRA checkpoint or its folder")
    parser.add_argument("--merge", default=None, help="write the merged GLM checkpoint here")
    args = parser.parse_args(argv)
    pairs, chat = pairs_and_model_from_arguments(args, lora_checkpoint=latest_checkpoint(args.lora_checkpoint))
    if args.merge:
        merged = chat.merge_lora(args.merge)
        print(f"merged LoRA into {merged} layers; GLM checkpoint written to {args.merge}")
    print(f"device: {chat.device}; {chat.describe_weights()}")
    answers = [reply.answer for reply in chat.answer(pairs, batch_size=args.batch_size, english=args.english,
                                                      max_new_tokens=args.max_new_tokens)]
    print(answers)
    return answers


if __name__ == "__main__":
    main()
