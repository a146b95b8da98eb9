"""``python -m interp.report STORE [STORE ...] --out FILE.html [--max-samples N]``: one self-contained
HTML report linking, per sample, what the results stores hold for it (``interp.report.linked``).
Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from interp.cli import Parser, out_file, positive_int, run


def parser() -> Parser:
    p = Parser("python -m interp.report", "One HTML report linking, per sample, what the results stores hold.")
    p.add_argument("stores", nargs="+", metavar="STORE", help="results store paths or fsspec URLs (joined on shared samples)")
    p.add_argument("--out", type=out_file, required=True, help="the HTML file to write")
    p.add_argument("--max-samples", type=positive_int, default=20, help="samples with a section (default: 20)")
    p.add_argument("--sae-dashboard", help="SAE features.html to link (default: the one beside the SAE store)")
    p.add_argument("--evaluation", metavar="RESULTS_JSON",
                   help="results.json of python -m interp.evaluate: each attribution method links to its scores")
    return p


def report(args: argparse.Namespace) -> None:
    from interp.report.linked import write_linked_report

    out = write_linked_report(args.stores, args.out, args.max_samples, args.sae_dashboard, args.evaluation)
    print(f"report: {out}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
