"""LayerPlan: which layer of the hybrid is sparse attention and which is lightning attention.

The hybrid layout is data (STYLE habit 2): layer selection writes a plan with the evidence behind it,
conversion reads it, and it serialises to a pattern string (``S`` sparse, ``L`` lightning), to the
``mixer_types`` list of the exported config, and to JSON.

    plan = LayerPlan.parse("SLLLLLLLLSLLLLLLSSLLLLSLLLLLLSSS")
    plan.mixer_types()      # ["minicpm4", "lightning-attn", ...] as in the released MiniCPM-SALA config
    plan.save("plan.json"); LayerPlan.load("plan.json")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SPARSE = "sparse"
LIGHTNING = "lightning"
KINDS = (SPARSE, LIGHTNING)
_LETTER = {SPARSE: "S", LIGHTNING: "L"}
_FROM_LETTER = {"S": SPARSE, "L": LIGHTNING}
# names used by the released MiniCPM-SALA config.json
MIXER_TYPE = {SPARSE: "minicpm4", LIGHTNING: "lightning-attn"}
_FROM_MIXER_TYPE = {v: k for k, v in MIXER_TYPE.items()}


class LayerPlanError(ValueError):
    """A plan that is malformed or does not fit the model; the message says where and what to do."""


@dataclass(frozen=True)
class LayerPlan:
    kinds: tuple[str, ...]
    # how the plan was made: method, ratio, forced layers, per-layer scores... (free-form, JSON-serialisable)
    evidence: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not self.kinds:
            raise LayerPlanError("a layer plan needs at least one layer")
        bad = [(i, k) for i, k in enumerate(self.kinds) if k not in KINDS]
        if bad:
            raise LayerPlanError(f"unknown layer kinds {bad[:5]} (layer, kind); expected {KINDS}")

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, pattern: str, evidence: dict | None = None) -> "LayerPlan":
        """From a pattern like "SLLLS" (S = sparse, L = lightning; spaces, commas and underscores ignored)."""
        letters = [c for c in pattern.upper() if c not in " ,_\t\n"]
        bad = sorted({c for c in letters if c not in _FROM_LETTER})
        if bad:
            raise LayerPlanError(f"layer pattern {pattern!r} has characters {bad}; use S (sparse) and L (lightning)")
        return cls(tuple(_FROM_LETTER[c] for c in letters), evidence or {})

    @classmethod
    def from_mixer_types(cls, mixer_types: list[str], evidence: dict | None = None) -> "LayerPlan":
        bad = [(i, m) for i, m in enumerate(mixer_types) if m not in _FROM_MIXER_TYPE]
        if bad:
            raise LayerPlanError(f"mixer_types has unknown entries {bad[:5]} (layer, value); "
                                 f"expected {sorted(_FROM_MIXER_TYPE)}")
        return cls(tuple(_FROM_MIXER_TYPE[m] for m in mixer_types), evidence or {})

    @classmethod
    def from_sparse_layers(cls, num_layers: int, sparse_layers, evidence: dict | None = None) -> "LayerPlan":
        sparse_layers = sorted(set(int(i) for i in sparse_layers))
        out_of_range = [i for i in sparse_layers if not 0 <= i < num_layers]
        if out_of_range:
            raise LayerPlanError(f"sparse layers {out_of_range} are outside 0..{num_layers - 1}")
        return cls(tuple(SPARSE if i in sparse_layers else LIGHTNING for i in range(num_layers)), evidence or {})

    @classmethod
    def evenly_spaced(cls, num_layers: int, num_sparse: int) -> "LayerPlan":
        """The evenly-spaced baseline: sparse layers at round(linspace(0, L - 1, n)), first and last included."""
        if not 0 < num_sparse <= num_layers:
            raise LayerPlanError(f"num_sparse must be in 1..{num_layers}, got {num_sparse}")
        if num_sparse == 1:
            layers = [0]
        else:
            layers = [round(i * (num_layers - 1) / (num_sparse - 1)) for i in range(num_sparse)]
        return cls.from_sparse_layers(num_layers, layers, {"method": "evenly_spaced", "num_sparse": num_sparse})

    # -- views --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kinds)

    def format(self) -> str:
        return "".join(_LETTER[k] for k in self.kinds)

    def mixer_types(self) -> list[str]:
        return [MIXER_TYPE[k] for k in self.kinds]

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == SPARSE]

    @property
    def lightning_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == LIGHTNING]

    def validate(self, num_layers: int, *, source: str = "layer plan") -> "LayerPlan":
        if len(self) != num_layers:
            raise LayerPlanError(f"{source} has {len(self)} layers ({self.format()}) but the model has {num_layers}; "
                                 f"make a plan for {num_layers} layers")
        return self

    def __str__(self) -> str:
        return f"LayerPlan({self.format()}: {len(self.sparse_layers)} sparse / {len(self)} layers)"

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"pattern": self.format(), "mixer_types": self.mixer_types(), "sparse_layers": self.sparse_layers,
                "evidence": self.evidence}

    def save(self, path: str | os.PathLike) -> Path:
        from sala_train.checkpoint import write_json_atomic

        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"layer plan {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LayerPlanError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or "pattern" not in data:
            raise LayerPlanError(f"{path}: expected an object with a 'pattern' key (e.g. \"SLLS\")")
        try:
            plan = cls.parse(data["pattern"], data.get("evidence") or {})
        except LayerPlanError as err:
            raise LayerPlanError(f"{path}: {err}") from err
        if "mixer_types" in data and data["mixer_types"] != plan.mixer_types():
            raise LayerPlanError(f"{path}: 'mixer_types' disagrees with 'pattern' {data['pattern']!r}")
        return plan
