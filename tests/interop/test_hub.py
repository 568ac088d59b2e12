"""Weights by name (``maskpose-b``, ``vitpose-b-multi``, ``rtmdet-l-bmp``, ``sam2.1-*``) through huggingface_hub.

No network: the Hugging Face cache is a temporary folder (empty for the offline errors, pre-populated with small
checkpoints of ours for the success path), and ``HF_HUB_OFFLINE=1`` (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bmp_lightning.interop.hub import HUB_WEIGHTS, WeightsUnavailableError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _put(cache: Path, name: str) -> Path:
    """The cache path of a named file (the layout huggingface_hub reads offline: refs/main -> snapshots/<commit>)."""
    w = HUB_WEIGHTS[name]
    repo = cache / f"models--{w.repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    path = repo / "snapshots" / COMMIT / w.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _tiny_pose_config() -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bmp_lightning.doctor import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["model=vitpose_tiny", "trainer=cpu"])
    return OmegaConf.to_container(cfg.model.net, resolve=True)


def test_from_pretrained_offline_names_the_repo_file_and_command(hub_cache):
    from bmp_lightning import Detector, PoseEstimator

    with pytest.raises(WeightsUnavailableError) as info:
        PoseEstimator.from_pretrained("maskpose-b")
    msg = str(info.value)
    assert "vrg-prague/BBoxMaskPose" in msg and "MaskPose-b.pth" in msg
    assert "hf download vrg-prague/BBoxMaskPose MaskPose-b.pth --local-dir weights" in msg
    assert "pose=weights/MaskPose-b.pth" in msg  # the local path that works as well
    assert info.value.__cause__ is None
    with pytest.raises(WeightsUnavailableError, match="rtmdet-ins-l-mask.pth"):
        Detector.from_pretrained("rtmdet-l-bmp")
    with pytest.raises(ValueError, match="'rtmdet-l-bmp' is detector weights, not pose"):
        PoseEstimator.from_pretrained("rtmdet-l-bmp")


def test_names_load_from_the_cache_everywhere(hub_cache, tmp_path: Path):
    """The success path: a cached file is found offline by PoseEstimator / Detector / BMP.from_pretrained, the BMP
    job's loaders and ``model.init_weights=<name>`` of a training config."""
    import hydra

    from bmp_lightning import BMP, Detector, PoseEstimator
    from bmp_lightning.interop.pose_weights import export_pose_weights
    from bmp_lightning.loop.build import load_detector, load_pose, tiny_random_detector_model
    from bmp_lightning.utils.preflight import collect_requirements

    net_cfg = _tiny_pose_config()
    torch.manual_seed(3)
    net = hydra.utils.instantiate(net_cfg)
    export_pose_weights(net, _put(hub_cache, "maskpose-b"), net_cfg, use_mask=True)
    det_model = tiny_random_detector_model(seed=1)
    torch.save(det_model.state_dict(), _put(hub_cache, "rtmdet-l-bmp"))

    pose = PoseEstimator.from_pretrained("maskpose-b")
    assert pose.use_mask is True
    for key, value in net.state_dict().items():
        torch.testing.assert_close(pose.net.state_dict()[key], value)
    det = Detector.from_pretrained("rtmdet-l-bmp", input_size=320)
    torch.testing.assert_close(det.model.state_dict()["head.rtm_cls.0.weight"], det_model.head.rtm_cls[0].weight)
    assert isinstance(load_pose("maskpose-b"), PoseEstimator)  # bmp pose=maskpose-b
    assert isinstance(load_detector("rtmdet-l-bmp", input_size=320), Detector)  # bmp detector=rtmdet-l-bmp

    bmp = BMP.from_pretrained(sam="tiny_random")
    # the loop holds the cached weights, not a fresh init
    for key, value in net.state_dict().items():
        torch.testing.assert_close(bmp.pose_model.net.state_dict()[key], value)
    torch.testing.assert_close(
        bmp.detector.model.state_dict()["head.rtm_cls.0.weight"], det_model.head.rtm_cls[0].weight
    )
    image = np.zeros((96, 128, 3), np.uint8)
    assert len(bmp(image).iterations) == bmp.cfg.num_iters

    from bmp_lightning.models.pose_module import PoseLitModule

    module = PoseLitModule(net=hydra.utils.instantiate(net_cfg), init_weights="maskpose-b")  # model.init_weights=
    torch.testing.assert_close(module.net.state_dict()["head.final_layer.weight"], net.head.final_layer.weight)

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"task_name": "bmp", "detector": "rtmdet-l-bmp", "pose": "maskpose-b", "sam": "none"})
    reqs = collect_requirements(cfg)
    assert [(r.key, r.found) for r in reqs] == [("detector", True), ("pose", True)]


def test_convert_takes_a_name_and_explains_a_repo_id(hub_cache, capsys):
    from bmp_lightning import convert

    with pytest.raises(SystemExit, match=r"src=vrg-prague/BBoxMaskPose: not a file.*src=<vitpose-b-multi, maskpose-b"):
        convert.main(["src=vrg-prague/BBoxMaskPose"])
    with pytest.raises(SystemExit, match="hf download vrg-prague/BBoxMaskPose MaskPose-b.pth --local-dir weights"):
        convert.main(["src=maskpose-b"])  # offline, not cached: the one clear message
