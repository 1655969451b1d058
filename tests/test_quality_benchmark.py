"""The testbed quality benchmark runs end to end on its quick prompt set (one prompt, one seed per set)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_quality_benchmark_quick_run_writes_every_section(tmp_path, load_benchmark):
    quality = load_benchmark("quality")
    out = tmp_path / "quality"
    assert quality.main(["--model", "shapes-sd", "--quick", "--steps", "10", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    for section in ("plain", "multi", "masactrl", "fast"):
        assert f"## {section}" in text and "skipped" not in text.split(f"## {section}")[1].split("##")[0]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["plain"]["single object"]["n"] == 1
    assert 0.0 <= results["plain"]["single object"]["all_present"] <= 1.0
    # every multi-subject method produced a row for the one request
    assert {"plain", "A&E", "A-STAR", "Bounded", "diffusers A&E"} <= set(results["multi"])
    assert 0.0 <= results["masactrl"]["round_trip"]["objects_read_back"] <= 1.0  # the detector read the round trip
    assert out.with_suffix(".png").stat().st_size > 0


def test_multisubject_controls_take_sweep_options_and_refuse_bad_ones(load_benchmark):
    import pytest

    qm = load_benchmark("quality_multisubject")
    objects = [("circle", "red"), ("square", "blue")]
    ae = qm.make_control("A&E", objects, {"scale_factor": 5, "token_mode": "subjects"})
    assert ae.scale_factor == 5.0 and ae.token_mode == "subjects" and ae.words == ["circle", "square"]
    assert qm.make_control("A-STAR", objects, None, "phrase").words == ["red circle", "blue square"]
    assert qm.make_control("plain", objects) is None
    with pytest.raises(ValueError, match="plain takes no control arguments"):
        qm.make_control("plain", objects, {"scale_factor": 5})
    with pytest.raises(TypeError, match="scale_fac"):
        qm.make_control("A&E", objects, {"scale_fac": 5})
    with pytest.raises(ValueError, match="subjects must be one of"):
        qm.make_control("A&E", objects, None, "noun")


def test_attencraft_maps_and_ae_peaks_report_on_the_bundled_model(capsys, load_benchmark):
    """The diagnostics behind the AttenCraft and A&E findings run and show them on shapes-sd."""
    import re

    assert load_benchmark("attencraft_maps").main(["--model", "shapes-sd", "--words", "red,magenta"]) == 0
    out = capsys.readouterr().out
    assert "AttenCraft levels: cross 0, self 0" in out and "power 4" in out
    level0 = out.split("cross level 0 (16x16)")[1].split("self level")[0]
    red = [float(v) for v in re.search(r"red\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", level0).groups()]
    assert red[0] > 3 * red[2]  # "red" marks the circle, not the background
    assert load_benchmark("ae_peaks").main(["--model", "shapes-sd", "--seeds", "1", "--steps", "22"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("token_mode=prompt")]
    nouns, colours = (float(re.search(r"step 10 \[([\d.]+)", ln).group(1)) for ln in lines)
    assert nouns < 0.5 < colours  # the noun loses the x100 softmax to its colour word
    # on shapes-sd-clip the nouns win it instead (peaks vs neglect, one prompt and seed: a table row per outcome)
    assert load_benchmark("ae_peaks").main(["--model", "shapes-sd-clip", "--pairs", "1", "--seeds", "2",
                                            "--steps", "22"]) == 0
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| every")
            or ln.startswith("| some")]
    assert sum(int(r[1]) for r in rows) == 2
    assert all(0 < float(v) <= 1 for r in rows for v in r[2:5])


def test_multisubject_runs_diffusers_own_ae_beside_and_leaves_the_unet_as_it_was(load_benchmark):
    """The reference A&E (diffusers' pipeline) starts from the same seeded latents and restores the processors
    it installs on the shared UNet, so methods run after it are untouched."""
    import attnedit

    qm = load_benchmark("quality_multisubject")
    pipe = attnedit.load("shapes-sd")
    before = {k: type(v) for k, v in pipe.pipe.unet.attn_processors.items()}
    objects = [("circle", "red"), ("square", "blue")]
    images = qm.diffusers_ae(pipe, qm.caption(objects), objects, [0], steps=2, guidance=5.0,
                             options={"max_iter_to_alter": 0, "thresholds": {}})  # nothing guided: the plain image
    assert {k: type(v) for k, v in pipe.pipe.unet.attn_processors.items()} == before
    plain = pipe(qm.caption(objects), seed=0, steps=2, guidance=5.0).image
    diff = np.abs(np.asarray(images[0], np.int16) - np.asarray(plain, np.int16))
    assert diff.max() <= 2  # same latents; diffusers' A&E computes attention with bmm, attnedit with SDPA


def test_text_attention_sorts_words_and_single_object_misses(load_benchmark):
    from attnedit.testbed.detector import Detection

    ta = load_benchmark("text_attention")
    assert [ta.word_kind(w) for w in ("a", "red", "circles", "two", "left", "and")] == [
        "article / and", "colour", "shape noun", "count", "relation", "article / and"]
    box = (0.1, 0.1, 0.4, 0.4)
    assert ta.single_miss(("circle", "red"), [Detection("circle", "blue", box, 0.1)]) == "right shape, wrong colour"
    assert ta.single_miss(("circle", "red"), [Detection("star", "red", box, 0.1)]) == "right colour, wrong shape"
    assert ta.single_miss(("circle", "red"), [Detection("star", "green", box, 0.1)]) == "neither"
    assert ta.single_miss(("circle", "red"), []) == "neither"
    from attnedit.testbed.world import parse_prompt

    pairs = ta.pair_prompts(24)
    assert len(set(pairs)) == 24
    for prompt in pairs:  # two objects, distinct shapes and distinct colours, in the world's grammar
        (s1, c1), (s2, c2) = parse_prompt(prompt).objects
        assert s1 != s2 and c1 != c2, prompt


def test_token_swap_splices_states_and_reports_each_variant(tmp_path, load_benchmark):
    import torch

    import attnedit

    ts = load_benchmark("token_swap")
    pipe = attnedit.load("shapes-sd-clip").pipe
    (ea, end), (eb, end_b) = ts.encode(pipe, "a red circle"), ts.encode(pipe, "a blue square")
    ids = pipe.tokenizer("a red circle").input_ids
    assert end == end_b == 4 == ids.index(pipe.tokenizer.eos_token_id)  # start, a, red, circle, end
    mixed = ts.splice(ea, eb, end)
    assert torch.equal(mixed[:, :end], ea[:, :end]) and torch.equal(mixed[:, end:], eb[:, end:])
    # the causal end token has read its caption; the padding after it is caption-free (pretrain-text --pad-weight)
    assert (ea[0, end] - eb[0, end]).norm() > 0.1 * ea[0, end].norm()
    assert torch.allclose(ea[0, end + 1:], eb[0, end + 1:], atol=0.05 * ea[0, end + 1:].norm(dim=-1).max())
    from attnedit.testbed.world import COLOURS, SHAPES

    pairs = ts.caption_pairs(12)
    assert pairs == ts.caption_pairs(12)  # seeded
    for (ca, sa), (cb, sb) in pairs:
        assert ca != cb and sa != sb and {ca, cb} <= set(COLOURS) and {sa, sb} <= set(SHAPES)
    out = tmp_path / "swap.md"
    assert ts.main(["--model", "shapes-sd-clip", "--pairs", "1", "--seeds", "1", "--out", str(out)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == list(ts.VARIANTS)
    for row in rows:  # one image per row: every share is 0 or 1
        assert {float(v) for v in row.strip(" |").split(" | ")[1:]} <= {0.0, 1.0}


def test_text_attention_reports_every_section_on_the_bundled_clip_model(tmp_path, load_benchmark):
    ta = load_benchmark("text_attention")
    out = tmp_path / "ta.md"
    assert ta.main(["--model", "shapes-sd-clip", "--seeds", "1", "--pairs", "2", "--out", str(out)]) == 0
    text = out.read_text()
    shares = [r for r in text.splitlines() if r.startswith(("| single |", "| two objects |"))]
    assert len(shares) == 2 and all(r.endswith("| start |") for r in shares)  # the start token's share largest
    noun = next(r for r in text.splitlines() if r.startswith("| shape noun (own object) |"))
    assert float(noun.split(" | ")[2]) >= 3  # a noun's map marks its object
    assert ta.WRONG_SHAPE in text
    kinds = next(r for r in text.splitlines() if r.startswith("Two-object prompts, missing objects by kind:"))
    assert all(k in kinds for k in ta.PAIR_MISSES)


def test_text_attention_tells_how_a_requested_object_is_missing(load_benchmark):
    from attnedit.testbed.detector import Detection

    ta = load_benchmark("text_attention")
    box = (0.1, 0.1, 0.4, 0.4)
    wanted, other = ("circle", "red"), "square"
    red_star = Detection("star", "red", box, 0.1)
    assert ta.pair_miss(wanted, other, [Detection("circle", "blue", box, 0.1)]) == (ta.PAIR_MISSES[0], None)
    # the red went to the other requested object: a binding leak, no stand-in
    assert ta.pair_miss(wanted, other, [Detection("square", "red", box, 0.1)]) == (ta.PAIR_MISSES[1], None)
    # a red star nobody asked for stands in for the red circle (also when a red square is there too)
    assert ta.pair_miss(wanted, other, [Detection("square", "red", box, 0.1), red_star]) == (ta.PAIR_MISSES[2],
                                                                                              red_star)
    assert ta.pair_miss(wanted, other, [Detection("star", "green", box, 0.1)]) == (ta.PAIR_MISSES[3], None)
    assert ta.pair_miss(wanted, other, []) == (ta.PAIR_MISSES[3], None)


def test_quality_multisubject_counts_what_a_method_fixes_and_breaks(load_benchmark):
    from attnedit.testbed.detector import PAIR_MISSES, PRESENT, Detection, pair_outcome

    qm = load_benchmark("quality_multisubject")
    box = (0.1, 0.1, 0.4, 0.4)
    objects = [("circle", "red"), ("square", "blue")]
    red_circle, blue_square = Detection("circle", "red", box, 0.1), Detection("square", "blue", box, 0.1)
    red_star = Detection("star", "red", box, 0.1)
    assert pair_outcome(("circle", "red"), "square", [red_circle]) == PRESENT
    plain = {**qm.outcomes(0, 0, objects, [red_star, blue_square]), **qm.outcomes(0, 1, objects, [])}
    assert plain == {(0, 0, 0): PAIR_MISSES[2], (0, 0, 1): PRESENT, (0, 1, 0): PAIR_MISSES[3],
                     (0, 1, 1): PAIR_MISSES[3]}
    # the method fixes the stand-in and one absent object, and loses the square plain drew on seed 0
    method = {**qm.outcomes(0, 0, objects, [red_circle]), **qm.outcomes(0, 1, objects, [blue_square])}
    moves = qm.from_plain(plain, method)  # (objects, drawn right, drawn the same way as plain)
    assert moves[PRESENT] == (1, 0, 0) and moves[PAIR_MISSES[2]] == (1, 1, 0) and moves[PAIR_MISSES[3]] == (2, 1, 1)
    assert moves[PAIR_MISSES[0]] == (0, 0, 0)
    assert qm.outcomes(0, 0, [*objects, ("star", "green")], []) == {}  # three-object prompts are not split
    assert qm.from_plain({}, {}) == {}
    with pytest.raises(ValueError, match="different shapes and colours"):
        qm.outcomes(0, 0, [("circle", "red"), ("square", "red")], [])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        qm.next_seed(plain, [0])
    # the control: plain from the next seed (seed 1 -> 0, wrapping): the stand-in stays missing, one absent object
    # of seed 1 comes back as seed 0's present square
    again = qm.from_plain(plain, qm.next_seed(plain, [0, 1]))
    assert again[PAIR_MISSES[3]] == (2, 1, 0) and again[PRESENT] == (1, 0, 0) and again[PAIR_MISSES[2]] == (1, 0, 0)
    text = qm.from_plain_table({"plain": {"from_plain": again}, "A&E": {"from_plain": moves}})
    assert "| what plain drew for a requested object | objects | plain, next seed, draws it | A&E draws it |" in text
    assert "| neither | 2 | 1 (50%); same miss 0 (0%) | 1 (50%); same miss 1 (50%) |" in text
    assert f"| {PAIR_MISSES[0]} | 0 | - | - |" in text and "| present | 1 | 0 (0%) | 0 (0%) |" in text


def test_quality_multisubject_evaluate_attaches_the_per_object_table_and_its_control(load_benchmark):
    """`evaluate` pairs each method's objects with plain's from the same seed, and plain with itself from the next
    seed (a stub pipeline and detector: the image is (guided?, seed) and the detector reads a fixed scene)."""
    from types import SimpleNamespace

    from attnedit.testbed.detector import PAIR_MISSES, PRESENT, Detection

    qm = load_benchmark("quality_multisubject")
    box = (0.1, 0.1, 0.4, 0.4)
    red_circle, red_star, blue_square = (Detection(s, c, box, 0.1) for s, c in
                                         (("circle", "red"), ("star", "red"), ("square", "blue")))
    scenes = {(False, 0): [red_circle, blue_square], (False, 1): [red_star, blue_square],
              (True, 0): [], (True, 1): [red_circle, blue_square]}

    def pipe(text, controls, seed, num_images, steps, guidance):
        return SimpleNamespace(images=[(bool(controls), s) for s in seed])

    summary = qm.evaluate(pipe, methods=["plain", "A&E"], requests=[[("circle", "red"), ("square", "blue")]],
                          seeds=[0, 1], steps=2, detect=lambda image: scenes[image])
    # A&E loses both objects of seed 0, keeps seed 1's square and turns its red star into the red circle
    assert summary["A&E"]["from_plain"][PRESENT] == (3, 1, 1)
    assert summary["A&E"]["from_plain"][PAIR_MISSES[2]] == (1, 1, 0)
    # plain from the next seed: seed 0's circle is seed 1's star (lost), both squares stay, the star becomes a circle
    assert summary["plain"]["from_plain"][PRESENT] == (3, 2, 2)
    assert summary["plain"]["from_plain"][PAIR_MISSES[2]] == (1, 1, 0)
    assert summary["A&E"]["recall"] == 0.5 and summary["plain"]["recall"] == 0.75
    # a request the per-object kinds cannot read is refused before any image is generated
    calls = []
    with pytest.raises(ValueError, match="different shapes and colours"):
        qm.evaluate(lambda *a, **k: calls.append(a), methods=["plain"], seeds=[0, 1], detect=lambda image: [],
                    requests=[[("circle", "red"), ("square", "blue")], [("circle", "red"), ("star", "red")]])
    assert calls == []


def test_benchmark_report_prints_keeps_and_writes_the_same_lines(tmp_path, capsys, load_benchmark):
    report = load_benchmark("report")
    log = report.Report("demo.py", ["--seeds", "2"])
    assert log.command == "python benchmarks/demo.py --seeds 2"
    log("# title\n")
    log()
    log("| a | b |")
    assert capsys.readouterr().out == "# title\n\n\n| a | b |\n"
    log.save(None)  # no --out: nothing written
    assert not any(tmp_path.iterdir())
    out = tmp_path / "sub" / "r.md"
    log.save(str(out))
    assert out.read_text() == "# title\n\n\n| a | b |\n"
