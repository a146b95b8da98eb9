"""The adapter contract: one site grammar over real HF module trees, executed through nnsight.

An adapter maps site names (``interp.sites``) onto hook points of one architecture family,
turns images + prompts into a :class:`Batch` (every processor output the model takes, plus
typed :class:`Positions`), and runs the model with reads, edits and gradient reads at any
sites in one nnsight trace, returning a :class:`Cache` that knows its positions.
Families live in their own modules (``interp.models.llava``, ``.qwen2_5_vl``, ...) and are
found by ``interp.models.registry`` from the HF config's ``model_type``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from nnsight import NNsight

from interp import sites as S
from interp.errors import InterpError

Edit = Callable[[torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor], torch.Tensor]  # adapter.readout rows -> [rows]
Box = tuple[float, float, float, float]  # (y0, x0, y1, x1) in the input image's pixels, end-exclusive
Sites = str | Iterable[str]  # a name, a glob, a comma-separated list, or any iterable of those


@dataclass(frozen=True)
class Hook:
    """Where a site lives: a module's input or output, optionally one element of a tuple output."""

    module: str
    io: str = "output"
    index: int | None = None


@dataclass
class Positions:
    """Typed positions of one sample's sequence (LM tokens, or a vision tower's tokens).

    ``kinds``: ``special`` | ``image`` | ``text`` | ``query`` (learned queries, no place in the
    image) | ``pad``. Image tokens carry their cell (``rows``/``cols``) on the family's grid
    and ``boxes``: the region of the *input image* they cover, mapped back through the
    processor's resize/crop/tiling, so maps, boxes and masks share one pixel frame. ``groups``
    say which view a token belongs to (``base``, ``tile r,c``, ``pooled``, ``merged 2x2``, ``cls``).
    """

    kinds: list[str]
    rows: list[int]
    cols: list[int]
    tokens: list[str]
    spans: dict[str, list[int]] = field(default_factory=dict)
    boxes: list[Box | None] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.kinds)
        self.boxes = list(self.boxes) or [None] * n
        self.groups = list(self.groups) or [""] * n

    def __len__(self) -> int:
        return len(self.kinds)

    def span(self, name: str) -> list[int]:
        if name not in self.spans:
            raise InterpError(f"span {name!r} not in this prompt; spans: {', '.join(sorted(self.spans))}")
        return self.spans[name]

    def pad_to(self, width: int, token: str = "<pad>") -> None:
        """Append pad positions up to ``width``."""
        k = width - len(self.kinds)
        self.kinds += ["pad"] * k
        self.rows += [-1] * k
        self.cols += [-1] * k
        self.tokens += [token] * k
        self.boxes += [None] * k
        self.groups += [""] * k


@dataclass
class Batch:
    """Model inputs plus typed positions, one sample per row.

    ``inputs`` holds every tensor the model's forward takes, exactly as the family's processor
    made it (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``,
    ``pixel_attention_mask``, ``token_type_ids``, ``position_ids``, ...). Tensors are batch-first,
    except those named in ``ragged``, whose first dimension concatenates the rows' parts of the
    given lengths (Qwen2.5-VL's flattened patches), and those in ``batch_dims``, whose rows lie along
    another dimension (M-RoPE position ids [3, rows, seq]). ``image_inputs`` are dropped when
    ``inputs_embeds`` (the merged LM input) is set: then the LM runs alone.
    """

    inputs: dict[str, torch.Tensor]
    positions: list[Positions]
    inputs_embeds: torch.Tensor | None = None
    ragged: dict[str, list[int]] = field(default_factory=dict)
    batch_dims: dict[str, int] = field(default_factory=dict)  # inputs whose rows are not dim 0 (M-RoPE ids: 1)
    image_inputs: tuple[str, ...] = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
    frames: list[Any] = field(default_factory=list)  # per row: the processor's image transform (family-defined)

    def __len__(self) -> int:
        return len(self.positions) if self.positions else self.inputs["input_ids"].shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.inputs["pixel_values"]

    @property
    def answer_index(self) -> torch.Tensor:
        """Position whose logits predict the answer: the ``answer`` span's last position, else the last real token."""
        return torch.tensor([
            p.spans["answer"][-1] if "answer" in p.spans else len(p.kinds) - 1 - [k != "pad" for k in p.kinds][::-1].index(True)
            for p in self.positions
        ])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        if self.inputs_embeds is None:
            return dict(self.inputs)
        kept = {k: v for k, v in self.inputs.items() if k not in self.image_inputs and k != "input_ids"}
        return {**kept, "inputs_embeds": self.inputs_embeds}

    def take(self, index: Sequence[int] | torch.Tensor) -> Batch:
        """Rows ``index`` (repeats allowed): how patched runs are batched."""
        idx = torch.as_tensor(index, dtype=torch.long)
        inputs = {}
        for k, v in self.inputs.items():
            if k in self.ragged:
                parts = v.split(self.ragged[k])
                inputs[k] = torch.cat([parts[int(i)] for i in idx])
            else:
                inputs[k] = v.index_select(self.batch_dims.get(k, 0), idx.to(v.device))
        return replace(
            self, inputs=inputs, positions=[self.positions[int(i)] for i in idx],
            inputs_embeds=None if self.inputs_embeds is None else self.inputs_embeds[idx],
            ragged={k: [n[int(i)] for i in idx] for k, n in self.ragged.items()},
            frames=[self.frames[int(i)] for i in idx] if self.frames else [],
        )

    def to(self, device: str | torch.device) -> Batch:
        return replace(self, inputs={k: v.to(device) for k, v in self.inputs.items()},
                       inputs_embeds=None if self.inputs_embeds is None else self.inputs_embeds.to(device))


class Cache(dict):
    """Site values of one run (``{site: tensor}``), TransformerLens-style.

    Index by site name, or by ``(point, layer)`` / ``(point, layer, tower)`` (the tower may be
    left out when only one tower has that point); ``stack(glob)`` stacks layers;
    ``select(site, span)`` takes a named span's positions. ``positions`` are the batch's LM (or
    text) positions; ``grads`` holds gradient reads when the run asked for them.
    """

    def __init__(self, values: Mapping[str, torch.Tensor] = (), positions: list[Positions] | None = None,
                 vision_positions: list[Positions] | None = None) -> None:
        super().__init__(values)
        self.positions = positions or []
        self.vision_positions = vision_positions or []
        self.grads: Cache | None = None

    def _name(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        point, layer, *tower = key
        names = [n for n in self if fnmatch.fnmatch(n, f"{tower[0] if tower else '*'}.blocks.{layer}.{point}")]
        if len(names) != 1:
            raise KeyError(f"{key!r} matches {names or 'no cached site'}: name the tower, e.g. {(point, layer, 'lm')!r}")
        return names[0]

    def __getitem__(self, key: Any) -> torch.Tensor:
        name = self._name(key)
        if not dict.__contains__(self, name):
            raise KeyError(f"site {name!r} not in this cache; cached: {', '.join(self) or 'none'}")
        return dict.__getitem__(self, name)

    def stack(self, pattern: str) -> torch.Tensor:
        """Values of every cached site matching ``pattern`` (e.g. ``lm.blocks.*.resid_post``), stacked
        in execution order along a new first dimension [sites, ...]."""
        names = [n for n in self if fnmatch.fnmatch(n, pattern)]
        if not names:
            raise KeyError(f"no cached site matches {pattern!r}; cached: {', '.join(self) or 'none'}")
        return torch.stack([dict.__getitem__(self, n) for n in names])

    def select(self, site: str, span: str) -> list[torch.Tensor]:
        """Per row, the values of ``site`` at the positions of span ``span`` [len(span), ...]."""
        value = self[site]
        vision = S.parse(self._name(site)).tower == "vision" and self.vision_positions
        positions = self.vision_positions if vision else self.positions
        return [value[i, p.span(span)] for i, p in enumerate(positions)]


@runtime_checkable
class Adapter(Protocol):
    """What every family offers; analyses are written against this only.

    ``run`` returns (outputs, :class:`Cache`); ``readout(outputs, batch)`` turns the outputs into the
    [rows, k] values metrics read (LVLM: next-token logits at the answer position; dual encoder: the
    row's image-text logit, k = 1). Block sites of tower t are ``t.blocks.{0..n_layers(t)-1}.<point>``.
    ``towers`` lists the towers with blocks (``vision``, ``lm`` or ``text``, ``qformer``).
    ``vision_positions(batch)`` types the vision tower's sequence per row; ``embed_site(tower)`` is
    the site where that tower's input embeddings live (where tracing noise goes).
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    model_id: str
    sites: list[str]
    hooks: dict[str, Hook]
    weight_hash: str
    towers: tuple[str, ...]
    vision_batched: bool

    def validate(self) -> None: ...

    def n_layers(self, tower: str) -> int: ...

    def expand_sites(self, patterns: Sites) -> list[str]: ...

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]: ...

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]: ...

    def embed_site(self, tower: str) -> str: ...

    def encode(
        self, images: Sequence[np.ndarray], texts: Sequence[str], spans: Sequence[Mapping[str, tuple[int, int]]] | None = None,
        responses: Sequence[str] | None = None,
    ) -> Batch: ...

    def run(
        self, batch: Batch, read: Sites = (), edit: Mapping[str, Edit] | None = None, *,
        skip: Mapping[str, torch.Tensor] | None = None, grad: bool = False, backward: Metric | None = None,
    ) -> tuple[torch.Tensor, Cache]: ...

    def readout(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class HookedAdapter:
    """Shared machinery: a site map (site -> ``Hook``) executed through nnsight in execution order.

    Subclasses set ``model``, ``model_id``, ``towers``, call ``_attach(site_map)``, and define
    ``_trace_output`` (what ``run`` returns), ``readout``, ``site_shape``, ``vision_positions``
    and, if some sites cannot run for some batches, ``_check_run``.
    """

    name = "hooked"
    model: torch.nn.Module
    model_id: str
    towers: tuple[str, ...] = ()
    vision_batched = True  # vision sites are [rows, positions, d] (False: packed or tiled views)

    def _attach(self, hooks: dict[str, Hook]) -> None:
        """Install the site map (its order is the execution order) and wrap the model in nnsight."""
        self.hooks = hooks
        self.sites = list(hooks)
        self._hook_order = {h: i for i, h in enumerate(dict.fromkeys(hooks.values()))}
        self.nn = NNsight(self.model)
        self.weight_hash = weight_hash(self.model)

    def n_layers(self, tower: str) -> int:
        """Number of blocks of ``tower``."""
        if tower not in self.towers:
            raise InterpError(f"unknown tower {tower!r} for {self.name}: choose {', '.join(self.towers)}")
        return 1 + max(S.parse(s).layer for s in self.sites if s.startswith(f"{tower}.blocks."))

    def embed_site(self, tower: str) -> str:
        """The site holding ``tower``'s input embeddings (where tracing noise is added)."""
        site = f"{tower}.embed"
        if site not in self.hooks:
            raise InterpError(f"{self.name} has no {site} site to corrupt")
        return site

    def _check_sites(self, batch: Batch) -> None:
        """Run ``batch`` reading every site: each has the shape ``site_shape`` gives (leading dims as the
        batch's rows) and each block's resid_pre is the previous block's resid_post; InterpError names
        the first broken site."""
        try:
            _, cache = self.run(batch, read=self.sites)
        except InterpError:
            raise
        except Exception as e:  # nnsight errors (e.g. out-of-order hooks) from a wrong site map
            raise InterpError(f"site map of {self.model_id} does not run: {(str(e) or type(e).__name__).splitlines()[0]}") from e
        seq_len = batch.input_ids.shape[1]
        for site in self.sites:
            if not isinstance(cache[site], torch.Tensor):
                hint = " (attention weights need attn_implementation='eager')" if site.endswith("attn.pattern") else ""
                raise InterpError(f"site {site!r} of {self.model_id} gives {type(cache[site]).__name__}, not a tensor{hint}")
            want = self.site_shape(site, seq_len)
            got = tuple(cache[site].shape)[-len(want):]
            per_row = S.parse(site).tower in ("lm", "text", "qformer") or self.vision_batched
            if got != want or per_row and cache[site].shape[0] != len(batch):  # e.g. a flattened [rows * seq, d] output
                raise InterpError(f"site {site!r} of {self.model_id} has shape {tuple(cache[site].shape)}, expected "
                                  f"[..., {', '.join(map(str, want))}]: wrong hook module?")
            s = S.parse(site)
            if s.point == "resid_pre" and s.layer and not torch.equal(cache[site], cache[f"{s.tower}.blocks.{s.layer - 1}.resid_post"]):
                raise InterpError(f"site {site!r} of {self.model_id} is not block {s.layer - 1}'s resid_post: wrong hook module?")

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:  # pragma: no cover - per family
        raise NotImplementedError

    def expand_sites(self, patterns: Sites) -> list[str]:
        """Names and globs -> valid sites in execution order (InterpError on unknown ones)."""
        return S.expand(patterns, self.sites)

    # --- execution ---------------------------------------------------------------------
    def _check_run(self, batch: Batch, names: list[str]) -> None:
        """Refuse sites that do not run for this batch (per family)."""
        if batch.inputs_embeds is not None:
            late = [n for n in names if S.parse(n).tower not in ("lm",)]
            if late:
                raise InterpError(f"site {late[0]!r} does not run when the batch carries inputs_embeds (the LM runs alone)")

    def _trace_output(self):
        """Inside the trace: the saved model output ``run`` returns (per family)."""
        raise NotImplementedError

    def readout(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:  # pragma: no cover - per family
        raise NotImplementedError

    def vision_positions(self, batch: Batch | None = None) -> list[Positions]:  # pragma: no cover - per family
        raise NotImplementedError

    def run(
        self,
        batch: Batch,
        read: Sites = (),
        edit: Mapping[str, Edit] | None = None,
        *,
        skip: Mapping[str, torch.Tensor] | None = None,
        grad: bool = False,
        backward: Metric | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """One forward pass; returns (outputs, :class:`Cache`); outputs per family (LVLMs: logits
        [b, s, vocab]; dual encoders: logits_per_image [b, b]).

        ``read``: a site, a glob, a comma-separated string or a list of those. ``edit[site]`` maps the
        site's value to its replacement (in place or new); reads see the edited value.
        ``skip[<tower>.blocks.<l>.resid_post] = value`` does not run that block and uses ``value`` as
        its output (how sweeps avoid recomputing layers before a patch). ``backward``: a metric of
        ``readout`` rows; the cache's ``grads`` then hold d sum(metric) / d value for every read site
        (gradient-based attribution, attribution patching). Hook points are visited in execution
        order, as nnsight requires.
        """
        read = self.expand_sites(read) if (read if isinstance(read, str) else list(read)) else []
        edit, skip = dict(edit or {}), dict(skip or {})
        for name in [*edit, *skip]:
            if name not in self.hooks:
                self.expand_sites([name])  # raises the one-line error naming the site
        for name in skip:
            if S.parse(name).point != "resid_post":
                raise InterpError(f"only block outputs (resid_post) can be skipped, not {name!r}")
        for name in edit:  # the weights are returned after attention used them: an edit would be a silent no-op
            if S.parse(name).point == "attn.pattern":
                raise InterpError(f"cannot edit {name!r}: attention weights are read-only (edit attn.out or resid sites)")
        self._check_run(batch, [*read, *edit, *skip])
        by_hook: dict[Hook, list[str]] = {}
        for name in dict.fromkeys([*edit, *read]):
            by_hook.setdefault(self.hooks[name], []).append(name)
        for name in skip:
            by_hook.setdefault(self.hooks[name], [])
        plan = sorted(by_hook.items(), key=lambda kv: self._hook_order[kv[0]])
        skipped = {self.hooks[n]: v for n, v in skip.items()}
        values: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(grad or backward is not None), self.nn.trace(**batch.model_inputs()):
            for hook, names in plan:
                envoy = self.nn.get(hook.module)
                if hook in skipped:
                    envoy.skip(skipped[hook])
                value = envoy.output if hook.io == "output" else envoy.input
                for name in names:
                    part = value if hook.index is None else value[hook.index]
                    if name in edit:
                        new = edit[name](part)
                        if new is not part:
                            value = new if hook.index is None else (*value[: hook.index], new, *value[hook.index + 1 :])
                            if hook.io == "output":
                                envoy.output = value
                            else:
                                envoy.input = value
                            part = new
                    if name in read:
                        values[name] = part
            outputs = self._trace_output()
        vision = [self.vision_positions(batch)] if self.vision_batched and any(n.startswith("vision.") for n in read) else []
        cache = Cache({n: values[n] for n in read}, batch.positions, *vision)
        if backward is not None:
            total = backward(self.readout(outputs, batch)).sum()
            grads = torch.autograd.grad(total, [cache[n] for n in read], allow_unused=True)
            cache.grads = Cache({n: torch.zeros_like(cache[n]) if g is None else g for n, g in zip(read, grads)},
                                batch.positions)
            outputs = outputs.detach()
            for n in read:
                dict.__setitem__(cache, n, cache[n].detach())
        return outputs, cache


def block_hooks(tower: str, root: str, n_layers: int, attn: str = "self_attn", mlp: str = "mlp") -> dict[str, Hook]:
    """Sites of HF transformer blocks ``<root>.<l>`` with attention and MLP children, in execution order."""
    hooks: dict[str, Hook] = {}
    for l in range(n_layers):
        layer = f"{root}.{l}"
        hooks[f"{tower}.blocks.{l}.resid_pre"] = Hook(layer, "input")
        hooks[f"{tower}.blocks.{l}.attn.pattern"] = Hook(f"{layer}.{attn}", "output", 1)
        hooks[f"{tower}.blocks.{l}.attn.out"] = Hook(f"{layer}.{attn}", "output", 0)
        hooks[f"{tower}.blocks.{l}.mlp.out"] = Hook(f"{layer}.{mlp}")
        hooks[f"{tower}.blocks.{l}.resid_post"] = Hook(layer)
    return hooks


def grid_positions(rows: int, cols: int, box: Callable[[int, int], Box], *, cls: bool, group: str = "") -> Positions:
    """A vision tower's sequence: an optional CLS token (covering the whole image), then a
    ``rows`` x ``cols`` patch grid in row-major order; ``box(r, c)`` maps a cell to input pixels."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    n0 = int(cls)
    whole = (box(0, 0)[0], box(0, 0)[1], box(rows - 1, cols - 1)[2], box(rows - 1, cols - 1)[3])
    return Positions(
        ["special"] * n0 + ["image"] * (rows * cols), [-1] * n0 + r.tolist(), [-1] * n0 + c.tolist(),
        ["<cls>"] * n0 + ["<patch>"] * (rows * cols), {"image": list(range(n0, n0 + rows * cols))},
        boxes=[whole] * n0 + [box(int(i), int(j)) for i, j in zip(r, c)], groups=["cls"] * n0 + [group] * (rows * cols),
    )


def right_pad(seqs: list[list[int]], positions: list[Positions], width: int, pad_id: int,
              pad_token: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``width`` (marking pads in ``positions``); (input_ids, attention_mask)."""
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        positions[i].pad_to(width, pad_token)
    return input_ids, mask


def weight_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names and bytes: identifies weights independent of file layout."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d scalars too
    return h.hexdigest()[:16]
