"""Tiny random transformers with offline tokenizers, saved to folders, for end-to-end tests.

Nothing is downloaded: the tokenizers are built from a word list, the models from configs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]
FILLER = ["the", "movie", "film", "plot", "was", "really", "quite", "a", "story", "acting"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["yes", "no", "answer", "is", "sentiment", "of"]


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Short sentences whose label is carried by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_sentiment_csv(folder: Path, train: int = 96, validation: int = 32) -> dict:
    """CSV files of a binary task; returns the task_options of a custom task."""
    files = {}
    for split, count, seed in (("train", train, 0), ("validation", validation, 1)):
        path = folder / f"{split}.csv"
        lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in sentiment_rows(count, seed)]
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    return {"data_files": files, "text_fields": ["text"], "label_field": "label",
            "task_type": "classification", "num_labels": 2}


def write_instruction_jsonl(folder: Path, train: int = 48, validation: int = 16) -> dict:
    files = {}
    for split, count, seed in (("train", train, 0), ("validation", validation, 1)):
        path = folder / f"{split}.jsonl"
        with path.open("w") as handle:
            for row in sentiment_rows(count, seed):
                answer = "yes" if row["label"] else "no"
                handle.write(json.dumps({"prompt": f"sentiment of {row['text']}",
                                         "response": f"answer is {answer}"}) + "\n")
        files[split] = str(path)
    return {"data_files": files}


def save_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)},
                                  do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                    extra_words: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<pad>", "<unk>", "<s>", "</s>", *WORDS, "#", ":", "instruction", "response"]
    tokens += [w for w in dict.fromkeys(extra_words) if w not in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
