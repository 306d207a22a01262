"""Session fixtures: tiny models built from configs, saved as ordinary Hugging Face folders (offline).

Every folder holds config.json, model.safetensors and the tokenizer trained on the synthetic IOI corpus
(`desktop_app.demo_task`), in which each " Name" is one token.
"""

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test models are tiny: one thread is faster than two fighting over a small matmul, and the suite's
# processes (pytest, CLI subprocesses) do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The SAE activation cache goes to a throw-away folder, never the user's cache dir.
def _throwaway_dir(prefix: str) -> str:
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


os.environ.setdefault("INTERP_WORKBENCH_CACHE_DIR", _throwaway_dir("iwb-test-cache-"))

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES_DIR = (REPO_ROOT.parent / "shared" / "models" / "stories260K").resolve()
BOS_ID = 0  # "<|endoftext|>" is the trainer's first special token


@pytest.fixture(scope="session")
def ioi_tokenizer():
    """The `tokenizers.Tokenizer` every tiny model uses."""
    from desktop_app import demo_task

    return demo_task.train_tokenizer(demo_task.corpus(2000, seed=0), vocab_size=512)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def _save(model, tok, folder: Path) -> Path:
    from desktop_app import demo_task

    model.eval()
    model.save_pretrained(folder)
    demo_task.save_hf_tokenizer(tok, folder)
    return folder


def _common(tok, initializer_range=0.1):
    # Random models use an init above the default 0.02 so their logits depend visibly on the prompt;
    # the trained IOI model keeps the default, which trains faster.
    return dict(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=BOS_ID,
        eos_token_id=BOS_ID,
        pad_token_id=None,
        initializer_range=initializer_range,
    )


def build_gpt2(tok, n_layer=2, n_embd=32, n_head=4, seed=0, initializer_range=0.1):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # transformers 5: n_ctx is gone; n_positions is the context. 1024 (GPT-2's) because a GGUF export stores
    # only the context length, which the GGUF loader cannot map back to n_positions.
    config = GPT2Config(
        n_positions=1024,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        attn_implementation="eager",
        **_common(tok, initializer_range),
    )
    return GPT2LMHeadModel(config).float()


def build_llama(tok, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **_common(tok),
    )
    return LlamaForCausalLM(config).float()


def build_neox(tok, seed=0):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **_common(tok),
    )
    return GPTNeoXForCausalLM(config).float()


@pytest.fixture(scope="session")
def gpt2_dir(models_root, ioi_tokenizer):
    """GPT-2, 2 layers, d_model 32, 4 heads, random weights."""
    return _save(build_gpt2(ioi_tokenizer), ioi_tokenizer, models_root / "gpt2")


@pytest.fixture(scope="session")
def llama_dir(models_root, ioi_tokenizer):
    """Llama, 2 layers, d_model 64, 4 query heads sharing 2 key/value heads, untied, random weights."""
    return _save(build_llama(ioi_tokenizer), ioi_tokenizer, models_root / "llama")


@pytest.fixture(scope="session")
def neox_dir(models_root, ioi_tokenizer):
    """GPT-NeoX, 2 layers, d_model 64, 4 heads, parallel residual, random weights."""
    return _save(build_neox(ioi_tokenizer), ioi_tokenizer, models_root / "neox")


@pytest.fixture(scope="session")
def ioi_gpt2_dir(models_root, ioi_tokenizer):
    """GPT-2 (2 layers, d_model 64) trained for a few seconds on the IOI task: patching has a real signal."""
    from desktop_app import demo_task

    model = build_gpt2(ioi_tokenizer, n_layer=2, n_embd=64, n_head=4, seed=0, initializer_range=0.02)
    demo_task.train_ioi_model(model, ioi_tokenizer, steps=400, seed=0)
    return _save(model, ioi_tokenizer, models_root / "ioi_gpt2")


@pytest.fixture(scope="session")
def stories_dir():
    """The real trained stories260K Llama (sentencepiece tokenizer) from ../shared/models; skipped if absent."""
    if not (STORIES_DIR / "config.json").is_file():
        pytest.skip(f"{STORIES_DIR} is not present")
    return STORIES_DIR
