"""`make demo`: a tiny VisualGLM learns to describe synthetic images, then learns a new answer
style with LoRA from 8 examples (seed 001's fine-tuning steps at toy scale).

    python -m research.visualglm.demo [--retrain]

1. writes the synthetic shapes set and its tokenizer (output/demo/data),
2. trains the tiny VisualGLM on it from random weights (run_visualglm_tiny_finetune.yaml) and
   saves the three checkpoints (output/demo/checkpoints) — first run only, then cached,
3. measures exact-match accuracy on held-out renders and answers about one of them as
   run_visualglm.py does (run_visualglm_tiny_demo.yaml),
4. trains LoRA on 8 examples of a new style (run_visualglm_tiny_lora.yaml) and answers as
   run_visualglm_with_lora.py does.
"""
import argparse
import json
import os
import shutil

from research.common.checkpoint import latest_checkpoint
from research.common.config import REPO_ROOT
from research.common.runtime import cli_main
from research.visualglm import synthetic_data
from research.visualglm.finetune import finetune
from research.visualglm.inference import load_visualglm

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
    trainer, history = finetune("run_visualglm_tiny_finetune.yaml")
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
    chat = load_visualglm(config, use_past=True, do_sample=False)
    replies = chat.answer([(row["img"], row["prompt"]) for row in rows], batch_size=batch_size,
                          max_new_tokens=20)
    answers = [reply.answer for reply in replies]
    correct = sum(answer == row["label"] for answer, row in zip(answers, rows))
    return correct / len(rows), answers


def ensure_lora(retrain=False):
    if not retrain and os.path.isdir(LORA_DIR) and os.listdir(LORA_DIR):
        return
    shutil.rmtree(os.path.join(DEMO_DIR, "lora"), ignore_errors=True)
    print("teaching a new answer style with LoRA (8 examples)...")
    finetune("run_visualglm_tiny_lora.yaml")


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
    image, prompt = rows[0]["img"], rows[0]["prompt"]
    print(f"\nrun_visualglm.py on {os.path.relpath(image, REPO_ROOT)} "
          f"(expected: {rows[0]['label']}):")
    chat = load_visualglm("run_visualglm_tiny_demo.yaml")
    print([reply.prompt + reply.answer for reply in chat.answer([(image, prompt)])])
    ensure_lora(args.retrain)
    print(f"\nrun_visualglm_with_lora.py on the same image "
          f"(style: {synthetic_data.STYLE_TEMPLATE}):")
    chat = load_visualglm("run_visualglm_tiny_lora.yaml", use_past=True,
                          lora_checkpoint=latest_checkpoint(LORA_DIR))
    print([reply.answer for reply in chat.answer([(image, prompt)])])
    return accuracy


if __name__ == "__main__":
    main()
