"""report.write on synthetic tables and a stand-in study: files, self-containment, warnings, findings, escaping."""

from __future__ import annotations

import html
import math
import re
from types import SimpleNamespace

import numpy as np
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
        simpson.append((o, "predictive_confidence", SPLIT[1], MERGED, "invariant", "lowered", True))
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
                                                           "split_finding", "merged_finding", "differs"]),
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


def findings(page):
    """The findings section as plain text."""
    section = page.split("<h2>Findings</h2>")[1].split("<h2>")[0]
    return html.unescape(re.sub(r"<[^>]+>", " ", section))


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
    assert ("radiologists, microcalcifications: low-pass filtering lowers predictive confidence at every severity "
            "(P(γ>0) < 0.025); γ at 4 mm = -2.1 ± 0.2") in text
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.5))
    text = findings(page)
    assert ("radiologists, microcalcifications: low-pass filtering makes no detectable change to predictive "
            "confidence at every severity (0.025 ≤ P(γ>0) ≤ 0.975)") in text
    assert "lowers predictive confidence" not in text
    # two-sided: 0.04 is not below alpha / 2
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.04))
    assert "lowers predictive confidence" not in findings(page)
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.99))
    assert "radiologists, microcalcifications: low-pass filtering raises predictive confidence at every severity " \
           "(P(γ>0) > 0.975)" in findings(page)
    _, page = run(tmp_path, tables=make_tables(p_gamma=0.5, p_outside_margin=0.01))
    assert "radiologists, microcalcifications: low-pass filtering leaves predictive confidence unchanged at every " \
           "severity (|γ| < 0.5 with posterior probability ≥ 0.95)" in findings(page)


def test_separability_finding_follows_the_numbers(tmp_path):
    _, page = run(tmp_path, tables=make_tables(ks_p=0.01))
    assert "dnn, soft_tissue_lesions: low-pass filtering lowers class separability at every severity " \
           "(one-tailed KS p < 0.025)" in findings(page)
    _, page = run(tmp_path, tables=make_tables(ks_p=0.99))
    assert "dnn, soft_tissue_lesions: low-pass filtering raises class separability at every severity" in findings(page)
    _, page = run(tmp_path, tables=make_tables(ks_p=0.3))
    text = findings(page)
    assert "radiologists, soft_tissue_lesions: low-pass filtering makes no detectable change to class separability " \
           "at every severity (both one-tailed KS p ≥ 0.025); KS 0.6 ± 0.03 at 0 mm, 0.45 ± 0.03 at 4 mm" in text
    # a stricter alpha turns the same p-values into "no detectable change"
    _, page = run(tmp_path, make_study(alpha=0.001), make_tables(ks_p=0.01, alpha=0.001))
    assert "lowers class separability" not in findings(page).split("Regions of interest")[0]


def test_three_observers_cannot_detect_a_change_in_separability(tmp_path):
    # With 3 observers per side the smallest one-tailed KS p-value is 1 / C(6, 3) = 0.05 > alpha / 2.
    _, page = run(tmp_path, make_study(readers=3), make_tables(ks_p=1 / math.comb(6, 3), readers=3))
    text = findings(page)
    separability = text.split("Class separability")[1].split("Simpson's paradox")[0]
    assert "radiologists, microcalcifications: an effect of low-pass filtering on class separability cannot be " \
           "detected with 3 observers" in separability
    assert "no detectable" not in separability and "lowers" not in separability
    assert "no detectable effect" not in text


def test_only_some_severities_significant(tmp_path):
    tables = make_tables(ks_p=0.5)
    cs = tables["class_separability"]
    cs.loc[(cs.observer == "dnn") & (cs.subgroup == SPLIT[0]) & (cs.severity == "1"), "ks_pvalue"] = 0.01
    _, page = run(tmp_path, tables=with_findings(tables))
    assert "dnn, microcalcifications: low-pass filtering lowers class separability at 1 mm (one-tailed KS p < " \
           "0.025) and makes no detectable change to it at 0.5 mm and 4 mm (both" in findings(page)


def test_observed_and_modelled_disagreement_is_reported(tmp_path):
    _, page = run(tmp_path, tables=make_tables(ks_p=0.4, observed_p=0.01))
    text = findings(page)
    assert "dnn, soft_tissue_lesions: the posterior-predictive and the observed predictions disagree" in text
    assert "radiologists, soft_tissue_lesions: the posterior-predictive" not in text
    _, page = run(tmp_path, tables=make_tables(ks_p=0.01, observed_p=0.01))
    assert "disagree" not in findings(page)


def test_simpsons_paradox_sentence(tmp_path):
    _, page = run(tmp_path)
    assert (f"radiologists, predictive confidence: with {MERGED} merged into one subgroup it looks lowered by the "
            "perturbation, but soft_tissue_lesions alone is invariant to the perturbation: Simpson's paradox.") \
        in findings(page)


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
