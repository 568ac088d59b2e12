"""Deterministic synthetic crowded-scene generator (``data=synthetic``, see the README's Data section).

Articulated human-like figures with 21 exact keypoints, textured backgrounds and heavy mutual occlusion, written
to disk in the real formats (COCO-17 keypoints, COCO instances, MMPose MPII, AIC-14, exact 21-keypoint COCO) so
that the project's real readers are exercised. CLI: ``python -m bmp_lightning.tools.make_synthetic out=DIR n_images=N``.
"""

from bmp_lightning.data.synthetic.figure import (
    Appearance,
    Figure,
    Raster,
    figure_keypoints,
    rasterize_figure,
    sample_appearance,
    sample_figure,
)
from bmp_lightning.data.synthetic.scene import Scene, keypoint_visibility, render_background, render_scene, sample_scene
from bmp_lightning.data.synthetic.writer import generate, generate_if_missing, mpii_center_scale

__all__ = [
    "generate_if_missing",
    "Appearance",
    "Figure",
    "Raster",
    "Scene",
    "figure_keypoints",
    "generate",
    "keypoint_visibility",
    "mpii_center_scale",
    "rasterize_figure",
    "render_background",
    "render_scene",
    "sample_appearance",
    "sample_figure",
    "sample_scene",
]
