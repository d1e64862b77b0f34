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
         "savefig.dpi": 150, "figure.dpi": 100}
VALUE_FONT = 7  # the P(gamma>0) / p-value rows above panels
ROW_STEP = 10  # points between those rows


def write(study, tables: dict, fit_table: pd.DataFrame, folder: Path) -> list[str]:
    """Write the figures in every requested format and, if asked, report.html; return their names."""
    folder = Path(folder)
    formats = tuple(study.spec.outputs.figures)
    want_report = bool(study.spec.outputs.report)
    ctx = _Context(study, tables, fit_table if fit_table is not None else pd.DataFrame())
    written, embedded = [], []
    with plt.rc_context(STYLE):
        for stem, caption, draw in _figures(ctx):
            fig = draw()
            png = _png(fig) if want_report or "png" in formats else None  # rendered once, saved and embedded
            for fmt in formats:
                if fmt == "png":
                    (folder / f"{stem}.png").write_bytes(png)
                else:
                    fig.savefig(folder / f"{stem}.{fmt}", format=fmt)
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

    def __init__(self, study, tables, fit_table):
        self.study = study
        self.fit_table = fit_table
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
    """3 significant digits, but ELBOs (large) keep a decimal so close parameterisations stay distinguishable."""
    if x is None or x is pd.NA or (isinstance(x, (float, np.floating)) and math.isnan(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x)


def _pshort(p) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "<.001" if p < 0.001 else f"{p:.2g}".replace("0.", ".", 1)


def _mpl(text) -> str:
    """Matplotlib reads $...$ as mathtext; user-supplied names must stay literal."""
    return str(text).replace("$", r"\$")


def _pretty(name) -> str:
    return _mpl(str(name).replace("_", " "))


def _slug(name) -> str:
    return re.sub(r"[^\w.+-]+", "_", str(name))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- figures

def _panel_caption(ctx, subgroup) -> str:
    observed = not ctx.rows("class_separability_observed", subgroup=subgroup).empty
    return (
        "Left: predictive confidence, posterior mean ± sd of γ (0 at the reference severity by definition); "
        f"numbers above: P(γ > 0 | data) per severity (small = {ctx.perturbation} lowers confidence; not a p-value). "
        f"Right: class separability, KS statistic between predictions on {ctx.study.cases.positive_label} cases "
        "of the subgroup and on all other cases, mean ± sd across observers; numbers above: one-tailed KS-test "
        "p-values against the reference severity (small = lower separability). Bold where below α/2 = "
        f"{ctx.alpha / 2:g}, that is where the finding is 'lowered'."
        + (" Italic rows and dashed lines: observed (not modelled) predictions." if observed else ""))


def _figures(ctx):
    """(file stem, caption, draw function) for every figure the tables support."""
    out = []
    for subgroup in ctx.split:
        if _has_panels(ctx, subgroup):
            out.append((f"fig4_{_slug(subgroup)}", f"Fig. 4 layout, {subgroup}. {_panel_caption(ctx, subgroup)}",
                        lambda s=subgroup: _two_panels(ctx, s, _pretty(s))))
    if ctx.merged and _has_panels(ctx, ctx.merged):
        title = "merged: " + _pretty(ctx.merged.replace("+", " + "))
        out.append(("fig6_merged", f"Fig. 6 layout, merged subgroup {ctx.merged} (Simpson's-paradox check). "
                    f"{_panel_caption(ctx, ctx.merged)}", lambda: _two_panels(ctx, ctx.merged, title)))
    if any(not ctx.rows("roi_separability", subgroup=s).empty for s in ctx.split):
        out.append(("fig5_roi", "Fig. 5 layout: class separability of observed predictions when only the ROI "
                    "interior, only its exterior, or the entire image is perturbed; mean ± sd of the KS statistic; "
                    "one KS statistic per network seed (ROI regions: averaged over annotators); numbers above: "
                    "one-tailed KS-test p-values against the reference severity, bold where below α/2 = "
                    f"{ctx.alpha / 2:g} (finding 'lowered').",
                    lambda: _roi_figure(ctx)))
    if getattr(ctx.study, "calibration", None) is not None:
        out.append(("fig_reliability", "Reliability of the calibrated observers on the test cases at the reference "
                    f"severity ({ctx.sev(ctx.severities[0])}), every reader pooled: observed frequency of "
                    f"{ctx.study.cases.positive_label} cases against the mean predicted probability per equal-width "
                    "bin (marker area: cases in the bin), before and after calibration; the diagonal is perfect "
                    "calibration. ECE: class-wise expected calibration error, mean over readers.",
                    lambda: _reliability_figure(ctx)))
    traces = _traces(ctx.study)
    if traces:
        out.append(("fit_elbo", "ELBO per iteration of every latent-model fit that records one; red dashed "
                    "panels did not converge.", lambda: _elbo_figure(ctx, traces)))
    return out


def _has_panels(ctx, subgroup) -> bool:
    return any(not ctx.rows(t, subgroup=subgroup).empty for t in ("predictive_confidence", "class_separability",
                                                                    "class_separability_observed"))


def _two_panels(ctx, subgroup, title):
    panels = [p for p, tables in (("confidence", ("predictive_confidence",)),
                                  ("separability", ("class_separability", "class_separability_observed")))
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
    """Same title height on every panel, so the axes line up whatever the number of value rows."""
    rows = max((n for _, n in titles), default=0)
    for ax, (title, _) in zip(axes, titles):
        ax.set_title(title, pad=8 + ROW_STEP * rows)


def _legend(fig, handles, labels):
    ncols = len(labels) if len(labels) <= 5 else math.ceil(len(labels) / 2)
    fig.legend(handles, labels, loc="outside lower center", ncols=max(ncols, 1), frameon=False)


def _severity_axis(ax, ctx):
    ax.set_xticks(range(len(ctx.severities)), [_mpl(s) for s in ctx.severities])
    ax.set_xlim(-0.5, len(ctx.severities) - 0.5)
    ax.set_xlabel(_mpl(f"severity ({ctx.unit})" if ctx.unit else "severity"))


def _value_rows(ax, ctx, rows):
    """Rows of per-severity numbers above the axes, one per line drawn, in the line's colour."""
    for i, (colour, italic, xs, values) in enumerate(rows):
        for x, value in zip(xs, values):
            ax.annotate(_pshort(value), xy=(x, 1), xycoords=("data", "axes fraction"),
                        xytext=(0, 4 + ROW_STEP * (len(rows) - 1 - i)), textcoords="offset points",
                        ha="center", va="bottom", fontsize=VALUE_FONT, color=colour,
                        style="italic" if italic else "normal",
                        # bold = the finding is "lowered"
                        fontweight="bold" if np.isfinite(value) and value < ctx.alpha / 2 else "normal")


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
                    label=_pretty(observer))
        rows.append((ctx.colour[observer], False, x[1:], t["p_gamma_gt0"].to_numpy(float)))
    ax.axhline(0, color="0.6", lw=0.8, zorder=0)
    _severity_axis(ax, ctx)
    ax.set_ylabel("posterior mean of γ (logit scale)")
    _value_rows(ax, ctx, rows)
    return "Predictive confidence\nP(γ > 0 | data)", len(rows)


def _separability_panel(ax, ctx, subgroup):
    lines = []
    for table, observed in (("class_separability", False), ("class_separability_observed", True)):
        for observer in ctx.colour:
            t = ctx.rows(table, observer=observer, subgroup=subgroup)
            if not t.empty:
                lines.append((observer, observed, t))
    rows = []
    for i, (observer, observed, t) in enumerate(lines):
        x = t["_x"].to_numpy(float) + _dodge(i, len(lines))
        ax.errorbar(x, t["ks_mean"], yerr=t["ks_sd"], color=ctx.colour[observer], marker="s" if observed else "o",
                    ms=4, capsize=2.5, lw=1.6, ls="--" if observed else "-", mfc="white" if observed else None,
                    label=_pretty(observer) + (" (observed)" if observed else ""))
        rows.append((ctx.colour[observer], observed, x, t["ks_pvalue"].to_numpy(float)))
    _severity_axis(ax, ctx)
    ax.set_ylabel("KS statistic (mean ± sd across observers)")
    _value_rows(ax, ctx, rows)
    return "Class separability\none-tailed KS test p-value", len(rows)


def _roi_figure(ctx):
    subgroups = [s for s in ctx.split if not ctx.rows("roi_separability", subgroup=s).empty]
    fig, axes = plt.subplots(1, len(subgroups), figsize=(5.6 * len(subgroups), 4.6), constrained_layout=True,
                             squeeze=False, sharey=True)
    titles = []
    for ax, subgroup in zip(axes[0], subgroups):
        t_all = ctx.rows("roi_separability", subgroup=subgroup)
        observers = list(dict.fromkeys(t_all["observer"].astype(str)))
        regions = [r for r in REGIONS if r in set(t_all["region"])] + sorted(set(t_all["region"]) - set(REGIONS))
        keys = [(o, r) for o in observers for r in regions]
        rows = []
        for i, (observer, region) in enumerate(keys):
            t = t_all[(t_all["observer"].astype(str) == observer) & (t_all["region"] == region)]
            if t.empty:
                continue
            name, colour = REGIONS.get(region, (region, PALETTE[(len(REGIONS) + i) % len(PALETTE)]))
            label = _pretty(name) if len(observers) == 1 else f"{_pretty(observer)}, {_pretty(name)}"
            x = t["_x"].to_numpy(float) + _dodge(i, len(keys))
            ax.errorbar(x, t["ks_mean"], yerr=t["ks_sd"], color=colour, marker="o", ms=4, capsize=2.5, lw=1.6,
                        ls=("-", "--", ":", "-.")[observers.index(observer) % 4], label=label)
            rows.append((colour, False, x, t["ks_pvalue"].to_numpy(float)))
        _severity_axis(ax, ctx)
        _value_rows(ax, ctx, rows)
        titles.append((_pretty(subgroup), len(rows)))
    _titles(axes[0], titles)
    axes[0][0].set_ylabel("KS statistic (mean ± sd)")
    _legend(fig, *axes[0][0].get_legend_handles_labels())
    fig.suptitle(f"Class separability with {_mpl(ctx.perturbation)} restricted to regions", fontweight="bold")
    return fig


def _reliability_figure(ctx):
    from .calibration import reliability

    calibration = ctx.study.calibration
    observers = list(calibration.before)
    table = ctx.tables.get("calibration", pd.DataFrame())
    bins = ctx.study.spec.calibration.bins
    fig, axes = plt.subplots(1, len(observers), figsize=(4.4 * len(observers), 4.6), constrained_layout=True,
                             squeeze=False)
    for ax, observer in zip(axes[0], observers):
        rows = table[table["observer"].astype(str) == observer] if len(table) else table
        for key, values, colour, style in (("before", calibration.before[observer], "#D55E00", "--"),
                                           ("after", ctx.study.observers[observer].values, "#0072B2", "-")):
            reference = values[:, 0, :]
            positive = np.broadcast_to(ctx.study.cases.positive, reference.shape)
            seen = np.isfinite(reference)
            r = reliability(reference[seen], positive[seen], bins)
            filled = r.counts > 0
            ece = rows[f"ece_test_{key}"].mean() if len(rows) else np.nan
            ax.plot(r.confidence[filled], r.frequency[filled], color=colour, ls=style, lw=1.4,
                    label=f"{key} (ECE {_ece(ece)})")
            ax.scatter(r.confidence[filled], r.frequency[filled], s=12 + 60 * r.counts[filled] / r.counts.max(),
                       color=colour, zorder=3, alpha=0.8)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, zorder=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("mean predicted probability")
        ax.set_title(_pretty(observer))
        ax.legend(loc="upper left", frameon=False)
    axes[0][0].set_ylabel(_mpl(f"observed frequency of {ctx.study.cases.positive_label} cases"))
    fig.suptitle("Calibration on the test cases", fontweight="bold")
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

def _where(ctx, labels) -> str:
    """'at every severity', 'from 1 mm on' when the severities are a tail of the ordered list, else 'at ...'."""
    labels = list(labels)
    later = list(ctx.severities[1:])
    if labels == later and len(labels) > 1:
        return "at every severity"
    if labels and labels == later[len(later) - len(labels):] and len(labels) > 1:
        return f"from {ctx.sev(labels[0])} on"
    return "at " + _join([ctx.sev(s) for s in labels])


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _n_observers(ctx, observer) -> str:
    group = ctx.study.observers.get(observer)
    return f"{len(group.readers)} observers" if group is not None else "this number of observers"


def _at(t, found) -> list:
    return t["severity"][t["finding"] == found].tolist()


def _finding_text(ctx, t, what, evidence, n) -> str:
    """What the perturbation does to `what`, read from the rows' `finding` column alone (findings.finding),
    so no sentence can disagree with the tables; evidence[finding] is a parenthesis backing it."""
    clauses = []
    for found, verb in ((LOWERED, "lowers {}"), (RAISED, "raises {}"), (UNCHANGED, "leaves {} unchanged"),
                        (NO_CHANGE, "makes no detectable change to {}")):
        if _at(t, found):
            clauses.append(f"{verb.format('it' if clauses else what)} {_where(ctx, _at(t, found))}"
                           f"{evidence.get(found, '')}")
    out = [f"{ctx.perturbation} {_join(clauses)}"] if clauses else []
    undetectable = _at(t, UNDETECTABLE)
    if undetectable:
        where = _where(ctx, undetectable)
        where = "" if where == "at every severity" else f" {where}"
        out.append(f"an effect of {ctx.perturbation} on {what}{where} cannot be detected with {n}"
                   f"{evidence.get(UNDETECTABLE, '')}")
    return "; ".join(out) if out else f"{what} cannot be judged (no findings)"


def _confidence_sentences(ctx) -> list:
    a2 = ctx.alpha / 2
    out = []
    for subgroup in ctx.split + ((ctx.merged,) if ctx.merged else ()):
        for observer in ctx.colour:
            t = ctx.rows("predictive_confidence", observer=observer, subgroup=subgroup)
            if t.empty:
                continue
            last = t.iloc[-1]
            at_last = f"γ at {ctx.sev(last['severity'])} = {_num(last['gamma_mean'])} ± {_num(last['gamma_sd'])}"
            evidence = {LOWERED: f" (P(γ>0) < {a2:g})", RAISED: f" (P(γ>0) > {1 - a2:g})",
                        NO_CHANGE: f" ({a2:g} ≤ P(γ>0) ≤ {1 - a2:g})"}
            if _at(t, UNCHANGED):
                evidence[UNCHANGED] = (f" (|γ| < {ctx.study.spec.analyses.margins.gamma:g} with posterior "
                                       f"probability ≥ {1 - ctx.alpha:g})")
            text = _finding_text(ctx, t, "predictive confidence", evidence, _n_observers(ctx, observer))
            out.append((f"{observer}, {subgroup}: {text}; {at_last}.", (observer, ctx.grouping_of(subgroup)) in
                        ctx.unreliable))
    return out


def _separability_text(ctx, t, what, n) -> str:
    a2 = ctx.alpha / 2
    first, last = t.iloc[0], t.iloc[-1]
    span = (f"KS {_num(first['ks_mean'])} ± {_num(first['ks_sd'])} at {ctx.sev(first['severity'])}, "
            f"{_num(last['ks_mean'])} ± {_num(last['ks_sd'])} at {ctx.sev(last['severity'])}")
    floor = t["ks_pvalue_floor"].min()
    evidence = {LOWERED: f" (one-tailed KS p < {a2:g})", RAISED: f" (one-tailed KS p for a rise < {a2:g})",
                NO_CHANGE: f" (both one-tailed KS p ≥ {a2:g})",
                UNDETECTABLE: f" (a one-tailed KS test across {n} cannot give a p-value below {_num(floor)}, "
                              f"and a finding needs one below α/2 = {a2:g})"}
    return f"{_finding_text(ctx, t, what, evidence, n)}; {span}"


def _bayesian_separability_text(ctx, t, what, n) -> str:
    a2 = ctx.alpha / 2
    first, last = t.iloc[0], t.iloc[-1]
    span = (f"mean KS {_num(first['ks_mean'])} ± {_num(first['ks_sd'])} at {ctx.sev(first['severity'])}, "
            f"{_num(last['ks_mean'])} ± {_num(last['ks_sd'])} at {ctx.sev(last['severity'])} (posterior mean ± sd)")
    evidence = {LOWERED: f" (P(Δ ≥ 0) < {a2:g}, Δ the change of the mean KS from the reference)",
                RAISED: f" (P(Δ ≤ 0) < {a2:g})",
                UNCHANGED: f" (|Δ| < {ctx.study.spec.analyses.margins.ks:g} with posterior probability ≥ "
                           f"{1 - ctx.alpha:g})",
                NO_CHANGE: " (neither direction credible, nor within the margin)"}
    return f"{_finding_text(ctx, t, what, evidence, n)}; {span}"


def _changes(ctx, t) -> str:
    """Where the rows' findings say the perturbation changed it: for comparing two tables."""
    parts = [f"{found} {_where(ctx, _at(t, found))}" for found in CHANGED if _at(t, found)]
    return _join(parts) if parts else "not detectably changed"


def _separability_sentences(ctx) -> list:
    out = []
    # The modelled separability is stated from its posterior (bayesian_separability) where that analysis
    # ran; the published posterior-predictive KS test is then kept in the tables and figures, for
    # reproducing the papers, but stated nowhere, so no two sentences judge the same thing differently.
    bayesian = "bayesian_separability" in ctx.tables
    for subgroup in ctx.split + ((ctx.merged,) if ctx.merged else ()):
        for observer in ctx.colour:
            modelled = ctx.rows("bayesian_separability" if bayesian else "class_separability", observer=observer,
                                subgroup=subgroup)
            observed = ctx.rows("class_separability_observed", observer=observer, subgroup=subgroup)
            shaky = (observer, ctx.grouping_of(subgroup)) in ctx.unreliable
            n = _n_observers(ctx, observer)
            if not modelled.empty:
                what = ("posterior-predictive " if not observed.empty else "") + "class separability"
                text = (_bayesian_separability_text if bayesian else _separability_text)(ctx, modelled, what, n)
                out.append((f"{observer}, {subgroup}: {text}.", shaky))
            if not observed.empty:
                text = _separability_text(ctx, observed, "class separability of the observed predictions", n)
                out.append((f"{observer}, {subgroup}: {text}.", False))
            if not modelled.empty and not observed.empty:
                a, b = _changes(ctx, modelled), _changes(ctx, observed)
                if a != b:
                    out.append((f"{observer}, {subgroup}: the posterior-predictive and the observed predictions "
                                f"disagree: separability is {a} in the posterior-predictive and {b} in the "
                                "observed predictions; the latent model may not capture this observer's "
                                "separability, so read both.", shaky))
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
                    out.append((f"{observer}, {subgroup}, perturbing the {name}: {text}.", False))
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
        merged, split = (FINDING_WORDS.get(r[c], str(r[c])) for c in ("merged_finding", "split_finding"))
        shaky = any((str(r["observer"]), g) in ctx.unreliable for g in ("split", "merged"))
        where = f" (at {r['severities']} {ctx.unit})".replace(" )", ")") if str(r.get("severities", "")) else ""
        out.append((f"{r['observer']}, {what}: with {r['merged_subgroup']} merged into one subgroup it looks "
                    f"{merged}, but {r['subgroup']} alone is {split}{where}: Simpson's paradox.", shaky))
    if not out:
        out.append((f"No Simpson's paradox at α = {ctx.alpha:g}: no subgroup credibly lacks (or reverses) an effect "
                    "the merged analysis shows.", False))
    # What a flag and its absence are worth, measured by benchmarks/simpsons_calibration.py.
    out.append(("How far to trust this check: a flag is wrong in at most α of studies whose subgroups share one "
                "effect; of simulated studies of the published radiologist size with a real paradox it flags about "
                "96 % on predictive confidence but only about half on class separability, so no flag on class "
                "separability is weak evidence that there is no paradox.", False))
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
        if not (np.isfinite(before) and np.isfinite(after)):
            text = f"{observer}'s calibration cannot be judged: the test cases lack one of the classes"
        elif _ece(after) == _ece(before):
            text = f"Calibration left {observer}'s class-wise ECE on the test cases unchanged at {_ece(before)}"
        else:
            verb = "lowered" if after < before else "raised"
            text = (f"Calibration {verb} {observer}'s class-wise ECE on the test cases from {_ece(before)} to "
                    f"{_ece(after)}")
        out.append((f"{text} (mean over {over}; {n} validation cases).", False))
    return out


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.summary{color:#444}
.warning{border:2px solid #C62828;background:#FDECEA;padding:.8em 1.2em;border-radius:6px;margin:1em 0}
.warning h3{margin:.1em 0 .4em;color:#C62828}
.ok{border-left:4px solid #2E7D32;padding:.3em .8em;background:#EEF7EE}
.unreliable{color:#C62828;font-weight:600}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.text{text-align:left}tr.bad td{background:#FDECEA}td.selected{font-weight:700;background:#EEF7EE}
figure{margin:1.5em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#444}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""


def _html(ctx, figures) -> str:
    e = html.escape
    study, fit_table, failed = ctx.study, ctx.fit_table, ctx.failed

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(study.spec.study.name)} — "
             f"perceptcore report</title><style>{CSS}</style></head><body>",
             f"<h1>{e(study.spec.study.name)}</h1>", f"<p class='summary'>{e(_summary(ctx, fit_table))}</p>"]
    if len(failed):
        items = "".join(f"<li><b>{e(str(r['observer']))}</b> ({e(str(r['grouping']))} subgroups, "
                        f"{e(str(r['parameterisation']))}): {e(str(r.get('convergence', '')))}</li>"
                        for _, r in failed.iterrows())
        parts.append(f"<div class='warning'><h3>⚠ {len(failed)} of {len(fit_table)} latent-model fits did not "
                     f"converge or failed their own accuracy diagnostic</h3><ul>{items}</ul><p>Findings that depend on these fits (predictive confidence and "
                     "posterior-predictive class separability of these observers, and the Simpson's-paradox check "
                     "built on them) are <b>unreliable</b>; they are marked below.</p></div>")
    elif len(fit_table):
        parts.append(f"<p class='ok'>All {len(fit_table)} latent-model fits passed their accuracy diagnostic "
                     "(see Fit diagnostics).</p>")

    parts.append(f"<h2>Findings</h2><p>Two-sided at α = {ctx.alpha:g}: each direction at α/2 = "
                 f"{ctx.alpha / 2:g}. Predictive confidence is lowered where P(γ &gt; 0 | data) &lt; α/2, raised "
                 "where it is &gt; 1 − α/2, and unchanged where |γ| is within the equivalence margin with posterior "
                 "probability ≥ 1 − α; "
                 + ("the latent model's class separability is judged the same way on the posterior of its change "
                    "Δ (table <code>bayesian_separability</code>; the published posterior-predictive KS test stays "
                    "in <code>class_separability</code>, for reproduction); " if "bayesian_separability" in ctx.tables
                    else "")
                 + "the separability of observed predictions (and of the latent model's, without a posterior "
                 "analysis) is lowered or raised where the one-tailed KS test against the reference "
                 "severity in that direction gives p &lt; α/2. Where the number of observers cannot give a KS "
                 "p-value that small, a change cannot be detected, and the report says so. The tables' "
                 "<code>finding</code> column holds the same findings.</p>")
    for heading, sentences in (("Predictive confidence", _confidence_sentences(ctx)),
                               ("Class separability", _separability_sentences(ctx)),
                               ("Regions of interest", _roi_sentences(ctx)),
                               ("Simpson's paradox", _simpson_sentences(ctx)),
                               ("Calibration", _calibration_sentences(ctx))):
        if sentences:
            items = "".join(f"<li>{e(text)}" + (" <span class='unreliable'>(unreliable: a fit did not converge)"
                                                 "</span>" if shaky else "") + "</li>" for text, shaky in sentences)
            parts.append(f"<h3>{e(heading)}</h3><ul>{items}</ul>")

    elbo = [f for f in figures if f[0] == "fit_elbo"]
    figures = [f for f in figures if f[0] != "fit_elbo"]
    if figures:
        parts.append("<h2>Figures</h2>" + "".join(_figure_html(*f) for f in figures))
    parts.append("<h2>Tables</h2>")
    for name, table in ctx.tables.items():
        parts.append(f"<details open><summary>{e(name)} ({len(table)} rows)</summary>{_table_html(table)}</details>")
    parts.append("<h2>Fit diagnostics</h2>")
    if len(fit_table):
        parts.append(_table_html(fit_table, bad=~fit_table["converged"].astype(bool) if "converged" in fit_table
                                 else None))
    else:
        parts.append("<p>No latent model was fitted.</p>")
    parts += [_figure_html(*f) for f in elbo]
    if len(fit_table) and "elbo" in fit_table:
        parts.append("<h3>Model selection</h3><p>log p(y) per parameterisation (the importance-sampling estimate; "
                     "the ELBO, a lower bound, for variational methods); the selected one (highest) is bold.</p>"
                     + _selection_html(fit_table))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(ctx, fit_table) -> str:
    study = ctx.study
    observers = ", ".join(f"{name} ({len(group.readers)} observers, {'dense' if group.dense else 'sparse'})"
                          for name, group in study.observers.items())
    positive = np.asarray(study.cases.positive, bool)
    text = (f"{len(positive)} cases ({int(positive.sum())} {study.cases.positive_label}); observer groups: "
            f"{observers}; severities: {', '.join(ctx.severities)} {ctx.unit}. ")
    if len(fit_table):
        def listed(column):
            return ", ".join(dict.fromkeys(fit_table[column].astype(str))) if column in fit_table else "?"
        selected = fit_table[fit_table["selected"].astype(bool)] if "selected" in fit_table else fit_table
        text += (f"Latent model fitted with backend {listed('backend')}, method {listed('method')}, "
                 f"parameterisation(s) {listed('parameterisation')} (selected: "
                 f"{', '.join(dict.fromkeys(selected['parameterisation'].astype(str)))}), "
                 f"seed {study.spec.fit_seed}.")
    else:
        text += f"No latent model was fitted (seed {study.spec.fit_seed})."
    calibration = getattr(study, "calibration", None)
    if calibration is not None:
        text += (f" A further {calibration.n_validation} cases were held out to calibrate "
                 f"{_join(list(calibration.before))} and are left out of every analysis.")
    return text


def _figure_html(stem, caption, uri) -> str:
    return (f"<figure><img src='{uri}' alt='{html.escape(stem, quote=True)}'>"
            f"<figcaption><b>{html.escape(stem)}.</b> {html.escape(caption)}</figcaption></figure>")


def _table_html(table: pd.DataFrame, bad=None) -> str:
    if table.empty:
        return "<p>(empty)</p>"
    bad = np.zeros(len(table), bool) if bad is None else np.asarray(bad, bool)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
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
