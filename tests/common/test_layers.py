"""SkinnyDense: the decode-friendly operand order must not change what a Dense computes."""
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
