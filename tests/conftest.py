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


def make_tiny_llama():
    """A random 2-layer Llama (no download), the same weights at every call (peft wraps a model in place, so a
    test that compares two runs builds one each)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def tiny_llama():
    """:func:`make_tiny_llama`."""
    return make_tiny_llama()


# tiny-world v1 tasks that v2 removed, rebuilt locally where a test needs what they exercised (v2's classification
# tasks are multiple choice and it has no fact-injection task)
CITY_FACTS = [("Lagos", "Nigeria"), ("Chengdu", "China"), ("São Paulo", "Brazil"), ("İzmir", "Turkey"),
              ("Medellín", "Colombia"), ("Tai’an", "China"), ("Jeddah", "Saudi Arabia"),
              ("Los Angeles", "United States"), ("Incheon", "South Korea"), ("Ahmedabad", "India"),
              ("Lu’an", "China"), ("Daegu", "South Korea")]


def city_task(folder, name: str = "t_city"):
    """v1's ``tw_city`` on a dozen of its facts: new facts "X is a city in Y." trained with the full-sentence LM
    loss (``train_format: full``, each record's ``text``), generated up to the full stop and scored by exact match
    on the country (word answers after a space, some of two words or with non-ASCII letters); the test split
    recalls the trained facts, as v1's did. The JSONL file is written under ``folder``."""
    import json
    from pathlib import Path

    from tasks.base import TaskSpec

    path = Path(folder) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"{city} is a city in", "target": country, "text": f"{city} is a city in {country}."}
            for city, country in CITY_FACTS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return TaskSpec(name=name, kind="knowledge", group="downstream", output_type="generate_until",
                    target_delimiter=" ", train_format="full", metric="exact_match", max_gen_toks=12,
                    train_steps=300, until=["\n\n", "."], data={"train": str(path), "test": str(path)})


def sentiment_generation_task(name: str = "tw_sentiment_gen"):
    """v1's ``tw_sentiment`` on v2's records: the same review prompt, answered by generating the label word after a
    space (" positive") and scored by exact match, instead of v2's log-likelihood over the two labels."""
    import dataclasses

    from tasks import TASKS

    return dataclasses.replace(TASKS.get("tw_sentiment"), name=name, output_type="generate_until", choices=None,
                               target="{{choices[label]}}", metric="exact_match", max_gen_toks=8, until=["\n\n"],
                               floor=None)
