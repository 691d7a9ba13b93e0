"""MiniGPT-4's chat format (upstream Vision-CAIR/MiniGPT-4 `minigpt4/conversation/conversation.py`;
notes/minigpt4.md §2.7-2.8), plus what upstream lacks: per-row stopping for batches and a context
budget that never drops the system line or the image.

Vicuna v0 (`CONV_VISION`, SeparatorStyle.SINGLE): the prompt is
    system + "###" + "Human: <Img><ImageHere></Img> q1###Assistant: a1###Human: q2###Assistant:"
The seed's commit (22d8888) ends the prompt with "###Assistant:"; later revisions
(`CONV_VISION_Vicuna0`, roles "Human: " / "Assistant: ") with "###Assistant: ", matching the
stage-2 training template. Past turns read the same in both. `VicunaV0Prompt(trailing_space=...)`
selects the form. The image message "<Img><ImageHere></Img>" and the first question form one
Human message joined by a space (upstream `Chat.ask`).

Llama-2 (`CONV_VISION_LLama2`): roles "<s>[INST] " / " [/INST] ", no separator:
    system + "<s>[INST] <Img><ImageHere></Img> q1 [/INST] a1<s>[INST] q2 [/INST] "

The prompt is split at "<ImageHere>" (`split_segments`); the tokenizer encodes the first segment
with bos and the rest without (`LlamaTokenizer.encode_segments`); the image embeddings go between
the segments. Vicuna v0 ends its turns with "###", not eos; "###" is [835] ("▁###") or
[2277, 29937] ("##" "#") in LLaMA's vocabulary. Upstream stops when row 0 ends with one of them
(v1) or all rows do (later); here each row stops on its own (research.common.generation's
`stop_sequences`). Answers: the text before the
first "###", after the last "Assistant:", stripped (upstream `Chat.answer`).
"""
from research.common.errors import UserInputError
from research.common.prompts import PromptStyle

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
          "You will be able to see the image once I provide it to you. Please answer my questions.")
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"
SEP = "###"
# "###" in LLaMA's tokenizer.model: "▁###", and "##" + "#" after other text (upstream Chat.__init__).
STOP_SEQUENCES = ((835,), (2277, 29937))
# Image embeddings per image: 32 Q-Former queries (Vicuna v0), 64 merged patches (Llama-2 variant).
IMAGE_TOKENS = 32
LLAMA2_IMAGE_TOKENS = 64

# Upstream Chat.answer defaults (seed commit; later revisions use repetition_penalty 1.05).
MAX_NEW_TOKENS = 300
NUM_BEAMS = 1
TOP_P = 0.9
TEMPERATURE = 1.0
REPETITION_PENALTY = 1.0
DO_SAMPLE = True
MIN_LENGTH = 1
MAX_LENGTH = 2000
GENERATION_DEFAULTS = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": NUM_BEAMS, "top_p": TOP_P,
                       "temperature": TEMPERATURE, "repetition_penalty": REPETITION_PENALTY,
                       "do_sample": DO_SAMPLE, "min_length": MIN_LENGTH, "max_length": MAX_LENGTH}


class _SingleSeparatorPrompt(PromptStyle):
    """Upstream Conversation.get_prompt (SINGLE): system + sep, then per message role + message +
    sep, and for the open (answer-less) last message its role alone. `roles` precede a message,
    `open_roles` end the prompt; an empty message counts as open, as upstream's `if message:`."""

    system = SYSTEM
    roles = ("Human: ", "Assistant: ")
    open_roles = ("Human:", "Assistant:")
    sep = SEP
    image_tokens = IMAGE_TOKENS

    def messages(self, query, history=(), image=True):
        """Upstream's message list: (role index, text) with the image message joined to the
        first question, past answers stripped, and the open Assistant message last."""
        turns = self.checked_turns(query, history) + [(query, None)]
        result = []
        for index, (question, answer) in enumerate(turns):
            if index == 0 and image:
                question = f"{IMAGE_MESSAGE} {question}"
            result.append((0, question))
            result.append((1, None if answer is None else answer.strip()))
        return result

    def render(self, messages):
        text = self.system + self.sep
        for role, message in messages:
            text += self.roles[role] + message + self.sep if message else self.open_roles[role]
        return text

    def build_prompt(self, query, history=(), image=True):
        """The prompt for generation: `history` (question, answer) turns, then `query`; the image
        message goes into the first turn when `image`."""
        return self.render(self.messages(query, history, image))

    def stop_ids(self, tokenizer=None):
        """Id sequences of "###": LLaMA's ([835], [2277, 29937]) without a tokenizer, else the
        tokenizer's own spellings (alone after a space, and glued to preceding text)."""
        if tokenizer is None:
            return STOP_SEQUENCES
        alone = tuple(tokenizer.encode(self.sep or SEP, add_special_tokens=False))
        before = tokenizer.encode("a", add_special_tokens=False)
        glued = tokenizer.encode("a" + (self.sep or SEP), add_special_tokens=False)
        spellings = [alone]
        if glued[:len(before)] == before and len(glued) > len(before):
            spellings.append(tuple(glued[len(before):]))
        return tuple(dict.fromkeys(spellings))

    def postprocess(self, answer):
        """Upstream Chat.answer's cleanup of the generated text."""
        return answer.split(SEP)[0].split("Assistant:")[-1].strip()

    def extract_answer(self, decoded_text):
        return self.postprocess(decoded_text)


class VicunaV0Prompt(_SingleSeparatorPrompt):
    """Vicuna v0's "###Human: ... ###Assistant:" template; `trailing_space` selects the later
    revisions' "###Assistant: " ending (the seed commit's form has none)."""

    def __init__(self, trailing_space=False):
        if not isinstance(trailing_space, bool):
            raise UserInputError(f"trailing_space must be true or false, got {trailing_space!r}")
        self.trailing_space = trailing_space
        self.open_roles = self.roles if trailing_space else ("Human:", "Assistant:")


class Llama2Prompt(_SingleSeparatorPrompt):
    """The Llama-2-chat variant's template: "<s>[INST] q [/INST] a" per turn, no separator,
    64 image embeddings per image. Upstream's demo stops it on "###" too (besides eos)."""

    roles = ("<s>[INST] ", " [/INST] ")
    open_roles = roles
    sep = ""
    image_tokens = LLAMA2_IMAGE_TOKENS


TEMPLATES = {"vicuna_v0": lambda: VicunaV0Prompt(trailing_space=False),
             "vicuna_v0_space": lambda: VicunaV0Prompt(trailing_space=True),
             "llama2": Llama2Prompt}


def get_template(name):
    """A prompt style by name: vicuna_v0 (seed commit), vicuna_v0_space (later), llama2."""
    if name not in TEMPLATES:
        raise UserInputError(f"unknown MiniGPT-4 template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]()


# ---- image placeholders ---------------------------------------------------------------------


def split_segments(prompt, num_images=1):
    """The text segments of `prompt` around its "<ImageHere>" placeholders; one placeholder per
    image (upstream asserts "Unmatched numbers of image placeholders and images")."""
    if not isinstance(prompt, str):
        raise UserInputError(f"the prompt must be a string, got {type(prompt).__name__}")
    segments = prompt.split(IMAGE_PLACEHOLDER)
    found = len(segments) - 1
    if found != num_images:
        if num_images and not found:
            raise UserInputError(f"an image is given but the prompt has no {IMAGE_PLACEHOLDER} placeholder; "
                                 f"write {IMAGE_MESSAGE} where the image goes")
        raise UserInputError(f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders for {num_images} images; "
                             f"give one placeholder per image")
    return segments


def prompt_length(tokenizer, prompt, num_images=1, image_tokens=IMAGE_TOKENS):
    """Positions `prompt` takes in the model: its segments' tokens (bos included) plus
    `image_tokens` per image."""
    segments = split_segments(prompt, num_images)
    return sum(len(ids) for ids in tokenizer.encode_segments(segments)) + num_images * image_tokens


# ---- stopping --------------------------------------------------------------------------------


def cut_at_stop(ids, stop_sequences=STOP_SEQUENCES, eos_token_id=None):
    """`ids` before the first stop sequence (or eos): the answer part of a generated row."""
    ids = [int(i) for i in ids]
    sequences = [tuple(seq) for seq in stop_sequences] + ([] if eos_token_id is None else [(eos_token_id,)])
    for end in range(len(ids)):
        if any(tuple(ids[end:end + len(seq)]) == seq for seq in sequences):
            return ids[:end]
    return ids


def decode_answer(tokenizer, ids, style=None, stop_sequences=STOP_SEQUENCES):
    """The answer text of one row of generated ids: cut at the stop sequence or eos, decoded
    without special ids, cleaned up as upstream (before "###", after "Assistant:", stripped)."""
    style = style or VicunaV0Prompt()
    text = tokenizer.decode(cut_at_stop(ids, stop_sequences, tokenizer.eos_token_id), skip_special_tokens=True)
    return style.extract_answer(text)


# ---- context budget --------------------------------------------------------------------------


def fit_history(style, tokenizer, query, history=(), image=True, max_length=MAX_LENGTH,
                max_new_tokens=MAX_NEW_TOKENS):
    """The history to build the prompt from so that prompt + image embeddings + `max_new_tokens`
    fit in `max_length`: whole old turns are dropped, oldest first, but never the system line,
    the first (image) turn or the current query. Returns (kept_history, dropped_count).

    Upstream instead cuts the embeddings from the left, which can drop bos, the system line and
    the image. If even the pinned part does not fit, a UserInputError says so."""
    turns = style.checked_turns(query, history)
    num_images = 1 if image else 0
    pinned = 1 if image and turns else 0  # the image sits in the first turn's question

    def length(kept):
        prompt = style.build_prompt(query, kept, image)
        return prompt_length(tokenizer, prompt, num_images, style.image_tokens) + max_new_tokens

    dropped = 0
    kept = list(turns)
    while length(kept) > max_length:
        if len(kept) <= pinned:
            raise UserInputError(f"the prompt with the system line, the image turn and the question needs "
                                 f"{length(kept) - max_new_tokens} positions plus max_new_tokens "
                                 f"{max_new_tokens}, more than max_length {max_length}; shorten the question "
                                 f"or lower max_new_tokens")
        kept = kept[:pinned] + kept[pinned + 1:]
        dropped += 1
    return kept, dropped
