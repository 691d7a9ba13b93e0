"""ChatGLM2-6B as a library: build the model and tokenizer from a YAML plus keyword overrides,
then chat as upstream users know it (`chat`, `stream_chat` reusing the KV cache across turns)
and what upstream lacks: batch chat (several conversations in one batch), a token budget that
drops the oldest rounds, and a loop guard. The run scripts, the terminal chat and the
benchmarks call these.

    from research.chatglm2.inference import load_chatglm2
    glm = load_chatglm2("run_glm2_tiny.yaml")
    response, history = glm.chat("你好")
    for response, history in glm.stream_chat("再说一遍", history):
        print(response)
    replies = glm.batch_chat(["你好", "晚上睡不着应该怎么办"], histories=[history, []])

Decoding defaults: `chat`, `stream_chat` and `batch_chat` take upstream's chat() defaults
(max_length 8192, do_sample True, top_p 0.8, temperature 0.8, the NaN/Inf guard), capped by
the YAML's seq_length; `generation_config` is the YAML's MindFormers fields
(max_decode_length, do_sample, top_k, top_p, ...), which run_chatglm2.py uses.
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import List, Optional, Sequence

from research.chatglm2.configuration_chatglm2 import REGISTRY_PREFIX, ChatGLM2Config, load_chatglm2_config
from research.chatglm2.convert_chatglm2 import check_prefix, read_upstream_prefix
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration, add_lora
from research.chatglm2.tokenization_chatglm2 import ChatGLM2Tokenizer
from research.common.checkpoint import load_params_into_net, read_checkpoint
from research.common.errors import UserInputError
from research.common.generation import Conversation, GenerationConfig, generate
from research.common.lora import load_lora_checkpoint
from research.common.memory import check_memory
from research.common.runtime import add_generation_arguments, init_context, load_weights, resolve_path

DEFAULT_CONFIG = "run_glm2_6b.yaml"
DEFAULT_PROMPT = "你好"
# Upstream chat()/stream_chat() (HF modeling_chatglm.py) defaults.
CHAT_DEFAULTS = dict(max_length=8192, do_sample=True, top_p=0.8, temperature=0.8)
# Without max_new_tokens, the prompt of a chat turn leaves this share of the length for the answer.
ANSWER_SHARE = 4
# Type names a YAML may give: ours, or MindFormers' (its glm2 YAMLs load here as they are).
MODEL_TYPES = (REGISTRY_PREFIX + "ChatGLM2ForConditionalGeneration", "ChatGLM2ForConditionalGeneration")
TOKENIZER_TYPES = (REGISTRY_PREFIX + "ChatGLM2Tokenizer", "ChatGLM2Tokenizer")
PROCESSOR_FIELDS = {"type": "GLMProcessor", "return_tensors": "ms"}


class HistoryTruncatedWarning(UserWarning):
    """The oldest rounds of a conversation were left out of the prompt to fit the model's length."""


@dataclasses.dataclass
class ChatReply:
    response: str  # post-processed, as upstream's chat() returns it
    history: list  # the rounds the prompt kept, then (query, response)
    token_ids: List[int]  # the new ids (eos included when it stopped there)
    dropped_rounds: int  # oldest rounds left out of the prompt to fit the length


@dataclasses.dataclass
class ChatGLM2Chat:
    """A loaded ChatGLM2 with its tokenizer."""

    config: ChatGLM2Config
    yaml: object  # the MindFormerConfig it came from
    model: ChatGLM2ForConditionalGeneration
    tokenizer: ChatGLM2Tokenizer
    loaded: bool  # whether a checkpoint was loaded (else random weights)
    device: str

    def describe_weights(self):
        if self.loaded:
            return f"weights: {self.config.checkpoint_name_or_path}"
        return "weights: none given, random initialisation (UNTRAINED: the answers are noise)"

    def generation_config(self, **overrides) -> GenerationConfig:
        """The YAML's decoding fields, then the overrides that are not None."""
        return GenerationConfig.from_model_config(self.config, self.tokenizer, **overrides)

    def chat_config(self, **overrides) -> GenerationConfig:
        """Upstream chat()'s decoding (CHAT_DEFAULTS, the NaN/Inf guard), then the overrides
        that are not None."""
        tokenizer = self.tokenizer
        settings = GenerationConfig(**CHAT_DEFAULTS, use_past=self.config.use_past, invalid_score_guard=True,
                                    sampling_rule=self.config.sampling_rule, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, valid_vocab_size=tokenizer.vocab_size)
        return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def _budget(self, settings: GenerationConfig):
        """(limit, room): where generation must stop, and the tokens a prompt leaves for the answer."""
        limit = min(self.config.seq_length, settings.max_length or self.config.seq_length)
        room = settings.max_new_tokens or max(1, limit // ANSWER_SHARE)
        return limit, min(room, limit - 1)

    def fit_prompt(self, query, history, settings: GenerationConfig):
        """(prompt ids, kept rounds, dropped rounds): `build_prompt(query, history)` without as
        many of the oldest rounds as needed to leave room for the answer; the query is never cut."""
        history = self.tokenizer.prompt_style.checked_turns(query, history)
        limit, room = self._budget(settings)
        for dropped in range(len(history) + 1):
            ids = self.tokenizer.encode_chat(query, history[dropped:])
            if len(ids) + room <= limit:
                return ids, history[dropped:], dropped
        raise UserInputError(
            f"the query alone encodes to {len(ids)} tokens; with {room} tokens left for the answer "
            f"that is more than the {limit} the model takes (seq_length {self.config.seq_length}, "
            f"max_length {settings.max_length}): shorten it, lower max_new_tokens or raise --seq_length")

    def batch_chat(self, queries: Sequence[str], histories: Optional[Sequence] = None, *, batch_size=None,
                   settings: Optional[GenerationConfig] = None, **chat_overrides) -> List[ChatReply]:
        """One turn of several conversations, `batch_size` per forward pass (default: all).

        Each query has its own history (default: none). Settings default to `chat_config`
        with `chat_overrides`. A row equals chatting that conversation alone (greedy)."""
        queries = list(queries)
        histories = [None] * len(queries) if histories is None else list(histories)
        if len(histories) != len(queries):
            raise UserInputError(f"{len(queries)} queries but {len(histories)} histories: give one per query")
        settings = settings or self.chat_config(**chat_overrides)
        batch_size = batch_size or len(queries)
        if batch_size <= 0:
            raise UserInputError(f"batch_size must be positive, got {batch_size}")
        prompts = [self.fit_prompt(query, history, settings) for query, history in zip(queries, histories)]
        replies = []
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            outputs = generate(self.model, [ids for ids, _, _ in chunk], settings)
            for query, (_, kept, dropped), ids in zip(queries[first:], chunk, outputs):
                response = self.tokenizer.prompt_style.postprocess(self.tokenizer.decode(ids))
                replies.append(ChatReply(response, kept + [(query, response)], ids, dropped))
        return replies

    def chat(self, query, history=None, **chat_overrides):
        """(response, history) as upstream's model.chat(tokenizer, query, history); warns with
        HistoryTruncatedWarning when old rounds were left out to fit the length."""
        reply = self.batch_chat([query], [history], **chat_overrides)[0]
        _warn_dropped(reply.dropped_rounds)
        return reply.response, reply.history

    def stream_chat(self, query, history=None, past: Optional[Conversation] = None, return_past=False,
                    **chat_overrides):
        """Yields (response so far, history) as upstream's stream_chat, (…, past) with
        `return_past`: a `Conversation` holding this chat in the KV cache. Given back as `past`
        with the history it came with, the next turn encodes only its own round (upstream's
        past_key_values reuse; the same tokens as re-encoding everything). When the
        conversation would outgrow the length, the oldest rounds are dropped (warning) and
        the kept ones re-encoded."""
        settings = self.chat_config(**chat_overrides)
        history = self.tokenizer.prompt_style.checked_turns(query, history)
        limit, room = self._budget(settings)
        new_ids = None
        if past is not None:
            new_ids = self.tokenizer.encode_continuation(
                self.tokenizer.prompt_style.next_round(query, len(history) + 1))
            if past.end + len(new_ids) + room > limit:
                new_ids = None
        if new_ids is None:
            new_ids, history, dropped = self.fit_prompt(query, history, settings)
            past = Conversation(self.model, self.tokenizer.pad_token_id)
            _warn_dropped(dropped)
        ids = []
        for token in past.reply_steps(new_ids, settings):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text and not text.endswith("\N{REPLACEMENT CHARACTER}"):  # a whole character
                response = self.tokenizer.prompt_style.postprocess(text)
                new_history = history + [(query, response)]
                yield (response, new_history, past) if return_past else (response, new_history)


def _warn_dropped(dropped):
    if dropped:
        warnings.warn(f"dropped the {dropped} oldest round(s) of the history to fit the model's length",
                      HistoryTruncatedWarning, stacklevel=3)


def build_tokenizer(yaml_config, max_length):
    """The tokenizer of the YAML's `processor.tokenizer` ({type, vocab_file, ...})."""
    processor = dict(yaml_config.get("processor") or {})
    node = dict(processor.pop("tokenizer", None) or {})
    source = yaml_config.source
    # MindFormers' glm2 YAMLs wrap the tokenizer in a GLMProcessor returning MindSpore tensors:
    # what the tokenizer is here, so those values are the only ones accepted.
    for field, value in PROCESSOR_FIELDS.items():
        if processor.pop(field, value) != value:
            raise UserInputError(f"{source.where('processor.' + field)}: only {value!r} (MindFormers' glm2 "
                                 f"value) is accepted; the tokenizer is the processor here")
    if processor:
        raise UserInputError(f"{source.where('processor')}: unknown field(s) {sorted(processor)}; known: "
                             f"tokenizer, {', '.join(PROCESSOR_FIELDS)}")
    kind = node.pop("type", TOKENIZER_TYPES[0])
    if kind not in TOKENIZER_TYPES:
        raise UserInputError(f"{source.where('processor.tokenizer.type')}: {kind!r} is not a ChatGLM2 "
                             f"tokenizer; expected one of {', '.join(TOKENIZER_TYPES)}")
    if not node.get("vocab_file"):
        raise UserInputError(f"{source.where('processor.tokenizer')}: vocab_file is not set (ChatGLM2-6B's "
                             f"tokenizer.model)")
    node["vocab_file"] = resolve_path(node["vocab_file"], "tokenizer vocab_file")
    try:
        return ChatGLM2Tokenizer(max_length=max_length, **node)
    except UserInputError as err:
        raise UserInputError(f"{source.where('processor.tokenizer')}: {err}") from err


def check_tokenizer(config: ChatGLM2Config, tokenizer: ChatGLM2Tokenizer, where):
    """The model's special ids and vocabulary must be the tokenizer's."""
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise UserInputError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but "
                             f"padded_vocab_size is {config.padded_vocab_size}")
    wrong = [f"{name} {getattr(config, name)} (tokenizer: {value})"
             for name, value in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id))
             if getattr(config, name) != value]
    if wrong:
        raise UserInputError(f"{where}: model_config {', '.join(wrong)} do not match the tokenizer file")


def load_chatglm2(config=DEFAULT_CONFIG, *, device_id=None, seq_length=None, use_past=None, checkpoint=None,
                  ptuning_checkpoint=None, lora_checkpoint=None, batch_size=1) -> ChatGLM2Chat:
    """ChatGLM2 from a YAML (path or a name in configs/chatglm2/), its checkpoint
    (`checkpoint` overrides `model_config.checkpoint_name_or_path`) and tokenizer.

    Fine-tuned models: a full fine-tune is its own `checkpoint`; with `model_config.pre_seq_len`
    the prefix comes from `ptuning_checkpoint` (run_chatglm2_finetune.py's trainable .ckpt, or
    upstream ptuning/'s checkpoint-N folder / pytorch_model.bin); with `pet_config` the LoRA
    matrices from `lora_checkpoint`. The keywords override the YAML when given. Everything that
    can be checked without the weights (the tokenizer file, the checkpoint paths, whether
    `batch_size` rows fit in memory) is checked before the model is built. The keyword paths are
    relative to the current folder (as the shell and Python read them), the YAML's to the repository.
    """
    checkpoint, ptuning_checkpoint, lora_checkpoint = (
        os.path.abspath(path) if path else path for path in (checkpoint, ptuning_checkpoint, lora_checkpoint))
    yaml_config, model_config = load_chatglm2_config(config)
    where = yaml_config.source.path
    arch = ((yaml_config.get("model") or {}).get("arch") or {}).get("type", MODEL_TYPES[0])
    if arch not in MODEL_TYPES:
        raise UserInputError(f"{yaml_config.source.where('model.arch.type')}: {arch!r} is not a ChatGLM2 "
                             f"model; expected one of {', '.join(MODEL_TYPES)}")
    device = init_context(yaml_config, device_id)
    for field, value in dict(seq_length=seq_length, use_past=use_past,
                             checkpoint_name_or_path=checkpoint).items():
        if value is not None:
            setattr(model_config, field, value)
    model_config.validate()
    if bool(model_config.pre_seq_len) != bool(ptuning_checkpoint):
        raise UserInputError(f"{where}: a P-Tuning v2 model needs both model_config.pre_seq_len and its prefix "
                             f"checkpoint (--ptuning_checkpoint); got pre_seq_len {model_config.pre_seq_len} and "
                             f"{ptuning_checkpoint or 'no prefix checkpoint'}")
    if bool(model_config.pet_config) != bool(lora_checkpoint):
        raise UserInputError(f"{where}: a LoRA model needs both model_config.pet_config and its LoRA checkpoint "
                             f"(--lora_checkpoint); got {'a' if model_config.pet_config else 'no'} pet_config "
                             f"and {lora_checkpoint or 'no LoRA checkpoint'}")
    check_memory(model_config.memory_estimate(batch_size), where)
    tokenizer = build_tokenizer(yaml_config, model_config.seq_length)
    check_tokenizer(model_config, tokenizer, where)
    for what, path in (("ChatGLM2 checkpoint", model_config.checkpoint_name_or_path),
                       ("P-Tuning checkpoint", ptuning_checkpoint), ("LoRA checkpoint", lora_checkpoint)):
        if path:
            resolve_path(path, what)
    model = ChatGLM2ForConditionalGeneration(model_config)
    model.set_train(False)
    loaded = load_weights(model, model_config.checkpoint_name_or_path, "ChatGLM2 checkpoint",
                          allow_missing=("transformer.prefix_encoder.",))
    if ptuning_checkpoint:
        load_params_into_net(model, read_prefix_checkpoint(ptuning_checkpoint, model_config),
                             what=f"P-Tuning checkpoint {ptuning_checkpoint}", allow_missing=("transformer.",))
    if lora_checkpoint:
        add_lora(model, yaml_config.source)
        load_lora_checkpoint(model, read_checkpoint(lora_checkpoint, "LoRA checkpoint"),
                             f"LoRA checkpoint {lora_checkpoint}")
    return ChatGLM2Chat(model_config, yaml_config, model, tokenizer, loaded, device)


def read_prefix_checkpoint(path, config: ChatGLM2Config):
    """The prefix of a P-Tuning checkpoint: ours (a .ckpt of run_chatglm2_finetune.py's
    checkpoint_trainable) or upstream's (checkpoint-N folder or pytorch_model.bin), checked
    against `config`."""
    if not path.endswith(".ckpt"):
        return read_upstream_prefix(path, config)
    params = read_checkpoint(path, "P-Tuning checkpoint")
    check_prefix({name: value.shape for name, value in params.items()}, config, path)
    return params


# ---- command-line flags (MindFormers' and upstream's names) -------------------------------------

def chatglm2_parser(description):
    """The model and decoding flags every ChatGLM2 script takes; None means the YAML's (or,
    for the chat defaults, upstream's) value."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser, DEFAULT_CONFIG, "configs/chatglm2/")
    parser.add_argument("--seq_length", type=int, default=None, help="static length (overrides YAML)")
    parser.add_argument("--checkpoint", "--load_checkpoint", dest="checkpoint", default=None,
                        help="converted or fully fine-tuned checkpoint (overrides model_config.checkpoint_name_or_path)")
    parser.add_argument("--ptuning_checkpoint", default=None,
                        help="P-Tuning v2 prefix (with model_config.pre_seq_len): a checkpoint_trainable .ckpt, or "
                             "upstream's checkpoint-N folder / pytorch_model.bin")
    parser.add_argument("--lora_checkpoint", default=None,
                        help="LoRA matrices (with model_config.pet_config): a checkpoint_trainable .ckpt")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max_length", type=int, default=None, help="prompt + answer tokens at most")
    parser.add_argument("--repetition_stop", type=int, default=None,
                        help="stop an answer that ends with a block of up to N tokens three times in a row")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    return parser


def load_from_arguments(args, batch_size=1):
    """load_chatglm2 with the flags of chatglm2_parser."""
    return load_chatglm2(args.config, device_id=args.device_id, seq_length=args.seq_length,
                         use_past=args.use_past, checkpoint=args.checkpoint,
                         ptuning_checkpoint=args.ptuning_checkpoint, lora_checkpoint=args.lora_checkpoint,
                         batch_size=batch_size)


def decoding_overrides(args):
    """The decoding flags as GenerationConfig overrides (None: keep the default)."""
    return dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, do_sample=args.do_sample,
                top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                repetition_stop=args.repetition_stop, seed=args.seed)


def read_history_file(path, count):
    """Histories for `count` queries from a JSON file: a list of [question, answer] pairs shared
    by every query, or a list of such lists, one per query."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except OSError as err:
        raise UserInputError(f"cannot read --history_file {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise UserInputError(f"--history_file {path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(data, list):
        raise UserInputError(f"--history_file {path}: expected a list of [question, answer] pairs, "
                             f"got {type(data).__name__}")
    per_query = bool(data) and all(isinstance(item, list) and all(isinstance(t, list) for t in item)
                                   for item in data)
    if not per_query:
        return [data] * count
    if len(data) != count:
        raise UserInputError(f"--history_file {path} holds {len(data)} histories for {count} prompts: "
                             f"give one per prompt, or one list of pairs for all")
    return data


def print_replies(glm: ChatGLM2Chat, prompts, replies: Sequence[ChatReply], seconds, batch_size, use_past,
                  timing_note=""):
    """The scripts' output: a note per dropped history, 问/答 per prompt, the speed line."""
    for prompt, reply in zip(prompts, replies):
        if reply.dropped_rounds:
            print(f"note: dropped the {reply.dropped_rounds} oldest round(s) of the history for "
                  f"{prompt!r} to fit seq_length {glm.config.seq_length}", file=sys.stderr)
        print(f"问：{prompt}\n答：{reply.response}")
    new_tokens = sum(len(reply.token_ids) for reply in replies)
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"batch_size={batch_size}, use_past={use_past}{timing_note})")
