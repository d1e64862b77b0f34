"""Figures (the papers' Fig. 4-6 layouts, ELBO traces) and one self-contained HTML report.

`write(study, tables, fit_table, folder)` is the only entry point. Every sentence in the
report's findings is computed from the tables at `study.alpha`; nothing is canned.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a run must never open windows, also on machines with a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .findings import CHANGED, LOWERED, NO_CHANGE, RAISED, UNCHANGED, UNDETECTABLE  # noqa: E402

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
REGIONS = {"roi_interior": ("ROI interior", "#009E73"), "roi_exterior": ("ROI exterior", "#CC79A7"),
           "entire_image": ("entire image", "#000000")}
NOT_CONVERGED = "#C62828"
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
         "savefig.dpi": 150, "figure.dpi": 100,
         "svg.hashsalt": "perceptcore"}  # fixed SVG ids: identical runs write identical files
# No creation dates in vector figures, for the same reason.
FIXED_METADATA = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}
# Above each panel, one row of finding symbols per line drawn, at a readable size.
SYMBOLS = {"lowered": "▼", "raised": "▲", "unchanged": "="}
SYMBOL_FONT = 10
ROW_STEP = 12  # points between those rows
# English hyphenates a compound modifier; the bundled identifiers that need it (a subgroup plugin's own
# `display_names` come first).
NAMES = {"soft_tissue_lesions": "soft-tissue lesions"}


def write(study, tables: dict, fit_table: pd.DataFrame, folder: Path,
          training: pd.DataFrame | None = None) -> list[str]:
    """Write the figures in every requested format and, if asked, report.html; return their names.

    `training` is the run's training log (the rows of training.csv), for the training curves."""
    folder = Path(folder)
    formats = tuple(study.spec.outputs.figures)
    want_report = bool(study.spec.outputs.report)
    ctx = _Context(study, tables, fit_table if fit_table is not None else pd.DataFrame(), training)
    written, embedded = [], []
    with plt.rc_context(STYLE):
        for stem, caption, draw in _figures(ctx):
            fig = draw()
            png = _png(fig) if want_report or "png" in formats else None  # rendered once, saved and embedded
            for fmt in formats:
                if fmt == "png":
                    (folder / f"{stem}.png").write_bytes(png)
                else:
                    fig.savefig(folder / f"{stem}.{fmt}", format=fmt, metadata=FIXED_METADATA.get(fmt))
                written.append(f"{stem}.{fmt}")
            if want_report:
                embedded.append((stem, caption, "data:image/png;base64," + base64.b64encode(png).decode("ascii")))
            plt.close(fig)
    if want_report:
        (folder / "report.html").write_text(_html(ctx, embedded), encoding="utf-8")
        written.append("report.html")
    return written


# --------------------------------------------------------------------------- shared helpers

class _Context:
    """What every figure and sentence needs: ordered severities, colours, subgroup roles."""

    def __init__(self, study, tables, fit_table, training=None):
        self.study = study
        self.fit_table = fit_table
        self.training = training
        self.tables = {k: v for k, v in tables.items() if v is not None}
        self.severities = tuple(str(s) for s in study.severities)
        self.position = {s: i for i, s in enumerate(self.severities)}
        self.unit = study.spec.severities.unit or ""
        self.perturbation = study.spec.severities.perturbation
        self.alpha = float(study.alpha)
        self.split = tuple(study.groupings[0].analysed)
        self.merged = study.grouping("merged").analysed[0] if len(study.groupings) > 1 else None
        names = list(study.observers)
        for table in self.tables.values():
            if "observer" in table.columns:
                names += [o for o in table["observer"].astype(str).unique() if o not in names]
        self.colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
        self.failed = fit_table[~fit_table["converged"].astype(bool)] if "converged" in fit_table else fit_table[:0]
        # (observer, grouping) pairs whose findings rest on a fit that did not converge
        self.unreliable = {(str(r["observer"]), str(r["grouping"])) for _, r in self.failed.iterrows()}
        self.display = dict(getattr(_definition(study), "display_names", None) or {})

    def name(self, identifier) -> str:
        """The human name of a subgroup or observer group (the identifier stays in the tables and on hover)."""
        identifier = str(identifier)
        if "+" in identifier:  # a merged subgroup: the analysed names joined with "+"
            return " + ".join(self.name(part) for part in identifier.split("+"))
        return self.display.get(identifier) or NAMES.get(identifier) or identifier.replace("_", " ")

    def label(self, identifier) -> str:
        """`name` for matplotlib, which would read $...$ as mathtext."""
        return _mpl(self.name(identifier))

    def named(self, identifier) -> str:
        """`name` as HTML, the identifier on hover."""
        return f"<span title='{html.escape(str(identifier), quote=True)}'>{html.escape(self.name(identifier))}</span>"

    def rows(self, name, **where) -> pd.DataFrame:
        """Rows of a table matching `where`, ordered by severity, unknown severities dropped."""
        table = self.tables.get(name)
        if table is None or table.empty:
            return pd.DataFrame()
        mask = np.ones(len(table), bool)
        for column, value in where.items():
            mask &= (table[column].astype(str) == str(value)).to_numpy()
        out = table[mask].copy()
        out["severity"] = out["severity"].astype(str)
        out["_x"] = out["severity"].map(self.position)
        return out.dropna(subset=["_x"]).sort_values("_x")

    def sev(self, label) -> str:
        return f"{label} {self.unit}".strip()

    def grouping_of(self, subgroup) -> str:
        return "merged" if subgroup == self.merged else "split"


def _num(x) -> str:
    """3 significant digits (ELBOs and log evidences, large, keep one decimal so close parameterisations stay
    distinguishable); floating-point noise such as an sd of 1e-16 is exactly "0", and other values too small
    for 3 decimals are "< 0.001"."""
    if x is None or x is pd.NA or (isinstance(x, (float, np.floating)) and math.isnan(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        if abs(x) < NOISE:
            return "0"
        if abs(x) < 0.001:
            return "< 0.001" if x > 0 else "> -0.001"
        return f"{x:.1f}" if abs(x) >= 999.5 else f"{x:.3g}"
    return str(x)


NOISE = 1e-12  # below this a number is rounding noise of a zero (sums of floats that cancel)


def _pm(mean, sd) -> str:
    """'mean ± sd'; just the mean where the sd is zero (a reference severity), never '± 0'."""
    if not np.isfinite(sd) or abs(sd) < NOISE:
        return _num(mean)
    return f"{_num(mean)} ± {_num(sd) if sd >= 0.001 else f'{sd:.1g}'}"


def _mpl(text) -> str:
    """Matplotlib reads $...$ as mathtext; user-supplied names must stay literal."""
    return str(text).replace("$", r"\$")


def _definition(study):
    """The subgroup-definition plugin, for its display names; None where the study cannot say."""
    try:
        return study.registry.get("subgroups", study.spec.subgroups.definition, "subgroups.definition")
    except Exception:  # a stand-in study, or no subgroups section: identifiers with spaces will do
        return None


def _slug(name) -> str:
    return re.sub(r"[^\w.+-]+", "_", str(name))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- figures

def _modelled_separability(ctx) -> str:
    """The modelled separability the report states: its posterior where that analysis ran, else the published
    posterior-predictive KS test; figures draw the same table, so a symbol never disagrees with a sentence."""
    return "bayesian_separability" if "bayesian_separability" in ctx.tables else "class_separability"


def _panel_caption(ctx, subgroup) -> str:
    what = ("posterior mean ± sd of the observers' mean KS statistic, table bayesian_separability"
            if _modelled_separability(ctx) == "bayesian_separability"
            else "posterior-predictive KS statistic, mean ± sd across observers, table class_separability")
    observed = not ctx.rows("class_separability_observed", subgroup=subgroup).empty
    return (f"Left: predictive confidence, posterior mean ± sd of γ (0 at the reference severity by definition). "
            f"Right: class separability between {ctx.study.cases.positive_label} cases of the subgroup and all "
            f"other cases ({what})."
            + (" Dashed lines, open squares: the observed predictions (mean ± sd across observers)." if observed
               else ""))


def _figures(ctx):
    """(file stem, caption, draw function) for every figure the tables support."""
    out = []
    for subgroup in ctx.split:
        if _has_panels(ctx, subgroup):
            name = ctx.name(subgroup)
            out.append((f"fig4_{_slug(subgroup)}", f"{name[:1].upper()}{name[1:]}. {_panel_caption(ctx, subgroup)}",
                        lambda s=subgroup: _two_panels(ctx, s, ctx.label(s))))
    if ctx.merged and _has_panels(ctx, ctx.merged):
        out.append(("fig6_merged", f"Merged subgroup {ctx.name(ctx.merged)}, for the Simpson's-paradox check. "
                    f"{_panel_caption(ctx, ctx.merged)}", lambda: _two_panels(ctx, ctx.merged,
                                                                              "merged: " + ctx.label(ctx.merged))))
    if any(not ctx.rows("roi_separability", subgroup=s).empty for s in ctx.split):
        out.append(("fig5_roi", f"Class separability of {_join([ctx.name(o) for o in _roi_observers(ctx)])} "
                    "(observed predictions) when only the ROI interior, only its exterior, or the entire image is "
                    "perturbed; mean ± sd of the KS statistic, one per network seed (ROI regions: averaged over "
                    "annotators).", lambda: _roi_figure(ctx)))
    if getattr(ctx.study, "calibration", None) is not None:
        out.append(("fig_reliability", "Reliability of the calibrated observers on the test cases at the reference "
                    f"severity ({ctx.sev(ctx.severities[0])}), every reader pooled: observed frequency of "
                    f"{ctx.study.cases.positive_label} cases against the mean predicted probability per equal-width "
                    "bin (marker area: cases in the bin), before and after calibration; the diagonal is perfect "
                    "calibration. ECE: the expected calibration error of the curve drawn (distance of each point "
                    "from the diagonal, weighted by its cases); calibration.csv has each reader's class-wise ECE. "
                    "Observers trained per severity use their unperturbed model at the reference severity.",
                    lambda: _reliability_figure(ctx)))
    traces = _traces(ctx.study)
    if traces:
        out.append(("fit_elbo", "ELBO per iteration of every latent-model fit that records one; red dashed "
                    "panels did not converge.", lambda: _elbo_figure(ctx, traces)))
    # Closed-form trainings record no loss: without a gradient-trained model there is no curve to draw.
    if ctx.training is not None and ctx.training["loss"].notna().any():
        out.append(("fig_training", "Training loss per epoch of every gradient-trained model (one line per seed; "
                    "per-severity trainings: colour by the severity of the training images).",
                    lambda: _training_figure(ctx)))
    return out


def _has_panels(ctx, subgroup) -> bool:
    return any(not ctx.rows(t, subgroup=subgroup).empty for t in ("predictive_confidence", "class_separability",
                                                                    "class_separability_observed"))


def _two_panels(ctx, subgroup, title):
    panels = [p for p, tables in (("confidence", ("predictive_confidence",)),
                                  ("separability", (_modelled_separability(ctx), "class_separability_observed")))
              if any(not ctx.rows(t, subgroup=subgroup).empty for t in tables)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), constrained_layout=True,
                             squeeze=False)
    titles = [(_confidence_panel if panel == "confidence" else _separability_panel)(ax, ctx, subgroup)
              for ax, panel in zip(axes[0], panels)]
    _titles(axes[0], titles)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _legend(fig, list(handles.values()), list(handles.keys()))
    fig.suptitle(title, fontweight="bold")
    return fig


def _titles(axes, titles):
    """Same title height on every panel, so the axes line up whatever the number of symbol rows."""
    rows = max((n for _, n in titles), default=0)
    for ax, (title, _) in zip(axes, titles):
        ax.set_title(title, pad=8 + ROW_STEP * rows)


def _legend(fig, handles, labels):
    ncols = len(labels) if len(labels) <= 4 else math.ceil(len(labels) / 2)
    fig.legend(handles, labels, loc="outside lower center", ncols=max(ncols, 1), frameon=False)


def _severity_axis(ax, ctx):
    ax.set_xticks(range(len(ctx.severities)), [_mpl(s) for s in ctx.severities])
    ax.set_xlim(-0.5, len(ctx.severities) - 0.5)
    ax.set_xlabel(_mpl(f"severity ({ctx.unit})" if ctx.unit else "severity"))


def _findings(t) -> list:
    return t["finding"].tolist() if "finding" in t else [None] * len(t)


def _symbol_rows(ax, rows):
    """Above the axes, one row per line drawn, in the line's colour: the table's finding at each severity as a
    symbol (▼ lowered, ▲ raised, = unchanged); no symbol for no detectable change or cannot be detected.
    Rows without a symbol take no room; returns how many rows were drawn."""
    rows = [row for row in rows if any(found in SYMBOLS for found in row[2])]
    for i, (colour, xs, findings) in enumerate(rows):
        for x, found in zip(xs, findings):
            if found in SYMBOLS:
                ax.annotate(SYMBOLS[found], xy=(x, 1), xycoords=("data", "axes fraction"),
                            xytext=(0, 3 + ROW_STEP * (len(rows) - 1 - i)), textcoords="offset points",
                            ha="center", va="bottom", fontsize=SYMBOL_FONT, color=colour)
    return len(rows)


def _dodge(i, k) -> float:
    return (i - (k - 1) / 2) * 0.07  # keeps error bars of different observers apart


def _confidence_panel(ax, ctx, subgroup):
    observers = [o for o in ctx.colour if not ctx.rows("predictive_confidence", observer=o, subgroup=subgroup).empty]
    rows = []
    for i, observer in enumerate(observers):
        t = ctx.rows("predictive_confidence", observer=observer, subgroup=subgroup)
        x = np.r_[0, t["_x"].to_numpy(float)] + _dodge(i, len(observers))
        mean = np.r_[0.0, t["gamma_mean"].to_numpy(float)]
        sd = np.r_[0.0, t["gamma_sd"].to_numpy(float)]
        ax.errorbar(x, mean, yerr=sd, color=ctx.colour[observer], marker="o", ms=4, capsize=2.5, lw=1.6,
                    label=ctx.label(observer))
        rows.append((ctx.colour[observer], x[1:], _findings(t)))
    ax.axhline(0, color="0.6", lw=0.8, zorder=0)
    _severity_axis(ax, ctx)
    ax.set_ylabel("posterior mean of γ (logit scale)")
    return "Predictive confidence", _symbol_rows(ax, rows)


def _separability_panel(ax, ctx, subgroup):
    lines = []
    for table, observed in ((_modelled_separability(ctx), False), ("class_separability_observed", True)):
        for observer in ctx.colour:
            t = ctx.rows(table, observer=observer, subgroup=subgroup)
            if not t.empty:
                lines.append((observer, observed, t))
    rows = []
    for i, (observer, observed, t) in enumerate(lines):
        x = t["_x"].to_numpy(float) + _dodge(i, len(lines))
        ax.errorbar(x, t["ks_mean"], yerr=t["ks_sd"], color=ctx.colour[observer], marker="s" if observed else "o",
                    ms=4, capsize=2.5, lw=1.6, ls="--" if observed else "-", mfc="white" if observed else None,
                    label=ctx.label(observer) + (" (observed)" if observed else ""))
        rows.append((ctx.colour[observer], x, _findings(t)))
    _severity_axis(ax, ctx)
    ax.set_ylabel("KS statistic (mean ± sd)")
    return "Class separability", _symbol_rows(ax, rows)


def _roi_observers(ctx) -> list:
    return list(dict.fromkeys(ctx.tables["roi_separability"]["observer"].astype(str)))


def _roi_figure(ctx):
    subgroups = [s for s in ctx.split if not ctx.rows("roi_separability", subgroup=s).empty]
    fig, axes = plt.subplots(1, len(subgroups), figsize=(5.6 * len(subgroups), 4.6), constrained_layout=True,
                             squeeze=False, sharey=True)
    titles = []
    observers = _roi_observers(ctx)
    for ax, subgroup in zip(axes[0], subgroups):
        t_all = ctx.rows("roi_separability", subgroup=subgroup)
        regions = [r for r in REGIONS if r in set(t_all["region"])] + sorted(set(t_all["region"]) - set(REGIONS))
        keys = [(o, r) for o in observers for r in regions]
        rows = []
        for i, (observer, region) in enumerate(keys):
            t = t_all[(t_all["observer"].astype(str) == observer) & (t_all["region"] == region)]
            if t.empty:
                continue
            name, colour = REGIONS.get(region, (region, PALETTE[(len(REGIONS) + i) % len(PALETTE)]))
            label = _mpl(name) if len(observers) == 1 else f"{ctx.label(observer)}, {_mpl(name)}"
            x = t["_x"].to_numpy(float) + _dodge(i, len(keys))
            ax.errorbar(x, t["ks_mean"], yerr=t["ks_sd"], color=colour, marker="o", ms=4, capsize=2.5, lw=1.6,
                        ls=("-", "--", ":", "-.")[observers.index(observer) % 4], label=label)
            rows.append((colour, x, _findings(t)))
        _severity_axis(ax, ctx)
        titles.append((ctx.label(subgroup), _symbol_rows(ax, rows)))
    _titles(axes[0], titles)
    axes[0][0].set_ylabel("KS statistic (mean ± sd)")
    _legend(fig, *axes[0][0].get_legend_handles_labels())
    who = ", ".join(ctx.label(o) for o in observers)
    fig.suptitle(f"{who}: class separability with {_mpl(ctx.perturbation)} restricted to regions", fontweight="bold")
    return fig


def _curve_ece(r) -> float:
    """The expected calibration error of a drawn reliability curve: each filled bin's distance from the
    diagonal, weighted by its cases; the number quoted on the figure, so it can never disagree with the curve."""
    filled = r.counts > 0
    return float(np.sum(r.counts[filled] * np.abs(r.frequency[filled] - r.confidence[filled])) / r.counts.sum())


def _reference_reliability(ctx, values):
    """The reliability curve of (readers x severities x cases) predictions at the reference severity, every
    reader pooled."""
    from .calibration import reliability

    reference = values[:, 0, :]
    positive = np.broadcast_to(ctx.study.cases.positive, reference.shape)
    seen = np.isfinite(reference)
    return reliability(reference[seen], positive[seen], ctx.study.spec.calibration.bins)


def _reliability_figure(ctx):
    calibration = ctx.study.calibration
    observers = list(calibration.before)
    fig, axes = plt.subplots(1, len(observers), figsize=(4.4 * len(observers), 4.6), constrained_layout=True,
                             squeeze=False)
    for ax, observer in zip(axes[0], observers):
        for key, values, colour, style in (("before", calibration.before[observer], "#D55E00", "--"),
                                           ("after", ctx.study.observers[observer].values, "#0072B2", "-")):
            r = _reference_reliability(ctx, values)
            filled = r.counts > 0
            ax.plot(r.confidence[filled], r.frequency[filled], color=colour, ls=style, lw=1.4,
                    label=f"{key} (ECE {_ece(_curve_ece(r))})")
            ax.scatter(r.confidence[filled], r.frequency[filled], s=12 + 60 * r.counts[filled] / r.counts.max(),
                       color=colour, zorder=3, alpha=0.8)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, zorder=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("mean predicted probability")
        ax.set_title(ctx.label(observer))
        ax.legend(loc="upper left", frameon=False)
    axes[0][0].set_ylabel(_mpl(f"observed frequency of {ctx.study.cases.positive_label} cases"))
    fig.suptitle("Calibration on the test cases", fontweight="bold")
    return fig


def _training_figure(ctx):
    """Loss per epoch, one panel per training entry; closed-form trainings (no losses) are left out."""
    log = ctx.training.dropna(subset=["loss"])
    names = list(dict.fromkeys(log["training"].astype(str)))
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.6), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        t = log[log["training"].astype(str) == name]
        severities = list(dict.fromkeys(t["severity"].astype(str)))
        for (severity, reader), curve in t.groupby([t["severity"].astype(str), t["reader"].astype(str)], sort=False):
            colour = PALETTE[severities.index(severity) % len(PALETTE)]
            first = reader == t[t["severity"].astype(str) == severity]["reader"].astype(str).iloc[0]
            ax.plot(curve["epoch"], curve["loss"], color=colour, lw=1.2, marker="o", ms=3,
                    label=_mpl(severity if severity == "unperturbed" else ctx.sev(severity)) if first else None)
        ax.set_title(ctx.label(name))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss")
        if len(severities) > 1:
            ax.legend(title="training images", frameon=False)
    fig.suptitle("Training curves", fontweight="bold")
    return fig


def _traces(study) -> list:
    out = []
    for (observer, grouping, parameterisation), fit in study.fits().items():
        trace = np.asarray(getattr(fit, "elbo_trace", ()), dtype=float)
        if trace.ndim == 2 and trace.shape[0] > 0 and trace.shape[1] >= 2:
            out.append((str(observer), str(grouping), str(parameterisation), bool(fit.converged), trace))
    return out


def _elbo_figure(ctx, traces):
    ncols = min(4, len(traces))
    nrows = math.ceil(len(traces) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), constrained_layout=True,
                             squeeze=False)
    for ax in axes.flat[len(traces):]:
        ax.set_visible(False)
    for ax, (observer, grouping, parameterisation, converged, trace) in zip(axes.flat, traces):
        colour = ctx.colour.get(observer, "0.3") if converged else NOT_CONVERGED
        ax.plot(trace[:, 0], trace[:, 1], color=colour, lw=1.2, ls="-" if converged else "--")
        # The first iterations are orders of magnitude lower and would flatten the rest.
        tail = trace[len(trace) // 10:, 1]
        tail = tail[np.isfinite(tail)]
        if tail.size and np.ptp(tail) > 0:
            ax.set_ylim(tail.min() - 0.05 * np.ptp(tail), tail.max() + 0.05 * np.ptp(tail))
        if not converged:
            ax.set_facecolor("#FDECEA")
        ax.set_title(_mpl(f"{observer} · {grouping} · {parameterisation}") + ("" if converged else "\nNOT CONVERGED"),
                     fontsize=8.5, color="black" if converged else NOT_CONVERGED)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("ELBO", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend([Line2D([], [], color="0.3"), Line2D([], [], color=NOT_CONVERGED, ls="--")],
               ["converged (colour: observer group)", "did not converge"], loc="outside lower center", ncols=2,
               frameon=False)
    return fig


# --------------------------------------------------------------------------- findings in plain words
# Every sentence reads the tables' `finding` column alone (perceptcore.findings), so no sentence can disagree
# with a table; the rules behind the findings are stated once, above the sentences.

def _where(ctx, labels) -> str:
    """'at every severity', 'from 1 mm on' when the severities are a tail of the ordered list, else 'at ...'."""
    labels = list(labels)
    later = list(ctx.severities[1:])
    if labels == later and len(labels) > 1:
        return "at every severity"
    if labels and labels == later[len(later) - len(labels):] and len(labels) > 1:
        return f"from {ctx.sev(labels[0])} on"
    return "at " + ctx.sev(_join(labels))


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _n_observers(ctx, observer) -> str:
    group = ctx.study.observers.get(observer)
    return f"{len(group.readers)} observers" if group is not None else "this number of observers"


def _at(t, found) -> list:
    return t["severity"][t["finding"] == found].tolist()


def _finding_text(ctx, t, what, n) -> str:
    """What the perturbation does to `what`, from the rows' `finding` column."""
    clauses = []
    for found, verb in ((LOWERED, "lowers {}"), (RAISED, "raises {}"), (UNCHANGED, "leaves {} unchanged"),
                        (NO_CHANGE, "makes no detectable change to {}")):
        if _at(t, found):
            clauses.append(f"{verb.format('it' if clauses else what)} {_where(ctx, _at(t, found))}")
    out = [f"{ctx.perturbation} {_join(clauses)}"] if clauses else []
    undetectable = _at(t, UNDETECTABLE)
    if undetectable:
        where = _where(ctx, undetectable)
        where = "" if where == "at every severity" else f" {where}"
        out.append(f"an effect of {ctx.perturbation} on {what}{where} cannot be detected with {n}")
    return "; ".join(out) if out else f"{what} cannot be judged (no findings)"


def _confidence_sentences(ctx) -> list:
    out = []
    for subgroup in ctx.split + ((ctx.merged,) if ctx.merged else ()):
        for observer in ctx.colour:
            t = ctx.rows("predictive_confidence", observer=observer, subgroup=subgroup)
            if t.empty:
                continue
            last = t.iloc[-1]
            text = _finding_text(ctx, t, "predictive confidence", _n_observers(ctx, observer))
            out.append((f"{ctx.name(observer)}, {ctx.name(subgroup)}: {text}; γ at {ctx.sev(last['severity'])} = "
                        f"{_pm(last['gamma_mean'], last['gamma_sd'])}.",
                        (observer, ctx.grouping_of(subgroup)) in ctx.unreliable))
    return out


def _separability_text(ctx, t, what, n, posterior=False) -> str:
    """The finding and the KS statistic at the first and last severity (an arrow, not a verb: whether it
    changed is the finding's to say)."""
    first, last = t.iloc[0], t.iloc[-1]
    span = (f"{'mean KS' if posterior else 'KS'} {_pm(first['ks_mean'], first['ks_sd'])} at "
            f"{ctx.sev(first['severity'])} → {_pm(last['ks_mean'], last['ks_sd'])} at {ctx.sev(last['severity'])}"
            + (" (posterior mean ± sd)" if posterior else ""))
    return f"{_finding_text(ctx, t, what, n)}; {span}"


def _changes(ctx, t) -> str:
    """Where the rows' findings say the perturbation changed it: for comparing two tables."""
    parts = [f"{found} {_where(ctx, _at(t, found))}" for found in CHANGED if _at(t, found)]
    return _join(parts) if parts else "not detectably changed"


def _separability_sentences(ctx) -> list:
    out = []
    # The modelled separability is stated from its posterior (bayesian_separability) where that analysis
    # ran; the published posterior-predictive KS test is then kept in the tables, for reproducing the
    # papers, but stated nowhere, so no two sentences judge the same thing differently.
    table = _modelled_separability(ctx)
    for subgroup in ctx.split + ((ctx.merged,) if ctx.merged else ()):
        for observer in ctx.colour:
            modelled = ctx.rows(table, observer=observer, subgroup=subgroup)
            observed = ctx.rows("class_separability_observed", observer=observer, subgroup=subgroup)
            shaky = (observer, ctx.grouping_of(subgroup)) in ctx.unreliable
            n = _n_observers(ctx, observer)
            who = f"{ctx.name(observer)}, {ctx.name(subgroup)}"
            if not modelled.empty:
                what = ("posterior-predictive " if not observed.empty else "") + "class separability"
                text = _separability_text(ctx, modelled, what, n, posterior=table == "bayesian_separability")
                out.append((f"{who}: {text}.", shaky))
            if not observed.empty:
                text = _separability_text(ctx, observed, "class separability of the observed predictions", n)
                out.append((f"{who}: {text}.", False))
            if not modelled.empty and not observed.empty:
                a, b = _changes(ctx, modelled), _changes(ctx, observed)
                if a != b:
                    out.append((f"{who}: the posterior-predictive and the observed predictions disagree: "
                                f"separability is {a} in the posterior-predictive and {b} in the observed "
                                "predictions; read both.", shaky))
    return out


def _roi_sentences(ctx) -> list:
    out = []
    table = ctx.tables.get("roi_separability")
    if table is None or table.empty:
        return out
    for subgroup in ctx.split:
        for observer in dict.fromkeys(table["observer"].astype(str)):
            for region in dict.fromkeys(table["region"].astype(str)):
                t = ctx.rows("roi_separability", observer=observer, subgroup=subgroup, region=region)
                if not t.empty:
                    name = REGIONS.get(region, (region,))[0]
                    text = _separability_text(ctx, t, "class separability", _n_observers(ctx, observer))
                    out.append((f"{ctx.name(observer)}, {ctx.name(subgroup)}, perturbing the {name}: {text}.", False))
    return out


ANALYSIS_WORDS = {"predictive_confidence": "predictive confidence", "bayesian_separability": "class separability"}
FINDING_WORDS = {"lowered": "lowered by the perturbation", "raised": "raised by the perturbation",
                 "unchanged": "unchanged by the perturbation", "invariant": "invariant to the perturbation"}


def _simpson_sentences(ctx) -> list:
    table = ctx.tables.get("simpsons_paradox")
    if table is None or table.empty:
        return []
    out = []
    for _, r in table[table["differs"].astype(bool)].iterrows():
        what = ANALYSIS_WORDS.get(r["analysis"], str(r["analysis"]))
        merged = FINDING_WORDS.get(r["merged_finding"], str(r["merged_finding"]))
        shaky = any((str(r["observer"]), g) in ctx.unreliable for g in ("split", "merged"))
        flagged = [s.strip() for s in str(r.get("severities", "") or "").split(",") if s.strip() not in ("", "nan")]
        # The subgroup's own finding at each flagged severity, from its analysis's table, so this sentence
        # says what the summary says (a flagged severity may be unchanged or reversed).
        own = ctx.rows(str(r["analysis"]), observer=r["observer"], subgroup=r["subgroup"])
        clauses = [f"{found} at {ctx.sev(', '.join(at))}" for found in FINDING_ORDER
                   if (at := [x for x in (_at(own, found) if not own.empty else []) if str(x) in flagged])]
        if "mean" in flagged:  # the check's statement on the effect averaged over the perturbed severities
            clauses.append("unchanged or reversed on average over the perturbed severities")
        split = ", ".join(clauses) or FINDING_WORDS.get(r["split_finding"], str(r["split_finding"]))
        out.append((f"{ctx.name(r['observer'])}, {what}: with {ctx.name(r['merged_subgroup'])} merged into one "
                    f"subgroup it looks {merged}, but {ctx.name(r['subgroup'])} alone is not ({split}): Simpson's "
                    "paradox.", shaky))
    if not out:
        out.append((f"No Simpson's paradox at α = {ctx.alpha:g}: no subgroup credibly lacks (or reverses) an effect "
                    "the merged analysis shows.", False))
    # What a flag and its absence are worth, measured by benchmarks/simpsons_calibration.py.
    if ctx.study.spec.model.case_effects == "by_class":
        power = ("it flags about 93 % on predictive confidence and 92 % on class separability, so no flag is fair "
                 "evidence that there is no paradox of that size.")
    else:  # the published model's case-effect prior shrinks the separability posterior towards no change
        power = ("it flags about 94 % on predictive confidence but only about half on class separability with "
                 "the pooled case effects used here, so no flag on class separability is weak evidence that there "
                 "is no paradox.")
    out.append(("How far to trust this check: a flag is wrong in at most α of studies whose subgroups share one "
                "effect; of simulated studies of the published radiologist size with a real paradox (γ falling to "
                f"−2 in one subgroup, 0 in the other) {power}", False))
    return out


def _ece(x) -> str:
    """Two decimals, as calibration errors are usually quoted, but never a bare 0.00."""
    return f"{x:.2f}" if np.isfinite(x) and x >= 0.01 else _num(x)


def _calibration_sentences(ctx) -> list:
    table = ctx.tables.get("calibration")
    if table is None or table.empty:
        return []
    out = []
    for observer, rows in table.groupby(table["observer"].astype(str), sort=False):
        before, after = rows["ece_test_before"].mean(), rows["ece_test_after"].mean()
        readers = rows["reader"].nunique()
        fitted_at = list(dict.fromkeys(rows["fitted_at"].astype(str)))
        over = f"{readers} reader{'s' if readers != 1 else ''}"
        if len(fitted_at) > 1:
            over += f" x {len(fitted_at)} severities, each calibrated on its own predictions"
        else:
            over += f"; fitted at {ctx.sev(fitted_at[0])} and applied at every severity"
        n = int(rows["n_validation"].max())
        name = ctx.name(observer)
        if not (np.isfinite(before) and np.isfinite(after)):
            text = f"{name}'s calibration cannot be judged: the test cases lack one of the classes"
        elif _ece(after) == _ece(before):
            text = f"Calibration left {name}'s class-wise ECE on the test cases unchanged at {_ece(before)}"
        else:
            verb = "lowered" if after < before else "raised"
            text = f"Calibration {verb} {name}'s class-wise ECE on the test cases from {_ece(before)} to {_ece(after)}"
        out.append((f"{text} (mean over {over}; {n} validation cases).", False))
    return out


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.lede{color:#444;margin-top:0}
.banner{border-left:4px solid #0072B2;background:#EEF4FA;padding:.4em 1em;margin:1em 0}.banner p{margin:.4em 0}
.warning{border:2px solid #C62828;background:#FDECEA;padding:.8em 1.2em;border-radius:6px;margin:1em 0}
.warning h3{margin:.1em 0 .4em;color:#C62828}
.ok{border-left:4px solid #2E7D32;padding:.3em .8em;background:#EEF7EE}
.unreliable{color:#C62828;font-weight:600}
nav.toc{font-size:.9em}nav.toc ol{margin:.2em 0;columns:2}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0 1.5em;max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;overflow-wrap:anywhere}th{background:#f3f3f3}
td.text,th.text{text-align:left}tr.bad td{background:#FDECEA}td.selected{font-weight:700;background:#EEF7EE}
table.matrix td{text-align:left;vertical-align:top}table.matrix th{overflow-wrap:break-word}
table.matrix div{margin:.1em 0}
.f-lowered{color:#B34700;font-weight:600}.f-raised{color:#0060A0;font-weight:600}.f-unchanged{color:#2E7D32}
.f-none{color:#555}
.note{font-size:.85em;color:#444}
figure{margin:1.5em 0;break-inside:avoid}figure img{max-width:100%}figcaption{font-size:.85em;color:#444}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
@page{size:A4;margin:12mm}
@media print{body{max-width:none;margin:0;padding:0;font-size:10pt}tr{break-inside:avoid}h2{break-after:avoid}}
"""

SECTIONS = (("summary", "Summary"), ("simpson", "Simpson's paradox"), ("figures", "Figures"), ("models", "The models"),
            ("details", "Findings in detail"), ("tables", "Tables"), ("diagnostics", "Fit diagnostics"))
# The matrix's lines: (table, what it says); the modelled separability's table is chosen per study.
MATRIX = (("predictive_confidence", "confidence"), (None, "separability"),
          ("class_separability_observed", "observed separability"))
FINDING_ORDER = (LOWERED, RAISED, UNCHANGED, NO_CHANGE, UNDETECTABLE)
FINDING_CLASS = {LOWERED: "f-lowered", RAISED: "f-raised", UNCHANGED: "f-unchanged"}


def _html(ctx, figures) -> str:
    e = html.escape
    study, fit_table, failed = ctx.study, ctx.fit_table, ctx.failed
    by_stem = {f[0]: f for f in figures}
    model_figures = [by_stem.pop(stem) for stem in ("fig_reliability", "fig_training") if stem in by_stem]
    elbo = [by_stem.pop("fit_elbo")] if "fit_elbo" in by_stem else []
    models = _models_html(ctx, model_figures)

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(study.spec.study.name)} — "
             f"perceptcore report</title><style>{CSS}</style></head><body>",
             f"<h1>{e(study.spec.study.name)}</h1>"]
    description = getattr(study.spec.study, "description", "")
    if description:
        parts.append(f"<p class='lede'>{e(description)}</p>")
    parts.append(_banner_html(ctx))
    if len(failed):
        items = "".join(f"<li><b>{ctx.named(r['observer'])}</b> ({e(str(r['grouping']))} subgroups, "
                        f"{e(str(r['parameterisation']))}): {e(str(r.get('convergence', '')))}</li>"
                        for _, r in failed.iterrows())
        parts.append(f"<div class='warning'><h3>⚠ {len(failed)} of {len(fit_table)} latent-model fits did not "
                     f"converge or failed their own accuracy diagnostic</h3><ul>{items}</ul><p>Findings that depend "
                     "on these fits (predictive confidence and posterior-predictive class separability of these "
                     "observers, and the Simpson's-paradox check built on them) are <b>unreliable</b>; they are "
                     "marked ⚠ below.</p></div>")
    elif len(fit_table):
        parts.append(f"<p class='ok'>All {len(fit_table)} latent-model fits passed their accuracy diagnostic "
                     "(see <a href='#diagnostics'>Fit diagnostics</a>).</p>")
    present = {"simpson": bool(_simpson_sentences(ctx)), "figures": bool(by_stem), "models": bool(models)}
    sections = [(key, title) for key, title in SECTIONS if present.get(key, True)]
    parts.append("<nav class='toc'><b>Contents</b><ol>" + "".join(f"<li><a href='#{key}'>{e(title)}</a></li>"
                                                                  for key, title in sections) + "</ol></nav>")

    parts.append(f"<h2 id='summary'>Summary</h2>{_rules_html(ctx)}{_matrix_html(ctx)}")
    if present["simpson"]:
        parts.append("<h2 id='simpson'>Simpson's paradox</h2>" + _sentences_html(_simpson_sentences(ctx)))
    if by_stem:
        parts.append("<h2 id='figures'>Figures</h2><p class='note'>Error bars: ± 1 sd. Above each panel, one row per "
                     "line in its colour gives the finding of the table drawn at each severity: ▼ lowered, "
                     "▲ raised, = unchanged (within the margin); no symbol: no detectable change, or it cannot be "
                     "detected.</p>" + "".join(_figure_html(*f) for f in by_stem.values()))
    if models:
        parts.append("<h2 id='models'>The models</h2>" + models)
    parts.append("<h2 id='details'>Findings in detail</h2><p class='note'>The findings of the summary, with the "
                 "numbers behind them, by the rules stated there.</p>")
    for heading, sentences in (("Predictive confidence", _confidence_sentences(ctx)),
                               ("Class separability", _separability_sentences(ctx)),
                               ("Regions of interest", _roi_sentences(ctx))):
        if sentences:
            parts.append(f"<h3>{e(heading)}</h3>{_sentences_html(sentences)}")
    parts.append("<h2 id='tables'>Tables</h2><p class='note'>The run's CSV files, identifiers as written "
                 "there.</p>")
    for name, table in ctx.tables.items():
        parts.append(f"<details><summary>{e(name)} ({len(table)} rows)</summary>{_table_html(table)}</details>")
    parts.append("<h2 id='diagnostics'>Fit diagnostics</h2>" + _diagnostics_html(ctx))
    parts += [_figure_html(*f) for f in elbo]
    if len(fit_table) and "elbo" in fit_table and fit_table["parameterisation"].nunique() > 1:
        parts.append("<h3>Model selection</h3><p>log p(y) per parameterisation (the importance-sampling estimate; "
                     "the ELBO, a lower bound, for variational methods); the selected one (highest) is bold.</p>"
                     + _selection_html(fit_table))
    parts.append("</body></html>")
    return "\n".join(parts)


def _sentences_html(sentences) -> str:
    items = "".join(f"<li>{html.escape(text)}" + (" <span class='unreliable'>(⚠ unreliable: a fit did not "
                                                   "converge)</span>" if shaky else "") + "</li>"
                    for text, shaky in sentences)
    return f"<ul>{items}</ul>"


def _rules_html(ctx) -> str:
    """How a finding is made, stated once for the whole report."""
    a2 = ctx.alpha / 2
    margins = ctx.study.spec.analyses.margins
    bayesian = _modelled_separability(ctx) == "bayesian_separability"
    return (f"<p class='note'>Each cell lists, per severity, what {html.escape(ctx.perturbation)} does to each "
            f"measure (two-sided at α = {ctx.alpha:g}, each direction at α/2 = {a2:g}). <b>Confidence</b>: "
            f"lowered where P(γ ≥ 0 | data) &lt; α/2, raised where P(γ ≤ 0 | data) &lt; α/2, unchanged where "
            f"|γ| &lt; {margins.gamma:g} with posterior probability ≥ {1 - ctx.alpha:g}. <b>Separability</b>: "
            + (f"judged the same way on the posterior of its change Δ of the mean KS statistic (margin "
               f"{margins.ks:g}). " if bayesian else
               "the posterior-predictive one-tailed KS test against the reference severity, p &lt; α/2 in that "
               "direction. ")
            + "<b>Observed separability</b> (models' observed predictions): the one-tailed KS tests across the "
            "observers; where so few observers cannot give a p-value below α/2, a change <i>cannot be "
            "detected</i>. <i>No detectable change</i> means the data could have shown a change at this level "
            "but did not, which is not the same as unchanged. The tables' <code>finding</code> column holds the "
            "same findings.</p>")


def _matrix_html(ctx) -> str:
    """Observer group x subgroup: each cell the findings of each analysis with the severities where they hold."""
    subgroups = ctx.split + ((ctx.merged,) if ctx.merged else ())
    analyses = [(table or _modelled_separability(ctx), what) for table, what in MATRIX]
    body = []
    for observer in ctx.colour:
        cells = []
        for subgroup in subgroups:
            lines = []
            for table, what in analyses:
                t = ctx.rows(table, observer=observer, subgroup=subgroup)
                findings = [(found, _at(t, found)) for found in FINDING_ORDER] if not t.empty else []
                spans = [f"<span class='{FINDING_CLASS.get(found, 'f-none')}'>{html.escape(found)} at "
                         f"{html.escape(ctx.sev(', '.join(labels)))}</span>" for found, labels in findings if labels]
                if spans:
                    shaky = (table != "class_separability_observed"
                             and (observer, ctx.grouping_of(subgroup)) in ctx.unreliable)
                    flag = " <span class='unreliable' title='a fit did not converge'>⚠</span>" if shaky else ""
                    lines.append(f"<div data-table='{table}'><b>{what}</b>: {'; '.join(spans)}{flag}</div>")
            cells.append(f"<td data-observer='{html.escape(observer, quote=True)}' "
                         f"data-subgroup='{html.escape(subgroup, quote=True)}'>{''.join(lines) or '–'}</td>")
        if any(c.endswith("</div></td>") for c in cells):
            body.append(f"<tr><th class='text'>{ctx.named(observer)}</th>{''.join(cells)}</tr>")
    if not body:
        return "<p>No analysis produced findings.</p>"
    head = "<th class='text'>observer group</th>" + "".join(
        f"<th class='text'>{ctx.named(s)}{' (merged)' if s == ctx.merged else ''}</th>" for s in subgroups)
    return (f"<table class='matrix' id='summary-matrix'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _banner_html(ctx) -> str:
    """What data the study used, its design, and how the latent model was fitted."""
    e = html.escape
    study, spec = ctx.study, ctx.study.spec
    dataset = getattr(spec, "dataset", None)
    sections = [o for o in getattr(spec, "observers", ()) if o.name in study.observers]
    computed = [o for o in sections if getattr(o, "computed", False)]
    trainings = {t.name: t.model for t in getattr(spec, "training", ())}
    models = ", ".join(f"{ctx.named(o.name)} (<code>{e(str(o.model or trainings.get(o.trained, '?')))}</code>)"
                       for o in computed)
    if dataset is not None:
        data = (f"<b>Synthetic data.</b> Every case and image was generated by the dataset plugin "
                f"<code>{e(dataset.name)}</code> (seed {spec.study.seed}); no patient is in this study.")
    elif computed:
        data = "<b>Images.</b> The observers' predictions were computed from the study's images."
    else:
        data = "<b>Published predictions.</b> Every observer's predictions were read from prediction files."
    if computed:
        data += (f" {'Every observer group is' if len(computed) == len(sections) else 'These observer groups are'} "
                 f"a model run on the images{', simulated, not people' if dataset is not None else ''}: {models}.")
    return f"<div class='banner'><p>{data}</p><p>{e(_design(ctx))}</p></div>"


def _design(ctx) -> str:
    study, fit_table = ctx.study, ctx.fit_table
    observers = ", ".join(f"{ctx.name(name)} ({len(group.readers)} observers, {'dense' if group.dense else 'sparse'})"
                          for name, group in study.observers.items())
    positive = np.asarray(study.cases.positive, bool)
    text = (f"{len(positive)} test cases ({int(positive.sum())} {study.cases.positive_label}); observer groups: "
            f"{observers}; severities: {', '.join(ctx.severities)} {ctx.unit}. ")
    if len(fit_table):
        def listed(column):
            return ", ".join(dict.fromkeys(fit_table[column].astype(str))) if column in fit_table else "?"
        selected = fit_table[fit_table["selected"].astype(bool)] if "selected" in fit_table else fit_table
        text += (f"Latent model: backend {listed('backend')}, method {listed('method')}, parameterisation "
                 f"{', '.join(dict.fromkeys(selected['parameterisation'].astype(str)))}, case effects "
                 + ("by class (a positive case's effect has prior mean delta, a negative one's 0)"
                    if study.spec.model.case_effects == "by_class" else "pooled (one N(0, sd) prior, as published)")
                 + f", seed {study.spec.fit_seed}.")
    else:
        text += f"No latent model was fitted (seed {study.spec.fit_seed})."
    calibration = getattr(study, "calibration", None)
    if calibration is not None:
        text += (f" A further {calibration.n_validation} cases were held out to calibrate "
                 f"{_join([ctx.name(o) for o in calibration.before])} and are left out of every analysis.")
    return text


def model_table(study) -> pd.DataFrame:
    """models.csv and the report's models table: per model (observer group x reader) on the test cases
    at the reference severity, the accuracy of thresholding at 0.5, AUC, and its mean predicted
    probability (before calibration) against the prevalence."""
    from .stats import auc

    calibration = getattr(study, "calibration", None)
    before = calibration.before if calibration is not None else {}
    positive = np.asarray(study.cases.positive, bool)
    rows = []
    for section in getattr(study.spec, "observers", ()):
        if not getattr(section, "computed", False) or section.name not in study.observers:
            continue
        group = study.observers[section.name]
        raw = before.get(section.name, group.values)
        for r, reader in enumerate(group.readers):
            p, calibrated = raw[r, 0], group.values[r, 0]
            seen = np.isfinite(p)
            p, y = p[seen], positive[seen]
            both = y.any() and not y.all()
            rows.append({"observer": section.name, "reader": str(reader), "cases": int(seen.sum()),
                         "accuracy": float(np.mean((p >= 0.5) == y)) if seen.any() else np.nan,
                         "auc": auc(p[y], p[~y]) if both else np.nan,
                         "mean_probability": float(p.mean()) if seen.any() else np.nan,
                         "prevalence": float(y.mean()) if seen.any() else np.nan,
                         "calibrated_mean": float(calibrated[seen].mean()) if section.name in before else np.nan})
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


MODEL_COLUMNS = ("observer", "reader", "cases", "accuracy", "auc", "mean_probability", "prevalence", "calibrated_mean")


def _models_html(ctx, figures) -> str:
    rows = model_table(ctx.study)
    sentences = _calibration_sentences(ctx)
    if rows.empty and not sentences and not figures:
        return ""
    out = []
    if not rows.empty:
        columns = [("observer group", None), ("seed / reader", "reader"), ("test cases", "cases"),
                   ("accuracy at 0.5", "accuracy"), ("AUC", "auc"), ("mean P(" + ctx.study.cases.positive_label + ")",
                                                                  "mean_probability"),
                   ("prevalence", "prevalence")]
        if rows["calibrated_mean"].notna().any():
            columns.append(("mean after calibration", "calibrated_mean"))
        head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
        body = "".join("<tr><td class='text'>" + ctx.named(r["observer"]) + "</td>"
                       + "".join(f"<td{'' if _is_number(r[c]) else ' class=text'}>{html.escape(_num(r[c]))}</td>"
                                 for _, c in columns[1:]) + "</tr>" for _, r in rows.iterrows())
        out.append(f"<p class='note'>Each model on the test cases at the reference severity "
                   f"({html.escape(ctx.sev(ctx.severities[0]))}; models trained per severity: their unperturbed "
                   "model): accuracy of calling P ≥ 0.5 positive, AUC, and the mean predicted probability, before "
                   "calibration, against the prevalence of the cases it predicted (binary readers: their share of "
                   "positive calls). A mean far from the prevalence means the raw probabilities are not "
                   f"calibrated.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if sentences:
        out.append(_sentences_html(sentences))
    out += [_figure_html(*f) for f in figures]
    if ctx.training is None:
        out.append("<p class='note'>Training curves: see <code>training.csv</code>.</p>")
    return "".join(out)


DIAGNOSTICS = (("pareto_k", "worst k̂"), ("importance_ess", "min. ESS"), ("max_rhat", "max. R-hat"),
               ("min_ess_bulk", "min. bulk ESS"), ("min_ess_tail", "min. tail ESS"), ("divergences", "divergences"))


def _diagnostics_html(ctx) -> str:
    """One short row per fit (status and the numbers it was judged by); each method's long explanation once,
    in a paragraph under the table."""
    e = html.escape
    fits = ctx.fit_table
    if not len(fits):
        return "<p>No latent model was fitted.</p>"
    method = fits["backend"].astype(str) + " " + fits["method"].astype(str) if "method" in fits else None
    score = "log_evidence" if "log_evidence" in fits and np.isfinite(fits["log_evidence"].astype(float)).any() \
        else "elbo"
    columns = [("observer group", "observer"), ("subgroups", "grouping")]
    if fits["parameterisation"].nunique() > 1:
        columns.append(("parameterisation", "parameterisation"))
    if method is not None and method.nunique() > 1:
        columns.append(("method", "_method"))
    columns += [("status", "_status"), ("log p(y)" if score == "log_evidence" else "ELBO", score)]
    columns += [(title, c) for c, title in DIAGNOSTICS
                if c in fits and np.isfinite(pd.to_numeric(fits[c], errors="coerce")).any()]
    columns += [("seconds", "seconds")] if "seconds" in fits else []
    table = fits.assign(_method=method if method is not None else "",
                        _status=np.where(fits["converged"].astype(bool), "trusted", "NOT trusted"))
    head = "".join(f"<th>{e(title)}</th>" for title, _ in columns)
    body = []
    for _, r in table.iterrows():
        cells = "".join(f"<td class='text'>{ctx.named(r[c])}</td>" if c == "observer" else
                        # one decimal: log evidences of close parameterisations differ in it
                        f"<td>{_num(r[c]) if abs(r[c]) >= 999.5 or not np.isfinite(r[c]) else f'{r[c]:.1f}'}</td>"
                        if c == score else
                        f"<td{'' if _is_number(r[c]) else ' class=text'}>{e(_num(r[c]))}</td>" for _, c in columns)
        body.append(f"<tr{'' if r['converged'] else ' class=bad'}>{cells}</tr>")
    notes = []
    groups = table.groupby("_method", sort=False) if method is not None else [("", table)]
    for name, rows in groups:
        texts = [str(t) for t in rows.get("convergence", pd.Series(dtype=str)).dropna()]
        if not texts:
            continue
        shared = _shared_sentences(texts)
        notes.append(f"<p class='note'><b>{e(name)}</b>: {e(shared)}</p>")
        for _, r in rows[~rows["converged"].astype(bool)].iterrows():
            notes.append(f"<p class='note'>Not trusted, {ctx.named(r['observer'])} ({e(str(r['grouping']))}): "
                         f"{e(str(r.get('convergence', ''))[len(shared) if len(texts) > 1 else 0:].strip())}</p>")
    explained = ("How each fit was judged (the numbers in the table are what it was judged by; "
                 "<code>fit_diagnostics.csv</code> has every row's full note):")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + (f"<p class='note'>{explained}</p>" + "".join(notes) if notes else ""))


def _shared_sentences(texts) -> str:
    """The explanation every fit of a method shares: their common prefix, cut back to a whole sentence or
    clause (what follows is each fit's own numbers, which the table shows)."""
    if len(texts) == 1:
        return texts[0]
    prefix = texts[0]
    for text in texts[1:]:
        while not text.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind(". "), prefix.rfind(": "))
    return prefix[:cut + 1].rstrip(":") + "." if cut > 0 else ""


def _figure_html(stem, caption, uri) -> str:
    return (f"<figure id='{html.escape(stem, quote=True)}'><img src='{uri}' alt='{html.escape(stem, quote=True)}'>"
            f"<figcaption><b>{html.escape(stem)}.</b> {html.escape(caption)}</figcaption></figure>")


def _table_html(table: pd.DataFrame, bad=None) -> str:
    if table.empty:
        return "<p>(empty)</p>"
    bad = np.zeros(len(table), bool) if bad is None else np.asarray(bad, bool)
    # <wbr>: long column names may break after an underscore instead of widening the table
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in table.columns)
    body = []
    for flag, row in zip(bad, table.itertuples(index=False)):
        cells = "".join(f"<td{'' if _is_number(v) else ' class=text'}>{html.escape(_num(v))}</td>" for v in row)
        body.append(f"<tr{' class=bad' if flag else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _selection_html(fit_table) -> str:
    e = html.escape
    params = list(dict.fromkeys(fit_table["parameterisation"].astype(str)))
    head = "<th>observer</th><th>grouping</th>" + "".join(f"<th>{e(p)}</th>" for p in params)
    body = []
    for (observer, grouping), fits in fit_table.groupby(["observer", "grouping"], sort=False):
        cells = []
        for p in params:
            match = fits[fits["parameterisation"].astype(str) == p]
            if match.empty:
                cells.append("<td>–</td>")
                continue
            r = match.iloc[0]
            chosen = bool(r.get("selected", False))
            mark = " ✓ selected" if chosen else ""
            score = r.get("log_evidence", np.nan)
            score = score if np.isfinite(score) else r["elbo"]
            cells.append(f"<td{' class=selected' if chosen else ''}>{e(_num(score))}{mark}</td>")
        body.append(f"<tr><td class=text>{e(str(observer))}</td><td class=text>{e(str(grouping))}</td>"
                    f"{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
