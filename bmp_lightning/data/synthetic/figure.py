"""Articulated 2-D human figures: pose parameters -> 21 exact keypoints -> filled parts -> a small RGB raster.

A figure is drawn from capsules (limbs, neck), a polygon (torso) and discs (head, hands, ears). Every keypoint of
the 21-slot schema (``bmp_lightning.structures.keypoints.KEYPOINTS``) is placed *inside* the part it belongs to, so a
joint that is not hidden by another person lies on the person's own mask.

Conventions: image coordinates (x right, y down, pixel centres at integers, as cv2). The figure faces the camera
by default, so the person's *left* side is on the image's right (``left_shoulder.x > right_shoulder.x``). Angles
are degrees; ``_direction(0)`` points down the image and ``_direction(90)`` to the image's right.

Visual cues are deliberately strong so that tiny models learn quickly: left limbs wear warm hues (red-yellow),
right limbs cool hues (cyan-blue), the torso another hue family, every part has a dark outline, and the head has
hair on top and eyes / nose / mouth that show where the face points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from bmp_lightning.structures.keypoints import KEYPOINTS, NUM_KEYPOINTS

_KP = {name: i for i, name in enumerate(KEYPOINTS)}

# Proportions as fractions of the figure height h (top of the head to the ankles when upright and straight).
TORSO_LEN = 0.30  # pelvis -> thorax
NECK_LEN = 0.055  # thorax -> neck keypoint
HEAD_OFFSET = 0.075  # neck keypoint -> head centre
HEAD_R = 0.068
SHOULDER_HALF = 0.115
HIP_HALF = 0.075
UPPER_ARM, FOREARM, THIGH, SHIN = 0.165, 0.15, 0.245, 0.235
R_UPPER_ARM, R_FOREARM, R_THIGH, R_SHIN = 0.036, 0.030, 0.052, 0.042
R_NECK, R_HAND, R_FOOT = 0.030, 0.028, 0.026

# Part ids of the figure's id raster (0 = empty); only used for textures.
PART_LEG, PART_FOOT, PART_TORSO, PART_NECK, PART_ARM, PART_HAND, PART_HEAD, PART_EAR = 1, 2, 3, 4, 5, 6, 7, 8

_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT

RGB = tuple[int, int, int]


def _direction(deg: float) -> np.ndarray:
    """Unit vector ``(2,)`` at ``deg`` degrees: 0 = down (+y), 90 = image right (+x)."""
    t = math.radians(deg)
    return np.array([math.sin(t), math.cos(t)])


def hsv_to_rgb(h: float, s: float, v: float) -> RGB:
    """Hue in degrees, saturation and value in [0, 1] -> an RGB uint8 triple."""
    h = (h % 360.0) / 60.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (round(255 * r), round(255 * g), round(255 * b))


def _scaled(color: RGB, k: float) -> RGB:
    return tuple(int(min(255, max(0, round(c * k)))) for c in color)  # type: ignore[return-value]


@dataclass
class Appearance:
    """Colours (RGB) and texture of one figure; ``(left, right)`` pairs follow the person's sides."""

    skin: RGB = (224, 172, 140)
    hair: RGB = (50, 35, 25)
    torso: RGB = (90, 160, 90)
    upper_arm: tuple[RGB, RGB] = ((220, 60, 40), (40, 90, 220))
    forearm: tuple[RGB, RGB] = ((240, 130, 50), (60, 160, 230))
    thigh: tuple[RGB, RGB] = ((140, 50, 30), (30, 50, 130))
    shin: tuple[RGB, RGB] = ((170, 75, 40), (45, 75, 160))
    shoe: RGB = (35, 30, 30)
    stripes: tuple[float, float, float] | None = None  # (period as a fraction of h, angle deg, amplitude)
    lighting: float = 1.0
    texture_amplitude: float = 0.05
    texture_seed: int = 0


@dataclass
class Figure:
    """Pose, placement and appearance of one synthetic person.

    ``(left, right)`` pairs: abduction angles are positive away from the body; flexion angles are signed, positive
    bends the distal segment further outwards. Length factors ``< 1`` foreshorten a segment (pointing at the camera).
    """

    pelvis: tuple[float, float]
    height: float
    rotation: float = 0.0  # whole body, in-plane
    lean: float = 0.0  # torso relative to the legs
    head_tilt: float = 0.0  # head relative to the torso
    yaw: float = 0.0  # body turn; > 0 turns towards the person's left (their left side moves away)
    head_yaw: float = 0.0  # extra head turn on top of ``yaw``
    arm_abduction: tuple[float, float] = (15.0, 15.0)
    elbow_flex: tuple[float, float] = (10.0, 10.0)
    hip_abduction: tuple[float, float] = (6.0, 6.0)
    knee_flex: tuple[float, float] = (0.0, 0.0)
    arm_length: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # l_upper, l_fore, r_upper, r_fore
    leg_length: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # l_thigh, l_shin, r_thigh, r_shin
    appearance: Appearance = field(default_factory=Appearance)


@dataclass
class Raster:
    """A figure drawn on its own small canvas whose top-left pixel sits at image pixel ``(x0, y0)``."""

    rgb: np.ndarray  # (h, w, 3) uint8
    ids: np.ndarray  # (h, w) uint8 part ids, 0 = not the figure
    x0: int
    y0: int


def _skeleton(fig: Figure) -> dict[str, np.ndarray]:
    """Forward kinematics: named 2-D points ``(2,)`` in image pixels (the 21 keypoints plus drawing anchors)."""
    h = float(fig.height)
    p = np.asarray(fig.pelvis, dtype=np.float64)
    yaw_total = fig.yaw + fig.head_yaw
    width = max(0.45, math.cos(math.radians(fig.yaw)))  # turning the body narrows it
    base = fig.rotation
    torso_angle = base + fig.lean
    head_angle = torso_angle + fig.head_tilt
    down_legs, left_legs = _direction(base), _direction(base + 90)
    up_torso, left_torso = -_direction(torso_angle), _direction(torso_angle + 90)
    up_head, left_head = -_direction(head_angle), _direction(head_angle + 90)

    pt: dict[str, np.ndarray] = {"pelvis": p}
    pt["thorax"] = p + TORSO_LEN * h * up_torso
    pt["neck"] = pt["thorax"] + NECK_LEN * h * up_torso
    head = pt["neck"] + HEAD_OFFSET * h * up_head
    r = HEAD_R * h
    pt["head_centre"] = head
    pt["top_head"] = head + 0.9 * r * up_head
    pt["face_centre"] = head - 0.18 * r * up_head + 0.25 * r * math.sin(math.radians(yaw_total)) * left_head

    def on_head(phi: float, radial: float, down: float) -> np.ndarray:
        # A point on the head sphere at longitude ``phi`` (0 = face front, +90 = the person's left ear).
        return head + radial * r * math.sin(math.radians(phi + yaw_total)) * left_head - down * r * up_head

    pt["nose"] = on_head(0.0, 0.85, 0.25)
    pt["left_eye"], pt["right_eye"] = on_head(28.0, 0.8, -0.1), on_head(-28.0, 0.8, -0.1)
    pt["left_ear"], pt["right_ear"] = on_head(90.0, 0.9, 0.05), on_head(-90.0, 0.9, 0.05)
    pt["left_ear_disc"], pt["right_ear_disc"] = on_head(90.0, 1.0, 0.05), on_head(-90.0, 1.0, 0.05)
    pt["mouth_a"], pt["mouth_b"] = on_head(-18.0, 0.8, 0.55), on_head(18.0, 0.8, 0.55)

    for side, s in (("left", 1.0), ("right", -1.0)):
        i = 0 if side == "left" else 1
        shoulder = pt["thorax"] + s * SHOULDER_HALF * width * h * left_torso
        upper = torso_angle + s * fig.arm_abduction[i]
        elbow = shoulder + fig.arm_length[2 * i] * UPPER_ARM * h * _direction(upper)
        fore = upper + s * fig.elbow_flex[i]
        wrist = elbow + fig.arm_length[2 * i + 1] * FOREARM * h * _direction(fore)
        pt[f"{side}_shoulder"], pt[f"{side}_elbow"], pt[f"{side}_wrist"] = shoulder, elbow, wrist
        pt[f"{side}_hand"] = wrist + 1.1 * R_HAND * h * _direction(fore)

        hip = p + s * HIP_HALF * width * h * left_legs
        thigh = base + s * fig.hip_abduction[i]
        knee = hip + fig.leg_length[2 * i] * THIGH * h * _direction(thigh)
        shin = thigh + s * fig.knee_flex[i]
        ankle = knee + fig.leg_length[2 * i + 1] * SHIN * h * _direction(shin)
        pt[f"{side}_hip"], pt[f"{side}_knee"], pt[f"{side}_ankle"] = hip, knee, ankle
        pt[f"{side}_toe"] = ankle + 0.045 * h * _direction(shin + s * 35.0)
    pt["_down_legs"], pt["_left_legs"], pt["_up_torso"], pt["_left_torso"] = down_legs, left_legs, up_torso, left_torso
    return pt


def figure_keypoints(fig: Figure) -> np.ndarray:
    """The 21 keypoints ``(21, 2)`` float64 (x, y) in image pixels, in ``KEYPOINTS`` order."""
    pt = _skeleton(fig)
    return np.stack([pt[name] for name in KEYPOINTS]).reshape(NUM_KEYPOINTS, 2)


# A part: (kind, points (N, 2), radius in px, fill colour, part id); kinds: capsule, poly, disc, mark, line.
Part = tuple[str, np.ndarray, float, RGB, int]


def _parts(fig: Figure) -> list[Part]:
    """Drawing list in painter's order (earlier parts are covered by later ones)."""
    pt = _skeleton(fig)
    h, a = float(fig.height), fig.appearance
    yaw_total = fig.yaw + fig.head_yaw
    parts: list[Part] = []

    def arm(side: str) -> None:
        i = 0 if side == "left" else 1
        shoulder, elbow, wrist = pt[f"{side}_shoulder"], pt[f"{side}_elbow"], pt[f"{side}_wrist"]
        parts.append(("capsule", np.stack([shoulder, elbow]), R_UPPER_ARM * h, a.upper_arm[i], PART_ARM))
        parts.append(("capsule", np.stack([elbow, wrist]), R_FOREARM * h, a.forearm[i], PART_ARM))
        parts.append(("disc", pt[f"{side}_hand"][None], R_HAND * h, a.skin, PART_HAND))

    def leg(side: str) -> None:
        i = 0 if side == "left" else 1
        hip, knee, ankle = pt[f"{side}_hip"], pt[f"{side}_knee"], pt[f"{side}_ankle"]
        parts.append(("capsule", np.stack([hip, knee]), R_THIGH * h, a.thigh[i], PART_LEG))
        parts.append(("capsule", np.stack([knee, ankle]), R_SHIN * h, a.shin[i], PART_LEG))
        parts.append(("capsule", np.stack([ankle, pt[f"{side}_toe"]]), R_FOOT * h, a.shoe, PART_FOOT))

    # The side turned away from the camera is drawn first (behind the torso when the turn is large).
    far, near = ("left", "right") if fig.yaw > 0 else ("right", "left")
    far_arm_behind = abs(fig.yaw) > 30.0
    if far_arm_behind:
        arm(far)
    leg(far)
    leg(near)

    up, left, down = pt["_up_torso"], pt["_left_torso"], pt["_down_legs"]
    left_legs = pt["_left_legs"]
    half_sh = float(np.linalg.norm(pt["left_shoulder"] - pt["thorax"])) + 0.03 * h
    half_hip = float(np.linalg.norm(pt["left_hip"] - pt["pelvis"])) + 0.035 * h
    torso = np.stack(
        [
            pt["thorax"] + half_sh * left + 0.015 * h * up,
            pt["pelvis"] + half_hip * left_legs,
            pt["pelvis"] + 0.8 * half_hip * left_legs + 0.065 * h * down,
            pt["pelvis"] - 0.8 * half_hip * left_legs + 0.065 * h * down,
            pt["pelvis"] - half_hip * left_legs,
            pt["thorax"] - half_sh * left + 0.015 * h * up,
        ]
    )
    parts.append(("poly", torso, 0.0, a.torso, PART_TORSO))
    parts.append(("capsule", np.stack([pt["thorax"], pt["head_centre"]]), R_NECK * h, a.skin, PART_NECK))
    if not far_arm_behind:
        arm(far)
    arm(near)

    # Head: ears peeking out at the sides go behind the skull; ears facing the camera go on top of the face.
    r = HEAD_R * h
    ears_front = []
    for side, phi in (("left", 90.0), ("right", -90.0)):
        ang = math.radians(phi + yaw_total)
        if abs(math.sin(ang)) > 0.8:
            parts.append(("disc", pt[f"{side}_ear_disc"][None], 0.28 * r, _scaled(a.skin, 0.9), PART_EAR))
        elif math.cos(ang) > 0:
            ears_front.append(side)
    parts.append(("disc", pt["head_centre"][None], r, a.hair, PART_HEAD))
    parts.append(("disc", pt["face_centre"][None], 0.82 * r, a.skin, PART_HEAD))
    for side in ears_front:
        parts.append(("disc", pt[f"{side}_ear"][None], 0.22 * r, _scaled(a.skin, 0.85), PART_EAR))
    # Face marks (inside the head disc; they do not change the silhouette).
    eye_r = max(0.8, 0.13 * r)
    for side, phi in (("left", 28.0), ("right", -28.0)):
        if math.cos(math.radians(phi + yaw_total)) > 0.15:
            parts.append(("mark", pt[f"{side}_eye"][None], eye_r, (25, 25, 30), 0))
    if math.cos(math.radians(yaw_total)) > 0.1:
        parts.append(("mark", pt["nose"][None], max(0.8, 0.11 * r), (150, 55, 45), 0))
        parts.append(("line", np.stack([pt["mouth_a"], pt["mouth_b"]]), 1.0, (120, 30, 40), 0))
    return parts


def _fixed(points: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """Image points ``(N, 2)`` -> int32 canvas points in cv2's fixed-point (``_SHIFT`` fractional bits)."""
    return np.round((points - np.array([x0, y0])) * _ONE).astype(np.int32)


def rasterize_figure(fig: Figure) -> Raster:
    """Draw the figure on a tight canvas: RGB colours (with outlines and texture) and the part-id raster."""
    h = float(fig.height)
    a = fig.appearance
    parts = _parts(fig)
    outline = max(1, round(0.008 * h))
    lo = np.min([p[1].min(0) - p[2] for p in parts], axis=0) - outline - 2
    hi = np.max([p[1].max(0) + p[2] for p in parts], axis=0) + outline + 2
    x0, y0 = int(math.floor(lo[0])), int(math.floor(lo[1]))
    w, hgt = int(math.ceil(hi[0])) - x0 + 1, int(math.ceil(hi[1])) - y0 + 1
    rgb = np.zeros((hgt, w, 3), np.uint8)
    ids = np.zeros((hgt, w), np.uint8)

    for kind, points, radius, color, pid in parts:
        pts = _fixed(points, x0, y0)
        dark = _scaled(color, 0.42)
        if kind == "capsule":
            a_, b_ = tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1])
            t_out, t_in = max(1, round(2 * (radius + outline))), max(1, round(2 * radius))
            cv2.line(ids, a_, b_, pid, t_out, cv2.LINE_8, _SHIFT)
            cv2.line(rgb, a_, b_, dark, t_out, cv2.LINE_8, _SHIFT)
            cv2.line(rgb, a_, b_, color, t_in, cv2.LINE_8, _SHIFT)
        elif kind == "poly":
            cv2.fillPoly(ids, [pts], pid, cv2.LINE_8, _SHIFT)
            cv2.polylines(ids, [pts], True, pid, 2 * outline, cv2.LINE_8, _SHIFT)
            cv2.fillPoly(rgb, [pts], dark, cv2.LINE_8, _SHIFT)
            cv2.polylines(rgb, [pts], True, dark, 2 * outline, cv2.LINE_8, _SHIFT)
            cv2.fillPoly(rgb, [pts], color, cv2.LINE_8, _SHIFT)
        elif kind == "disc":
            c = tuple(int(v) for v in pts[0])
            cv2.circle(ids, c, round((radius + outline) * _ONE), pid, -1, cv2.LINE_8, _SHIFT)
            cv2.circle(rgb, c, round((radius + outline) * _ONE), dark, -1, cv2.LINE_8, _SHIFT)
            cv2.circle(rgb, c, round(radius * _ONE), color, -1, cv2.LINE_8, _SHIFT)
        elif kind == "mark":
            cv2.circle(rgb, tuple(int(v) for v in pts[0]), round(radius * _ONE), color, -1, cv2.LINE_8, _SHIFT)
        elif kind == "line":
            a_, b_ = tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1])
            cv2.line(rgb, a_, b_, color, 1, cv2.LINE_8, _SHIFT)

    # Cloth texture: smooth multiplicative noise over the figure, optional stripes on the torso, global lighting.
    trng = np.random.default_rng(a.texture_seed)
    cell = max(3, round(0.03 * h))
    noise = trng.standard_normal((hgt // cell + 2, w // cell + 2)).astype(np.float32)
    mod = 1.0 + a.texture_amplitude * cv2.resize(noise, (w, hgt), interpolation=cv2.INTER_LINEAR)
    if a.stripes is not None:
        period, angle, amp = a.stripes
        yy, xx = np.mgrid[0:hgt, 0:w].astype(np.float32)
        t = math.radians(angle)
        phase = (xx * math.cos(t) + yy * math.sin(t)) / max(2.0, period * h)
        stripe = np.where(np.sin(2 * math.pi * phase) > 0, 1.0, 1.0 - amp).astype(np.float32)
        mod = np.where(ids == PART_TORSO, mod * stripe, mod)
    out = rgb.astype(np.float32) * (mod * a.lighting)[..., None]
    rgb = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    rgb[ids == 0] = 0
    return Raster(rgb=rgb, ids=ids, x0=x0, y0=y0)


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Random clothes and skin with consistent side cues: left limbs warm hues, right limbs cool hues."""
    skin = hsv_to_rgb(rng.uniform(12, 32), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.95))
    hair_choice = rng.random()
    if hair_choice < 0.75:
        hair = hsv_to_rgb(rng.uniform(15, 35), rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.3))
    elif hair_choice < 0.9:
        hair = hsv_to_rgb(rng.uniform(35, 50), rng.uniform(0.4, 0.7), rng.uniform(0.6, 0.85))  # blond
    else:
        hair = hsv_to_rgb(0, 0, rng.uniform(0.55, 0.8))  # grey
    # Torso hue family (greens or purples, or near-grey) never collides with the limb families.
    t = rng.random()
    if t < 0.4:
        torso = hsv_to_rgb(rng.uniform(85, 160), rng.uniform(0.45, 0.9), rng.uniform(0.35, 0.9))
    elif t < 0.75:
        torso = hsv_to_rgb(rng.uniform(270, 325), rng.uniform(0.4, 0.85), rng.uniform(0.35, 0.9))
    else:
        torso = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.12), rng.uniform(0.15, 0.95))
    warm, cool = rng.uniform(0, 45), rng.uniform(190, 245)
    arm_s, arm_v = rng.uniform(0.65, 1.0, 2), rng.uniform(0.6, 1.0, 2)
    upper = (hsv_to_rgb(warm, arm_s[0], arm_v[0]), hsv_to_rgb(cool, arm_s[1], arm_v[1]))
    fore = (
        hsv_to_rgb(warm + rng.uniform(-8, 8), arm_s[0], min(1.0, arm_v[0] * 1.2 + 0.1)),
        hsv_to_rgb(cool + rng.uniform(-8, 8), arm_s[1], min(1.0, arm_v[1] * 1.2 + 0.1)),
    )
    leg_s, leg_v = rng.uniform(0.5, 0.9, 2), rng.uniform(0.3, 0.6, 2)
    warm_leg, cool_leg = rng.uniform(0, 40), rng.uniform(195, 245)
    thigh = (hsv_to_rgb(warm_leg, leg_s[0], leg_v[0]), hsv_to_rgb(cool_leg, leg_s[1], leg_v[1]))
    shin = (
        hsv_to_rgb(warm_leg, leg_s[0], min(1.0, leg_v[0] * 1.3 + 0.05)),
        hsv_to_rgb(cool_leg, leg_s[1], min(1.0, leg_v[1] * 1.3 + 0.05)),
    )
    shoe = hsv_to_rgb(rng.uniform(0, 40), rng.uniform(0, 0.5), rng.uniform(0.05, 0.25))
    stripes = None
    if rng.random() < 0.45:
        stripes = (float(rng.uniform(0.025, 0.06)), float(rng.uniform(0, 180)), float(rng.uniform(0.15, 0.35)))
    return Appearance(
        skin=skin,
        hair=hair,
        torso=torso,
        upper_arm=upper,
        forearm=fore,
        thigh=thigh,
        shin=shin,
        shoe=shoe,
        stripes=stripes,
        lighting=float(rng.uniform(0.85, 1.1)),
        texture_amplitude=float(rng.uniform(0.02, 0.08)),
        texture_seed=int(rng.integers(2**31)),
    )


def sample_figure(rng: np.random.Generator, pelvis: tuple[float, float], height: float) -> Figure:
    """A plausible random pose (joint angles within human-like limits) with a random appearance."""

    def pair(fn) -> tuple[float, float]:
        return (float(fn()), float(fn()))

    def arm_abduction() -> float:
        u = rng.random()
        if u < 0.5:
            return rng.uniform(-5, 35)  # relaxed
        if u < 0.8:
            return rng.uniform(35, 170)  # raised
        return rng.uniform(-30, -5)  # across the body

    def elbow() -> float:
        return rng.uniform(-20, 40) if rng.random() < 0.6 else rng.uniform(40, 145)

    def hip() -> float:
        return rng.uniform(-8, 25) if rng.random() < 0.85 else rng.uniform(25, 55)

    def knee() -> float:
        return float(np.clip(rng.normal(0, 12), -30, 30)) if rng.random() < 0.8 else rng.uniform(-55, 65)

    def thigh_len() -> float:
        return rng.uniform(0.85, 1.0) if rng.random() < 0.85 else rng.uniform(0.35, 0.7)  # sitting / lifted leg

    rotation = rng.normal(0, 4) if rng.random() < 0.9 else rng.uniform(-35, 35)
    yaw = rng.uniform(-65, 65) if rng.random() < 0.5 else float(np.clip(rng.normal(0, 12), -30, 30))
    head_yaw = float(np.clip(rng.normal(0, 15), -80 - yaw, 80 - yaw))
    return Figure(
        pelvis=(float(pelvis[0]), float(pelvis[1])),
        height=float(height),
        rotation=float(rotation),
        lean=float(np.clip(rng.normal(0, 7), -25, 25)),
        head_tilt=float(np.clip(rng.normal(0, 10), -30, 30)),
        yaw=float(yaw),
        head_yaw=head_yaw,
        arm_abduction=pair(arm_abduction),
        elbow_flex=pair(elbow),
        hip_abduction=pair(hip),
        knee_flex=pair(knee),
        arm_length=tuple(float(v) for v in rng.uniform(0.75, 1.0, 4)),  # type: ignore[arg-type]
        leg_length=(
            float(thigh_len()),
            float(rng.uniform(0.85, 1.0)),
            float(thigh_len()),
            float(rng.uniform(0.85, 1.0)),
        ),
        appearance=sample_appearance(rng),
    )
