"""Shared pytest fixtures for the VisualGLM port."""
import mindspore as ms
import pytest

from research.common.testing import train_tiny_ice_text_model


@pytest.fixture(scope="session")
def tiny_ice_text_model(tmp_path_factory):
    """Path of a tiny ice_text.model-style sentencepiece model, built once per session."""
    return train_tiny_ice_text_model(str(tmp_path_factory.mktemp("tokenizer") / "ice_text.model"))


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run a test in MindSpore GRAPH and in PYNATIVE mode, restoring the mode afterwards."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)
