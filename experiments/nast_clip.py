"""The NAST comparison study: ``python -m interp.nast study`` under the name the README used first.

    python experiments/nast_clip.py                      # the study on clip-organism-biased, 3 seeds
    python experiments/nast_clip.py --seeds 0,1,2,3,4 --steps 120 --betas 0.5,1,2,4
    python experiments/nast_clip.py --model /path/to/clip-checkpoint   # any CLIP/SigLIP folder `load` takes

Options, defaults and outputs: ``python -m interp.nast study --help`` (``interp/nast/study.py``).
"""

from __future__ import annotations

import sys

from interp.nast.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main(["study", *sys.argv[1:]]))
