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
from typing import Callable, Iterator, List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from research.common.errors import UserInputError
from research.common.kv_cache import bucket_length
from research.common.sampling import (Argmax, SamplingRule, check_sampling_settings, choose_next_tokens,
                                      guard_invalid_scores, history_free_argmax)

# ends_in_loop: a block repeated this many times in a row is a loop.
LOOP_REPEATS = 3


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
                inputs_embeds=None, argmax: Optional[Argmax] = None, cache_index: int = 0) -> np.ndarray:
        """Write the prompt [B,P] at cache slots cache_index..cache_index+P-1 (mask [B,1,P,T]);
        logits [B,V] at logits_index [B] (an index into the P tokens), or with `argmax` the ids
        [B] it chooses from them (greedy decoding: taken where the logits are, so they need not
        be copied to the host). A cache_index > 0 continues a `Conversation`."""

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
    # Id sequences that end a row (kept in its output), each row on its own: MiniGPT-4's "###"
    # is [835] or [2277, 29937]. eos_token_id ends a row as well.
    stop_sequences: Sequence[Sequence[int]] = ()
    # Ids >= this are never chosen: the embedding table is padded past the tokenizer's
    # vocabulary (GLM-6B: 130528 rows, ice_text.model fewer pieces).
    valid_vocab_size: Optional[int] = None
    use_past: bool = True
    seed: int = 0
    # Upstream ChatGLM's InvalidScoreLogitsProcessor (chat/stream_chat): a row whose logits hold
    # a NaN or Inf gets token 5 instead of garbage.
    invalid_score_guard: bool = False
    # Stop a row whose new tokens end with a block of up to this many tokens three times in a row
    # (an n-gram loop guard; 0: off).
    repetition_stop: int = 0
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
        if self.repetition_stop < 0:
            raise UserInputError(f"repetition_stop must be >= 0, got {self.repetition_stop}")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserInputError(f"{name} must be positive, got {value}")
        if any(len(sequence) == 0 for sequence in self.stop_sequences):
            raise UserInputError(f"stop_sequences must be non-empty id lists, got {self.stop_sequences}")


def in_batches(items, batch_size):
    """`items` in consecutive chunks of `batch_size` (the last may be shorter)."""
    if batch_size <= 0:
        raise UserInputError(f"batch_size must be positive, got {batch_size}")
    return [items[first:first + batch_size] for first in range(0, len(items), batch_size)]


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
    Each row stops at eos or a stop sequence (kept in its output), at a loop when
    `config.repetition_stop` asks, or at the length limit.
    """
    outputs = [[] for _ in prompts]
    for step_tokens in generate_steps(model, prompts, config, prompt_embeds):
        for row, token in enumerate(step_tokens):
            if token is not None:
                outputs[row].append(token)
        if on_tokens is not None:
            on_tokens(step_tokens)
    return outputs


def generate_steps(model: CausalLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                   prompt_embeds: Optional[np.ndarray] = None) -> Iterator[List[Optional[int]]]:
    """generate() one step at a time: yields the new token of every row after each step (None
    for rows that have already stopped), so a caller can stream and stop early."""
    config.validate()
    prompt_slots, limit = plan_lengths(prompts, config, model.seq_length)
    batch = len(prompts)
    length = model.start_cache(batch, limit) if config.use_past else model.seq_length
    ids = np.full((batch, length), config.pad_token_id, np.int32)
    pad_lengths = [prompt_slots - len(p) for p in prompts]
    for row, prompt in enumerate(prompts):
        ids[row, pad_lengths[row]:prompt_slots] = prompt
    position_ids, mask = model.generation_inputs(ids, pad_lengths)
    prompt_ids = [np.asarray(p, np.int32) for p in prompts]
    yield from _decode_steps(model, ids, position_ids, mask, prompt_ids, config, _Prefill(0, prompt_slots, prompt_slots),
                             limit, prompt_embeds)


@dataclasses.dataclass(frozen=True)
class _Prefill:
    """The first forward of a generation: slots start..start+width-1 (width >= end - start; the
    slots from `end` on are padding that the decode steps overwrite before anything attends to
    them), the prompt ending at slot end - 1."""

    start: int
    end: int
    width: int


def _decode_steps(model: CausalLM, ids, position_ids, mask, prompt_ids, config: GenerationConfig,
                  prefill: _Prefill, limit, prompt_embeds=None):
    """The generation loop over laid-out rows `ids` [B,T] (the prompt ends at prefill.end):
    yields each step's new tokens and writes them into `ids`."""
    batch, length = ids.shape
    prompt_end = prefill.end

    def embeddings(first, width):
        """Token embeddings of ids[:, first:first+width] with `prompt_embeds` over the prompt (or None)."""
        if prompt_embeds is None:
            return None
        embeds = model.token_embeddings(ids[:, first:first + width])
        embeds[:, prompt_end - first - prompt_embeds.shape[1]:prompt_end - first] = prompt_embeds
        return embeds

    rng = np.random.RandomState(config.seed)
    # Greedy without a penalty (and without upstream ChatGLM's NaN/Inf guard, which needs the
    # logits): the model takes the argmax (in the graph), so a step copies B ids to the host,
    # not B x V logits, and builds no history.
    argmax = None if config.invalid_score_guard else history_free_argmax(config)

    def choose(logits, step):
        if config.invalid_score_guard:
            logits = guard_invalid_scores(logits)
        generated = [ids[row, prompt_end:step + 1] for row in range(batch)]
        return choose_next_tokens(logits, prompt_ids, generated, config, rng)

    def tokens_after(step):
        """The tokens [B] at position step + 1, the tokens up to `step` being in ids."""
        if not config.use_past:
            logits = model.forward(input_ids=ids, position_ids=position_ids, attention_mask=mask,
                                   logits_index=np.full((batch,), step, np.int32),
                                   inputs_embeds=embeddings(0, length))
            return choose(logits, step) if argmax is None else argmax.of(logits)
        if step == prompt_end - 1:
            window = slice(prefill.start, prefill.start + prefill.width)
            scores = model.prefill(input_ids=ids[:, window], position_ids=position_ids[..., window],
                                   attention_mask=mask[..., window, :],
                                   logits_index=np.full((batch,), step - prefill.start, np.int32),
                                   inputs_embeds=embeddings(prefill.start, prefill.width), argmax=argmax,
                                   cache_index=prefill.start)
        else:
            scores = model.decode(input_ids=ids[:, step:step + 1], position_ids=position_ids[..., step:step + 1],
                                  attention_mask=mask[..., step:step + 1, :], cache_index=step, argmax=argmax)
        return choose(scores, step) if argmax is None else scores

    stop_sequences = [tuple(sequence) for sequence in config.stop_sequences]
    if config.eos_token_id is not None:
        stop_sequences.append((config.eos_token_id,))
    finished = np.zeros(batch, bool)
    chosen = tokens_after(prompt_end - 1)
    for step in range(prompt_end, limit):
        chosen = np.where(finished, config.pad_token_id, chosen).astype(np.int32)
        ids[:, step] = chosen
        yield [None if done else int(tok) for tok, done in zip(chosen, finished)]
        finished |= [ends_with_any(ids[row, prompt_end:step + 1], stop_sequences) for row in range(batch)]
        if config.repetition_stop:
            finished |= [ends_in_loop(ids[row, prompt_end:step + 1], config.repetition_stop)
                         for row in range(batch)]
        if finished.all() or step + 1 == limit:
            break
        chosen = tokens_after(step)


def ends_with_any(tokens, sequences):
    """Whether the id list `tokens` ends with one of the id `sequences`."""
    tokens = [int(token) for token in tokens]
    return any(len(tokens) >= len(seq) and tuple(tokens[len(tokens) - len(seq):]) == tuple(seq)
               for seq in sequences)


def ends_in_loop(tokens, max_block, repeats=LOOP_REPEATS):
    """Whether `tokens` end with a block of 1..max_block tokens repeated `repeats` times in a
    row (the n-gram loop a model can fall into and never leave)."""
    tokens = np.asarray(tokens)
    for block in range(1, max_block + 1):
        tail = tokens[len(tokens) - block * repeats:]
        if len(tail) == block * repeats and (tail.reshape(repeats, block) == tail[-block:]).all():
            return True
    return False


class Conversation:
    """One conversation continued on a decoder's KV cache from call to call, as upstream
    ChatGLM2's stream_chat reuses past_key_values: each `reply` prefills only the tokens the
    cache does not hold yet, after the conversation so far.

    Positions run from 0 at slot 0, so for a causal decoder (ChatGLM2, LLaMA) the tokens equal
    generating on `tokens + new_ids` from scratch. The cache is the model's in-graph one, with
    all seq_length slots; if another generate() on the model replaced it meanwhile, the next
    reply re-encodes the whole conversation (same tokens, more work).
    """

    def __init__(self, model: CausalLM, pad_token_id=0):
        self.model = model
        self.length = model.seq_length
        self.ids = np.full((1, self.length), pad_token_id, np.int32)
        self.end = 0  # ids[0, :end] is the conversation
        self.filled = 0  # slots 0..filled-1 hold its keys/values
        self._cache = None  # the model's cache object these slots are in

    @property
    def tokens(self) -> List[int]:
        return self.ids[0, :self.end].tolist()

    def reply_steps(self, new_ids: Sequence[int], config: GenerationConfig) -> Iterator[Optional[int]]:
        """Append `new_ids` and generate after them (use_past is implied): yields each new token.
        The conversation grows by the new ids and the answer (its stop token included)."""
        config.validate()
        new_ids = list(new_ids)
        if not new_ids:
            raise UserInputError("a reply needs at least one new token")
        prompt_end = self.end + len(new_ids)
        limit = self.length if config.max_length is None else min(self.length, config.max_length)
        if config.max_new_tokens is not None:
            limit = min(limit, prompt_end + config.max_new_tokens)
        if prompt_end >= limit:
            raise UserInputError(f"the conversation would be {prompt_end} tokens, which leaves no room for an "
                                 f"answer within {limit} (seq_length {self.length}); start a new one")
        self.model.start_cache(1, self.length)
        cache = getattr(self.model, "cached_decoder", None)
        if cache is None or cache is not self._cache:
            self.filled, self._cache = 0, cache  # a new cache: encode everything again
        self.ids[0, self.end:prompt_end] = new_ids
        position_ids, mask = self.model.generation_inputs(self.ids, [0])
        width = bucket_length(prompt_end - self.filled, self.length - self.filled)
        steps = _decode_steps(self.model, self.ids, position_ids, mask, [self.ids[0, :prompt_end].copy()],
                              dataclasses.replace(config, use_past=True),
                              _Prefill(self.filled, prompt_end, width), limit)
        for end, (token,) in enumerate(steps, prompt_end):
            # the slots before this token are in the cache now; the token itself only once the
            # next step has run, which a stopped or interrupted reply never does. A reply
            # interrupted before its first token leaves the conversation as it was.
            self.filled, self.end = end, end + 1
            yield token
