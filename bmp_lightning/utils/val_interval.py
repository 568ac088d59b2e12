"""Validation interval that changes during training (MMEngine ``dynamic_intervals``).

RTMDet validates every 10 epochs, then every epoch from epoch 280 (docs/recipes.md#mask-out-fine-tune). Lightning reads
``trainer.check_val_every_n_epoch`` at the end of every training epoch, so a callback can change it on the fly.
"""

from __future__ import annotations

import lightning as L


class ValIntervalSwitch(L.Callback):
    """From the epoch whose 1-based number is ``switch_epoch`` on, validate every ``interval`` epochs.

    Checked at every epoch start, so it also holds after a resume. Before the switch the trainer's own
    ``check_val_every_n_epoch`` applies.
    """

    def __init__(self, switch_epoch: int = 280, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.switch_epoch = int(switch_epoch)
        self.interval = int(interval)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.switch_epoch and trainer.check_val_every_n_epoch != self.interval:
            trainer.check_val_every_n_epoch = self.interval
