import dataclasses

import pytest
import yaml

from lipverify.config import RunConfig, apply_overrides, backend_options, defaults_yaml, load_config
from lipverify.errors import InputError


def test_every_field_has_a_sentence_of_help():
    for f in dataclasses.fields(RunConfig):
        text = f.metadata.get("help", "")
        assert text[:1].isupper() and text.endswith("."), f.name


def test_unknown_key_names_dotted_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: digits_mlp\nepss: [0.1]\n")
    with pytest.raises(InputError, match="'epss'"):
        load_config(path)


def test_unknown_backend_option_is_dotted():
    @dataclasses.dataclass(frozen=True)
    class Options:
        solver: str = "SCS"

    assert backend_options("lipsdp", Options, {"solver": "CLARABEL"}).solver == "CLARABEL"
    with pytest.raises(InputError, match="backends.lipsdp.solvr"):
        backend_options("lipsdp", Options, {"solvr": "x"})


def test_bad_type_and_malformed_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eps: fast\n")
    with pytest.raises(InputError, match="'eps'"):
        load_config(path)
    path.write_text("eps: [0.1\nmodel: x\n")
    with pytest.raises(InputError, match="malformed YAML"):
        load_config(path)


def test_overrides_and_defaults_roundtrip():
    cfg = apply_overrides(RunConfig(), ["eps=[0.2, 0.4]", "backends.lipsdp.solver=CLARABEL"])
    assert cfg.eps == [0.2, 0.4]
    assert cfg.backends["lipsdp"] == {"solver": "CLARABEL"}
    parsed = yaml.safe_load(defaults_yaml())
    assert RunConfig(**parsed) == RunConfig()
