"""The "moe_replication" section: defaults, reading, shipped configs, and refusals that name the field."""

import json
from pathlib import Path

import pytest

from ds_moe_replicate import ReplicationConfig, ReplicationConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_absent_section_means_disabled():
    assert ReplicationConfig.from_ds_config({"train_micro_batch_size_per_gpu": 1}).enabled is False
    assert ReplicationConfig.from_ds_config(None).enabled is False
    assert ReplicationConfig.coerce(None).enabled is False


def test_reads_a_dict_and_a_path(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": 1,
          "moe_replication": {"enabled": True, "slots_per_rank": 2, "replan_interval": 16, "predictor": "window"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for source in (ds, path, str(path)):
        cfg = ReplicationConfig.from_ds_config(source)
        assert (cfg.enabled, cfg.slots_per_rank, cfg.replan_interval, cfg.predictor) == (True, 2, 16, "window")
        assert cfg.dropless is True and cfg.kernels == "auto"  # defaults kept


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    raw = json.loads(path.read_text())
    cfg = ReplicationConfig.from_ds_config(path)
    assert cfg.enabled == raw["moe_replication"]["enabled"]
    # The files are plain serialisations: every key they set is a field, with the value kept.
    for key, value in raw["moe_replication"].items():
        assert getattr(cfg, key) == value


def test_shipped_configs_cover_the_presets():
    names = {p.stem for p in CONFIGS}
    assert {"baseline", "demo", "switch_base_128_ep8", "switch_base_256_ep16"} <= names


@pytest.mark.parametrize(
    "section, field",
    [
        ({"enabled": True, "slot_per_rank": 1}, "moe_replication.slot_per_rank"),
        ({"slots_per_rank": -1}, "moe_replication.slots_per_rank"),
        ({"slots_per_rank": "two"}, "moe_replication.slots_per_rank"),
        ({"replan_interval": 0}, "moe_replication.replan_interval"),
        ({"predictor": "crystal_ball"}, "moe_replication.predictor"),
        ({"kernels": "cuda"}, "moe_replication.kernels"),
        ({"ema_decay": 1.0}, "moe_replication.ema_decay"),
        ({"window": 0}, "moe_replication.window"),
        ({"dropless": "maybe"}, "moe_replication.dropless"),
        ({"enabled": "auto"}, "moe_replication.enabled"),
    ],
)
def test_bad_sections_name_the_field(section, field):
    with pytest.raises(ReplicationConfigError) as info:
        ReplicationConfig.from_ds_config({"moe_replication": section})
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ReplicationConfigError) as info:
        ReplicationConfig.parse({"slots_per_rank": -3, "kernels": "x", "bogus": 1})
    message = str(info.value)
    for field in ("slots_per_rank", "kernels", "bogus"):
        assert f"moe_replication.{field}" in message
    assert "-3" in message  # the offending value is shown


def test_section_must_be_an_object():
    with pytest.raises(ReplicationConfigError, match="expected a JSON object"):
        ReplicationConfig.from_ds_config({"moe_replication": [1, 2]})


def test_invalid_json_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ReplicationConfigError, match="broken.json"):
        ReplicationConfig.from_ds_config(path)


def test_coerce_accepts_config_and_dict():
    cfg = ReplicationConfig(enabled=True)
    assert ReplicationConfig.coerce(cfg) is cfg
    assert ReplicationConfig.coerce({"enabled": True, "slots_per_rank": 3}).slots_per_rank == 3


def test_every_field_has_a_docstring():
    # DeepSpeed-style: fields documented in the source; the README lists them from here.
    import inspect

    import ds_moe_replicate.config as mod

    source = inspect.getsource(mod.ReplicationConfig)
    for name in ReplicationConfig.model_fields:
        head, _, rest = source.partition(f"\n    {name}:")
        assert rest, name
        assert rest.split("\n", 2)[1].strip().startswith('"""'), f"{name} has no docstring"
