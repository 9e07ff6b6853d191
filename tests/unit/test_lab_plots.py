"""The labs' plots, drawn from small synthetic results (no lab is run): every line has a legend
entry, every axis a y label, no two tick labels overlap once drawn, and a value that was not
measured is drawn as nothing (or "n/m"), never as a bar of height 0."""
from itertools import combinations

import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Rectangle

from ltk.labs import families, finetune, parallelism, pipeline, pretrain, scaling


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels (major and minor, on the same axis) whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for axis, lo, hi, horizontal in ((ax.xaxis, frame.x0, frame.x1, True), (ax.yaxis, frame.y0, frame.y1, False)):
            shown = []
            for label in axis.get_ticklabels(which="both"):
                if not (label.get_visible() and label.get_text()):
                    continue
                box = label.get_window_extent(renderer)
                middle = (box.x0 + box.x1) / 2 if horizontal else (box.y0 + box.y1) / 2
                if lo - 1 <= middle <= hi + 1:  # ticks outside the view are not drawn
                    shown.append((label.get_text(), box))
            pairs += [(a, b) for (a, box_a), (b, box_b) in combinations(shown, 2) if box_a.overlaps(box_b)]
    return pairs


def unlabelled_lines(fig) -> list[str]:
    """Lines that the legend leaves out (matplotlib names an unlabelled artist `_childN`)."""
    return [f"{ax.get_title()}: {line.get_label()}" for ax in fig.axes for line in ax.get_lines()
            if line.get_label().startswith("_")]


def test_the_checks_can_fail():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks([0, 0.01], ["a long label", "another long label"])
    ax.plot([0, 1], [0, 1])
    assert overlapping_tick_labels(fig) and unlabelled_lines(fig)


def test_families_plot_tick_labels_do_not_overlap():
    # FLOPs spans of the quick preset: T5 three times below the others, 1.4 decades in all
    curves = {"gpt": [(1.47e12, 5.25), (2.9e12, 4.85), (4.37e12, 4.69)],
              "llama": [(1.39e12, 4.96), (2.78e12, 4.34), (4.17e12, 4.11)],
              "bert": [(9.1e11, 6.36), (1.83e12, 6.24), (2.74e12, 6.17)],
              "t5": [(1.9e11, 5.44), (3.8e11, 5.0), (5.72e11, 4.93)]}
    fig = families._plot(curves)
    assert overlapping_tick_labels(fig) == []
    assert unlabelled_lines(fig) == [] and all(ax.get_ylabel() for ax in fig.axes)
    labelled = [t for t in fig.axes[0].get_xticklabels(which="both") if t.get_text()]
    assert len(labelled) >= 3  # still readable: not fixed by dropping the labels


@pytest.mark.parametrize("ms", [(2, 4, 8), (4, 8, 16), (2, 4, 8, 16, 32)])
def test_pipeline_plot_labels_the_micro_batch_counts_only(ms):
    p = 2
    table = [{"schedule": name, "virtual": v, "m": m, "formula": (p - 1) / (v * m),
              "simulated": 1.1 * (p - 1) / (v * m), "measured": 1.2 * (p - 1) / (v * m)}
             for name, v in pipeline.SCHEDULES for m in ms]
    fig = pipeline._plot(table, p)
    assert overlapping_tick_labels(fig) == []
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels(which="both") if t.get_text()] == [str(m) for m in ms]
    assert unlabelled_lines(fig) == [] and fig.axes[0].get_ylabel()


def test_pretrain_plot_labels_every_line():
    metrics = [{"tokens": s * 2048, "loss": 7.5 - 3.5 * s / 1200} for s in range(1, 1201, 10)]
    metrics += [{"tokens": s * 2048, "val_loss": 5 - s / 1000, "val_bpb": 2.2 - s / 2000}
                for s in range(200, 1201, 200)]
    baselines = {"unigram": {"val_loss": 6.3, "val_bpb": 2.89}, "bigram": {"val_loss": 4.2, "val_bpb": 1.93}}
    fig = pretrain._plot_losses(metrics, baselines, {"val_loss": 3.8, "val_bpb": 1.6})
    assert unlabelled_lines(fig) == []
    for ax in fig.axes:  # and the legend shows them all
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {line.get_label() for line in ax.get_lines()}
    assert all(ax.get_ylabel() for ax in fig.axes) and overlapping_tick_labels(fig) == []


def _parallelism_rows() -> list[dict]:
    rows = []
    for world in (2, 4):
        names = ["torch-ddp", "ddp", "zero1", "zero3", "tp", "pp"] + (["dp2xtp2", "pp2xdp2"] if world == 4 else [])
        for i, name in enumerate(names):
            measured = name != "torch-ddp"  # as run() records it: None where not measured
            rows.append({"name": name, "world": world, "tokens_per_s": 14000.0 - 1000 * i - 500 * world,
                         "mem_mib": 16.0 - i if measured else None, "comm_mib": 4.0 + i if measured else None})
    return rows


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_parallelism_plot_has_y_labels_and_no_bar_for_what_was_not_measured():
    rows = _parallelism_rows()
    fig = parallelism._plot(rows)
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert overlapping_tick_labels(fig) == []
    names = list(dict.fromkeys(r["name"] for r in rows))
    for ax, key in zip(fig.axes, ("tokens_per_s", "mem_mib", "comm_mib")):
        bars = _bars(ax)
        wanted = [r for r in rows if r[key] is not None]
        assert len(bars) == len(wanted) and all(b.get_height() > 0 for b in bars)
        for b in bars:  # each bar stands in its strategy's slot, at that strategy's value
            slot = names[round(b.get_x() + b.get_width() / 2)]
            assert any(r["name"] == slot and r[key] == pytest.approx(b.get_height()) for r in wanted), slot
        marks = [t for t in ax.texts if t.get_text() == "n/m"]
        assert len(marks) == sum(r[key] is None for r in rows)
        assert all(names[round(t.get_position()[0])] == "torch-ddp" for t in marks)


def test_parallelism_table_writes_a_dash_not_zero_for_what_was_not_measured():
    assert parallelism._mib(None) == "—" and parallelism._mib(0.0) == "0.00"
    assert finetune._share(None) == "n/m" and finetune._share(0.0) == "0%"


def test_scaling_plot_labels_every_line():
    rows = []
    for name, world, ms in (("single", 1, 250), ("ddp", 2, 140), ("tp", 2, 250), ("ddp", 4, 170), ("tp", 4, 370)):
        rows.append({"name": name, "world": world, "tokens_per_s": 2048 / ms * 1e3, "step_s": ms / 1e3,
                     "compute": 0.8 * ms / 1e3, "comm": 0.15 * ms / 1e3, "idle": 0.05 * ms / 1e3,
                     "pred": {"step_s": 0.9 * ms / 1e3}})
    fig = scaling._plot(rows, cores=2)
    assert unlabelled_lines(fig) == []
    assert all(ax.get_ylabel() for ax in fig.axes) and overlapping_tick_labels(fig) == []
