"""MiniGPT-4 on MindSpore. So far: its Vicuna (LLaMA) decoder (config presets, the model, the
conversion of Hugging Face LLaMA weights), the LLaMA tokenizer and upstream's conversation
templates with per-row stopping. Nothing is registered in MindFormers' registry yet."""
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LlamaTokenizer"]
