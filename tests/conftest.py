"""Shared pytest fixtures for the VisualGLM port."""
import pytest

from research.visualglm.tiny_tokenizer import train_tiny_ice_text_model


@pytest.fixture(scope="session")
def tiny_ice_text_model(tmp_path_factory):
    """Path of a tiny ice_text.model-style sentencepiece model, built once per session."""
    return train_tiny_ice_text_model(str(tmp_path_factory.mktemp("tokenizer") / "ice_text.model"))
