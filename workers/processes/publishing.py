"""Publishing a trained update: under the publish lock, rebase it onto whatever is latest
now, gate it by its trading result on the validation window against that parent, and
compare-and-set it in; retry when latest moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from negcase.processes.model import (
    nonfinite_name,
    rebased,
    sha256_hex,
    verified_state,
    weights_bytes,
)
from negcase.processes.training import (
    Examples,
    Measurement,
    TradingResult,
    Update,
    gate_reason,
    measure_state,
    measurement_dict,
    trading_result,
)
from negcase.schemas.outcome import Outcome
from negcase.store.checkpoints import CheckpointRegistry, PublishConflict
from negcase.store.leases import Lease

MAX_PUBLISH_TRIES = 10


@dataclass(slots=True)
class PublishResult:
    """What became of an update: published as `version`, or refused with `rejected_reason`."""

    version: int | None = None
    parent_version: int | None = None
    rejected_reason: str | None = None
    rebases: int = 0
    heldout_before: Measurement | None = None
    heldout_after: Measurement | None = None
    trading_before: TradingResult | None = None
    trading_after: TradingResult | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def trading_dict(self) -> dict[str, Any]:
        """The gate's figures (parent, then candidate) as plain data."""
        return {
            "validation_before": _trading_dict(self.trading_before),
            "validation_after": _trading_dict(self.trading_after),
        }


def publish_update(
    registry: CheckpointRegistry,
    update: Update,
    scratch: nn.Module,
    feature_count: int,
    window: Sequence[Outcome],
    meta: dict[str, Any],
    leases: Sequence[Lease] = (),
    trainer: str = "",
    blobs: Mapping[str, bytes] | None = None,
) -> PublishResult:
    """Gate and publish an update on top of whatever is latest now, finishing the leased
    cases (with their updated `blobs`) in the same step. When another trainer published
    since `update.base_version`, the update is rebased (latest + trained - base) and gated
    again against latest; a warm start (no base version) is not rebased but judged against
    whatever was published first; the very first checkpoint is judged only for finite
    output. Weights holding NaN or infinity are refused like a gate refusal. `scratch` is a
    model of the right shape to measure with. Raises LeaseLost when a lease is no longer
    held. A refused update's cases are not finished here: the caller acks them with the
    reason."""
    result = PublishResult()
    heldout = Examples.of_outcomes(window, feature_count)
    with registry.publish_lock():
        for _ in range(MAX_PUBLISH_TRIES):
            parent = registry.fetch_latest()
            if parent is None or parent.version == update.base_version:
                parent_state, candidate = update.base_state, update.trained_state
            elif update.base_version is None:
                parent_state = verified_state(parent, scratch, feature_count)
                candidate = update.trained_state
            else:
                parent_state = verified_state(parent, scratch, feature_count)
                candidate = rebased(parent_state, update.trained_state, update.base_state)
                result.rebases += 1
            parent_version = None if parent is None else parent.version
            result.parent_version = parent_version
            diverged = nonfinite_name(candidate)
            if diverged is not None:
                result.rejected_reason = f"{diverged} holds NaN or infinity: training diverged"
                return result
            result.heldout_before = measure_state(scratch, parent_state, heldout)
            result.trading_before = _trading_result_of(scratch, parent_state, window)
            result.heldout_after = measure_state(scratch, candidate, heldout)
            result.trading_after = _trading_result_of(scratch, candidate, window)
            # The first checkpoint has no parent to beat: untrained weights are no policy an
            # engine runs, and beside them a warm start would stand or fall by the noise of a
            # small window. It must only be finite; from then on each version must not lose
            # to its parent.
            judged_against = None if parent is None else result.trading_before
            result.rejected_reason = gate_reason(judged_against, result.trading_after)
            if result.rejected_reason:
                return result
            weights = weights_bytes(candidate)
            metrics = {
                **meta.get("metrics", {}),
                "heldout_before": measurement_dict(result.heldout_before),
                "heldout_after": measurement_dict(result.heldout_after),
                **result.trading_dict(),
                "rebases": result.rebases,
            }
            result.meta = {**meta, "metrics": metrics, "trainer": trainer}
            try:
                result.version = registry.publish(
                    weights,
                    sha256_hex(weights),
                    result.meta,
                    parent_version,
                    leases,
                    trainer,
                    blobs,
                )
                return result
            except PublishConflict:
                continue  # a rollback or an expired lock: rebase on the new latest
    raise RuntimeError(f"latest kept moving: gave up after {MAX_PUBLISH_TRIES} tries")


def _trading_result_of(
    scratch: nn.Module, state: dict[str, Any], window: Sequence[Outcome]
) -> TradingResult | None:
    scratch.load_state_dict(state)
    return trading_result(scratch, window)


def _trading_dict(result: TradingResult | None) -> dict[str, Any] | None:
    return None if result is None else result.to_dict()
