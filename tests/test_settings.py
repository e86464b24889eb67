import dataclasses
import re
from pathlib import Path

import pytest

from backend.settings import Settings, settings_table


def test_defaults_and_env_parsing():
    s = Settings.from_env({})
    assert s.port == 9090 and s.model_dir == Path("models") and s.redis_url == "" and s.basic_auth is None
    s = Settings.from_env({"PORT": "9191", "DOWNLOAD_WEIGHTS": "false", "SCORE_THRESHOLD": "0.3", "MODEL_DIR": "/tmp/m",
                           "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert s.port == 9191 and s.download_weights is False and s.score_threshold == 0.3
    assert s.model_dir == Path("/tmp/m") and s.basic_auth == ("u", "p")


@pytest.mark.parametrize("env, word", [
    ({"PORT": "x"}, "PORT"),
    ({"DOWNLOAD_WEIGHTS": "maybe"}, "DOWNLOAD_WEIGHTS"),
    ({"MODEL_ARCH": "yolo"}, "MODEL_ARCH"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
    ({"SCORE_THRESHOLD": "2"}, "SCORE_THRESHOLD"),
    ({"MASK_MIN_PART": "1.5"}, "MASK_MIN_PART"),
    ({"POLYGON_TOTAL_POINTS": "2"}, "POLYGON_TOTAL_POINTS"),
    ({"ROIS_PER_IMAGE": "-1"}, "ROIS_PER_IMAGE"),
])
def test_invalid_settings_name_the_variable(env, word):
    with pytest.raises(ValueError) as err:
        Settings.from_env(env)
    assert word in str(err.value)


def test_settings_table_lists_every_env_name():
    table = settings_table()
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "REDIS_URL", "BASIC_AUTH_USER", "MODEL_ARCH", "WEIGHTS_PATH"):
        assert f"`{name}`" in table


def test_docs_settings_page_holds_the_generated_table():
    """docs/settings.md is `livetrain settings` pasted: regenerate it when a setting changes."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert settings_table() in page, (
        "docs/settings.md is out of date: replace its table with the output of `.venv/bin/livetrain settings`")
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", page, re.M))
    assert documented == {f.metadata["env"] for f in dataclasses.fields(Settings)}


def test_uncertainty_setting_accepts_every_measure():
    from backend.inference.uncertainty import MEASURES

    for measure in MEASURES:  # settings keeps its own list (it imports nothing above it): they must agree
        assert Settings.from_env({"UNCERTAINTY": measure}).uncertainty == measure
        assert f"`{measure}`" in Settings.__dataclass_fields__["uncertainty"].metadata["doc"]
    with pytest.raises(ValueError, match="UNCERTAINTY"):
        Settings.from_env({"UNCERTAINTY": "margin"})
