"""The Trainer's loop settings are checked against the data before a fit computes anything: a bad
``val_check_interval`` stops the run before the task's ``on_fit_start`` (CausalLMTask's ``test_before_fit``)."""
import lightning as L
import pytest
from cli_runs import SHORT, tiny_quickstart
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_lowrank.cli import main as cli_main
from lit_lowrank.cli.preflight import FitPreflight, explain_loop_error
from lit_lowrank.tasks import SequenceClassificationTask


def test_a_bad_val_check_interval_stops_fit_before_the_tasks_on_fit_start(tmp_path, monkeypatch, capsys):
    # CausalLMTask's test_before_fit evaluates the test split there: minutes, before Lightning checked the setting
    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(SequenceClassificationTask, "on_fit_start", lambda task: started.append(task))
    no_scheduler = ["--model.init_args.scheduler=null"]  # a scheduler asks for the run's length, which checks earlier
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *tiny_quickstart(tmp_path), *SHORT, *no_scheduler, "--trainer.val_check_interval=1000"])
    assert done.value.code == 2
    assert not started
    err = capsys.readouterr().err
    assert ("error: the trainer's loop settings do not fit the training data: `val_check_interval` (1000) must be "
            "less than or equal to the number of the training batches (2). HINT: set trainer.val_check_interval") in err


class ComputesOnFitStart(BoringModel):
    computed = False

    def on_fit_start(self) -> None:
        self.computed = True


def test_preflight_runs_before_the_modules_on_fit_start_and_the_loop_reuses_its_setup():
    model = ComputesOnFitStart()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1000, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[FitPreflight()])
    with pytest.raises(ValueError, match="val_check_interval") as error:
        trainer.fit(model)
    assert not model.computed
    assert str(explain_loop_error(error.value)).startswith("the trainer's loop settings do not fit the training data")
    good = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[FitPreflight()])
    good.fit(BoringModel())
    assert good.global_step == 3
