"""Tiny random models built from configs and saved to disk, so tests exercise the real loading
code for each task type without downloading anything."""

from __future__ import annotations

from pathlib import Path

WORDS = ["hello", "world", "paris", "france", "capital", "the", "is", "of", "a", "cat", "dog",
         "red", "blue", "green", "what", "answer", "yes", "no", "one", "two"]


def _word_tokenizer(folder: Path, kind: str):
    """A word-level fast tokenizer over a tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"causal": ["<pad>", "<unk>", "<eos>"],
                "t5": ["<pad>", "</s>", "<unk>"],
                "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}[kind]
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS, "?", ".", ","])}
    unk = "<unk>" if kind != "bert" else "[UNK]"
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "causal":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                      unk_token="<unk>", eos_token="<eos>")
    elif kind == "t5":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                      unk_token="<unk>", eos_token="</s>")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                      unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                      mask_token="[MASK]")
    tok.save_pretrained(folder)
    return tok, len(vocab)


def make_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab = _word_tokenizer(folder, "causal")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def make_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = _word_tokenizer(folder, "causal")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_t5(folder: Path) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok, vocab = _word_tokenizer(folder, "t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                      num_heads=2, decoder_start_token_id=tok.pad_token_id,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def make_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    tok, vocab = _word_tokenizer(folder, "bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder
