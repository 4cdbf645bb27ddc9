"""The error table, auth edge cases and the settings model, without a transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaindex_kb import errors
from llamaindex_kb.config import default_plugin_data_dir, load_settings, plugin_settings
from llamaindex_kb.errors import ConfigurationError, KBError, error_status
from llamaindex_kb.http.app import route_path


def _all_error_classes() -> list[type[KBError]]:
    found, todo = [], [KBError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_no_error_maps_to_a_status_dify_misreads(cls):
    status, code = cls.status, cls.error_code
    assert status != 401, "Dify accepts a wrong key at save time when it sees 401"
    if status in {429, 500, 502, 503, 504}:
        # Dify retries these three times: only transient or unexpected failures, and a
        # damaged knowledge base, which is our failure and must show in monitoring as one.
        assert cls in {KBError, errors.StoreUnavailableError, errors.KnowledgeBaseDamaged,
                       errors.ServerBusyError}
    assert 1000 <= code < 6000


def test_error_codes_are_unique_per_leaf_class():
    leaves = [c for c in _all_error_classes() if not c.__subclasses__()]
    codes = [c.error_code for c in leaves]
    assert len(codes) == len(set(codes))


def test_unexpected_exceptions_get_a_generic_500_message():
    status, code, message = error_status(RuntimeError("password=hunter2"))
    assert (status, code) == (500, 5000)
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/retrieval", "/retrieval"),
        ("//retrieval", "/retrieval"),
        ("/retrieval/", "/retrieval"),
        ("/retrieval/retrieval", "/retrieval"),
        ("///retrieval//retrieval", "/retrieval"),
        ("", "/"),
    ],
)
def test_route_path_normalises_what_dify_concatenates(raw, expected):
    assert route_path(raw) == expected


def test_flags_override_environment_which_overrides_defaults():
    env = {"LLAMAINDEX_KB_PORT": "9001", "LLAMAINDEX_KB_API_KEY": "from-env"}
    settings = load_settings({"port": 9002, "host": None}, environ=env)
    assert settings.port == 9002
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-env"
    assert settings.host == "127.0.0.1"


def test_bad_setting_names_the_field():
    with pytest.raises(ConfigurationError, match="port"):
        load_settings({"port": 70000}, environ={})


def test_api_key_is_never_shown_in_settings_repr():
    settings = load_settings({"api_key": "s3cret"}, environ={})
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.model_dump_json()


def test_plugin_data_dir_defaults_beside_the_daemons_working_path(tmp_path: Path):
    working = tmp_path / "storage" / "cwd"
    working.mkdir(parents=True)
    expected = tmp_path / "storage" / "plugin_data" / "llamaindex_kb"
    assert default_plugin_data_dir({"PLUGIN_WORKING_PATH": str(working)}) == expected
    settings = plugin_settings({"api_key": "k", "data_dir": ""},
                               environ={"PLUGIN_WORKING_PATH": str(working)})
    assert settings.data_dir == expected


def test_plugin_data_dir_falls_back_to_user_data_outside_the_daemon(tmp_path: Path):
    env = {"PLUGIN_WORKING_PATH": str(tmp_path / "absent"), "XDG_DATA_HOME": str(tmp_path)}
    assert default_plugin_data_dir(env) == tmp_path / "llamaindex_kb"


def test_explicit_plugin_data_dir_wins(tmp_path: Path):
    settings = plugin_settings({"api_key": "k", "data_dir": str(tmp_path)}, environ={})
    assert settings.data_dir == tmp_path


def test_plugin_form_retrieval_overrides_are_parsed():
    as_built = plugin_settings({"api_key": "k", "retrieval_mode": "as_built",
                                "semantic_weight": ""}, environ={})
    assert (as_built.retrieval_mode, as_built.semantic_weight) == (None, None)
    chosen = plugin_settings({"api_key": "k", "retrieval_mode": "keyword",
                              "semantic_weight": "0.4"}, environ={})
    assert (chosen.retrieval_mode, chosen.semantic_weight) == ("keyword", 0.4)


def test_semantic_weight_outside_unit_range_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="semantic_weight"):
        plugin_settings({"api_key": "k", "semantic_weight": "1.5"}, environ={})


def test_manifest_pyproject_and_package_versions_agree():
    import tomllib

    import yaml
    from conftest import PLUGIN_ROOT

    import llamaindex_kb

    manifest = yaml.safe_load((PLUGIN_ROOT / "manifest.yaml").read_text())
    pyproject = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())
    assert manifest["version"] == pyproject["project"]["version"] == llamaindex_kb.__version__


def test_the_api_key_can_come_from_a_file_named_in_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  file-key-7d1  \nignored second line\n")
    settings = load_settings({}, environ={"LLAMAINDEX_KB_API_KEY_FILE": str(key_file)})
    assert settings.api_key.get_secret_value() == "file-key-7d1"
    explicit = load_settings({"api_key": "flag-key", "api_key_file": key_file}, environ={})
    assert explicit.api_key.get_secret_value() == "flag-key"
    flag_file = load_settings({"api_key_file": key_file},
                              environ={"LLAMAINDEX_KB_API_KEY": "environment-key"})
    assert flag_file.api_key.get_secret_value() == "file-key-7d1"
    key_file.write_bytes("\ufefffile-key-bom\r\n".encode())  # saved by a Windows editor
    assert load_settings({"api_key_file": key_file}, environ={}).api_key.get_secret_value() \
        == "file-key-bom"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_missing_or_empty_key_file_is_a_configuration_error_naming_it(tmp_path, content):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ConfigurationError, match="api_key_file") as raised:
        load_settings({"api_key_file": key_file}, environ={})
    assert str(key_file) in raised.value.message


@pytest.mark.parametrize("url", ["postgresql://kb:pw-7c1@[::1/db", "local://kb:pw-7c1@host/x"])
def test_a_store_url_that_cannot_be_used_is_a_400_that_hides_its_password(url):
    from llamaindex_kb.stores.registry import store_for

    with pytest.raises(ConfigurationError) as raised:
        store_for(load_settings({"store": url}, environ={}))
    assert "kb:***@" in raised.value.message
    assert "pw-7c1" not in raised.value.message
    assert raised.value.__cause__ is None or "pw-7c1" not in str(raised.value.__cause__)


def test_a_busy_answer_says_when_to_retry():
    from llamaindex_kb.errors import ServerBusyError
    from llamaindex_kb.http.app import KnowledgeAPI

    response = KnowledgeAPI.error_response(ServerBusyError("another upload is running", 30))
    assert (response.status_code, response.headers["Retry-After"]) == (429, "30")
