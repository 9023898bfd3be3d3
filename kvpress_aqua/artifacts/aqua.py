"""The AQUA artifact file: write, read, check and find it, without importing torch.

An artifact (made by :func:`kvpress_aqua.calibration.calibrate`, saved by ``kvtool calibrate``) is one
safetensors file holding four float32 tensors, ``projections (layers, kv_heads, d, d)`` and
``spectrum``, ``query_norms``, ``key_norms`` ``(layers, kv_heads, d)``, and its metadata as
JSON-encoded strings, with ``format`` (:data:`FORMAT`) and, since this version, ``tensors_sha256``
(:func:`tensors_sha256`).

Every load checks the file before anything uses it (a flipped byte in a basis otherwise gives
garbage attention, silently): the sha256 when the file records one (older files do not, and still
load if the rest passes); every tensor float32, finite and of the shapes the metadata states;
``spectrum`` non-negative and descending per head; ``query_norms`` and ``key_norms`` non-negative;
every ``projections[l, h]`` orthogonal, ``max |PᵀP - I| <`` :data:`LOAD_ORTHOGONALITY_TOL` in float64.
A failed check raises ``ValueError`` naming the file and the fix (run ``kvtool calibrate`` again).

:meth:`AquaArtifact.load` returns torch tensors by default (``framework="pt"``, what the runtime
policy :class:`~kvpress_aqua.policies.aqua.Aqua` binds; safetensors imports torch then) and numpy
arrays with ``framework="np"`` (the planner).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..model_info import ModelInfo
from ..util.paths import cache_dir

__all__ = [
    "FORMAT",
    "LOAD_ORTHOGONALITY_TOL",
    "SHAPE_KEYS",
    "TENSORS",
    "AquaArtifact",
    "as_float32",
    "as_float64",
    "default_artifact_path",
    "find_artifact",
    "tensors_sha256",
]

FORMAT = "kvpress_aqua.aqua_artifact/1"
"""Value of the ``format`` metadata key of every artifact file; bumped when the layout changes."""
TENSORS = ("projections", "spectrum", "query_norms", "key_norms")
"""The tensors of an artifact, in the order :func:`tensors_sha256` hashes them."""
SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
"""Metadata keys recording the model's attention shapes."""
HASH_KEY = "tensors_sha256"
"""Metadata key of the tensors' sha256, written by :meth:`AquaArtifact.save`."""
LOAD_ORTHOGONALITY_TOL = 1e-4
"""Largest ``|PᵀP - I|`` entry (float64) accepted when loading: float32 storage rounds a basis by about 1e-7
per entry, so an error this large means the file's bytes changed."""
_FRAMEWORKS = ("pt", "np")


def as_float32(array: Any) -> np.ndarray:
    """A C-contiguous little-endian float32 numpy array of ``array`` (numpy, a torch tensor on any device...)."""
    if hasattr(array, "detach"):  # a torch tensor (duck-typed: this module never imports torch)
        array = array.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(array, dtype="<f4")


def as_float64(array: Any) -> np.ndarray:
    """A float64 numpy array of ``array`` (numpy, a torch tensor on any device...)."""
    if hasattr(array, "detach"):
        array = array.detach().to("cpu").double().numpy()
    return np.asarray(array, dtype=np.float64)


def tensors_sha256(arrays: Mapping[str, Any]) -> str:
    """sha256 over the name, shape and float32 little-endian bytes of each of :data:`TENSORS`, in order."""
    digest = hashlib.sha256()
    for name in TENSORS:
        data = as_float32(arrays[name])
        digest.update(f"{name}{list(data.shape)}".encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


def _dtype_name(array: Any) -> str:
    return str(array.dtype).removeprefix("torch.")


@dataclass
class AquaArtifact:
    """Calibrated AQUA bases of one model, with what they were calibrated on.

    The tensors are torch tensors (the runtime, :func:`kvpress_aqua.calibration.calibrate`,
    ``load(framework="pt")``) or numpy arrays (``load(framework="np")``, the planner).

    Attributes
    ----------
    projections : torch.Tensor or numpy.ndarray
        float32 ``(num_layers, num_kv_heads, head_dim, head_dim)``; ``projections[l, h]`` is the
        orthogonal ``P`` of layer ``l``, KV head ``h``, its columns sorted by decreasing energy.
        Rotate with ``x @ P``; keep the first ``r`` columns to keep ``r`` channels.
    spectrum : torch.Tensor or numpy.ndarray
        float32 ``(num_layers, num_kv_heads, head_dim)``: singular values of the normalized stack
        of keys and queries (see :mod:`kvpress_aqua.calibration`), descending; ``sum(s²) = 2`` per head.
    query_norms, key_norms : torch.Tensor or numpy.ndarray
        float32 ``(num_layers, num_kv_heads, head_dim)``: root mean square of each *raw* (unrotated)
        channel over the calibration queries of the KV group, resp. the keys (ThinK's channel
        importance is their product).
    metadata : dict
        JSON-compatible: ``model``, ``fingerprint``, ``model_type``, ``num_layers``, ``num_heads``,
        ``num_kv_heads``, ``head_dim``, ``keys_post_rope``, ``text_source``, ``text_sha256``,
        ``text_chars``, ``tokens``, ``chunk``, ``position_span``, ``seed``, ``package_version``,
        ``transformers_version``, ``created``.
    path : Path or None
        The file the artifact was loaded from or last saved to.

    """

    projections: Any
    spectrum: Any
    query_norms: Any
    key_norms: Any
    metadata: dict[str, Any]
    path: Path | None = field(default=None, compare=False)

    def save(self, path: str | Path) -> Path:
        """Write the tensors (float32) and the metadata (JSON-encoded values) as one safetensors file.

        The metadata also records ``format`` and the tensors' sha256 (:func:`tensors_sha256`), which
        :meth:`load` verifies. The file is written next to its destination and renamed into place, so
        readers never see a partial artifact. Returns the path written.
        """
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: as_float32(getattr(self, name)) for name in TENSORS}
        extra = {"format": FORMAT, HASH_KEY: tensors_sha256(arrays)}
        metadata = {key: json.dumps(value) for key, value in {**self.metadata, **extra}.items()}
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            save_file(arrays, str(partial), metadata=metadata)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, framework: str = "pt") -> AquaArtifact:
        """Read and check an artifact written by :meth:`save`.

        Parameters
        ----------
        path : str or Path
            The safetensors file.
        framework : {"pt", "np"}, default "pt"
            ``"pt"``: torch tensors (imports torch); ``"np"``: numpy arrays.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a readable AQUA artifact of this format (truncated, another file), or
            fails the integrity checks of the module docstring; the message names the file and the fix.

        """
        if framework not in _FRAMEWORKS:
            raise ValueError(f"framework {framework!r}: use 'pt' (torch tensors) or 'np' (numpy arrays)")
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no AQUA artifact at {path}")
        try:
            with safe_open(str(path), framework=framework) as f:
                raw = f.metadata() or {}
                missing = [name for name in TENSORS if name not in f.keys()]
                tensors = {name: f.get_tensor(name) for name in TENSORS if name not in missing}
        except (OSError, SafetensorError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); if it is an AQUA artifact it "
                             "is damaged (truncated?): run `kvtool calibrate <model>` again") from None
        if raw.get("format") != json.dumps(FORMAT):
            raise ValueError(f"{path} is not an AQUA artifact of format {FORMAT!r} (format: {raw.get('format')})")
        try:
            metadata = {key: json.loads(value) for key, value in raw.items() if key != "format"}
        except json.JSONDecodeError as err:
            raise ValueError(f"AQUA artifact {path} has unreadable metadata ({err}); run `kvtool calibrate "
                             "<model>` again") from None
        recorded = metadata.pop(HASH_KEY, None)
        fix = f"run `kvtool calibrate {metadata.get('model') or '<model>'}` again"
        if missing:
            raise ValueError(f"AQUA artifact {path} lacks the tensors {', '.join(missing)}; {fix}")
        problem = _integrity_problem(tensors, metadata, recorded)
        if problem:
            raise ValueError(f"AQUA artifact {path} is corrupted: {problem}; {fix} to rebuild it")
        return cls(**tensors, metadata=metadata, path=path)

    def check_model(self, info: ModelInfo) -> None:
        """Raise ``ValueError`` unless the artifact was calibrated for a model of ``info``'s fingerprint and shapes."""
        where = self.path or "(not saved)"
        meta = self.metadata
        if meta.get("fingerprint") != info.fingerprint:
            raise ValueError(
                f"AQUA artifact at {where} was calibrated for model {meta.get('model')} (fingerprint "
                f"{meta.get('fingerprint')}), not {info.name} (fingerprint {info.fingerprint}); "
                f"run `kvtool calibrate {info.name}`"
            )
        expected = (info.num_layers, info.num_kv_heads, info.head_dim, info.head_dim)
        if tuple(self.projections.shape) != expected or tuple(self.spectrum.shape) != expected[:3]:
            raise ValueError(
                f"AQUA artifact at {where} holds projections {tuple(self.projections.shape)} and spectrum "
                f"{tuple(self.spectrum.shape)}, but {info.name} needs (layers, kv_heads, head_dim, head_dim) = "
                f"{expected}; run `kvtool calibrate {info.name}`"
            )

    def energy(self, rank: int) -> Any:
        """Fraction of the squared singular mass held by the first ``rank`` channels.

        Parameters
        ----------
        rank : int
            Channels kept, ``0 <= rank <= head_dim``.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            float64 ``(num_layers, num_kv_heads)`` in ``[0, 1]``, of the spectrum's kind.

        """
        head_dim = self.spectrum.shape[-1]
        if not 0 <= rank <= head_dim:
            raise ValueError(f"rank {rank} is outside 0..{head_dim} (head_dim)")
        s = self.spectrum
        power = (s.double() if hasattr(s, "double") else np.asarray(s, dtype=np.float64)) ** 2
        return power[..., :rank].sum(-1) / power.sum(-1)


def _integrity_problem(tensors: Mapping[str, Any], metadata: Mapping[str, Any], recorded: str | None) -> str:
    """What is wrong with an artifact's tensors (``""``: nothing); see the module docstring for the checks."""
    if recorded is not None and tensors_sha256(tensors) != recorded:
        return f"its tensors do not match the sha256 recorded when it was saved ({recorded[:12]}...)"
    odd = [f"{name} is {_dtype_name(t)}" for name, t in tensors.items() if _dtype_name(t) != "float32"]
    if odd:
        return f"the tensors must be float32 ({', '.join(odd)})"
    arrays = {name: as_float32(t) for name, t in tensors.items()}
    p = arrays["projections"]
    if p.ndim != 4:
        return f"projections have shape {p.shape}, expected (layers, kv_heads, head_dim, head_dim)"
    stated = tuple(metadata.get(key) for key in ("num_layers", "num_kv_heads", "head_dim"))
    expected = stated if None not in stated else p.shape[:3]  # files without the shape keys: self-consistency
    if p.shape != (*expected, expected[-1]):
        return f"projections have shape {p.shape}, expected (layers, kv_heads, head_dim, head_dim) = {expected}"
    for name in TENSORS[1:]:
        if arrays[name].shape != expected:
            return f"{name} has shape {arrays[name].shape}, expected (layers, kv_heads, head_dim) = {expected}"
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            return f"{name} holds NaN or infinite values"
    for name in TENSORS[1:]:
        if (arrays[name] < 0).any():
            return f"{name} holds negative values"
    s = arrays["spectrum"]
    rising = np.argwhere(s[..., :-1] < s[..., 1:])
    if len(rising):
        layer, head, channel = (int(x) for x in rising[0])
        return f"spectrum[{layer}, {head}] rises at channel {channel + 1} (singular values are sorted descending)"
    p64 = p.astype(np.float64)
    error = np.abs(np.swapaxes(p64, -1, -2) @ p64 - np.eye(p.shape[-1])).max(axis=(-2, -1))
    if error.size == 0:
        return "projections hold no layer or no KV head"
    worst = np.unravel_index(int(np.argmax(error)), error.shape)
    if not error[worst] < LOAD_ORTHOGONALITY_TOL:
        layer, head = (int(x) for x in worst)
        return (f"projections[{layer}, {head}] is not orthogonal (max |PᵀP - I| = {float(error[worst]):.2e}, "
                f"tolerance {LOAD_ORTHOGONALITY_TOL:g})")
    return ""


def default_artifact_path(info: ModelInfo) -> Path:
    """``cache_dir() / "aqua" / "<model name>-<fingerprint>.safetensors"``.

    The model name is the last component of ``info.name`` made file-safe, so a hub id
    (``HuggingFaceTB/SmolLM2-135M-Instruct``) and a local copy in a folder of the same name share one file.
    """
    return cache_dir() / "aqua" / f"{_safe_name(info.name)}-{info.fingerprint}.safetensors"


def find_artifact(info: ModelInfo, framework: str = "pt") -> AquaArtifact:
    """Load the artifact ``kvtool calibrate`` wrote for ``info``'s model.

    The file named after the model is preferred. Failing that, a single artifact with the same
    fingerprint is used: the same checkpoint is often named differently (hub id, short name,
    local folder), and the fingerprint pins every shape the artifact depends on.

    Parameters
    ----------
    info : ModelInfo
        The model.
    framework : {"pt", "np"}, default "pt"
        Tensors as torch tensors or numpy arrays (:meth:`AquaArtifact.load`).

    Raises
    ------
    FileNotFoundError
        If there is none; the message gives the command that makes it.
    ValueError
        If several artifacts share the fingerprint and none is named after the model, or the file
        fails its checks.

    """
    path = default_artifact_path(info)
    if path.is_file():
        return AquaArtifact.load(path, framework)
    same = sorted(path.parent.glob(f"*-{info.fingerprint}.safetensors"))
    if len(same) == 1:
        return AquaArtifact.load(same[0], framework)
    if same:
        raise ValueError(
            f"several AQUA artifacts match model {info.name} (fingerprint {info.fingerprint}): "
            f"{', '.join(str(p) for p in same)}; pass one explicitly or run `kvtool calibrate {info.name}`"
        )
    raise FileNotFoundError(
        f"no AQUA artifact for model {info.name} (fingerprint {info.fingerprint}) at {path}; "
        f"make it with `kvtool calibrate {info.name}`"
    )


def _safe_name(name: str) -> str:
    """The last path component of a model name, with characters other than letters, digits, ``._-`` replaced."""
    last = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")[:80] or "model"
