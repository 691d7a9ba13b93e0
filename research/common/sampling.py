"""The next token from a step's logits, under the sampling rule of a model's upstream code.

The two rules give different answers from the same logits, so each model uses its upstream's
(`sampling_rule` of the generation config). Ties at the top-p boundary go to the lower id
(upstream's torch.sort leaves their order undefined).

"hf": Hugging Face `generate` (ChatGLM2-6B and MiniGPT-4 sample with it). Ids >=
`valid_vocab_size` are set to -inf; the repetition penalty covers prompt and generated ids, a
seen id's logit divided by it when positive and multiplied by it when negative
(`RepetitionPenaltyLogitsProcessor`); then temperature, top-k (ties kept), top-p, filter
value -inf. Greedy: the argmax after the penalty. top_k 0 with top_p < 1 sorts the whole
vocabulary (~40 ms at 130528 ids); with top_k > 0 only the kept ids are sorted.

"sat": SwissArmyTransformer's `BaseStrategy`. VisualGLM-6B's model/chat.py builds
`BaseStrategy(temperature, top_p, top_k, end_tokens=[eos], invalid_slices,
repetition_penalty=1.2)` (1.2 fixed) and `filling_sequence` calls `forward` once per new
token. Read in swissarmytransformer 0.4.12, sat/generation/sampling_strategies/base_strategy.py:
- l.72-73: `context_length` is the token count at the first `forward` call, which
  `filling_sequence` (sat/generation/autoregressive_sampling.py l.112-129) makes after the
  prompt's forward: the whole prompt. So l.82-85 put the penalty on the GENERATED ids
  `tokens[:, context_length:]` only, by `scatter_` (a repeated id is penalised once).
- l.86-87: `penalty_mat *= temperature; logits = logits.float() / penalty_mat`: a generated
  id's logit is divided by float32(penalty * temperature) WHATEVER ITS SIGN (a negative one
  rises), every other logit by the temperature.
- l.89-90: then each invalid slice is set to -65504. Ours is [valid_vocab_size:]; VisualGLM's
  English cli_demo also bans 63823:130000, which no config field here expresses.
- `top_k_logits` l.18-50, filter value -65504 (l.18): l.22-25 keep logits >= the k-th largest
  (ties kept). The top-p block l.30-48 sits inside `if top_k > 0:` (its `if top_p > 0.0:`,
  l.27, is commented out): top_p acts only when top_k > 0, and top_k 0 samples the whole
  vocabulary (`check_sampling_settings` refuses top_k 0 with top_p < 1 for this reason).
  Top-p: softmax of the logits sorted descending, cumsum (torch's CPU cumsum adds in double),
  remove where cumulative > top_p, shifted right by one (the crossing id and the first stay).
  top_k > vocabulary raises in torch.topk; here it keeps every id.
- l.92-93: softmax of the filtered logits, `torch.multinomial`. Greedy is BaseStrategy with
  top_k 1: the argmax of the penalised logits. l.76-80 raise on NaN logits; not done here.
Filtered ids get -65504, whose probability underflows to exactly 0 in float32, so the filters
run on the kept ids only, without sorting the vocabulary.
"""
import dataclasses
from typing import Literal, Optional, Protocol, Sequence

import numpy as np

from research.common.errors import UserInputError

SamplingRule = Literal["hf", "sat"]
SAMPLING_RULES = ("hf", "sat")
SAT_FILTER_VALUE = np.float32(-65504.0)


class SamplingSettings(Protocol):
    """The generation-config fields the sampling rules read."""

    do_sample: bool
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    valid_vocab_size: Optional[int]
    sampling_rule: SamplingRule


def check_sampling_settings(config: SamplingSettings):
    """Refuse a rule name we do not have and settings a rule would silently ignore."""
    if config.sampling_rule not in SAMPLING_RULES:
        raise UserInputError(f"sampling_rule must be one of {', '.join(SAMPLING_RULES)}, "
                             f"got {config.sampling_rule!r}")
    if (config.sampling_rule == "sat" and config.do_sample and config.top_k == 0
            and config.top_p < 1.0):
        raise UserInputError(
            f"sampling_rule 'sat' (SAT's BaseStrategy) applies top_p only when top_k > 0: top_p "
            f"{config.top_p} with top_k 0 would be ignored; set top_k > 0 or top_p 1.0")


@dataclasses.dataclass(frozen=True)
class Argmax:
    """A greedy choice that needs no history: the argmax over ids < `below` of logits /
    `temperature`. A model takes it where its logits are (in the graph, `argmax_ids`), so
    only B ids reach the host. The division stays: SAT's greedy divides before its argmax,
    and float32 rounding can tie two logits that differ by an ulp."""

    below: int
    temperature: float = 1.0

    def of(self, logits: np.ndarray) -> np.ndarray:
        """The same choice on the host, from logits [B,V]."""
        scaled = np.asarray(logits, np.float32)[:, :self.below] / np.float32(self.temperature)
        return np.argmax(scaled, axis=-1).astype(np.int32)


# Upstream ChatGLM's InvalidScoreLogitsProcessor: all-zero scores with this id at 5e4.
INVALID_SCORE_TOKEN = 5


def guard_invalid_scores(logits: np.ndarray) -> np.ndarray:
    """Logits [B,V] with each row that holds a NaN or Inf replaced by zeros and 5e4 at id 5, as
    upstream ChatGLM's chat() does (upstream replaces the whole batch; a row here, so batched
    answers equal one-by-one ones)."""
    logits = np.array(logits, dtype=np.float32)
    invalid = ~np.isfinite(logits).all(axis=-1)
    logits[invalid] = 0.0
    logits[invalid, INVALID_SCORE_TOKEN] = 5e4
    return logits


def history_free_argmax(config: SamplingSettings) -> Optional[Argmax]:
    """The rule's choice as an `Argmax` when it is one (greedy, no repetition penalty: the
    argmax of `penalised_logits`), else None (the host needs the logits and the history)."""
    if config.do_sample or config.repetition_penalty != 1.0:
        return None
    below = config.valid_vocab_size if config.valid_vocab_size is not None else np.iinfo(np.int32).max
    return Argmax(below, config.temperature if config.sampling_rule == "sat" else 1.0)


def choose_next_tokens(logits: np.ndarray, prompt_ids: Sequence[np.ndarray],
                       generated_ids: Sequence[np.ndarray], config: SamplingSettings,
                       rng: np.random.RandomState) -> np.ndarray:
    """Next token per row [B] from logits [B,V]: the argmax of `penalised_logits` when
    not sampling, else a draw from `next_token_probabilities`."""
    penalised = penalised_logits(logits, prompt_ids, generated_ids, config)
    if not config.do_sample:
        return np.argmax(penalised, axis=-1)
    if config.sampling_rule == "hf":
        kept = [_nonzero(row) for row in _hf_probabilities(penalised, config)]
    else:
        kept = [_sat_kept(row, config.top_k, config.top_p) for row in penalised]
    # A draw among the non-zero entries picks what `rng.choice(V, p=row)` would: its
    # cumulative sum is flat over the zeros. Skipping them saves most of its cost.
    return np.array([ids[rng.choice(ids.size, p=probs)] for ids, probs in kept])


def penalised_logits(logits: np.ndarray, prompt_ids: Sequence[np.ndarray],
                     generated_ids: Sequence[np.ndarray], config: SamplingSettings) -> np.ndarray:
    """Logits [B,V] float32 after the rule's repetition penalty and banned ids, before
    top-k/top-p: what greedy decoding takes the argmax of ("sat" also divides by the
    temperature, folded into its penalty; "hf" divides only when sampling)."""
    if config.sampling_rule == "hf":
        logits = np.array(logits, dtype=np.float32)
        if config.valid_vocab_size is not None:
            logits[:, config.valid_vocab_size:] = -np.inf
        if config.repetition_penalty != 1.0:
            histories = [np.concatenate([p, g]) for p, g in zip(prompt_ids, generated_ids)]
            logits = apply_repetition_penalty(logits, histories, config.repetition_penalty)
        return logits
    logits = np.asarray(logits, dtype=np.float32)
    penalised = logits / np.float32(config.temperature)
    generated_divisor = np.float32(config.repetition_penalty) * np.float32(config.temperature)
    for row, ids in enumerate(generated_ids):
        penalised[row, ids] = logits[row, ids] / generated_divisor
    if config.valid_vocab_size is not None:
        penalised[:, config.valid_vocab_size:] = SAT_FILTER_VALUE
    return penalised


def next_token_probabilities(logits: np.ndarray, prompt_ids: Sequence[np.ndarray],
                             generated_ids: Sequence[np.ndarray],
                             config: SamplingSettings) -> np.ndarray:
    """The distribution [B,V] float32 the rule samples from (top-k/top-p applied; zero for
    filtered ids), whatever `config.do_sample` says."""
    penalised = penalised_logits(logits, prompt_ids, generated_ids, config)
    if config.sampling_rule == "hf":
        return _hf_probabilities(penalised, config)
    probs = np.zeros_like(penalised)
    for row, row_logits in enumerate(penalised):
        ids, kept_probs = _sat_kept(row_logits, config.top_k, config.top_p)
        probs[row, ids] = kept_probs
    return probs


# --- "hf" --------------------------------------------------------------------------------

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
        for row in logits:
            ranked = _descending_finite(row)
            remove = np.cumsum(_softmax_of_sorted(row[ranked], vocab)) > top_p
            remove[1:] = remove[:-1].copy()  # keep the token that crosses top_p
            remove[0] = False
            row[ranked[remove]] = -np.inf
    return logits


def _descending_finite(row):
    """Ids of the entries that are not -inf (after top-k they are few), by descending logit,
    ties by id: the order a stable argsort of -row gives them, without sorting the rest."""
    finite = np.flatnonzero(row != -np.inf)
    return finite[np.argsort(-row[finite], kind="stable")]


def _softmax_of_sorted(sorted_logits, vocab):
    """Softmax of the sorted finite logits, as `_softmax` of the whole sorted row would give
    them bit for bit: the -inf entries add exact zeros at the end of the same-length sum."""
    exps = np.zeros(vocab, sorted_logits.dtype)
    exps[:sorted_logits.size] = np.exp(sorted_logits - np.max(sorted_logits))
    return exps[:sorted_logits.size] / np.sum(exps)


def _softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def _hf_probabilities(penalised, config):
    return _softmax(filter_top_k_top_p(penalised / config.temperature, config.top_k, config.top_p))


def _nonzero(probs):
    ids = np.flatnonzero(probs)
    return ids, probs[ids]


# --- "sat" -------------------------------------------------------------------------------

def _sat_kept(row, top_k, top_p):
    """(ids ascending, probabilities) that BaseStrategy's `top_k_logits` and softmax leave
    non-zero in one row of penalised logits."""
    if top_k == 0:  # no top-k and, upstream, no top-p either
        return np.arange(row.size), _softmax(row)
    vocab = row.size
    kth = np.partition(row, vocab - min(top_k, vocab))[vocab - min(top_k, vocab)]
    ids = np.flatnonzero(row >= kth)
    ids = ids[np.argsort(-row[ids], kind="stable")]
    probs = _softmax(row[ids])
    # torch's CPU cumsum accumulates in double and stores float32; top_p compares as float32
    cumulative = np.cumsum(probs, dtype=np.float64).astype(np.float32)
    remove = cumulative > np.float32(top_p)
    remove[1:] = remove[:-1].copy()
    remove[0] = False
    ids = np.sort(ids[~remove])
    return ids, _softmax(row[ids])
