"""ChatGLM2-6B on MindSpore. Importing the package registers its classes in MindFormers'
registry under `Research`-prefixed names (`ResearchChatGLM2Config`,
`ResearchChatGLM2ForConditionalGeneration`, `ResearchChatGLM2Tokenizer`), so MindFormers' own
`ChatGLM2Config`, `ChatGLM2ForConditionalGeneration` and `ChatGLM2Tokenizer` stay registered as
they are."""
from research.chatglm2.configuration_chatglm2 import REGISTRY_PREFIX, ChatGLM2Config
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from research.chatglm2.tokenization_chatglm2 import ChatGLM2Tokenizer

__all__ = ["REGISTRY_PREFIX", "ChatGLM2Config", "ChatGLM2ForConditionalGeneration", "ChatGLM2Tokenizer"]
