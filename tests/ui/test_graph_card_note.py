"""A cross-layer feature's card says its output tokens come from its decoder rows summed over the layers it writes
into; a per-layer feature's card has no such line."""
from desktop_app.engine.sae.dashboards import FeatureDashboard, dashboards_from_list, dashboards_to_list
from desktop_app.ui.graph_card import card_html


def test_card_names_the_summed_decoder_rows():
    note = "decoder rows summed over layers 0..1 (its total write into the residual stream)"
    clt = FeatureDashboard(feature=3, layer=0, promoted=[("a", 1.0)], suppressed=[("b", -1.0)], output_note=note)
    plain = FeatureDashboard(feature=3, layer=0, promoted=[("a", 1.0)], suppressed=[("b", -1.0)])
    assert "summed over layers 0..1" in card_html(clt)
    assert "summed over" not in card_html(plain) and "output tokens of" not in card_html(plain)
    assert dashboards_from_list(dashboards_to_list([clt, plain])) == [clt, plain]
    old = plain.to_dict()
    del old["output_note"]  # cards saved before the field existed still open
    assert FeatureDashboard.from_dict(old) == plain
