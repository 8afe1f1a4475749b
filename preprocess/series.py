"""Which kind of series a DICOM series is: one table of rules over the facts dcm2niix's JSON
sidecar gives (``ImageType``, names, echo, inversion and repetition times, the sequence).

The kinds are BIDS suffixes where BIDS has one (``T1w``, ``FLAIR``, ``dwi``, ``bold``, ...)
and ``localizer``, ``derived`` or ``unknown`` otherwise. The first rule that matches decides;
every rule is one row of :data:`RULES`, tested on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = (
    "T1w",
    "T2w",
    "FLAIR",
    "PDw",
    "T2starw",
    "dwi",
    "bold",
    "asl",
    "m0scan",
    "fmap",
    "localizer",
    "derived",
    "unknown",
)
# What each kind is, in a note or the listing.
MEANING = {
    "T1w": "T1-weighted",
    "T2w": "T2-weighted",
    "FLAIR": "fluid-attenuated T2",
    "PDw": "proton density",
    "T2starw": "T2*-weighted / susceptibility",
    "dwi": "diffusion",
    "bold": "functional (BOLD)",
    "asl": "perfusion, arterial spin labelling",
    "m0scan": "ASL M0 reference",
    "fmap": "field map or echo-planar reference",
    "localizer": "localizer",
    "derived": "derived by the scanner",
    "unknown": "of no known kind",
}


@dataclass(frozen=True)
class Rule:
    """One row of the table: a kind, and conditions that must all hold.

    Attributes:
        kind: one of :data:`KINDS`.
        image_type: any of these values in ``ImageType``.
        name: a regular expression (case-insensitive) found in the series description,
            the protocol name or the sequence name.
        te_ms, ti_ms, tr_ms: ``(low, high)`` bounds of the echo, inversion and repetition
            times in milliseconds (a time the sidecar lacks fails the condition).
        flip_below: the flip angle is below this (degrees).
        sequence: a value of ``ScanningSequence`` (``SE``, ``GR``, ``IR``, ``EP``).
        volumes_from: at least this many volumes (a 4-D series).
        diffusion: the series has b-values above 0.
    """

    kind: str
    image_type: tuple[str, ...] = ()
    name: str | None = None
    te_ms: tuple[float, float] | None = None
    ti_ms: tuple[float, float] | None = None
    tr_ms: tuple[float, float] | None = None
    flip_below: float | None = None
    sequence: str | None = None
    volumes_from: int | None = None
    diffusion: bool = False

    def matches(self, facts: dict) -> bool:
        """Whether every condition of the rule holds for ``facts`` (see :func:`series_facts`)."""
        if self.image_type and not set(self.image_type) & set(facts["image_type"]):
            return False
        if self.name and not re.search(self.name, facts["names"], re.IGNORECASE):
            return False
        for bounds, key in ((self.te_ms, "te"), (self.ti_ms, "ti"), (self.tr_ms, "tr")):
            if bounds and not (facts[key] is not None and bounds[0] <= facts[key] < bounds[1]):
                return False
        if self.flip_below is not None and not (
            facts["flip"] is not None and facts["flip"] < self.flip_below
        ):
            return False
        if self.sequence and self.sequence not in facts["sequence"]:
            return False
        if self.volumes_from and facts["volumes"] < self.volumes_from:
            return False
        return not self.diffusion or facts["diffusion"]

    def describe(self) -> str:
        """The conditions as one line (the README's table)."""
        parts = []
        if self.image_type:
            parts.append(f"ImageType has {' or '.join(self.image_type)}")
        if self.name:
            words = re.sub(r"\(\?<?!\[a-z0-9\]\)|\(\?<?!\[a-z\]\)", "", self.name)
            parts.append("a name has " + " or ".join(f"`{w}`" for w in words.split("|")))
        for bounds, label in ((self.te_ms, "TE"), (self.ti_ms, "TI"), (self.tr_ms, "TR")):
            if bounds and bounds[0] == 0:
                parts.append(f"{label} < {bounds[1]:g} ms")
            elif bounds:
                high = "" if bounds[1] == INF else f" and < {bounds[1]:g}"
                parts.append(f"{label} >= {bounds[0]:g}{high} ms")
        if self.flip_below is not None:
            parts.append(f"flip angle < {self.flip_below:g}°")
        if self.sequence:
            parts.append(f"ScanningSequence has {self.sequence}")
        if self.volumes_from:
            parts.append(f"{self.volumes_from} volumes or more")
        if self.diffusion:
            parts.append("b-values above 0")
        return ", ".join(parts)


INF = float("inf")
_ = r"(?<![a-z0-9])"  # a name's word starts here (the names join words with _ - . and space)

# First match wins: what the scanner says it is (ImageType), then names, which scanners of
# every vendor fill with the protocol's kind, then the sequence's timing, which holds where
# the names say nothing.
RULES = (
    Rule("localizer", image_type=("LOCALIZER",)),
    Rule("localizer", name=rf"locali[sz]er|scout|survey|{_}3-?plane|aahead"),
    Rule("derived", image_type=("DERIVED",)),
    Rule("fmap", image_type=("FIELDMAP", "B0", "B0MAP", "B0_MAP")),
    Rule("fmap", name=rf"field.?map|{_}fmap|{_}b0.?map|gre_field"),
    Rule("dwi", diffusion=True),
    Rule("dwi", name=rf"{_}dwi|{_}dti|diffusion|{_}diff(?![a-z])|hardi|{_}dmri"),
    Rule("m0scan", name=rf"{_}m0(?![a-z0-9])|m0scan"),
    Rule("asl", name=r"p?casl|pasl|(?<![a-z])asl|perfusion|pulsed.?arterial"),
    Rule("bold", name=rf"{_}bold|fmri|{_}rest(?![a-z])|resting|{_}task"),
    Rule("bold", sequence="EP", volumes_from=10),
    Rule("FLAIR", name=rf"flair|dark.?fluid|{_}da-?fl(?![a-z])|{_}t2.?fl(?![a-z])"),
    Rule("FLAIR", ti_ms=(1500, INF), te_ms=(60, INF)),
    Rule("T2starw", name=rf"t2\*|t2.?star|{_}swi|{_}swan|hemo|{_}gre.?t2|medic|{_}merge"),
    Rule(
        "T1w",
        name=rf"{_}t1|mp.?rage|mp2rage|bravo|spgr|{_}tfe|{_}tfl|flash|vibe|{_}mpr(?![a-z])",
    ),
    Rule("PDw", name=rf"{_}pd(?![a-z])|{_}pdw|proton"),
    Rule("T2w", name=rf"{_}t2|{_}tse|{_}fse|{_}space|{_}cube|{_}vista|haste"),
    # echo-planar with fewer volumes than fMRI (which rule 11 took) and no b-values: a
    # spin-echo field map or a reference volume, distorted, never the anatomy of rules below
    Rule("fmap", sequence="EP"),
    Rule("T1w", ti_ms=(300, 1500), te_ms=(0, 10)),  # inversion-prepared: MPRAGE's timing
    Rule("T1w", te_ms=(0, 10), flip_below=30),  # a spoiled gradient echo: SPGR, FLASH, TFE
    Rule("T1w", sequence="SE", te_ms=(0, 30), tr_ms=(0, 1000)),
    Rule("PDw", te_ms=(0, 30), tr_ms=(1500, INF)),
    Rule("T2w", te_ms=(60, INF), tr_ms=(1500, INF)),
    Rule("T2starw", sequence="GR", te_ms=(15, INF)),
)


def series_facts(sidecar: dict, volumes: int = 1, bvalues=()) -> dict:
    """What the rules read from a dcm2niix sidecar (times in ms; dcm2niix gives seconds).

    >>> facts = series_facts({"SeriesDescription": "t1_mprage", "EchoTime": 0.0023})
    >>> facts["names"], round(facts["te"], 3), facts["ti"]
    ('t1_mprage', 2.3, None)
    """

    def ms(key: str) -> float | None:
        value = sidecar.get(key)
        return float(value) * 1000 if isinstance(value, int | float) else None

    names = [sidecar.get(key) for key in ("SeriesDescription", "ProtocolName", "SequenceName")]
    sequence = sidecar.get("ScanningSequence") or ""
    flip = sidecar.get("FlipAngle")
    return {
        "image_type": [str(kind).upper() for kind in sidecar.get("ImageType") or []],
        "names": " ".join(str(name) for name in names if name),
        "te": ms("EchoTime"),
        "ti": ms("InversionTime"),
        "tr": ms("RepetitionTime"),
        "flip": float(flip) if isinstance(flip, int | float) else None,
        "sequence": re.split(r"[\\_ ,]+", str(sequence).upper())
        if not isinstance(sequence, list)
        else [str(s).upper() for s in sequence],
        "volumes": volumes,
        "diffusion": any(float(b) > 0 for b in bvalues),
    }


def classify(facts: dict) -> tuple[str, Rule | None]:
    """The kind of a series and the rule that decided it (None: ``unknown``).

    >>> classify(series_facts({"SeriesDescription": "ADNI_Sag3D MPRAGE"}))[0]
    'T1w'
    >>> classify(series_facts({"SeriesDescription": "3DpCASL"}))[0]
    'asl'
    >>> classify(series_facts({"SeriesDescription": "cor"}))[0]
    'unknown'
    """
    for rule in RULES:
        if rule.matches(facts):
            return rule.kind, rule
    return "unknown", None


def rules_table() -> str:
    """The rule table as Markdown, first match first (the README's table is this)."""
    lines = ["| # | kind | when |", "| --- | --- | --- |"]
    for number, rule in enumerate(RULES, 1):
        when = rule.describe().replace("|", "\\|")
        lines.append(f"| {number} | `{rule.kind}` | {when} |")
    return "\n".join(lines)
