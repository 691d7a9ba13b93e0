"""`make demo`, ChatGLM2: a tiny ChatGLM2 learns a base task, then P-Tuning v2 and LoRA each adapt
it to an ADGEN-style task (upstream ptuning/'s steps at toy scale), measured with upstream's
BLEU-4 / ROUGE before and after.

    python -m research.chatglm2.demo [--retrain] [--output_dir DIR]

1. writes a synthetic ADGEN-like set (research.chatglm2.synthetic_adgen) in DIR/data (DIR defaults
   to output/demo_chatglm2): base.json (the base task: for the bare attribute string list the
   values, "上衣：红色、休闲。"; asked in words, "写一段广告：类型#上衣*…", write the ad),
   train.json (ADGEN's task: the ad for the bare attribute string, "这款上衣，红色的配色，…"),
   dev.json (attribute sets that are in neither) and a tokenizer.model trained on their text;
2. trains the tiny ChatGLM2 on the base task from random weights (run_glm2_tiny_demo_base.yaml)
   and keeps it as DIR/base/chatglm2_tiny_base.ckpt, the base the next two YAMLs name: it can
   write the ad, but for ADGEN's bare prompt it lists the values, as a chat model answers before
   it is tuned to a task's format;
3. adapts it with P-Tuning v2 (run_glm2_tiny_demo_ptuning2.yaml: only the prefix trains) and
   with LoRA (run_glm2_tiny_demo_lora.yaml: only the LoRA matrices train);
4. evaluates the base model and both adapted ones on dev.json as run_chatglm2_eval.py does
   (greedy, --do_sample False) and prints the scores and one answer of each;
5. prints the commands to evaluate and chat with them from the current folder.

Each training stage is skipped when its checkpoint exists and was made from the same inputs (the
tokenizer, the data, the YAML; for the adaptations also the base checkpoint); --retrain trains
all three again. With --output_dir other than output/demo_chatglm2, the demo writes
DIR/configs/*.yaml: the three YAMLs with their output/demo_chatglm2 paths moved to DIR.
"""
import os
import shlex
import shutil
import time

from research.chatglm2 import synthetic_adgen
from research.chatglm2.dataset_chatglm2 import ADGenDataConfig, load_adgen, read_adgen
from research.chatglm2.evaluation import eval_settings, evaluate
from research.chatglm2.finetune import finetune
from research.chatglm2.inference import load_chatglm2
from research.common import demo as common_demo
from research.common.atomic import atomic_write
from research.common.checkpoint import latest_checkpoint
from research.common.config import REPO_ROOT, resolve_config_path
from research.common.demo import activation_line, demo_parser, fingerprint, read_stamp, shown, write_stamp
from research.common.runtime import cli_main
from research.common.testing import train_tiny_chatglm2_model

DEFAULT_DIR = os.path.join(REPO_ROOT, "output", "demo_chatglm2")
CONFIGS = {"base": "run_glm2_tiny_demo_base.yaml", "ptuning2": "run_glm2_tiny_demo_ptuning2.yaml",
           "lora": "run_glm2_tiny_demo_lora.yaml"}
STAGE_NAMES = {"base": "base model", "ptuning2": "P-Tuning v2", "lora": "LoRA"}
# Rows of each set and the seeds of their streams (dev: drawn until DEV_COUNT unseen attribute sets).
BASE_COUNT, TRAIN_COUNT, DEV_COUNT = 2000, 1000, 100
BASE_SEED, TRAIN_SEED, DEV_SEED = 10, 0, 1
# The base task's second half asks for the ad in words; ADGEN's prompt is the bare attribute string.
INSTRUCTION = "写一段广告："
TOKENIZER_PIECES = 400
DATA_FORMAT = "2"  # written beside the data; a change here writes the data again


class DemoPaths:
    """Where the demo writes, under one folder."""

    def __init__(self, directory=DEFAULT_DIR):
        self.root = os.path.abspath(directory)
        self.data = os.path.join(self.root, "data")
        self.tokenizer = os.path.join(self.data, "tokenizer.model")
        self.base_checkpoint = os.path.join(self.root, "base", "chatglm2_tiny_base.ckpt")

    def stage(self, stage):
        return os.path.join(self.root, stage)

    def trained(self, stage):
        """The stage's latest trainable checkpoint (the whole model for the base), or None."""
        folder = os.path.join(self.stage(stage), "checkpoint_trainable", "rank_0")
        return latest_checkpoint(folder) if os.path.isdir(folder) else None

    def rows(self, name):
        return os.path.join(self.data, f"{name}.json")

    @property
    def is_default(self):
        return os.path.realpath(self.root) == os.path.realpath(DEFAULT_DIR)


def demo_configs(paths):
    """{stage: config}: the bare names in configs/chatglm2/ for output/demo_chatglm2, else copies
    in DIR/configs with their paths moved to DIR (absolute)."""
    return common_demo.demo_configs(CONFIGS, "chatglm2", DEFAULT_DIR, paths.root, "research.chatglm2.demo")


# ---- data --------------------------------------------------------------------------------------

def held_out_rows(seen):
    """DEV_COUNT ADGEN-style rows whose attribute sets are not in `seen` (drawn from DEV_SEED's
    stream in order, so the same every time)."""
    rows = []
    for row in synthetic_adgen.generate_adgen(20 * DEV_COUNT, DEV_SEED):
        if row["content"] not in seen:
            seen.add(row["content"])
            rows.append(row)
        if len(rows) == DEV_COUNT:
            return rows
    raise AssertionError("the attribute space has fewer unseen sets than DEV_COUNT")


def ensure_data(paths):
    """The three sets and the tokenizer, written again when missing or of another format."""
    stamp = os.path.join(paths.data, "format")
    files = [paths.rows("base"), paths.rows("train"), paths.rows("dev"), paths.tokenizer]
    if read_stamp(stamp) == DATA_FORMAT and all(os.path.isfile(path) for path in files):
        return
    shutil.rmtree(paths.data, ignore_errors=True)
    os.makedirs(paths.data)
    listed = synthetic_adgen.generate_adgen(BASE_COUNT // 2, BASE_SEED, synthetic_adgen.list_values)
    asked = [{**row, "content": INSTRUCTION + row["content"]}
             for row in synthetic_adgen.generate_adgen(BASE_COUNT - len(listed), BASE_SEED + 1)]
    base = [row for pair in zip(listed, asked) for row in pair]
    train = synthetic_adgen.generate_adgen(TRAIN_COUNT, TRAIN_SEED)
    dev = held_out_rows({row["content"].removeprefix(INSTRUCTION) for row in base + train})
    for name, rows in (("base", base), ("train", train), ("dev", dev)):
        synthetic_adgen.write_rows(paths.rows(name), rows)
    text = [f"[Round 1]\n\n问：{row['content']}\n\n答：{row['summary']}" for row in base + train]
    train_tiny_chatglm2_model(paths.tokenizer, text, TOKENIZER_PIECES)
    write_stamp(stamp, DATA_FORMAT)
    print(f"wrote the synthetic set in {shown(paths.data)}: {len(base)} base-task rows, {len(train)} "
          f"ADGEN-style rows, {len(dev)} held-out dev rows, and its tokenizer")


# ---- training ----------------------------------------------------------------------------------

def stage_inputs(paths, stage):
    """The files a stage's checkpoint is made from."""
    config = resolve_config_path(CONFIGS[stage], "chatglm2")
    if stage == "base":
        return [paths.tokenizer, paths.rows("base"), config]
    return [paths.base_checkpoint, paths.rows("train"), config]


def ensure_trained(paths, configs, stage, retrain=False):
    """Train `stage` unless its checkpoint exists and was made from the same inputs."""
    stamp = os.path.join(paths.stage(stage), "inputs.sha256")
    inputs = fingerprint(stage_inputs(paths, stage))
    done = paths.base_checkpoint if stage == "base" else paths.trained(stage)
    if not retrain and done and os.path.isfile(done) and read_stamp(stamp) == inputs:
        print(f"using the {STAGE_NAMES[stage]} trained before: {shown(done)} (--retrain trains it again)")
        return
    shutil.rmtree(paths.stage(stage), ignore_errors=True)
    what = {"base": ("the tiny ChatGLM2 learns the base task from random weights (list the values; write the ad "
                     f"when asked \"{INSTRUCTION}\")"),
            "ptuning2": "P-Tuning v2 adapts it to the ADGEN-style task (only the prefix trains)",
            "lora": "LoRA adapts it to the ADGEN-style task (only the LoRA matrices train)"}[stage]
    print(f"\n{what}...")
    start = time.perf_counter()
    _, history = finetune(configs[stage], output_dir=paths.stage(stage))
    if stage == "base":  # a full training's trainable checkpoint is the whole model
        with open(paths.trained(stage), "rb") as source, atomic_write(paths.base_checkpoint, "wb") as target:
            shutil.copyfileobj(source, target)
    write_stamp(stamp, inputs)
    print(f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} in {len(history)} steps, "
          f"{time.perf_counter() - start:.0f} s")


# ---- evaluation --------------------------------------------------------------------------------

def stage_weights(paths, stage):
    """load_chatglm2's keywords for a stage's model."""
    if stage == "base":
        return {"checkpoint": paths.base_checkpoint}
    return {"ptuning_checkpoint" if stage == "ptuning2" else "lora_checkpoint": paths.trained(stage)}


def evaluate_stage(paths, configs, stage, batch_size=50):
    """run_chatglm2_eval.py --do_sample False on dev.json for one stage's model: the Evaluation
    (scores, predictions) and the held-out rows' prompts."""
    glm = load_chatglm2(configs[stage], use_past=True, batch_size=batch_size, **stage_weights(paths, stage))
    data_config = ADGenDataConfig.from_yaml(glm.yaml, "eval_dataset")
    samples = load_adgen(data_config, glm.tokenizer)
    settings = eval_settings(glm, data_config, do_sample=False)
    return evaluate(glm, samples, settings, os.path.join(paths.stage(stage), "eval"), batch_size=batch_size)


def scores_table(results):
    """Rows of the four means (x100, as upstream) per stage."""
    lines = [f"{'model':<14}{'BLEU-4':>9}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}"]
    for stage, result in results.items():
        means = result.report.means
        lines.append(f"{STAGE_NAMES[stage]:<14}" + "".join(f"{means[name]:>9.2f}" for name in
                                                            ("bleu-4", "rouge-1", "rouge-2", "rouge-l")))
    return lines


# ---- the commands it prints --------------------------------------------------------------------

def printed_commands(paths, configs, prompt):
    """The lines to paste in the current folder: evaluate each adapted model as the demo did, ask
    each one `prompt`, then chat with the P-Tuning model (interactive, last)."""
    config = lambda stage: configs[stage] if paths.is_default else shlex.quote(shown(configs[stage]))
    weights = lambda stage: " ".join(f"--{key} {shlex.quote(shown(path))}"
                                     for key, path in stage_weights(paths, stage).items())
    lines = [activation_line()]
    for stage in ("ptuning2", "lora"):
        lines.append(f"python -m research.chatglm2.run_chatglm2_eval --config {config(stage)} {weights(stage)} "
                     f"--do_sample False --output_dir {shlex.quote(shown(os.path.join(paths.stage(stage), 'eval')))}")
    for stage in ("base", "ptuning2", "lora"):
        lines.append(f"python -m research.chatglm2.run_chatglm2 --config {config(stage)} {weights(stage)} "
                     f"--do_sample False --prompt {shlex.quote(prompt)}")
    lines.append(f"python -m research.chatglm2.cli_demo --config {config('ptuning2')} {weights('ptuning2')}")
    return lines


@cli_main
def main(argv=None):
    args = demo_parser(__doc__, DEFAULT_DIR, "all three stages").parse_args(argv)
    paths = DemoPaths(args.output_dir)
    configs = demo_configs(paths)
    ensure_data(paths)
    results = {}
    for stage in ("base", "ptuning2", "lora"):
        ensure_trained(paths, configs, stage, args.retrain)
    for stage in ("base", "ptuning2", "lora"):
        results[stage] = evaluate_stage(paths, configs, stage)

    dev = read_adgen(paths.rows("dev")).rows
    print(f"\nADGEN-style evaluation on {len(dev)} held-out dev rows (attribute sets in no training file), "
          f"greedy, scored as upstream ptuning/ (BLEU-4 on characters, ROUGE on jieba words, x100):")
    for line in scores_table(results):
        print(line)
    print(f"\n{dev[0].prompt}  (expected: {dev[0].response})")
    for stage, result in results.items():
        print(f"  {STAGE_NAMES[stage]}: {result.predictions[0].strip()}")
    print("\nevaluate and chat with the models it trained (paste these lines in this folder):")
    for line in printed_commands(paths, configs, dev[0].prompt):
        print(line)
    return {stage: result.report.means for stage, result in results.items()}


if __name__ == "__main__":
    main()
