"""report.write on synthetic tables and a stand-in study: files, self-containment, warnings, findings, escaping."""

from __future__ import annotations

import html
import math
import re
from types import SimpleNamespace

import matplotlib.pyplot as plt
import matplotlib.text
import numpy as np
from scipy import stats
import pandas as pd

from perceptcore import report
from perceptcore.findings import finding

SEVERITIES = ("0", "0.5", "1", "4")
SPLIT = ("microcalcifications", "soft_tissue_lesions")
MERGED = "microcalcifications+soft_tissue_lesions"
HOSTILE = "<script>alert('x')</script> $\\alpha$ & co"


def make_study(observers=("radiologists", "dnn"), formats=("png",), report_html=True,
               converged=True, alpha=0.05, readers=5):
    groupings = [SimpleNamespace(name="split", analysed=SPLIT), SimpleNamespace(name="merged", analysed=(MERGED,))]
    trace = np.column_stack([np.arange(1, 201) * 10, -5000 + 4000 * (1 - np.exp(-np.arange(200) / 30))])
    fits = {}
    for o in observers:
        for g in ("split", "merged"):
            ok = converged or o != observers[0] or g != "split"
            fits[(o, g, "random_walk")] = SimpleNamespace(elbo_trace=trace, converged=ok, backend="torch",
                                                          method="advi")
    return SimpleNamespace(
        spec=SimpleNamespace(study=SimpleNamespace(name="synthetic <study>"), fit_seed=7,
                             model=SimpleNamespace(case_effects="by_class"),
                             severities=SimpleNamespace(unit="mm", perturbation="low-pass filtering"),
                             analyses=SimpleNamespace(margins=SimpleNamespace(gamma=0.5, ks=0.05)),
                             outputs=SimpleNamespace(figures=formats, report=report_html)),
        severities=SEVERITIES, alpha=alpha,
        observers={o: SimpleNamespace(readers=tuple(f"r{i}" for i in range(readers)), dense=(o != "radiologists"))
                   for o in observers},
        cases=SimpleNamespace(positive=np.array([True, False, False, True]), positive_label="malignant"),
        subgroup=np.array(list(SPLIT) * 2),
        groupings=groupings, grouping=lambda name: next(g for g in groupings if g.name == name),
        fits=lambda: fits,
    )


def with_findings(tables, alpha=0.05):
    """The finding column of every table, by the one rule, from the table's own numbers."""
    pc = tables["predictive_confidence"]
    pc["finding"] = [finding(p, 1 - p, alpha, p_outside_margin=m) for p, m in zip(pc.p_gamma_gt0, pc.p_outside_margin)]
    for name in ("class_separability", "class_separability_observed", "roi_separability"):
        t = tables[name]
        t["finding"] = [None if np.isnan(p) else finding(p, r, alpha, p_floor=f)
                        for p, r, f in zip(t.ks_pvalue, t.ks_pvalue_raised, t.ks_pvalue_floor)]
    return tables


def make_tables(observers=("radiologists", "dnn"), p_gamma=0.01, ks_p=0.01, observed_p=None, readers=5,
                p_outside_margin=np.nan, alpha=0.05):
    """Every observer x subgroup gets the same numbers; p values apply to every severity after the reference.

    The KS p-value floor is that of `readers` observers per side: 1 / C(2n, n)."""
    floor = 1 / math.comb(2 * readers, readers)

    def ks(p):
        return (np.nan, np.nan, np.nan) if np.isnan(p) else (p, 1 - p, floor)

    pc, cs, obs, roi, simpson = [], [], [], [], []
    for o in observers:
        for sub in SPLIT + (MERGED,):
            for i, s in enumerate(SEVERITIES):
                if i:
                    pc.append((o, sub, s, -0.7 * i, 0.2, p_gamma, p_outside_margin))
                cs.append((o, sub, s, 0.6 - 0.05 * i, 0.03, *ks(np.nan if i == 0 else ks_p)))
                if o != "radiologists" and observed_p is not None:
                    obs.append((o, sub, s, 0.55 - 0.08 * i, 0.02, *ks(np.nan if i == 0 else observed_p)))
        simpson.append((o, "predictive_confidence", SPLIT[1], MERGED, "1, 4, mean", "unchanged", "lowered", True))
    for sub in SPLIT:
        for region in ("roi_interior", "roi_exterior", "entire_image"):
            for i, s in enumerate(SEVERITIES):
                roi.append(("dnn", sub, region, s, 0.5 - 0.04 * i, 0.05, *ks(np.nan if i == 0 else 0.2)))
    cols = ["observer", "subgroup", "severity"]
    ks_cols = ["ks_mean", "ks_sd", "ks_pvalue", "ks_pvalue_raised", "ks_pvalue_floor"]
    return with_findings({
        "predictive_confidence": pd.DataFrame(pc, columns=cols + ["gamma_mean", "gamma_sd", "p_gamma_gt0",
                                                                  "p_outside_margin"]),
        "class_separability": pd.DataFrame(cs, columns=cols + ks_cols),
        "class_separability_observed": pd.DataFrame(obs, columns=cols + ks_cols),
        "roi_separability": pd.DataFrame(roi, columns=["observer", "subgroup", "region", "severity"] + ks_cols),
        "simpsons_paradox": pd.DataFrame(simpson, columns=["observer", "analysis", "subgroup", "merged_subgroup",
                                                           "severities", "split_finding", "merged_finding",
                                                           "differs"]),
    }, alpha)


def fit_table(study):
    rows = [{"observer": o, "grouping": g, "parameterisation": p, "backend": f.backend, "method": f.method,
             "elbo": -1234.5, "selected": True, "converged": f.converged,
             "convergence": "relative ELBO change < 1e-4 over 500 iterations" if f.converged else "hit max_iterations",
             "seconds": 1.25} for (o, g, p), f in study.fits().items()]
    return pd.DataFrame(rows)


def run(tmp_path, study=None, tables=None):
    study = study or make_study()
    tables = make_tables() if tables is None else tables
    files = report.write(study, tables, fit_table(study), tmp_path)
    page = (tmp_path / "report.html").read_text() if (tmp_path / "report.html").exists() else None
    return files, page


def section(page, key):
    """A section of the report (by its id) as plain text."""
    part = page.split(f"<h2 id='{key}'>")[1].split("<h2")[0]
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", part)))


def findings(page):
    """The detailed findings as plain text."""
    return section(page, "details")


def test_writes_every_requested_format(tmp_path):
    files, _ = run(tmp_path, make_study(formats=("png", "svg", "pdf")))
    stems = ["fig4_microcalcifications", "fig4_soft_tissue_lesions", "fig6_merged", "fig5_roi", "fit_elbo"]
    assert sorted(files) == sorted([f"{s}.{fmt}" for s in stems for fmt in ("png", "svg", "pdf")] + ["report.html"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)


def test_only_png_and_no_report(tmp_path):
    files, page = run(tmp_path, make_study(formats=("png",), report_html=False))
    assert page is None and all(f.endswith(".png") for f in files) and "report.html" not in files


def test_report_is_self_contained(tmp_path):
    _, page = run(tmp_path, make_study(formats=("svg",)))  # PNGs are embedded even when not written
    assert 'src="http' not in page and "src='http" not in page and "<link" not in page and "<script" not in page
    sources = re.findall(r"<img src='([^']*)'", page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_nonconverged_fit_is_warned_about(tmp_path):
    _, page = run(tmp_path, make_study(converged=False))
    warning = page.split("class='warning'")[1].split("</div>")[0]
    assert "radiologists" in warning and "did not" in warning and "unreliable" in warning
    assert "unreliable: a fit did not converge" in findings(page)
    _, page = run(tmp_path, make_study(converged=True))
    assert "class='warning'" not in page


def test_confidence_finding_follows_the_numbers(tmp_path):
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.01))
    text = findings(page)
    assert ("radiologists, microcalcifications: low-pass filtering lowers predictive confidence at every severity; "
            "γ at 4 mm = -2.1 ± 0.2") in text
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.5))
    text = findings(page)
    assert ("radiologists, microcalcifications: low-pass filtering makes no detectable change to predictive "
            "confidence at every severity;") in text
    assert "lowers predictive confidence" not in text
    # two-sided: 0.04 is not below alpha / 2
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.04))
    assert "lowers predictive confidence" not in findings(page)
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.99))
    assert "radiologists, microcalcifications: low-pass filtering raises predictive confidence at every severity;" \
        in findings(page)
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.5, p_outside_margin=0.01))
    assert "radiologists, microcalcifications: low-pass filtering leaves predictive confidence unchanged at every " \
           "severity;" in findings(page)
    assert "|γ| < 0.5 with posterior probability ≥ 0.95" in section(page, "summary")  # the rule, stated once


def test_separability_finding_follows_the_numbers(tmp_path):
    _, page = run(tmp_path, tables=make_tables(ks_p=0.01))
    assert "dnn, soft-tissue lesions: low-pass filtering lowers class separability at every severity;" \
        in findings(page)
    _, page = run(tmp_path, tables=make_tables(ks_p=0.99))
    assert "dnn, soft-tissue lesions: low-pass filtering raises class separability at every severity" in findings(page)
    _, page = run(tmp_path, tables=make_tables(ks_p=0.3))
    text = findings(page)
    assert "radiologists, soft-tissue lesions: low-pass filtering makes no detectable change to class separability " \
           "at every severity; KS 0.6 ± 0.03 at 0 mm → 0.45 ± 0.03 at 4 mm" in text
    # a stricter alpha turns the same p-values into "no detectable change"
    _, page = run(tmp_path, make_study(alpha=0.001), make_tables(ks_p=0.01, alpha=0.001))
    assert "lowers class separability" not in findings(page).split("Regions of interest")[0]


def test_three_observers_cannot_detect_a_change_in_separability(tmp_path):
    # With 3 observers per side the smallest one-tailed KS p-value is 1 / C(6, 3) = 0.05 > alpha / 2.
    _, page = run(tmp_path, make_study(readers=3), make_tables(ks_p=1 / math.comb(6, 3), readers=3))
    text = findings(page)
    separability = text.split("Class separability")[1].split("Regions of interest")[0]
    assert "radiologists, microcalcifications: an effect of low-pass filtering on class separability cannot be " \
           "detected with 3 observers" in separability
    assert "no detectable" not in separability and "lowers" not in separability
    assert "no detectable effect" not in text


def test_only_some_severities_significant(tmp_path):
    tables = make_tables(ks_p=0.5)
    cs = tables["class_separability"]
    cs.loc[(cs.observer == "dnn") & (cs.subgroup == SPLIT[0]) & (cs.severity == "1"), "ks_pvalue"] = 0.01
    _, page = run(tmp_path, tables=with_findings(tables))
    assert "dnn, microcalcifications: low-pass filtering lowers class separability at 1 mm and makes no detectable " \
           "change to it at 0.5 and 4 mm;" in findings(page)


def test_observed_and_modelled_disagreement_is_reported(tmp_path):
    _, page = run(tmp_path, tables=make_tables(ks_p=0.4, observed_p=0.01))
    text = findings(page)
    assert "dnn, soft-tissue lesions: the posterior-predictive and the observed predictions disagree" in text
    assert "radiologists, soft-tissue lesions: the posterior-predictive" not in text
    _, page = run(tmp_path, tables=make_tables(ks_p=0.01, observed_p=0.01))
    assert "disagree" not in findings(page)


def test_simpsons_paradox_sentence(tmp_path):
    """The subgroup's finding at each flagged severity is its own table's, as in the summary."""
    tables = make_tables()
    pc = tables["predictive_confidence"]
    mine = (pc.observer == "radiologists") & (pc.subgroup == SPLIT[1])
    pc.loc[mine & (pc.severity == "1"), "finding"] = "unchanged"
    pc.loc[mine & (pc.severity == "4"), "finding"] = "raised"
    _, page = run(tmp_path, tables=tables)
    assert ("radiologists, predictive confidence: with microcalcifications + soft-tissue lesions merged into one "
            "subgroup it looks lowered by the perturbation, but soft-tissue lesions alone is not (raised at 4 mm, "
            "unchanged at 1 mm, unchanged or reversed on average over the perturbed severities): Simpson's "
            "paradox.") in section(page, "simpson")


def test_hostile_names_are_escaped(tmp_path):
    observers = (HOSTILE, "dnn")
    study = make_study(observers=observers, formats=("png", "pdf", "svg"), converged=False)
    files, page = run(tmp_path, study, make_tables(observers=observers))
    assert "<script>" not in page and html.escape(HOSTILE) in page
    assert "fig4_microcalcifications.pdf" in files  # "$...$" did not reach mathtext


def test_missing_tables_are_skipped(tmp_path):
    tables = {"class_separability": make_tables()["class_separability"],
              "third_party": pd.DataFrame({"observer": ["dnn"], "score": [0.123456]})}
    study = make_study(formats=("png",))
    files = report.write(study, tables, pd.DataFrame(), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "fig5_roi.png" not in files and "fig4_microcalcifications.png" in files
    assert "third_party" in page and "0.123" in page and "0.123456" not in page
    assert "No latent model was fitted" in page


def test_model_selection_marks_selected(tmp_path):
    study = make_study()
    ft = fit_table(study)
    extra = ft.assign(parameterisation="independent", elbo=-2000.0, selected=False)
    report.write(study, make_tables(), pd.concat([ft, extra], ignore_index=True), tmp_path)
    selection = (tmp_path / "report.html").read_text().split("<h3>Model selection</h3>")[1]
    assert "<th>random_walk</th><th>independent</th>" in selection
    assert "<td class=selected>-1234.5 ✓ selected</td><td>-2000.0</td>" in selection


# --------------------------------------------------------------------------- the report as a reader meets it

FINDINGS = ("lowered", "raised", "unchanged", "no detectable change", "cannot be detected")


def expected_cell_line(table, observer, subgroup, what):
    """The summary-matrix line for one table, recomputed here from the table's finding column."""
    t = table[(table.observer == observer) & (table.subgroup == subgroup)].dropna(subset=["finding"])
    order = {s: i for i, s in enumerate(SEVERITIES)}
    t = t.assign(_x=t.severity.map(order)).sort_values("_x")
    parts = [f"{found} at {', '.join(t.severity[t.finding == found])} mm" for found in FINDINGS
             if (t.finding == found).any()]
    return f"{what}: {'; '.join(parts)}"


def matrix_cells(page):
    """{(observer, subgroup): {table: line as plain text}} from the rendered summary matrix."""
    matrix = page.split("id='summary-matrix'")[1].split("</table>")[0]
    cells = {}
    for observer, subgroup, cell in re.findall(r"<td data-observer='([^']*)' data-subgroup='([^']*)'>(.*?)</td>",
                                               matrix):
        cells[html.unescape(observer), html.unescape(subgroup)] = {
            table: html.unescape(re.sub(r"<[^>]+>", "", line))
            for table, line in re.findall(r"<div data-table='([^']*)'>(.*?)</div>", cell)}
    return cells


def test_summary_matrix_agrees_with_the_tables(tmp_path):
    tables = make_tables(p_gamma=0.5, ks_p=0.3, observed_p=0.5)
    pc, cs, obs = tables["predictive_confidence"], tables["class_separability"], tables["class_separability_observed"]
    # a different finding at every severity of one cell, and a raised separability elsewhere
    for severity, p in (("0.5", 0.01), ("1", 0.99), ("4", 0.5)):
        pc.loc[(pc.observer == "dnn") & (pc.subgroup == SPLIT[1]) & (pc.severity == severity), "p_gamma_gt0"] = p
    pc.loc[(pc.observer == "dnn") & (pc.subgroup == SPLIT[1]) & (pc.severity == "4"), "p_outside_margin"] = 0.01
    cs.loc[(cs.observer == "radiologists") & (cs.subgroup == SPLIT[1]) & (cs.severity != "0"),
           ["ks_mean", "ks_pvalue", "ks_pvalue_raised"]] = (0.81, 0.99, 0.01)
    obs.loc[(obs.subgroup == MERGED) & (obs.severity == "1"), "ks_pvalue"] = 0.001
    _, page = run(tmp_path, tables=with_findings(tables))

    cells = matrix_cells(page)
    assert set(cells) == {(o, s) for o in ("radiologists", "dnn") for s in SPLIT + (MERGED,)}
    for (observer, subgroup), lines in cells.items():
        expected = {"predictive_confidence": expected_cell_line(pc, observer, subgroup, "confidence"),
                    "class_separability": expected_cell_line(cs, observer, subgroup, "separability")}
        if observer == "dnn":
            expected["class_separability_observed"] = expected_cell_line(obs, observer, subgroup,
                                                                         "observed separability")
        assert lines == expected, (observer, subgroup)
    assert cells["dnn", SPLIT[1]]["predictive_confidence"] == \
        "confidence: lowered at 0.5 mm; raised at 1 mm; unchanged at 4 mm"
    assert cells["radiologists", SPLIT[1]]["class_separability"] == "separability: raised at 0.5, 1, 4 mm"
    # and the detailed sentence says the same, never "no detectable effect"
    assert "radiologists, soft-tissue lesions: low-pass filtering raises class separability at every severity; " \
           "KS 0.6 ± 0.03 at 0 mm → 0.81 ± 0.03 at 4 mm" in findings(page)
    assert "no detectable effect" not in page
    # human names in the headers, identifiers on hover
    assert "<span title='soft_tissue_lesions'>soft-tissue lesions</span>" in page
    assert "<span title='microcalcifications+soft_tissue_lesions'>microcalcifications + soft-tissue lesions</span>" \
        in page


def test_report_leads_with_the_answer(tmp_path):
    _, page = run(tmp_path)
    order = ["summary", "simpson", "figures", "details", "tables", "diagnostics"]
    positions = [page.index(f"<h2 id='{key}'>") for key in order]
    assert positions == sorted(positions) and page.index("id='summary-matrix'") < positions[1]
    toc = page.split("<nav class='toc'>")[1].split("</nav>")[0]
    assert page.index("<nav class='toc'>") < positions[0]
    assert re.findall(r"href='#(\w+)'", toc) == order  # no models in this study: no such section
    # the rules and the Simpson's-check caveat are stated once
    assert page.count("two-sided at α = 0.05") == 1 and page.count("How far to trust this check") == 1
    assert page.count("0 at the reference severity by definition") == 3  # one per two-panel figure caption


def test_banner_says_what_data_the_study_used(tmp_path):
    _, page = run(tmp_path)
    assert "<b>Published predictions.</b>" in page and "Synthetic" not in page
    assert "case effects by class" in page  # which latent model, beside the backend and method
    study = make_study()
    study.spec.model.case_effects = "pooled"
    _, page = run(tmp_path, study)
    assert "case effects pooled" in page and "only about half on class separability" in page
    study = make_study()
    study.spec.dataset = SimpleNamespace(name="mammography_phantoms")
    study.spec.study.seed = 3
    study.spec.observers = (SimpleNamespace(name="radiologists", computed=True, model=None, trained="readers"),
                            SimpleNamespace(name="dnn", computed=True, model=None, trained="cnn"))
    study.spec.training = (SimpleNamespace(name="readers", model="cho_reader"),
                           SimpleNamespace(name="cnn", model="small_cnn"))
    study.observers = {o: SimpleNamespace(readers=("seed_0",), dense=True, values=np.full((1, 4, 4), 0.5))
                       for o in ("radiologists", "dnn")}
    _, page = run(tmp_path, study)
    banner = html.unescape(re.sub(r"<[^>]+>", "", page.split("<div class='banner'>")[1].split("</div>")[0]))
    assert banner.startswith("Synthetic data. Every case and image was generated by the dataset plugin "
                             "mammography_phantoms (seed 3); no patient is in this study.")
    assert "Every observer group is a model run on the images, simulated, not people: radiologists (cho_reader), " \
           "dnn (small_cnn)." in banner


def test_numbers_have_sensible_significant_figures():
    assert [report._num(x) for x in (1.22e-16, -3e-17, 0.0, 1e-9, -1e-5, 0.123456, 12.345, -1234.56, 999.7,
                                     np.nan, np.inf, 7, True)] == \
        ["0", "0", "0", "< 0.001", "> -0.001", "0.123", "12.3", "-1234.6", "999.7", "–", "∞", "7", "yes"]
    assert report._pm(0.5, 0.0) == report._pm(0.5, 1.22e-16) == "0.5"  # never "± 0" nor "± 1.22e-16"
    assert report._pm(-2.1, 0.2) == "-2.1 ± 0.2" and report._pm(0.3, 0.0004) == "0.3 ± 0.0004"


def test_no_floating_point_noise_in_the_page(tmp_path):
    tables = make_tables(p_gamma=1e-9)
    tables["class_separability"]["ks_sd"] = 1.22e-16  # identical KS statistics for every observer
    _, page = run(tmp_path, tables=tables)
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"data:image/png;base64,[^']*", "", page)))
    assert not re.search(r"\de-\d", text), re.search(r".{40}\de-\d.{40}", text)
    assert not re.search(r"± 0(?![.\d])", text)
    assert "KS 0.6 at 0 mm → 0.45 at 4 mm" in text and "< 0.001" in text


LONG_NOTE = ("Laplace approximation of each subgroup's shared parameters with the case effects integrated out by "
             "9-node adaptive Gauss-Hermite quadrature, corrected by Pareto-smoothed importance sampling. Judged by "
             "the Pareto k-hat of the importance weights (at most 0.7: the correction can be trusted): worst k-hat ")


def test_fit_diagnostics_table_has_short_cells_and_one_explanation(tmp_path):
    study = make_study()
    rows = fit_table(study).assign(method="laplace", elbo=np.nan, log_evidence=-374.21769,
                                   pareto_k=np.linspace(-0.3, 0.9, 4), importance_ess=756.28)
    rows["converged"] = rows["pareto_k"] <= 0.7
    rows["convergence"] = [f"{LONG_NOTE}{k:.2f}: {'trusted' if k <= 0.7 else 'not trusted'}." for k in rows.pareto_k]
    report.write(study, make_tables(), rows, tmp_path)
    page = (tmp_path / "report.html").read_text()
    part = page.split("<h2 id='diagnostics'>")[1]
    table = part.split("</table>")[0]
    cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", table)]
    assert len(cells) == 7 * (1 + len(rows)) and max(map(len, cells)) <= 16, cells
    assert "worst k̂" in cells and "-374.2" in cells and "NOT trusted" in cells and "0.9" in cells
    assert page.count("Gauss-Hermite quadrature") == 2  # once under the table, once in the warning of the bad fit
    explanation = html.unescape(part.split("</table>")[1])
    assert "the correction can be trusted)." in explanation and "worst k-hat 0.9" in explanation


def calibrated_study(n=400, seed=1):
    """A stand-in study with one calibrated, computed model observer of two readers."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.25
    before = np.clip(rng.beta(2, 2, (2, len(SEVERITIES), n)) * 0.6 + 0.4 * positive, 0, 1)  # too confident
    after = before ** 2
    study = make_study(observers=("radiologists", "dnn"))
    study.cases = SimpleNamespace(positive=positive, positive_label="malignant")
    study.observers["dnn"] = SimpleNamespace(readers=("seed_0", "seed_1"), dense=True, values=after)
    study.calibration = SimpleNamespace(before={"dnn": before}, n_validation=30)
    study.spec.calibration = SimpleNamespace(bins=10)
    study.spec.observers = (SimpleNamespace(name="dnn", computed=True, model=None, trained="cnn"),)
    study.spec.training = (SimpleNamespace(name="cnn", model="small_cnn"),)
    return study


def test_calibration_error_quoted_is_that_of_the_curve_drawn():
    study = calibrated_study()
    ctx = report._Context(study, make_tables(), fit_table(study))
    with plt.rc_context(report.STYLE):
        fig = report._reliability_figure(ctx)
    lines = {line.get_label().split(" ")[0]: line for line in fig.axes[0].get_lines()
             if line.get_label().startswith(("before", "after"))}
    for key, values in (("before", study.calibration.before["dnn"]), ("after", study.observers["dnn"].values)):
        p = values[:, 0, :].ravel()
        y = np.tile(study.cases.positive, 2).astype(float)
        index = np.minimum((p * 10).astype(int), 9)
        counts = np.bincount(index, minlength=10)
        filled = counts > 0
        frequency = np.bincount(index, y, 10)[filled] / counts[filled]
        confidence = np.bincount(index, p, 10)[filled] / counts[filled]
        line = lines[key]
        np.testing.assert_allclose(line.get_xdata(), confidence)
        np.testing.assert_allclose(line.get_ydata(), frequency)
        drawn = np.sum(counts[filled] * np.abs(line.get_ydata() - line.get_xdata())) / counts.sum()
        assert line.get_label() == f"{key} (ECE {drawn:.2f})"
    plt.close(fig)


def test_models_table_shows_each_model_on_the_test_cases(tmp_path):
    from perceptcore.stats import auc

    study = calibrated_study()
    _, page = run(tmp_path, study)
    models = page.split("<h2 id='models'>")[1].split("<h2")[0]
    rows = re.findall(r"<tr><td class='text'>(.*?)</tr>", models)
    assert len(rows) == 2
    positive = study.cases.positive
    for r, row in enumerate(rows):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        p = study.calibration.before["dnn"][r, 0]
        assert cells == ["seed_" + str(r), str(len(p)), f"{np.mean((p >= 0.5) == positive):.3g}",
                         f"{auc(p[positive], p[~positive]):.3g}", f"{p.mean():.3g}", f"{positive.mean():.3g}",
                         f"{study.observers['dnn'].values[r, 0].mean():.3g}"], cells
    assert "fig_reliability" in models and "training.csv" in models
    # models.csv holds the same numbers; AUC checked against the Mann-Whitney U statistic.
    table = report.model_table(study)
    for r, row in table.iterrows():
        p = study.calibration.before["dnn"][r, 0]
        u = stats.mannwhitneyu(p[positive], p[~positive]).statistic
        np.testing.assert_allclose(row.auc, u / (positive.sum() * (~positive).sum()))
        assert (row.observer, row.reader, row.cases) == ("dnn", f"seed_{r}", len(p))


def test_training_curves_are_drawn_when_the_log_is_given(tmp_path):
    study = make_study()
    log = pd.DataFrame([("cnn", "small_cnn", severity, f"seed_{s}", epoch, 1 / epoch + s)
                        for severity in ("unperturbed", "1") for s in range(2) for epoch in (1, 2, 3)],
                       columns=["training", "model", "severity", "reader", "epoch", "loss"])
    files = report.write(study, make_tables(), fit_table(study), tmp_path, training=log)
    assert "fig_training.png" in files
    assert "fig_training" in (tmp_path / "report.html").read_text().split("<h2 id='models'>")[1]


def test_figures_say_who_they_show_in_readable_type():
    study = make_study()
    ctx = report._Context(study, make_tables(ks_p=0.01), fit_table(study))
    with plt.rc_context(report.STYLE):
        for fig in (report._two_panels(ctx, SPLIT[1], ctx.label(SPLIT[1])), report._roi_figure(ctx)):
            texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
            assert min(t.get_fontsize() for t in texts) >= 8.5
            assert not any(re.fullmatch(r"[<.\d]+", t.get_text()) for t in texts if t.get_position()[1] > 0.99)
            plt.close(fig)
        roi = report._roi_figure(ctx)
        assert roi._suptitle.get_text().startswith("dnn: class separability")
        plt.close(roi)
