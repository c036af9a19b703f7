"""Three tokenizer families built offline with ``tokenizers``, each configured like its real counterpart.

- ``sentencepiece_bos``: a Llama-2-style tokenizer (BPE over ``▁``-joined words, legacy dummy prefix, ``<s>``
  prepended by the post-processor); its chat template writes ``<s>`` itself, as Llama-2's does.
- ``bytelevel_nobos``: a GPT-2 / Qwen-style byte-level BPE with no BOS and a ChatML chat template.
- ``tinyworld``: the tokenizer the tiny-world base model is built with (byte-level, digits split, no BOS).

The first two are trained on the tiny-world texts, so their merges cover the task words.
"""

from __future__ import annotations

from typing import Any

LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _texts() -> list[str]:
    """Every string of the tiny-world data files (facts, prompts, answers)."""
    import json

    from benchmark.models import TINYWORLD_DATA

    out = []
    for p in sorted(TINYWORLD_DATA.glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out += [str(v) for v in json.loads(line).values() if isinstance(v, (str, list))]
    return out


def sentencepiece_bos(vocab_size: int = 800) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # train with word-bounded merges, as SentencePiece splits on whitespace
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(_texts() + ["[INST] [/INST]"], trainer=trainer)
    # then encode as Llama-2's tokenizer.json does: prepend "▁" to the whole text, spaces become "▁"
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", chat_template=LLAMA2_CHAT)


def bytelevel_nobos(vocab_size: int = 800) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], chat_template=CHATML)


def tinyworld() -> Any:
    from benchmark.config import PretrainConfig
    from benchmark.models import train_tokenizer

    return train_tokenizer(PretrainConfig().vocab_size)


FAMILIES = {"sentencepiece_bos": sentencepiece_bos, "bytelevel_nobos": bytelevel_nobos, "tinyworld": tinyworld}
