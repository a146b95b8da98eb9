"""What an SAE trained by ``interp.sae.train`` has learned, scored against the phantoms' ground truth.

``quick_report``: held-out reconstruction and each finding's best single feature (image-level AUROC of
the feature's maximum over the image's patches). ``full_analysis`` adds the downstream splice check
through the model, patch-level ground truth (AUROC and IoU for findings and anatomy), SAE-Rad
descriptions from phantom reports of the training images, reports compiled for the held-out images
and their finding-level F1 next to the model's own answers, per-feature ablation effects, the
dashboards (``features.html``) and a results store of the held-out images' feature activations
(``features.zarr``, group ``sae``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from interp.data.phantom import FINDINGS
from interp.errors import InterpError
from interp.sae.config import SAETrainConfig
from interp.sae.data import StoreActivations, config_split
from interp.sae.groundtruth import best_features, feature_concept_auroc, mask_to_grid, score_features
from interp.sae.metrics import answer_logp, downstream, encode, reconstruction, token_mean
from interp.store import Field, SampleIndex, StoreWriter, dataset_of, open_store

FEATURE_BATCH = 4096
TUNE_IMAGES = 300  # training images the compiled reports' strength cut is chosen on
STRENGTH_CUTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# a feature active on more than this share of the training images stays out of compiled reports: active on most
# images, it cannot speak for a finding only some have (its description comes from its strongest images)
DENSITY_CAPS = (1.0, 0.9, 0.7, 0.5, 0.3)


def load_sae(path: str) -> Any:
    from sae_lens import SAE

    if not (Path(path) / "cfg.json").is_file():
        raise InterpError(f"no SAE at {path} (train one with python -m interp.sae train)")
    return SAE.load_from_disk(path)


def load_centre(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean [n_positions, d], the site positions it belongs to) of a position-centred SAE at ``path``; None if
    the SAE reads its site as it is."""
    from safetensors.numpy import load_file

    from interp.sae.train import CENTRE_FILE

    f = Path(path) / CENTRE_FILE
    if not f.is_file():
        return None
    t = load_file(str(f))
    return t["position_mean"], t["positions"]


def sae_source(cfg: SAETrainConfig, split: str, tokens: str | None = None) -> StoreActivations:
    """The store tokens of ``cfg``'s site in ``split``, centred as the SAE trained at ``cfg.out`` expects."""
    source = config_split(cfg, split, tokens)
    centre = load_centre(str(Path(cfg.out) / "sae"))
    if centre is not None:
        if not np.array_equal(centre[1], source.positions):
            raise InterpError(f"the SAE at {cfg.out} was centred on other token positions than {source.tokens} tokens")
        source.centre = centre[0]
    return source


@torch.no_grad()
def patch_features(sae: Any, source: StoreActivations) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, float32 [rows, positions, d_sae]): the SAE's code of every chosen token, image by image."""
    rows, codes = [], []
    for r, x in source.image_tokens():
        flat = torch.from_numpy(x.reshape(-1, x.shape[-1]))
        f = torch.cat([sae.encode(flat[i:i + FEATURE_BATCH].to(sae.dtype)) for i in range(0, len(flat), FEATURE_BATCH)])
        rows.append(r)
        codes.append(f.float().numpy().reshape(len(r), x.shape[1], -1))
    return np.concatenate(rows), np.concatenate(codes)


def finding_auroc(image_acts: np.ndarray, tree: xr.DataTree, rows: np.ndarray) -> dict[str, tuple[int | None, float]]:
    """Each finding's best feature and its image-level AUROC on ``rows`` (labels from the sample index)."""
    if "labels" not in tree.data_vars:
        raise InterpError("the store has no ground-truth labels (phantom data sets carry them)")
    labels = tree["labels"].sel(label=list(FINDINGS)).values[rows].astype(bool)
    return best_features(feature_concept_auroc(image_acts, dict(zip(FINDINGS, labels.T))))


def split_auroc(sae: Any, source: StoreActivations) -> tuple[int, dict[str, tuple[int | None, float]]]:
    """(images, each finding's best feature and its image-level AUROC) on ``source``'s images."""
    rows, codes = patch_features(sae, source)
    return len(rows), finding_auroc(codes.max(1), open_store(source.url), rows)


def quick_report(sae_path: str, cfg: SAETrainConfig) -> dict:
    """Print and return the held-out reconstruction figures and the findings' best-feature AUROC."""
    sae = load_sae(sae_path)
    test = sae_source(cfg, "test")
    rec = reconstruction(sae, test)
    images, best = split_auroc(sae, test)
    print(f"held out: {images} images, {rec['tokens']} {cfg.tokens} tokens: explained variance "
          f"{rec['explained_variance']:.3f}, L0 {rec['l0']:.1f}, dead {rec['dead_features']} / dense "
          f"{rec['dense_features']} of {rec['d_sae']} features")
    print("best single feature per finding (image-level AUROC, max over patches): "
          + ", ".join(f"{f} {a:.3f} (#{j})" for f, (j, a) in best.items()))
    return {"images": images, "reconstruction": rec,
            "finding_auroc": {f: {"feature": j, "auroc": a} for f, (j, a) in best.items()}}


def init_report(cfg: SAETrainConfig) -> dict[int, dict[str, float]]:
    """Each init's best-feature AUROC per finding on the held-out (reported) images, printed with its worst
    finding; for the record only - the kept SAE was chosen on the validation images."""
    from interp.sae.train import init_configs

    out = {}
    for one in init_configs(cfg):
        _, best = split_auroc(load_sae(str(Path(one.out) / "sae")), sae_source(one, "test"))
        out[one.seed] = {f: a for f, (_, a) in best.items()}
    print("every init on the held-out images (not used to choose): "
          + ", ".join(f"seed {seed} worst {min(a.values()):.3f}" for seed, a in out.items()))
    return out


def _grid_boxes(adapter: Any, site: str, image: np.ndarray, positions: np.ndarray) -> list:
    """Input-image boxes of the site's chosen positions (vision tokens, or the LM's image tokens for the
    projector), from the adapter's own positions for one image."""
    batch = adapter.encode([image], ["x"])
    if site.startswith("vision."):
        boxes = adapter.vision_positions(batch)[0].boxes
    else:
        p = batch.positions[0]
        boxes = [b for k, b in zip(p.kinds, p.boxes) if k == "image"]
    return [boxes[i] for i in positions]


def full_analysis(out: str, top_k: int = 10, n_features: int = 24, downstream_samples: int = 100,
                  lm: str | None = None, device: str = "cpu") -> Iterator[str]:
    """Run everything, write ``analysis.json``, ``features.html`` and ``features.zarr`` into ``out``; yields
    the lines to print."""
    from interp.data.phantom_reports import phantom_reports
    from interp.models import load
    from interp.report.sae import FeatureView, write_feature_dashboards
    from interp.sae.describe import answers_to_text, compile_reports, describe_features, score_reports

    run = Path(out) / "train.json"
    if not run.is_file():
        raise InterpError(f"{run} not found: train an SAE into {out} first (python -m interp.sae train --out {out})")
    cfg = SAETrainConfig(**json.loads(run.read_text())["config"])
    sae = load_sae(str(Path(out) / "sae"))
    tree = open_store(cfg.store)
    meta = tree["acts"].attrs
    adapter = load(meta["model_id"], device=device, kind="lvlm", purpose="the SAE's downstream check")
    if adapter.weight_hash != meta["weight_hash"]:
        raise InterpError(f"{meta['model_id']} now has weights {adapter.weight_hash}, the store was cached from "
                          f"{meta['weight_hash']}")
    data = dataset_of(tree)
    split = {s: sae_source(cfg, s, "patch") for s in ("train", "test")}
    result: dict[str, Any] = {"config": cfg.__dict__}
    result["reconstruction"] = {"patch": reconstruction(sae, split["test"])}
    if (np.asarray(tree["acts"][f"{split['test'].acts.dims[1]}_kind"]) == 1).any() and split["test"].centre is None:
        result["reconstruction"]["cls"] = reconstruction(sae, sae_source(cfg, "test", "cls"))
    yield f"reconstruction (held out): {json.dumps(result['reconstruction'])}"

    items = {it.id: it for it in data.items}
    test_rows, test_codes = patch_features(sae, split["test"])
    test_items = [items[i] for i in tree["sample"].values[test_rows]]
    if downstream_samples:
        result["downstream"] = downstream(adapter, sae, split["test"], test_items[:downstream_samples], data.image,
                                          token_mean(split["train"]))
        d = result["downstream"]
        yield (f"downstream ({len(test_items[:downstream_samples])} held-out questions): accuracy clean "
               f"{d['clean']['accuracy']:.3f}, SAE {d['sae']['accuracy']:.3f}, zero {d['zero']['accuracy']:.3f}, "
               f"mean {d['mean']['accuracy']:.3f}; KL(clean||SAE) {d['sae']['kl']:.4f}; loss recovered "
               f"{d['sae']['loss_recovered_vs_zero']:.3f} (vs zero), {d['sae']['loss_recovered_vs_mean']:.3f} (vs mean)")

    images = [it.image for it in test_items]
    phantoms = [data.phantom(i) for i in images]
    boxes = _grid_boxes(adapter, cfg.site, phantoms[0].image, split["test"].positions)
    grid = {name: np.stack([mask_to_grid(p.finding_masks.get(name, np.zeros_like(p.image, bool)), boxes)
                            for p in phantoms]) for name in FINDINGS}
    concepts = {name: np.stack([mask_to_grid(p.concept_masks[name], boxes) for p in phantoms])
                for name in phantoms[0].concept_masks}
    result["ground_truth"] = score_features(test_codes, grid, concepts)
    for row in result["ground_truth"]:
        if row["kind"] == "finding":
            yield (f"  {row['concept']}: feature #{row['feature']} AUROC {row['auroc']:.3f} (image level, "
                   f"{row['positives']}/{row['n']}), IoU {row['iou'] if row['iou'] is None else round(row['iou'], 3)}")

    train_rows, train_codes = patch_features(sae, split["train"])
    train_images = [items[i].image for i in tree["sample"].values[train_rows]]
    reports = phantom_reports([data.specs[i] for i in train_images], seed=cfg.seed)
    descriptions = describe_features(train_codes.max(1), reports, top_k=top_k, seed=cfg.seed,
                                     method="lm" if lm else "extractive", lm_path=lm, lm_device=device)
    train_acts = train_codes.max(1)
    peak, density = train_acts.max(0), (train_acts > 0).mean(0)
    cut, cap = _report_settings(train_acts[:TUNE_IMAGES], train_images[:TUNE_IMAGES], peak, density, descriptions, data)
    compiled = compile_reports(reporting(test_codes.max(1), peak, density, cut, cap), descriptions)
    result["reports_min_strength"], result["reports_max_density"] = cut, cap
    labels = {f: [int(data.specs[i].has(f)) for i in images] for f in FINDINGS}
    own = _model_answers(adapter, data, images)
    result["reports"] = {"compiled": score_reports(compiled, labels),
                         "model_answers": score_reports([answers_to_text(a) for a in own], labels),
                         "examples": compiled[:5]}
    yield (f"compiled reports ({len(compiled)} held-out images; features at >= {cut:.1f} of their peak and active on "
           f"<= {cap:.0%} of the training images, both chosen on {min(TUNE_IMAGES, len(train_images))} training "
           f"images): micro F1 "
           f"{result['reports']['compiled']['micro']['f1']:.3f}; the model's own answers: micro F1 "
           f"{result['reports']['model_answers']['micro']['f1']:.3f}")

    shown = _shown_features(result["ground_truth"], test_codes, n_features)
    asked = test_items[:downstream_samples or 50]
    clean = answer_logp(adapter, cfg.site, asked, data.image, {"clean": None})["clean"]
    effects = {j: _interventions(adapter, sae, split["test"], asked, data.image, j, float(test_codes[:, :, j].max()), clean)
               for j in shown}
    result["effects"] = {str(j): e for j, e in effects.items()}
    views = []
    for j in shown:
        top = np.argsort(-test_codes[:, :, j].max(1))[:6]
        matched = [r for r in result["ground_truth"] if r["feature"] == j]
        mask_name = matched[0]["concept"] if matched else None
        rows_, cols_ = _grid_shape(split["test"])
        views.append(FeatureView(
            feature=j, images=np.stack([phantoms[t].image for t in top]),
            maps=test_codes[top, :, j].reshape(len(top), rows_, cols_), values=test_codes[:, :, j].ravel(),
            description=descriptions[j].description,
            captions=[f"image {test_items[t].image}: {test_codes[t, :, j].max():.2f}" for t in top],
            masks=None if mask_name is None else ((grid | concepts)[mask_name][top] >= 0.5).reshape(len(top), rows_, cols_),
            matches=matched, effects=effects[j]))
    page = write_feature_dashboards(Path(out) / "features.html", views, title=f"SAE features: {cfg.site}",
                                    meta={"model": meta["model_id"], "store": cfg.store, "site": cfg.site,
                                          "architecture": cfg.architecture, "d_sae": int(sae.cfg.d_sae)})
    store = _write_features(Path(out) / "features.zarr", tree, test_rows, test_codes, cfg, meta)
    (Path(out) / "analysis.json").write_text(json.dumps({**result, "dashboard_features": shown,
                                                         "descriptions": [d.to_dict() for d in descriptions]},
                                                        indent=1, default=_plain))
    yield f"dashboards: {page}\nfeatures:   {store}\nfigures:    {Path(out) / 'analysis.json'}"


def reporting(image_acts: np.ndarray, peak: np.ndarray, density: np.ndarray, cut: float, cap: float) -> np.ndarray:
    """Image-level activations [n, features] that enter a compiled report: at least ``cut`` x the feature's training
    maximum ``peak``, of features active on at most ``cap`` of the training images (``density``); the rest 0."""
    keep = (density <= cap) & (image_acts >= np.where(peak > 0, cut * peak, np.inf))
    return np.where(keep, image_acts, 0.0)


def _report_settings(image_acts: np.ndarray, images: list[int], peak: np.ndarray, density: np.ndarray,
                     descriptions: list, data: Any) -> tuple[float, float]:
    """The relative strength cut and the density cap (:func:`reporting`) with the best micro F1 on training images
    (the held-out ones are scored with them, never tuned on)."""
    from interp.sae.describe import compile_reports, score_reports

    labels = {f: [int(data.specs[i].has(f)) for i in images] for f in FINDINGS}
    f1 = {(cut, cap): score_reports(compile_reports(reporting(image_acts, peak, density, cut, cap), descriptions),
                                    labels)["micro"]["f1"] or 0.0
          for cut in STRENGTH_CUTS for cap in DENSITY_CAPS}
    return max(f1, key=f1.get)


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


def _grid_shape(source: StoreActivations) -> tuple[int, int]:
    rows = source.acts.coords[f"{source.acts.dims[1]}_row"].values[source.positions]
    cols = source.acts.coords[f"{source.acts.dims[1]}_col"].values[source.positions]
    return int(rows.max()) + 1, int(cols.max()) + 1


def _shown_features(rows: list[dict], codes: np.ndarray, n: int) -> list[int]:
    """The best feature of every finding and concept first, then the most often active ones."""
    best = [r["feature"] for r in rows if r["feature"] is not None]
    frequent = np.argsort(-(codes.max(1) > 0).mean(0)).tolist()
    return list(dict.fromkeys(best + frequent))[:n]


@torch.no_grad()
def _model_answers(adapter: Any, data: Any, images: list[int]) -> list[dict[str, bool]]:
    """The model's yes/no answer to "is there a <finding> ?" for every finding of every image."""
    from interp.data.vqa import items_for

    yes = adapter.tokenizer.convert_tokens_to_ids("yes")
    no = adapter.tokenizer.convert_tokens_to_ids("no")
    out = []
    for i in images:
        asked = items_for(i, data.split, data.specs[i], ("presence",), ("direct",))  # one per finding, in order
        batch = adapter.encode([data.image(i)] * len(asked), [it.prompt for it in asked], [it.spans for it in asked])
        logits, _ = adapter.run(batch)
        z = adapter.readout(logits, batch)
        out.append({f: bool(z[k, yes] > z[k, no]) for k, f in enumerate(FINDINGS)})
    return out


@torch.no_grad()
def _interventions(adapter: Any, sae: Any, source: StoreActivations, items: list, image: Any, feature: int,
                   peak: float, clean: torch.Tensor) -> dict:
    """One feature ablated (its decoder direction times its activation removed at every patch) and steered (its
    direction times its peak activation added at every patch): the change in answer accuracy and mean log
    p(answer) on held-out questions, against their ``clean`` log-probabilities."""
    positions = torch.as_tensor(source.positions)
    direction = sae.W_dec[feature].float()
    targets = torch.as_tensor(adapter.tokenizer.convert_tokens_to_ids([it.answer for it in items]))

    def ablate(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        code = encode(sae, x[:, positions], source.centre)[..., feature].float()
        x[:, positions] = x[:, positions] - (code[..., None] * direction).to(x.dtype)
        return x

    def steer(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, positions] = x[:, positions] + (peak * direction).to(x.dtype)
        return x

    rows = torch.arange(len(items))
    out: dict[str, float | int] = {"questions": len(items)}
    edits = {"ablated": ablate, f"steered (+{peak:.2f} x direction)": steer}
    for name, v in answer_logp(adapter, source.site, items, image, edits).items():
        out[f"{name}: accuracy change"] = float((v.argmax(-1) == targets).double().mean()
                                                - (clean.argmax(-1) == targets).double().mean())
        out[f"{name}: log p(answer) change"] = float((v[rows, targets] - clean[rows, targets]).mean())
    return out


def _write_features(path: Path, tree: xr.DataTree, rows: np.ndarray, codes: np.ndarray, cfg: SAETrainConfig,
                    meta: Any) -> str:
    """The held-out images' feature activations (max over patches, and per patch) as a results store."""
    ids = [str(i) for i in tree["sample"].values[rows]]
    index = SampleIndex(ids, {k: [str(v) for v in tree[k].values[rows]] for k in ("prompt", "answer", "finding")
                              if k in tree.coords},
                        [int(i) for i in tree["image"].values[rows]],
                        {str(n): tree["labels"].values[rows, k].tolist() for k, n in enumerate(tree["label"].values)}
                        if "labels" in tree.data_vars else {}, dict(tree.attrs["dataset"]))
    n_pos, d_sae = codes.shape[1:]
    fields = {"image_acts": Field((d_sae,), ("feature",), "float32"),
              "patch_acts": Field((n_pos, d_sae), ("patch", "feature"), "float32")}
    w = StoreWriter(str(path), "sae", samples=index, fields=fields, mode="overwrite", chunk_samples=64,
                    meta={"model_id": meta["model_id"], "weight_hash": meta["weight_hash"], "site": cfg.site,
                          "sae": str(Path(cfg.out) / "sae"), "config": cfg.__dict__})
    for r in w.pending():
        w.write(r.start, {"image_acts": codes[r.start:r.stop].max(1), "patch_acts": codes[r.start:r.stop]})
    w.close()
    return str(path)
