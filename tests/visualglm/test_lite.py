"""export_lite_model.py + run_visualglm_infer_lite.py on the tiny preset with converted random
weights (std 0.3, so the answers depend on image and prompt): the graphs answer with the tokens
run_visualglm.py gives with its KV cache, with or without the incremental graph, and bad
combinations of files and flags are refused with exit code 2 and a message saying what was
exported and what was asked."""
import argparse
import importlib.util
import os
import shutil
import sys
import types

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from research.common.config import REPO_ROOT
from research.common.lite.export import remove_previous_export
from research.common.lite.graphs import read_graph_inputs
from research.visualglm import export_lite_model, run_visualglm, run_visualglm_infer_lite as lite
from research.visualglm.inference import image_prompt_pairs, load_visualglm
from research.visualglm.lite_visualglm import default_image_encoder_path, load_lite_visualglm
from tests.visualglm.test_run_visualglm import EXAMPLE, TINY, write_config

SEQ = 48  # text tokens; the GLM graphs hold 48 + 32 image tokens
PROMPTS = ("描述这张图片。", "这张图片的背景里有什么内容？")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Converted tiny checkpoints, a YAML naming them, a second image, and the graphs exported
    for batch 1 (full + inc + encoder) and batch 2 (the same)."""
    from research.visualglm import convert_weight
    from tests.visualglm.visualglm_fixtures import (sat_visualglm_state_dict, tiny_visualglm_config,
                                          write_sat_checkpoint)

    root = tmp_path_factory.mktemp("lite")
    state_dict = sat_visualglm_state_dict(tiny_visualglm_config(), seed=4, std=0.3)
    sat_path = write_sat_checkpoint(state_dict, str(root / "visualglm-6b"))
    converted = root / "converted"
    paths = {name: str(converted / f"{name}.ckpt") for name in ("vit", "qformer", "glm_6b")}
    convert_weight.main(["--torch_path", sat_path, "--config", TINY, "--vit_mindspore_path",
                         paths["vit"], "--qformer_mindspore_path", paths["qformer"],
                         "--glm_mindspore_path", paths["glm_6b"]])
    config = write_config(str(root), vision=paths["vit"], qformer=paths["qformer"],
                          glm=paths["glm_6b"])
    image = str(root / "gradient.png")
    pixels = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    Image.fromarray(pixels[:, :, ::-1]).save(image)
    graphs = {}
    for batch in (1, 2):
        written = export_lite_model.main(["--mode", "export", "--config", config, "--use_past", "True",
                                          "--device_id", "0", "--seq_length", str(SEQ),
                                          "--batch_size", str(batch), "--output_dir", str(root / "output")])
        graphs[batch] = written
    return argparse.Namespace(root=root, config=config, images=(EXAMPLE, image), graphs=graphs,
                              glm_checkpoint=paths["glm_6b"],
                              lite_checkpoint=str(converted / "glm_6b_for_lite.ckpt"))


def lite_argv(exported, batch, pairs, inc=True, extra=()):
    graphs = exported.graphs[batch]
    argv = ["--config", exported.config, "--full_model_path", graphs["full"], "--seq_length", str(SEQ),
            "--ge_config", os.path.join(REPO_ROOT, "research", "visualglm", "context.cfg"),
            "--device_id", "0", "--batch_size", str(batch), "--max_new_tokens", str(NEW_TOKENS)]
    if inc:
        argv += ["--inc_model_path", graphs["inc"]]
    for image, prompt in pairs:
        argv += ["--image_path", image, "--prompt", prompt]
    return argv + list(extra)


def lite_tokens(argv):
    """New token ids per pair from the Lite runner's library (the CLI prints only text)."""
    args = lite.build_parser().parse_args(argv)
    model = load_lite_visualglm(
        args.config, args.full_model_path, inc_model_path=args.inc_model_path,
        image_encoder_path=args.image_encoder_path, lite_checkpoint=args.lite_checkpoint,
        ge_config=args.ge_config, runtime=args.runtime, seq_length=args.seq_length,
        batch_size=args.batch_size, use_past=args.use_past)
    pairs = image_prompt_pairs(args.image_path, args.prompt)
    return [reply.token_ids for reply in model.answer(pairs, max_new_tokens=args.max_new_tokens)]


def reference_tokens(exported, pairs, batch):
    """New token ids per pair from the MindSpore model, as run_visualglm.py --use_past True runs it."""
    chat = load_visualglm(exported.config, use_past=True, seq_length=SEQ)
    assert len(chat.loaded) == 3
    return [reply.token_ids for reply in chat.answer(pairs, batch_size=batch, max_new_tokens=NEW_TOKENS)]


def run_visualglm_argv(exported, batch, pairs):
    argv = ["--config", exported.config, "--use_past", "True", "--seq_length", str(SEQ),
            "--batch_size", str(batch), "--max_new_tokens", str(NEW_TOKENS)]
    for image, prompt in pairs:
        argv += ["--image_path", image, "--prompt", prompt]
    return argv


def test_export_writes_the_three_graphs_with_their_shapes(exported):
    root = str(exported.root / "output")
    for batch, written in exported.graphs.items():
        assert written == {
            "full": f"{root}/mindir_full_checkpoint_bs_{batch}_{SEQ}/rank_0_graph.mindir",
            "inc": f"{root}/mindir_inc_checkpoint_bs_{batch}_{SEQ}/rank_0_graph.mindir",
            "image_encoder": f"{root}/mindir_image_encoder_bs_{batch}/rank_0_graph.mindir"}
        length = SEQ + 32
        shapes = {kind: [(item.name, item.shape) for item in read_graph_inputs(path, kind)]
                  for kind, path in written.items()}
        assert shapes["full"] == [("input_embeds", (batch, length, 64)), ("position_ids", (batch, 2, length)),
                                  ("attention_mask", (batch, 1, length, length)), ("logits_index", (batch,))]
        assert shapes["inc"] == [("input_ids", (batch, 1)), ("position_ids", (batch, 2, 1)),
                                 ("attention_mask", (batch, 1, 1, length)),
                                 ("key_cache", (2, batch, 4, length, 16)),
                                 ("value_cache", (2, batch, 4, length, 16)), ("cache_index", ())]
        assert shapes["image_encoder"] == [("pixel_values", (batch, 3, 56, 56))]
        assert default_image_encoder_path(written["full"]) == written["image_encoder"]
    assert os.path.isfile(exported.lite_checkpoint)  # convert_weight.py wrote it beside glm_6b.ckpt
    # The export writes the embeddings it exported with beside the full graph: the converted ones.
    for written in exported.graphs.values():
        beside = os.path.join(os.path.dirname(written["full"]), "glm_6b_for_lite.ckpt")
        table = ms.load_checkpoint(beside)["transformer.word_embeddings.embedding_table"].asnumpy()
        converted = ms.load_checkpoint(exported.lite_checkpoint)
        assert np.array_equal(table, converted["transformer.word_embeddings.embedding_table"].asnumpy())


@pytest.mark.parametrize("batch", [1, 2])
def test_lite_tokens_equal_run_visualglm_with_kv_cache(exported, batch, capsys):
    pairs = list(zip(exported.images, PROMPTS))[:batch]
    expected = reference_tokens(exported, pairs, batch)
    assert all(len(ids) > 3 for ids in expected)
    if batch == 2:
        assert expected[0] != expected[1], "two images and prompts must give two answers"
    assert lite_tokens(lite_argv(exported, batch, pairs)) == expected
    capsys.readouterr()
    printed = lite.main(lite_argv(exported, batch, pairs))
    out = capsys.readouterr().out
    if batch == 2:  # the two command lines print the same answers (one model build is enough)
        assert printed == run_visualglm.main(run_visualglm_argv(exported, batch, pairs))
    assert printed[0].startswith("<img></img>问：描述这张图片。\n答：")
    assert str(printed) in out and "tokens/s" in out
    assert "runtime: MindSpore (mindspore.load + nn.GraphCell)" in out


def test_without_incremental_graph_the_full_graph_gives_the_same_tokens(exported, capsys):
    pairs = list(zip(exported.images, PROMPTS))
    with_inc = lite_tokens(lite_argv(exported, 2, pairs))
    assert lite_tokens(lite_argv(exported, 2, pairs, inc=False)) == with_inc
    assert lite_tokens(lite_argv(exported, 2, pairs, extra=["--use_past", "False"])) == with_inc
    capsys.readouterr()
    lite.main(lite_argv(exported, 2, pairs, inc=False))
    assert "the full graph re-runs for every new token" in capsys.readouterr().out
    # Three pairs on batch-2 graphs: two batches, the last filled by repeating its pair.
    three = pairs + [pairs[0]]
    assert lite_tokens(lite_argv(exported, 2, three)) == with_inc + with_inc[:1]


def exit_message(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        lite.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_batch_size_and_seq_length_must_be_the_exported_ones(exported, capsys):
    pairs = [(EXAMPLE, PROMPTS[0])]
    err = exit_message(lite_argv(exported, 1, pairs, extra=["--batch_size", "2"]), capsys)
    assert "--batch_size 2 was asked" in err and "exported with batch_size 1 and seq_length 48" in err
    err = exit_message(lite_argv(exported, 1, pairs, extra=["--seq_length", "64"]), capsys)
    assert "--seq_length 64 was asked" in err and "exported with batch_size 1 and seq_length 48" in err
    # A full graph of one export with the incremental graph of another.
    argv = lite_argv(exported, 1, pairs, inc=False) + ["--inc_model_path", exported.graphs[2]["inc"]]
    err = exit_message(argv, capsys)
    assert "not exported together" in err and "batch size 2" in err


def test_missing_and_swapped_graph_files(exported, capsys):
    pairs = [(EXAMPLE, PROMPTS[0])]
    missing = str(exported.root / "nowhere" / "rank_0_graph.mindir")
    err = exit_message(lite_argv(exported, 1, pairs, inc=False) + ["--inc_model_path", missing], capsys)
    assert "incremental (one-token) graph not found" in err and missing in err
    argv = lite_argv(exported, 1, pairs)
    argv[argv.index("--full_model_path") + 1] = missing
    err = exit_message(argv, capsys)
    assert "not found" in err and "nowhere" in err
    argv = lite_argv(exported, 1, pairs)
    argv[argv.index("--full_model_path") + 1] = exported.graphs[1]["inc"]
    err = exit_message(argv + ["--image_encoder_path", exported.graphs[1]["image_encoder"]], capsys)
    assert "is not a VisualGLM full (prefill) graph" in err and "it is the incremental" in err
    # A full graph copied out of its folder: the encoder's path cannot be derived.
    copied = str(exported.root / "full_copy.mindir")
    shutil.copyfile(exported.graphs[1]["full"], copied)
    argv[argv.index("--full_model_path") + 1] = copied
    assert "--image_encoder_path" in exit_message(argv, capsys)


def test_prompt_that_does_not_fit_and_missing_lite_checkpoint(exported, capsys):
    err = exit_message(lite_argv(exported, 1, [(EXAMPLE, "描述这张图片。" * 20)]), capsys)
    assert "exported graphs hold 80" in err and "seq_length 48" in err
    pairs = [(EXAMPLE, PROMPTS[0])]
    missing = str(exported.root / "missing" / "glm_6b_for_lite.ckpt")
    err = exit_message(lite_argv(exported, 1, pairs, extra=["--lite_checkpoint", missing]), capsys)
    assert "glm_6b_for_lite.ckpt (the GLM word embeddings for Lite) not found" in err and missing in err
    # A full graph without the export's glm_6b_for_lite.ckpt beside it, and a YAML whose GLM
    # checkpoint has none beside it either.
    elsewhere = exported.root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copyfile(exported.glm_checkpoint, elsewhere / "glm_6b.ckpt")
    shutil.copyfile(exported.graphs[1]["full"], elsewhere / "rank_0_graph.mindir")
    config = write_config(str(elsewhere), glm=str(elsewhere / "glm_6b.ckpt"))
    argv = lite_argv(exported, 1, pairs, extra=["--image_encoder_path", exported.graphs[1]["image_encoder"]])
    argv[argv.index("--config") + 1] = config
    argv[argv.index("--full_model_path") + 1] = str(elsewhere / "rank_0_graph.mindir")
    err = exit_message(argv, capsys)
    assert "beside the full graph" in err and "from the YAML's text_config.checkpoint_name_or_path" in err
    assert str(elsewhere / "glm_6b_for_lite.ckpt") in err


def test_random_weights_export_without_use_past_runs_from_its_own_embeddings(tmp_path, capsys):
    """No checkpoints in the YAML: the export says so and writes the random word embeddings the
    runner needs; without use_past only the full and encoder graphs are written."""
    written = export_lite_model.main(["--config", TINY, "--use_past", "False", "--seq_length", "40",
                                      "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(written) == {"full", "image_encoder"} and "UNTRAINED" in out
    table = os.path.join(os.path.dirname(written["full"]), "glm_6b_for_lite.ckpt")
    assert os.path.isfile(table) and f"wrote {table}" in out and "--lite_checkpoint" not in out
    argv = ["--config", TINY, "--full_model_path", written["full"], "--max_new_tokens", "4"]
    results = lite.main(argv)  # the runner finds the embeddings beside the full graph
    assert len(results) == 1 and results[0].startswith("<img></img>问：描述这张图片。\n答：")
    assert "no --inc_model_path: the full graph re-runs" in capsys.readouterr().out
    if importlib.util.find_spec("mindspore_lite") is None:
        err = exit_message(argv + ["--runtime", "lite"], capsys)
        assert "mindspore_lite is not installed" in err
    os.remove(table)
    assert f"looked for {table} (beside the full graph)" in exit_message(argv, capsys)


class FakeMindSporeLite(types.ModuleType):
    """The parts of the mindspore_lite API the runner uses, running the files with GraphCell, to
    check the Lite code path here (mindspore_lite has no wheel for this Python)."""

    def __init__(self):
        super().__init__("mindspore_lite")
        self.built = []
        fake = self

        class Context:
            def __init__(self):
                self.target = None
                self.ascend = types.SimpleNamespace(device_id=None)

        class Tensor:
            def __init__(self, value=None):
                self.value = value

            def set_data_from_numpy(self, array):
                self.value = ms.Tensor(array)

            def get_data_to_numpy(self):
                return self.value.asnumpy()

        class Model:
            def build_from_file(self, path, model_type, context, config_path=""):
                assert model_type == "MINDIR" and context.target == ["cpu"]
                fake.built.append((path, config_path))
                self.cell = ms.nn.GraphCell(ms.load(path))
                self.count = len(read_graph_inputs(path, "graph"))

            def get_inputs(self):
                return [Tensor() for _ in range(self.count)]

            def predict(self, inputs):
                outputs = self.cell(*[t.value for t in inputs])
                return [Tensor(o) for o in (outputs if isinstance(outputs, tuple) else (outputs,))]

        self.Context, self.Model = Context, Model
        self.ModelType = types.SimpleNamespace(MINDIR="MINDIR")


def test_mindspore_lite_code_path_gives_the_same_tokens(exported, monkeypatch, capsys):
    pairs = list(zip(exported.images, PROMPTS))
    expected = lite_tokens(lite_argv(exported, 2, pairs))
    fake = FakeMindSporeLite()
    monkeypatch.setitem(sys.modules, "mindspore_lite", fake)
    assert lite_tokens(lite_argv(exported, 2, pairs, extra=["--runtime", "lite"])) == expected
    context_cfg = os.path.join(REPO_ROOT, "research", "visualglm", "context.cfg")
    assert sorted(fake.built) == sorted((path, context_cfg) for path in exported.graphs[2].values())
    capsys.readouterr()
    lite.main(lite_argv(exported, 2, pairs))
    assert "runtime: MindSpore Lite" in capsys.readouterr().out


def test_re_export_removes_the_files_of_the_previous_one(tmp_path):
    """Over 1 GB of weights MindSpore writes <prefix>_graph.mindir + <prefix>_variables/ (files
    read-only); a new export under the same name starts from none of them."""
    prefix = str(tmp_path / "rank_0_graph")
    os.makedirs(prefix + "_variables")
    for path in (prefix + ".mindir", prefix + "_graph.mindir", prefix + "_variables/data_0"):
        with open(path, "wb") as stream:
            stream.write(b"old")
        os.chmod(path, 0o400)
    remove_previous_export(prefix)
    assert os.listdir(tmp_path) == []
