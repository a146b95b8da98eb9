"""How good an SAE is on held-out images: reconstruction, sparsity, and what splicing it in does to answers.

``reconstruction`` streams the held-out tokens once: explained variance (1 - SSE / SST, SST about the
held-out mean), mean L0 per token, dead features (never active on the held-out tokens) and dense
features (active on more than ``DENSE`` of them). ``downstream`` runs the model on the held-out
samples' own prompts through the adapter with the site replaced by the SAE's reconstruction (of the tokens
less the source's per-position centre, which is added back), by zeros and by the training mean (on the same
token positions): answer accuracy, KL(clean || edited) of the
answer distribution, and the fraction of the answer loss recovered, (CE_zero - CE_sae) / (CE_zero - CE_clean).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from interp.errors import InterpError
from interp.sae.data import StoreActivations

DENSE = 0.1  # a feature active on more than this share of tokens is dense


@torch.no_grad()
def reconstruction(sae: Any, source: StoreActivations, batch_size: int = 4096) -> dict[str, float]:
    """Explained variance, L0, dead and dense features over every token of ``source`` (one pass)."""
    n, sse, total, sq, l0 = 0, 0.0, None, None, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for x in source.batches(batch_size, shuffle=False, epochs=1):
        x = x.to(torch.float64)
        f = sae.encode(x.to(sae.dtype))
        sse += float(((sae.decode(f).to(torch.float64) - x) ** 2).sum())
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x ** 2).sum(0) if sq is None else sq + (x ** 2).sum(0)
        active = (f > 0).to(torch.float64)
        l0 += float(active.sum())
        fired += active.sum(0)
        n += len(x)
    if not n:
        raise InterpError(f"no {source.tokens} tokens of {source.site} in the {source.split} split")
    sst = float((sq - total ** 2 / n).sum())
    freq = fired / n
    return {"tokens": n, "explained_variance": 1 - sse / sst, "l0": l0 / n, "mse": sse / n / sae.cfg.d_in,
            "dead_features": int((freq == 0).sum()), "dense_features": int((freq > DENSE).sum()),
            "d_sae": int(sae.cfg.d_sae)}


def token_mean(source: StoreActivations, batch_size: int = 4096) -> torch.Tensor:
    """[d] mean of ``source``'s tokens as the site holds them (the mean-ablation value; a centred source's
    per-position mean added back, exact where no sample lacks a position)."""
    total, n = None, 0
    for x in source.batches(batch_size, shuffle=False, epochs=1):
        total = x.to(torch.float64).sum(0) if total is None else total + x.to(torch.float64).sum(0)
        n += len(x)
    mean = total / n + (0 if source.centre is None else torch.from_numpy(source.centre).to(torch.float64).mean(0))
    return mean.to(torch.float32)


def encode(sae: Any, x: torch.Tensor, centre: np.ndarray | None) -> torch.Tensor:
    """The SAE's code of a site's tokens ``x`` [..., positions, d], less the per-position ``centre`` it was
    trained with (None: as they are)."""
    return sae.encode((x if centre is None else x - torch.from_numpy(centre).to(x.dtype)).to(sae.dtype))


def reconstruct(sae: Any, x: torch.Tensor, centre: np.ndarray | None) -> torch.Tensor:
    """The SAE's reconstruction of a site's tokens ``x`` [..., positions, d] (``centre`` added back)."""
    out = sae.decode(encode(sae, x, centre))
    return out if centre is None else out + torch.from_numpy(centre).to(out.dtype)


@torch.no_grad()
def answer_logp(adapter: Any, site: str, items: list, images: Callable[[int], np.ndarray],
                edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor] | None],
                batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per named edit of ``site`` (None: the clean run), [questions, vocab] log-probabilities at the answer;
    each batch is encoded once for all edits."""
    logp: dict[str, list[torch.Tensor]] = {k: [] for k in edits}
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        batch = adapter.encode([images(it.image) for it in chunk], [it.prompt for it in chunk],
                               [it.spans for it in chunk])
        for name, edit in edits.items():
            out, _ = adapter.run(batch, edit={site: edit} if edit else None)
            logp[name].append(torch.log_softmax(adapter.readout(out, batch).double(), -1))
    return {k: torch.cat(v) for k, v in logp.items()}


@torch.no_grad()
def downstream(adapter: Any, sae: Any, source: StoreActivations, items: list, images: Callable[[int], np.ndarray],
               mean: torch.Tensor, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Per variant (clean, sae, zero, mean): answer accuracy, CE of the item's answer token, KL(clean || variant)
    at the answer position; plus ``loss_recovered`` for the SAE against zero- and mean-ablation.

    ``items`` are the held-out samples' VQA items (their ``answer`` tokens are the targets); ``images(i)``
    loads image ``i`` of their data set."""
    positions = torch.as_tensor(source.positions)
    targets = torch.as_tensor(adapter.tokenizer.convert_tokens_to_ids([it.answer for it in items]))

    def replace(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, positions] = fn(x[:, positions]).to(x.dtype)
            return x
        return edit

    variants = {"sae": replace(lambda x: reconstruct(sae, x, source.centre)),
                "zero": replace(torch.zeros_like), "mean": replace(lambda x: mean.to(x.dtype).expand_as(x))}
    lp = answer_logp(adapter, source.site, items, images, {"clean": None, **variants}, batch_size)
    rows = torch.arange(len(items))
    result = {}
    for name, v in lp.items():
        result[name] = {"accuracy": float((v.argmax(-1) == targets).double().mean()),
                        "ce": float(-v[rows, targets].mean()),
                        "kl": float((lp["clean"].exp() * (lp["clean"] - v)).sum(-1).mean())}
    ce = {k: r["ce"] for k, r in result.items()}
    for base in ("zero", "mean"):
        gap = ce[base] - ce["clean"]
        result["sae"][f"loss_recovered_vs_{base}"] = (ce[base] - ce["sae"]) / gap if gap > 0 else float("nan")
    result["n_samples"] = {"samples": len(items)}
    return result
