"""Attributions in the results store: group ``attribution`` keyed by the store's sample index.

Arrays (images top-left in a canvas of the largest image, the rest NaN / False)::

    response     str [sample]                     the model's own greedy response every method explains
    token_text   str [sample, response_token]     its tokens (a coordinate; "" past its end)
    mask         bool [sample, y, x]               ground-truth mask of the asked finding (phantom data only)
    <method>/map       float32 [sample, y, x]      the method's map in the image's pixels
    <method>/tokens    float32 [sample, response_token]   per response token, where the method defines them
    <method>/concepts  float32 [sample, concept]   per concept (coordinate ``concept``), where defined (MedFocus)
    <method>/region    bool [sample, y, x]         the region the method chose, where it chooses one

The group's meta holds the model id and weight hash, each method's own name (as evaluations call it)
and settings, and which of its outputs it defines (found on the first sample: a method's outputs are
the same kind on every sample).
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from interp.attribution import METHODS, check_names, method
from interp.attribution.base import MAX_NEW_TOKENS, Attribution, Sample, respond
from interp.errors import InterpError
from interp.store import Field, SampleIndex, StoreWriter
from interp.store.layout import GROUP_KEY, as_json, occupied, target

GROUP = "attribution"
TOKENS = MAX_NEW_TOKENS  # stored response tokens: a greedy response has at most this many
Outputs = dict[str, dict[str, Any]]  # method -> {"tokens": bool, "region": bool, "concepts": [names]}


def settings(name: str) -> dict[str, Any]:
    """Method ``name``'s settings: its constructor's defaults with the registry's overrides (JSON values)."""
    check_names([name])
    module, cls, kwargs = METHODS[name]
    init = inspect.signature(getattr(importlib.import_module(f"interp.attribution.{module}"), cls).__init__)
    out = {p.name: p.default for p in init.parameters.values() if p.default is not inspect.Parameter.empty} | kwargs
    return as_json({k: v for k, v in out.items() if v is None or isinstance(v, (bool, int, float, str, tuple, list))},
                   f"{name} settings")


def outputs_of(m: Any, a: Attribution) -> dict[str, Any]:
    """Which outputs method ``m`` defines, from one of its attributions (concept names: all it may score)."""
    return {"tokens": a.tokens is not None, "region": a.region is not None,
            "concepts": list(getattr(m, "concepts", a.concepts)) if a.concepts else []}


def layout(outputs: Outputs, shape: tuple[int, int], masks: bool) -> tuple[dict[str, Field], dict]:
    """(fields, statics) of the group for methods defining ``outputs``, images up to ``shape``."""
    plane = (shape, ("y", "x"))
    tok = ((TOKENS,), ("response_token",))
    fields = {"response": Field((), (), "str", ""), "token_text": Field(*tok, "str", "", coord=True)}
    if masks:
        fields["mask"] = Field(*plane, "bool", False, {"what": "ground-truth mask of the asked finding"})
    statics = {}
    for name, out in outputs.items():
        fields[f"{name}/map"] = Field(*plane, "float32", float("nan"))
        if out["tokens"]:
            fields[f"{name}/tokens"] = Field(*tok, "float32", float("nan"))
        if out["concepts"]:
            fields[f"{name}/concepts"] = Field((len(out["concepts"]),), ("concept",), "float32", float("nan"))
            statics[f"{name}/concept"] = (("concept",), np.asarray(out["concepts"], dtype=object), {})
        if out["region"]:
            fields[f"{name}/region"] = Field(*plane, "bool", False)
    return fields, statics


def _canvas(values: np.ndarray | None, fields: Mapping[str, Field], key: str) -> np.ndarray:
    """``values`` at the start of field ``key``'s shape, its fill past them (all fill when None)."""
    f = fields[key]
    out = np.full(f.shape, f.fill, dtype=f.dtype)
    if values is not None:
        out[tuple(slice(0, n) for n in np.shape(values))] = values
    return out


def sample_row(results: Mapping[str, Attribution], outputs: Outputs, fields: Mapping[str, Field],
               mask: np.ndarray | None, sample_id: str) -> dict[str, np.ndarray]:
    """One sample's arrays of the group from each method's attribution."""
    first = next(iter(results.values()))
    if len(first.token_text) > TOKENS:
        raise InterpError(f"sample {sample_id}: the response has {len(first.token_text)} tokens, more than the "
                          f"{TOKENS} stored")
    text = np.array(first.token_text + [""] * (TOKENS - len(first.token_text)), dtype=object)
    row = {"response": np.array(first.response, dtype=object), "token_text": text}
    if "mask" in fields:
        row["mask"] = _canvas(mask, fields, "mask")
    for name, a in results.items():
        out = outputs[name]
        row[f"{name}/map"] = _canvas(a.map, fields, f"{name}/map")
        if out["tokens"]:
            row[f"{name}/tokens"] = _canvas(a.tokens, fields, f"{name}/tokens")
        if out["concepts"]:
            extra = set(a.concepts) - set(out["concepts"])
            if extra:
                raise InterpError(f"{name} scored concept {sorted(extra)[0]!r} on sample {sample_id}, not among "
                                  f"the stored {', '.join(out['concepts'])}")
            row[f"{name}/concepts"] = np.array([a.concepts.get(c, np.nan) for c in out["concepts"]], np.float32)
        if out["region"]:
            row[f"{name}/region"] = _canvas(a.region, fields, f"{name}/region")
    return row


def truth(data: Any, item: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(image, ground-truth mask of the item's finding: empty where absent; None without ground truth)."""
    if not hasattr(data, "phantom"):
        return data.image(item.image), None
    ph = data.phantom(item.image)
    return ph.image, ph.finding_masks.get(item.finding, np.zeros(ph.image.shape[:2], bool))


def stored_meta(url: str, storage_options: dict | None = None) -> dict | None:
    """The meta of the attribution group in the store at ``url`` (None: there is none)."""
    if not occupied(url, storage_options)[1]:
        return None
    where, opts = target(url, storage_options)
    root = zarr.open_group(where, mode="r", **opts)
    info = root[GROUP].attrs.asdict().get(GROUP_KEY) if GROUP in root else None
    return info.get("meta") if isinstance(info, dict) else None


def earlier_outputs(url: str, meta: Mapping[str, Any], resume: bool) -> Outputs | None:
    """The outputs an earlier run of these settings recorded in the store at ``url`` (None: no such run).
    When resuming, a group made with other settings is refused here, before any attribution runs."""
    old = stored_meta(url)
    if old is None:
        return None
    new = as_json(dict(meta), "meta")
    differ = [k for k in sorted((set(old) | set(new)) - {"outputs", "code_version"}) if old.get(k) != new.get(k)]
    if not differ:
        return old["outputs"]
    if resume:
        k = differ[0]
        raise InterpError(f"store {url} holds an attribution with {k}={old.get(k)!r}, not {new.get(k)!r}; "
                          "use a new --out or --overwrite")
    return None


class Attributor:
    """Every method of ``names`` on one adapter: each sample's response once, then each method on it."""

    def __init__(self, adapter: Any, names: Sequence[str]) -> None:
        if not names:
            raise InterpError("no attribution method given")
        self.adapter = adapter
        self.methods = {name: method(name, adapter) for name in dict.fromkeys(names)}
        self.elapsed = dict.fromkeys(self.methods, 0.0)

    def __call__(self, sample: Sample) -> dict[str, Attribution]:
        response = respond(self.adapter, sample)
        out = {}
        for name, m in self.methods.items():
            t0 = time.perf_counter()
            out[name] = m.attribute(sample, response)
            self.elapsed[name] += time.perf_counter() - t0
        return out


def write_attributions(adapter: Any, names: Sequence[str], data: Any, items: Sequence[Any], samples: SampleIndex,
                       out: str, *, config: Mapping[str, Any], chunk_samples: int, mode: str = "resume") -> str:
    """Attribute ``items`` of ``data`` (the model's own responses) with methods ``names`` into group
    ``attribution`` of the store at ``out`` (``samples``: their index), chunk by chunk, resumable; ranks of
    a launcher write disjoint chunks. Returns ``out``."""
    from interp.store.ranks import write_all

    run = Attributor(adapter, names)
    meta = {"model_id": adapter.model_id, "weight_hash": adapter.weight_hash, "adapter": adapter.name,
            "methods": {name: {"name": m.name, "settings": settings(name)} for name, m in run.methods.items()},
            "response_tokens": TOKENS, "config": dict(config)}
    known = earlier_outputs(out, meta, mode == "resume")
    first: dict[str, Attribution] = {}
    if known is None:  # a new group: the first sample shows which outputs each method defines
        it = items[0]
        first = run(Sample(data.image(it.image), it.prompt, it.spans, it.id))
        known = {name: outputs_of(run.methods[name], a) for name, a in first.items()}
    shapes = [data.image(i).shape[:2] for i in dict.fromkeys(it.image for it in items)]
    fields, statics = layout(known, (max(s[0] for s in shapes), max(s[1] for s in shapes)), hasattr(data, "phantom"))

    def chunk(r: range) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        rows, images = [], []
        for i in r:
            it = items[i]
            image, mask = truth(data, it)
            results = first if i == 0 and first else run(Sample(image, it.prompt, it.spans, it.id))
            rows.append(sample_row(results, known, fields, mask, it.id))
            images.append(image)
        return {k: np.stack([row[k] for row in rows]) for k in fields}, images

    def writer(create: bool) -> StoreWriter:
        return StoreWriter(out, GROUP, samples=samples, fields=fields, statics=statics,
                           meta={**meta, "outputs": known}, chunk_samples=chunk_samples, mode=mode, create=create)

    write_all(writer, chunk, f"attributing {out}", lambda: {"elapsed_s": {k: round(v, 2) for k, v in run.elapsed.items()}})
    return out
