from pathlib import Path

from qtk.settings import DEFAULT_ENDPOINT, Settings


def test_defaults_follow_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.endpoint == DEFAULT_ENDPOINT == "https://huggingface.co"
    assert s.hf_home == tmp_path / "huggingface"
    assert s.hub_cache == tmp_path / "huggingface" / "hub"
    assert s.token_path == tmp_path / "huggingface" / "token"
    assert s.offline is False


def test_env_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1234/")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = Settings.from_env()
    assert (s.hub_cache, s.endpoint, s.env_token, s.offline) == (tmp_path / "c", "http://127.0.0.1:1234", "hf_x", True)
    assert Settings.from_env(hub_cache=Path("/x")).hub_cache == Path("/x")
