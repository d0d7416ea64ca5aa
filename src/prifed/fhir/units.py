"""Units of Observation values: recognise common spellings, convert a few.

Units are named by their UCUM codes (https://ucum.org). A value converts to
the unit a feature expects when both units measure the same dimension (mass,
length, mass concentration and so on, by an exact linear factor), or, for the
analytes listed in MOLAR_MASS, between mass and substance concentration. HbA1c
also converts between IFCC mmol/mol and NGSP percent. Any other pair is not
converted: the value is rejected rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class UnitDef:
    """A unit as ``value_in_base = value * factor + offset`` in one dimension."""

    dimension: str
    factor: float
    offset: float = 0.0


UNITS: dict[str, UnitDef] = {
    "kg": UnitDef("mass", 1.0),
    "g": UnitDef("mass", 1e-3),
    "[lb_av]": UnitDef("mass", 0.45359237),  # exact, international avoirdupois
    "m": UnitDef("length", 1.0),
    "cm": UnitDef("length", 1e-2),
    "mm": UnitDef("length", 1e-3),
    "[in_i]": UnitDef("length", 0.0254),  # exact, international inch
    "[ft_i]": UnitDef("length", 0.3048),
    "g/L": UnitDef("mass concentration", 1.0),
    "g/dL": UnitDef("mass concentration", 10.0),
    "mg/dL": UnitDef("mass concentration", 1e-2),
    "mg/L": UnitDef("mass concentration", 1e-3),
    "mol/L": UnitDef("substance concentration", 1.0),
    "mmol/L": UnitDef("substance concentration", 1e-3),
    "umol/L": UnitDef("substance concentration", 1e-6),
    "mm[Hg]": UnitDef("pressure", 1.0),
    "kPa": UnitDef("pressure", 1000.0 / 133.322387415),  # 1 mm[Hg] = 133.322387415 Pa
    "Cel": UnitDef("temperature", 1.0),
    "[degF]": UnitDef("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "%": UnitDef("percent", 1.0),
    "mmol/mol": UnitDef("substance fraction", 1.0),
    "/min": UnitDef("rate", 1.0),
    "kg/m2": UnitDef("body mass index", 1.0),
    "mL/min/{1.73_m2}": UnitDef("filtration rate", 1.0),
    "U/L": UnitDef("catalytic concentration", 1.0),
    "10*3/uL": UnitDef("number concentration", 1.0),
    "10*9/L": UnitDef("number concentration", 1.0),
    "10*6/uL": UnitDef("number concentration", 1e3),
    "10*12/L": UnitDef("number concentration", 1e3),
    "mg/g": UnitDef("mass ratio", 1.0),
}

# Spellings seen in Quantity.unit (or in a non-UCUM Quantity.code) for the
# UCUM codes above.
ALIASES: dict[str, str] = {
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "in": "[in_i]",
    "inch": "[in_i]",
    "ft": "[ft_i]",
    "°C": "Cel",
    "degC": "Cel",
    "°F": "[degF]",
    "degF": "[degF]",
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",
    "µmol/l": "umol/L",
    "beats/minute": "/min",
    "breaths/minute": "/min",
    "{beats}/min": "/min",
    "{breaths}/min": "/min",
    "kg/m^2": "kg/m2",
    "kg/m²": "kg/m2",
    "mL/min/1.73m2": "mL/min/{1.73_m2}",
    "mL/min/1.73 m2": "mL/min/{1.73_m2}",
    "IU/L": "U/L",
    "K/uL": "10*3/uL",
    "10^3/uL": "10*3/uL",
    "10^9/L": "10*9/L",
    "10^6/uL": "10*6/uL",
    "10^12/L": "10*12/L",
}

# Molar masses in g/mol of analytes whose mass and substance concentrations
# convert into each other, keyed by LOINC code. Triglycerides use triolein,
# the usual clinical convention (1 mmol/L = 88.57 mg/dL).
MOLAR_MASS: dict[str, float] = {
    "2345-7": 180.156,  # glucose, serum or plasma
    "1558-6": 180.156,  # fasting glucose
    "2339-0": 180.156,  # glucose, blood
    "2093-3": 386.65,  # cholesterol, total
    "2085-9": 386.65,  # cholesterol in HDL
    "13457-7": 386.65,  # cholesterol in LDL, calculated
    "18262-6": 386.65,  # cholesterol in LDL, direct
    "2571-8": 885.7,  # triglycerides
    "2160-0": 113.12,  # creatinine
    "3094-0": 28.014,  # urea nitrogen (two nitrogen atoms)
    "17861-6": 40.078,  # calcium
}

# NGSP HbA1c percent from IFCC mmol/mol: percent = 0.09148 * ifcc + 2.152
# (the IFCC-NGSP master equation, Hoelzel et al., Clin Chem 2004;50:166-174).
HBA1C_LOINC = frozenset({"4548-4", "17856-6", "59261-8"})
_NGSP_SLOPE = 0.09148
_NGSP_INTERCEPT = 2.152


class UnitError(ValueError):
    """A value cannot be expressed in the unit a feature expects."""


def check_target_unit(unit: str) -> None:
    """Raise ValueError unless a feature may ask for values in this unit."""
    if unit not in UNITS:
        raise ValueError(
            f"unit {unit!r} is not a supported UCUM code; use one of "
            + ", ".join(sorted(UNITS))
        )


def resolve_unit(code: str | None, system: str | None,
                 display: str | None) -> str | None:
    """Return the UCUM code of a Quantity's unit, or None when not recognised.

    A UCUM ``code`` is tried first. Then ``unit`` (the display text) and a code
    from another system are looked up, each as a UCUM code or a known spelling.
    """
    candidates = []
    if system == UCUM and code:
        candidates.append(code)
    if display:
        candidates.append(display)
    if code and system != UCUM:
        candidates.append(code)
    for candidate in candidates:
        text = candidate.strip()
        if text in UNITS:
            return text
        if text in ALIASES:
            return ALIASES[text]
    return None


def convert(value: float, source: str, target: str, loinc: str) -> float:
    """Convert a value from one supported UCUM unit to another for an analyte."""
    if source == target:
        return value
    if source not in UNITS or target not in UNITS:
        raise UnitError(f"no conversion from {source!r} to {target!r}")

    from_def, to_def = UNITS[source], UNITS[target]
    if from_def.dimension == to_def.dimension:
        base = value * from_def.factor + from_def.offset
        return (base - to_def.offset) / to_def.factor

    pair = {from_def.dimension, to_def.dimension}
    molar = {"mass concentration", "substance concentration"}
    if pair == molar and loinc in MOLAR_MASS:
        molar_mass = MOLAR_MASS[loinc]
        base = value * from_def.factor
        if from_def.dimension == "substance concentration":
            return base * molar_mass / to_def.factor
        return base / molar_mass / to_def.factor

    if pair == {"percent", "substance fraction"} and loinc in HBA1C_LOINC:
        if source == "mmol/mol" and target == "%":
            return _NGSP_SLOPE * value + _NGSP_INTERCEPT
        if source == "%" and target == "mmol/mol":
            return (value - _NGSP_INTERCEPT) / _NGSP_SLOPE
    raise UnitError(
        f"no conversion from {source!r} to {target!r} for LOINC {loinc}"
    )
