"""run_chatglm2_finetune.py on the synthetic ADGEN set from a random tiny base: each method trains
what it should and nothing else (P-Tuning v2 the prefix, LoRA its matrices, full everything),
the loss falls, a run stopped and resumed gives the same loss sequence; run_chatglm2_eval.py
evaluates each result (and the prefix exported in upstream's format gives the same answers);
adapter checkpoints of another shape are refused."""
import glob
import json
import os
import sys

import numpy as np
import pytest

from research.chatglm2 import run_chatglm2_eval, run_chatglm2_finetune
from research.chatglm2.convert_chatglm2 import write_upstream_prefix
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.synthetic_adgen import write_adgen
from research.common.checkpoint import read_checkpoint
from research.common.config import CONFIG_ROOT
from research.common.convert import save_checkpoint_atomic
from tests.chatglm2.chatglm2_fixtures import random_weights
from tests.config_files import write_yaml
from tests.launch import run_two_processes

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm2ft")
    write_adgen(str(root / "data"), train=8 * STEPS, dev=4)
    base = random_weights(ChatGLM2Config.from_name("tiny"))
    save_checkpoint_atomic(base, str(root / "base.ckpt"))
    return root, base


def config(setup, method, name, **changes):
    root, _ = setup
    return write_yaml(root / f"{name}.yaml", os.path.join(CONFIG_ROOT, "chatglm2", f"run_glm2_tiny_{method}.yaml"),
                      {"train_dataset.data_loader.dataset_dir": str(root / "data" / "train.json"),
                       "model.model_config.checkpoint_name_or_path": str(root / "base.ckpt"),
                       "output_dir": str(root / name), **changes})


def trained(output_dir):
    (path,) = glob.glob(os.path.join(output_dir, "checkpoint_trainable", "rank_0", "*.ckpt"))
    return read_checkpoint(path)


TRAINS = {"ptuning2": lambda name: name.startswith("transformer.prefix_encoder."),
          "lora": lambda name: "mindpet_delta_lora" in name,
          "finetune": lambda name: True}


@pytest.fixture(scope="module")
def runs(setup):
    """Each method trained once: {method: (trainer, loss history)}."""
    return {method: run_chatglm2_finetune.main(["--config", config(setup, method, method)]) for method in TRAINS}


@pytest.mark.parametrize("method", sorted(TRAINS))
def test_each_method_trains_only_its_parameters(setup, runs, method):
    root, base = setup
    trainer, history = runs[method]
    assert len(history) == STEPS and history[-1]["loss"] < history[0]["loss"]
    model = {p.name: p.asnumpy() for p in trainer.network.get_parameters()}
    trains = TRAINS[method]
    saved = trained(root / method)
    assert set(saved) == {name for name in model if trains(name)} and saved
    for name, value in model.items():  # the rest is the base, bit for bit
        if not trains(name):
            assert np.array_equal(value, base[name]), name
        elif name in base:
            assert not np.array_equal(value, base[name]), name  # full fine-tuning moved it


def evaluate(setup, method, *flags):
    root, _ = setup
    return run_chatglm2_eval.main(["--config", config(setup, method, f"eval_{method}", **{
        "eval_dataset.data_loader.dataset_dir": str(root / "data" / "dev.json")}),
        "--do_sample", "False", "--batch_size", "2", "--output_dir", str(root / f"eval_{method}"), *flags])


def test_evaluation_of_each_fine_tuned_model(setup, runs, capsys):
    root, _ = setup
    checkpoints = {method: glob.glob(str(root / method / "checkpoint_trainable" / "rank_0" / "*.ckpt"))[0]
                   for method in TRAINS}
    results = {"ptuning2": evaluate(setup, "ptuning2", "--ptuning_checkpoint", checkpoints["ptuning2"]),
               "lora": evaluate(setup, "lora", "--lora_checkpoint", checkpoints["lora"]),
               "finetune": evaluate(setup, "finetune", "--checkpoint", checkpoints["finetune"])}
    out = capsys.readouterr().out
    for method, result in results.items():
        with open(result.path, encoding="utf-8") as stream:
            rows = [json.loads(line) for line in stream]
        assert len(rows) == 4 and set(rows[0]) == {"labels", "predict"}
        assert [row["predict"] for row in rows] == [p.strip() for p in result.predictions]
        assert result.report.samples == 4
    assert '"bleu-4"' in out and '"rouge-l"' in out
    # the prefix exported in upstream's format gives the same greedy answers
    folder = root / "upstream-checkpoint-6"
    folder.mkdir()
    write_upstream_prefix(read_checkpoint(checkpoints["ptuning2"]), str(folder / "pytorch_model.bin"))
    again = evaluate(setup, "ptuning2", "--ptuning_checkpoint", str(folder))
    assert again.predictions == results["ptuning2"].predictions


def test_adapter_checkpoints_of_another_shape_are_refused(setup, runs, capsys):
    root, _ = setup
    prefix = glob.glob(str(root / "ptuning2" / "checkpoint_trainable" / "rank_0" / "*.ckpt"))[0]
    lora = glob.glob(str(root / "lora" / "checkpoint_trainable" / "rank_0" / "*.ckpt"))[0]
    cases = [(config(setup, "ptuning2", "pre4", **{"model.model_config.pre_seq_len": 4}),
              ["--ptuning_checkpoint", prefix], "pre_seq_len 8 but the config says pre_seq_len 4"),
             (config(setup, "lora", "rank4", **{"model.model_config.pet_config.lora_rank": 4}),
              ["--lora_checkpoint", lora], "another lora_rank"),
             (config(setup, "ptuning2", "noprefix"), [], "needs both model_config.pre_seq_len and its prefix")]
    for path, flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_chatglm2_eval.main(["--config", path, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("method, dropout", [("ptuning2", "model.model_config.prefix_dropout"),
                                             ("lora", "model.model_config.pet_config.lora_dropout")])
def test_stopped_and_resumed_run_gives_the_same_losses(setup, method, dropout):
    """With dropout (0.3): the masks are a function of the step (StepDropout), so the resumed
    process draws the ones the uninterrupted run drew; MindSpore's own dropout would start afresh."""
    constant = {dropout: 0.3, "lr_schedule": {"type": "AnnealingLR", "learning_rate": 2.e-2, "warmup_steps": 0,
                                              "num_iters": 2 * STEPS, "total_steps": -1, "auto_warmup_steps": 0},
                "callbacks": [{"type": "CheckpointMonitor", "prefix": "pt", "save_checkpoint_steps": STEPS,
                               "keep_checkpoint_max": 2}]}
    _, full = run_chatglm2_finetune.main(["--config", config(setup, method, f"{method}_full", **constant),
                                          "--epochs", "2"])
    run_chatglm2_finetune.main(["--config", config(setup, method, f"{method}_part", **constant), "--epochs", "1"])
    _, resumed = run_chatglm2_finetune.main(["--config", config(setup, method, f"{method}_part", **constant),
                                             "--epochs", "2", "--resume", "True"])
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert len(full) == 2 * STEPS
    no_dropout = {**constant, dropout: 0.0}
    _, plain = run_chatglm2_finetune.main(["--config", config(setup, method, f"{method}_plain", **no_dropout),
                                           "--epochs", "2"])
    assert [h["loss"] for h in plain] != [h["loss"] for h in full]  # the dropout is there


def test_two_processes_equal_one_process_on_the_combined_batch(setup, tmp_path):
    """run_singlenode.sh (msrun on CPU) with the same YAML and use_parallel: True. Every answer
    has the same length, so the mean of the two ranks' losses is the combined batch's."""
    root, _ = setup
    with open(root / "data" / "train.json", encoding="utf-8") as stream:
        rows = [json.loads(line) for line in stream][:8]
    data = tmp_path / "train.json"
    data.write_text("".join(json.dumps({**row, "summary": rows[0]["summary"]}, ensure_ascii=False) + "\n"
                            for row in rows), encoding="utf-8")
    common = {"train_dataset.data_loader.dataset_dir": str(data), "train_dataset.data_loader.shuffle": False,
              "model.model_config.prefix_dropout": 0.0}
    single = config(setup, "ptuning2", "single", **common, **{"runner_config.batch_size": 4,
                                                               "output_dir": str(tmp_path / "single")})
    run_chatglm2_finetune.main(["--config", single])
    parallel = config(setup, "ptuning2", "parallel", **common, **{
        "runner_config.batch_size": 2, "use_parallel": True, "parallel_config.data_parallel": 2,
        "output_dir": str(tmp_path / "parallel")})
    command = f"{sys.executable} -m research.chatglm2.run_chatglm2_finetune --config {parallel}"
    run_two_processes(command, tmp_path)
    rank0, rank1 = trained(tmp_path / "parallel"), read_checkpoint(glob.glob(str(
        tmp_path / "parallel" / "checkpoint_trainable" / "rank_1" / "*.ckpt"))[0])
    alone = trained(tmp_path / "single")
    assert set(rank0) == set(alone) == {"transformer.prefix_encoder.embedding.weight"}
    for name in alone:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], alone[name], atol=2e-5, rtol=0, err_msg=name)
    assert len(glob.glob(str(tmp_path / "parallel" / "checkpoint_trainable" / "rank_*"))) == 2


def test_a_model_trained_from_scratch_gets_a_gradient_in_every_parameter():
    """Random weights as upstream's start (embeddings N(0, 1)): with zero embeddings the first
    layer's norm and query/key/value would get no gradient and the model would not learn to read
    the prompt (the demo's base model)."""
    import mindspore as ms
    from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration, ChatGLM2ForTraining

    config = ChatGLM2Config.from_name("tiny")
    model = ChatGLM2ForConditionalGeneration(config)
    embedding = model.transformer.embedding.embedding_weight.asnumpy()
    assert abs(float(embedding.std()) - 1.0) < 0.05 and abs(float(embedding.mean())) < 0.05
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, 300, (2, 12)).astype(np.int32)
    labels = np.where(np.arange(12) >= 6, input_ids, -100).astype(np.int32)
    params = list(model.get_parameters())
    _, grads = ms.value_and_grad(ChatGLM2ForTraining(model), None, params)(ms.Tensor(input_ids), ms.Tensor(labels))
    assert [p.name for p, g in zip(params, grads) if not np.abs(g.asnumpy()).max() > 0] == []
