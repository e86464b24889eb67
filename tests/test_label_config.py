import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.label_config import parse_label_config
from tests.conftest import BOX_CONFIG


def test_rectangle_labels_bound_to_image():
    config = parse_label_config(BOX_CONFIG)
    tag = config.primary
    assert (tag.from_name, tag.to_name, tag.value_key) == ("label", "image", "image")
    assert tag.labels == ("Square", "Disc")
    assert tag.score_threshold == 0.5
    assert tag.result_type == "rectanglelabels" and tag.task == "boxes"


def test_polygon_brush_and_predicted_values():
    xml = """<View>
      <Header value="Label the facade"/>
      <Image name="photo" value="$url"/>
      <Choices name="quality" toName="photo"><Choice value="good"/></Choices>
      <PolygonLabels name="poly" toName="photo"><Label value="Window" predicted_values="window, pane"/><Label value="Door"/></PolygonLabels>
      <BrushLabels name="brush" toName="photo"><Label value="Wall"/></BrushLabels>
    </View>"""
    config = parse_label_config(xml)
    assert [c.tag_type for c in config.controls] == ["PolygonLabels", "BrushLabels"]
    poly = config.primary
    assert poly.value_key == "url" and poly.task == "masks" and poly.score_threshold is None
    assert poly.label_for("pane") == "Window" and poly.label_for("Door") == "Door" and poly.label_for("cat") is None


@pytest.mark.parametrize(
    "xml, words",
    [
        ("", ["empty"]),
        ("<View><Image name='i' value='$i'/>", ["not valid XML"]),
        ("<View><Text name='t' value='$t'/><Labels name='l' toName='t'><Label value='A'/></Labels></View>", ["Labels", "RectangleLabels"]),
        # bound to something that is not an Image
        ("<View><Text name='t' value='$t'/><RectangleLabels name='l' toName='t'><Label value='A'/></RectangleLabels></View>", ["RectangleLabels"]),
        # no labels at all
        ("<View><Image name='i' value='$i'/><RectangleLabels name='l' toName='i'></RectangleLabels></View>", ["Label value"]),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', ["DOCTYPE"]),
        ("<View><Image name='i' value='$i'/><RectangleLabels name='l' toName='i' model_score_threshold='high'><Label value='A'/></RectangleLabels></View>", ["model_score_threshold"]),
    ],
)
def test_unusable_configs_say_how_to_fix(xml, words):
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    assert err.value.status == 400
    for word in words:
        assert word in err.value.message
