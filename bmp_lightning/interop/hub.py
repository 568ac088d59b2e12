"""Official weights by name: which hub repository and file each name is, fetched with ``huggingface_hub`` (cached).

    resolve_weights("maskpose-b")        # -> the cached path of vrg-prague/BBoxMaskPose/MaskPose-b.pth
    resolve_weights("weights/x.pth")     # a local path is returned as it is

Every place that takes a checkpoint (``model.init_weights``, ``bmp detector= pose= sam=``, ``from_pretrained``)
goes through :func:`resolve_weights`, so the names work everywhere a path does. When a file cannot be had
(offline, no cache, hub unreachable) :class:`WeightsUnavailableError` names the repository, the file, the one
command that downloads it and the local path that works instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BMP_REPO = "vrg-prague/BBoxMaskPose"
WEIGHTS_DIR = "weights"


@dataclass(frozen=True)
class HubWeights:
    """One published weights file.

    Attributes:
        name: the short name users type (``maskpose-b``).
        repo: Hugging Face repository id.
        filename: file inside the repository.
        kind: ``pose`` | ``detector`` | ``sam`` | ``mae``.
        description: what the file is, for tables and messages.
    """

    name: str
    repo: str
    filename: str
    kind: str
    description: str

    @property
    def command(self) -> str:
        """The one command that puts the file at :attr:`local_path` (``hf`` ships with huggingface_hub); for ``mae``
        into the Hugging Face cache, where timm reads it (a local copy is not a pose weights file)."""
        if self.kind == "mae":
            return f"hf download {self.repo} {self.filename}"
        return f"hf download {self.repo} {self.filename} --local-dir {WEIGHTS_DIR}"

    @property
    def local_path(self) -> str:
        return f"{WEIGHTS_DIR}/{self.filename}"

    @property
    def source(self) -> str:
        return f"hub {self.repo} / {self.filename}"


_SAM2 = {
    "t": ("tiny", "tiny"),
    "s": ("small", "small"),
    "b+": ("base-plus", "base_plus"),
    "l": ("large", "large"),
}

HUB_WEIGHTS: dict[str, HubWeights] = {
    w.name: w
    for w in (
        HubWeights("vitpose-b-multi", BMP_REPO, "ViTPose-b-multi_mmpose20.pth", "pose",
                   "ViTPose-B trained on COCO+MPII+AIC (21 keypoints), MMPose format"),
        HubWeights("maskpose-b", BMP_REPO, "MaskPose-b.pth", "pose",
                   "MaskPose-B (ViTPose-B conditioned on the instance mask), MMPose format"),
        HubWeights("rtmdet-l-bmp", BMP_REPO, "rtmdet-ins-l-mask.pth", "detector",
                   "RTMDet-Ins-L fine-tuned with masked-out people (ignores the loop's holes), MMDetection format"),
        *(
            HubWeights(f"sam2.1-{short}", f"facebook/sam2.1-hiera-{repo}", f"sam2.1_hiera_{fname}.pt", "sam",
                       f"Meta's SAM 2.1 Hiera-{repo} checkpoint (sam2 format, mapped onto transformers' Sam2Model)")
            for short, (repo, fname) in _SAM2.items()
        ),
        HubWeights("mae", "timm/vit_base_patch16_224.mae", "model.safetensors", "mae",
                   "MAE ImageNet ViT-B/16 (timm), the ViTPose-B backbone initialisation"),
    )
}  # fmt: skip


class WeightsUnavailableError(FileNotFoundError):
    """A named weights file could not be fetched (offline, not cached, hub unreachable)."""


def hub_weights(spec: object) -> HubWeights | None:
    """The registry entry of a name (case-insensitive), else None (a path, or an unknown string)."""
    if not isinstance(spec, str):
        return None
    return HUB_WEIGHTS.get(spec.strip().lower())


def known_file(path: str | os.PathLike) -> HubWeights | None:
    """The registry entry whose file name a local path carries (``weights/MaskPose-b.pth`` -> ``maskpose-b``)."""
    name = Path(os.fspath(path)).name
    return next((w for w in HUB_WEIGHTS.values() if w.filename == name), None)


def unavailable_message(w: HubWeights, reason: str, key: str | None = None) -> str:
    use = f"{key}={w.local_path}" if key else w.local_path
    return (
        f"'{w.name}' ({w.description}) is not available: {reason}. It is the file {w.filename} of the Hugging "
        f"Face repository {w.repo}. Download it where there is network access with\n    {w.command}\n"
        f"then pass the local file ({use}), or copy the Hugging Face cache ($HF_HOME) to this machine."
    )


def cached_path(w: HubWeights) -> str | None:
    """The file in the local Hugging Face cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(w.repo, w.filename)
    return hit if isinstance(hit, str) else None


def download(w: HubWeights, key: str | None = None) -> str:
    """``hf_hub_download`` (honours ``HF_HUB_OFFLINE`` and the cache) with one clear error on failure."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(w.repo, w.filename)
    except Exception as err:  # offline mode, no cache, HTTP errors, gated repo: all end the same way for the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise WeightsUnavailableError(unavailable_message(w, f"{type(err).__name__}: {reason}", key)) from None


def resolve_weights(spec: str | os.PathLike, key: str | None = None, kind: str | None = None) -> str:
    """A weights name -> its downloaded (cached) path; anything else (a path) -> unchanged as a string.

    Args:
        spec: a name of :data:`HUB_WEIGHTS` or a path.
        key: the config key the value came from, for the error message (``model.init_weights``).
        kind: when given, a name of another kind is refused (``sam2.1-b+`` as pose weights).
    """
    w = hub_weights(spec)
    if w is None:
        return os.fspath(spec)
    if kind is not None and w.kind != kind:
        names = ", ".join(n for n, x in HUB_WEIGHTS.items() if x.kind == kind)
        raise ValueError(f"{key or 'weights'}={spec}: '{w.name}' is {w.kind} weights, not {kind} ({names})")
    return download(w, key)


def zoo_table() -> str:
    """Markdown table of the names (README / ``python -m bmp_lightning.doctor --zoo``)."""
    rows = ["| name | repository / file | what it is |", "| --- | --- | --- |"]
    rows += [f"| `{w.name}` | `{w.repo}` / `{w.filename}` | {w.description} |" for w in HUB_WEIGHTS.values()]
    return "\n".join(rows)
