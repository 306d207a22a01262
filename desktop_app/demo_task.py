"""The synthetic indirect-object-identification (IOI) task shared by the tests and the demo model.

Qt-free. `ioi_examples` makes clean/corrupted prompt pairs; `train_tokenizer` builds an offline byte-level
BPE tokenizer in which every name (with its leading space) is one token, so the clean and corrupted prompts
always have the same token length and the answers are single tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

NAMES = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Peter",
    "Anna", "Tom", "Kate", "Mark", "Lucy", "Paul", "Clara", "Henry", "Julia", "Simon",
)
PLACES = ("store", "park", "school", "beach", "office", "market", "garden", "station", "library", "cafe")
OBJECTS = ("a drink", "a book", "a ring", "a kiss", "a snack", "a letter", "a bone", "a flower", "a gift", "a pen")

# {io} is the indirect object (the answer), {s} the subject that is named twice.
TEMPLATES = (
    "When {first} and {second} went to the {place}, {s} gave {obj} to",
    "After {first} and {second} arrived at the {place}, {s} handed {obj} to",
    "While {first} and {second} were at the {place}, {s} passed {obj} to",
    "Then {first} and {second} walked to the {place}, and {s} gave {obj} to",
    "Yesterday {first} and {second} met at the {place}. {s} brought {obj} to",
    "Once {first} and {second} had lunch at the {place}, {s} offered {obj} to",
)

BOS_TOKEN = "<|endoftext|>"


class IOIExample(NamedTuple):
    clean: str
    corrupted: str
    answer: str  # the clean prompt's correct next token, with its leading space (" Mary")
    wrong: str  # the repeated subject (" John"): the answer of the corrupted prompt


def ioi_examples(n: int, seed: int = 0) -> list[IOIExample]:
    """`n` seeded IOI examples; the corrupted prompt repeats the other name (ABB -> ABA), same token length."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        io, s = rng.sample(NAMES, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        fields = dict(first=first, second=second, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
        template = rng.choice(TEMPLATES)
        clean = template.format(s=s, **fields)
        corrupted = template.format(s=io, **fields)
        examples.append(IOIExample(clean, corrupted, " " + io, " " + s))
    return examples


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Complete IOI sentences (prompt + answer + '.'), a training corpus for the tokenizer and the demo model."""
    return [ex.clean + ex.answer + "." for ex in ioi_examples(n, seed)]


def train_tokenizer(texts, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer offline; every " Name" of `NAMES` is guaranteed to be one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # The GPT-2 split regex and no prefix space: the same pre-tokenization transformers' GPT2Tokenizer uses,
    # so a GGUF export of this vocabulary tokenizes identically.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + [" " + name for name in NAMES], trainer=trainer)
    return _ensure_single_tokens(tok, [" " + name for name in NAMES])


def _ensure_single_tokens(tok, words):
    """Append the merges that make each word one token (as real BPE merges, not added tokens)."""
    from tokenizers import Tokenizer

    state = json.loads(tok.to_str())
    model = state["model"]
    vocab, merges = model["vocab"], model["merges"]
    changed = False
    for word in words:
        pieces = tok.encode(word).tokens
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            merges.append([left, right] if merges and isinstance(merges[0], list) else f"{left} {right}")
            if merged not in vocab:
                vocab[merged] = max(vocab.values()) + 1
            pieces = [merged] + pieces[2:]
            changed = True
    return Tokenizer.from_str(json.dumps(state)) if changed else tok


def save_hf_tokenizer(tok, folder) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer (offline)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": BOS_TOKEN, "eos_token": BOS_TOKEN, "unk_token": BOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1024,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")


def _encode_batch(tok, examples):
    import torch

    rows = [tok.encode(ex.clean).ids for ex in examples]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # right padding: causal, so harmless
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    last = torch.tensor([len(row) - 1 for row in rows])
    answer = torch.tensor([tok.token_to_id(_spelled(ex.answer)) for ex in examples])
    wrong = torch.tensor([tok.token_to_id(_spelled(ex.wrong)) for ex in examples])
    return ids, last, answer, wrong


def _spelled(word: str) -> str:
    # byte-level BPE spells a leading space as "Ġ"
    return "\u0120" + word[1:] if word.startswith(" ") else word


def train_ioi_model(model, tok, steps: int = 400, batch: int = 64, lr: float = 3e-3, seed: int = 0):
    """Train a causal LM on the answer token of IOI prompts (a few seconds for a 2-layer d=64 model on CPU)."""
    import torch

    ids, last, answer, _ = _encode_batch(tok, ioi_examples(20000, seed=seed + 1))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (batch,), generator=generator)
        logits = model(ids[pick]).logits[torch.arange(batch), last[pick]]
        loss = torch.nn.functional.cross_entropy(logits, answer[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def ioi_accuracy(model, tok, examples) -> float:
    """Fraction of examples whose answer logit beats the wrong name's logit at the last prompt position."""
    import torch

    ids, last, answer, wrong = _encode_batch(tok, examples)
    with torch.no_grad():
        logits = model(ids).logits[torch.arange(len(ids)), last]
    return (logits.gather(1, answer[:, None]) > logits.gather(1, wrong[:, None])).float().mean().item()
