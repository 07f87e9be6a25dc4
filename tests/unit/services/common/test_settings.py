from pathlib import Path

from services.common.settings import Settings


def test_environment_variables_with_the_modalmesh_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("MODALMESH_LLM_PORT", "6000")
    monkeypatch.setenv("MODALMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MODALMESH_HOST", "0.0.0.0")
    s = Settings()
    assert s.llm_port == 6000 and s.cache_dir == tmp_path
    assert s.llm_target() == "0.0.0.0:6000"
    assert s.encoder_target() == "0.0.0.0:8101"


def test_explicit_addresses_win_over_host_and_port():
    s = Settings(llm_address="llm.internal:1", encoder_address="enc.internal:2")
    assert s.llm_target() == "llm.internal:1" and s.encoder_target() == "enc.internal:2"


def test_grpc_limits_are_raised_both_ways():
    opts = dict(Settings(grpc_max_message_bytes=123).grpc_options())
    assert opts == {"grpc.max_send_message_length": 123, "grpc.max_receive_message_length": 123}
    assert Settings().grpc_max_message_bytes > 4 * 1024 * 1024


def test_cache_dir_defaults_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MODALMESH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Settings().cache_dir == Path(tmp_path) / "modalmesh"


def test_adapter_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("MODALMESH_CACHE_DIR", str(tmp_path))
    assert Settings().artifact_root() == tmp_path / "adapters"
    assert Settings().max_loaded_adapters == 4
    monkeypatch.setenv("MODALMESH_ARTIFACT_DIR", "~/store")
    monkeypatch.setenv("MODALMESH_MAX_LOADED_ADAPTERS", "2")
    s = Settings()
    assert s.artifact_root() == Path("~/store").expanduser() and s.max_loaded_adapters == 2
