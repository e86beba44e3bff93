"""Write what ``cli.py predict`` generates (prompt, generation, extracted answer) to a JSONL file."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class GenerationWriter(BasePredictionWriter):
    """Save generations as ``<log dir>/generations.jsonl``, one JSON object per prompt, and print where it went.

    :class:`~lit_lowrank.tasks.CausalLMTask` adds one for ``predict`` (unless the Trainer has a prediction writer).
    Each ``predict_step`` result is a list of dicts, written as they are after an ``index`` (the prompt's position
    in the predict data): ``prompt``, ``generation``, ``answer`` (extracted by the task's ``answer_pattern``) and,
    when the data has a reference, ``reference``, ``reference_answer`` and ``correct``. The closing message gives
    the exact-match rate over the rows with a reference. Under multi-process strategies each process writes
    ``generations.rank<r>.jsonl``.

    Args:
        output_dir: folder of the file; by default the Trainer's log directory (``trainer.log_dir``).
        filename: file name, ending in ``.jsonl``.

    Example:
        >>> import tempfile
        >>> from torch.utils.data import DataLoader
        >>> class Echo(L.LightningModule):
        ...     def predict_step(self, batch, batch_idx):
        ...         return [{"prompt": p, "generation": p.upper(), "answer": None} for p in batch]
        >>> folder = tempfile.mkdtemp()
        >>> writer = GenerationWriter(output_dir=folder)
        >>> trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
        >>> _ = trainer.predict(Echo(), DataLoader(["hi", "yo"], batch_size=2),
        ...                     return_predictions=False)  # doctest: +ELLIPSIS
        Generations (2 rows) written to ...generations.jsonl
        >>> print(writer.path.read_text().strip())
        {"index": 0, "prompt": "hi", "generation": "HI", "answer": null}
        {"index": 1, "prompt": "yo", "generation": "YO", "answer": null}
    """

    def __init__(self, output_dir: str | None = None, filename: str = "generations.jsonl") -> None:
        super().__init__(write_interval="batch")
        if Path(filename).suffix != ".jsonl":
            raise ValueError(f"GenerationWriter writes JSONL, got filename={filename!r}. HINT: end it in .jsonl")
        self.output_dir, self.filename = output_dir, filename
        self.path: Path | None = None
        self.rows = self.with_reference = self.correct = 0
        self._file: Any = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: every rank reads it
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}.rank{trainer.global_rank}{name.suffix}")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self.rows = self.with_reference = self.correct = 0
        self._file = self.path.open("w", encoding="utf-8")

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, (list, tuple)) or not all(isinstance(row, dict) for row in prediction):
            raise TypeError(f"GenerationWriter writes a list of dicts per batch, got {type(prediction).__name__} from "
                            f"{type(pl_module).__name__}.predict_step. HINT: use PredictionWriter for class "
                            "predictions")
        indices = list(batch_indices) if batch_indices else range(self.rows, self.rows + len(prediction))
        for index, row in zip(indices, prediction):
            self._file.write(json.dumps({"index": index, **row}, ensure_ascii=False) + "\n")
            if "correct" in row:
                self.with_reference += 1
                self.correct += bool(row["correct"])
        self.rows += len(prediction)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        where = " (one file per process)" if trainer.world_size > 1 else ""
        score = (f"; exact match {self.correct}/{self.with_reference} = {self.correct / self.with_reference:.4f}"
                 if self.with_reference else "")
        _announce(f"Generations ({self.rows} rows) written to {self.path.resolve()}{where}{score}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()  # also after an exception

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@rank_zero_only
def _announce(message: str) -> None:
    print(message, flush=True)
