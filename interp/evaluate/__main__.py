"""``python -m interp.evaluate``: attribution methods x output modes x organisms on the
counterfactual-verified phantom set (``interp.evaluate.experiment``), with bootstrap CIs.

Writes ``results.json`` (every sample's scores, the summary, verification counts, config),
``table.md`` and ``report.html`` (the table and example overlays) under ``--out``.
Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from interp.cli import Parser, fraction, out_dir, positive_int, run, torch_device

DEFAULT_METHODS = (
    "attention_head", "attention_rollout", "attention_relevance", "gradient_weighted_attention", "grad_cam",
    "grad_cam_plus_plus", "integrated_gradients", "occlusion", "rise", "prompting", "prompting_segmentation",
    "saliency", "gradient_x_input", "smoothgrad", "gradient_shap", "lrp", "causal_trace",
    "medfocus", "medfocus_refined", "medfocus_reference", "medfocus_patch_counterfactual",
)


def parser() -> Parser:
    p = Parser("python -m interp.evaluate", __doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--organisms", default="organism,organism-shortcut",
                   help="comma-separated checkpoints (registry names, local folders, hub ids) (default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated attribution methods "
                   "(default: the published baselines, the extra gradient methods, the layer sweep and MedFocus variants)")
    p.add_argument("--modes", default="direct,cot", help="output modes: direct, cot (step-by-step) (default: %(default)s)")
    p.add_argument("--n-images", type=positive_int, default=300, help="test phantoms drawn (default: %(default)s)")
    p.add_argument("--per-finding", type=positive_int, default=8, help="candidates per finding and mode (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2024, help="test-phantom seed (default: %(default)s)")
    p.add_argument("--confounder-rate", type=fraction, default=0.9,
                   help="chest tube with this share of the confounded finding's images, 1 - it of the others (default: %(default)s)")
    p.add_argument("--confounded", default="pneumothorax", help="the finding the chest tube follows (default: %(default)s)")
    p.add_argument("--question", default=None, help="ask models other than the organisms this way ({finding} is "
                   "filled in; a yes/no suffix per mode is added), e.g. 'Is there evidence of {finding} in the image?' "
                   "(default: the published question for them, the phantom VQA prompt for organisms)")
    p.add_argument("--examples", type=int, default=6, help="example overlays per organism in the HTML (default: %(default)s)")
    p.add_argument("--device", type=torch_device, default="cpu")
    p.add_argument("--out", type=out_dir, default="reports/medfocus", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate(args: argparse.Namespace) -> None:
    import torch

    from interp.attribution import check_names
    from interp.errors import InterpError
    from interp.evaluate import experiment as E
    from interp.models.registry import ALIASES, load
    from interp.report.attribution import write_evaluation_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_names(methods)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"direct", "cot"}:
        raise InterpError(f"--modes: choose direct and/or cot, got {args.modes!r}")
    torch.set_num_threads(1)  # the organism is tiny: threads only contend
    organisms = {o.strip(): load(o.strip(), device=args.device, kind="lvlm") for o in args.organisms.split(",") if o.strip()}
    shown: dict[tuple[str, str], dict] = {}

    def keep(org: str, case: E.Case, a) -> None:
        key = (org, case.id)
        if key not in shown and sum(k[0] == org for k in shown) >= args.examples:
            return
        entry = shown.setdefault(key, {"title": f"{org} · {case.id} · {case.kind} · response: {case.response}",
                                       "image": case.sample.image, "region": case.region, "maps": {}})
        entry["maps"][a.method] = a.map

    questions = {o: None if o in ALIASES else (args.question or E.QUESTION) for o in organisms}
    result = E.run(organisms, methods, questions=questions, n_images=args.n_images, seed=args.seed, modes=modes, per_finding=args.per_finding,
                   confounder_rate=args.confounder_rate, confounded=args.confounded, progress=not args.no_progress,
                   examples=keep)
    out = E.write(result, args.out)
    write_evaluation_report(result, list(shown.values()), out / "report.html")
    print(E.markdown(result))
    print(f"verified: {result['verified']}")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'report.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args, evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
