"""Deterministic synthetic chest X-ray phantoms with exact pixel ground truth.

Radiological convention (PA view): the patient's LEFT is on the IMAGE RIGHT, i.e. the
left lung, left effusion, ... occupy columns > W/2; the heart bulges to image right.

`render(spec, seed)` draws the anatomy of `spec.anatomy` with texture and noise drawn
from `seed` only, then composites each finding as its own soft layer, strictly inside
that layer's support. Pixel noise and exposure are pointwise and come after, so
`render(spec.without(f), seed)` differs from `render(spec, seed)` only inside
`finding_masks[f]` (bit-exact elsewhere): the exact counterfactual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property, lru_cache, partial
from typing import Any, Callable

import numpy as np

from interp.errors import InterpError

FINDINGS = ("pleural_effusion", "pneumothorax", "consolidation", "nodule", "cardiomegaly")
SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
SEVERITIES = ("small", "moderate", "large")
CONFOUNDERS = ("chest_tube",)
#: the finding a chest tube co-occurs with by default (see `sample_spec`)
CONFOUNDED_FINDING = "pleural_effusion"
CONCEPTS = (
    "body", "lung_left", "lung_right",
    "lung_left_upper", "lung_left_middle", "lung_left_lower",
    "lung_right_upper", "lung_right_middle", "lung_right_lower",
    "apex_left", "apex_right", "costophrenic_left", "costophrenic_right",
    "heart", "mediastinum", "hilum_left", "hilum_right",
    "diaphragm_left", "diaphragm_right", "trachea", "spine",
    "clavicle_left", "clavicle_right", "upper_mediastinum",
)
#: zone each finding is confined to (None: any zone; cardiomegaly has neither side nor zone)
FIXED_ZONE = {"pleural_effusion": "lower", "pneumothorax": "upper"}
#: findings drawn in any lung zone (the ones zone questions ask about)
ZONE_FINDINGS = ("consolidation", "nodule")

_LUNG_CX = 0.2  # lung centre offset from the midline (canonical units)
_LUNG_CY, _LUNG_B = 0.52, 0.42  # lung ellipse centre row and half-height
_DOME_H = 0.09  # diaphragm dome height above the costophrenic level
_CARDIOMEGALY_CTR = {"small": 0.60, "moderate": 0.65, "large": 0.71}
_EFFUSION_H = {"small": 0.08, "moderate": 0.14, "large": 0.24}  # above the dome
_PNEUMO_K = {"small": 0.84, "moderate": 0.74, "large": 0.6}  # collapsed-lung scale
# consolidations are large, faint and fluffy; nodules small, dense and sharp: no overlap
_CONSOLIDATION_R = {"small": 0.1, "moderate": 0.13, "large": 0.16}
_NODULE_R = {"small": 0.047, "moderate": 0.055, "large": 0.065}
_MIN_ALPHA = 0.02  # layer alpha below this is dropped, so the mask is what changes
#: compositing order, fixed: air replaces lung, the heart covers it, densities add on top
_RENDER_ORDER = ("pneumothorax", "cardiomegaly", "pleural_effusion", "consolidation", "nodule")


@dataclass(frozen=True)
class Finding:
    """One finding; `side` is the patient's side, `zone` the lung zone."""

    name: str
    side: str | None
    zone: str | None
    severity: str

    def __post_init__(self) -> None:
        if self.name not in FINDINGS:
            raise InterpError(f"unknown finding {self.name!r}; valid: {', '.join(FINDINGS)}")
        if self.severity not in SEVERITIES:
            raise InterpError(f"unknown severity {self.severity!r}; valid: {', '.join(SEVERITIES)}")
        if self.name == "cardiomegaly":
            if self.side is not None or self.zone is not None:
                raise InterpError("cardiomegaly takes side=None and zone=None")
            return
        if self.side not in SIDES:
            raise InterpError(f"{self.name}: unknown side {self.side!r}; valid: {', '.join(SIDES)}")
        allowed = (FIXED_ZONE[self.name],) if self.name in FIXED_ZONE else ZONES
        if self.zone not in allowed:
            raise InterpError(f"{self.name}: zone {self.zone!r} not in {', '.join(allowed)}")


@dataclass(frozen=True)
class Anatomy:
    """Patient-level geometry and exposure (canonical units: the image is [0, 1]^2)."""

    scale: float = 1.0  # overall size of the chest in the frame
    shift_x: float = 0.0
    shift_y: float = 0.0
    rotation: float = 0.0  # degrees
    lung_width: float = 0.165  # half-width of each lung
    ctr: float = 0.45  # cardiothoracic ratio
    diaphragm_left: float = 0.79  # costophrenic level (row) of each hemidiaphragm
    diaphragm_right: float = 0.77
    body_width: float = 0.45
    rib_phase: float = 0.0
    exposure: float = 1.0  # gain
    gamma: float = 1.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        u = rng.uniform
        right = u(0.75, 0.79)
        return cls(
            scale=u(0.93, 1.05), shift_x=u(-0.025, 0.025), shift_y=u(-0.025, 0.025),
            rotation=u(-4.0, 4.0), lung_width=u(0.155, 0.175), ctr=u(0.42, 0.48),
            diaphragm_left=right + u(0.0, 0.03), diaphragm_right=right,
            body_width=u(0.43, 0.47), rib_phase=u(0.0, 1.0), exposure=u(0.85, 1.15),
            gamma=u(0.85, 1.15),
        )


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw: anatomy, findings and confounders (no randomness left but texture)."""

    anatomy: Anatomy
    findings: tuple[Finding, ...] = ()
    confounders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for c in self.confounders:
            if c not in CONFOUNDERS:
                raise InterpError(f"unknown confounder {c!r}; valid: {', '.join(CONFOUNDERS)}")

    def has(self, name: str, side: str | None = None) -> bool:
        """Whether finding (or confounder) `name` is present, on `side` if given."""
        _check_name(name)
        if name in CONFOUNDERS:
            return name in self.confounders
        return any(f.name == name and (side is None or f.side == side) for f in self.findings)

    def get(self, name: str) -> Finding | None:
        """The first instance of finding `name`, or None."""
        _check_name(name)
        return next((f for f in self.findings if f.name == name), None)

    def without(self, name: str) -> PhantomSpec:
        """This spec with every instance of finding (or confounder) `name` removed."""
        _check_name(name)
        return replace(
            self,
            findings=tuple(f for f in self.findings if f.name != name),
            confounders=tuple(c for c in self.confounders if c != name),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "anatomy": asdict(self.anatomy),
            "findings": [asdict(f) for f in self.findings],
            "confounders": list(self.confounders),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomSpec:
        try:
            known = {f.name for f in fields(Anatomy)}
            if set(d["anatomy"]) != known:
                raise InterpError(f"anatomy fields {sorted(d['anatomy'])} != {sorted(known)}")
            return cls(
                anatomy=Anatomy(**{k: float(v) for k, v in d["anatomy"].items()}),
                findings=tuple(Finding(**f) for f in d["findings"]),
                confounders=tuple(d["confounders"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise InterpError(f"malformed phantom spec: {e!r}") from None


def _check_name(name: str) -> None:
    if name not in FINDINGS and name not in CONFOUNDERS:
        raise InterpError(f"unknown finding {name!r}; valid: {', '.join(FINDINGS + CONFOUNDERS)}")


def sample_spec(
    rng: np.random.Generator, prevalence: float = 0.5, confounder_rate: float | None = None,
    confounded: str = CONFOUNDED_FINDING,
) -> PhantomSpec:
    """Random anatomy; each finding present independently with probability `prevalence`.

    With `confounder_rate` r a chest tube is present in a fraction r of the images with the
    finding `confounded` and 1 - r of those without (r = 0.5: uncorrelated; None: never).
    """
    if not 0.0 <= prevalence <= 1.0:
        raise InterpError(f"prevalence must be in [0, 1], got {prevalence}")
    if confounder_rate is not None and not 0.0 <= confounder_rate <= 1.0:
        raise InterpError(f"confounder_rate must be in [0, 1] or None, got {confounder_rate}")
    if confounded not in FINDINGS:
        raise InterpError(f"unknown confounded finding {confounded!r}; valid: {', '.join(FINDINGS)}")
    anatomy = Anatomy.sample(rng)
    findings = []
    for name in FINDINGS:
        if rng.random() >= prevalence:
            continue
        severity = SEVERITIES[rng.integers(3)]
        if name == "cardiomegaly":
            findings.append(Finding(name, None, None, severity))
        else:
            zone = FIXED_ZONE.get(name) or ZONES[rng.integers(3)]
            findings.append(Finding(name, SIDES[rng.integers(2)], zone, severity))
    spec = PhantomSpec(anatomy, tuple(findings))
    if confounder_rate is None:
        return spec
    p = confounder_rate if spec.has(confounded) else 1.0 - confounder_rate
    return replace(spec, confounders=("chest_tube",) if rng.random() < p else ())


@dataclass
class Phantom:
    """A rendered phantom: image in [0, 1] and boolean masks with the same shape.

    `concept_masks` (every name in CONCEPTS) is computed on first access.
    """

    image: np.ndarray
    finding_masks: dict[str, np.ndarray]
    confounder_masks: dict[str, np.ndarray]
    spec: PhantomSpec
    _concepts: Callable[[], dict[str, np.ndarray]] = field(repr=False, compare=False)

    @cached_property
    def concept_masks(self) -> dict[str, np.ndarray]:
        return self._concepts()


# ---------------------------------------------------------------- geometry helpers


def _clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """np.clip without its Python overhead (matters at 64x64)."""
    return np.minimum(np.maximum(x, lo), hi)


def _ramp(x: np.ndarray, w: float) -> np.ndarray:
    """Soft step: 0 for x <= -w/2, 1 for x >= w/2 (compact transition)."""
    return _clip(x / w + 0.5, 0.0, 1.0)


def _lerp(img: np.ndarray, value: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    return img + alpha * (value - img)


def _segments_dist(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Distance from every pixel to a polyline through `pts`."""
    best = np.full(u.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = _clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        best = np.minimum(best, np.hypot(u - x0 - t * dx, v - y0 - t * dy))
    return best


@lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian matrix K: blur(X) = K @ X @ K.T."""
    i = np.arange(size)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(1, keepdims=True)


def _blur(x: np.ndarray, sigma_px: float) -> np.ndarray:
    k = _blur_matrix(x.shape[0], sigma_px)
    return k @ x @ k.T


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Unit-variance smooth Gaussian noise field."""
    n = _blur(rng.standard_normal((size, size)), sigma_px)
    return n / n.std()


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size - 0.5
    return np.meshgrid(c, c)  # x (columns), y (rows), centred


class _Geometry:
    """Canonical coordinates of every pixel and the anatomy's soft shapes."""

    def __init__(self, a: Anatomy, size: int):
        x, y = _pixel_grid(size)
        th = np.deg2rad(a.rotation)
        dx, dy = x - a.shift_x, y - a.shift_y
        self.u = 0.5 + (np.cos(th) * dx + np.sin(th) * dy) / a.scale
        self.v = 0.5 + (-np.sin(th) * dx + np.cos(th) * dy) / a.scale
        self.a, self.size = a, size
        self.px = 1.0 / (size * a.scale)  # one pixel in canonical units
        self.sgn = {"left": 1.0, "right": -1.0}  # image right = patient left
        self.level = {"left": a.diaphragm_left, "right": a.diaphragm_right}
        self.lung = {s: self.lung_alpha(s, self.u, self.v) for s in SIDES}
        mid = np.abs(self.u - 0.5)
        self.heart = self.heart_alpha(a.ctr)
        self.med = _ramp(0.065 - mid, 2 * self.px) * _ramp(self.v - 0.05, 2 * self.px) * _ramp(0.7 - self.v, 2 * self.px)
        #: lung not hidden by heart or mediastinum: where lung findings can show
        self.field = {s: self.lung[s] * (1.0 - self.heart) * (1.0 - self.med) for s in SIDES}

    def cx(self, side: str) -> float:
        return 0.5 + self.sgn[side] * _LUNG_CX

    def dome(self, side: str, u: np.ndarray) -> np.ndarray:
        t = (u - self.cx(side)) / self.a.lung_width
        return self.level[side] - _DOME_H * _clip(1.0 - t * t, 0.0, 1.0)

    def lung_alpha(self, side: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Lung field: an ellipse cut from below by the diaphragm dome."""
        lw = self.a.lung_width
        e = np.hypot((u - self.cx(side)) / lw, (v - _LUNG_CY) / _LUNG_B)
        return _ramp((1.0 - e) * lw, 1.5 * self.px) * _ramp(self.dome(side, u) - v, 1.5 * self.px)

    def lateral_x(self, side: str, v: float) -> float:
        """Column of the lateral lung edge at row `v`."""
        t = max(0.0, 1.0 - ((v - _LUNG_CY) / _LUNG_B) ** 2)
        return self.cx(side) + self.sgn[side] * self.a.lung_width * t**0.5

    def zone_rows(self, side: str) -> tuple[float, float, float, float]:
        """Rows of the apex, the two zone boundaries and the costophrenic level."""
        top, bottom = _LUNG_CY - _LUNG_B, self.level[side]
        third = (bottom - top) / 3
        return top, top + third, top + 2 * third, bottom

    def heart_alpha(self, ctr: float) -> np.ndarray:
        hw = ctr * (_LUNG_CX + self.a.lung_width)
        hc = 0.5 + 0.3 * hw  # bulges to the patient's left
        hv = self.level["left"] - 0.15
        hh = 0.14 * (hw / 0.16) ** 0.5
        e = np.hypot((self.u - hc) / hw, (self.v - hv) / hh)
        return _ramp((1.0 - e) * hw, 1.5 * self.px)


# ---------------------------------------------------------------- anatomy


def _anatomy_image(g: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Blurred anatomy (no findings) and the soft shapes the concept masks are cut from."""
    u, v, a, px = g.u, g.v, g.a, g.px
    mid = np.abs(u - 0.5)
    bw = 0.15 + (a.body_width - 0.15) * _clip(v / 0.2, 0.0, 1.0) ** 0.5  # neck -> shoulders
    body = _ramp(bw - mid, 2 * px) * _ramp(v + 0.1, 2 * px)
    lung = np.maximum(g.lung["left"], g.lung["right"])
    tex = _smooth_noise(rng, g.size, 1.0)
    hila = {s: np.hypot(u - (0.5 + g.sgn[s] * 0.1), v - 0.45) for s in SIDES}
    near_hilum = np.exp(-np.minimum(hila["left"], hila["right"]) / 0.12)
    heart, med = g.heart, g.med
    spine = _ramp(0.04 - mid, 2 * px)
    trachea = _ramp(0.017 - mid, 1.5 * px) * _ramp(0.36 - v, 2 * px)
    # posterior ribs: arcs falling off laterally, spaced ~0.075
    t = (v - 0.45 * (mid - 0.05) ** 2 * 3) / 0.075 + a.rib_phase
    ribs = _clip(1.0 - np.abs(t - np.floor(t) - 0.5) / 0.2, 0.0, 1.0) * _ramp(mid - 0.05, 2 * px)
    clav = _segments_dist(mid, v, [(0.04, 0.19), (0.32, 0.11)])
    clavicle = _ramp(0.014 - clav, 1.5 * px)

    img = np.full(u.shape, 0.03)
    img = _lerp(img, 0.5, body)
    img = _lerp(img, 0.17 + 0.08 * near_hilum + 0.035 * tex, lung)
    img += body * (0.05 + 0.05 * lung) * ribs
    img += 0.08 * spine * body * (0.8 + 0.2 * np.cos(v * 2 * np.pi / 0.06))
    img = _lerp(img, 0.64 + 0.02 * tex, med * body)
    img = _lerp(img, 0.72, heart)
    img = _lerp(img, 0.36, trachea)
    img += 0.18 * clavicle * body
    img += 0.06 * np.exp(-((np.minimum(hila["left"], hila["right"]) / 0.04) ** 2)) * lung
    img = _blur(img, 0.6)
    return img, {"body": body, "heart": heart, "med": med, "spine": spine,
                 "trachea": trachea, "hila": hila, "clavicle": clavicle}


def _concept_masks(g: _Geometry, shapes: dict, heart: np.ndarray) -> dict[str, np.ndarray]:
    u, v = g.u, g.v
    body = shapes["body"] > 0.5
    heart_m = heart > 0.5
    med_m = (shapes["med"] > 0.5) & ~heart_m & body
    out: dict[str, np.ndarray] = {}
    for s in SIDES:
        lung = (g.lung[s] > 0.5) & ~heart_m & ~med_m
        top, z1, z2, cp = g.zone_rows(s)
        out[f"lung_{s}"] = lung
        for z, (lo, hi) in zip(ZONES, ((-1.0, z1), (z1, z2), (z2, 2.0))):
            out[f"lung_{s}_{z}"] = lung & (v >= lo) & (v < hi)
        out[f"apex_{s}"] = lung & (v < top + 0.1)
        out[f"costophrenic_{s}"] = body & (np.hypot(u - g.lateral_x(s, cp), v - cp) < 0.07)
        near_dome = np.abs(v - g.dome(s, u)) < 0.02
        out[f"diaphragm_{s}"] = near_dome & (np.abs(u - g.cx(s)) < g.a.lung_width) & body
        out[f"hilum_{s}"] = shapes["hila"][s] < 0.05
        # the drawn clavicle (mirrored about the midline), on this side of it
        out[f"clavicle_{s}"] = (shapes["clavicle"] > 0.5) & ((u - 0.5) * g.sgn[s] > 0) & body
    out["body"] = body
    out["heart"] = heart_m
    out["mediastinum"] = med_m
    out["trachea"] = (shapes["trachea"] > 0.5) & body
    out["spine"] = (shapes["spine"] > 0.5) & body
    # upper mediastinum: the mediastinum strip above the top of the heart (its highest pixel,
    # enlarged by cardiomegaly if present); it holds the intrathoracic trachea, which the
    # mediastinum mask already includes
    out["upper_mediastinum"] = med_m & (v < v[heart_m].min())
    return {c: out[c] for c in CONCEPTS}


# ---------------------------------------------------------------- findings


def _zone_point(g: _Geometry, f: Finding, rng: np.random.Generator, r: float) -> tuple[float, float]:
    """A random centre inside zone `f.zone` of lung `f.side`, ~r away from the edges."""
    _, z1, z2, cp = g.zone_rows(f.side)
    lo, hi = {"upper": (0.2, z1), "middle": (z1, z2), "lower": (z2, cp - 0.06)}[f.zone]
    v = rng.uniform(lo + 0.3 * r, hi - 0.3 * r)
    sgn, cx = g.sgn[f.side], g.cx(f.side)
    half = abs(g.lateral_x(f.side, v) - cx)
    u = cx + sgn * rng.uniform(0.0, 0.65) * max(half - r, 0.0)  # clear of the heart
    dome = float(g.dome(f.side, np.array(u)))
    # clear of the dome, but never out of the zone: a blob too big for the lower zone is cut by the lung field
    # (drawing it higher put moderate and large lower-zone consolidations in the middle zone)
    return u, max(min(v, dome - r - 0.01), lo + 0.3 * r)


Layer = tuple[np.ndarray, np.ndarray, bool]  # alpha, value, additive (else alpha-blend)


def _finding_layers(g: _Geometry, f: Finding, rng: np.random.Generator) -> list[Layer]:
    """Layers of one finding, composited in order. Air and the enlarged heart replace what
    is there; fluid, consolidation and nodules add density, so they show over anything."""
    u, v, px = g.u, g.v, g.px
    if f.name == "cardiomegaly":
        big, normal = g.heart_alpha(_CARDIOMEGALY_CTR[f.severity]), g.heart_alpha(g.a.ctr)
        return [(np.where(normal < 1.0, big, 0.0), np.full(u.shape, 0.72), False)]
    lung, sgn, cx = g.field[f.side], g.sgn[f.side], g.cx(f.side)
    if f.name == "pleural_effusion":
        lat = _clip((u - cx) * sgn / g.a.lung_width, 0.0, 1.0)
        h = _EFFUSION_H[f.severity]
        surface = g.level[f.side] - _DOME_H - h * (0.3 + 0.7 * lat**2)  # meniscus
        tex = _smooth_noise(rng, g.size, 2.0)
        return [(lung * _ramp(v - surface, 3 * px), 0.42 + 0.015 * tex, True)]
    if f.name == "pneumothorax":
        k = _PNEUMO_K[f.severity]
        au, av = cx - sgn * 0.6 * g.a.lung_width, g.level[f.side] - 0.05  # collapse anchor
        collapsed = g.lung_alpha(f.side, au + (u - au) / k, av + (v - av) / k)
        gap = lung * (1.0 - collapsed)
        line = lung * _clip(4.0 * collapsed * (1.0 - collapsed), 0.0, 1.0)
        return [(gap, np.full(u.shape, 0.035), False), (0.8 * line, np.full(u.shape, 0.5), False)]
    if f.name == "consolidation":
        r = _CONSOLIDATION_R[f.severity]
        uc, vc = _zone_point(g, f, rng, r)
        n = _smooth_noise(rng, g.size, 2.5)
        d = np.hypot(u - uc, v - vc) / r
        fluffy = _clip((1.0 - d + 0.2 * np.abs(n)) / 0.4, 0.0, 1.0)  # no satellite blobs
        return [(lung * fluffy, 0.27 + 0.05 * n, True)]
    r = max(_NODULE_R[f.severity], 2.5 * px)  # nodule: >= 2.5 px radius
    uc, vc = _zone_point(g, f, rng, r)
    d_px = np.hypot(u - uc, v - vc) / px
    return [(_clip(r / px - d_px + 0.5, 0.0, 1.0), np.full(u.shape, 0.5), True)]


def _chest_tube(g: _Geometry, rng: np.random.Generator) -> Layer:
    """A drain from the lateral chest wall to the apex, on a random side: it must not
    depend on any finding, or removing the finding would move it."""
    side = SIDES[rng.integers(2)]
    sgn, cx, lw = g.sgn[side], g.cx(side), g.a.lung_width
    wall = 0.5 + sgn * (g.a.body_width - 0.01)
    pts = [(wall, 0.8), (cx + sgn * 0.85 * lw, 0.66), (cx + sgn * 0.35 * lw, 0.36), (cx + sgn * 0.1 * lw, 0.2)]
    pts = [(x + rng.uniform(-0.015, 0.015), y) for x, y in pts]
    alpha = _clip(1.2 - _segments_dist(g.u, g.v, pts) / g.px, 0.0, 1.0)
    return alpha, np.full(g.u.shape, 0.95), False


def _composite(img: np.ndarray, layers: list[Layer]) -> tuple[np.ndarray, np.ndarray]:
    """Blend layers into `img` strictly inside their support; returns (img, support)."""
    mask = np.zeros(img.shape, bool)
    for alpha, value, additive in layers:
        m = alpha >= _MIN_ALPHA
        img = np.where(m, img + alpha * value if additive else _lerp(img, value, alpha), img)
        mask |= m
    return img, mask


def _finding_rng(seed: int, stream: int, instance: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1 + stream, instance])


def render(spec: PhantomSpec, seed: int, size: int = 64) -> Phantom:
    """Draw `spec`; texture, noise and finding placement depend on `seed` only."""
    if size < 16:
        raise InterpError(f"phantom size must be >= 16 pixels, got {size}")
    g = _Geometry(spec.anatomy, size)
    rng = np.random.default_rng([seed, 0])
    img, shapes = _anatomy_image(g, rng)
    noise = rng.standard_normal(img.shape) * 0.012
    heart = shapes["heart"]
    finding_masks: dict[str, np.ndarray] = {}
    seen: dict[str, int] = {}
    for f in sorted(spec.findings, key=lambda f: _RENDER_ORDER.index(f.name)):
        i = seen[f.name] = seen.get(f.name, -1) + 1
        layers = _finding_layers(g, f, _finding_rng(seed, FINDINGS.index(f.name), i))
        img, m = _composite(img, layers)
        finding_masks[f.name] = finding_masks[f.name] | m if f.name in finding_masks else m
        if f.name == "cardiomegaly":
            heart = np.maximum(heart, layers[0][0])
    confounder_masks = {}
    if "chest_tube" in spec.confounders:
        tube_rng = _finding_rng(seed, len(FINDINGS) + CONFOUNDERS.index("chest_tube"), 0)
        img, confounder_masks["chest_tube"] = _composite(img, [_chest_tube(g, tube_rng)])
    a = spec.anatomy
    img = _clip(img * a.exposure + noise, 0.0, 1.0) ** a.gamma
    return Phantom(
        image=img.astype(np.float32),
        finding_masks=finding_masks,
        confounder_masks=confounder_masks,
        spec=spec,
        _concepts=partial(_concept_masks, g, shapes, heart),
    )
