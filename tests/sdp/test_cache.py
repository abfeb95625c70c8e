"""The JSON bound cache: round trip, key isolation, corrupt files ignored, env override."""

from lipverify.sdp.cache import CACHE_ENV, BoundCache, default_cache_dir


def test_round_trip_and_key_isolation(tmp_path):
    cache = BoundCache(tmp_path, "abc-neuron-whole")
    cache.put("pair:0-1", 3.25, {"solver": "ipm"})
    again = BoundCache(tmp_path, "abc-neuron-whole")
    assert again.get("pair:0-1") == 3.25
    assert "pair:0-1" in again
    assert BoundCache(tmp_path, "abc-layer-whole").get("pair:0-1") is None


def test_corrupt_or_foreign_files_are_ignored(tmp_path):
    path = tmp_path / "lipsdp-k.json"
    path.write_text("{not json")
    assert BoundCache(tmp_path, "k").get("global") is None
    path.write_text('{"version": 1, "key": "other", "entries": {"global": 1.0}}')
    assert BoundCache(tmp_path, "k").get("global") is None
    path.write_text('{"version": 1, "key": "k", "entries": {"global": -1.0}}')
    assert BoundCache(tmp_path, "k").get("global") is None


def test_env_var_sets_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    cache = BoundCache(None, "x")
    cache.put("global", 1.5)
    assert (tmp_path / "c" / "lipsdp-x.json").exists()
