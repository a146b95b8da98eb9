"""Train a sparse autoencoder on vision features streamed from a results store, with sae_lens's trainer.

sae_lens does the SAE (architectures, losses, dead-feature bookkeeping, checkpoints); we give it a
data provider that streams shuffled token batches from the store (``StoreActivations``). Output:
``<out>/sae`` in SAELens's format (``sae_lens.SAE.load_from_disk`` opens it; the cfg's metadata names
the site and store; with ``centre=position`` the per-position mean to subtract from its inputs and add to its
outputs beside it, ``position_mean.safetensors``), ``<out>/train.json`` with the config and the figures logged
along the way. With several ``inits`` each trains into ``<out>/inits/<seed>`` and the best on the validation
images is copied to ``<out>/sae``. A run checkpoints every ``checkpoint_every`` tokens
(``checkpoints/<n tokens>``) and a rerun resumes from the last.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError
from interp.sae.config import SAETrainConfig
from interp.sae.data import config_split, position_mean

CENTRE_FILE = "position_mean.safetensors"  # beside the SAE: the per-position mean its inputs had subtracted

def sae_config(cfg: SAETrainConfig, d_in: int) -> Any:
    """The sae_lens training config of ``cfg.architecture``."""
    import sae_lens

    shared = {"d_in": d_in, "d_sae": cfg.expansion * d_in, "device": cfg.device}
    if cfg.architecture == "standard":
        return sae_lens.StandardTrainingSAEConfig(**shared, l1_coefficient=cfg.l1_coefficient)
    if cfg.architecture == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(**shared, l0_coefficient=cfg.l0_coefficient)
    if cfg.architecture == "matryoshka":  # nested dictionaries: early features stay general (less splitting)
        widths = sorted({*(w for w in cfg.nested_widths() if w < shared["d_sae"]), shared["d_sae"]})
        return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(**shared, k=cfg.k, matryoshka_widths=widths)
    kind = sae_lens.TopKTrainingSAEConfig if cfg.architecture == "topk" else sae_lens.BatchTopKTrainingSAEConfig
    return kind(**shared, k=cfg.k)


def _last_checkpoint(out: Path) -> Path | None:
    done = sorted((p for p in (out / "checkpoints").glob("*") if (p / "cfg.json").is_file()),
                  key=lambda p: int(p.name) if p.name.isdigit() else -1)
    return done[-1] if done else None


def _identity(cfg: SAETrainConfig) -> dict:
    """What makes two runs the same: the settings, the store and the weights of the model it was cached from."""
    from interp.store import open_store

    meta = open_store(cfg.store)["acts"].attrs
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "device"},
            "model_id": meta.get("model_id"), "weight_hash": meta.get("weight_hash")}


def _resumable(cfg: SAETrainConfig, out: Path) -> Path | None:
    """The last checkpoint under ``out`` if it comes from this run - same settings, same store, same model
    weights (``checkpoints/run.json``) -; InterpError for another run's; records this run's identity."""
    identity = _identity(cfg)
    marker = out / "checkpoints" / "run.json"
    ckpt = _last_checkpoint(out)
    if ckpt is not None and (not marker.is_file() or json.loads(marker.read_text()) != identity):
        raise InterpError(f"{out / 'checkpoints'} holds checkpoints of another run (other settings, store or model "
                          "weights): remove that folder or train into another --out")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=1))
    return ckpt


def train_sae(cfg: SAETrainConfig) -> Path:
    """Train (or resume) ``cfg.inits`` SAEs from seeds ``seed``, ``seed + 1``, ... into ``<out>/inits/<seed>``,
    keep the one that scores best on the validation images (:func:`validation_score`) as ``<out>/sae``;
    ``<out>/train.json`` records every init's score. One init trains straight into ``<out>``."""
    cfg.validate()
    out = Path(cfg.out)
    if cfg.inits == 1:
        return _train_one(cfg, out)
    runs = []
    for one in init_configs(cfg):
        path = _train_one(one, Path(one.out))
        runs.append({"seed": one.seed, **validation_score(str(path), one)})
    best = max(runs, key=lambda r: r["score"])
    final = out / "sae"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / "inits" / str(best["seed"]) / "sae", final)
    chosen = json.loads((out / "inits" / str(best["seed"]) / "train.json").read_text())
    (out / "train.json").write_text(json.dumps({**chosen, "config": asdict(cfg), "chosen_seed": best["seed"],
                                                "inits": runs}, indent=1))
    scores = ", ".join(f"seed {r['seed']} {r['score']:.3f}" for r in runs)
    print(f"kept the SAE of seed {best['seed']} ({best['criterion']} on {best['images']} validation images: {scores})")
    return final


def init_configs(cfg: SAETrainConfig) -> list[SAETrainConfig]:
    """The single-init runs of ``cfg``: seeds ``seed``, ``seed + 1``, ..., each into ``<out>/inits/<seed>``."""
    return [replace(cfg, seed=s, inits=1, out=str(Path(cfg.out) / "inits" / str(s)))
            for s in range(cfg.seed, cfg.seed + cfg.inits)]


def validation_score(path: str, cfg: SAETrainConfig) -> dict:
    """How good the SAE at ``path`` is on ``cfg``'s validation images: the worst finding's best-feature AUROC where
    the store has phantom labels, else the explained variance."""
    from interp.sae.analysis import load_sae, sae_source, split_auroc
    from interp.sae.metrics import reconstruction
    from interp.store import open_store

    sae, val = load_sae(path), sae_source(cfg, "val")
    if "labels" in open_store(cfg.store).data_vars:
        images, best = split_auroc(sae, val)
        return {"criterion": "worst finding AUROC", "score": min(a for _, a in best.values()), "images": images,
                "finding_auroc": {f: a for f, (_, a) in best.items()}}
    return {"criterion": "explained variance", "score": reconstruction(sae, val)["explained_variance"],
            "images": len(val.samples)}


def _train_one(cfg: SAETrainConfig, out: Path) -> Path:
    """Train (or resume, or find finished) one SAE into ``out``; returns ``<out>/sae``."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    log = out / "train.json"
    if (out / "sae" / "cfg.json").is_file() and log.is_file() and json.loads(log.read_text()).get("identity") == _identity(cfg):
        return out / "sae"  # finished before (an interrupted multi-init run resumes here)
    source = config_split(cfg, "train")
    if cfg.centre == "position":
        source.centre = position_mean(source)
    sae_cfg = sae_config(cfg, source.d_in)
    sae_cfg.metadata.hook_name = cfg.site
    sae_cfg.metadata.dataset_path = cfg.store
    ckpt = _resumable(cfg, out)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's generator
        torch.manual_seed(cfg.seed)
        sae = TrainingSAE.from_dict(sae_cfg.to_dict()) if ckpt is None else TrainingSAE.load_from_disk(str(ckpt))
    n_steps = cfg.training_tokens // cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr, device=cfg.device, logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=max(0, cfg.training_tokens // cfg.checkpoint_every - 1) if cfg.checkpoint_every else 0,
        checkpoint_path=str(out / "checkpoints"),
        dead_feature_window=max(1, min(1000, n_steps // 4)), feature_sampling_window=max(1, min(2000, n_steps // 4)))

    def provider():  # runs from the first batch fit() asks for, after a resumed state is loaded
        yield from source.batches(cfg.batch_size, buffer_chunks=cfg.buffer_chunks,
                                  start=trainer.n_training_samples // cfg.batch_size, order_seed=cfg.seed)

    trainer = SAETrainer(trainer_cfg, sae, provider())
    if ckpt is not None:  # resume: the optimizer, the step count, the dead-feature statistics
        trainer.load_trainer_state(ckpt)
    wall, cpu = time.perf_counter(), time.process_time()
    trained = trainer.fit()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    final = out / "sae"
    if final.exists():
        shutil.rmtree(final)
    trained.save_inference_model(str(final))  # the inference architecture (batchtopk saves as jumprelu)
    if source.centre is not None:
        from safetensors.torch import save_file

        save_file({"position_mean": torch.from_numpy(source.centre), "positions": torch.from_numpy(source.positions)},
                  str(final / CENTRE_FILE))
    (out / "train.json").write_text(json.dumps({"config": asdict(cfg), "identity": _identity(cfg), "d_in": source.d_in,
                                                "train_images": len(source.samples), "train_tokens_per_epoch":
                                                source.n_tokens, "steps": trainer.n_training_steps,
                                                "resumed_from": str(ckpt) if ckpt else None,
                                                "fit_seconds": {"wall": round(wall, 1), "cpu": round(cpu, 1)}}, indent=1))
    return final
