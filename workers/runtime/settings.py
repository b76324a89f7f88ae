"""Settings: one frozen dataclass built from NEGCASE_* environment variables and CLI flags."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from negcase.store.keys import Keys
from negcase.store.replication import ReplicaAcks

ENV_PREFIX = "NEGCASE_"
# Where a worker, command or client connects when neither NEGCASE_REDIS_URL nor a flag says.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_BATCH = 5000
MAX_BLOCK_MS = 20_000
MAX_PARTITIONS = 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """A NEGCASE_* variable or flag that cannot be used, naming it and why."""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _optional_str(text: str) -> str | None:
    return text or None


def _env_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _bool,
    "Path": Path,
    "str | None": _optional_str,
    "tuple[float, ...]": _floats,
    "tuple[int, ...]": _ints,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a worker or command can be told; each field reads NEGCASE_<FIELD_NAME>."""

    # Where things live.
    redis_url: str | None = None
    namespace: str = "negcase"
    data_dir: Path = Path("testcases/negative")

    # The trade contract and the loss rules (DESIGN.md, "From trade to negative case").
    feature_count: int = 8
    default_leverage: float = 1.0
    default_fee_rate: float = 0.0
    priority_thresholds_pct: tuple[float, ...] = (10.0, 5.0, 2.0, 1.0)
    base_epochs: tuple[int, ...] = (100, 200, 300, 400, 500)
    epoch_multiplier: float = 2.0
    min_profitable_move_pct: float = 0.1
    max_entry_bytes: int = 65536

    # The loss detector.
    batch_size: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 30000
    archive: bool = True

    # Partitions (README, "Partitions"): the trades stream, the case queue and their
    # companions split by symbol into this many hash-tagged partitions; 1 is one of each.
    partitions: int = 1

    # Streams and caps.
    trades_maxlen: int = 1_000_000
    events_maxlen: int = 100_000
    dead_letters_maxlen: int = 100_000

    # Retention: what stays in Redis, so that its memory levels off (the archive keeps all).
    # A trade seen again within the window (and while the id count stays under the cap) is
    # a duplicate, whatever it was; a loss is also a duplicate while its case is in Redis.
    dedup_window_s: float = 86_400.0
    dedup_max_ids: int = 2_000_000
    # A finished case (done, dead, or without features) leaves Redis this long after it
    # finished, or sooner when more than the count are finished; 0 turns a bound off.
    case_retention_s: float = 604_800.0
    case_retention_count: int = 100_000
    sessions_kept: int = 10_000

    # Training (the case queue, leases, the model, the gate).
    lease_s: float = 30.0
    max_attempts: int = 3
    cases_per_claim: int = 1
    hidden_sizes: tuple[int, ...] = (64, 64)
    # Sessions train from the latest checkpoint with this rate, and anchor_weight adds an L2
    # pull toward its weights (0: off). Without the pull one session moved the default
    # model's weights by a squared distance of 20-60 (about 0.1 per weight), and on a
    # monthly equity market the gate let 48 such moves add up to a model 10 points worse
    # than the control rule. At that distance a pull of 0.01 costs 0.2-0.6, the order of
    # the cross-entropy: it cut the squared distance to 2-3, kept the three daily markets
    # level and brought that market back within the noise of the rule (README, "More
    # markets than three").
    learning_rate: float = 0.01
    anchor_weight: float = 0.01
    # Share of cases and outcomes held out by a fixed rule on the id: never trained, they
    # form the validation window the gate judges candidates on.
    heldout_share: float = 0.1
    # Outcomes (wins, losses, skips) before the first checkpoint, which is a warm start on
    # all of them; the replay store keeps the most recent `outcomes_maxlen`, the validation
    # window the most recent `validation_size` held-out ones.
    min_outcomes: int = 200
    outcomes_maxlen: int = 5000
    validation_size: int = 500
    warm_start_epochs: int = 100
    # Checks (every 10 epochs) without replay-loss progress before a learned case stops
    # early; 0 trains every planned epoch.
    early_stop_patience: int = 5
    keep_checkpoints: int = 10
    model_factory: str | None = None
    seed: int = 0

    # Inference.
    serve_batch_size: int = 256
    # A reply whose confidence is below this says it has no opinion: the engine keeps its
    # own rule. 0.5: one action holds most of the probability.
    min_confidence: float = 0.5
    reply_ttl_s: int = 30
    # A signal request is a few hundred bytes: a larger one gets an error reply unread.
    max_request_bytes: int = 65536

    # Live safety (store/serving.py, README "Live safety"): a new version first answers
    # this share of signal requests, chosen by request id (0: it serves everything at once).
    canary_share: float = 0.1
    # Outcomes a canary (and the version in service) must have before it is judged, and how
    # many of each version's most recent outcomes the live figures are computed over.
    canary_min_outcomes: int = 200
    live_window: int = 500
    # One-sided z thresholds on mean P&L per decision: a canary is retired when it is worse
    # than the version in service by more than canary_z standard errors, a version in
    # service rolled back when worse than its predecessor by more than rollback_z.
    canary_z: float = 1.645
    rollback_z: float = 2.326
    # Off: live results decide nothing; every published version serves at once.
    auto_rollback: bool = True

    # Health keys.
    health_ttl_s: int = 15

    # Diagnostics on stderr: the lowest level written, and text for people or JSON lines.
    log_level: str = "INFO"
    log_format: str = "text"

    # Durability across a failover: replicas that must acknowledge a detector batch or a
    # checkpoint publish (WAIT) before the worker goes on, and how long to wait for them.
    min_replica_acks: int = 0
    replica_ack_timeout_ms: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every NEGCASE_<FIELD> that is set; the rest keep their defaults. A NEGCASE_*
        variable that names no setting is an error (a misspelling would be ignored)."""
        environ = os.environ if environ is None else environ
        check_variable_names(environ)
        return cls(**_env_values(environ)).validated()

    def to_env(self) -> dict[str, str]:
        """Every field that differs from its default, as the NEGCASE_* variable `from_env`
        reads back to the same value: with no other NEGCASE_* variable set, a child process
        runs with exactly these settings."""
        defaults = type(self)()
        return {
            f"NEGCASE_{f.name.upper()}": _env_text(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced; None means 'not given' and keeps the value."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return replace(self, **given).validated() if given else self

    def validated(self) -> Settings:
        """Self, after checking the values that would otherwise fail far from here."""
        if len(self.priority_thresholds_pct) != 4:
            raise SettingsError("priority_thresholds_pct: needs 4 thresholds (for 5, 4, 3, 2)")
        if list(self.priority_thresholds_pct) != sorted(self.priority_thresholds_pct, reverse=True):
            raise SettingsError("priority_thresholds_pct: must be in decreasing order")
        if len(self.base_epochs) != 5:
            raise SettingsError("base_epochs: needs 5 values, for priorities 1 to 5")
        # A negative pull pushes each session away from its parent; NaN or infinity would
        # only surface as a diverged session, far from the setting that caused it.
        if not 0 <= self.anchor_weight < math.inf:
            raise SettingsError(f"anchor_weight: must be 0 (off) or more, got {self.anchor_weight}")
        if not 0 < self.learning_rate < math.inf:
            raise SettingsError(f"learning_rate: must be above 0, got {self.learning_rate}")
        if self.feature_count < 1:
            raise SettingsError("feature_count: must be at least 1")
        # A batch's entry ids travel to one Lua call as arguments; Lua's unpack() takes
        # about 8,000 values at most.
        if not (1 <= self.batch_size <= MAX_BATCH) or not (1 <= self.serve_batch_size <= MAX_BATCH):
            raise SettingsError(f"batch_size and serve_batch_size: must be 1 to {MAX_BATCH}")
        if not 1 <= self.block_ms <= MAX_BLOCK_MS:
            raise SettingsError(f"block_ms: must be 1 to {MAX_BLOCK_MS} (below the socket timeout)")
        if not 0 <= self.heldout_share < 1:
            raise SettingsError("heldout_share: must be at least 0 and below 1")
        if self.default_leverage < 1 or self.default_fee_rate < 0:
            raise SettingsError("default_leverage >= 1 and default_fee_rate >= 0 are required")
        if not 0 <= self.canary_share <= 0.5:
            raise SettingsError("canary_share: must be 0 to 0.5 (service keeps the most)")
        if not 2 <= self.canary_min_outcomes <= self.live_window:
            raise SettingsError("canary_min_outcomes: must be at least 2 and at most live_window")
        if not (self.canary_z > 0 and self.rollback_z > 0):
            raise SettingsError("canary_z and rollback_z: must be positive")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"log_level: one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"log_format: text or json, got {self.log_format!r}")
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise SettingsError(
                f"NEGCASE_PARTITIONS: must be 1 to {MAX_PARTITIONS}, got {self.partitions}"
            )
        if self.min_replica_acks < 0:
            raise SettingsError("min_replica_acks: must be 0 (no WAIT) or more")
        # WAIT's timeout 0 means "forever": a worker would hang while no replica is up.
        if self.replica_ack_timeout_ms < 1:
            raise SettingsError("replica_ack_timeout_ms: must be at least 1")
        if self.dedup_window_s <= 0 or self.dedup_max_ids < 1:
            raise SettingsError("dedup_window_s and dedup_max_ids: must be above 0")
        if self.case_retention_s < 0 or self.case_retention_count < 0 or self.sessions_kept < 1:
            raise SettingsError(
                "case_retention_s and case_retention_count: must be >= 0 (0: no bound); "
                "sessions_kept: must be at least 1"
            )
        return self

    def differences(self) -> dict[str, Any]:
        """The settings whose value is not the default, by field name."""
        default = Settings()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    @property
    def replica_acks(self) -> ReplicaAcks:
        """The WAIT that follows a detector batch and a checkpoint publish."""
        return ReplicaAcks(self.min_replica_acks, self.replica_ack_timeout_ms)

    @property
    def keys(self) -> Keys:
        """The Redis key names for this namespace."""
        return Keys(self.namespace)

    @property
    def partition_keys(self) -> list[Keys]:
        """The keys of every partition, in partition order (one: the namespace's own)."""
        return self.keys.partitioned(self.partitions)

    @property
    def cases_dir(self) -> Path:
        """Archive folder of case files."""
        return self.data_dir / "cases"

    @property
    def sessions_dir(self) -> Path:
        """Archive folder of training session files."""
        return self.data_dir / "sessions"

    @property
    def models_dir(self) -> Path:
        """Archive folder of checkpoint files."""
        return self.data_dir / "models"

    def epochs_for(self, priority: int) -> int:
        """Training epochs for a case of this priority (1-5)."""
        return round(self.base_epochs[priority - 1] * self.epoch_multiplier)


def variable_of(name: str) -> str:
    """The environment variable a setting reads: NEGCASE_<FIELD_NAME>."""
    return f"{ENV_PREFIX}{name.upper()}"


VARIABLES = {variable_of(f.name): f for f in fields(Settings)}


def check_variable_names(environ: Mapping[str, str]) -> None:
    """SettingsError naming every NEGCASE_* variable that is no setting, with the closest
    valid name: NEGCASE_FEATURES_COUNT=4 must not quietly leave the feature count at 8."""
    unknown = sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in VARIABLES)
    if not unknown:
        return
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{name}: no such setting{hint}")
    raise SettingsError("; ".join(problems) + " (the README's Configuration table lists them)")


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, f in VARIABLES.items():
        if name not in environ:
            continue
        try:
            values[f.name] = _PARSERS[str(f.type)](environ[name])
        except ValueError as error:
            raise SettingsError(f"{name}={environ[name]!r}: {error}") from None
    return values


def explain(
    environ: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, str]]:
    """Each setting's effective value and where it came from ('default', 'env' or 'flag'),
    in field order: what `negcase config` prints."""
    environ = os.environ if environ is None else environ
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    settings = Settings.from_env(environ).with_overrides(**given)
    from_env = _env_values(environ)
    rows = []
    for f in fields(Settings):
        source = "flag" if f.name in given else "env" if f.name in from_env else "default"
        rows.append((f.name, getattr(settings, f.name), source))
    return rows
