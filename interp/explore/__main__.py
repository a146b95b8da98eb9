"""``python -m interp.explore STORE [MORE ...]``: the interactive explorer (Plotly Dash) of a store's cached
activations, with what further stores of the same samples hold (attributions, a layer sweep, an SAE's
features.zarr), looked up by sample id."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from interp.cli import Parser, positive_int, run


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser("python -m interp.explore", description=__doc__)
    p.add_argument("store", help="results store with cached activations (a folder or fsspec URL)")
    p.add_argument("more", nargs="*", metavar="MORE", help="further stores of the same samples (attribution, sweep, "
                                                           "an SAE's features.zarr)")
    p.add_argument("--sae", help="SAE checkpoint folder (python -m interp.sae): features of any sample, computed on demand")
    p.add_argument("--dashboard", help="SAE features.html to link (default: the one beside the SAE's store or checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=positive_int, default=8050, help="port to serve on (default 8050)")
    return p.parse_args(argv)


def work(args: argparse.Namespace) -> None:
    from interp.explore.api import Explorer
    from interp.explore.app import create_app

    app = create_app(Explorer(args.store, *args.more, sae=args.sae), args.dashboard)
    print(f"explorer at http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    app.run(host=args.host, port=args.port, debug=False)


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse, work, argv)


if __name__ == "__main__":
    raise SystemExit(main())
