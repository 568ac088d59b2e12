"""Official MMPose / MMDetection weights -> this project's weights files.

    python -m bmp_lightning.convert src=MaskPose-b.pth|maskpose-b [out=weights/maskpose_b.pth] [kind=auto|pose|det]
        [use_mask=auto|true|false] [num_classes=N] [num_heads=N] [strict=true|false] [allow_objects=false|true]

- ``src`` is a file or a name of the published weights (``maskpose-b``, ``vitpose-b-multi``, ``rtmdet-l-bmp``:
  fetched from ``vrg-prague/BBoxMaskPose`` with huggingface_hub; default ``out`` then ``weights/<file stem>_bmp.pth``).
- kind ``auto`` reads the keys: MMPose ViTPose / MaskPose (``backbone.layers.*``, ``head.final_layer.*``; also the
  original ViTPose repo's ``keypoint_head.*``) -> ``pose``; MMDetection RTMDet-Ins (``bbox_head.rtm_cls.*``) -> ``det``.
- The file is read with ``torch.load(weights_only=True)``: a file that pickles other Python objects is refused
  unless ``allow_objects=true``, which keeps such objects as inert placeholders (nothing from the file runs).
- The converted weights are loaded into the matching network (pose: the ViTPose preset with the file's width, depth
  and keypoint count; det: the RTMDet-Ins size read off the weights) and every missing / unexpected / mismatched key is
  reported; ``strict=true`` (default) writes nothing when any key does not match.
- Output (written atomically): pose -> ``{state_dict, net_config, use_mask}`` that
  ``PoseEstimator.from_checkpoint`` and ``model.init_weights`` read; det -> ``{state_dict, model_config}`` that
  ``Detector.from_checkpoint`` reads. Default ``out``: ``<src stem>_bmp.pth`` beside ``src``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bmp_lightning.interop.hub import HUB_WEIGHTS, WEIGHTS_DIR, hub_weights, resolve_weights
from bmp_lightning.interop.mmdet import convert_mmdet_rtmdet
from bmp_lightning.interop.mmpose import NUM_PATCHES_256x192, convert_mmpose_vitpose
from bmp_lightning.interop.pose_weights import export_pose_weights, infer_net_kwargs
from bmp_lightning.models.components.pose_net import VITPOSE_SIZES
from bmp_lightning.models.components.rtmdet.rtmdet_ins import build_rtmdet_ins, infer_rtmdet_ins_config
from bmp_lightning.structures.checkpoint import LoadReport, extract_state_dict, load_state_dict_report, safe_load
from bmp_lightning.structures.errors import UnsafeCheckpointError
from bmp_lightning.structures.files import atomic_torch_save
from bmp_lightning.utils.cli import parse_key_values

log = logging.getLogger("bmp_lightning.convert")

Kind = Literal["pose", "det"]
# (width, depth) -> (preset, attention heads) of the ViTPose presets (pose_net's size table)
_POSE_PRESETS: dict[tuple[int, int], tuple[str, int]] = {
    (s.embed_dim, s.depth): (name, s.num_heads) for name, s in VITPOSE_SIZES.items()
}


@dataclass
class ConvertResult:
    """What :func:`convert_checkpoint` did: the detected kind, the output file, the load report, the model config."""

    kind: Kind
    out: Path
    report: LoadReport
    config: dict[str, Any]


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor mapping of a checkpoint (``state_dict`` / ``model`` / ``module`` / bare), ``module.`` stripped;
    empty when there is none."""
    try:
        return extract_state_dict(obj)
    except ValueError:
        return {}


def detect_kind(checkpoint: Mapping[str, Any]) -> Kind:
    """``pose`` for MMPose / original-ViTPose ViTPose weights, ``det`` for MMDetection RTMDet(-Ins) weights.

    Raises:
        ValueError: the keys match neither (the message lists a few of them).
    """
    sd = _tensors(checkpoint)
    if any(k.startswith(("bbox_head.rtm_cls.", "bbox_head.tood_cls.")) for k in sd):
        return "det"
    pose_prefixes = ("backbone.layers.", "backbone.patch_embed.projection.", "head.final_layer.", "keypoint_head.")
    if any(k.startswith(pose_prefixes) for k in sd):
        return "pose"
    sample = sorted(sd)[:8] if sd else sorted(map(str, checkpoint))[:8]
    raise ValueError(
        "cannot tell the checkpoint kind: expected MMPose ViTPose keys (backbone.layers.*, head.final_layer.*) or "
        f"MMDetection RTMDet keys (bbox_head.rtm_cls.*); found e.g. {sample}. Pass kind=pose or kind=det."
    )


def pose_net_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """The Hydra config of the network that matches converted pose weights (what ``PoseEstimator`` rebuilds).

    A ViTPose preset (S / B / L / H at 256x192 with 256-channel deconvs) when the widths and depth match one; otherwise
    ``vitpose_tiny`` with every dimension spelled out. The head count is not in the weights (qkv is fused): presets
    know theirs, otherwise ``num_heads`` or a 64-dim-head guess is used.
    """

    kw = infer_net_kwargs(dict(sd))
    preset = _POSE_PRESETS.get((kw["embed_dim"], int(kw["depth"])))
    standard = tuple(kw["deconv_channels"]) == (256, 256) and sd["backbone.pos_embed"].shape[1] == 192
    if preset is not None and standard and num_heads in (None, preset[1]):
        return {
            "_target_": f"bmp_lightning.models.components.pose_net.{preset[0]}",
            "num_keypoints": kw["num_keypoints"],
            "drop_path_rate": 0.0,  # inference; training configs set their own
        }
    if num_heads is None:
        log.warning("pose weights match no preset: assuming %d attention heads (pass num_heads=...)", kw["num_heads"])
    return {
        "_target_": "bmp_lightning.models.components.pose_net.vitpose_tiny",
        "num_keypoints": kw["num_keypoints"],
        "embed_dim": kw["embed_dim"],
        "depth": kw["depth"],
        "num_heads": int(num_heads or kw["num_heads"]),
        "deconv_channels": list(kw["deconv_channels"]),
        "img_size": list(kw["img_size"]),
        "drop_path_rate": 0.0,
    }


def _convert_pose(
    ckpt: Mapping[str, Any], src: Path, out: Path, use_mask: bool | None, num_heads: int | None, strict: bool
) -> tuple[LoadReport, dict[str, Any]]:
    import hydra

    sd = _tensors(ckpt)
    rows = int(sd["backbone.pos_embed"].shape[1]) if "backbone.pos_embed" in sd else NUM_PATCHES_256x192
    # a 193-row pos_embed carries a cls slot; anything else is the file's own token grid
    num_patches = rows - 1 if rows == NUM_PATCHES_256x192 + 1 else rows
    converted = convert_mmpose_vitpose(ckpt, num_patches=num_patches)
    if "head.final_layer.weight" not in converted or "backbone.pos_embed" not in converted:
        raise ValueError(f"{src}: no head.final_layer / backbone.pos_embed after conversion: not a ViTPose checkpoint")
    config = pose_net_config(converted, num_heads)
    net = hydra.utils.instantiate(config)
    report = load_state_dict_report(net, converted, strict=False, name=str(src))
    _check(report, src, strict)
    if use_mask is None:
        use_mask = "mask" in src.name.lower()
    export_pose_weights(net, out, config, use_mask=use_mask)
    return report, {"net_config": config, "num_keypoints": net.num_keypoints, "use_mask": use_mask}


def _convert_det(
    ckpt: Mapping[str, Any], src: Path, out: Path, num_classes: int | None, strict: bool
) -> tuple[LoadReport, dict[str, Any]]:

    converted = convert_mmdet_rtmdet(ckpt, num_classes)
    config = infer_rtmdet_ins_config(converted)
    model = build_rtmdet_ins(**config)
    report = load_state_dict_report(model, converted, strict=False, name=str(src))
    _check(report, src, strict)
    atomic_torch_save({"state_dict": model.state_dict(), "model_config": config}, out)
    return report, {"model_config": config}


def _check(report: LoadReport, src: Path, strict: bool) -> None:
    if report.ok or not strict:
        if not report.ok:
            log.warning("%s: writing despite key mismatches (strict=false); unmatched entries keep their init", src)
        return
    parts = [f"{len(v)} {n}: {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
             for n, v in zip(("missing", "unexpected", "mismatched"), report) if v]  # fmt: skip
    raise ValueError(f"{src}: converted weights do not match the network ({'; '.join(parts)}); strict=false writes "
                     "them anyway")  # fmt: skip


def convert_checkpoint(
    src: str | Path,
    out: str | Path | None = None,
    kind: Literal["auto", "pose", "det"] = "auto",
    use_mask: bool | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    strict: bool = True,
    allow_objects: bool = False,
) -> ConvertResult:
    """Convert an official MMPose ViTPose/MaskPose or MMDetection RTMDet-Ins ``.pth`` into our weights file.

    Args:
        src: the downloaded checkpoint, or a name of :data:`~bmp_lightning.interop.hub.HUB_WEIGHTS`.
        out: output file (default ``<src stem>_bmp.pth`` beside ``src``); never ``src`` itself.
        kind: ``auto`` (from the keys), ``pose`` or ``det``.
        use_mask: pose only: store the model as a MaskPose (``None``: ``True`` when the file name contains *mask*).
        num_classes: det only: keep the first classes (``1`` = person of a COCO model); ``None`` keeps all.
        num_heads: pose only: attention heads of a non-preset ViT (not readable from the weights).
        strict: refuse to write when any key is missing, unexpected or shape-mismatched.
        allow_objects: accept files that pickle Python objects besides tensors/containers/numpy (kept inert).

    Raises:
        UnsafeCheckpointError: the file references Python classes and ``allow_objects`` is False.
        ValueError: unknown kind, or key mismatches with ``strict``.
    """

    named = hub_weights(src)
    if named is None and not Path(src).exists() and "/" in str(src) and not str(src).endswith((".pth", ".pt")):
        names = ", ".join(n for n, w in HUB_WEIGHTS.items() if w.kind in ("pose", "detector"))
        raise FileNotFoundError(f"src={src}: not a file. Official weights are converted by name: src=<{names}>")
    src = Path(resolve_weights(src, key="src"))
    if out is None and named is not None:  # not beside the file in the Hugging Face cache
        out = Path(WEIGHTS_DIR) / f"{src.stem}_bmp.pth"
    out = Path(out) if out else src.with_name(f"{src.stem}_bmp.pth")
    if out.resolve() == src.resolve():
        raise ValueError(f"out={out} would overwrite the source checkpoint")
    ckpt = safe_load(src, placeholders=allow_objects)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{src}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if kind == "auto":
        try:
            kind = detect_kind(ckpt)
        except ValueError as err:
            raise ValueError(f"{src}: {err}") from None
    if kind == "pose":
        report, config = _convert_pose(ckpt, src, out, use_mask, num_heads, strict)
    elif kind == "det":
        report, config = _convert_det(ckpt, src, out, num_classes, strict)
    else:
        raise ValueError(f"kind must be auto, pose or det, got {kind!r}")
    return ConvertResult(kind, out, report, config)


def _parse_bool(key: str, value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("auto", "none", "null", ""):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{key}={value!r}: expected true, false or auto")


def main(argv: Sequence[str] | None = None) -> ConvertResult:
    """``key=value`` command line (see the module docstring); exits with a one-line error on bad input."""
    args = parse_key_values(sys.argv[1:] if argv is None else argv, __doc__ or "")
    allowed = {"src", "out", "kind", "use_mask", "num_classes", "num_heads", "strict", "allow_objects"}
    if bad := sorted(set(args) - allowed):
        raise SystemExit(f"unknown arguments {bad}; allowed: {sorted(allowed)}")
    if not args.get("src"):
        raise SystemExit(f"src=<checkpoint .pth> is required\n{__doc__}")
    try:
        result = convert_checkpoint(
            args["src"],
            args.get("out") or None,
            kind=args.get("kind", "auto"),  # type: ignore[arg-type]
            use_mask=_parse_bool("use_mask", args.get("use_mask", "auto")),
            num_classes=int(args["num_classes"]) if args.get("num_classes") else None,
            num_heads=int(args["num_heads"]) if args.get("num_heads") else None,
            strict=_parse_bool("strict", args.get("strict", "true")) is not False,
            allow_objects=bool(_parse_bool("allow_objects", args.get("allow_objects", "false"))),
        )
    except UnsafeCheckpointError as err:
        hint = "convert: pass allow_objects=true to keep such objects as inert placeholders"
        raise SystemExit(f"error: {err}\n({hint})") from None
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None
    r = result.report
    status = "all keys matched" if r.ok else (
        f"{len(r.missing_keys)} missing, {len(r.unexpected_keys)} unexpected, {len(r.mismatched_keys)} mismatched"
    )  # fmt: skip
    print(f"{args['src']}: {result.kind} checkpoint, {status}; wrote {result.out}")
    print(f"config: {result.config}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
