"""`make demo`: a tiny VisualGLM learns to describe synthetic images, then learns a new answer
style with LoRA from 8 examples (seed 001's fine-tuning steps at toy scale).

    python -m research.visualglm.demo [--retrain]

1. writes the synthetic shapes set and its tokenizer (output/demo/data),
2. trains the tiny VisualGLM on it from random weights (run_visualglm_tiny_finetune.yaml) and
   saves the three checkpoints (output/demo/checkpoints) — first run only, then cached,
3. measures exact-match accuracy on held-out renders and answers about one of them with
   run_visualglm.py (run_visualglm_tiny_demo.yaml),
4. trains LoRA on 8 examples of a new style (run_visualglm_tiny_lora.yaml) and answers with
   run_visualglm_with_lora.py.
"""
import argparse
import json
import os
import shutil

from research.common.config import REPO_ROOT
from research.common.runtime import cli_main
from research.visualglm import (run_visualglm, run_visualglm_finetune, run_visualglm_with_lora,
                                synthetic_data)

DEMO_DIR = os.path.join(REPO_ROOT, "output", "demo")
DATA_DIR = os.path.join(DEMO_DIR, "data")
CHECKPOINTS = {name: os.path.join(DEMO_DIR, "checkpoints", f"{name}.ckpt")
               for name in ("visualglm_vit", "visualglm_qformer", "glm_6b")}
LORA_DIR = os.path.join(DEMO_DIR, "lora", "checkpoint_trainable", "rank_0")


def ensure_data(count=2000):
    if not os.path.isfile(os.path.join(DATA_DIR, "metadata.json")):
        synthetic_data.make_synthetic_dataset(DATA_DIR, count, seed=0)
        synthetic_data.build_synthetic_tokenizer(os.path.join(DATA_DIR, "ice_text.model"))


def ensure_trained(retrain=False):
    """Train the tiny model on the synthetic set unless its checkpoints exist."""
    if not retrain and all(os.path.isfile(path) for path in CHECKPOINTS.values()):
        print(f"using the trained tiny model in {os.path.dirname(CHECKPOINTS['glm_6b'])}")
        return
    shutil.rmtree(os.path.join(DEMO_DIR, "train"), ignore_errors=True)
    print("training the tiny VisualGLM on the synthetic shapes (first run only)...")
    trainer, history = run_visualglm_finetune.main(["--config", "run_visualglm_tiny_finetune.yaml"])
    trainer.network.model.save_checkpoints(*CHECKPOINTS.values())
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} in {len(history)} steps; "
          f"loss curve: {os.path.join(trainer.output_dir, 'loss.png')}")


def held_out(count=None):
    with open(os.path.join(DATA_DIR, "test.json"), encoding="utf-8") as stream:
        rows = json.load(stream)
    for row in rows[:count]:
        row["img"] = os.path.join(DATA_DIR, row["img"])
    return rows


def exact_match_accuracy(config="run_visualglm_tiny_demo.yaml", rows=None, batch_size=50):
    """Share of held-out images whose greedy answer equals the template label exactly."""
    rows = rows or held_out()
    args = argparse.Namespace(config=config, device_id=0, use_past=True, seq_length=None,
                              do_sample=False, top_k=None, top_p=None)
    config, model, processor, _, _ = run_visualglm.build_visualglm(args)
    settings = run_visualglm.generation_settings(config, processor.tokenizer, max_new_tokens=20)
    answers = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        answers += run_visualglm.answer(model, processor, config,
                                        [(row["img"], row["prompt"]) for row in batch], settings)[1]
    correct = sum(answer == row["label"] for answer, row in zip(answers, rows))
    return correct / len(rows), answers


def ensure_lora(retrain=False):
    if not retrain and os.path.isdir(LORA_DIR) and os.listdir(LORA_DIR):
        return
    shutil.rmtree(os.path.join(DEMO_DIR, "lora"), ignore_errors=True)
    print("teaching a new answer style with LoRA (8 examples)...")
    run_visualglm_finetune.main(["--config", "run_visualglm_tiny_lora.yaml"])


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help="train again even if cached")
    args = parser.parse_args(argv)
    ensure_data()
    ensure_trained(args.retrain)
    rows = held_out()
    accuracy, answers = exact_match_accuracy(rows=rows)
    print(f"held-out accuracy: {accuracy:.1%} exact answers on {len(rows)} images never seen "
          f"in training")
    image = rows[0]["img"]
    print(f"\nrun_visualglm.py on {os.path.relpath(image, REPO_ROOT)} "
          f"(expected: {rows[0]['label']}):")
    run_visualglm.main(["--config", "run_visualglm_tiny_demo.yaml", "--image_path", image,
                        "--prompt", rows[0]["prompt"]])
    ensure_lora(args.retrain)
    print(f"\nrun_visualglm_with_lora.py on the same image "
          f"(style: {synthetic_data.STYLE_TEMPLATE}):")
    run_visualglm_with_lora.main(["--lora_checkpoint", LORA_DIR, "--config",
                                  "run_visualglm_tiny_lora.yaml", "--image_path", image,
                                  "--prompt", rows[0]["prompt"], "--use_past", "True"])
    return accuracy


if __name__ == "__main__":
    main()
