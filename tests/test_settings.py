"""Settings from the environment, the reconnect backoff, and the docs that describe them."""

from __future__ import annotations

import random
import re
from dataclasses import fields
from pathlib import Path

import pytest

from negcase.runtime.settings import Settings, SettingsError, explain
from negcase.store.connection import backoff_s

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_variable_is_read_with_its_type():
    settings = Settings.from_env(
        {
            "NEGCASE_NAMESPACE": "{negcase}",
            "NEGCASE_FEATURE_COUNT": "4",
            "NEGCASE_PRIORITY_THRESHOLDS_PCT": "20, 10, 5, 1",
            "NEGCASE_HIDDEN_SIZES": "32,16",
            "NEGCASE_ARCHIVE": "off",
            "NEGCASE_DATA_DIR": "/tmp/x",
            "NEGCASE_REDIS_URL": "",
            "UNRELATED": "1",
        }
    )
    assert settings.namespace == "{negcase}" and settings.keys.queue == "{negcase}:queue"
    assert settings.feature_count == 4
    assert settings.priority_thresholds_pct == (20.0, 10.0, 5.0, 1.0)
    assert settings.hidden_sizes == (32, 16)
    assert settings.archive is False
    assert settings.data_dir == Path("/tmp/x")
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NEGCASE_FEATURE_COUNT", "eight", "NEGCASE_FEATURE_COUNT='eight'"),
        ("NEGCASE_ARCHIVE", "maybe", "expected 1/0"),
        ("NEGCASE_PRIORITY_THRESHOLDS_PCT", "1,2,5,10", "decreasing"),
        ("NEGCASE_PRIORITY_THRESHOLDS_PCT", "10,5", "4 thresholds"),
        ("NEGCASE_DEFAULT_LEVERAGE", "0.5", "default_leverage"),
        ("NEGCASE_PARTITIONS", "0", "NEGCASE_PARTITIONS: must be 1 to 1024, got 0"),
        ("NEGCASE_PARTITIONS", "1025", "NEGCASE_PARTITIONS: must be 1 to 1024, got 1025"),
        ("NEGCASE_ANCHOR_WEIGHT", "-0.01", "anchor_weight: must be 0 (off) or more, got -0.01"),
        ("NEGCASE_ANCHOR_WEIGHT", "nan", "anchor_weight: must be 0 (off) or more"),
        ("NEGCASE_LEARNING_RATE", "0", "learning_rate: must be above 0, got 0.0"),
    ],
)
def test_a_bad_variable_is_an_error_that_names_it(variable, value, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env({variable: value})


def test_overrides_keep_values_that_were_not_given():
    base = Settings(batch_size=10)
    assert base.with_overrides(batch_size=None, block_ms=5).batch_size == 10
    assert base.with_overrides(batch_size=None, block_ms=5).block_ms == 5


def test_settings_reach_a_child_process_unchanged():
    # given settings that differ from the defaults in a field of every type
    settings = Settings(
        redis_url="redis://h:1/2",
        namespace="{bt}",
        data_dir=Path("/tmp/a"),
        feature_count=5,
        priority_thresholds_pct=(20.0, 7.5, 2.0, 0.5),
        base_epochs=(1, 2, 3, 4, 5),
        archive=False,
        hidden_sizes=(3,),
        model_factory="m:f",
        epoch_multiplier=0.15,
        seed=42,
    )
    # when they travel as NEGCASE_* variables, as a supervised worker gets them
    # then the child reads back exactly the same settings, and unset optionals stay unset
    assert Settings.from_env(settings.to_env()) == settings
    # and only what differs from a default travels
    assert Settings().to_env() == {}
    assert Settings(seed=3).to_env() == {"NEGCASE_SEED": "3"}


def test_backoff_grows_to_a_cap_with_jitter():
    random.seed(1)
    delays = [backoff_s(attempt, base_s=0.1, cap_s=2.0, jitter=0.5) for attempt in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(1.0 <= d <= 2.0 for d in delays[5:])
    assert backoff_s(3, base_s=0.1, cap_s=2.0, jitter=0.0) == pytest.approx(0.8)


def test_readme_documents_every_setting():
    missing = [f.name for f in fields(Settings) if f"NEGCASE_{f.name.upper()}" not in README]
    assert missing == []


def test_a_misspelled_variable_is_an_error_naming_the_closest_setting():
    with pytest.raises(
        SettingsError,
        match=r"NEGCASE_FEATURES_COUNT: no such setting \(did you "
        r"mean NEGCASE_FEATURE_COUNT\?\)",
    ):
        Settings.from_env({"NEGCASE_FEATURES_COUNT": "4", "NEGCASE_NAMESPACE": "x"})
    with pytest.raises(SettingsError, match="NEGCASE_ZZZ: no such setting"):
        Settings.from_env({"NEGCASE_ZZZ": "1"})


def test_explain_says_where_each_value_came_from():
    rows = {
        name: (value, source)
        for name, value, source in explain(
            {"NEGCASE_LEASE_S": "12"}, {"namespace": "ops", "data_dir": None}
        )
    }
    assert rows["lease_s"] == (12.0, "env")
    assert rows["namespace"] == ("ops", "flag")
    assert rows["batch_size"] == (500, "default") and rows["data_dir"][1] == "default"


def test_a_replica_ack_wait_must_end() -> None:
    # WAIT's timeout 0 means forever: a worker would hang whenever no replica is up
    with pytest.raises(SettingsError, match="replica_ack_timeout_ms"):
        Settings.from_env({"NEGCASE_MIN_REPLICA_ACKS": "1", "NEGCASE_REPLICA_ACK_TIMEOUT_MS": "0"})
    with pytest.raises(SettingsError, match="min_replica_acks"):
        Settings.from_env({"NEGCASE_MIN_REPLICA_ACKS": "-1"})
