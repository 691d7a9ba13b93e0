"""VisualGLM-6B on MindSpore. Importing the package registers its classes in MindFormers'
registry (configs, models, tokenizer, processors, pipeline), so a YAML's `type:` names resolve."""
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import VisualGLMConfig
from research.visualglm.inference import VisualGLMImageToTextGenerationPipeline, load_glm, load_visualglm
from research.visualglm.modeling_glm import GLMForConditionalGeneration
from research.visualglm.modeling_visualglm import VisualGLMImageToTextGeneration, VisualGLMModel
from research.visualglm.processing_visualglm import VisualGLMProcessor
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer

__all__ = ["ChatGLMTokenizer", "GLMConfig", "GLMForConditionalGeneration", "VisualGLMConfig",
           "VisualGLMImageToTextGeneration", "VisualGLMImageToTextGenerationPipeline", "VisualGLMModel",
           "VisualGLMProcessor", "load_glm", "load_visualglm"]
