"""Tokenizers built offline with the `tokenizers` library, saved in the transformers layout.

- ``wordpiece_tokenizer``: BERT-style (lower-case WordPiece, ``[CLS] … [SEP]``, ``[PAD]`` = 0, unknown
  words → ``[UNK]``) for the Q-Former.
- ``lm_tokenizer``: byte-level BPE for the language model, so any text (ordinary English, emoji, markup)
  encodes without an unknown token; the special tokens and the template follow the LM family
  (LLaMA ``<s> …``, OPT ``</s> …``, T5 ``… </s>``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Special tokens in id order, template, and the roles transformers needs, per LM family.
LM_STYLES: dict[str, dict] = {
    "llama": {
        "specials": ["<unk>", "<s>", "</s>", "<pad>"],
        "template": "<s> $A",
        "roles": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    },
    "opt": {
        "specials": ["<s>", "<pad>", "</s>", "<unk>"],
        "template": "</s> $A",
        "roles": {"unk_token": "<unk>", "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"},
    },
    "t5": {
        "specials": ["<pad>", "</s>", "<unk>"],
        "template": "$A </s>",
        "roles": {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"},
    },
}


def wordpiece_tokenizer(words: Iterable[str], max_length: int = 512) -> PreTrainedTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer whose vocabulary is the specials, ASCII characters and ``words``."""
    vocab: dict[str, int] = {}
    for token in BERT_SPECIALS:
        vocab.setdefault(token, len(vocab))
    for code in range(33, 127):
        ch = chr(code).lower()
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("##" + ch, len(vocab))
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def lm_tokenizer(
    corpus: Iterable[str], vocab_size: int, style: str = "llama", max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` with the special tokens of the ``style`` LM family."""
    spec = LM_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    template_tokens = [t for t in spec["specials"] if t in spec["template"].split()]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=spec["template"],
                pair=spec["template"] + " $B:1",
                special_tokens=[(t, tok.token_to_id(t)) for t in template_tokens],
            ),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **spec["roles"])
