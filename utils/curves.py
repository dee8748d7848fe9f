"""A picture of training: one panel per stage with its loss and its score per epoch, the kept epoch marked."""
from dataclasses import dataclass

from utils.files import atomic_path

PANEL_INCHES = (5.0, 4.0)
DPI = 100  # a panel is 500 x 400 pixels
LOSS_COLOUR, SCORE_COLOUR, KEPT_COLOUR = "tab:blue", "tab:green", "tab:red"


@dataclass
class Panel:
    title: str
    rows: list                # a stage's log.csv rows, as csv.DictReader gives them
    score_column: str         # "accuracy", "val_miou"
    score_label: str
    kept_epoch: int | None = None  # marked when given
    kept_note: str = ""            # after the epoch in the legend: ", best val mIoU"


def series(rows, column):
    """(epochs, values) of one log column; rows where it is blank or not a number are left out."""
    epochs, values = [], []
    for row in rows:
        try:
            epoch, value = int(row["epoch"]), float(row[column])
        except (KeyError, TypeError, ValueError):
            continue
        epochs.append(epoch)
        values.append(value)
    return epochs, values


def draw_panel(axes, panel):
    epochs, losses = series(panel.rows, "loss")
    lines = axes.plot(epochs, losses, "o-", color=LOSS_COLOUR, markersize=3, label="loss")
    axes.set(title=panel.title, xlabel="epoch", ylabel="loss")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    score_epochs, scores = series(panel.rows, panel.score_column)
    if scores:  # a run without val images has no score column: no empty score axis either
        score_axes = axes.twinx()  # scores are fractions in [0, 1], losses are not: each keeps its own scale
        lines += score_axes.plot(score_epochs, scores, "s-", color=SCORE_COLOUR, markersize=3,
                                 label=panel.score_label)
        score_axes.set(ylabel=panel.score_label, ylim=(0, 1.02))
    if panel.kept_epoch is not None:
        lines.append(axes.axvline(panel.kept_epoch, color=KEPT_COLOUR, linestyle="--", linewidth=1,
                                  label=f"kept: epoch {panel.kept_epoch}{panel.kept_note}"))
        if panel.kept_epoch in score_epochs:
            score_axes.plot([panel.kept_epoch], [scores[score_epochs.index(panel.kept_epoch)]], "*",
                            color=KEPT_COLOUR, markersize=12)
    all_epochs = epochs + score_epochs
    if all_epochs and max(all_epochs) - min(all_epochs) < 20:
        axes.set_xticks(range(min(all_epochs), max(all_epochs) + 1))  # whole epochs, not 2.5
    # below the axes: inside, it would hide the curves of some run
    axes.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=len(lines), fontsize=8,
                frameon=False)


def write_curves(path, panels):
    """Draw the panels side by side into a PNG at `path` (written atomically); panels whose log holds no loss
    are left out. Returns the number of panels drawn; with none, nothing is written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [panel for panel in panels if series(panel.rows, "loss")[0]]
    if not panels:
        return 0
    figure = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # drawn off-screen, whatever matplotlib's default backend is
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        draw_panel(axes, panel)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return len(panels)
