"""Preflight: every input a composed config needs, checked at once, with where each one comes from.

``python -m bmp_lightning.doctor`` prints the table; ``train``, ``eval`` and ``bmp`` call :func:`preflight` first
thing in their task function, before any logger, W&B run, DDP spawn or data loading, and stop with the table of
what is missing (exit status 1).

Which config values are inputs is declared once, in :data:`INPUT_KEYS` (a dotted key, ``*`` for every list item,
the kind of input, the key of the folder a relative path is under, the tasks that read it). Where a missing file
comes from is the second table, :data:`SOURCES` (a path pattern -> a dataset site or the repository command that
generates it); weights by name come from :mod:`bmp_lightning.interop.hub`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bmp_lightning.interop.hub import WeightsUnavailableError, cached_path, download, hub_weights, known_file

log = logging.getLogger("bmp_lightning.preflight")


@dataclass(frozen=True)
class InputKey:
    """A config value that names an input.

    Attributes:
        key: dotted key; ``*`` stands for every item of a list (``data.val_sets.*.ann_file``).
        kind: ``weights`` | ``checkpoint`` | ``annotations`` | ``images`` | ``detections`` | ``sam``.
        root: key of the folder a relative path is under (``data.root``), or None.
        tasks: the tasks that read it (``cfg.task_name``); None = every task.
        when: an extra condition on the config.
    """

    key: str
    kind: str
    root: str | None = None
    tasks: tuple[str, ...] | None = None
    when: Callable[[DictConfig], bool] | None = None


def _not_synthetic(cfg: DictConfig) -> bool:  # the synthetic generator writes these files on first use
    return not OmegaConf.select(cfg, "data.synthetic")


def _split_not_synthetic(cfg: DictConfig) -> bool:
    return not OmegaConf.select(cfg, "split.synthetic")


def _segmenter_sam2(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "loop.segmenter", default="sam2")) == "sam2"


def _pose_module(cfg: DictConfig) -> bool:
    return "pose_module" in str(OmegaConf.select(cfg, "model._target_", default=""))


_TRAIN = ("train",)
INPUT_KEYS: tuple[InputKey, ...] = (
    # train / eval: network initialisation and resume
    InputKey("model.init_weights", "weights"),
    InputKey("ckpt_path", "checkpoint"),
    # PoseDataModule (conf/data/*.yaml)
    InputKey("data.train_sources.*.ann_file", "annotations", "data.root", _TRAIN, _not_synthetic),
    InputKey("data.train_sources.*.img_dir", "images", "data.root", _TRAIN, _not_synthetic),
    InputKey("data.val_sets.*.ann_file", "annotations", "data.root", None, _not_synthetic),
    InputKey("data.val_sets.*.img_dir", "images", "data.root", None, _not_synthetic),
    InputKey("data.val_sets.*.bbox_file", "detections", "data.root", None, _not_synthetic),
    # InstSegDataModule (conf/data/instseg_*.yaml)
    InputKey("data.train_ann", "annotations", "data.root", _TRAIN, _not_synthetic),
    InputKey("data.train_img_dir", "images", "data.root", _TRAIN, _not_synthetic),
    InputKey("data.val_ann", "annotations", "data.root", None, _not_synthetic),
    InputKey("data.val_img_dir", "images", "data.root", None, _not_synthetic),
    # the BMP job / demo (conf/bmp.yaml, conf/split/*.yaml, conf/demo.yaml)
    InputKey("split.ann_file", "annotations", None, ("bmp",), _split_not_synthetic),
    InputKey("split.img_dir", "images", None, ("bmp",), _split_not_synthetic),
    InputKey("input", "images", None, ("demo",)),
    InputKey("detector", "weights", None, ("bmp", "demo")),
    InputKey("pose", "weights", None, ("bmp", "demo")),
    InputKey("sam", "sam", None, ("bmp", "demo"), _segmenter_sam2),
)

# Where a missing file comes from: (regex on the path with "/" separators, source). {path} is the expected path,
# {stem} the file name without the `_sam` part (mpii_sam_train.json -> mpii_train.json), {dir} its folder.
_COCO = "COCO 2017, https://cocodataset.org/#download"
_COCO_ANN = f"{_COCO} (annotations_trainval2017.zip)"
SOURCES: tuple[tuple[str, str], ...] = (
    (r"coco/annotations/(person_keypoints|instances)_(train|val)2017\.json$", _COCO_ANN),
    (r"coco/(train|val)2017/?$", f"{_COCO} ({{name}}.zip)"),
    (r"coco/detections/rtmdet-l-ins-mask\.json$",
     "python -m bmp_lightning.tools.make_detections ann={root}/coco/annotations/person_keypoints_val2017.json "
     "images={root}/coco/val2017 detector=rtmdet-l-bmp out={path}"),
    (r"coco/person_detection_results/", "MMPose's COCO person detections, https://download.openmmlab.com/mmpose/"),
    (r"mpii/annotations/mpii_sam_(train|val)\.json$",
     "python -m bmp_lightning.tools.make_sam_masks ann={dir}/{stem} images={images} sam=sam2.1-b+ "
     "(SAM masks added to MMPose's MPII json {stem}, https://download.openmmlab.com/mmpose/datasets/mpii_annotations.tar)"),
    (r"mpii/annotations/mpii_(train|val)\.json$",
     "MMPose's MPII annotations, https://download.openmmlab.com/mmpose/datasets/mpii_annotations.tar"),
    (r"mpii/images/?$", "MPII Human Pose images, http://human-pose.mpi-inf.mpg.de/ (mpii_human_pose_v1.tar.gz)"),
    (r"aic/annotations/aic_sam_(train|val)\.json$",
     "python -m bmp_lightning.tools.make_sam_masks ann={dir}/{stem} images={images} "
     "sam=sam2.1-b+ (SAM masks added to MMPose's AIC json {stem}, "
     "https://download.openmmlab.com/mmpose/datasets/aic_annotations.tar)"),
    (r"aic/annotations/aic_(train|val)\.json$",
     "MMPose's AIC annotations, https://download.openmmlab.com/mmpose/datasets/aic_annotations.tar"),
    (r"aic/ai_challenger_keypoint_", "AI Challenger keypoint images (see MMPose's dataset docs, 'AI Challenger')"),
    (r"ochuman/", "OCHuman, https://github.com/liruilong940607/OCHumanApi (images + COCO-format json)"),
    (r"crowdpose/", "CrowdPose, https://github.com/Jeff-sjtu/CrowdPose"),
    (r"rtmdet-ins_l_8xb32-300e_coco_20221124_103237-78d1d652\.pth$",
     "MMDetection's COCO RTMDet-Ins-L, https://download.openmmlab.com/mmdetection/v3.0/rtmdet/"
     "rtmdet-ins_l_8xb32-300e_coco/rtmdet-ins_l_8xb32-300e_coco_20221124_103237-78d1d652.pth"),
)  # fmt: skip

_OPTIONAL = ("", "none", "null", "tiny_random")


@dataclass
class Requirement:
    """One input of a run: the config key, what it is, where it is expected, whether it is there, its source."""

    key: str
    kind: str
    path: str
    found: bool
    source: str


class MissingInputsError(SystemExit):
    """Raised by :func:`preflight`: exits with status 1 and the table, without a traceback (a ``SystemExit``)."""

    def __init__(self, missing: list[Requirement], task: str) -> None:
        self.missing = missing
        super().__init__(format_table(missing, title=f"{task}: {len(missing)} missing input(s), nothing was started"))


# ---------------------------------------------------------------------------------------------- walking the config
def _select(cfg: Any, parts: list[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(concrete key, value) for a dotted key with ``*`` wildcards; absent keys yield nothing."""
    if not parts:
        yield prefix, cfg
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(cfg, (ListConfig, list)):
            for i, item in enumerate(cfg):
                yield from _select(item, rest, f"{prefix}.{i}" if prefix else str(i))
        return
    if isinstance(cfg, (DictConfig, dict)) and head in cfg:
        yield from _select(cfg[head], rest, f"{prefix}.{head}" if prefix else head)


def _source_for(path: str, root: str | None, images: str | None = None) -> str:
    """The source of a path by :data:`SOURCES`; ``images``: the image folder of the same entry (for commands)."""
    p = path.replace(os.sep, "/")
    name = Path(p).name
    fields = dict(path=path, root=root or ".", dir=str(Path(path).parent), stem=name.replace("_sam_", "_"),
                  name=name, images=images or "<its image folder>")  # fmt: skip
    for pattern, source in SOURCES:
        if re.search(pattern, p):
            return source.format(**fields)
    return "your file (no known source)"


def _weights_requirement(key: str, value: str, kind: str, cfg: DictConfig, fetch: bool) -> Requirement | None:

    if kind == "checkpoint" and value == "auto":
        return None  # resumes the latest run when there is one
    if value.lower() == "mae" and key == "model.init_weights":
        if OmegaConf.select(cfg, "model.allow_random_init", default=False):
            return None
        w = hub_weights("mae")
    else:
        w = hub_weights(value)
    if w is not None:
        where = cached_path(w)
        if where is None and fetch:
            try:
                where = download(w, key)
            except WeightsUnavailableError:
                where = None
        path = where or f"HF cache ({w.repo}/{w.filename})" + ("" if w.kind == "mae" else f" or {w.local_path}")
        src = f"{w.source}: {w.command}"
        if w.kind == "mae":
            src += " (or model.allow_random_init=true to train from random weights)"
        return Requirement(key, f"{kind}: {w.name}", path, where is not None, src)
    known = known_file(value)
    src = f"{known.source}: {known.command} (or {key}={known.name})" if known else _source_for(value, None)
    if kind == "sam" and not Path(value).exists():  # a transformers-format hub id: cached or downloaded on use
        return Requirement(key, "sam (transformers format)", value, _hf_repo_cached(value),
                           "hub (transformers format); or sam=sam2.1-b+ for Meta's checkpoint by name")  # fmt: skip
    return Requirement(key, kind, value, Path(value).exists(), src)


def _join(root: Any, value: str) -> str:
    return value if (os.path.isabs(value) or not root) else os.path.join(str(root), value)


def _hf_repo_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def collect_requirements(cfg: DictConfig, fetch: bool = False) -> list[Requirement]:
    """Every input of the composed config, found or not (see :data:`INPUT_KEYS`).

    Args:
        fetch: download weights named by the hub that are not cached yet (what the run itself would do); False
            only looks into the local Hugging Face cache.
    """
    task = str(OmegaConf.select(cfg, "task_name", default="train"))
    reqs: list[Requirement] = []
    for spec in INPUT_KEYS:
        if spec.tasks is not None and task not in spec.tasks:
            continue
        if spec.when is not None and not spec.when(cfg):
            continue
        root = OmegaConf.select(cfg, spec.root) if spec.root else None
        for key, value in _select(cfg, spec.key.split(".")):
            if value is None or isinstance(value, (DictConfig, ListConfig)):
                continue
            value = str(value)
            if value.strip().lower() in _OPTIONAL:
                continue
            if spec.kind in ("weights", "checkpoint", "sam"):
                req = _weights_requirement(key, value, spec.kind, cfg, fetch)
                if req is not None:
                    reqs.append(req)
                continue
            path = _join(root, value)
            found = Path(path).is_dir() if spec.kind == "images" else Path(path).is_file()
            sibling = OmegaConf.select(cfg, key.rsplit(".", 1)[0] + ".img_dir") if "." in key else None
            images = _join(root, str(sibling)) if sibling else None
            reqs.append(Requirement(key, spec.kind, path, found, _source_for(path, root and str(root), images)))
    reqs += _extra_requirements(cfg, task)
    # one source's files together (data.train_sources.1.ann_file next to data.train_sources.1.img_dir)
    group = {}
    for r in reqs:
        group.setdefault(_group(r.key), len(group))
    return sorted(reqs, key=lambda r: group[_group(r.key)])


def _group(key: str) -> str:
    return key.rsplit(".", 1)[0] if re.search(r"\.\d+\.", key) else key


def _extra_requirements(cfg: DictConfig, task: str) -> list[Requirement]:
    """What is not a path: a model to evaluate at all, the SAM extra, the GPUs a trainer asks for."""
    reqs = []
    if (
        task == "eval"
        and _pose_or_det(cfg)
        and not cfg.get("ckpt_path")
        and not OmegaConf.select(cfg, "model.init_weights")
    ):
        reqs.append(Requirement(
            "ckpt_path / model.init_weights", "weights", "-",
            bool(OmegaConf.select(cfg, "model.allow_random_init", default=False)),
            "evaluating needs weights: ckpt_path=<.ckpt> or model.init_weights=<file|name> "
            "(model.allow_random_init=true evaluates a random network on purpose)",
        ))  # fmt: skip
    if task in ("bmp", "demo") and _segmenter_sam2(cfg) and str(cfg.get("sam", "")).lower() not in _OPTIONAL:
        try:
            from transformers import Sam2Model  # noqa: F401

            ok = True
        except ImportError:
            ok = False
        reqs.append(Requirement("sam (package)", "extra", "transformers>=4.56 with SAM 2", ok,
                                "pip install -e '.[sam]' (or loop.segmenter=none: the detector's masks)"))  # fmt: skip
    accel = str(OmegaConf.select(cfg, "trainer.accelerator", default="") or "")
    if task in ("train", "eval") and accel in ("gpu", "cuda"):
        want = OmegaConf.select(cfg, "trainer.devices", default=1)
        import torch

        have = torch.cuda.device_count()
        need = want if isinstance(want, int) else 1
        fix = "trainer=cpu to run here" if have == 0 else f"trainer.devices={have} to use them"
        reqs.append(Requirement("trainer.devices", "gpu", f"{want} CUDA device(s)", have >= need,
                                f"{have} visible; {fix}"))  # fmt: skip
    return reqs


def _pose_or_det(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "model._target_") is not None


# ---------------------------------------------------------------------------------------------- reporting
def format_table(reqs: list[Requirement], title: str | None = None) -> str:
    rows = [("", "key", "what", "expected at", "where it comes from")]
    rows += [("ok" if r.found else "MISSING", r.key, r.kind, r.path, r.source) for r in reqs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [title] if title else []
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    return "\n".join(lines)


def preflight(cfg: DictConfig) -> list[Requirement]:
    """Check every input of a run before anything starts; raise :class:`MissingInputsError` (exit 1, the table of
    the missing ones) when any is absent. Weights named by the hub are downloaded here when not cached.

    Hydra has created the run dir when the task function starts; a run stopped here leaves no run dir behind when
    Hydra's own files are all it holds (``.hydra/`` and the job log), so failed attempts do not pile up as empty
    runs (and ``ckpt_path=auto`` never sees them).
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reqs = collect_requirements(cfg, fetch=not offline)
    missing = [r for r in reqs if not r.found]
    if missing:
        _remove_empty_run_dir(cfg)
        raise MissingInputsError(missing, str(OmegaConf.select(cfg, "task_name", default="run")))
    return reqs


def _remove_empty_run_dir(cfg: DictConfig) -> None:
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (compose API, tests): nothing was created
        return
    task = str(OmegaConf.select(cfg, "task_name", default=""))
    hydra_files = {".hydra", f"{task}.log"}
    if out.is_dir() and {p.name for p in out.iterdir()} <= hydra_files:
        for handler in logging.getLogger().handlers:  # the job log lives in the run dir
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == out:
                logging.getLogger().removeHandler(handler)
                handler.close()
        shutil.rmtree(out, ignore_errors=True)
