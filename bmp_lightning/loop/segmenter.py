"""SAM 2.1 point-prompted segmentation for the BMP loop, on top of transformers' ``Sam2Model``.

The image pre/post-processing follows Meta's ``SAM2ImagePredictor`` (what BBoxMaskPose v1.1 calls): the RGB image
as float in [0, 1], resized to the model resolution (1024, no aspect preservation), ImageNet-normalised; points
scaled by ``resolution / (W, H)``; one mask per prompt set (single-mask token with SAM 2's dynamic stability fallback);
the 256x256 mask logits optionally cleaned (holes / sprinkles), bilinearly resized to the original image and
thresholded at 0. transformers is the optional ``[sam]`` extra and is imported lazily.

Meta's post-processing (holes / sprinkles) calls its CUDA extension; on a CPU install Meta's predictor warns and
skips it. :func:`clean_mask_logits` does the same computation with OpenCV on any device (tested equal to Meta's
logic in ``tests/loop/test_sam2_meta.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bmp_lightning.interop.hub import (
    WeightsUnavailableError,
    cached_path,
    hub_weights,
    resolve_weights,
    unavailable_message,
)
from bmp_lightning.interop.sam2_meta import load_meta_sam2

# what BBoxMaskPose runs: Meta's SAM 2.1 Hiera-B+ checkpoint (sam2.1_hiera_base_plus.pt), by name (interop/hub.py)
DEFAULT_SAM2 = "sam2.1-b+"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_sam2() -> Any:
    try:
        import transformers
        from transformers import Sam2Config, Sam2Model
    except ImportError as err:  # missing extra, or a transformers without SAM 2 (< 4.56)
        raise ImportError(
            "Sam2Segmenter needs transformers >= 4.56 with SAM 2: pip install 'bmp-lightning[sam]' "
            "(or run the loop with loop.segmenter=none)"
        ) from err
    return transformers, Sam2Config, Sam2Model


def _small_components(binary: np.ndarray, max_area: float) -> np.ndarray:
    """Pixels of 8-connected components of ``binary`` ``(H, W)`` with area <= ``max_area``."""
    num, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    small = np.zeros(num, dtype=bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] <= max_area
    return small[labels]


def clean_mask_logits(logits: np.ndarray, max_hole_area: float = 0.0, max_sprinkle_area: float = 0.0) -> np.ndarray:
    """SAM 2's post-processing of low-res mask logits ``(N, h, w)`` (``SAM2Transforms.postprocess_masks``):
    background components (logit <= 0) of area <= ``max_hole_area`` become +10, then foreground components of
    area <= ``max_sprinkle_area`` become -10. Both sets of components are those of the *input* logits, as in
    Meta's code (a small blob around a filled hole is removed, the filled hole itself stays); 8-connectivity."""
    out = np.array(logits, dtype=np.float32, copy=True)
    for i, m in enumerate(np.asarray(logits, dtype=np.float32)):
        if max_hole_area > 0:
            out[i][_small_components(m <= 0, max_hole_area)] = 10.0
        if max_sprinkle_area > 0:
            out[i][_small_components(m > 0, max_sprinkle_area)] = -10.0
    return out


class Sam2Segmenter:
    """Point-prompted SAM 2 on one image at a time: ``set_image`` once, then ``predict`` for all people.

    Args:
        model: a transformers ``Sam2Model`` (eval mode is set here).
        device: torch device for the model.
        max_hole_area / max_sprinkle_area: default low-res clean-up areas (``predict`` can override them).
        antialias: antialiased downscaling to the model resolution (torchvision's tensor ``Resize`` default since
            0.17; the torchvision 0.16 pinned by BBoxMaskPose v1.1 did not antialias tensors).
        chunk: people upsampled to full resolution at once (bounds the memory of full-resolution logits).
    """

    def __init__(
        self,
        model: Any,
        device: str | torch.device = "cpu",
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        antialias: bool = True,
        chunk: int = 16,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_hole_area = max_hole_area
        self.max_sprinkle_area = max_sprinkle_area
        self.antialias = antialias
        self.chunk = max(1, int(chunk))
        self.resolution = int(model.config.prompt_encoder_config.image_size)
        self._embeddings: list[torch.Tensor] | None = None
        self._orig_hw: tuple[int, int] | None = None

    @classmethod
    def from_pretrained(
        cls, name: str = DEFAULT_SAM2, device: str | torch.device = "cpu", local_files_only: bool = False, **kwargs: Any
    ) -> Sam2Segmenter:
        """SAM 2.1 by name, from Meta's checkpoint file, or in transformers format.

        ``name`` is one of

        * ``sam2.1-t`` / ``sam2.1-s`` / ``sam2.1-b+`` / ``sam2.1-l``: Meta's ``sam2.1_hiera_*.pt`` from the
          ``facebook/sam2.1-hiera-*`` repository (what BBoxMaskPose runs), fetched with huggingface_hub;
        * a Meta checkpoint file (``{"model": state_dict}``, any of the four sizes, read off the weights);
        * a transformers-format repository id (``facebook/sam2.1-hiera-base-plus``) or folder.

        Raises:
            WeightsUnavailableError: a named file cannot be had (offline and not cached), naming repo, file and the
                command that downloads it.
            RuntimeError: a transformers-format model cannot be loaded.
        """

        _import_sam2()
        w = hub_weights(name)
        if w is not None and local_files_only:
            path = cached_path(w)
            if path is None:
                raise WeightsUnavailableError(unavailable_message(w, "not in the Hugging Face cache", "sam"))
        elif w is not None:
            path = resolve_weights(name, key="sam", kind="sam")
        else:
            path = os.fspath(name)
        if os.path.isfile(path):
            return cls(load_meta_sam2(path), device=device, **kwargs)
        _, _, sam2_model = _import_sam2()
        try:
            model = sam2_model.from_pretrained(path, local_files_only=local_files_only)
        except (OSError, ValueError) as err:  # hub errors subclass OSError; bad repo ids raise ValueError
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise WeightsUnavailableError(
                f"SAM 2 weights {name!r} could not be loaded in transformers format ({type(err).__name__}: {reason}). "
                "Use a name (sam=sam2.1-b+, Meta's checkpoint via huggingface_hub: "
                "hf download facebook/sam2.1-hiera-base-plus sam2.1_hiera_base_plus.pt --local-dir weights), a local "
                "Meta file (sam=weights/sam2.1_hiera_base_plus.pt) or a transformers folder; loop.segmenter=none "
                "keeps the detector's masks instead"
            ) from None
        return cls(model, device=device, **kwargs)

    @classmethod
    def tiny_random(cls, seed: int = 0, resolution: int = 128, device: str | torch.device = "cpu", **kwargs: Any):
        """A randomly initialised, tiny SAM 2 (small Hiera, 32-dim decoder) for tests: no network, milliseconds.

        ``resolution`` must be a multiple of 32 (4x patch stride, 3 pooling stages, 16 px prompt patch).
        """
        if resolution % 32:
            raise ValueError(f"tiny SAM 2 resolution must be a multiple of 32, got {resolution}")
        _, sam2_config, sam2_model = _import_sam2()
        r = resolution
        config = sam2_config(
            vision_config={
                "model_type": "sam2_vision_model",
                "backbone_config": {
                    "model_type": "sam2_hiera_det_model",
                    "image_size": [r, r],
                    "hidden_size": 16,
                    "num_attention_heads": 1,
                    "blocks_per_stage": [1, 2, 2, 1],
                    "embed_dim_per_stage": [16, 32, 64, 128],
                    "num_attention_heads_per_stage": [1, 1, 2, 2],
                    "window_size_per_stage": [8, 4, 4, 2],
                    "global_attention_blocks": [4],
                    "window_positional_embedding_background_size": [4, 4],
                },
                "backbone_channel_list": [128, 64, 32, 16],
                "backbone_feature_sizes": [[r // 4, r // 4], [r // 8, r // 8], [r // 16, r // 16]],
                "fpn_hidden_size": 32,
            },
            prompt_encoder_config={"hidden_size": 32, "image_size": r, "patch_size": 16, "mask_input_channels": 4},
            mask_decoder_config={
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = sam2_model(config)
        return cls(model, device=device, **kwargs)

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Compute and cache the image embedding of an ``(H, W, 3)`` uint8 image (RGB for SAM; see the loop's
        ``sam_input_bgr`` quirk)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Sam2Segmenter.set_image expects an (H, W, 3) uint8 image, got {image.dtype} {image.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(
            x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=self.antialias
        )
        mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        dtype = next(self.model.parameters()).dtype
        self._embeddings = self.model.get_image_embeddings(x.to(dtype))
        self._orig_hw = (int(image.shape[0]), int(image.shape[1]))

    @torch.no_grad()
    def predict(
        self,
        points: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        boxes: np.ndarray | None = None,
        max_hole_area: float | None = None,
        max_sprinkle_area: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One mask per prompt set, all people of the image in as few decoder calls as possible.

        Args:
            points: N arrays ``(P_i, 2)`` of xy pixel coordinates of the original image.
            labels: N arrays ``(P_i,)``: 1 positive, 0 negative.
            boxes: optional ``(N, 4)`` xyxy box prompts.
            max_hole_area / max_sprinkle_area: low-res clean-up; ``None`` = the constructor's values.

        Returns:
            ``masks (N, H, W)`` bool (logits > 0 at the original resolution), ``scores (N,)`` float32 (predicted IoU).
            A person with no point and no box gets an empty mask and score 0.
        """
        if self._embeddings is None or self._orig_hw is None:
            raise RuntimeError("Sam2Segmenter.predict called before set_image")
        hole = self.max_hole_area if max_hole_area is None else max_hole_area
        sprinkle = self.max_sprinkle_area if max_sprinkle_area is None else max_sprinkle_area
        n = len(points)
        if len(labels) != n or (boxes is not None and len(boxes) != n):
            raise ValueError("Sam2Segmenter.predict: points, labels (and boxes) must have one entry per person")
        h, w = self._orig_hw
        masks = np.zeros((n, h, w), dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        if n == 0:
            return masks, scores
        scale = np.array([self.resolution / w, self.resolution / h], dtype=np.float32)

        # Group people by prompt layout (number of points, box or not) so no padding token enters the decoder:
        # every person is decoded exactly as if prompted alone (as the v1.1 demo does, one call per person).
        groups: dict[tuple[int, bool], list[int]] = {}
        for i in range(n):
            p = int(np.asarray(points[i]).reshape(-1, 2).shape[0])
            has_box = boxes is not None and boxes[i] is not None
            if p == 0 and not has_box:
                continue
            groups.setdefault((p, has_box), []).append(i)

        for (p, has_box), idx in groups.items():
            kwargs: dict[str, torch.Tensor] = {}
            if p > 0:
                pts = np.stack([np.asarray(points[i], np.float32).reshape(-1, 2) * scale for i in idx])
                lab = np.stack([np.asarray(labels[i]).reshape(-1) for i in idx]).astype(np.int64)
                kwargs["input_points"] = torch.from_numpy(pts)[None].to(self.device)
                kwargs["input_labels"] = torch.from_numpy(lab)[None].to(self.device)
            if has_box:
                bx = np.stack([np.asarray(boxes[i], np.float32).reshape(2, 2) * scale for i in idx])
                kwargs["input_boxes"] = torch.from_numpy(bx.reshape(len(idx), 4))[None].to(self.device)
            out = self.model(image_embeddings=self._embeddings, multimask_output=False, **kwargs)
            logits = out.pred_masks[0, :, 0].float()  # (n_g, 256, 256) low-res logits
            scores[idx] = out.iou_scores[0, :, 0].float().cpu().numpy()
            if hole > 0 or sprinkle > 0:
                logits = torch.from_numpy(clean_mask_logits(logits.cpu().numpy(), hole, sprinkle)).to(self.device)
            # Upsample in chunks: full-resolution float logits of 40 people would be large.
            for start in range(0, len(idx), self.chunk):
                part = logits[start : start + self.chunk, None]
                full = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                masks[idx[start : start + self.chunk]] = (full > 0).cpu().numpy()
        return masks, scores
