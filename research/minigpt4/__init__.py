"""MiniGPT-4 on MindSpore. Importing the package registers its classes in MindFormers' registry:
`MiniGPT4Config`, `MiniGPT4`, `MiniGPT4Processor`, and its LLaMA under `Research`-prefixed names
(`ResearchLlamaConfig`, `ResearchLlamaForCausalLM`, `ResearchLlamaTokenizer`), so MindFormers' own
`LlamaConfig`, `LlamaForCausalLM` and `LlamaTokenizer` stay as they are."""
from research.minigpt4.configuration_minigpt4 import LlamaConfig, MiniGPT4Config
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM, MiniGPT4
from research.minigpt4.processing_minigpt4 import MiniGPT4Processor
from research.minigpt4.tokenization_minigpt4 import LlamaTokenizer

__all__ = ["LlamaConfig", "MiniGPT4Config", "LlamaForCausalLM", "MiniGPT4", "MiniGPT4Processor", "LlamaTokenizer"]
