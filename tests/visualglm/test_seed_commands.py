"""Seed 001's command sequence as a newcomer types it (issue #12): from `research/visualglm`,
convert -> run -> pipeline -> finetune -> with_lora -> export, then the Lite runner from
`research/` as the seed does and with the command the export printed, pasted where it was
printed. Each step reads the previous step's output through the README's relative paths; the
tiny preset with random SAT weights stands in for visualglm-6b.

One rule makes the paths meet: a path on the command line is relative to the current folder,
a path in a YAML to the repository root (so the YAML's `output_dir: output/...` is the
`../../output/...` a command in research/visualglm names)."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from research.common.config import REPO_ROOT
from tests.visualglm.test_run_visualglm import EXAMPLE, TINY
from tests.visualglm.visualglm_fixtures import (sat_visualglm_state_dict, tiny_visualglm_config,
                                                write_sat_checkpoint)

SCRIPTS = os.path.join(REPO_ROOT, "research", "visualglm")
LORA_YAML = os.path.join(REPO_ROOT, "configs", "visualglm", "run_visualglm_tiny_lora.yaml")
SEQ = 48


def run(command, cwd):
    """A command line as typed in a shell with the venv active (python = this interpreter)."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "WARNING" not in result.stdout, result.stdout  # no third-party notices among results
    return result.stdout


def results(stdout):
    """The printed answer lists of a run script's output."""
    return [line for line in stdout.splitlines() if line.startswith("['")]


def write_yamls(root, run_dir):
    """The two YAMLs a user edits after converting: the tiny inference preset and a LoRA
    fine-tune of it, their checkpoint placeholders replaced by the converter's output (written
    as a YAML names files: relative to the repository root)."""
    checkpoints = {"vit": "research/visualglm/ckpt/visualglm_vit.ckpt",
                   "qformer": "research/visualglm/ckpt/visualglm_qformer.ckpt",
                   "glm": "research/visualglm/ckpt/glm_6b.ckpt"}
    with open(TINY, encoding="utf-8") as stream:
        inference = yaml.safe_load(stream)
    model = inference["model"]["model_config"]
    model["checkpoint_name_or_path"] = checkpoints["qformer"]
    model["vision_config"]["checkpoint_name_or_path"] = checkpoints["vit"]
    model["text_config"]["checkpoint_name_or_path"] = checkpoints["glm"]
    inference["context"]["mode"] = 1
    inference["output_dir"] = run_dir

    with open(LORA_YAML, encoding="utf-8") as stream:
        lora = yaml.safe_load(stream)
    pet_config = lora["model"]["model_config"]["text_config"]["pet_config"]
    lora["model"], lora["processor"] = inference["model"], inference["processor"]
    lora["model"]["model_config"]["text_config"]["pet_config"] = pet_config
    lora["output_dir"] = run_dir
    lora["context"]["mode"] = 1
    lora["runner_config"].update(epochs=1, batch_size=2)
    lora["train_dataset"]["data_loader"].update(dataset_dir=str(root / "fewshot-data" / "dataset.json"),
                                                random_mapping=False)
    lora["train_dataset"]["data_loader"].pop("scale", None)
    lora["callbacks"] = [{"type": "CheckpointMonitor", "prefix": "visualglm", "save_checkpoint_steps": 2,
                          "keep_checkpoint_max": 1}]
    paths = {}
    for name, config in (("inference", inference), ("lora", lora)):
        paths[name] = str(root / f"{name}.yaml")
        with open(paths[name], "w", encoding="utf-8") as stream:
            yaml.safe_dump(config, stream, allow_unicode=True)
    return paths


def write_fewshot_data(directory):
    """Upstream's fewshot-data layout: dataset.json with img / prompt / label rows."""
    directory.mkdir()
    shutil.copyfile(EXAMPLE, directory / "shapes.png")
    rows = [{"img": "shapes.png", "prompt": "这张图片的背景里有什么内容？", "label": f"背景是白色的{i}。"}
            for i in range(4)]
    (directory / "dataset.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def seed_workspace(tmp_path):
    """The SAT checkpoint, the YAMLs and data; the converter's ckpt/ folder and the run's
    output folder (inside the repository's ignored output/) are removed afterwards."""
    sat = write_sat_checkpoint(sat_visualglm_state_dict(tiny_visualglm_config(), seed=4, std=0.3),
                               str(tmp_path / "visualglm-6b"))
    run_dir = f"output/seed_replay_{uuid.uuid4().hex[:8]}"
    write_fewshot_data(tmp_path / "fewshot-data")
    yield sat, write_yamls(tmp_path, run_dir), run_dir
    shutil.rmtree(os.path.join(SCRIPTS, "ckpt"), ignore_errors=True)
    shutil.rmtree(os.path.join(REPO_ROOT, run_dir), ignore_errors=True)


def test_seed_001_commands_in_sequence(seed_workspace):
    sat, yamls, run_dir = seed_workspace
    image = "../../examples/visualglm/shapes.png"
    run(f"python convert_weight.py --torch_path {sat} --config {TINY} --vit_mindspore_path "
        f"ckpt/visualglm_vit.ckpt --qformer_mindspore_path ckpt/visualglm_qformer.ckpt "
        f"--glm_mindspore_path ckpt/glm_6b.ckpt", SCRIPTS)
    assert sorted(os.listdir(os.path.join(SCRIPTS, "ckpt"))) == [
        "glm_6b.ckpt", "glm_6b_for_lite.ckpt", "visualglm_qformer.ckpt", "visualglm_vit.ckpt"]

    out = run(f"python run_visualglm.py --config {yamls['inference']} --image_path={image} "
              f"--prompt=描述这张图片。 --device_id 0 --max_new_tokens 4", SCRIPTS)
    assert "weights: ViT checkpoint, Q-Former checkpoint, GLM checkpoint" in out
    answer = results(out)
    assert len(answer) == 1 and answer[0].startswith("['<img></img>问：描述这张图片。\\n答：")

    out = run(f"python run_visualglm_pipeline.py --config {yamls['inference']} --device_id 0 "
              f"--batch_size 2 --use_past True --seq_length {SEQ} --image_path {image},{image} "
              f"--prompt 描述这张图片。 --max_new_tokens 4", SCRIPTS)
    assert out.count("问：描述这张图片。") == 2

    out = run(f"python run_visualglm_finetune.py --config {yamls['lora']} --graph_mode 1 "
              f"--batch_size 2 --device_id 0", SCRIPTS)
    trained = os.path.join("..", "..", run_dir, "checkpoint_trainable", "rank_0")
    assert os.listdir(os.path.join(SCRIPTS, trained)) == ["visualglm_rank_0-2.ckpt"]

    out = run(f"python run_visualglm_with_lora.py --lora_checkpoint {trained}/ --config {yamls['lora']} "
              f"--image_path={image} --prompt=这张图片的背景里有什么内容？ --device_id 0 "
              f"--max_new_tokens 4", SCRIPTS)
    assert "LoRA checkpoint" in out and len(results(out)) == 1  # seed 001 prints the answers only

    out = run(f"python export_lite_model.py --mode export --config {yamls['inference']} --use_past True "
              f"--device_id 0 --seq_length {SEQ} --batch_size 1", SCRIPTS)
    exported = os.path.join(REPO_ROOT, run_dir, f"mindir_full_checkpoint_bs_1_{SEQ}")
    assert sorted(os.listdir(exported)) == ["glm_6b_for_lite.ckpt", "rank_0_graph.mindir"]
    printed = out.split("run them with:\n", 1)[1].strip()

    # Seed 001: `cd research && python run_visualglm_infer_lite.py ...`, paths from research/.
    full = f"../{run_dir}/mindir_full_checkpoint_bs_1_{SEQ}/rank_0_graph.mindir"
    inc = f"../{run_dir}/mindir_inc_checkpoint_bs_1_{SEQ}/rank_0_graph.mindir"
    lite = run(f"python run_visualglm_infer_lite.py --config {yamls['inference']} --full_model_path {full} "
               f"--inc_model_path {inc} --seq_length {SEQ} --ge_config context.cfg --device_id 0 "
               f"--image_path ../examples/visualglm/shapes.png --prompt 描述这张图片。 --max_new_tokens 4",
               os.path.join(REPO_ROOT, "research"))
    # The printed command, pasted where it was printed (IMAGE and PROMPT filled in).
    pasted = run(printed.replace("IMAGE", image).replace("PROMPT", "描述这张图片。") + " --max_new_tokens 4",
                 SCRIPTS)
    assert results(lite) == results(pasted) == answer  # the graphs answer as run_visualglm.py did
