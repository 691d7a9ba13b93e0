"""Torch files are read as weights only (issue #12): a pickle that would run code when opened is
refused with a message that says so, and the code does not run."""
import pytest
import torch

from research.common.errors import UserInputError
from research.common.torch_checkpoint import Shard, SourceFormat

SAT_LIKE = SourceFormat(file_names=("mp_rank_00_model_states.pt",), expected="tensors under 'module'",
                        wrapper_keys=("module",))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "the_code_ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": RunsCode(str(marker))}, path)
    with pytest.raises(UserInputError) as caught:
        Shard(str(path), SAT_LIKE).shapes()
    message = str(caught.value)
    assert "loading it would call or build posix.mkdir" in message and "runs code" in message
    assert "weights_only=False" not in message  # torch's advice to turn the protection off
    assert not marker.exists()
