"""Autoregressive generation shared by the three models: prefill once, then one token a step.

Static shapes throughout, so GRAPH mode compiles few graphs and reuses them: a batch of
prompts is left-padded to a common length, rounded up to a power of two
(research.common.kv_cache.bucket_length; padding is masked, so answers do not change), and the
KV cache has a fixed number of slots. Positions and the attention mask of the whole sequence
are computed once (the model's `generation_inputs`); each step slices its columns out of them.

`generate` drives any `CausalLM`: a decoder Cell (through research.common.kv_cache.
InGraphCausalLM), exported MindIR graphs (research.common.lite), or a wrapper recording logits
(benchmarks). Every array crossing the interface is numpy.
"""
import dataclasses
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from research.common.errors import UserInputError
from research.common.kv_cache import bucket_length
from research.common.sampling import (Argmax, SamplingRule, check_sampling_settings, choose_next_tokens,
                                      history_free_argmax)


@runtime_checkable
class CausalLM(Protocol):
    """What `generate` needs from a model.

    Position ids have whatever leading shape the model uses ([B,2,L] for GLM-6B's 2D positions,
    [B,L] for ChatGLM2 and LLaMA); `generate` only slices their last axis.
    """

    @property
    def seq_length(self) -> int:
        """The longest sequence (prompt + new tokens) the model runs."""

    def generation_inputs(self, input_ids: np.ndarray, pad_lengths: Sequence[int]):
        """(position_ids [..., L], attention_mask [B,1,L,L]) for left-padded ids [B,L]."""

    def token_embeddings(self, input_ids: np.ndarray) -> np.ndarray:
        """Input embeddings [B,L,H] of ids [B,L] (to splice `prompt_embeds` into)."""

    def start_cache(self, batch_size: int, min_length: int) -> int:
        """Make a KV cache of at least `min_length` slots ready; returns its length T."""

    def prefill(self, *, input_ids, position_ids, attention_mask, logits_index,
                inputs_embeds=None, argmax: Optional[Argmax] = None) -> np.ndarray:
        """Write the prompt [B,P] at cache slots 0..P-1 (mask [B,1,P,T]); logits [B,V] at
        logits_index [B], or with `argmax` the ids [B] it chooses from them (greedy decoding:
        taken where the logits are, so they need not be copied to the host)."""

    def decode(self, *, input_ids, position_ids, attention_mask, cache_index: int,
               argmax: Optional[Argmax] = None) -> np.ndarray:
        """One token per row [B,1] written at slot `cache_index` (mask [B,1,1,T]); logits [B,V],
        or the ids [B] `argmax` chooses."""

    def forward(self, *, input_ids, position_ids, attention_mask, logits_index,
                inputs_embeds=None) -> np.ndarray:
        """The whole sequence without a cache (use_past False); logits [B,V] at logits_index [B]."""


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
    # Whose sampling to reproduce (research.common.sampling): "sat" is SwissArmyTransformer's
    # BaseStrategy (upstream VisualGLM), "hf" transformers' logits processors (ChatGLM2, MiniGPT-4).
    sampling_rule: SamplingRule = "hf"

    @classmethod
    def from_model_config(cls, config, tokenizer, **overrides):
        """Decoding defaults of a model config (its YAML's max_decode_length, do_sample, top_k,
        top_p, temperature, repetition_penalty, use_past and the model's sampling_rule), the
        special ids of its tokenizer, then the overrides that are not None."""
        settings = cls(max_length=config.max_decode_length, do_sample=config.do_sample,
                       top_k=config.top_k, top_p=config.top_p, temperature=config.temperature,
                       repetition_penalty=config.repetition_penalty, use_past=config.use_past,
                       sampling_rule=config.sampling_rule, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, valid_vocab_size=tokenizer.vocab_size)
        return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self):
        if self.temperature <= 0:
            raise UserInputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserInputError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check_sampling_settings(self)
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserInputError(f"{name} must be positive, got {value}")



def plan_lengths(prompts, config: GenerationConfig, seq_length):
    """(prompt_slots, limit): the left-padded prompt length (a power of two when it leaves room
    for the new tokens) and the position after the last new token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserInputError("every prompt needs at least one token")
    prompt_length = max(len(p) for p in prompts)
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
    new_tokens = limit - prompt_length
    prompt_slots = max(prompt_length, bucket_length(prompt_length, seq_length - new_tokens))
    return prompt_slots, prompt_slots + new_tokens


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             prompt_embeds: Optional[np.ndarray] = None,
             on_tokens: Optional[Callable[[list], None]] = None):
    """Generate for a batch of token-id prompts; returns the new ids of each row.

    `prompt_embeds` [B,P,H] replaces the prompt's token embeddings (VisualGLM's image
    tokens); rows are aligned with the left-padded prompts. `on_tokens` is called after each
    step with the new token of every row (None for rows that have already stopped).
    Each row stops at eos or a stop id (kept in its output), or at the length limit.
    """
    config.validate()
    prompt_slots, limit = plan_lengths(prompts, config, model.seq_length)
    batch = len(prompts)
    length = model.start_cache(batch, limit) if config.use_past else model.seq_length
    ids = np.full((batch, length), config.pad_token_id, np.int32)
    pad_lengths = [prompt_slots - len(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        ids[row, pad_lengths[row]:prompt_slots] = prompt
    position_ids, mask = model.generation_inputs(ids, pad_lengths)

    def embeddings(width):
        """Token embeddings of ids[:, :width] with `prompt_embeds` over the prompt (or None)."""
        if prompt_embeds is None:
            return None
        embeds = model.token_embeddings(ids[:, :width])
        embeds[:, prompt_slots - prompt_embeds.shape[1]:prompt_slots] = prompt_embeds
        return embeds

    prompt_ids = [np.asarray(p, np.int32) for p in prompts]
    rng = np.random.RandomState(config.seed)
    # Greedy without a penalty: the model takes the argmax (in the graph), so a step copies B
    # ids to the host, not B x V logits, and builds no history.
    argmax = history_free_argmax(config)

    def choose(logits, step):
        generated = [ids[row, prompt_slots:step + 1] for row in range(batch)]
        return choose_next_tokens(logits, prompt_ids, generated, config, rng)

    def tokens_after(step):
        """The tokens [B] at position step + 1, the tokens up to `step` being in ids."""
        last = np.full((batch,), step, np.int32)
        if not config.use_past:
            logits = model.forward(input_ids=ids, position_ids=position_ids, attention_mask=mask,
                                   logits_index=last, inputs_embeds=embeddings(length))
            return choose(logits, step) if argmax is None else argmax.of(logits)
        if step == prompt_slots - 1:
            scores = model.prefill(input_ids=ids[:, :prompt_slots], position_ids=position_ids[..., :prompt_slots],
                                   attention_mask=mask[..., :prompt_slots, :], logits_index=last,
                                   inputs_embeds=embeddings(prompt_slots), argmax=argmax)
        else:
            scores = model.decode(input_ids=ids[:, step:step + 1], position_ids=position_ids[..., step:step + 1],
                                  attention_mask=mask[..., step:step + 1, :], cache_index=step, argmax=argmax)
        return choose(scores, step) if argmax is None else scores

    stop_ids = list(config.stop_token_ids) + ([] if config.eos_token_id is None else [config.eos_token_id])
    finished = np.zeros(batch, bool)
    outputs = [[] for _ in range(batch)]
    chosen = tokens_after(prompt_slots - 1)
    for step in range(prompt_slots, limit):
        chosen = np.where(finished, config.pad_token_id, chosen).astype(np.int32)
        ids[:, step] = chosen
        for row in np.flatnonzero(~finished):
            outputs[row].append(int(chosen[row]))
        if on_tokens is not None:
            on_tokens([None if done else int(tok) for tok, done in zip(chosen, finished)])
        finished |= np.isin(chosen, stop_ids)
        if finished.all() or step + 1 == limit:
            break
        chosen = tokens_after(step)
    return outputs

