"""The demo's word-level tokenizer: one token per number 0..P, operator, step marker and keyword.

Text is split on spaces and decoded by joining tokens with one space, so canonical task text (one
space between words, as :mod:`stopkit.toy.task` writes it) round-trips exactly. The tokenizer adds
``<s>`` in front of every encoded text (like Llama); training sequences append ``</s>`` themselves.
``[STOP]`` is a spare special token that never appears in training text: its embedding row is
where a STOP scorer's learned token starts from.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from stopkit.toy.task import APPROACHES, MAX_STEPS, OPS, P

__all__ = ["SPECIAL_TOKENS", "STOP_TOKEN", "build_tokenizer"]

PAD, BOS, EOS, UNK, STOP_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "[STOP]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, STOP_TOKEN)
WORDS = (
    *OPS,
    "=",
    ",",
    "?",
    "mod",
    "answer:",
    *APPROACHES,
    *(f"#{i}" for i in range(1, MAX_STEPS + 1)),
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer (vocab: 5 specials, the words, the numbers 0..P), ids stable across builds."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS, *map(str, range(P + 1))))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[STOP_TOKEN],
        padding_side="left",
        model_max_length=512,
    )
