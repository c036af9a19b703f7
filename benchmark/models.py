"""Base models: the self-pretrained tiny-world Llama (built once, cached by recipe hash) or any HF causal LM."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmark.config import TINY_WORLD, ModelConfig, PretrainConfig, TrainConfig
from benchmark.data import encode_texts
from benchmark.errors import UserError
from benchmark.evaluate import evaluate
from benchmark.paths import cache_root
from benchmark.precision import load_dtype, resolve_precision
from benchmark.train import train_stage

logger = logging.getLogger(__name__)
RECIPE_VERSION = 1
TINYWORLD_DATA = Path(__file__).resolve().parent.parent / "tasks" / "tinyworld"
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def _corpus() -> list[str]:
    with open(TINYWORLD_DATA / "facts.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _tokenizer_texts() -> list[str]:
    """Text the tokenizer is trained on: the facts plus every tiny-world training file."""
    texts = _corpus()
    for p in sorted(TINYWORLD_DATA.glob("*train*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                texts.append(" ".join(str(v) for v in r.values() if isinstance(v, str)))
    return texts


def recipe_hash(cfg: PretrainConfig, general_hashes: list[str]) -> str:
    """Cache key of the tiny-world base: recipe, data bytes, general suite, and library versions."""
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.__dict__, "v": RECIPE_VERSION, "torch": torch.__version__,
                         "transformers": transformers.__version__}, sort_keys=True).encode())
    for p in sorted(TINYWORLD_DATA.glob("*.jsonl")):
        h.update(p.name.encode() + p.read_bytes())
    for gh in general_hashes:
        h.update(gh.encode())
    return h.hexdigest()[:16]


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained locally; digits are split one per token so arithmetic is learnable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])


def pretrain_tinyworld(cfg: PretrainConfig, general_specs: list[Any], out_dir: Path, quiet: bool = False) -> dict:
    """Build the tokenizer and pretrain a small Llama on the fact corpus until general accuracy >= target."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)  # on CPU the weights depend on it (see PretrainConfig.num_threads)
    try:
        return _pretrain(cfg, general_specs, out_dir, quiet)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(cfg: PretrainConfig, general_specs: list[Any], out_dir: Path, quiet: bool) -> dict:
    from accelerate import Accelerator  # deferred, like every transformers/accelerate import: seconds to load
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    tok = train_tokenizer(cfg.vocab_size)
    mcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(mcfg)
    examples = encode_texts(_corpus(), tok, max_len=64)
    # fp32 on any device: the recipe (and its cache key) fixes the base, whatever a run's precision policy
    train_cfg = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, scheduler="constant", warmup_steps=cfg.warmup_steps,
                            precision="fp32")
    history: list[dict[str, float]] = []

    def reached(step: int) -> bool:
        res = evaluate(model, tok, general_specs, batch_size=256)
        acc = sum(res.scores.values()) / len(res.scores)
        history.append({"step": step, "general_accuracy": acc})
        logger.info("pretraining step %d: general accuracy %.1f", step, acc)
        return acc >= cfg.target_accuracy

    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    # data_parallel=False: in a multi-process run only rank 0 builds the base (the others wait for the cache)
    stats = train_stage(model, None, examples, cfg.max_steps, train_cfg, cfg.lr, gen, tok.pad_token_id,
                        Accelerator(cpu=not torch.cuda.is_available()), desc="pretrain tiny-world", quiet=quiet,
                        check_every=cfg.eval_every, should_stop=reached, data_parallel=False)
    info = {"steps": stats.steps, "seconds": time.perf_counter() - t0, "history": history,
            "parameters": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(info, indent=2))
    return info


def tinyworld_path(cfg: PretrainConfig, general_specs: list[Any], quiet: bool = False) -> Path:
    """Path of the cached tiny-world base model, building it first when missing (atomic: temp dir + rename)."""
    key = recipe_hash(cfg, [s.content_hash() for s in general_specs])
    final = cache_root() / f"tinyworld-{key}"
    if (final / "pretrain.json").is_file():
        logger.info("tiny-world base model: cache hit %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        logger.info("pretraining the tiny-world base model (recipe %s)", key)
        info = pretrain_tinyworld(cfg, general_specs, tmp, quiet=quiet)
        logger.info("tiny-world base: %d steps, %.0f s, general accuracy %.1f", info["steps"], info["seconds"],
                    info["history"][-1]["general_accuracy"] if info["history"] else float("nan"))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is equally valid
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_base(cfg: ModelConfig, path: str | Path | None = None, precision: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) from ``path`` (tiny-world cache) or ``cfg.name`` (hub id / local dir).

    The weights are stored as ``train.precision`` (``precision``, resolved here when ``auto``) and ``cfg.dtype``
    say: :func:`benchmark.precision.load_dtype`.
    """
    from transformers import AutoModelForCausalLM  # deferred: seconds to import

    tok = load_tokenizer(cfg, path)
    src = str(path if path is not None else cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype(resolve_precision(precision), cfg.dtype),
                                                     revision=cfg.revision if path is None else None,
                                                     trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load model {src!r}: {str(exc).splitlines()[0]}") from exc
    return model, tok


def load_tokenizer(cfg: ModelConfig, path: str | Path | None = None) -> Any:
    """The tokenizer of :func:`load_base` alone (no weights loaded), with its pad token set."""
    from transformers import AutoTokenizer  # deferred: seconds to import

    src = str(path if path is not None else cfg.name)
    local = cfg.name.startswith((".", "/", "~"))
    if path is None and cfg.name != TINY_WORLD and local and not Path(cfg.name).exists():
        raise UserError(f"model path does not exist: {cfg.name!r}")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision if path is None else None)
    except OSError as exc:
        raise UserError(f"cannot load model {src!r}: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.chat_template and not getattr(tok, "chat_template", None):
        raise UserError(f"model.chat_template is on but the tokenizer of {src!r} has no chat template")
    return tok


def prepare_for_training(model: Any, gradient_checkpointing: bool) -> Any:
    """Training-time model settings: gradient checkpointing (recompute activations: less memory, ~30% slower).

    ``enable_input_require_grads`` makes the embedding output require grad, which checkpointed blocks need when
    the embeddings are frozen (LoRA and other adapter methods); the KV cache is off while training.
    """
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def model_slug(name: str) -> str:
    """A file-name-safe model name."""
    return name.rstrip("/").replace("/", "_").replace(":", "_")
