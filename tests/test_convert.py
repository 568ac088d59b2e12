"""``python -m bmp_lightning.convert``: official MMPose (and MMDetection) checkpoints -> our weights files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from bmp_lightning.convert import convert_checkpoint, detect_kind, main
from bmp_lightning.interop.mmpose import convert_mmpose_vitpose, to_mmpose
from bmp_lightning.models.components.pose_net import vitpose_b, vitpose_tiny
from bmp_lightning.pose import PoseEstimator
from bmp_lightning.structures.checkpoint import safe_load
from bmp_lightning.structures.errors import UnsafeCheckpointError


class NotAWeight:
    """A custom class pickled into a checkpoint: convert must refuse to import it."""

    def __init__(self) -> None:
        self.payload = "anything"


def _mm_init(oracle_dir: Path):
    spec = importlib.util.spec_from_file_location("bmp_oracle_mm_init_convert", oracle_dir / "mm_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vitpose_b_mm(oracle_dir):
    """The oracle's MMPose ViTPose-B (17 keypoints) weights under MMPose names, and its stored input/heatmaps."""
    sd = _mm_init(oracle_dir).reference_state_dict(oracle_dir / "vitpose_b_keys.txt")
    ref = torch.load(oracle_dir / "vitpose_b_rand.pt", map_location="cpu", weights_only=True)
    return sd, ref


def _mmengine_file(path: Path, sd: dict, **extra) -> Path:
    """An MMEngine-style ``.pth``: state_dict + meta (with numpy arrays, as MMPose stores dataset_meta)."""
    meta = {"mmpose_version": "1.3.2", "dataset_meta": {"sigmas": np.full(17, 0.05, np.float32)}, "epoch": 210}
    torch.save({"state_dict": dict(sd), "meta": meta, **extra}, path)
    return path


def test_official_vitpose_b_converts_to_what_pose_estimator_reads(tmp_path, vitpose_b_mm):
    sd, ref = vitpose_b_mm
    src = _mmengine_file(tmp_path / "MaskPose-b.pth", sd)
    result = main([f"src={src}", f"out={tmp_path / 'ours.pth'}"])
    assert result.kind == "pose" and result.report.ok
    assert result.config["net_config"]["_target_"].endswith("pose_net.vitpose_b")
    assert result.config["num_keypoints"] == 17 and result.config["use_mask"] is True  # "mask" in the file name

    est = PoseEstimator.from_checkpoint(tmp_path / "ours.pth")
    assert est.use_mask and est.num_keypoints == 17
    direct = vitpose_b(num_keypoints=17).eval()
    direct.load_state_dict(convert_mmpose_vitpose(sd))
    with torch.no_grad():
        ours = est.net(ref["input"])
        theirs = direct(ref["input"])
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)  # the same weights, bit for bit
    torch.testing.assert_close(ours, ref["heatmaps"], atol=1e-4, rtol=1e-4)  # and MMPose's own heatmaps
    # the written file is plain data: loadable with weights_only=True and no allowlist
    assert set(torch.load(tmp_path / "ours.pth", weights_only=True)) == {"state_dict", "net_config", "use_mask"}


def test_pos_embed_with_cls_row_converts_to_the_same_weights(tmp_path, vitpose_b_mm):
    sd, _ = vitpose_b_mm
    sd193 = dict(sd)
    pos = sd["backbone.pos_embed"]
    sd193["backbone.pos_embed"] = torch.cat([torch.full_like(pos[:, :1], 3.0), pos], dim=1)  # (1, 193, 768)
    sd193["backbone.cls_token"] = torch.zeros(1, 1, 768)
    a = convert_checkpoint(_mmengine_file(tmp_path / "vitpose_192.pth", sd), tmp_path / "a.pth")
    b = convert_checkpoint(_mmengine_file(tmp_path / "vitpose_193.pth", sd193), tmp_path / "b.pth")
    assert a.report.ok and b.report.ok and b.config["use_mask"] is False
    wa = torch.load(a.out, weights_only=True)["state_dict"]
    wb = torch.load(b.out, weights_only=True)["state_dict"]
    assert wb["backbone.pos_embed"].shape == (1, 192, 768)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def _tiny_mm(num_keypoints: int = 21) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return to_mmpose(vitpose_tiny(num_keypoints=num_keypoints, img_size=(64, 48)).state_dict())


def test_custom_class_in_file_is_refused(tmp_path):
    src = _mmengine_file(tmp_path / "evil.pth", _tiny_mm(), message_hub=NotAWeight())
    with pytest.raises(UnsafeCheckpointError, match="NotAWeight"):
        convert_checkpoint(src, tmp_path / "out.pth")
    with pytest.raises(SystemExit, match=r"(?s)refusing to unpickle.*NotAWeight.*allow_objects=true"):
        main([f"src={src}", f"out={tmp_path / 'out.pth'}"])
    assert not (tmp_path / "out.pth").exists()
    # opting in keeps the object inert (never imported) and converts the tensors. (No numpy arrays in this file:
    # safe_load(placeholders=True) may currently turn numpy.dtype itself into a placeholder, see interop/checkpoint.)
    torch.save({"state_dict": _tiny_mm(), "meta": {"epoch": 3}, "message_hub": NotAWeight()}, src)
    # (not a preset: the head count is not in the weights, so it is given)
    result = convert_checkpoint(src, tmp_path / "out.pth", allow_objects=True, use_mask=True, num_heads=2)
    assert result.report.ok
    cfg = result.config["net_config"]
    assert cfg["_target_"].endswith("vitpose_tiny") and (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (64, 2, 2)
    est = PoseEstimator.from_checkpoint(result.out)
    assert est.num_keypoints == 21 and est.use_mask
    x = torch.randn(1, 3, 64, 48)
    ref = vitpose_tiny(num_keypoints=21, img_size=(64, 48)).eval()
    ref.load_state_dict(convert_mmpose_vitpose(_tiny_mm(), num_patches=12))
    with torch.no_grad():
        torch.testing.assert_close(est.net.forward_features(x), ref.forward_features(x), atol=0, rtol=0)
        torch.testing.assert_close(est.net(x), ref(x), atol=0, rtol=0)


def test_mismatched_keys_are_reported_and_nothing_is_written(tmp_path):
    sd = _tiny_mm(17)
    del sd["head.final_layer.bias"]
    sd["head.extra_conv.weight"] = torch.zeros(3)
    src = _mmengine_file(tmp_path / "partial.pth", sd)
    with pytest.raises(SystemExit, match=r"1 missing: head.final_layer.bias; 1 unexpected: head.extra_conv.weight"):
        main([f"src={src}", f"out={tmp_path / 'o.pth'}"])
    assert not (tmp_path / "o.pth").exists()
    result = main([f"src={src}", f"out={tmp_path / 'o.pth'}", "strict=false"])
    assert result.report.missing_keys == ["head.final_layer.bias"]
    assert result.report.unexpected_keys == ["head.extra_conv.weight"]
    assert (tmp_path / "o.pth").is_file()


def test_kind_detection_and_argument_errors(tmp_path):
    assert detect_kind({"state_dict": _tiny_mm()}) == "pose"
    assert detect_kind({"bbox_head.rtm_cls.0.weight": torch.zeros(1)}) == "det"
    with pytest.raises(ValueError, match="cannot tell the checkpoint kind"):
        detect_kind({"state_dict": {"fc.weight": torch.zeros(2, 2)}})
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="other.pth: cannot tell"):
        main([f"src={tmp_path / 'other.pth'}"])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main([f"src={tmp_path / 'missing.pth'}"])
    with pytest.raises(SystemExit, match="unknown arguments"):
        main(["src=x.pth", "colour=red"])
    with pytest.raises(SystemExit, match="key=value"):
        main(["x.pth"])
    src = _mmengine_file(tmp_path / "a.pth", _tiny_mm())
    with pytest.raises(SystemExit, match="overwrite the source"):
        main([f"src={src}", f"out={src}"])
    assert main([f"src={src}"]).out == tmp_path / "a_bmp.pth"  # default out: beside the source


def test_rtmdet_checkpoint_goes_through_the_det_converter(tmp_path):
    mmdet = pytest.importorskip("bmp_lightning.interop.mmdet", reason="RTMDet converter not available")
    from bmp_lightning.models.components.rtmdet.rtmdet_ins import rtmdet_ins_tiny

    torch.manual_seed(0)
    model = rtmdet_ins_tiny(num_classes=1)
    src = tmp_path / "rtmdet.pth"
    torch.save({"state_dict": mmdet.to_mmdet(model.state_dict()), "meta": {"epoch": 300}}, src)
    result = convert_checkpoint(src, tmp_path / "det.pth")
    assert result.kind == "det" and result.report.ok and result.config["model_config"]["num_classes"] == 1
    written = safe_load(result.out)["state_dict"]
    ours = model.state_dict()
    assert set(written) == set(ours) and all(torch.equal(written[k], ours[k]) for k in ours)
