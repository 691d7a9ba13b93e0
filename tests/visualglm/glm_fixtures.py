"""A tiny GLM shared by the GLM tests: SAT reference weights converted into our model."""
import numpy as np

from research.common.checkpoint import load_params_into_net
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.convert_visualglm import convert_glm_state_dict
from research.visualglm.modeling_glm import GLMForConditionalGeneration

# Special ids placed like ice_text.model's, scaled down: [MASK] [gMASK] <sop> <eop>, pad 3.
TINY_GLM = dict(vocab_size=320, hidden_size=64, num_layers=3, num_heads=4, inner_hidden_size=256,
                seq_length=40, mask_token_id=300, gmask_token_id=301, bos_token_id=304,
                eos_token_id=305, pad_token_id=3)


def tiny_glm_config(**overrides):
    return GLMConfig(**{**TINY_GLM, **overrides})


def sat_state_dict(sat_model):
    return {k: v.detach().numpy() for k, v in sat_model.state_dict().items()}


def glm_from_state_dict(state_dict, config, layout="sat"):
    model = GLMForConditionalGeneration(config)
    load_params_into_net(model, convert_glm_state_dict(state_dict, config, layout))
    return model


def prompt(body, config):
    """Token ids of a GLM prompt: body + [gMASK] <sop>."""
    return list(body) + [config.gmask_token_id, config.bos_token_id]


def random_bodies(seed, lengths, low=10, high=290):
    rng = np.random.RandomState(seed)
    return [rng.randint(low, high, size=n).tolist() for n in lengths]
