"""Putting image embeddings where a prompt's placeholders are: VisualGLM's 32 tokens between
<img> and </img>, MiniGPT-4's 32 (or 64) at <ImageHere>.

`splice_image_embeddings` works in the graph (training: a mask marks the placeholders);
`splice_prompt_embeddings` in numpy for generation (left-padded prompts, each with one image
span starting at a known index).
"""
import numpy as np
import mindspore as ms
from mindspore import ops

from research.common.errors import UserInputError


def splice_image_embeddings(text_embeds, image_embeds, image_mask):
    """text_embeds [B,S,H] with the positions where image_mask [B,S] is set replaced, in order,
    by image_embeds [B,N,H] (each row has exactly N such positions)."""
    batch, length, hidden = text_embeds.shape
    order = ops.cumsum(image_mask.astype(ms.int32), axis=1) - 1
    order = ops.clip(order, 0, image_embeds.shape[1] - 1)
    gathered = ops.gather_elements(
        image_embeds.astype(text_embeds.dtype), 1,
        ops.broadcast_to(order.reshape(batch, length, 1), (batch, length, hidden)))
    keep_image = ops.broadcast_to(image_mask.reshape(batch, length, 1) > 0, (batch, length, hidden))
    return ops.select(keep_image, gathered, text_embeds)


def splice_prompt_embeddings(prompts, pre_image_lengths, image_embeds, embed_tokens, pad_token_id):
    """numpy [B,P,H]: the prompts left-padded to the longest, embedded with `embed_tokens`
    (ids [B,P] -> [B,P,H]), and each row's image embeddings [N,H] written over its N
    placeholders, which start at pre_image_lengths[row] in the unpadded prompt."""
    batch, prompt_length = len(prompts), max(len(p) for p in prompts)
    image_length = image_embeds.shape[1]
    ids = np.full((batch, prompt_length), pad_token_id, np.int32)
    image_mask = np.zeros((batch, prompt_length), bool)
    for row, (prompt, pre_image) in enumerate(zip(prompts, pre_image_lengths)):
        pad = prompt_length - len(prompt)
        if pre_image + image_length > len(prompt):
            raise UserInputError(
                f"prompt {row} has {len(prompt)} ids; the image span "
                f"{pre_image}..{pre_image + image_length} does not fit in it")
        ids[row, pad:] = prompt
        image_mask[row, pad + pre_image:pad + pre_image + image_length] = True
    embeds = np.array(embed_tokens(ids))
    embeds[image_mask] = image_embeds.reshape(-1, image_embeds.shape[-1]).astype(embeds.dtype)
    return embeds
