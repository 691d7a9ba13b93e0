"""`make demo`: a tiny VisualGLM learns to describe synthetic images, then learns a new answer
style with LoRA (seed 001's fine-tuning steps at toy scale), and both are measured.

    python -m research.visualglm.demo [--retrain] [--output_dir DIR]

1. writes the synthetic shapes set and its tokenizer (DIR/data; DIR defaults to output/demo),
2. trains the tiny VisualGLM on it from random weights (run_visualglm_tiny_finetune.yaml) and
   saves the three checkpoints (DIR/checkpoints) that run_visualglm_tiny_demo.yaml names,
3. measures exact-match accuracy on the 200 held-out images,
4. trains LoRA on 20 examples of a new answer style, one per shape and colour
   (run_visualglm_tiny_lora.yaml, DIR/lora), and measures its content accuracy on the same
   held-out images: answers in the new style that name the right shape and colour,
5. prints the commands to chat with both models from the current folder.

Each stage is skipped when its outputs exist and were made from the same inputs (the data
format, the tokenizer, the training set, the YAML; for LoRA also the base checkpoints);
--retrain runs both training stages again. With --output_dir other than output/demo, the
demo writes DIR/configs/*.yaml: the three YAMLs with their output/demo paths moved to DIR.
"""
import json
import os
import re
import shlex
import shutil
import time

from research.common import demo as common_demo
from research.common.checkpoint import latest_checkpoint
from research.common.config import REPO_ROOT, resolve_config_path
from research.common.demo import activation_line, demo_parser, fingerprint, read_stamp, shown, write_stamp
from research.common.runtime import cli_main
from research.visualglm import synthetic_data
from research.visualglm.finetune import finetune
from research.visualglm.inference import load_visualglm

DEFAULT_DIR = os.path.join(REPO_ROOT, "output", "demo")
CONFIGS = {"finetune": "run_visualglm_tiny_finetune.yaml", "demo": "run_visualglm_tiny_demo.yaml",
           "lora": "run_visualglm_tiny_lora.yaml"}
CHECKPOINT_NAMES = ("visualglm_vit", "visualglm_qformer", "glm_6b")  # save_checkpoints' order
TRAIN_COUNT = 2000
STYLE_PATTERN = re.compile(re.escape(synthetic_data.STYLE_TEMPLATE)
                           .replace(re.escape("{colour}"), "(.+)").replace(re.escape("{shape}"), "(.+)"))


class DemoPaths:
    """Where the demo writes, under one folder."""

    def __init__(self, directory=DEFAULT_DIR):
        self.root = os.path.abspath(directory)
        self.data = os.path.join(self.root, "data")
        self.tokenizer = os.path.join(self.data, "ice_text.model")
        self.checkpoint_dir = os.path.join(self.root, "checkpoints")
        self.checkpoints = [os.path.join(self.checkpoint_dir, f"{name}.ckpt") for name in CHECKPOINT_NAMES]
        self.train = os.path.join(self.root, "train")
        self.lora = os.path.join(self.root, "lora")
        self.lora_checkpoints = os.path.join(self.lora, "checkpoint_trainable", "rank_0")

    @property
    def is_default(self):
        return os.path.realpath(self.root) == os.path.realpath(DEFAULT_DIR)


# ---- configs ----------------------------------------------------------------------------------

def demo_configs(paths):
    """{stage: config}: the bare names in configs/visualglm/ for output/demo, else copies of them
    in DIR/configs with their output/demo paths moved to DIR (absolute)."""
    return common_demo.demo_configs(CONFIGS, "visualglm", DEFAULT_DIR, paths.root, "research.visualglm.demo")


# ---- stages ------------------------------------------------------------------------------------

def ensure_data(paths):
    """The synthetic set and its tokenizer, written again when missing or of an older format."""
    metadata = os.path.join(paths.data, "metadata.json")
    if os.path.isfile(metadata) and os.path.isfile(paths.tokenizer):
        with open(metadata, encoding="utf-8") as stream:
            if json.load(stream).get("format") == synthetic_data.FORMAT_VERSION:
                return
        print(f"the synthetic set in {shown(paths.data)} has an older format; writing it again")
    shutil.rmtree(paths.data, ignore_errors=True)
    synthetic_data.make_synthetic_dataset(paths.data, TRAIN_COUNT, seed=0)
    synthetic_data.build_synthetic_tokenizer(paths.tokenizer)


def ensure_trained(paths, configs, retrain=False):
    """Train the tiny model on the synthetic set unless its checkpoints exist and were trained on
    the same data, tokenizer and YAML."""
    stamp = os.path.join(paths.checkpoint_dir, "inputs.sha256")
    inputs = fingerprint([paths.tokenizer, os.path.join(paths.data, "dataset.json"),
                          resolve_config_path(CONFIGS["finetune"], "visualglm")])
    exist = all(os.path.isfile(path) for path in paths.checkpoints)
    if not retrain and exist and read_stamp(stamp) == inputs:
        print(f"using the tiny VisualGLM trained before in {shown(paths.checkpoint_dir)} "
              f"(--retrain trains it again)")
        return
    if exist and not retrain:
        print(f"the checkpoints in {shown(paths.checkpoint_dir)} were trained on other data or "
              f"settings; training again")
    shutil.rmtree(paths.train, ignore_errors=True)
    print(f"training the tiny VisualGLM on {TRAIN_COUNT} synthetic images from random weights "
          f"(12-20 minutes on 2 CPU cores)...")
    start = time.perf_counter()
    trainer, history = finetune(configs["finetune"], output_dir=paths.train)
    os.makedirs(paths.checkpoint_dir, exist_ok=True)
    trainer.network.model.save_checkpoints(*paths.checkpoints)
    write_stamp(stamp, inputs)
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.2g} in {len(history)} steps, "
          f"{(time.perf_counter() - start) / 60:.1f} min; loss curve: "
          f"{shown(os.path.join(trainer.output_dir, 'loss.png'))}")


def ensure_lora(paths, configs, retrain=False):
    """Train LoRA on the style set unless its checkpoint exists and was trained on the same
    base checkpoints, style set and YAML."""
    stamp = os.path.join(paths.lora, "inputs.sha256")
    style = os.path.join(paths.data, "style", "dataset.json")
    inputs = fingerprint([*paths.checkpoints, style, resolve_config_path(CONFIGS["lora"], "visualglm")])
    if (not retrain and os.path.isdir(paths.lora_checkpoints) and os.listdir(paths.lora_checkpoints)
            and read_stamp(stamp) == inputs):
        print(f"using the LoRA trained before in {shown(paths.lora_checkpoints)}")
        return
    shutil.rmtree(paths.lora, ignore_errors=True)
    with open(style, encoding="utf-8") as stream:
        count = len(json.load(stream))
    print(f"teaching a new answer style with LoRA: {count} examples, one per shape and colour "
          f"({synthetic_data.STYLE_TEMPLATE})...")
    start = time.perf_counter()
    _, history = finetune(configs["lora"], output_dir=paths.lora)
    write_stamp(stamp, inputs)
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.2g} in {len(history)} steps, "
          f"{time.perf_counter() - start:.0f} s")


# ---- measuring ---------------------------------------------------------------------------------

def held_out(paths, count=None):
    """The held-out rows with their attributes: img (absolute), prompt, label, shape, colour,
    background."""
    with open(os.path.join(paths.data, "test.json"), encoding="utf-8") as stream:
        rows = json.load(stream)
    with open(os.path.join(paths.data, "metadata.json"), encoding="utf-8") as stream:
        attributes = json.load(stream)["test"]
    return [{**row, **attribute, "img": os.path.join(paths.data, row["img"])}
            for row, attribute in list(zip(rows, attributes))[:count]]


def answer_all(config, rows, lora_checkpoint=None, batch_size=50):
    """Greedy replies (with the KV cache) to every held-out row, `batch_size` per forward pass."""
    chat = load_visualglm(config, use_past=True, do_sample=False, lora_checkpoint=lora_checkpoint)
    return chat.answer([(row["img"], row["prompt"]) for row in rows], batch_size=batch_size,
                       max_new_tokens=20)


def names_content(answer, shape, colour):
    """The answer names this shape and this colour, and no other shape or shape colour (a
    background colour, never a shape's, may be named too)."""
    return ({s for s in synthetic_data.SHAPES if s in answer} == {shape}
            and {c for c in synthetic_data.COLOURS if c in answer} == {colour})


def in_style(answer):
    return STYLE_PATTERN.fullmatch(answer) is not None


def exact_accuracy(answers, rows):
    """Share of answers equal to the template label."""
    return sum(answer == row["label"] for answer, row in zip(answers, rows)) / len(rows)


def lora_scores(answers, rows):
    """{content, style, named}: shares of answers in the new style that name the right shape and
    colour (the content accuracy), in the new style, naming the right shape and colour."""
    style = [in_style(answer) for answer in answers]
    named = [names_content(answer, row["shape"], row["colour"]) for answer, row in zip(answers, rows)]
    return {"content": sum(s and n for s, n in zip(style, named)) / len(rows),
            "style": sum(style) / len(rows), "named": sum(named) / len(rows)}


# ---- the commands it prints --------------------------------------------------------------------

def chat_commands(paths, configs, image):
    """The lines to paste in the current folder to ask both trained models about `image`;
    the interactive chat comes last, so pasting them all runs the others first."""
    config = lambda stage: configs[stage] if paths.is_default else shlex.quote(shown(configs[stage]))
    image = shlex.quote(shown(image))
    prompt = synthetic_data.PROMPT  # one shell word as it is (tests paste these lines into bash)
    return [
        activation_line(),
        f"python -m research.visualglm.run_visualglm --config {config('demo')} "
        f"--image_path {image} --prompt {prompt}",
        f"python -m research.visualglm.run_visualglm_with_lora --config {config('lora')} "
        f"--lora_checkpoint {shlex.quote(shown(paths.lora_checkpoints))} --image_path {image} "
        f"--prompt {prompt}",
        f"python -m research.visualglm.cli_demo --config {config('demo')} --image_path {image}",
    ]


@cli_main
def main(argv=None):
    args = demo_parser(__doc__, DEFAULT_DIR, "both stages").parse_args(argv)
    paths = DemoPaths(args.output_dir)
    configs = demo_configs(paths)
    ensure_data(paths)
    ensure_trained(paths, configs, args.retrain)
    rows = held_out(paths)

    replies = answer_all(configs["demo"], rows)
    accuracy = exact_accuracy([reply.answer for reply in replies], rows)
    print(f"held-out accuracy: {accuracy:.1%} exact answers on {len(rows)} images never seen in "
          f"training")
    print(f"\nrun_visualglm.py on {shown(rows[0]['img'])} (expected: {rows[0]['label']}):")
    print([replies[0].prompt + replies[0].answer])

    ensure_lora(paths, configs, args.retrain)
    answers = [reply.answer for reply in answer_all(configs["lora"], rows,
                                                    latest_checkpoint(paths.lora_checkpoints))]
    scores = lora_scores(answers, rows)
    print(f"LoRA content accuracy: {scores['content']:.1%} of the {len(rows)} held-out answers are "
          f"in the new style and name the right shape and colour (in the style: "
          f"{scores['style']:.1%}; right shape and colour: {scores['named']:.1%})")
    expected = synthetic_data.style_label_for(rows[0]["shape"], rows[0]["colour"])
    print(f"\nrun_visualglm_with_lora.py on the same image (expected: {expected}):")
    print([answers[0]])

    print(f"\ndemo results: held-out accuracy {accuracy:.1%}, LoRA content accuracy "
          f"{scores['content']:.1%}")
    print("chat with the models it trained (paste these lines in this folder):")
    for line in chat_commands(paths, configs, rows[0]["img"]):
        print(line)
    return {"held_out_accuracy": accuracy, "lora_content_accuracy": scores["content"]}


if __name__ == "__main__":
    main()
