"""The ``acts`` group of a store: cached activations per site, with their positions as coordinates.

Per site ``<site>``: dtype [sample, position, d]. Sequence sites (LM / text tower) share the
``position`` dimension of the padded token sequence; positions past a sample's own length are
NaN in activations and ``valid`` False (no silent zero padding: ``ds[site].mean("sample")`` skips
them). Grid sites (vision tower, projector) get ``<tower>_position`` with static coordinates
``<dim>_kind/_row/_col`` (cls: kind 1, row/col -1). Coordinates over [sample, position]: ``tokens``
(pad -1), ``token_text``, ``position_kind`` (codes in attrs), ``position_row/_col`` (patch of image tokens, else -1),
``position_span`` (bit i = in span attrs ``names[i]``), ``valid``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from interp.errors import InterpError
from interp.sites import parse
from interp.store import Field

KIND_CODES = {"pad": 0, "special": 1, "image": 2, "text": 3, "query": 4}
DTYPES = ("float32", "float16")
MAX_SPANS = 16


def _dims(site_shapes: Mapping[str, tuple[int, int]], grids: Mapping[str, tuple[int, int, bool]],
          seq_len: int) -> dict[str, tuple[str, str]]:
    """Per site (position dim, d dim): shared by sites of a tower whose sizes agree."""
    taken: dict[str, Any] = {"position": ("sequence", seq_len)}

    def claim(name: str, key: Any, fallback: str) -> str:
        return name if taken.setdefault(name, key) == key else fallback

    out = {}
    for site, (n_pos, d) in site_shapes.items():
        tower, grid = parse(site).tower, grids.get(site)
        pos = ("position" if grid is None and n_pos == seq_len
               else claim(f"{tower}_position", (n_pos, grid), f"{site}_position"))
        out[site] = (pos, claim(f"{tower}_d", d, f"{site}_d"))
    return out


def acts_layout(site_shapes: Mapping[str, tuple[int, int]], grids: Mapping[str, tuple[int, int, bool]],
                seq_len: int, dtype: str, span_names: Sequence[str]) -> tuple[dict[str, Field], dict]:
    """(fields, statics) of the ``acts`` group for these sites (``grids``: site -> rows, cols, has_cls)."""
    if dtype not in DTYPES:
        raise InterpError(f"unsupported cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if len(span_names) > MAX_SPANS:
        raise InterpError(f"at most {MAX_SPANS} span names fit position_span, got {len(span_names)}")
    for site, (rows, cols, has_cls) in grids.items():
        if site not in site_shapes or site_shapes[site][0] != rows * cols + has_cls:
            raise InterpError(f"site {site}: positions {site_shapes.get(site, ('none',))[0]} do not fit grid "
                              f"{rows}x{cols}{' + cls' if has_cls else ''}")
    fields: dict[str, Field] = {}
    statics: dict[str, tuple] = {}
    for site, (pos, d) in _dims(site_shapes, grids, seq_len).items():
        n_pos, width = site_shapes[site]
        rows, cols, cls_ = grids.get(site, (0, 0, False))
        has_cls = int(cls_)
        fields[site] = Field((n_pos, width), (pos, d), dtype,
                             attrs={"grid": [rows, cols], "has_cls": bool(has_cls)} if site in grids else {})
        if site in grids and f"{pos}_kind" not in statics:
            cls, patch = np.full(has_cls, -1), np.arange(rows * cols)
            statics |= {f"{pos}_kind": ((pos,), np.r_[np.full(has_cls, KIND_CODES["special"]),
                                                    np.full(rows * cols, KIND_CODES["image"])].astype(np.int8), {}),
                        f"{pos}_row": ((pos,), np.r_[cls, patch // cols].astype(np.int16), {}),
                        f"{pos}_col": ((pos,), np.r_[cls, patch % cols].astype(np.int16), {})}
    seq = ((seq_len,), ("position",))
    fields |= {"tokens": Field(*seq, "int32", -1, coord=True),
               "token_text": Field(*seq, "str", "", coord=True),
               "position_kind": Field(*seq, "int8", 0, {"codes": KIND_CODES}, coord=True),
               "position_row": Field(*seq, "int16", -1, coord=True),
               "position_col": Field(*seq, "int16", -1, coord=True),
               "position_span": Field(*seq, "uint16", 0, {"names": list(span_names)}, coord=True),
               "valid": Field(*seq, "bool", False, coord=True)}
    return fields, statics


def sequence_rows(batch: Any, acts: Mapping[str, np.ndarray], seq_sites: set[str], seq_len: int,
                  span_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One batch's arrays of the ``acts`` group: positions typed, sequence sites padded to ``seq_len`` with NaN."""
    b, width = batch.input_ids.shape
    out = {"tokens": np.full((b, seq_len), -1, np.int32), "position_kind": np.zeros((b, seq_len), np.int8),
           "position_row": np.full((b, seq_len), -1, np.int16), "position_col": np.full((b, seq_len), -1, np.int16),
           "position_span": np.zeros((b, seq_len), np.uint16)}
    out["token_text"] = np.full((b, seq_len), "", dtype=object)
    for i, p in enumerate(batch.positions):
        out["token_text"][i, :width] = [t if k != "pad" else "" for t, k in zip(p.tokens, p.kinds)]
        out["position_kind"][i, :width] = [KIND_CODES[k] for k in p.kinds]
        out["position_row"][i, :width], out["position_col"][i, :width] = p.rows, p.cols
        for bit, name in enumerate(span_names):
            out["position_span"][i, p.spans.get(name, [])] |= np.uint16(1 << bit)
    out["valid"] = out["position_kind"] != KIND_CODES["pad"]
    out["tokens"][:, :width] = np.where(out["valid"][:, :width], batch.input_ids.cpu().numpy(), -1)
    for site, a in acts.items():
        if site in seq_sites:  # where(), not a product: a pad stores NaN, never -0.0 or a stray value
            a = np.where(out["valid"][..., None], np.pad(a, ((0, 0), (0, seq_len - width), (0, 0))), np.nan)
        out[site] = a
    return out
