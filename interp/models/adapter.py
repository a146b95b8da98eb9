"""Adapters: one site grammar over real HF module trees, executed through nnsight.

An adapter maps site names (``interp.sites``) onto hook points of one architecture family,
turns images + prompts into a :class:`Batch` with typed positions, and runs the model with
reads and edits at any sites in one nnsight trace.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from nnsight import NNsight

from interp import sites as S
from interp.errors import InterpError

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Hook:
    """Where a site lives: a module's input or output, optionally one element of a tuple output."""

    module: str
    io: str = "output"
    index: int | None = None


@dataclass
class Positions:
    """Typed positions of one sample's LM sequence (image patches carry their grid row/col)."""

    kinds: list[str]  # "special" | "image" | "text" | "pad"
    rows: list[int]
    cols: list[int]
    tokens: list[str]
    spans: dict[str, list[int]] = field(default_factory=dict)

    def span(self, name: str) -> list[int]:
        if name not in self.spans:
            raise InterpError(f"span {name!r} not in this prompt; spans: {', '.join(sorted(self.spans))}")
        return self.spans[name]


@dataclass
class Batch:
    """Model inputs plus typed positions; rows are right-padded to one length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    positions: list[Positions]
    inputs_embeds: torch.Tensor | None = None  # merged LM input embeddings: run the LM alone

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def answer_index(self) -> torch.Tensor:
        """Position whose logits predict the answer: the ``answer`` span's last position, else the last token."""
        return torch.tensor(
            [p.spans["answer"][-1] if "answer" in p.spans else len(p.kinds) - 1 - p.kinds[::-1].index("text") for p in self.positions]
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        if self.inputs_embeds is not None:
            return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}

    def take(self, index: Sequence[int] | torch.Tensor) -> "Batch":
        """Rows ``index`` (repeats allowed): how patched runs are batched."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.pixel_values[idx],
            [self.positions[int(i)] for i in idx],
            None if self.inputs_embeds is None else self.inputs_embeds[idx],
        )

    def to(self, device: str | torch.device) -> "Batch":
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=self.pixel_values.to(device),
            inputs_embeds=None if self.inputs_embeds is None else self.inputs_embeds.to(device),
        )


@runtime_checkable
class Adapter(Protocol):
    """What every adapter offers (``LlavaAdapter``, ``ClipAdapter``): analyses are written against this.

    ``run`` returns (outputs, {site: value}); ``readout(outputs, batch)`` turns the outputs into the
    [rows, k] values metrics read (LVLM: next-token logits at the answer position; dual encoder: the
    row's image-text logit, k = 1). Block sites of tower t are ``t.blocks.{0..n_layers(t)-1}.<point>``.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    model_id: str
    sites: list[str]
    hooks: dict[str, Hook]
    weight_hash: str

    def validate(self) -> None: ...

    def n_layers(self, tower: str) -> int: ...

    def expand_sites(self, patterns: str | Iterable[str]) -> list[str]: ...

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]: ...

    def vision_positions(self) -> Positions: ...

    def encode(
        self, images: Sequence[np.ndarray], texts: Sequence[str], spans: Sequence[Mapping[str, tuple[int, int]]] | None = None
    ) -> Batch: ...

    def run(
        self,
        batch: Batch,
        read: Iterable[str] = (),
        edit: Mapping[str, Edit] | None = None,
        *,
        skip: Mapping[str, torch.Tensor] | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def readout(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class HookedAdapter:
    """Shared machinery: a site map (site -> ``Hook``) executed through nnsight in execution order.

    Subclasses set ``model``, ``model_id``, ``vision_config`` and ``preprocess``, call
    ``_attach(site_map)``, and define ``_trace_output`` (what ``run`` returns) and, if some
    sites cannot run for some batches, ``_check_run``.
    """

    name = "hooked"
    model: torch.nn.Module
    model_id: str
    preprocess: dict

    def _attach(self, hooks: dict[str, Hook]) -> None:
        """Install the site map (its order is the execution order) and wrap the model in nnsight."""
        self.hooks = hooks
        self.sites = list(hooks)
        self._hook_order = {h: i for i, h in enumerate(dict.fromkeys(hooks.values()))}
        self.nn = NNsight(self.model)
        self.weight_hash = weight_hash(self.model)

    def _check_sites(self, batch: Batch, seq_len: int) -> None:
        """Run ``batch`` (one row) reading every site: each has the shape ``site_shape`` gives and
        each block's resid_pre is the previous block's resid_post; InterpError names the first broken site."""
        try:
            _, cache = self.run(batch, read=self.sites)
        except Exception as e:  # nnsight errors (e.g. out-of-order hooks) from a wrong site map
            raise InterpError(f"site map of {self.model_id} does not run: {(str(e) or type(e).__name__).splitlines()[0]}") from e
        for site in self.sites:
            if not isinstance(cache[site], torch.Tensor):
                hint = " (attention weights need attn_implementation='eager')" if site.endswith("attn.pattern") else ""
                raise InterpError(f"site {site!r} of {self.model_id} gives {type(cache[site]).__name__}, not a tensor{hint}")
            got, want = tuple(cache[site].shape), (1, *self.site_shape(site, seq_len))
            if got != want:
                raise InterpError(f"site {site!r} of {self.model_id} has shape {got}, expected {want}: wrong hook module?")
            s = S.parse(site)
            if s.point == "resid_pre" and s.layer and not torch.equal(cache[site], cache[f"{s.tower}.blocks.{s.layer - 1}.resid_post"]):
                raise InterpError(f"site {site!r} of {self.model_id} is not block {s.layer - 1}'s resid_post: wrong hook module?")

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:  # pragma: no cover - per architecture
        raise NotImplementedError

    def expand_sites(self, patterns: str | Iterable[str]) -> list[str]:
        """Names and globs -> valid sites in execution order (InterpError on unknown ones)."""
        return S.expand(patterns, self.sites)

    # --- inputs ------------------------------------------------------------------------
    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Grey images [H, W] in [0, 1] -> normalised ``pixel_values`` [b, c, size, size]."""
        size, c = self.vision_config.image_size, self.vision_config.num_channels
        out = []
        for img in images:
            a = np.asarray(img, dtype=np.float32)
            if a.ndim != 2:
                raise InterpError(f"wrong image shape {a.shape}: expected a 2-D grey image [H, W]")
            t = torch.from_numpy(a)[None, None]
            if a.shape != (size, size):
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(t[0].expand(c, -1, -1))
        x = torch.stack(out)
        mean = torch.tensor(self.preprocess.get("image_mean", [0.5] * c), dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.get("image_std", [0.5] * c), dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.model.dtype)

    # --- execution ---------------------------------------------------------------------
    def _check_run(self, batch: Batch, names: list[str]) -> None:
        """Refuse sites that do not run for this batch (per architecture)."""

    def _trace_output(self):
        """Inside the trace: the saved model output ``run`` returns (per architecture)."""
        raise NotImplementedError

    def run(
        self,
        batch: Batch,
        read: Iterable[str] = (),
        edit: Mapping[str, Edit] | None = None,
        *,
        skip: Mapping[str, torch.Tensor] | None = None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass; returns (outputs, {site: value}); outputs per architecture
        (LLaVA: logits [b, s, vocab]; dual encoders: logits_per_image [b, b]).

        ``edit[site]`` maps the site's value to its replacement (in place or new); reads see the
        edited value. ``skip[<tower>.blocks.<l>.resid_post] = value`` does not run that block and
        uses ``value`` as its output (how sweeps avoid recomputing layers before a patch).
        Hook points are visited in execution order, as nnsight requires.
        """
        read, edit, skip = list(read), dict(edit or {}), dict(skip or {})
        for name in [*read, *edit, *skip]:
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
        cache: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(grad), self.nn.trace(**batch.model_inputs()):
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
                        cache[name] = part
            outputs = self._trace_output()
        return outputs, cache


class LlavaAdapter(HookedAdapter):
    """LLaVA-architecture models (transformers ``LlavaForConditionalGeneration``)."""

    name = "llava"

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: Mapping, model_id: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess)
        self.model_id = model_id
        cfg = model.config
        self.vision_config, self.text_config = cfg.vision_config, cfg.text_config
        if cfg.vision_feature_select_strategy != "default":
            raise InterpError(f"unsupported vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        side = self.vision_config.image_size // self.vision_config.patch_size
        self.grid = (side, side)
        self.n_patches = side * side
        self.image_token_id = cfg.image_token_id
        self.n_vision_layers = self.vision_config.num_hidden_layers
        self.n_lm_layers = self.text_config.num_hidden_layers
        self._attach(self._site_map())
        self.validate()

    def validate(self) -> None:
        """nnterp-style load check on a dummy input: every site has the shape ``site_shape`` gives and
        each block's resid_pre is the previous block's resid_post; InterpError names the first broken site."""
        p = next(self.model.parameters())
        c, size, bos = self.vision_config.num_channels, self.vision_config.image_size, self.tokenizer.bos_token_id
        ids = torch.tensor([[bos] + [self.image_token_id] * self.n_patches + [bos]], device=p.device)
        pixels = torch.randn((1, c, size, size), generator=torch.Generator().manual_seed(0)).to(p)
        self._check_sites(Batch(ids, torch.ones_like(ids), pixels, []), ids.shape[1])

    def n_layers(self, tower: str) -> int:
        """Number of blocks of ``tower`` (``vision`` or ``lm``)."""
        if tower not in ("vision", "lm"):
            raise InterpError(f"unknown tower {tower!r} for {self.name}: vision or lm")
        return self.n_vision_layers if tower == "vision" else self.n_lm_layers

    def readout(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What metrics read: each row's next-token logits at its answer position [rows, vocab]."""
        return logits[torch.arange(len(batch)), batch.answer_index.to(logits.device)]

    # --- sites -------------------------------------------------------------------------
    def _site_map(self) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {"vision.embed": Hook("model.vision_tower.embeddings")}
        for tower, root, n in (
            ("vision", "model.vision_tower.encoder.layers", self.n_vision_layers),
            ("lm", "model.language_model.layers", self.n_lm_layers),
        ):
            if tower == "lm":
                hooks["projector.out"] = Hook("model.multi_modal_projector")
                hooks["lm.embed"] = Hook(f"{root}.0", "input")
            hooks.update(block_hooks(tower, root, n))
        hooks["lm.logits"] = Hook("lm_head")
        return hooks

    def site_shape(self, site: str, seq_len: int) -> tuple[int, ...]:
        """Shape of one sample's value at ``site`` for an LM sequence of ``seq_len``."""
        s = S.parse(self.expand_sites([site])[0])
        if s.tower == "vision":
            n, d, heads = 1 + self.n_patches, self.vision_config.hidden_size, self.vision_config.num_attention_heads
        elif s.tower == "projector":
            return (self.n_patches, self.text_config.hidden_size)
        else:
            n, d, heads = seq_len, self.text_config.hidden_size, self.text_config.num_attention_heads
        if s.point == "logits":
            return (n, self.text_config.vocab_size)
        return (heads, n, n) if s.point == "attn.pattern" else (n, d)

    def vision_positions(self) -> Positions:
        """Positions of vision-tower sites: the CLS token, then patches in row-major order."""
        rows, cols = np.divmod(np.arange(self.n_patches), self.grid[1])
        return Positions(
            ["special"] + ["image"] * self.n_patches, [-1, *rows.tolist()], [-1, *cols.tolist()],
            ["<cls>"] + ["<patch>"] * self.n_patches, {"image": list(range(1, 1 + self.n_patches))},
        )

    # --- inputs ------------------------------------------------------------------------
    def encode(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        spans: Sequence[Mapping[str, tuple[int, int]]] | None = None,
    ) -> Batch:
        """Sequence = BOS, one token per image patch, the prompt's tokens; right-padded.

        ``spans`` are character spans into each prompt; they become named position lists,
        with ``image`` added for the patch tokens.
        """
        if len(images) != len(prompts) or not prompts:
            raise InterpError(f"need one image per prompt and at least one: got {len(images)} images, {len(prompts)} prompts")
        spans = spans or [{} for _ in prompts]
        tok = self.tokenizer
        enc = tok(list(prompts), add_special_tokens=False, return_offsets_mapping=True)
        head = [tok.bos_token_id] + [self.image_token_id] * self.n_patches
        rows, cols = np.divmod(np.arange(self.n_patches), self.grid[1])
        seqs, positions = [], []
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
            n0 = len(head)
            named = {"image": list(range(1, n0))}
            for name, (a, b) in sp.items():
                named[name] = [n0 + i for i, (s, e) in enumerate(offsets) if s < b and e > a]
            seqs.append(head + list(ids))
            positions.append(
                Positions(
                    ["special"] + ["image"] * self.n_patches + ["text"] * len(ids),
                    [-1, *rows.tolist()] + [-1] * len(ids),
                    [-1, *cols.tolist()] + [-1] * len(ids),
                    tok.convert_ids_to_tokens(seqs[-1]),
                    named,
                )
            )
        input_ids, mask = right_pad(seqs, positions, max(map(len, seqs)), tok.pad_token_id, tok.pad_token)
        return Batch(input_ids, mask, self.pixels(images), positions)

    # --- execution ---------------------------------------------------------------------
    def _check_run(self, batch: Batch, names: list[str]) -> None:
        if batch.inputs_embeds is not None and any(S.parse(n).tower in ("vision", "projector") for n in names):
            raise InterpError("vision and projector sites do not run when the batch carries inputs_embeds")

    def _trace_output(self):
        """``run`` returns the logits [b, s, vocab]."""
        return self.nn.output.logits.save()


def block_hooks(tower: str, root: str, n_layers: int) -> dict[str, Hook]:
    """Sites of HF transformer blocks ``<root>.<l>`` with ``self_attn`` and ``mlp`` children, in execution order."""
    hooks: dict[str, Hook] = {}
    for l in range(n_layers):
        layer = f"{root}.{l}"
        hooks[f"{tower}.blocks.{l}.resid_pre"] = Hook(layer, "input")
        hooks[f"{tower}.blocks.{l}.attn.pattern"] = Hook(f"{layer}.self_attn", "output", 1)
        hooks[f"{tower}.blocks.{l}.attn.out"] = Hook(f"{layer}.self_attn", "output", 0)
        hooks[f"{tower}.blocks.{l}.mlp.out"] = Hook(f"{layer}.mlp")
        hooks[f"{tower}.blocks.{l}.resid_post"] = Hook(layer)
    return hooks


def right_pad(
    seqs: list[list[int]], positions: list[Positions], width: int, pad_id: int, pad_token: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to ``width`` (marking pads in ``positions``); (input_ids, attention_mask)."""
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        pad = width - len(s)
        p = positions[i]
        p.kinds += ["pad"] * pad
        p.rows += [-1] * pad
        p.cols += [-1] * pad
        p.tokens += [pad_token] * pad
    return input_ids, mask


def weight_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names and bytes: identifies weights independent of file layout."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d scalars too
    return h.hexdigest()[:16]
