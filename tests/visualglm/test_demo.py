"""`make demo`: the scoring of its answers, the configs it writes for another folder and the
commands it prints (fast); end to end (slow: trains the tiny VisualGLM from random weights,
about 15 minutes on 2 free cores, then LoRA), with the pasted commands run as printed."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from research.common.config import REPO_ROOT
from research.visualglm import demo, synthetic_data
from research.visualglm.configuration_visualglm import load_visualglm_config


def rows_of(*attributes):
    return [{"shape": shape, "colour": colour, "background": background,
             "label": synthetic_data.label_for(shape, colour, background)}
            for shape, colour, background in attributes]


def test_answers_are_scored_for_style_and_content():
    rows = rows_of(("圆形", "红色", "白色"), ("菱形", "蓝色", "黑色"), ("三角形", "绿色", "灰色"),
                   ("正方形", "紫色", "白色"))
    answers = ["图里是红色的圆形哦！",  # new style, right content
               "图里是蓝色的三角形哦！",  # new style, wrong shape
               "一个绿色的三角形，背景是灰色。",  # right content, old style
               "图里是紫色的正方形和圆形哦！"]  # names another shape too
    assert demo.lora_scores(answers, rows) == {"content": 0.25, "style": 0.75, "named": 0.5}
    assert demo.exact_accuracy(answers, rows) == 0.25  # the old-style answer
    assert demo.exact_accuracy([row["label"] for row in rows], rows) == 1.0
    assert not demo.names_content("图里是红色和蓝色的圆形哦！", "圆形", "红色")  # a second colour
    assert demo.names_content("一个红色的圆形，背景是白色。", "圆形", "红色")  # backgrounds aside
    assert not demo.in_style("图里是红色的圆形哦！！")
    for shape, colour in zip(synthetic_data.SHAPES, synthetic_data.COLOURS):
        label = synthetic_data.style_label_for(shape, colour)
        assert demo.in_style(label) and demo.names_content(label, shape, colour)


def test_another_output_dir_gets_its_own_configs(tmp_path):
    paths = demo.DemoPaths(str(tmp_path / "demo"))
    configs = demo.demo_configs(paths)
    assert set(configs) == {"finetune", "demo", "lora"}
    for stage, path in configs.items():
        yaml_config, model_config = load_visualglm_config(path)
        text = open(path, encoding="utf-8").read()
        assert "output/demo" not in text.split("\n", 1)[1], stage  # only the header names it
        named = [model_config.checkpoint_name_or_path, model_config.vision_config.checkpoint_name_or_path,
                 model_config.text_config.checkpoint_name_or_path,
                 yaml_config.processor["tokenizer"]["vocab_file"]]
        for name in filter(None, named):
            assert name.startswith(paths.root + os.sep), (stage, name)
    lora = load_visualglm_config(configs["lora"])[0]
    assert lora.train_dataset["data_loader"]["dataset_dir"] == os.path.join(paths.data, "style", "dataset.json")
    assert lora.output_dir == paths.lora
    assert demo.demo_configs(demo.DemoPaths()) == demo.CONFIGS  # output/demo: the bare names


def test_printed_commands_paste_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    paths = demo.DemoPaths()
    image = os.path.join(paths.data, "images", "test_00000.png")
    lines = demo.chat_commands(paths, demo.CONFIGS, image)
    assert lines[0] in ("source .venv/bin/activate",
                        f"source {os.path.join(sys.prefix, 'bin', 'activate')}")
    run, lora, chat = (shlex.split(line) for line in lines[1:])
    assert run == ["python", "-m", "research.visualglm.run_visualglm", "--config",
                   "run_visualglm_tiny_demo.yaml", "--image_path", "output/demo/data/images/test_00000.png",
                   "--prompt", "这张图片里有什么？"]
    assert lora[lora.index("--lora_checkpoint") + 1] == "output/demo/lora/checkpoint_trainable/rank_0"
    assert lora[lora.index("--config") + 1] == "run_visualglm_tiny_lora.yaml"
    assert chat[2] == "research.visualglm.cli_demo" and "--prompt" not in chat
    # From another folder: paths under it relative, paths outside it absolute.
    monkeypatch.chdir(tmp_path)
    other = demo.DemoPaths(str(tmp_path / "out"))
    configs = {stage: str(tmp_path / "out" / "configs" / name) for stage, name in demo.CONFIGS.items()}
    run = shlex.split(demo.chat_commands(other, configs, str(tmp_path / "out" / "a b.png"))[1])
    assert run[run.index("--config") + 1] == "out/configs/run_visualglm_tiny_demo.yaml"
    assert run[run.index("--image_path") + 1] == "out/a b.png"


def test_data_of_an_older_format_is_written_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TRAIN_COUNT", 12)
    paths = demo.DemoPaths(str(tmp_path))
    demo.ensure_data(paths)
    metadata = os.path.join(paths.data, "metadata.json")
    with open(metadata, encoding="utf-8") as stream:
        written = json.load(stream)
    assert written["format"] == synthetic_data.FORMAT_VERSION and os.path.isfile(paths.tokenizer)
    demo.ensure_data(paths)  # current: kept
    assert capsys.readouterr().out == ""
    with open(metadata, "w", encoding="utf-8") as stream:
        json.dump({**written, "format": 1}, stream)
    demo.ensure_data(paths)
    assert "older format; writing it again" in capsys.readouterr().out
    with open(metadata, encoding="utf-8") as stream:
        assert json.load(stream)["format"] == synthetic_data.FORMAT_VERSION


@pytest.mark.slow
def test_demo_learns_the_synthetic_set_and_a_lora_style_that_keeps_the_content(tmp_path):
    """The demo from scratch in a folder of its own: held-out accuracy >= 95%, LoRA content
    accuracy >= 90% (answers in the new style naming the right shape and colour on 200 held-out
    images), and its closing commands work pasted into bash in the folder it ran from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "research.visualglm.demo", "--output_dir", "demo"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    out = result.stdout
    print(out)  # the numbers, for `pytest -rP`
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)%", out).group(1))
    assert accuracy >= 95.0, out[-3000:]
    content = float(re.search(r"LoRA content accuracy: ([\d.]+)%", out).group(1))
    assert content >= 90.0, out[-3000:]
    expected = re.search(r"run_visualglm\.py on .+ \(expected: (.+)\):", out).group(1)
    assert f"答：{expected}'" in out
    assert re.search(r"\['图里是.+的.+哦！'\]", out), out[-2000:]

    lines = out.rstrip("\n").split("\n")
    commands = lines[lines.index("chat with the models it trained (paste these lines in this folder):") + 1:]
    assert len(commands) == 4 and commands[0].startswith("source ")
    activate = shlex.split(commands[0])[1]
    prefix = f"{commands[0]} && " if os.path.isfile(os.path.join(tmp_path, activate)) else ""
    if not prefix:  # not run from a virtual environment: the interpreter of this test
        commands = [c.replace("python -m", f"{shlex.quote(sys.executable)} -m", 1) for c in commands]

    def paste(command, stdin=None):
        done = subprocess.run(["bash", "-c", prefix + command], cwd=tmp_path, env=env, input=stdin,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        return done.stdout

    assert f"答：{expected}'" in paste(commands[1])
    assert re.search(r"\['图里是.+的.+哦！'\]", paste(commands[2]))
    assert expected in paste(commands[3], stdin=f"{synthetic_data.PROMPT}\nstop\n")
