"""The shared trainer on a tiny regression network: schedule, optimizer groups, loss scaling,
clipping, checkpoints, exact resume, loss.csv and loss.png."""
import csv
import io
import math
import os

import numpy as np
import mindspore as ms
import pytest
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindspore import nn, ops
from PIL import Image

from research.common.checkpoint import read_checkpoint
from research.common.config import CONFIG_ROOT, load_config
from research.common.errors import UserInputError
from research.common.lr_schedule import AnnealingLR, LinearWarmupCosineLR, LayerScaledLR
from research.common.parallel import ParallelContext
from research.common.trainer import (COLUMNS, Trainer, TrainingArguments, TrainingDivergedError,
                                     parameter_groups, rank_batch_indices)

CONSTANT_LR = {"learning_rate": 0.05, "decay_style": "constant", "auto_warmup_steps": 0}


@pytest.fixture(autouse=True)
def graph_mode_by_default():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


class GradBomb(nn.Cell):
    """Identity forward; the backward pass returns inf wherever `bomb` > 0."""

    def construct(self, x, bomb):
        return x

    def bprop(self, x, bomb, out, dout):
        return ops.select(bomb > 0, dout * np.inf, dout), ops.zeros_like(bomb)


class TinyNet(nn.Cell):
    """A 2-layer MLP regressor plus a frozen input projection; deterministic initial weights
    (`width`: the hidden layer's, large for checkpoints of a given size)."""

    def __init__(self, seed=0, width=16):
        super().__init__()
        rng = np.random.RandomState(seed)

        def dense(n_in, n_out, std):
            weight = ms.Tensor(rng.randn(n_out, n_in).astype(np.float32) * std)
            return nn.Dense(n_in, n_out, weight_init=weight, bias_init="zeros")

        self.frozen = dense(4, 4, 0.5)
        self.hidden = dense(4, width, 0.5)
        self.out = dense(width, 1, 0.3)
        self.bomb = GradBomb()

    def construct(self, x, y, bomb, poison):
        pred = self.out(ops.tanh(self.hidden(self.frozen(x)))).squeeze(-1)
        pred = self.bomb(pred, bomb)
        return ((pred - y) ** 2).mean() * poison.mean()

    def trainable(self):
        return self.hidden.trainable_params() + self.out.trainable_params()


class FakeDataset:
    """y = x . w; `bomb` marks samples whose gradient overflows, `poison` (nan) breaks the loss."""

    columns = ("x", "y", "bomb", "poison")

    def __init__(self, n=32, bomb=(), poison_from=None):
        rng = np.random.RandomState(1)
        self.x = rng.randn(n, 4).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)
        self.bomb = np.isin(np.arange(n), bomb).astype(np.float32)
        self.poison = np.ones(n, np.float32)
        if poison_from is not None:
            self.poison[poison_from:] = np.nan

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "bomb": self.bomb[i], "poison": self.poison[i]}


class ShuffledDataset(FakeDataset):
    def order(self, epoch):
        return np.random.RandomState(100 + epoch).permutation(len(self))


def make_args(**kwargs):
    values = dict(epochs=2, batch_size=4, lr_schedule=dict(CONSTANT_LR), prefix="tiny")
    values.update(kwargs)
    return TrainingArguments(**values)


def run(tmp_path, name="out", dataset=None, net=None, resume=None, **kwargs):
    net = net or TinyNet()
    trainer = Trainer(net, net.trainable(), make_args(**kwargs), output_dir=str(tmp_path / name),
                      stream=io.StringIO())
    return net, trainer, trainer.train(dataset or FakeDataset(), resume=resume)


def params_of(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


# ------------------------------------------------------------------ schedule and groups
def test_annealing_lr_follows_sat_formula():
    assert MindFormerRegister.get_cls(MindFormerModuleType.LR, "AnnealingLR") is AnnealingLR
    sched = AnnealingLR(learning_rate=1e-5, warmup_steps=100, num_iters=5000, total_steps=-1)
    assert sched.value(50) == pytest.approx(1e-5 * 0.05)  # upstream auto warmup: min(5% lr, lr*s/w)
    assert sched.value(2) == pytest.approx(1e-5 * 2 / 100)
    assert sched.value(100) == pytest.approx(1e-5)  # peak at the end of warmup
    d = 1 / 0.1  # SAT: lr / d * ((cos(pi r) + 1) * (d - 1) / 2 + 1), r = (s - warmup) / num_iters
    for step in (101, 1000, 2600, 5100, 9000):
        r = min(1.0, (step - 100) / 5000)
        want = 1e-5 / d * ((math.cos(math.pi * r) + 1) * (d - 1) / 2 + 1)
        assert sched.value(step) == pytest.approx(want, rel=1e-12)
    assert sched.value(5100) == pytest.approx(1e-6)  # floor lr/10 after warmup + num_iters
    plain = AnnealingLR(learning_rate=1.0, warmup_steps=10, num_iters=100, auto_warmup_steps=0)
    assert plain.value(5) == pytest.approx(0.5)
    linear = AnnealingLR(learning_rate=1.0, warmup_steps=0, num_iters=100, decay_style="linear",
                         min_lr=0.2, auto_warmup_steps=0)
    assert linear.value(50) == pytest.approx(0.5) and linear.value(99) == pytest.approx(0.2)
    # the graph version gives the same numbers
    steps = [0, 1, 5, 10, 50, 99, 100, 101, 2600, 5100, 6000]
    got = sched(ms.Tensor(np.array(steps, np.int32))).asnumpy()
    np.testing.assert_allclose(got, [sched.value(s) for s in steps], rtol=2e-6)
    got = linear(ms.Tensor(np.array(steps, np.int32))).asnumpy()
    np.testing.assert_allclose(got, [linear.value(s) for s in steps], rtol=2e-6)


def upstream_minigpt4_lr(cur_epoch, cur_step, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch,
                         max_epoch):
    """LinearWarmupCosineLRScheduler.step of MiniGPT-4's minigpt4/common/optims.py at 22d8888,
    transcribed: the warmup takes the step within the epoch, the cosine the total step."""
    total_cur_step = cur_epoch * iters_per_epoch + cur_step
    if total_cur_step < warmup_steps:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * cur_step / max(warmup_steps, 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * total_cur_step / (max_epoch * iters_per_epoch))) + min_lr


@pytest.mark.parametrize("stage", [
    dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, iters_per_epoch=5000, max_epoch=4),
    dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, iters_per_epoch=200, max_epoch=5),
    dict(init_lr=1.0, min_lr=0.1, warmup_lr=0.0, warmup_steps=30, iters_per_epoch=20, max_epoch=3),  # warmup > epoch
])
def test_linear_warmup_cosine_lr_follows_minigpt4(stage):
    assert MindFormerRegister.get_cls(MindFormerModuleType.LR, "linear_warmup_cosine_lr") is LinearWarmupCosineLR
    sched = LinearWarmupCosineLR(**stage)
    iters = stage["iters_per_epoch"]
    steps = sorted({0, 1, 7, 19, 20, 25, 29, 30, 31, 59, iters - 1, iters, iters + 1, 2 * iters + 3,
                    stage["warmup_steps"] - 1, stage["warmup_steps"], stage["max_epoch"] * iters - 1})
    for step in steps:
        want = upstream_minigpt4_lr(step // iters, step % iters, **stage)
        assert sched.value(step) == pytest.approx(want, rel=1e-12), step
    got = sched(ms.Tensor(np.array(steps, np.int32))).asnumpy()
    np.testing.assert_allclose(got, [sched.value(s) for s in steps], rtol=2e-6)
    # iters_per_epoch from the training length when the YAML leaves it out
    inferred = LinearWarmupCosineLR(**{**stage, "iters_per_epoch": None}, total_steps=iters * stage["max_epoch"])
    assert inferred.value(iters + 3) == sched.value(iters + 3)


def test_num_iters_defaults_to_the_training_length():
    sched = AnnealingLR(learning_rate=1.0, warmup_steps=10, num_iters=-1, total_steps=110,
                        auto_warmup_steps=0)
    assert sched.value(110) == pytest.approx(0.1) and sched.value(60) == pytest.approx(0.55)
    with pytest.raises(UserInputError, match="decay_style"):
        AnnealingLR(learning_rate=1.0, num_iters=10, decay_style="exponentail")


def test_layer_decay_groups_and_weight_decay_rule():
    names = {"embedding.word_embeddings.weight": (8, 4), "encoder.layers.0.dense.weight": (4, 4),
             "encoder.layers.0.dense.bias": (4,), "encoder.layers.2.dense.weight": (4, 4),
             "encoder.layers.2.norm.gamma": (4,), "head.weight": (3, 4)}
    params = [ms.Parameter(ms.Tensor(np.zeros(shape, np.float32)), name=name)
              for name, shape in names.items()]
    base = AnnealingLR(learning_rate=1.0, warmup_steps=0, num_iters=10, auto_warmup_steps=0)
    groups = parameter_groups(params, 0.01, base, layer_scale=True, layer_decay=0.5)
    by_name = {p.name: g for g in groups for p in g["params"]}
    num_layers = 3  # 1 + the largest layer index
    want_scale = {"embedding.word_embeddings.weight": 0.5 ** (num_layers + 1),
                  "encoder.layers.0.dense.weight": 0.5 ** 3, "encoder.layers.0.dense.bias": 0.5 ** 3,
                  "encoder.layers.2.dense.weight": 0.5 ** 1, "encoder.layers.2.norm.gamma": 0.5 ** 1,
                  "head.weight": 1.0}
    for name, scale in want_scale.items():
        lr = by_name[name]["lr"]
        assert isinstance(lr, LayerScaledLR) and lr.scale == pytest.approx(scale), name
        assert lr(ms.Tensor(np.array([3], np.int32))).asnumpy()[0] == pytest.approx(base.value(3) * scale)
    assert by_name["encoder.layers.0.dense.bias"]["weight_decay"] == 0.0
    assert by_name["encoder.layers.2.norm.gamma"]["weight_decay"] == 0.0
    assert by_name["encoder.layers.0.dense.weight"]["weight_decay"] == 0.01
    plain = parameter_groups(params, 0.01, base)
    assert len(plain) == 2 and all("lr" not in g for g in plain)
    optimizer = nn.AdamWeightDecay(groups, learning_rate=base)  # MindSpore accepts the groups
    assert len(optimizer.parameters) == len(params)


# ------------------------------------------------------------------ training
def test_loss_falls_and_only_trainable_params_change(tmp_path):
    net = TinyNet()
    before = params_of(net)
    _, trainer, history = run(tmp_path, net=net, dataset=ShuffledDataset(), epochs=6,
                              lr_schedule=dict(learning_rate=0.05, warmup_steps=3, auto_warmup_steps=0))
    losses = [row["loss"] for row in history]
    assert len(losses) == 6 * 8
    assert np.mean(losses[-8:]) < 0.3 * np.mean(losses[:8])
    after = params_of(net)
    trainable = {p.name for p in net.trainable()}
    assert trainable == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    for name in before:
        if name in trainable:
            assert not np.array_equal(before[name], after[name]), name
        else:
            assert np.array_equal(before[name], after[name]), name  # frozen: bit-identical
    assert int(trainer.optimizer.global_step.asnumpy()[0]) == 48
    assert history[0]["lr"] == 0.0 and history[3]["lr"] == pytest.approx(0.05)  # warmup from 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path, mode):
    kwargs = dict(dataset=ShuffledDataset(), epochs=3, save_checkpoint_steps=5, keep_checkpoint_max=10,
                  lr_schedule=dict(learning_rate=0.05, warmup_steps=4, num_iters=20,
                                   auto_warmup_steps=0),
                  use_clip_grad=True, max_grad_norm=2.0, scale_window=3)
    net_a, _, full = run(tmp_path, "a", **kwargs)
    state_a = tmp_path / "a" / "checkpoint" / "rank_0"
    # resume from the step-10 state (mid-epoch: 8 steps per epoch) in another directory
    net_b, _, resumed = run(tmp_path, "b", resume=str(state_a / "tiny_rank_0-10.ckpt"), **kwargs)
    assert [r["step"] for r in resumed] == list(range(11, 25))
    for key in ("loss", "lr", "loss_scale", "epoch", "skipped"):
        assert [r[key] for r in resumed] == [r[key] for r in full[10:]], key
    assert max(r["loss_scale"] for r in full) > 65536  # the scale grew (window 3) and was restored
    for name, value in params_of(net_a).items():
        assert np.array_equal(value, params_of(net_b)[name]), name
    # resume=True picks the newest state in the run's own directory; loss.csv keeps rows <= 20
    (state_a / "tiny_rank_0-24.ckpt").unlink()
    _, _, again = run(tmp_path, "a", resume=True, **kwargs)
    assert [r["loss"] for r in again] == [r["loss"] for r in full]


def test_overflow_skips_the_update_halves_the_scale_and_continues(tmp_path):
    # sample 12 is in batch 4 (batch size 4, data in order): its gradient is inf
    net, _, history = run(tmp_path, dataset=FakeDataset(bomb=[12]), epochs=1, save_checkpoint_steps=1,
                          keep_checkpoint_max=100)
    assert [r["skipped"] for r in history] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert [r["loss_scale"] for r in history] == [65536.0] * 4 + [32768.0] * 4
    directory = tmp_path / "out" / "checkpoint" / "rank_0"
    at = {s: read_checkpoint(str(directory / f"tiny_rank_0-{s}.ckpt")) for s in (2, 3, 4, 5)}
    for name in ("hidden.weight", "out.weight", "adam_m.out.weight", "adam_v.hidden.weight"):
        assert np.array_equal(at[3][name], at[4][name]), name  # step 4 was skipped
        assert not np.array_equal(at[4][name], at[5][name]), name  # step 5 trained again
    assert [int(at[s]["global_step"][0]) for s in (2, 3, 4, 5)] == [2, 3, 3, 4]
    assert np.isfinite(params_of(net)["out.weight"]).all()


def test_a_loss_that_stays_nan_stops_training_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingDivergedError) as error:
        run(tmp_path, dataset=FakeDataset(poison_from=12), epochs=2)
    message = str(error.value)
    assert isinstance(error.value, UserInputError)
    assert "step 6" in message and "not finite" in message and "loss.csv" in message
    with open(tmp_path / "out" / "loss.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == ["0", "0", "0", "1", "1", "1"]
    assert math.isnan(float(rows[-1]["loss"]))


def test_overflow_at_the_minimum_scale_stops(tmp_path):
    with pytest.raises(TrainingDivergedError, match="step 3 .*minimum"):
        run(tmp_path, dataset=FakeDataset(bomb=range(32)), loss_scale_value=1.0)


def test_gradient_clipping_matches_a_manual_adamw(tmp_path):
    """Two steps of AdamWeightDecay with clipped gradients, recomputed in numpy."""
    data = FakeDataset(n=8)
    net = TinyNet()
    start = params_of(net)
    run(tmp_path, net=net, dataset=data, epochs=1, use_clip_grad=True, max_grad_norm=0.05,
        weight_decay=0.1, beta2=0.95)

    def forward_grads(p, rows):
        x, y = data.x[rows], data.y[rows]
        h0 = x @ start["frozen.weight"].T + start["frozen.bias"]
        a = h0 @ p["hidden.weight"].T + p["hidden.bias"]
        t = np.tanh(a)
        pred = t @ p["out.weight"].T[:, 0] + p["out.bias"][0]
        dpred = 2 * (pred - y) / len(y)
        da = np.outer(dpred, p["out.weight"][0]) * (1 - t ** 2)
        return {"out.weight": dpred[None, :] @ t, "out.bias": np.array([dpred.sum()]),
                "hidden.weight": da.T @ h0, "hidden.bias": da.sum(0)}

    def manual(clip):
        p = {k: start[k].astype(np.float64) for k in ("hidden.weight", "hidden.bias", "out.weight", "out.bias")}
        m = {k: np.zeros_like(v) for k, v in p.items()}
        v2 = {k: np.zeros_like(v) for k, v in p.items()}
        for rows in (slice(0, 4), slice(4, 8)):
            g = forward_grads(p, rows)
            norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
            factor = clip / max(norm, clip) if clip else 1.0
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k] * factor
                v2[k] = 0.95 * v2[k] + 0.05 * (g[k] * factor) ** 2
                update = m[k] / (np.sqrt(v2[k]) + 1e-8)
                if p[k].ndim > 1:
                    update = update + 0.1 * p[k]
                p[k] = p[k] - 0.05 * update
        return p

    got = params_of(net)
    clipped, unclipped = manual(0.05), manual(None)
    for name in clipped:
        np.testing.assert_allclose(got[name], clipped[name], rtol=1e-4, atol=1e-6)
    assert max(np.abs(clipped[k] - unclipped[k]).max() for k in clipped) > 1e-3  # clipping mattered


# ------------------------------------------------------------------ files
def test_checkpoint_files_names_contents_and_pruning(tmp_path):
    net, _, _ = run(tmp_path, epochs=2, save_checkpoint_steps=3, keep_checkpoint_max=2)
    out = tmp_path / "out"
    trainable_dir = out / "checkpoint_trainable" / "rank_0"
    state_dir = out / "checkpoint" / "rank_0"
    # saved at 3, 6, 9, 12, 15 and the end (16); the newest 2 are kept
    assert sorted(os.listdir(trainable_dir)) == ["tiny_rank_0-15.ckpt", "tiny_rank_0-16.ckpt"]
    assert sorted(os.listdir(state_dir)) == ["tiny_rank_0-15.ckpt", "tiny_rank_0-16.ckpt"]
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    trainable = read_checkpoint(str(trainable_dir / "tiny_rank_0-16.ckpt"))
    assert set(trainable) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    for name, value in trainable.items():
        assert np.array_equal(value, params_of(net)[name])
    state = read_checkpoint(str(state_dir / "tiny_rank_0-16.ckpt"))
    assert {"adam_m.hidden.weight", "adam_v.out.bias", "global_step", "trainer.loss_scale",
            "trainer.good_steps", "trainer.epoch", "trainer.position"} <= set(state)
    assert "frozen.weight" not in state and int(state["trainer.step"][0]) == 16


def test_loss_csv_and_png(tmp_path):
    _, _, history = run(tmp_path, epochs=1)
    with open(tmp_path / "out" / "loss.csv", newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in history]
    assert all(float(r["loss_scale"]) == 65536.0 and r["skipped"] == "0" for r in rows)
    assert all(float(r["seconds"]) >= 0 and float(r["lr"]) == pytest.approx(0.05) for r in rows)
    with Image.open(tmp_path / "out" / "loss.png") as image:
        assert image.format == "PNG" and image.size == (800, 480)
        assert len(image.getcolors(1 << 16)) > 2  # more than a blank canvas


def test_rank_slices_partition_the_global_batch():
    order = np.arange(100, 124)
    world = [rank_batch_indices(order, 1, 3, ParallelContext(rank=r, world_size=2)) for r in (0, 1)]
    assert world[0].tolist() == [106, 107, 108] and world[1].tolist() == [109, 110, 111]


def test_arguments_from_the_visualglm_yaml():
    config = load_config(os.path.join(CONFIG_ROOT, "visualglm", "run_visualglm_lora.yaml"))
    args = TrainingArguments.from_yaml(config, batch_size=2)
    assert (args.epochs, args.batch_size, args.beta1, args.beta2, args.eps, args.weight_decay) == (
        1, 2, 0.9, 0.95, 1e-8, 0.01)
    assert (args.loss_scale_value, args.scale_factor, args.scale_window) == (65536.0, 2.0, 400)
    assert (args.use_clip_grad, args.max_grad_norm) == (True, 0.1)
    assert (args.prefix, args.save_checkpoint_steps, args.layer_scale) == ("visualglm", 1500, False)
    assert args.lr_schedule["type"] == "AnnealingLR" and args.lr_schedule["warmup_steps"] == 100
    config["optimizer"]["eps"] = "1e-8"  # YAML 1.1 reads this as a string
    with pytest.raises(UserInputError, match=r"run_visualglm_lora.yaml:\d+: optimizer.eps"):
        TrainingArguments.from_yaml(config)
