"""``python -m bmp_lightning.data.synthetic out=DIR n_images=N seed=S [val_fraction=F] [key=value ...]``."""

from bmp_lightning.data.synthetic.writer import main

if __name__ == "__main__":
    main()
