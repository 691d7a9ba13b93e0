"""VisualGLM model: size of the 6B preset, image splicing, batched generation = one by one."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from research.common import qformer, vision
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.modeling_glm import glm_positions_and_mask
from research.visualglm.modeling_visualglm import (VisualGLMImageToTextGeneration,
                                                   count_parameters)

TINY = "run_visualglm_tiny_image_to_text_generation.yaml"


def test_6b_preset_has_7_8b_parameters():
    """DESIGN §4 / the VisualGLM README: 7.8B in all, GLM-6B 6.2B without its LM head."""
    config = load_visualglm_config("run_visualglm_6b_image_to_text_generation.yaml")[1]
    total = count_parameters(config)
    assert round(total / 1e9, 1) == 7.8
    text = config.text_config
    lm_head = text.vocab_size * text.hidden_size
    glm = total - vision.count_parameters(config.vision_config) \
        - qformer.count_parameters(config.qformer_config) - (768 + 1) * 4096
    assert round((glm - lm_head) / 1e9, 1) == 6.2
    assert config.image_length == 32 and config.vision_config.num_positions == 257


def random_tiny_model(seed=0, std=0.3):
    """The tiny preset with weights large enough that the image and the context matter."""
    config = load_visualglm_config(TINY)[1]
    model = VisualGLMImageToTextGeneration(config)
    model.set_train(False)
    rng = np.random.RandomState(seed)
    for param in model.get_parameters():
        if param.name.endswith(".gamma"):
            continue
        zero = param.name.endswith((".beta", ".bias"))
        value = np.zeros(param.shape) if zero else rng.normal(0, std, param.shape)
        param.set_data(Tensor(value.astype(np.float32)))
    return config, model


def tiny_prompt(config, before, after):
    """`before` ids, the 32 placeholders, `after` ids, [gMASK] <sop>; returns (ids, pre_image)."""
    text = config.text_config
    ids = list(before) + [text.pad_token_id] * config.image_length + list(after)
    return ids + [text.gmask_token_id, text.bos_token_id], len(before)


def test_construct_splices_the_image_like_generation(mode):
    """The in-graph splice (training forward) and the generation path give the same logits."""
    config, model = random_tiny_model()
    ids, pre_image = tiny_prompt(config, [20, 21, 22], [30, 31, 32, 33])
    pixels = np.random.RandomState(1).randn(1, 3, 56, 56).astype(np.float32)
    embeds = model.prompt_embeddings([ids], [pre_image], model.image_embeddings(pixels))
    array = np.array([ids], np.int32)
    positions, mask = glm_positions_and_mask(array, [0], config.text_config)
    image_mask = np.zeros_like(array)
    image_mask[0, pre_image:pre_image + config.image_length] = 1
    logits = model(Tensor(array), Tensor(positions), Tensor(mask), Tensor(pixels),
                   Tensor(image_mask)).asnumpy()
    expected, _, _ = model.llm_model(Tensor(array), Tensor(positions), Tensor(mask), Tensor(embeds))
    np.testing.assert_allclose(logits, expected.asnumpy(), rtol=1e-5, atol=1e-5)
    # and the image matters: another image changes the logits after it
    other = model(Tensor(array), Tensor(positions), Tensor(mask), Tensor(pixels[:, ::-1].copy()),
                  Tensor(image_mask)).asnumpy()
    assert np.abs(other[0, -1] - logits[0, -1]).max() > 1e-2


def test_batch_of_different_images_and_prompts_equals_one_by_one():
    ms.set_context(mode=ms.GRAPH_MODE)
    config, model = random_tiny_model(seed=2)
    pixels = np.random.RandomState(3).randn(3, 3, 56, 56).astype(np.float32)
    same_text, pre0 = tiny_prompt(config, [20, 21, 22], [30, 31, 32])
    short_text, pre1 = tiny_prompt(config, [25], [40])
    prompts, pre = [same_text, short_text, same_text], [pre0, pre1, pre0]
    settings = GenerationConfig(max_new_tokens=10, eos_token_id=9, pad_token_id=3,
                                valid_vocab_size=658)
    batched = model.generate(prompts, pre, pixels, settings)
    alone = [model.generate(prompts[i:i + 1], pre[i:i + 1], pixels[i:i + 1], settings)[0]
             for i in range(3)]
    assert batched == alone
    assert batched[0] != batched[2], "same prompt, different image: the answers must differ"
    settings.use_past = False
    assert model.generate(prompts, pre, pixels, settings) == batched


def test_bad_shapes_and_counts_are_clear_errors():
    config, model = random_tiny_model()
    ids, pre_image = tiny_prompt(config, [20], [30])
    with pytest.raises(UserInputError, match=r"\[batch, 3, 56, 56\]"):
        model.image_embeddings(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(UserInputError, match="2 images for 1 prompts"):
        model.generate([ids], [pre_image], np.zeros((2, 3, 56, 56), np.float32), GenerationConfig())
    with pytest.raises(UserInputError, match="image span"):
        model.prompt_embeddings([ids[:10]], [pre_image], np.zeros((1, 32, 64), np.float32))
