"""Sanity check of the installed environment (run by `make install`)."""

from __future__ import annotations

import sys


def main() -> int:
    import torch

    if "+cpu" in torch.__version__:
        print(
            f"error: torch {torch.__version__} is a CPU-only build; PyPI torchvision cannot load with it. "
            "Reinstall with `pip install -c requirements/constraints.txt torch torchvision`.",
            file=sys.stderr,
        )
        return 1
    import albumentations  # noqa: F401
    import cv2  # noqa: F401
    import hydra  # noqa: F401
    import lightning  # noqa: F401
    import pycocotools  # noqa: F401
    import timm  # noqa: F401
    import torchvision
    import wandb  # noqa: F401

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0], keep
    cuda = torch.cuda.is_available()
    print(f"environment ok: torch {torch.__version__}, torchvision {torchvision.__version__}, cuda={cuda}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
