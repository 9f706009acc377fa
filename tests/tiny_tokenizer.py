"""A byte-level BPE tokenizer trained on a few test sentences: what the tiny test models read."""

from __future__ import annotations


def train_bpe_tokenizer(corpus: list[str], special: list[str], *, vocab_size: int, eos: str, pad: str,
                        extra_special: list[str], chat_template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=extra_special, chat_template=chat_template)
