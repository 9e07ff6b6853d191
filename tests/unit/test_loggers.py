"""Experiment logging (ltk/training/loggers.py), loss.png (ltk/training/run_plot.py) and the
progress bars' switch (ltk/training/progress.py)."""
from __future__ import annotations

import json
import sys
import time

import pytest

from ltk.training import loggers as lg
from ltk.training.config import ConfigError
from ltk.training.progress import progress, progress_enabled
from ltk.training.run_plot import loss_figure, plot_run, read_metrics
from ltk.training.trainer import Trainer

ROWS = [{"step": 1, "loss": 5.5, "lr": 1e-4, "tokens": 64},
        {"step": 2, "loss": 5.0, "lr": 2e-4, "tokens": 128, "val_loss": 5.2, "val_bpb": 3.9},
        {"step": 3, "loss": 4.25, "lr": 3e-4, "tokens": 192}]


# --- sink names and dependencies --------------------------------------------------------

def test_sinks_parse_with_jsonl_always_first():
    assert lg.parse_sinks("jsonl") == ["jsonl"]
    assert lg.parse_sinks(" TensorBoard , wandb,tensorboard") == ["jsonl", "tensorboard", "wandb"]


def test_unknown_sink_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'mlflow'.*valid sinks: jsonl, tensorboard, wandb"):
        lg.parse_sinks("jsonl,mlflow")


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_missing_package_names_the_extra_to_install(sink, monkeypatch):
    monkeypatch.setitem(sys.modules, sink, None)  # `import <sink>` raises ImportError
    with pytest.raises(ConfigError, match=rf'pip install "llm-training-toolkit\[{sink}\]"'):
        lg.check_sinks(f"jsonl,{sink}")


def test_bad_sink_fails_before_any_data_is_prepared(tiny_config, monkeypatch):
    import ltk.training.trainer as trainer_module

    def prepare(*a, **k):
        raise AssertionError("data was prepared before the sinks were checked")

    monkeypatch.setattr(trainer_module, "prepare_data", prepare)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match="tensorboard"):
        Trainer(tiny_config(log_to="jsonl,tensorboard"))
    with pytest.raises(ConfigError, match="valid sinks"):
        Trainer(tiny_config(log_to="csv"))


def test_cli_reports_a_bad_sink_without_a_traceback(capsys):
    from ltk.cli import main

    assert main(["train", "--preset", "gpt-debug", "--trainer.log_to", "jsonl,neptune", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "valid sinks: jsonl, tensorboard, wandb" in err and "Traceback" not in err


# --- each sink writes what it should -------------------------------------------------------

def test_jsonl_appends_one_object_a_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for rows in (ROWS[:2], ROWS[2:]):  # a resumed run appends to the same file
        log = lg.JsonlLogger(path)
        for r in rows:
            log.log(r)
        log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == ROWS


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = lg.TensorBoardLogger(tmp_path / "tensorboard")
    for r in ROWS:
        log.log(r)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "step" not in acc.Tags()["scalars"]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([5.5, 5.0, 4.25])
    assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == [(2, pytest.approx(5.2))]


def test_wandb_writes_an_offline_run_with_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = lg.WandbLogger(tmp_path, {"trainer": {"max_steps": 3}}, "tiny")
    for r in ROWS:
        log.log(r)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb's service process writes the file; on a busy machine its last records can land a
    # moment after finish() returns, so read until they are there (or 60 s have passed)
    deadline = time.monotonic() + 60
    while True:
        data = b"".join(f.read_bytes() for f in runs[0].glob("run-*.wandb"))
        if b"val_loss" in data and b"max_steps" in data or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"val_loss" in data and b"max_steps" in data  # the history and the run config


def test_wandb_goes_offline_without_a_key_and_says_so(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    mode, note = lg.wandb_mode()
    assert mode == "offline" and "offline" in note and "\n" not in note
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert lg.wandb_mode() == (None, None)  # a key: wandb decides (online)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert lg.wandb_mode() == (None, None)  # WANDB_MODE is honoured as given


def test_loggers_close_every_sink_even_when_one_fails():
    closed = []

    class Sink:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def log(self, record):
            pass

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        lg.Loggers([Sink("a"), Sink("b", fail=True), Sink("c")]).close()
    assert sorted(closed) == ["a", "b", "c"]


# --- the Trainer: sinks, loss.png, every exit path ------------------------------------------

class _Recorder:
    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


@pytest.fixture
def recorder(monkeypatch):
    """A sink added beside the real ones, to see what the Trainer logs and that it closes."""
    import ltk.training.trainer as trainer_module

    rec = _Recorder()
    real = trainer_module.open_loggers

    def open_with_recorder(*args, **kwargs):
        loggers = real(*args, **kwargs)
        loggers.add(rec)
        return loggers

    monkeypatch.setattr(trainer_module, "open_loggers", open_with_recorder)
    return rec


def test_training_run_writes_every_sink_and_loss_png(tiny_config, tmp_path, recorder, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("LTK_PLOT", "1")  # off elsewhere in the suite (tests/conftest.py)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(tiny_config(run, max_steps=4, eval_every=2, log_to="tensorboard")).fit()
    rows = read_metrics(run / "metrics.jsonl")  # written though log_to did not name it
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows == recorder.records and recorder.closed
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])
    assert (run / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_run_closes_its_sinks_and_still_plots(tiny_config, tmp_path, recorder, monkeypatch, error):
    monkeypatch.setenv("LTK_PLOT", "1")
    trainer = Trainer(tiny_config(tmp_path / "run", max_steps=6))
    step = trainer.train_step

    def failing_step():
        if trainer.step == 3:
            raise error
        return step()

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(type(error)):
        trainer.fit()
    assert recorder.closed and [r["step"] for r in recorder.records] == [1, 2, 3]
    assert (tmp_path / "run" / "loss.png").exists()


# --- loss.png ------------------------------------------------------------------------------

def test_loss_figure_has_both_losses_lr_on_a_second_axis_and_a_legend():
    fig = loss_figure(ROWS, title="tiny")
    ax, ax_lr = fig.axes
    assert ax.get_xlabel() == "step" and "loss" in ax.get_ylabel() and ax_lr.get_ylabel() == "learning rate"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "validation loss",
                                                                    "learning rate"]
    train, val = ax.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3] and list(val.get_ydata()) == [5.2]
    assert list(ax_lr.get_lines()[0].get_ydata()) == [1e-4, 2e-4, 3e-4]


def test_plot_run_skips_a_cut_line_and_draws_nothing_without_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    assert plot_run(tmp_path) is None and not (tmp_path / "loss.png").exists()
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"step": 4, "lo')  # a crash mid-write
    assert read_metrics(path) == ROWS
    png = plot_run(tmp_path)
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- progress bars ---------------------------------------------------------------------------

def test_progress_is_off_without_a_terminal_and_follows_the_env_var(monkeypatch, capsys):
    monkeypatch.delenv("LTK_PROGRESS", raising=False)
    assert not sys.stderr.isatty() and not progress_enabled()  # pytest captures stderr: no terminal
    bar = progress(range(3), desc="quiet")
    assert bar.disable and list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LTK_PROGRESS", "1")
    assert progress_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("LTK_PROGRESS", "0")
    assert not progress_enabled()
    monkeypatch.delenv("LTK_PROGRESS")
    assert progress_enabled()


def test_data_preparation_writes_no_bar_when_not_a_terminal(tiny_corpus, tmp_path, monkeypatch, capfd):
    from ltk.training.config import DataConfig
    from ltk.training.data import prepare_data

    def prepare(cache):
        prepare_data(DataConfig(source=str(tiny_corpus), vocab_size=280, min_chars=16, cache_dir=str(tmp_path / cache)),
                     verbose=False)
        return capfd.readouterr()

    monkeypatch.delenv("LTK_PROGRESS", raising=False)
    captured = prepare("quiet")
    assert captured.err == "" and captured.out == ""
    monkeypatch.setenv("LTK_PROGRESS", "1")  # forced on: the same steps draw their bars
    captured = prepare("forced")
    assert "data: reading" in captured.err and "data: encoding train" in captured.err and captured.out == ""
