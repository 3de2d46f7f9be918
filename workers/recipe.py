"""The training recipe's settings (TrainConfig), read by the training engine (workers.train)
and, as the base of the `train` config group, by the config schema (orchestrator/schema.py).
Plain Python, no torch: the command line checks a config before it imports anything heavy.
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.settings import check, setting

__all__ = ["PRECISIONS", "TrainConfig"]

PRECISIONS = ("fp32", "bf16", "fp64")   # workers.train_parts.DTYPES: input and parameter dtypes of each


@dataclass
class TrainConfig:
    """The training recipe and how the engine runs it (conf/train/: presets set what differs).

    Defaults, types and allowed values are declared here once (workers.settings): the
    structured config `train` (orchestrator/schema.py) extends this class with scheduling.
    Imported by the config schema before anything runs, so this module does not import torch.
    """

    epochs: int = setting(10, lo=1, example=20)
    batch_size: int = setting(100, lo=1, example=50)
    lr: float = setting(0.1, lo=0, lo_open=True, example=0.05)  # peak learning rate
    lr_peak_epoch: float = setting(2.0, lo=0, example=4)
    momentum: float = setting(0.9, lo=0, hi=1, hi_open=True, example=0.9)
    nesterov: bool = setting(True)
    weight_decay: float = setting(5e-4, lo=0, example=5.0e-4)
    label_smoothing: float = setting(0.0, lo=0, hi=1, hi_open=True, example=0.0)
    flip: bool = setting(False)               # random horizontal flips
    translate: int = setting(0, lo=0, example=2)  # random translation by up to this many pixels
    cutout: int = setting(0, lo=0, example=4)     # a random square of this side zeroed
    device: str = "auto"                      # auto | cpu | cuda | cuda:N | mps
    precision: str = setting("fp32", choices=PRECISIONS)  # bf16: autocast; fp64: exact cross-checks
    channels_last: bool = setting(False)
    compile: bool = setting(False)            # torch.compile the model
    cuda_graph: bool = setting(False)         # capture the batched step as a CUDA graph (GPU only;
    #                                           experimental: not yet run on a GPU)
    engine: str = setting("batched", choices=("batched", "single"))  # k models at once | one at a time
    models_per_step: int = setting(16, lo=1, example=50)  # k for the batched engine
    loader: str = setting("resident", choices=("resident", "ffcv"))  # resident: training set on the
    #                                           device; ffcv: streamed .beton (pip install '.[ffcv]')
    ffcv_dir: str | None = None               # where the .beton is written once (null: ~/.cache/datamodels/ffcv)
    ffcv_workers: int = setting(2, lo=1, example=2)  # FFCV decoding threads per model

    def validate(self) -> None:
        check(self, "train.")
        if self.loader == "ffcv":
            from workers import ffcv_loader
            ffcv_loader.require()
