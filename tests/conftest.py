"""Shared fixtures: no network, tiny models, a tiny tiny-world recipe cached once per test session."""

from __future__ import annotations

import os
import socket

import pytest

from benchmark.cli import OFFLINE_VARS

for _k, _v in OFFLINE_VARS.items():
    os.environ[_k] = _v

# a recipe small enough to pretrain in seconds; tests check plumbing, not accuracy
TINY_RECIPE = [
    "model.pretrain.hidden_size=32", "model.pretrain.num_layers=2", "model.pretrain.num_heads=2",
    "model.pretrain.intermediate_size=64", "model.pretrain.vocab_size=400", "model.pretrain.max_steps=20",
    "model.pretrain.eval_every=20", "model.pretrain.batch_size=16",
]
TINY_RUN = TINY_RECIPE + ["train.max_steps=3", "train.batch_size=8", "eval.limit=6", "eval.batch_size=16"]


def block_network(monkeypatch) -> None:
    """Make any network connection raise (loopback and unix sockets stay allowed) until ``monkeypatch`` undoes it."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or "/" in host):
            return real_connect(self, address)
        raise RuntimeError(f"network access attempted in a test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (loopback and unix sockets stay allowed)."""
    block_network(monkeypatch)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One model cache for the whole session, so the tiny recipe is pretrained once."""
    d = tmp_path_factory.mktemp("fbcache")
    os.environ["FORGETBENCH_CACHE"] = str(d)
    return d


@pytest.fixture
def tiny_llama():
    """A random 2-layer Llama (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)
