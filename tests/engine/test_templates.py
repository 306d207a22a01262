"""Template families: deterministic per seed, the corruption rules, and named positions."""
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.engine.templates import factual_pairs, fill, generate, greater_than_pairs, ioi_pairs

TABLE = [("Paris", "France"), ("Rome", "Italy"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Lyon", "France")]


@pytest.mark.parametrize("family,options", [("ioi", {}), ("greater_than", {}), ("factual", {"table": TABLE})])
def test_deterministic_with_a_seed(family, options):
    a = generate(family, 6, seed=4, **options)
    b = generate(family, 6, seed=4, **options)
    c = generate(family, 6, seed=5, **options)
    assert a.pairs == b.pairs
    assert a.pairs != c.pairs
    assert len({(p.clean, p.corrupted) for p in a.pairs}) == 6


def test_fill_reports_spans():
    text, spans = fill("{A} and {B}, {A}", {"A": "Mary", "B": "John"})
    assert text == "Mary and John, Mary" and spans == {"A": (0, 4), "B": (9, 13)}
    with pytest.raises(SpecError, match=r"uses \{C\}"):
        fill("{C}", {"A": "x"})


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
def test_ioi_orders_and_abc_corruption(order):
    for p in ioi_pairs(20, seed=1, order=order).pairs:
        io, s = p.answer.strip(), p.wrong_answer.strip()
        spans = {name: (c, k) for name, c, k in p.spans}
        name_at = lambda text, span: text[span[0]:span[1]]  # noqa: E731
        assert name_at(p.clean, spans["IO"][0]) == io
        assert name_at(p.clean, spans["S1"][0]) == name_at(p.clean, spans["S2"][0]) == s
        assert (spans["IO"][0][0] < spans["S1"][0][0]) == (order == "ABBA")
        c = [name_at(p.corrupted, spans[r][1]) for r in ("IO", "S1", "S2")]
        assert len(set(c)) == 3 and not set(c) & {io, s}  # three new, distinct names
        back = p.corrupted  # putting the clean names back into the corrupted slots gives the clean prompt
        for role in sorted(("IO", "S1", "S2"), key=lambda r: -spans[r][1][0]):
            (a, b) = spans[role][1]
            back = back[:a] + (io if role == "IO" else s) + back[b:]
        assert back == p.clean


def test_greater_than_answer_sets():
    for p in greater_than_pairs(10, seed=0).pairs:
        (_, (cs, ce), (ks, ke)), = p.spans
        yy = int(p.clean[cs:ce])
        assert p.corrupted[ks:ke] == "01"
        assert set(p.answers()) == {f"{y:02d}" for y in range(yy + 1, 100)}
        assert set(p.wrongs()) == {f"{y:02d}" for y in range(0, yy + 1)}


def test_factual_corruption_uses_another_attribute():
    attrs = dict(TABLE)
    for p in factual_pairs(8, TABLE, seed=0).pairs:
        (_, (cs, ce), (ks, ke)), = p.spans
        subj, other = p.clean[cs:ce], p.corrupted[ks:ke]
        assert p.answer == " " + attrs[subj] and p.wrong_answer == " " + attrs[other] and p.answer != p.wrong_answer
    with pytest.raises(SpecError, match="only"):
        factual_pairs(100, TABLE[:2], seed=0)
    with pytest.raises(SpecError, match="at least two different attributes"):
        factual_pairs(2, [("Paris", "France"), ("Lyon", "France")])


def test_ioi_repeated_names_never_fill_two_roles():
    names = ["Mary", "Mary", "John", "Mary", "Alice", "Bob", "Sarah"]  # five different names, one repeated
    for p in ioi_pairs(30, seed=2, names=names).pairs:
        roles = {name: (p.clean[c[0]:c[1]], p.corrupted[k[0]:k[1]]) for name, c, k in p.spans}
        used = [roles["IO"][0], roles["S1"][0]] + [roles[r][1] for r in ("IO", "S1", "S2")]
        assert len(set(used)) == 5
    with pytest.raises(SpecError, match="at least 5 different names"):
        ioi_pairs(3, names=["Mary", "Mary", "John", "Alice", "Bob"])
