"""Tiny data-parallel training run used by tests/common/test_parallel_launch.py.

Launched N times by run_singlenode.sh (msrun on CPU), each rank trains a
fixed-initialised nn.Dense on its share of one fixed global batch of 8 and averages
gradients with research.common.parallel.gradient_reducer. Run once with
`--use_parallel False`, the same script trains on the whole batch in one process; the
two must end with the same weights. Each process saves `<out>/rank_<rank>.npy`.
"""
import argparse
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

from research.common.parallel import gradient_reducer, init_data_parallel  # noqa: E402

GLOBAL_BATCH = 8
IN_FEATURES, OUT_FEATURES = 4, 2
STEPS = 3
LEARNING_RATE = 0.1


def global_batch():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((GLOBAL_BATCH, IN_FEATURES)).astype(np.float32)
    y = rng.standard_normal((GLOBAL_BATCH, OUT_FEATURES)).astype(np.float32)
    return x, y


def build_net():
    rng = np.random.RandomState(1)
    weight = rng.standard_normal((OUT_FEATURES, IN_FEATURES)).astype(np.float32) * 0.5
    bias = rng.standard_normal((OUT_FEATURES,)).astype(np.float32) * 0.1
    return nn.Dense(IN_FEATURES, OUT_FEATURES, weight_init=Tensor(weight), bias_init=Tensor(bias))


class TrainStep(nn.Cell):
    """Forward, backward, gradient averaging over the ranks (if any), SGD update."""

    def __init__(self, net, optimizer, reducer):
        super().__init__()
        self.net_with_loss = nn.WithLossCell(net, nn.MSELoss())
        self.optimizer = optimizer
        self.reducer = reducer
        self.grad_fn = ms.value_and_grad(self.net_with_loss, None, optimizer.parameters)

    def construct(self, x, y):
        loss, grads = self.grad_fn(x, y)
        if self.reducer is not None:
            grads = self.reducer(grads)
        self.optimizer(grads)
        return loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for rank_<rank>.npy")
    parser.add_argument("--use_parallel", default="True", choices=["True", "False"])
    parser.add_argument("--data_parallel", type=int, default=2)
    parser.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    args = parser.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device("Ascend" if os.path.exists("/dev/davinci0") else "CPU")
    yaml_config = {
        "use_parallel": args.use_parallel == "True",
        "parallel": {"parallel_mode": 0},
        "parallel_config": {"data_parallel": args.data_parallel if args.use_parallel == "True" else 1,
                            "model_parallel": 1},
    }
    context = init_data_parallel(yaml_config)

    x, y = global_batch()
    per_rank = GLOBAL_BATCH // context.world_size
    start = context.rank * per_rank
    x_local = Tensor(x[start:start + per_rank])
    y_local = Tensor(y[start:start + per_rank])

    net = build_net()
    optimizer = nn.SGD(net.trainable_params(), learning_rate=LEARNING_RATE)
    step = TrainStep(net, optimizer, gradient_reducer(optimizer.parameters, context))
    for i in range(STEPS):
        loss = step(x_local, y_local)
        print(f"rank {context.rank}/{context.world_size} step {i} local loss {float(loss.asnumpy()):.6f}",
              flush=True)

    weights = np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, f"rank_{context.rank}.npy"), weights)
    print(f"rank {context.rank} saved {weights.size} weights", flush=True)


if __name__ == "__main__":
    main()
