"""Score a keypoint results json: COCO-style keypoint AP (:mod:`bmp_lightning.metrics.coco`) from the command line.

    python -m bmp_lightning.tools.coco_eval gt=<annotation json> results=<results json> \
        [dataset=coco|ochuman|crowdpose] [nms=none|oks] [nms_thr=0.9] [keypoint_score_thr=0.2] [out=<metrics json>] \
        [nonfinite=error|miss]

Result entries carry ``keypoints`` (flat ``x, y, score`` for 21, 17 or 14 joints); an entry with ``bbox_score`` is
rescored (:mod:`bmp_lightning.metrics.coco`, step 3), one without keeps its ``score``. ``area`` (or the COCO
``bbox`` ``[x, y, w, h]``) is the OKS-NMS
area. The metrics go to ``out`` (default: ``<results>.metrics.json``), written atomically. An entry with a NaN / inf
keypoint or score is an error naming the file and the entry (``nonfinite=miss``: dropped, its person counted as not
found, the number dropped written as ``nonfinite_dropped``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bmp_lightning.metrics.coco import CocoKeypointEvaluator, format_table, results_to_predictions
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.utils.cli import parse_key_values


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Score a keypoint results json against a ground truth (see the module docstring); returns the metrics."""
    args = parse_key_values(sys.argv[1:] if argv is None else argv, __doc__ or "")
    allowed = {"gt", "results", "dataset", "nms", "nms_thr", "keypoint_score_thr", "use_area", "out", "nonfinite"}
    if bad := sorted(set(args) - allowed):
        raise SystemExit(f"unknown arguments {bad}; allowed: {sorted(allowed)}")
    if "gt" not in args or "results" not in args:
        raise SystemExit(f"gt=<annotation json> and results=<results json> are required\n{__doc__}")
    try:
        return _score(args)
    except (BadSampleError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err


def _score(args: dict[str, str]) -> dict[str, float]:
    use_area = args.get("use_area")
    evaluator = CocoKeypointEvaluator(
        args["gt"],
        dataset=args.get("dataset", "coco"),
        keypoint_score_thr=float(args.get("keypoint_score_thr", 0.2)),
        nms=args.get("nms", "none"),
        nms_thr=float(args.get("nms_thr", 0.9)),
        use_area=None if use_area is None else use_area.lower() in ("1", "true", "yes"),
        verbose=True,
        nonfinite=args.get("nonfinite", "error"),
    )
    if not os.path.isfile(args["results"]):
        raise FileNotFoundError(f"results file not found: {args['results']}")
    with open(args["results"]) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise BadSampleError(f"{args['results']}: results must be a json list of entries")
    evaluator.process(results_to_predictions(results, source=args["results"]))
    metrics = evaluator.evaluate()
    if evaluator.nonfinite == "miss":
        metrics["nonfinite_dropped"] = float(len(evaluator.nonfinite_dropped))
    out = Path(args.get("out") or Path(args["results"]).with_suffix(".metrics.json"))
    atomic_write_json(out, metrics, indent=None)
    print(format_table(metrics, title=f"{evaluator.dataset} keypoint AP — {args['results']}"))
    print(f"metrics written to {out}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
