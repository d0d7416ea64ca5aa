"""Unit recognition and conversion against published conversion factors."""

from __future__ import annotations

import pytest

from prifed.fhir.units import UCUM, UnitError, convert, resolve_unit


@pytest.mark.parametrize("value, source, target, expected", [
    (1.0, "[lb_av]", "kg", 0.45359237),  # exact by definition
    (10.0, "[in_i]", "cm", 25.4),  # exact by definition
    (98.6, "[degF]", "Cel", 37.0),
    (212.0, "[degF]", "Cel", 100.0),
    (37.0, "Cel", "[degF]", 98.6),
    (13.3322387415, "kPa", "mm[Hg]", 100.0),
    (14.2, "g/dL", "g/L", 142.0),
    (1.5, "m", "cm", 150.0),
    (7.5, "10*9/L", "10*3/uL", 7.5),
])
def test_same_dimension_exact(value: float, source: str, target: str,
                              expected: float) -> None:
    converted = convert(value, source, target, "0000-0")
    assert converted == pytest.approx(expected, rel=1e-12)


# Conventional clinical factors, mg/dL per mmol/L (umol/L for creatinine).
@pytest.mark.parametrize("loinc, si_value, si_unit, mg_dl", [
    ("2345-7", 5.5, "mmol/L", 5.5 * 18.016),  # glucose
    ("2093-3", 5.0, "mmol/L", 5.0 * 38.67),  # total cholesterol
    ("2085-9", 1.3, "mmol/L", 1.3 * 38.67),  # HDL cholesterol
    ("2571-8", 1.7, "mmol/L", 1.7 * 88.57),  # triglycerides
    ("2160-0", 88.4, "umol/L", 1.0),  # creatinine
    ("3094-0", 5.0, "mmol/L", 5.0 * 2.8),  # urea nitrogen
])
def test_molar_conversion_factors(loinc: str, si_value: float, si_unit: str,
                                  mg_dl: float) -> None:
    assert convert(si_value, si_unit, "mg/dL", loinc) == pytest.approx(mg_dl, rel=2e-3)
    back = convert(mg_dl, "mg/dL", si_unit, loinc)
    assert back == pytest.approx(si_value, rel=2e-3)


def test_hba1c_ifcc_to_ngsp() -> None:
    # 48 mmol/mol is the diagnostic threshold quoted as 6.5 %, 53 as 7.0 %.
    assert convert(48.0, "mmol/mol", "%", "4548-4") == pytest.approx(6.5, abs=0.05)
    assert convert(53.0, "mmol/mol", "%", "4548-4") == pytest.approx(7.0, abs=0.05)
    assert convert(6.5, "%", "mmol/mol", "4548-4") == pytest.approx(48.0, abs=0.5)


def test_molar_needs_known_analyte() -> None:
    with pytest.raises(UnitError, match="LOINC 2951-2"):
        convert(140.0, "mmol/L", "mg/dL", "2951-2")


def test_other_dimension_rejected() -> None:
    with pytest.raises(UnitError):
        convert(70.0, "kg", "mg/dL", "29463-7")


def test_unknown_unit_rejected() -> None:
    with pytest.raises(UnitError):
        convert(1.0, "stone", "kg", "29463-7")


@pytest.mark.parametrize("code, system, display, expected", [
    ("mm[Hg]", UCUM, "mmHg", "mm[Hg]"),
    (None, None, "mmHg", "mm[Hg]"),
    ("kg", UCUM, "kilogram", "kg"),
    (None, None, "lbs", "[lb_av]"),
    (None, None, "mg/dl", "mg/dL"),
    (None, None, "µmol/L", "umol/L"),
    ("mg/dL", "http://example.org/local-units", None, "mg/dL"),
    ("MGDL", "http://example.org/local-units", None, None),
    (None, None, "a handful", None),
])
def test_resolve_unit(code: str | None, system: str | None, display: str | None,
                      expected: str | None) -> None:
    assert resolve_unit(code, system, display) == expected


def test_ucum_code_wins_over_display() -> None:
    assert resolve_unit("kg", UCUM, "lbs") == "kg"
