"""MiniGPT-4 on MindSpore. So far its Vicuna (LLaMA) decoder: config presets, the model and the
conversion of Hugging Face LLaMA weights. Nothing is registered in MindFormers' registry yet."""
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
