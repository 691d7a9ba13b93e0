"""run_visualglm_finetune.py on tiny synthetic data: the loss falls, resume continues exactly,
two CPU processes through run_singlenode.sh equal one process, and bad input is refused."""
import glob
import json
import os
import sys

import numpy as np
import pytest
import yaml

from research.common.checkpoint import read_checkpoint
from research.common.config import REPO_ROOT
from research.visualglm import run_visualglm_finetune, synthetic_data
from tests.config_files import write_yaml
from tests.launch import run_two_processes

FINETUNE_YAML = os.path.join(REPO_ROOT, "configs", "visualglm", "run_visualglm_tiny_finetune.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    synthetic_data.make_synthetic_dataset(str(directory), 48, seed=3, test_count=4)
    synthetic_data.build_synthetic_tokenizer(str(directory / "ice_text.model"))
    return directory


def write_config(path, data_json, vocab, output_dir, **changes):
    """The tiny fine-tuning preset on `data_json`, with top-level/runner changes."""
    with open(FINETUNE_YAML, encoding="utf-8") as stream:
        callbacks = yaml.safe_load(stream)["callbacks"]
    callbacks[0]["save_checkpoint_steps"] = changes.pop("save_checkpoint_steps", 100)
    return write_yaml(path, FINETUNE_YAML, {
        "output_dir": str(output_dir), "train_dataset.data_loader.dataset_dir": str(data_json),
        "processor.tokenizer.vocab_file": str(vocab), "callbacks": callbacks, **changes})


def losses(output_dir):
    with open(os.path.join(output_dir, "loss.csv"), encoding="utf-8") as stream:
        return [float(line.split(",")[2]) for line in stream.read().splitlines()[1:]]


def test_loss_falls_and_resume_continues_exactly(data_dir, tmp_path):
    vocab = data_dir / "ice_text.model"
    full = write_config(tmp_path / "full.yaml", data_dir / "dataset.json", vocab, tmp_path / "full",
                        **{"runner_config.epochs": 2, "runner_config.batch_size": 8,
                           "save_checkpoint_steps": 6, "lr_schedule.warmup_steps": 2})
    _, history = run_visualglm_finetune.main(["--config", full])
    assert len(history) == 12
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert os.path.isfile(tmp_path / "full" / "loss.png")

    # a second run stops at step 6, then resumes from its checkpoint
    part = write_config(tmp_path / "part.yaml", data_dir / "dataset.json", vocab, tmp_path / "part",
                        **{"runner_config.epochs": 1, "runner_config.batch_size": 8,
                           "save_checkpoint_steps": 6, "lr_schedule.warmup_steps": 2})
    run_visualglm_finetune.main(["--config", part])
    resumed = write_config(tmp_path / "resumed.yaml", data_dir / "dataset.json", vocab,
                           tmp_path / "part", **{"runner_config.epochs": 2,
                                                 "runner_config.batch_size": 8,
                                                 "save_checkpoint_steps": 6,
                                                 "lr_schedule.warmup_steps": 2})
    run_visualglm_finetune.main(["--config", resumed, "--resume", "True"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def same_length_dataset(data_dir, directory, count=8):
    """`count` images with one label, so every sample has as many label tokens: the mean loss
    of two ranks' halves then equals the mean over the whole batch."""
    with open(data_dir / "dataset.json", encoding="utf-8") as stream:
        rows = json.load(stream)[:count]
    label = rows[0]["label"]
    rows = [{"img": str(data_dir / row["img"]), "prompt": row["prompt"], "label": label}
            for row in rows]
    path = directory / "dataset.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_two_processes_equal_one_process_on_the_combined_batch(data_dir, tmp_path):
    data = same_length_dataset(data_dir, tmp_path)
    vocab = data_dir / "ice_text.model"
    common = {"runner_config.epochs": 1, "train_dataset.data_loader.shuffle": False}
    single = write_config(tmp_path / "single.yaml", data, vocab, tmp_path / "single",
                          **common, **{"runner_config.batch_size": 4})
    run_visualglm_finetune.main(["--config", single])
    parallel = write_config(tmp_path / "parallel.yaml", data, vocab, tmp_path / "parallel",
                            **common, **{"runner_config.batch_size": 2, "use_parallel": True,
                                         "parallel_config.data_parallel": 2})
    command = f"{sys.executable} -m research.visualglm.run_visualglm_finetune --config {parallel}"
    run_two_processes(command, tmp_path)

    def weights(output_dir, rank):
        files = glob.glob(str(output_dir / "checkpoint_trainable" / f"rank_{rank}" / "*.ckpt"))
        assert len(files) == 1, files
        return read_checkpoint(files[0])

    rank0, rank1 = weights(tmp_path / "parallel", 0), weights(tmp_path / "parallel", 1)
    alone = weights(tmp_path / "single", 0)
    assert set(rank0) == set(alone)
    for name in alone:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], alone[name], atol=2e-5, rtol=0, err_msg=name)


def run_exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_visualglm_finetune.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input(data_dir, tmp_path, capsys):
    vocab = data_dir / "ice_text.model"
    rows = [{"img": str(data_dir / "images" / "train_00000.png"), "prompt": "p", "label": "l"},
            {"img": str(tmp_path / "gone.png"), "prompt": "p", "label": "l"}]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(rows), encoding="utf-8")
    code, err = run_exit_code(["--config", write_config(tmp_path / "a.yaml", missing, vocab,
                                                        tmp_path / "a")], capsys)
    assert code == 2 and "gone.png" in err and "1" in err

    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps([rows[0], {"img": rows[0]["img"], "prompt": "p"}]), encoding="utf-8")
    code, err = run_exit_code(["--config", write_config(tmp_path / "b.yaml", malformed, vocab,
                                                        tmp_path / "b")], capsys)
    assert code == 2 and "label" in err

    code, err = run_exit_code(["--config", write_config(tmp_path / "c.yaml", data_dir / "dataset.json",
                                                        vocab, tmp_path / "c"),
                               "--batch_size", "64"], capsys)
    assert code == 2 and "48 samples" in err and "64" in err
