"""Word-level tokenizer for the organisms, built with ``tokenizers`` from a vocabulary."""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; ids 0-4 are the special tokens, then ``words`` in order."""
    vocab = {t: i for i, t in enumerate([*SPECIAL, *[w for w in dict.fromkeys(words) if w not in SPECIAL]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
    )
