"""A small character-level tokenizer, built locally (no hub), for the tiny MoE policy and the arithmetic task.

Ids are fixed: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the characters of `CHARACTERS` in order.
Encoding prepends `<bos>` (switch off with `add_special_tokens=False`); decoding joins characters without
separators, so `decode(encode(text), skip_special_tokens=True) == text` for text made of known characters.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARACTERS: str = "0123456789+-*=() abcdefghijklmnopqrstuvwxyz.,:;!?'/\n"


def _vocab() -> dict[str, int]:
    """Token -> id, in a fixed order (specials first)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {token: i for i, token in enumerate(tokens)}


def _backend() -> Tokenizer:
    """The `tokenizers` object: one token per character, unknown characters map to `<unk>`."""
    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; nothing is dropped.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer; with `out_dir`, also save it there in HF format (AutoTokenizer-loadable)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer
