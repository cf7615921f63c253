import pytest

from worker.config import Settings, env_name, flag_name, load_settings
from worker.errors import StartupError


def test_defaults_match_the_documented_names():
    settings = load_settings({}, environ={})
    assert settings.bootstrap_servers == "localhost:9092"
    assert settings.input_topic == "images"
    assert settings.output_topic == "image-embeddings"
    assert settings.dlq_topic == "images.dlq"
    assert settings.group_id == "clip-worker"
    assert settings.batch_size == 0  # sized from free GPU memory; 32 on CPU
    assert settings.model == "openai/clip-vit-large-patch14"
    assert settings.device == "auto" and settings.dtype == "auto"
    assert settings.forward_image is False


def test_every_field_has_a_flag_env_var_and_description():
    for name, info in Settings.model_fields.items():
        assert flag_name(name) == "--" + name.replace("_", "-")
        assert env_name(name) == "CLIP_WORKER_" + name.upper()
        assert info.description, name


def test_env_vars_apply_and_flags_win():
    env = {"CLIP_WORKER_BATCH_SIZE": "64", "CLIP_WORKER_FORWARD_IMAGE": "true", "CLIP_WORKER_GROUP_ID": "g"}
    settings = load_settings({"group_id": "from-flag"}, environ=env)
    assert settings.batch_size == 64
    assert settings.forward_image is True
    assert settings.group_id == "from-flag"


def test_settings_are_frozen():
    settings = load_settings({}, environ={})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        settings.batch_size = 3


@pytest.mark.parametrize(
    ("overrides", "env", "fragment"),
    [
        ({"batch_size": "-1"}, {}, "--batch-size / CLIP_WORKER_BATCH_SIZE"),
        ({}, {"CLIP_WORKER_BATCH_SIZE": "lots"}, "CLIP_WORKER_BATCH_SIZE"),
        ({"device": "gpu"}, {}, "use auto, cpu, cuda or cuda:N"),
        ({"dtype": "int8"}, {}, "--dtype"),
        ({}, {"CLIP_WORKER_KAFKA_CLIENT": "rdkafka"}, "should be 'kafka-python' or 'librdkafka'"),
        ({"ssl_cafile": "/no/such/ca.pem"}, {}, "no such file"),
        ({"security_protocol": "SASL_SSL"}, {}, "--sasl-mechanism"),
        ({}, {"CLIP_WORKER_BATCHSIZE": "8"}, "unknown environment variable CLIP_WORKER_BATCHSIZE"),
        ({"decode": "device"}, {}, "--decode device leaves pixels on the device: add --resize device"),
        ({"decode": "device", "resize": "device", "jpeg_draft": "1"}, {}, "drop it or use --decode pil"),
        ({"decode": "gpu"}, {}, "--decode / CLIP_WORKER_DECODE"),
        ({"fetch_schemes": "http,ftp"}, {}, "unknown scheme 'ftp'; use some of http, https, s3, file"),
        ({"fetch_schemes": "http,file"}, {}, "the file scheme needs --fetch-file-root"),
        ({}, {"CLIP_WORKER_FETCH_ALLOW_HOSTS": "ok.example,not a host"}, "is neither a host name nor"),
        ({"fetch_file_root": "/no/such/dir"}, {}, "--fetch-file-root / CLIP_WORKER_FETCH_FILE_ROOT"),
        ({"fetch_concurrency": "0"}, {}, "--fetch-concurrency"),
        ({"fetch_timeout_s": "0"}, {}, "--fetch-timeout-s"),
        ({"fetch_retries": "-1"}, {}, "--fetch-retries"),
        ({"s3_endpoint_url": "minio:9000"}, {}, "use an http:// or https:// URL"),
    ],
)
def test_bad_values_give_one_line_naming_the_fix(overrides, env, fragment):
    with pytest.raises(StartupError) as caught:
        load_settings(overrides, environ=env)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_secrets_are_masked_everywhere():
    settings = load_settings(
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "alice",
            "sasl_password": "hunter2-secret",
        },
        environ={},
    )
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings.redacted())
    assert settings.redacted()["sasl_username"] == "alice"


def test_bad_password_value_is_not_echoed():
    with pytest.raises(StartupError) as caught:
        load_settings({"sasl_password": 12345678}, environ={"CLIP_WORKER_SASL_PASSWORD": "x"})
    assert "12345678" not in str(caught.value)


def test_configuration_page_table_is_current():
    from pathlib import Path

    from worker.devtools.docs_table import PAGE, render

    page = (Path(__file__).resolve().parents[2] / PAGE).read_text()
    assert render(page) == page, "run `make docs` to regenerate the settings table of docs/configuration.md"
    for name in Settings.model_fields:
        assert f"`{flag_name(name)}`" in page, name


def test_fetch_schemes_default_to_http_https_s3_and_file_only_with_a_root(tmp_path):
    assert load_settings({}, environ={}).fetch_scheme_set == {"http", "https", "s3"}
    rooted = load_settings({"fetch_file_root": str(tmp_path)}, environ={})
    assert rooted.fetch_scheme_set == {"http", "https", "s3", "file"}
    chosen = load_settings({"fetch_schemes": "HTTPS, s3"}, environ={})
    assert chosen.fetch_scheme_set == {"https", "s3"}
    env = {"CLIP_WORKER_FETCH_ALLOW_HOSTS": "cdn.internal, 10.0.0.0/8"}
    assert load_settings({}, environ=env).fetch_allow_host_list == ("cdn.internal", "10.0.0.0/8")


def test_an_endpoint_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(StartupError) as caught:
        load_settings({"s3_endpoint_url": "http://AKIA:s3cr3t@minio:9000"}, environ={})
    assert "s3cr3t" not in str(caught.value) and "--s3-endpoint-url" in str(caught.value)
