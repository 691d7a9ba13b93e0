"""SkinnyDense: the decode-friendly operand order must not change what a Dense computes; StepDropout:
masks that a resumed run draws again."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from research.common.layers import SkinnyDense


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 16, 17])
def test_skinny_dense_equals_dense(rows):
    ms.set_context(mode=ms.GRAPH_MODE)
    skinny, dense = SkinnyDense(48, 80), nn.Dense(48, 80)
    dense.weight.set_data(skinny.weight.data)
    dense.bias.set_data(Tensor(np.random.RandomState(1).randn(80).astype(np.float32)))
    skinny.bias.set_data(dense.bias.data)
    x = Tensor(np.random.RandomState(rows).randn(1, rows, 48).astype(np.float32))
    got, expected = skinny(x).asnumpy(), dense(x).asnumpy()
    assert got.shape == (1, rows, 80)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert skinny.weight_first  # this machine is a CPU: 4..16 rows take the other order


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_step_dropout_masks_follow_the_step_and_the_cell(mode):
    """The masks are a function of (the cell's key, the step, the element): the same step gives
    the same mask again (a resumed run), another step or another cell an independent one; the
    keep rate is 1 - p and kept values are scaled by 1 / (1 - p); inference passes x through."""
    from research.common.layers import DROPOUT_STEP, StepDropout, set_dropout_keys

    ms.set_context(mode=mode)

    class Two(nn.Cell):
        def __init__(self):
            super().__init__()
            self.first, self.second = StepDropout(0.25), StepDropout(0.25)

        def construct(self, x):
            return self.first(x), self.second(x)

    net = Two()
    set_dropout_keys(net, seed=0)
    assert net.first.key != net.second.key
    net.set_train(True)
    x = ms.Tensor(np.ones((64, 128), np.float32))

    def masks(step):
        DROPOUT_STEP.set_data(ms.Tensor(np.int32(step)))
        return [out.asnumpy() for out in net(x)]

    first, second = masks(3)
    later, _ = masks(4)
    again, _ = masks(3)
    assert np.array_equal(first, again)
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
    assert abs((first > 0).mean() - 0.75) < 0.01
    for other in (second, later):  # independent masks disagree on 2 * 0.75 * 0.25 of the elements
        assert abs(((first > 0) != (other > 0)).mean() - 0.375) < 0.02
    net.set_train(False)
    assert np.array_equal(net(x)[0].asnumpy(), x.asnumpy())
    ms.set_context(mode=ms.GRAPH_MODE)
