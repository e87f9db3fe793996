"""End to end: the built-in embedding model all-MiniLM-L6-v2 on /v1/embeddings, beside the chat
default, compared with the same weights run through transformers."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, wait_for_models

pytestmark = pytest.mark.e2e

MODEL = "all-MiniLM-L6-v2"
DIM = 384
CONTEXT = 256  # vLLM's max_model_len: sentence_bert_config.json's max_seq_length
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The stock market fell today.",
    "Paris is the capital and most populous city of France.",
    "Embeddings map text to vectors; similar meanings land close together.",
]


@pytest.fixture(scope="module")
def client(served_app):
    wait_for_models(served_app.root_url, {MODEL: "ready"}, timeout_s=600)
    return served_app.client()


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 through transformers, as sentence-transformers runs it: BERT, mean
    pooling over the attention mask, then L2 normalisation (its modules.json lists Normalize,
    and vLLM applies it too)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rayllm_app.storage.model_source import minilm_model_dir

    folder = minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    embed.tokenizer = tokenizer
    return embed


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float64)


def decode_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").astype(np.float64)


def post_embeddings(served_app, body: dict) -> httpx.Response:
    return httpx.post(f"{served_app.base_url}/embeddings", json=body, headers=served_app.headers, timeout=60)


def assert_openai_400(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert error["message"]
    return error


def test_card_gives_the_context_length(client, served_app):
    card = httpx.get(f"{served_app.base_url}/models/{MODEL}", headers=served_app.headers, timeout=30).json()
    assert card["id"] == MODEL
    assert card["max_model_len"] == CONTEXT
    assert "embeddings" in card["metadata"]["capabilities"]
    assert MODEL in {m.id for m in client.models.list().data}


def test_embeddings_match_transformers(client, reference):
    response = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    assert response.model == MODEL and response.object == "list"
    served = vectors(response)
    assert served.shape == (len(SENTENCES), DIM)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-3)  # normalised
    expected = reference(SENTENCES).astype(np.float64)
    cosines = (served * expected).sum(axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    assert (cosines >= 0.999).all(), dict(zip(SENTENCES, cosines))


def test_single_string_input(client, reference):
    response = client.embeddings.create(model=MODEL, input=SENTENCES[0], encoding_format="float")
    (served,) = vectors(response)
    assert served.shape == (DIM,)
    assert float(served @ reference(SENTENCES[:1])[0]) >= 0.999


def test_related_sentences_score_higher_than_unrelated(client):
    eating, bread, horse, stocks = vectors(client.embeddings.create(
        model=MODEL, input=SENTENCES[:4], encoding_format="float"))
    related = float(eating @ bread)
    assert related > float(horse @ stocks) + 0.3
    assert related > float(eating @ stocks) + 0.3
    assert related > float(eating @ horse)


def test_base64_decodes_to_the_same_vectors(client):
    floats = vectors(client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float"))
    encoded = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="base64")
    decoded = np.array([decode_base64(item.embedding) for item in encoded.data])
    assert decoded.shape == (len(SENTENCES), DIM)
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    # Without encoding_format the SDK itself asks for base64 and decodes it.
    np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=SENTENCES)), floats, atol=1e-6)


def test_usage_counts_prompt_tokens(client, reference):
    response = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    expected = sum(len(ids) for ids in reference.tokenizer(SENTENCES)["input_ids"])  # with [CLS] and [SEP]
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected


def test_empty_input_list_is_400(client, served_app):
    assert_openai_400(post_embeddings(served_app, {"model": MODEL, "input": []}))
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])


def test_input_beyond_the_context_is_400(client, served_app, reference):
    at_limit = "word " * (CONTEXT - 2)  # + [CLS] and [SEP]
    assert len(reference.tokenizer(at_limit)["input_ids"]) == CONTEXT
    accepted = client.embeddings.create(model=MODEL, input=at_limit, encoding_format="float")
    assert accepted.usage.prompt_tokens == CONTEXT
    too_long = at_limit + "word"
    error = assert_openai_400(post_embeddings(served_app, {"model": MODEL, "input": too_long}))
    assert str(CONTEXT) in error["message"]
    # One input too long in a batch fails the request, not the engine.
    assert_openai_400(post_embeddings(served_app, {"model": MODEL, "input": ["fine", too_long]}))
    assert len(client.embeddings.create(model=MODEL, input="still fine", encoding_format="float").data) == 1


def test_chat_model_refuses_embeddings(client, served_app):
    """The router answers: the chat model does not serve /v1/embeddings (it names the model
    and the endpoints it does serve)."""
    error = assert_openai_400(post_embeddings(served_app, {"model": DEFAULT_MODEL, "input": ["hello"]}))
    assert DEFAULT_MODEL in error["message"]
    assert "/v1/chat/completions" in error["message"]  # what it serves instead
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=DEFAULT_MODEL, input=["hello"])
    assert DEFAULT_MODEL in info.value.message
