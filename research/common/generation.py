"""Autoregressive generation shared by the three models: prefill once, then one token a step.

Static shapes throughout, so GRAPH mode compiles few graphs and reuses them: a batch of
prompts is left-padded to a common length, rounded up to a power of two (padding is masked,
so answers do not change), and the KV cache has a fixed number of slots. Positions and the
attention mask of the whole sequence are computed once (a model's `generation_inputs`);
each step slices its rows out of them.

A model used here provides:
- `config.seq_length`
- `generation_inputs(input_ids [B,L] np.int32, pad_lengths) -> (position_ids, attention_mask)`
  as numpy arrays whose last axis (position) / last two axes (mask) have length L
- `embed_tokens(input_ids Tensor) -> Tensor [B,L,H]` (for `prompt_embeds`)
- `cached_forward(batch_size, min_length)` -> a callable with a KV cache of `.length`
  (>= min_length) slots: `(input_ids [B,S], position_ids [B,2,S], attention_mask
  [B,1,S,length], inputs_embeds, cache_index, logits_index) -> logits [B,V]`; it writes the
  S tokens at slots cache_index.. and returns the logits at `logits_index` [B] (or of the one
  token when decoding)
- `__call__(input_ids, position_ids, attention_mask, inputs_embeds, None, None, None,
  logits_index) -> (logits [B,V], ...)`: a full forward without cache (`use_past=False`).
"""
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor

from research.common.errors import UserInputError


@dataclasses.dataclass
class GenerationConfig:
    """Decoding settings; the names follow Hugging Face / MindFormers `generate`."""

    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None  # prompt + new tokens, as upstream's max_length
    do_sample: bool = False
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    stop_token_ids: Sequence[int] = ()
    # Ids >= this are never chosen: the embedding table is padded past the tokenizer's
    # vocabulary (GLM-6B: 130528 rows, ice_text.model fewer pieces).
    valid_vocab_size: Optional[int] = None
    use_past: bool = True
    seed: int = 0

    def validate(self):
        if self.temperature <= 0:
            raise UserInputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserInputError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserInputError(f"{name} must be positive, got {value}")


def apply_repetition_penalty(logits, histories, penalty):
    """CTRL-style penalty (as HF): scores of tokens already present are divided by it if
    positive and multiplied by it if negative."""
    for row, history in enumerate(histories):
        seen = np.unique(history)
        scores = logits[row, seen]
        logits[row, seen] = np.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def filter_top_k_top_p(logits, top_k, top_p):
    """Set logits outside the top-k / nucleus top-p set to -inf (at least one token stays)."""
    logits = logits.copy()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = _softmax(sorted_logits)
        cumulative = np.cumsum(probs, axis=-1)
        remove = cumulative > top_p
        remove[:, 1:] = remove[:, :-1].copy()  # keep the token that crosses top_p
        remove[:, 0] = False
        sorted_logits[remove] = -np.inf
        np.put_along_axis(logits, order, sorted_logits, axis=-1)
    return logits


def _softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def choose_next_tokens(logits, histories, config: GenerationConfig, rng):
    """Next token per row from logits [B,V] (float32 numpy)."""
    logits = np.array(logits, dtype=np.float32)
    if config.valid_vocab_size is not None:
        logits[:, config.valid_vocab_size:] = -np.inf
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, histories, config.repetition_penalty)
    if not config.do_sample:
        return np.argmax(logits, axis=-1)
    logits = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    probs = _softmax(logits)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(model, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             prompt_embeds: Optional[np.ndarray] = None,
             on_tokens: Optional[Callable[[list], None]] = None):
    """Generate for a batch of token-id prompts; returns the new ids of each row.

    `prompt_embeds` [B,P,H] replaces the prompt's token embeddings (VisualGLM's image
    tokens); rows are aligned with the left-padded prompts. `on_tokens` is called after each
    step with the new token of every row (None for rows that have already stopped).
    Each row stops at eos or a stop id (kept in its output), or at the length limit.
    """
    config.validate()
    seq_length = model.config.seq_length
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserInputError("every prompt needs at least one token")
    batch, prompt_length = len(prompts), max(len(p) for p in prompts)
    if prompt_length >= seq_length:
        raise UserInputError(
            f"the prompt has {prompt_length} tokens but seq_length is {seq_length}: it must be "
            f"shorter than seq_length to leave room for new tokens (raise --seq_length or "
            f"shorten the prompt)")
    limit = seq_length
    if config.max_length is not None:
        limit = min(limit, config.max_length)
    if config.max_new_tokens is not None:
        limit = min(limit, prompt_length + config.max_new_tokens)
    if limit <= prompt_length:
        raise UserInputError(
            f"max_length {config.max_length} leaves no room after a {prompt_length}-token prompt")

    # Left-pad to a power of two (a graph per bucket, not per prompt length) when it fits.
    new_tokens = limit - prompt_length
    prompt_slots = max(prompt_length, min(next_power_of_two(prompt_length), seq_length - new_tokens))
    limit += prompt_slots - prompt_length
    ids = np.full((batch, seq_length), config.pad_token_id, np.int32)
    pad_lengths = [prompt_slots - len(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        ids[row, pad_lengths[row]:prompt_slots] = prompt
    stop_ids = set(config.stop_token_ids)
    if config.eos_token_id is not None:
        stop_ids.add(config.eos_token_id)

    def prompt_inputs(length):
        embeds = None
        if prompt_embeds is not None:
            embeds = model.embed_tokens(Tensor(ids[:, :length])).asnumpy()
            embeds[:, prompt_slots - prompt_length:prompt_slots] = prompt_embeds
            embeds = Tensor(embeds)
        return Tensor(ids[:, :length]), embeds

    if config.use_past:
        forward = model.cached_forward(batch, limit)
        position_ids, mask = model.generation_inputs(ids[:, :forward.length], pad_lengths)
        input_ids, embeds = prompt_inputs(prompt_slots)
        logits = forward(input_ids, Tensor(position_ids[..., :prompt_slots]),
                         Tensor(mask[..., :prompt_slots, :]), embeds, Tensor(0, ms.int32),
                         Tensor(np.full((batch,), prompt_slots - 1, np.int32)))
    else:
        position_ids, mask = model.generation_inputs(ids, pad_lengths)

    def full_forward(step_index):
        input_ids, embeds = prompt_inputs(seq_length)
        index = Tensor(np.full((batch,), step_index, np.int32))
        return model(input_ids, Tensor(position_ids), Tensor(mask), embeds, None, None, None, index)[0]

    if not config.use_past:
        logits = full_forward(prompt_slots - 1)
    rng = np.random.RandomState(config.seed)
    finished = np.zeros(batch, bool)
    outputs = [[] for _ in range(batch)]
    for step in range(prompt_slots, limit):
        histories = [ids[row, pad_lengths[row]:step] for row in range(batch)]
        chosen = choose_next_tokens(logits.asnumpy(), histories, config, rng)
        chosen = np.where(finished, config.pad_token_id, chosen).astype(np.int32)
        ids[:, step] = chosen
        for row in range(batch):
            if not finished[row]:
                outputs[row].append(int(chosen[row]))
        if on_tokens is not None:
            on_tokens([None if done else int(tok) for tok, done in zip(chosen, finished)])
        finished |= np.isin(chosen, list(stop_ids))
        if finished.all() or step + 1 == limit:
            break
        if config.use_past:
            logits = forward(Tensor(ids[:, step:step + 1]), Tensor(position_ids[..., step:step + 1]),
                             Tensor(mask[..., step:step + 1, :]), None, Tensor(step, ms.int32), None)
        else:
            logits = full_forward(step)
    return outputs


def next_power_of_two(n):
    return 1 << max(0, int(n) - 1).bit_length()
