"""Quality gates cannot be fooled: a limit that is NaN, infinite or negative is refused (manifest load, the
`qtk verify` options, Gates itself), and a metric that is not a finite number fails its gate (NaN compares
false with everything, so `nan > limit` used to pass). Issue 19 item 12."""

from __future__ import annotations

import json
import math

import pytest

from qtk import errors
from qtk.verify.gates import Gates, check_gates

GATES = [("max_ppl_increase_pct", "--max-ppl-increase"), ("max_kld", "--max-kld"), ("min_top1_pct", "--min-top1")]
BIG = "1" + "0" * 400  # a TOML integer: math.isfinite() of it raised OverflowError (exit 1, "likely a bug")
BAD_LIMITS = ["nan", "inf", "+inf", "-inf", "-1", "-0.5", BIG, "-" + BIG]
MANIFEST = 'store = "s"\n[[models]]\nrepo = "acme/x"\n[[models.recipes]]\nmethod = "nf4"\n'
HEAD, MODELS = MANIFEST.split("\n", 1)


@pytest.mark.parametrize("gate", [name for name, _ in GATES])
@pytest.mark.parametrize("value", BAD_LIMITS)
def test_manifest_refuses_a_gate_that_is_not_a_finite_non_negative_number(tmp_path, gate, value):
    from qtk.provision.manifest import ManifestError, load_manifest

    for where, text, line, field in (
        ("defaults", f"{HEAD}\n[defaults.gates]\n{gate} = {value}\n" + MODELS, 3, f"defaults.gates.{gate}"),
        ("recipe", MANIFEST + f"gates = {{ {gate} = {value} }}\n", 6, f"models[0].recipes[0].gates.{gate}"),
        ("model", MANIFEST.replace('repo = "acme/x"\n', f'repo = "acme/x"\ngates.{gate} = {value}\n'), 4,
         f"models[0].gates.{gate}"),
    ):
        m = tmp_path / f"{where}.toml"
        m.write_text(text)
        with pytest.raises(ManifestError) as e:
            load_manifest(m)
        msg = e.value.message
        assert f"{m}:{line}: {field}: must be" in msg and ("finite" in msg or ">= 0" in msg), (where, msg)


@pytest.mark.parametrize("text, words", [
    ('max_kld = "nan"', "expected an integer or a number, got str 'nan'"),
    ("max_kld = true", "expected an integer or a number, got bool"),
    ("min_top1_pct = 101", "must be at most 100"),
    ("max_klds = 0.1", "did you mean 'max_kld'?"),
])
def test_manifest_gate_values_of_the_wrong_kind(tmp_path, text, words):
    from qtk.provision.manifest import ManifestError, load_manifest

    m = tmp_path / "m.toml"
    m.write_text(f"{HEAD}\n[defaults.gates]\n{text}\n" + MODELS)
    with pytest.raises(ManifestError, match=words):
        load_manifest(m)


@pytest.mark.parametrize("option", [option for _, option in GATES])
@pytest.mark.parametrize("value", BAD_LIMITS + ["NaN", "1e400"])
def test_verify_cli_refuses_bad_gate_values_before_loading_anything(qtk, tmp_path, option, value):
    r = qtk("verify", str(tmp_path / "ref"), str(tmp_path / "cand"), f"{option}={value}")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert f"Invalid value for '{option}'" in r.stderr and "must be" in r.stderr, r.stderr


def test_verify_cli_still_refuses_what_is_not_a_number(qtk, tmp_path):
    r = qtk("verify", str(tmp_path / "ref"), str(tmp_path / "cand"), "--max-kld", "low")
    assert r.exit_code == 2 and "'low' is not a number" in r.stderr


@pytest.mark.parametrize("kwargs", [{"max_kld": math.nan}, {"max_kld": -1.0}, {"max_ppl_increase_pct": math.inf},
                                    {"min_top1_pct": 150.0}, {"min_top1_pct": True}, {"max_kld": 10**400}])
def test_gates_themselves_refuse_bad_limits(kwargs):
    with pytest.raises(errors.UsageError):
        Gates(**kwargs)


def _row(ppl_increase_pct=5.0, kl_mean=0.01, top1=0.95, kl=True) -> dict:
    return {"name": "cand", "ppl_increase_pct": ppl_increase_pct, "smoke": [], "gate_failures": [],
            "kl": {"mean": kl_mean, "median": kl_mean, "p99": kl_mean, "top1_agreement": top1, "positions": 10}
            if kl else None}


LIMITS = Gates(max_ppl_increase_pct=20, max_kld=0.1, min_top1_pct=80)
METRICS = [  # candidate row, the failures (words) it must get under LIMITS
    (_row(), []),
    (_row(ppl_increase_pct=math.nan), ["perplexity is not a finite number (nan)"]),
    (_row(ppl_increase_pct=math.inf), ["perplexity is not a finite number (inf)"]),
    (_row(ppl_increase_pct=-math.inf), ["perplexity is not a finite number (-inf)"]),
    (_row(kl_mean=math.nan), ["mean KLD is not a finite number (nan)"]),
    (_row(kl_mean=math.inf), ["mean KLD is not a finite number (inf)"]),
    (_row(top1=math.nan), ["top-1 agreement is not a finite number (nan)"]),
    (_row(ppl_increase_pct=math.nan, kl_mean=math.nan, top1=math.nan),
     ["perplexity is not a finite", "mean KLD is not a finite", "top-1 agreement is not a finite"]),
    (_row(kl=False), ["KLD not measurable", "top-1 not measurable"]),
    (_row(ppl_increase_pct=25.0, kl_mean=0.2, top1=0.5), ["perplexity +25.0% > 20%", "mean KLD 0.2000 > 0.1",
                                                          "top-1 agreement 50.0% < 80%"]),
]


@pytest.mark.parametrize("row, expected", METRICS)
def test_a_metric_that_is_not_finite_fails_its_gate(row, expected):
    report = {"models": [{"name": "ref"}, row]}
    failures = check_gates(report, LIMITS)
    assert len(failures) == len(expected) and all(w in f for w, f in zip(expected, failures)), failures
    assert row["gate_failures"] == [f.split(": ", 1)[1] for f in failures]


def test_gates_off_check_nothing():
    report = {"models": [{"name": "ref"}, _row(ppl_increase_pct=math.nan, kl_mean=math.nan)]}
    assert check_gates(report, Gates()) == []


def test_every_gate_is_a_field_a_manifest_key_and_a_verify_option(qtk):
    """One table: a new gate (a row in GATES and a Gates field) reaches the manifest and the CLI."""
    from dataclasses import fields

    from qtk.provision.manifest import _GATES
    from qtk.verify.gates import GATES as TABLE

    rows = {g.name: g.option for g in TABLE}
    assert all(rows.get(name) == option for name, option in GATES)
    assert {f.name for f in fields(Gates)} == set(rows) | {"require_smoke"}
    assert set(_GATES) == set(rows) | {"require_smoke"}
    help_text = qtk("verify", "--help").stdout
    assert all(option in help_text for option in rows.values())


def test_perplexity_of_an_overflowing_or_nan_nll_is_not_an_exception():
    np = pytest.importorskip("numpy")
    from qtk.verify.perplexity import summarize

    assert summarize([np.array([1000.0, 1000.0])], 10).ppl == math.inf  # exp(1000): OverflowError before
    assert math.isnan(summarize([np.array([1.0, math.nan])], 10).ppl)  # fp16 overflow upstream
    assert math.isnan(summarize([np.array([math.inf, 1.0])], 10).stderr)
    assert summarize([np.array([1.0, 1.0])], 10).ppl == pytest.approx(math.e)


def _report(ref_ppl: float, cand_ppl: float, kl_mean: float) -> dict:
    def model(name, role, ppl, kl):
        return {"name": name, "format": "hf", "role": role, "size_bytes": 1_000_000, "load_s": 0.1,
                "rss_delta_bytes": None, "tokens_in_text": 100, "prefill_tps": 100.0, "smoke": [],
                "perplexity": {"ppl": ppl, "stderr": 0.1, "mean_nll": math.log(ppl) if ppl > 0 else ppl,
                               "tokens_scored": 50, "windows": 1, "tokens_in_text": 100},
                "kl": kl, "gate_failures": [], "ppl_increase_pct": None}

    kl = {"mean": kl_mean, "median": kl_mean, "p99": kl_mean, "top1_agreement": 0.9, "positions": 50}
    ref, cand = model("ref", "reference", ref_ppl, None), model("cand", "candidate", cand_ppl, kl)
    cand["ppl_increase_pct"] = (cand_ppl / ref_ppl - 1) * 100 if math.isfinite(ref_ppl) else math.nan
    return {"protocol": {"text": "t", "ctx": 512}, "hardware": {"device": "cpu"}, "models": [ref, cand]}


def test_qtk_verify_fails_a_nan_kl_and_prints_its_table_on_stdout(qtk, tmp_path, monkeypatch):
    """End to end through the command (the models' numbers stubbed): exit 3 naming the NaN, the table is
    the result (stdout), the failure a diagnostic (stderr)."""
    pytest.importorskip("numpy")
    import qtk.verify.run as verify_run

    monkeypatch.setattr(verify_run, "verify", lambda *a, **k: _report(6.5, 6.6, math.nan))
    r = qtk("verify", "ref", "cand", "--max-kld", "0.1", "--no-smoke", "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 3, r.stderr
    assert "mean KLD is not a finite number (nan)" in r.stderr
    assert "qtk verify — text t" in r.stdout and "qtk verify — text t" not in r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["gates"]["max_kld"] == 0.1 and not doc["gates"]["passed"]
