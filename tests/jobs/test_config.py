import pytest

from nlpstream.jobs.config import ConfigError, StreamConfig, load_config


def test_precedence_cli_over_env_over_yaml(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("kafka:\n  bootstrap_servers: yaml:1\n  group_id: g-yaml\n  topics: [a, b]\n"
                        "output:\n  flush_interval: 3\nmodel:\n  devices: cpu:2\n")
    monkeypatch.setenv("NLPSTREAM_KAFKA__GROUP_ID", "g-env")
    monkeypatch.setenv("NLPSTREAM_OUTPUT__FLUSH_INTERVAL", "7")
    cfg = load_config(StreamConfig, cfg_file, {"output.flush_interval": 1.5, "kafka.topics": None})
    assert cfg.kafka.bootstrap_servers == "yaml:1"
    assert cfg.kafka.group_id == "g-env"
    assert cfg.output.flush_interval == 1.5
    assert cfg.kafka.topics == ["a", "b"]
    assert cfg.model.devices == "cpu:2"
    assert cfg.dlq_topic() == "a.dlq"


def test_defaults():
    cfg = load_config(StreamConfig, None, {"kafka.topics": ["x"]})
    assert cfg.model.model == "builtin:sentiment"
    assert cfg.metrics.metrics_host == "127.0.0.1"
    assert cfg.input.input_format == "json"
    assert cfg.output.skip_written is True and cfg.kafka.fetch_stall_timeout == 120.0


def test_errors_quote_fields_and_values(tmp_path):
    with pytest.raises(ConfigError, match=r"output.flush_interval.*got -1"):
        load_config(StreamConfig, None, {"output.flush_interval": -1})
    with pytest.raises(ConfigError, match=r"stall_timeout.*greater than or equal to 30"):
        load_config(StreamConfig, None, {"kafka.topics": ["x"], "stall_timeout": 10})
    with pytest.raises(ConfigError, match=r"dlq_topic \('a'\) must differ from kafka.topics \(\['a'\]\)"):
        load_config(StreamConfig, None, {"kafka.topics": ["a"], "kafka.dlq_topic": "a"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(StreamConfig, bad, {})
    with pytest.raises(ConfigError, match="unknown_section"):
        load_config(StreamConfig, None, {"unknown_section": 1})


def test_secrets_never_printed(monkeypatch):
    monkeypatch.setenv("NLPSTREAM_KAFKA__SASL_PASSWORD", "hunter2-secret")
    cfg = load_config(StreamConfig, None, {"kafka.topics": ["x"], "kafka.sasl_username": "u"})
    assert cfg.kafka.password() == "hunter2-secret"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.redacted())
    with pytest.raises(ConfigError) as info:
        load_config(StreamConfig, None, {"kafka.topics": ["x"], "kafka.sasl_password_file": "/tmp/x"})
    assert "hunter2" not in str(info.value)
    from nlpstream.jobs.stream import connection_settings

    assert "hunter2" not in repr(connection_settings(cfg))


@pytest.mark.parametrize("name", ["sasl_password", "ssl_password"])
def test_secret_from_file_or_value_not_both(tmp_path, name):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-from-file\n")
    cfg = load_config(StreamConfig, None, {"kafka.topics": ["x"], f"kafka.{name}_file": str(secret)})
    read = cfg.kafka.password() if name == "sasl_password" else cfg.kafka.key_password()
    assert read == "s3cr3t-from-file"
    with pytest.raises(ConfigError, match=f"set kafka.{name} or kafka.{name}_file, not both") as info:
        load_config(StreamConfig, None, {"kafka.topics": ["x"], f"kafka.{name}": "s3cr3t-value",
                                         f"kafka.{name}_file": str(secret)})
    assert "s3cr3t" not in str(info.value)


def test_kafka_client_choice_and_what_it_refuses(monkeypatch):
    assert load_config(StreamConfig, None, {"kafka.topics": ["x"]}).kafka.client == "kafka-python"
    monkeypatch.setenv("NLPSTREAM_KAFKA__CLIENT", "confluent")
    assert load_config(StreamConfig, None, {"kafka.topics": ["x"]}).kafka.client == "confluent"
    with pytest.raises(ConfigError, match="does not support kafka.transactions"):
        load_config(StreamConfig, None, {"kafka.topics": ["x"], "kafka.transactions": True})
    with pytest.raises(ConfigError, match="kafka.client"):
        load_config(StreamConfig, None, {"kafka.topics": ["x"], "kafka.client": "librdkafka"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "confluent_kafka" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'nlpstream\[confluent\]'"):
        load_config(StreamConfig, None, {"kafka.topics": ["x"]})
