"""The virtuous circle, shown small: train the tiny detector and tiny MaskPose on synthetic crowds (CPU), run the BMP
loop on held-out denser crowds, and compare iteration 1 with iteration 2.

``python -m bmp_lightning.tools.virtuous_circle [out=logs/bmp_synthetic] [det_epochs=30] [pose_epochs=16]``
``[det_ckpt=<ckpt>] [pose_ckpt=<ckpt>] [threads=1] [det_arg=<override> ...] [pose_arg=...] [eval_arg=...]``
(``det_ckpt`` / ``pose_ckpt``: use these models instead of training; ``*_arg``: extra overrides of the detector
training, the pose training and the BMP evaluation job, repeatable).

Steps (each one skipped when its output exists and is complete, so a second run reuses the first one's work):

1. detector: ``python -m bmp_lightning.train experiment=rtmdet_smoke`` (RTMDet-Ins-tiny from scratch, masked-instance
   augmentation ``RemoveRandomInstances`` p 0.5 in stage 1) -> ``<out>/det/checkpoints/last.ckpt``;
2. pose: ``python -m bmp_lightning.train experiment=smoke`` (tiny MaskPose), 16 epochs by default (twice the smoke
   run: with the smoke run's 8 the pose model is too weak for pose AP to move) -> ``<out>/pose/checkpoints/last.ckpt``;
3. ``python -m bmp_lightning.bmp +experiment=bmp_synthetic_eval`` (held-out synthetic crowds of 5-9 people, loop
   ``bmp_d3`` with ``segmenter=none`` and ``max_painted_overlap=0.7``) -> ``<out>/bmp/`` (``metrics.json``,
   ``results/iter{1,2}.*.json``);
4. :func:`compare_iterations` -> ``<out>/summary.json`` and a table on stdout: pose AP / AR, box AP / AR100, box recall
   at IoU 0.5 (one-to-one greedy matching) per iteration, and the people iteration 2 found that iteration 1 missed.

Training is deterministic on CPU (seeded data order and augmentation), so the figures repeat run to run.
A shorter budget (``det_epochs=12``) rescales the detector's schedule (stage-2 switch 5 epochs before the end, cosine
from the middle) and the pose schedule (lr x0.1 for the last two epochs).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bmp_lightning.structures.files import to_json
from bmp_lightning.utils.cli import parse_key_values

log = logging.getLogger("bmp_lightning.virtuous_circle")

SPLIT_NAME = "synthetic_crowd"  # split.name of conf/experiment/bmp_synthetic_eval.yaml


# ---------------------------------------------------------------------------------------------- matching
def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a (N, 4)`` and ``b (M, 4)`` COCO ``[x, y, w, h]`` boxes -> ``(N, M)``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def greedy_match(pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou_thr: float = 0.5) -> np.ndarray:
    """One-to-one matching as COCO's: predictions by decreasing score each take the still-free ground truth of
    highest IoU >= ``iou_thr``. Returns ``(M,)`` int: index of the prediction matched to each ground truth, -1 if none.
    """
    matched = np.full(len(gt_boxes), -1, np.int64)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return matched
    iou = box_iou_xywh(pred_boxes, gt_boxes)
    for p in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        cand = np.where(matched < 0, iou[p], -1.0)
        g = int(np.argmax(cand))
        if cand[g] >= iou_thr:
            matched[g] = p
    return matched


def _by_image(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results:
        out.setdefault(int(r["image_id"]), []).append(r)
    return out


def _boxes(items: list[dict]) -> np.ndarray:
    return np.asarray([r["bbox"] for r in items], np.float64).reshape(-1, 4)


def compare_iterations(gt: dict, iter1: list[dict], iter2: list[dict], iou_thr: float = 0.5) -> dict[str, Any]:
    """Box recall of both iterations and the people iteration 2 added.

    ``gt``: COCO ground truth (non-crowd person annotations count); ``iter1`` / ``iter2``: COCO box results of the
    two iterations (``image_id``, ``bbox`` xywh, ``score``). A prediction of iteration 2 is *new* when no box of
    iteration 1 in the same image equals it (iteration 2 keeps the old people's boxes unchanged). A *new person
    found* is a ground-truth person that a new prediction matches in iteration 2's matching and that iteration 1's
    matching left unmatched. Returns ``num_gt``, ``recall50_iter{1,2}``, ``matched_iter{1,2}``, ``new_predictions``,
    ``new_matched`` (new people found), ``new_unmatched`` (new predictions matching nobody new), ``lost`` (people
    matched in iteration 1 and not in 2) and ``per_image`` (image id -> new people found).
    """
    gts = _by_image([a for a in gt["annotations"] if not a.get("iscrowd", 0)])
    p1, p2 = _by_image(iter1), _by_image(iter2)
    num_gt = matched1 = matched2 = new_pred = new_matched = lost = 0
    per_image: dict[int, int] = {}
    for im in gt["images"]:
        iid = int(im["id"])
        g = _boxes(gts.get(iid, []))
        a, b = p1.get(iid, []), p2.get(iid, [])
        m1 = greedy_match(_boxes(a), [r["score"] for r in a], g, iou_thr)
        m2 = greedy_match(_boxes(b), [r["score"] for r in b], g, iou_thr)
        old = _boxes(a)
        is_new = np.array(
            [not (len(old) and np.any(np.all(np.abs(old - np.asarray(r["bbox"])) < 1e-3, axis=1))) for r in b], bool
        )
        found = int(np.sum((m1 < 0) & (m2 >= 0) & np.array([is_new[p] if p >= 0 else False for p in m2], bool)))
        num_gt += len(g)
        matched1 += int(np.sum(m1 >= 0))
        matched2 += int(np.sum(m2 >= 0))
        new_pred += int(is_new.sum())
        new_matched += found
        lost += int(np.sum((m1 >= 0) & (m2 < 0)))
        if found:
            per_image[iid] = found
    return {
        "num_gt": num_gt,
        "matched_iter1": matched1,
        "matched_iter2": matched2,
        "recall50_iter1": matched1 / max(num_gt, 1),
        "recall50_iter2": matched2 / max(num_gt, 1),
        "new_predictions": new_pred,
        "new_matched": new_matched,
        "new_unmatched": new_pred - new_matched,
        "lost": lost,
        "per_image": per_image,
    }


def summarize(bmp_dir: str | Path, split_name: str = SPLIT_NAME) -> dict[str, Any]:
    """Read an evaluation run (``metrics.json``, ``results/{info,iter1.bbox,iter2.bbox}.json``) and return the
    comparison: ``iter{1,2}`` -> ``{pose_AP, pose_AR, bbox_AP, bbox_AR100, segm_AP, recall50}`` plus
    :func:`compare_iterations`'s counts under ``people``."""
    bmp_dir = Path(bmp_dir)
    metrics = json.loads((bmp_dir / "metrics.json").read_text())
    info = json.loads((bmp_dir / "results" / "info.json").read_text())
    gt = json.loads(Path(info["ground_truth"]).read_text())
    it = [json.loads((bmp_dir / "results" / f"iter{k}.bbox.json").read_text()) for k in (1, 2)]
    people = compare_iterations(gt, it[0], it[1])
    out: dict[str, Any] = {"images": info["images"], "people": people}
    for k in (1, 2):
        pre = f"bmp/iter{k}/{split_name}/"
        out[f"iter{k}"] = {
            "pose_AP": metrics.get(pre + "AP"),
            "pose_AR": metrics.get(pre + "AR"),
            "bbox_AP": metrics.get(pre + "bbox_AP"),
            "bbox_AR100": metrics.get(pre + "bbox_AR100"),
            "segm_AP": metrics.get(pre + "segm_AP"),
            "recall50": people[f"recall50_iter{k}"],
        }
    out["seconds_per_image"] = metrics.get("bmp/time/total")
    return out


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table of :func:`summarize`'s output."""
    keys = ("pose_AP", "pose_AR", "bbox_AP", "bbox_AR100", "recall50", "segm_AP")
    rows = ["| iteration | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for k in (1, 2):
        vals = [summary[f"iter{k}"].get(m) for m in keys]
        rows.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    p = summary["people"]
    rows.append("")
    rows.append(
        f"{p['num_gt']} people in {summary['images']} images; matched (IoU 0.5) {p['matched_iter1']} -> "
        f"{p['matched_iter2']}; iteration 2 added {p['new_predictions']} people: {p['new_matched']} new people "
        f"found, {p['new_unmatched']} matching nobody new; {p['lost']} lost"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- the pipeline
def _run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    t = time.perf_counter()
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")
    log.info("%s done in %.0f s", what, time.perf_counter() - t)


def detector_overrides(epochs: int) -> list[str]:
    """``rtmdet_smoke`` rescaled to ``epochs``: stage 2 (no RemoveRandomInstances) for the last 5 epochs (the last
    third below 15 epochs), constant lr for the first half then cosine, ``last.ckpt`` = the final epoch."""
    if epochs < 2:
        raise ValueError(f"the detector needs >= 2 epochs, got {epochs}")
    switch = epochs - 5 if epochs >= 15 else max(1, epochs - max(1, epochs // 3))
    return [
        f"trainer.max_epochs={epochs}",
        f"callbacks.instseg_pipeline_switch.switch_epoch={switch}",
        f"model.cosine_begin_epoch={epochs // 2}",
        f"trainer.check_val_every_n_epoch={min(5, epochs)}",
        # last.ckpt after every epoch: Lightning 2.6's model_checkpoint refreshes last.ckpt only with a new best
        "callbacks.last_checkpoint.every_n_train_steps=16",
    ]


def pose_overrides(epochs: int) -> list[str]:
    """``smoke`` rescaled to ``epochs``: lr x0.1 for the last two epochs (the last one below 4 epochs)."""
    if epochs < 1:
        raise ValueError(f"pose needs >= 1 epoch, got {epochs}")
    return [f"trainer.max_epochs={epochs}", f"model.milestones=[{max(1, epochs - (2 if epochs >= 4 else 1))}]"]


def train(kind: str, out: Path, epochs: int, threads: int, extra: Sequence[str] = ()) -> Path:
    """Train the ``det`` / ``pose`` model into ``out/<kind>`` unless a finished run is there; returns last.ckpt."""
    run_dir = out / kind
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and (run_dir / "metrics.json").is_file():  # metrics.json: written when training finished
        log.info("%s: reusing %s", kind, ckpt)
        return ckpt
    experiment, overrides = (
        ("rtmdet_smoke", detector_overrides(epochs)) if kind == "det" else ("smoke", pose_overrides(epochs))
    )
    cmd = [sys.executable, "-m", "bmp_lightning.train", f"experiment={experiment}", "logger=csv",
           f"torch_threads={threads}", f"hydra.run.dir={run_dir}", *overrides, *extra]  # fmt: skip
    _run(cmd, f"training {kind} ({epochs} epochs)")
    if not ckpt.is_file():
        raise RuntimeError(f"training {kind} wrote no {ckpt}")
    return ckpt


def evaluate(out: Path, det: Path, pose: Path, threads: int, extra: Sequence[str] = ()) -> Path:
    """The BMP evaluation job on the held-out crowds -> ``out/bmp``."""
    run_dir = out / "bmp"
    cmd = [sys.executable, "-m", "bmp_lightning.bmp", "+experiment=bmp_synthetic_eval", f"detector={det}",
           f"pose={pose}", f"torch_threads={threads}", "logger=csv", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    _run(cmd, "BMP evaluation")
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    multi = ("det_arg", "pose_arg", "eval_arg")
    a = parse_key_values(sys.argv[1:] if argv is None else argv, __doc__ or "", multi=multi)
    if bad := sorted(set(a) - {"out", "det_epochs", "pose_epochs", "det_ckpt", "pose_ckpt", "threads", *multi}):
        raise SystemExit(f"unknown arguments {bad}\n{__doc__}")
    args = SimpleNamespace(
        out=Path(a.get("out", "logs/bmp_synthetic")),
        det_epochs=int(a.get("det_epochs", 30)),  # epochs of 16 steps
        pose_epochs=int(a.get("pose_epochs", 16)),  # epochs of 35 steps
        det_ckpt=Path(a["det_ckpt"]) if a.get("det_ckpt") else None,
        pose_ckpt=Path(a["pose_ckpt"]) if a.get("pose_ckpt") else None,
        threads=int(a.get("threads", 1)),  # torch intra-op threads per process
        **{k: a[k] for k in multi},
    )
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")

    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    det = args.det_ckpt or train("det", out, args.det_epochs, args.threads, args.det_arg)
    timings["detector_training_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pose = args.pose_ckpt or train("pose", out, args.pose_epochs, args.threads, args.pose_arg)
    timings["pose_training_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bmp_dir = evaluate(out, det, pose, args.threads, args.eval_arg)
    timings["evaluation_s"] = time.perf_counter() - t
    summary = summarize(bmp_dir)
    summary.update(
        detector=str(det), pose=str(pose), det_epochs=args.det_epochs, pose_epochs=args.pose_epochs,
        wall_s=time.perf_counter() - t0, **timings,
    )  # fmt: skip
    (out / "summary.json").write_text(to_json(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"wall {summary['wall_s']:.0f} s; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
