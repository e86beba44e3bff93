"""Write the predictions of ``trainer.predict`` / ``cli.py predict`` to a CSV or JSONL file, one row per example."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

COLUMNS = ("index", "input", "prediction", "prediction_name", "label", "label_name")


class PredictionWriter(BasePredictionWriter):
    """Save class predictions as ``<log dir>/predictions.csv`` (or ``.jsonl``) and print where the file went.

    The classification tasks add one by default for ``predict`` (unless the Trainer already has a prediction
    writer). Each row holds ``index`` (position in the predict dataset), ``input`` (the text or image path, from
    the DataModule's ``predict_inputs()`` when it has one), ``prediction`` (label id) and ``prediction_name``
    (from ``class_names`` of the DataModule or the task), and ``label``/``label_name`` when the batches carry
    labels. Under multi-process strategies each process writes ``predictions.rank<r>.<ext>``.

    Args:
        output_dir: folder of the file; by default the Trainer's log directory (``trainer.log_dir``).
        filename: file name; ``.csv`` or ``.jsonl`` decides the format.

    Example:
        >>> import tempfile
        >>> from torch.utils.data import DataLoader
        >>> class Net(L.LightningModule):
        ...     class_names = ["neg", "pos"]
        ...     def predict_step(self, batch, batch_idx):
        ...         return (batch["x"] > 0).long()
        >>> data = DataLoader([{"x": torch.tensor(v), "labels": torch.tensor(1)} for v in (-1.0, 2.0)], batch_size=2)
        >>> folder = tempfile.mkdtemp()
        >>> writer = PredictionWriter(output_dir=folder)
        >>> trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
        >>> _ = trainer.predict(Net(), data, return_predictions=False)  # doctest: +ELLIPSIS
        Predictions ...
        >>> print(writer.path.read_text().strip())
        index,input,prediction,prediction_name,label,label_name
        0,,0,neg,1,pos
        1,,1,pos,1,pos
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        if Path(filename).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"PredictionWriter writes .csv or .jsonl files, got filename={filename!r}. "
                             "HINT: end it in .csv or .jsonl")
        self.output_dir, self.filename = output_dir, filename
        self.path: Path | None = None
        self.rows = 0
        self._file: Any = None
        self._csv: Any = None
        self._inputs: Sequence[str] | None = None
        self._class_names: Sequence[str] = ()

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective under DDP/FSDP: every rank reads it.
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}.rank{trainer.global_rank}{name.suffix}")
        self.path, self.rows = folder / name, 0
        folder.mkdir(parents=True, exist_ok=True)
        datamodule = getattr(trainer, "datamodule", None)
        inputs = getattr(datamodule, "predict_inputs", None)
        self._inputs = inputs() if callable(inputs) else None
        self._class_names = (getattr(datamodule, "class_names", None) or getattr(pl_module, "class_names", None)
                             or ())
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._csv = None
        if self.path.suffix == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._csv.writeheader()

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        predicted = torch.as_tensor(prediction).reshape(-1).tolist()
        labels = batch.get("labels") if isinstance(batch, dict) else None
        labels = torch.as_tensor(labels).reshape(-1).tolist() if labels is not None else [None] * len(predicted)
        # Without an index-tracking sampler (an iterable dataset) rows are numbered in the order they arrive.
        indices = list(batch_indices) if batch_indices else range(self.rows, self.rows + len(predicted))
        for index, pred, label in zip(indices, predicted, labels):
            row = {"index": index, "input": self._input(index), "prediction": pred,
                   "prediction_name": self._name(pred), "label": label, "label_name": self._name(label)}
            if self._csv is not None:
                self._csv.writerow(row)
            else:
                self._file.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        self.rows += len(predicted)

    def _input(self, index: int) -> str | None:
        return self._inputs[index] if self._inputs is not None and index < len(self._inputs) else None

    def _name(self, label_id: int | None) -> str | None:
        if label_id is None or not 0 <= label_id < len(self._class_names):
            return None
        return str(self._class_names[label_id])

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        where = " (one file per process)" if trainer.world_size > 1 else ""
        _announce(f"Predictions ({self.rows} rows) written to {self.path.resolve()}{where}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()  # also after an exception, so the file handle does not leak

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._csv = None, None


@rank_zero_only
def _announce(message: str) -> None:
    print(message, flush=True)  # a plain print, like the CLI's summary: shown whatever the logging level
