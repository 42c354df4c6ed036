"""The config's JSON Schema: shipped equal to the models, printed by the command, and true to the
loader on the shipped recipes (an editor checking a recipe with it agrees with segfocal)."""
import json

import jsonschema
import pydantic
import pytest
import yaml

from segfocal.cli import main
from segfocal.config import ConfigError, load_config
from segfocal.config.json_schema import SCHEMA_FILE, config_json_schema, config_json_schema_text

from recipes import REPO


SHIPPED = json.loads(SCHEMA_FILE.read_text())
SCHEMAS = {"shipped": SHIPPED, "made now": config_json_schema()}


def test_the_shipped_schema_is_the_models_schema():
    if SHIPPED["$comment"] != config_json_schema()["$comment"]:
        pytest.skip(f"pydantic {pydantic.VERSION} writes schemas in another form than the shipped file's "
                    f"({SHIPPED['$comment']}); the tests below check that both agree with the loader")
    assert SCHEMA_FILE.read_text() == config_json_schema_text(), (
        "segfocal/config/schema.json is stale: run segfocal config-schema --output segfocal/config/schema.json")


def test_the_command_prints_it_and_writes_it(capsys, tmp_path):
    main(["config-schema"])
    assert json.loads(capsys.readouterr().out) == config_json_schema()
    main(["config-schema", "--output", str(tmp_path / "s.json")])
    assert (tmp_path / "s.json").read_text() == config_json_schema_text()


@pytest.mark.parametrize("schema", SCHEMAS, ids=str)
@pytest.mark.parametrize("recipe", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_file_is_valid_for_an_editor(recipe, schema):
    jsonschema.validate(yaml.safe_load(recipe.read_text()), SCHEMAS[schema])


@pytest.mark.parametrize("change", [{"train": {"epochs": "ten"}}, {"loss": {"gama": 2.0}}, {"optim": {"lr": 0}},
                                    {"eval": {"mode": "tiles"}}, {"loss": {"terms": [{"weight": 1.0}]}}])
@pytest.mark.parametrize("schema", SCHEMAS, ids=str)
def test_what_the_loader_refuses_the_schema_marks_too(tmp_path, change, schema):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"_base_": "_base_/default.yaml", **change}))
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(change, SCHEMAS[schema])
