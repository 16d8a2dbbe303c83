"""The dataset contract: file names, column names, category lists and image modalities.

Everything that the real dataset fixes (see DATA.md) lives here, so that the reader, the feature
builder and the synthetic generator agree by construction.
"""

from __future__ import annotations

CLINICAL_CSV = "DataMaster_Processed_V12_WithMissing.csv"
DEPTH_BOX_CSV = "bounding_box_depth.csv"
THERMAL_BOX_CSV = "bounding_box_thermal.csv"

CLASS_NAMES = ("I", "P", "R")
CLASS_LONG_NAMES = ("inflammatory", "proliferative", "remodelling")
NUM_CLASSES = len(CLASS_NAMES)

LABEL_COLUMN = "Healing Phase Abs"
PATIENT_COLUMN = "Patient#"
APPT_COLUMN = "Appt#"
DFU_COLUMN = "DFU#"
VISIT_KEY = (PATIENT_COLUMN, APPT_COLUMN, DFU_COLUMN)
# The clinical column policy (docs/RESULTS.md, "Clinical column policy"): every column of the CSV
# is in exactly one group, and only the measured ones reach the model by default.
# - Identifiers place a row; never features.
IDENTIFIER_COLUMNS = ("ID", PATIENT_COLUMN, APPT_COLUMN, DFU_COLUMN)
# - Derived from the target itself (the fine label, the annotator's confidence): never features,
#   whatever the configuration.
LABEL_DERIVED_COLUMNS = ("Healing Phase", "Phase Confidence (%)")
# - Free text with dozens of spellings; each has a grouped twin that is used instead.
FREE_TEXT_COLUMNS = ("Location", "Type of Pain", "Type of Pain2", "Dressing")

SEX = "Sex (F:0, M:1)"
SIDE = "Side (Left:0, Right:1)"
LOCATION_GROUPED = "Location Grouped (Hallux:1,Toes,Middle,Heel,Ankle:5)"
EXUDATE_APPEARANCE = "Exudate Appearance (Serous:1,Haemoserous,Bloody,Thick:4)"
EXUDATE_AMOUNT = "Exudate Amount (None:0,Minor,Medium,Severe:3)"
WOUND_TEMP = "Wound Centre Temperature (°C)"
PERI_TEMP = "Peri-Ulcer Temperature (°C)"
SKIN_TEMP = "Intact Skin Temperature (°C)"
WOUND_TEMP_NORM = "Wound Centre Temperature Normalized (°C)"
PERI_TEMP_NORM = "Peri-Ulcer Temperature Normalized (°C)"
WOUND_SCORE = "Wound Score"
ONSET_DAYS = "Onset (Days)"

# Text-coded columns whose values map onto a fixed ordinal scale (the header's own numbering).
# Matching is case-insensitive; an unseen value becomes missing (never a crash).
ORDINAL_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    SEX: ("f", "m"),
    SIDE: ("left", "right"),
    LOCATION_GROUPED: ("hallux", "toes", "middle", "heel", "ankle"),
    EXUDATE_APPEARANCE: ("serous", "haemoserous", "bloody", "thick"),
    "Odor": ("noodor", "unpleasant"),
}
PAIN_GROUPS = (
    "nopain",
    "chronicpain",
    "throbbingpain",
    "pressureandmovement",
    "phantomandunusualsensations",
    "generalaches",
    "shootingpain",
    "sharpandintensepain",
    "localizedpain",
    "specifictimes",
)
# Nominal text columns, one-hot encoded against these fixed lists plus a "missing" column (an
# unseen value is missing).
NOMINAL_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "Foot Aspect": ("plantar", "dorsal", "lateral", "medial"),
    "Type of Pain Grouped": PAIN_GROUPS,
    "Type of Pain_Grouped2": PAIN_GROUPS,
    "Dressing Grouped": (
        "antiseptic",
        "absorbentdressing",
        "nodressing",
        "advancedmethod",
        "basicdressing",
        "bandaid",
        "other",
    ),
}

# Columns read as text, never parsed as numbers (an ID such as "0123" keeps its zero).
TEXT_COLUMNS = frozenset(
    {
        "ID",
        LABEL_COLUMN,
        *LABEL_DERIVED_COLUMNS,
        *FREE_TEXT_COLUMNS,
        *ORDINAL_TEXT_COLUMNS,
        *NOMINAL_TEXT_COLUMNS,
    }
)

# All 72 columns of the clinical CSV, in file order.
CLINICAL_COLUMNS = (
    "ID",
    "Patient#",
    "Age",
    SEX,
    "Weight (Kg)",
    "Height (cm)",
    "Smoking",
    "Alcohol Consumption",
    "Habits Score",
    "Type of Diabetes",
    "Heart Conditions",
    "Cancer History",
    "Sensory Peripheral",
    "Clinical Score",
    "Number of DFUs",
    "DFU#",
    SIDE,
    "Foot Aspect",
    "Location",
    LOCATION_GROUPED,
    ONSET_DAYS,
    "No Toes Deformities",
    "Bunion",
    "Claw",
    "Hammer",
    "Charcot Arthropathy",
    "Flat (Pes Planus) Arch",
    "Abnormally High Arch",
    "No Arch Deformities",
    "Foot Score",
    "Appt#",
    "Appt Days",
    WOUND_TEMP,
    PERI_TEMP,
    SKIN_TEMP,
    WOUND_TEMP_NORM,
    PERI_TEMP_NORM,
    "Pain Level",
    "Type of Pain",
    "Type of Pain Grouped",
    "Type of Pain2",
    "Type of Pain_Grouped2",
    "Wound Tunneling",
    EXUDATE_AMOUNT,
    EXUDATE_APPEARANCE,
    "Odor",
    "No Peri-ulcer Conditions (False:0, True:1)",
    "Erythema at Peri-ulcer",
    "Edema at Peri-ulcer",
    "Pale Colour at Peri-ulcer",
    "Maceration at Peri-ulcer",
    WOUND_SCORE,
    "Dressing",
    "Dressing Grouped",
    "No Foot Abnormalities",
    "Foot Hair Loss",
    "Foot Dry Skin",
    "Foot Fissure Cracks",
    "Foot Callus",
    "Thickened Toenail",
    "Foot Fungal Nails",
    "Leg Score",
    "No Offloading",
    "Offloading: Therapeutic Footwear",
    "Offloading: Scotcast Boot or RCW",
    "Offloading: Half Shoes or Sandals",
    "Offloading: Total Contact Cast",
    "Offloading: Crutches, Walkers or Wheelchairs",
    "Offloading Score",
    "Healing Phase",
    "Phase Confidence (%)",
    LABEL_COLUMN,
)
# Columns without which a row cannot be placed or labelled.
REQUIRED_CLINICAL_COLUMNS = (PATIENT_COLUMN, APPT_COLUMN, DFU_COLUMN)
OFFLOADING_COLUMNS = tuple(c for c in CLINICAL_COLUMNS if "Offloading" in c)
# - Decided by the clinician when assessing the wound at this visit: leak suspects, excluded
#   unless ``clinical_include_leak_suspect: true`` brings them back. The dressing: "NoDressing" is
#   25 of 27 R, and dressing changes coincide with a phase change at the same visit rather than at
#   the one before. The offloading: nothing shows that it is recorded before the assessment (the
#   timing evidence is small and mixed), so it stays here (docs/RESULTS.md). The free-text
#   "Dressing" is represented by its grouped twin.
DECIDED_AFTER_ASSESSMENT_COLUMNS = ("Dressing Grouped", *OFFLOADING_COLUMNS)
LEAK_SUSPECT_COLUMNS = LABEL_DERIVED_COLUMNS + ("Dressing",) + DECIDED_AFTER_ASSESSMENT_COLUMNS
_NOT_FEATURES = IDENTIFIER_COLUMNS + LABEL_DERIVED_COLUMNS + FREE_TEXT_COLUMNS + (LABEL_COLUMN,)
# - Measured at the visit, or known before the assessment (history, foot, wound measurements,
#   temperatures, pain, exudate, time since onset and since the first visit): the default
#   features.
MEASURED_COLUMNS = tuple(
    c for c in CLINICAL_COLUMNS if c not in _NOT_FEATURES + DECIDED_AFTER_ASSESSMENT_COLUMNS
)
# Every column that may be a feature and is read as a number.
NUMERIC_FEATURE_COLUMNS = tuple(
    c
    for c in CLINICAL_COLUMNS
    if c not in _NOT_FEATURES and c not in ORDINAL_TEXT_COLUMNS and c not in NOMINAL_TEXT_COLUMNS
)

BOX_COLUMNS = (
    "Filename",
    "Patient#",
    "Appt#",
    "DFU#",
    "DebriStat",
    "Camera",
    "Angle",
    "Bounding Box Number",
    "Xmin",
    "Ymin",
    "Xmax",
    "Ymax",
)

IMAGE_MODALITIES = ("depth_rgb", "depth_map", "thermal_rgb", "thermal_map")
MODALITY_FOLDERS = {
    "depth_rgb": "Depth_RGB",
    "depth_map": "Depth_Map_IMG",
    "thermal_rgb": "Thermal_RGB",
    "thermal_map": "Thermal_Map_IMG",
}
# Which camera (and so which bounding-box CSV) each modality's crop comes from.
MODALITY_CAMERA = {"depth_rgb": "D", "depth_map": "D", "thermal_rgb": "T", "thermal_map": "T"}
# Full frame sizes (width, height) of the two cameras.
FRAME_SIZE = {"D": (1280, 720), "T": (1080, 1440)}
