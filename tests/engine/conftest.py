"""Loaded tiny models, shared by the engine tests (loaded once per session through the real loader)."""
import pytest

from desktop_app.engine.loading import load_model


@pytest.fixture(scope="session")
def lm_gpt2(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def lm_llama(llama_dir):
    return load_model(llama_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def lm_neox(neox_dir):
    return load_model(neox_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def lm_ioi(ioi_gpt2_dir):
    return load_model(ioi_gpt2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session", params=["gpt2", "llama", "neox"])
def tiny_lm(request):
    return request.getfixturevalue(f"lm_{request.param}")
