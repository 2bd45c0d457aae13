"""Independent reference values for the all-MiniLM-L6-v2 runtime test.

Written for Shoal, run once by hand; its output is committed as minilm_reference.json.
It shares no code with the Rust runtime (candle + tokenizers): the WordPiece tokenizer
and the BERT forward pass below are written from the model's published description,
in numpy, reading model.safetensors directly.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy
    /tmp/ref/bin/python minilm_reference.py <unpacked model dir> > minilm_reference.json
"""

import json
import math
import struct
import sys
import unicodedata

import numpy as np

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun.",
    "Quarterly revenue grew by twelve percent.",
]
# Pairs whose cosine similarity the test checks, and whose ordering a reader can judge.
PAIRS = [(0, 1), (2, 3), (0, 4), (2, 4), (1, 3)]


def load_safetensors(path):
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = {"F32": np.float32, "I64": np.int64}[info["dtype"]]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return tensors


def is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def tokenize(text, vocab):
    # BERT basic tokenizer (lower case, strip accents, split on whitespace and punctuation)
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words = []
    for chunk in text.split():
        current = ""
        for ch in chunk:
            if is_punctuation(ch):
                if current:
                    words.append(current)
                    current = ""
                words.append(ch)
            else:
                current += ch
        if current:
            words.append(current)
    # Greedy longest-match-first WordPiece.
    ids = [vocab["[CLS]"]]
    for word in words:
        start = 0
        pieces = []
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    found = piece
                    break
                end -= 1
            if found is None:
                pieces = ["[UNK]"]
                break
            pieces.append(found)
            start = end
        ids.extend(vocab[p] for p in pieces)
    ids.append(vocab["[SEP]"])
    return ids


def layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


ERF = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].astype(np.float64).T + w[prefix + ".bias"]


def embed(ids, w, config):
    n = len(ids)
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    x = (
        w["embeddings.word_embeddings.weight"][ids].astype(np.float64)
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q = linear(x, w, p + ".attention.self.query").reshape(n, heads, head_dim)
        k = linear(x, w, p + ".attention.self.key").reshape(n, heads, head_dim)
        v = linear(x, w, p + ".attention.self.value").reshape(n, heads, head_dim)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * head_dim)
        attention = linear(context, w, p + ".attention.output.dense")
        x = layer_norm(
            x + attention,
            w[p + ".attention.output.LayerNorm.weight"],
            w[p + ".attention.output.LayerNorm.bias"],
        )
        inner = gelu(linear(x, w, p + ".intermediate.dense"))
        out = linear(inner, w, p + ".output.dense")
        x = layer_norm(x + out, w[p + ".output.LayerNorm.weight"], w[p + ".output.LayerNorm.bias"])
    pooled = x.mean(axis=0)  # one unpadded sentence: every token counts
    return pooled / np.linalg.norm(pooled)


def main(model_dir):
    config = json.load(open(f"{model_dir}/config.json"))
    vocab = json.load(open(f"{model_dir}/tokenizer.json"))["model"]["vocab"]
    weights = load_safetensors(f"{model_dir}/model.safetensors")
    sentences = []
    vectors = []
    for text in SENTENCES:
        ids = tokenize(text, vocab)
        vector = embed(ids, weights, config)
        vectors.append(vector)
        sentences.append({"text": text, "token_ids": ids, "embedding": [round(float(v), 7) for v in vector]})
    pairs = [
        {"a": a, "b": b, "cosine": round(float(vectors[a] @ vectors[b]), 7)} for a, b in PAIRS
    ]
    json.dump({"model": "all-MiniLM-L6-v2", "sentences": sentences, "pairs": pairs}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
