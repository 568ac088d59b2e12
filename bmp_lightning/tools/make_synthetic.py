"""Write the synthetic crowded-scene dataset (``bmp_lightning.data.synthetic.generate``) from the command line:

python -m bmp_lightning.tools.make_synthetic out=DIR n_images=N seed=S [val_fraction=F] [key=value ...]
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

from bmp_lightning.data.synthetic import generate, sample_scene
from bmp_lightning.utils.cli import parse_key_values


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``python -m bmp_lightning.tools.make_synthetic out=DIR n_images=N seed=S [val_fraction=F] [key=value ...]``."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(main.__doc__)
        print(generate.__doc__)
        return {}
    kwargs = parse_key_values(args, main.__doc__ or "", typed=True)
    if "out" not in kwargs:
        raise SystemExit("missing out=DIR")
    known = (set(inspect.signature(generate).parameters) | set(inspect.signature(sample_scene).parameters)) - {
        "out_dir",
        "scene_kwargs",
        "rng",
    }
    unknown = sorted(set(kwargs) - known - {"out"})
    if unknown:
        raise SystemExit(f"unknown argument(s) {unknown}; known: out, {', '.join(sorted(known))}")
    out = kwargs.pop("out")
    kwargs.setdefault("n_images", 32)
    t0 = time.perf_counter()
    paths = generate(str(out), **kwargs)
    dt = time.perf_counter() - t0
    for key, path in paths.items():
        if key == "root":
            continue
        if path.is_dir():
            print(f"{key:20s} {path}  ({len(list(path.glob('*.jpg')))} images)")
        else:
            doc = json.loads(path.read_text())
            n = len(doc) if isinstance(doc, list) else len(doc["annotations"])
            print(f"{key:20s} {path}  ({n} people)")
    print(f"generated {kwargs['n_images']} images in {dt:.2f} s under {paths['root']}")
    return paths


if __name__ == "__main__":
    main()
