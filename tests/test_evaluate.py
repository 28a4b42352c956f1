"""Evaluation metrics against hand-computed cases and BLIP's naive full-matrix itm_eval, and the
`vtfusion eval` report end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from search.evaluate import paired_p, rank_direction, recall_at, rerank_ranks


def test_recall_and_rerank_by_hand():
    assert recall_at([1, 2, 6, np.inf], ks=(1, 5, 10)) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    groups = np.array([3, 1, 2, 1])  # candidates' groups in ITC order; target group 1
    itc = np.array([0.9, 0.8, 0.7, 0.6])
    itm = np.array([0.0, -5.0, 5.0, 9.0])
    assert rerank_ranks(groups, itc, itm, 1, 0, "itm+itc")[0] == 2  # ITC: second
    # depth 4, fused: [0.9, -4.2, 5.7, 9.6] -> order 3, 2, 0, 1 -> group 1 first at rank 1
    rank, order = rerank_ranks(groups, itc, itm, 1, 4, "itm+itc")
    assert rank == 1 and order.tolist() == [3, 2, 0, 1]
    # depth 2: only the first two are reordered ([0.9, -4.2] keeps 0 first), the tail stays
    assert rerank_ranks(groups, itc, itm, 1, 2, "itm")[1].tolist() == [0, 1, 2, 3]
    assert rerank_ranks(groups, itc, itm, 7, 4, "itm")[0] == np.inf


def test_exact_ranks_mrr_and_ndcg_by_hand():
    """One image query over 14 captions in 3 groups; its two captions rank 2 and 13 by ITC (the
    second far past the candidate depth 4), with a tie broken by gallery position."""
    q = np.array([[1.0, 0.0]], np.float32)
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1], np.float32)
    db = np.stack([sims, np.zeros_like(sims)], axis=1)  # q @ db.T == sims
    groups = np.array([2, 0, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 0, 2])  # group 0: positions 1 and 12
    itm = np.array([-9.0, 9.0, 0.0, 0.0])  # depth 4 brings position 1 to the top
    first, ndcg, rr = rank_direction(q, db, groups, np.array([0]), [0, 4], "itm", lambda qi, cand: itm[: len(cand)])
    assert first == {0: [2], 4: [1]} and rr == {0: {"0": 0.5}, 4: {"0": 1.0}}
    idcg = 1 + 1 / np.log2(3)
    assert ndcg[0][0] == pytest.approx((1 / np.log2(3)) / idcg) and ndcg[4][0] == pytest.approx(1 / idcg)
    # the tie at 0.3 (positions 6, 7, 8): position 6 is ranked first of the three, at 7
    first, _, _ = rank_direction(q, db, groups, np.array([1]), [0], "itm", None)
    assert first[0] == [7]
    assert paired_p({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}) == 1.0
    assert paired_p({str(i): 1.0 for i in range(30)}, {str(i): 0.0 for i in range(30)}) < 1e-3


def _blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's train_retrieval.itm_eval, verbatim in spirit: full matrices, argsort per row."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr, ir


@pytest.mark.parametrize("depth", [0, 16])
def test_streamed_ranks_equal_blip_full_matrix(depth):
    rng = np.random.default_rng(0)
    n_img, caps = 40, 3
    img = rng.normal(size=(n_img, 8)).astype(np.float32)
    txt2img = np.repeat(np.arange(n_img), caps)
    txt = (img[txt2img] + 1.2 * rng.normal(size=(len(txt2img), 8))).astype(np.float32)
    img2txt = [list(np.nonzero(txt2img == i)[0]) for i in range(n_img)]
    itm = rng.normal(size=(n_img, len(txt2img))).astype(np.float32) * 0.5  # a fixed "ITM" table
    sim = img @ txt.T  # (images, texts)

    # BLIP: ITC everywhere, plus ITM on each query's top-k (-100 elsewhere when reranked)
    s_i2t, s_t2i = sim.copy(), sim.T.copy()
    if depth:
        s_i2t = np.full_like(sim, -100.0)
        for i in range(n_img):
            top = np.argsort(-sim[i], kind="stable")[:depth]
            s_i2t[i, top] = itm[i, top] + sim[i, top]
        s_t2i = np.full_like(sim.T, -100.0)
        for t in range(len(txt2img)):
            top = np.argsort(-sim[:, t], kind="stable")[:depth]
            s_t2i[t, top] = itm[top, t] + sim[top, t]
    tr, ir = _blip_itm_eval(s_i2t, s_t2i, txt2img, img2txt)

    depths = [0, depth] if depth else [0]
    i2t_ranks, _, _ = rank_direction(img, txt, txt2img, np.arange(n_img), depths, "itm+itc",
                                     lambda qi, cand: itm[qi, cand], chunk=7)
    t2i_ranks, _, _ = rank_direction(txt, img, np.arange(n_img), txt2img, depths, "itm+itc",
                                     lambda qi, cand: itm[cand, qi], chunk=7)
    mine_tr = list(recall_at(i2t_ranks[depth]).values())
    mine_ir = list(recall_at(t2i_ranks[depth]).values())
    np.testing.assert_allclose(mine_tr, tr)
    np.testing.assert_allclose(mine_ir, ir)


def _oracle(sim, itm, groups, targets, depth, fusion="itm+itc"):
    """From the definitions, on full matrices: each query's full ranking (ITC order, ties by
    gallery position; the top ``depth`` reordered by the fused score, ties by ITC order), then
    R@K from the first relevant item, MRR, and nDCG@10 over every relevant item."""
    from search.rerank import fuse

    first, rr, ndcg = [], [], []
    for qi in range(sim.shape[0]):
        itc_order = sorted(range(sim.shape[1]), key=lambda j: (-sim[qi, j], j))
        head = itc_order[:depth]
        fused = fuse(sim[qi, head], itm[qi, head], fusion, 1.0)
        head = [head[i] for i in sorted(range(len(head)), key=lambda i: (-fused[i], i))]
        ranking = head + itc_order[depth:]
        rel_ranks = [pos + 1 for pos, j in enumerate(ranking) if groups[j] == targets[qi]]
        first.append(min(rel_ranks))
        rr.append(1 / min(rel_ranks))
        dcg = sum(1 / np.log2(r + 1) for r in rel_ranks if r <= 10)
        ndcg.append(dcg / sum(1 / np.log2(i + 2) for i in range(min(10, len(rel_ranks)))))
    return first, rr, ndcg, ranking


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_an_oracle_and_ir_measures_on_the_full_ranking(seed):
    """Random scores rounded to a few levels (heavy ties), several captions per image, positives
    far past every depth: R@K, MRR and nDCG@10 in both directions equal a from-the-definitions
    oracle and ir_measures run on the full rankings, to the last bit; ITC only is the same
    whatever depths are asked for."""
    import ir_measures
    from ir_measures import RR, Qrel, ScoredDoc, nDCG

    rng = np.random.default_rng(seed)
    n_img, caps, dim = 30, 3, 6
    img = np.round(rng.normal(size=(n_img, dim)), 0).astype(np.float32)  # integer vectors: many equal scores
    txt2img = np.repeat(np.arange(n_img), caps)
    txt = np.round(img[txt2img] * 0.3 + rng.normal(size=(len(txt2img), dim)), 0).astype(np.float32)
    itm = np.round(rng.normal(size=(n_img, len(txt2img))), 1).astype(np.float32)
    for q_emb, db_emb, groups, targets, table in (
        (img, txt, txt2img, np.arange(n_img), itm),  # image -> text: every caption relevant
        (txt, img, np.arange(n_img), txt2img, itm.T),  # text -> image
    ):
        sim = q_emb @ db_emb.T
        first_all, ndcg_all, rr_all = rank_direction(q_emb, db_emb, groups, targets, [0, 4, 16], "itm+itc",
                                                     lambda qi, cand: table[qi, cand], chunk=11)
        first_itc, _, _ = rank_direction(q_emb, db_emb, groups, targets, [0], "itm+itc", None, chunk=5)
        assert first_itc[0] == first_all[0]
        for depth in (0, 4, 16):
            first, rr, ndcg = [], [], []
            qrels, run = [], []
            for qi in range(len(q_emb)):
                f, r, n, ranking = _oracle(sim[qi : qi + 1], table[qi : qi + 1], groups, targets[qi : qi + 1], depth)
                first += f
                rr += r
                ndcg += n
                qrels += [Qrel(str(qi), str(j), 1) for j in np.flatnonzero(groups == targets[qi])]
                run += [ScoredDoc(str(qi), str(j), float(len(ranking) - pos)) for pos, j in enumerate(ranking)]
            assert first_all[depth] == first
            assert recall_at(first_all[depth]) == recall_at(first)
            assert [rr_all[depth][str(q)] for q in range(len(q_emb))] == rr
            assert max(abs(a - b) for a, b in zip(ndcg_all[depth], ndcg)) < 1e-12
            agg = ir_measures.calc_aggregate([RR, nDCG @ 10], qrels, run)
            assert abs(agg[RR] - np.mean(rr)) < 1e-12 and abs(agg[nDCG @ 10] - np.mean(ndcg_all[depth])) < 1e-12
        assert max(first_all[0]) > 16  # some positives lie past every depth


def test_eval_command_writes_the_report(tmp_path, model_dir, small_catalog):
    from typer.testing import CliRunner

    from ui.cli import app

    runner = CliRunner()
    col = str(tmp_path / "col")
    assert runner.invoke(app, ["init", col, "--model", str(model_dir)]).exit_code == 0
    # a pairs CSV with two captions for some images
    rows = list(csv.DictReader(open(small_catalog / "test.csv")))
    pairs = tmp_path / "pairs.csv"  # absolute image paths: the pairs file lives elsewhere
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for r in rows:
            w.writerow([small_catalog / r["image"], r["caption"]])
        for r in rows[:3]:
            w.writerow([small_catalog / r["image"], r["title"]])
    out = tmp_path / "report"
    r = runner.invoke(app, ["eval", col, str(pairs), "--depths", "0,4,8", "--out", str(out), "--latency-queries", "5"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["images"] == len(rows) and rep["texts"] == len(rows) + 3
    for d in ("t2i", "i2t"):
        assert set(rep[d]) == {"itc", "rerank@4", "rerank@8"}
        assert {"R@1", "R@5", "R@10", "MRR", "nDCG@10"} <= set(rep[d]["itc"])
        assert "p_value_vs_itc" in rep[d]["rerank@4"]
    for key in ("latency_ms", "latency_ms_i2t"):  # text -> image and image -> text searches, each timed per depth
        assert set(rep[key]) == {"itc", "rerank@4", "rerank@8"}
        assert {"encode", "retrieve", "rerank", "total"} <= set(rep[key]["rerank@8"])
        assert rep[key]["rerank@8"]["rerank"]["mean"] > rep[key]["itc"]["rerank"]["mean"]  # reranking really ran
    md = (out / "report.md").read_text()
    i2t_rows = md.split("## image → text")[1].splitlines()
    row8 = next(line for line in i2t_rows if line.startswith("| rerank@8 "))
    assert row8.split("|")[-3].strip() == f"{rep['latency_ms_i2t']['rerank@8']['total']['mean']:.1f}"
    assert (out / "report.md").read_text().startswith("# Reranking evaluation")
    assert (out / "recall_vs_depth.png").stat().st_size > 1000 and (out / "latency_vs_depth.png").exists()
    assert "R@1" in r.output
    # evaluating again ingests nothing new
    r = runner.invoke(app, ["stats", col, "--json"])
    n = json.loads(r.stdout)["items_active"]
    runner.invoke(app, ["eval", col, str(pairs), "--depths", "0,4", "--out", str(out), "--latency-queries", "2"])
    assert json.loads(runner.invoke(app, ["stats", col, "--json"]).stdout)["items_active"] == n
    # recall only: no latency measured, no latency plot, no crash
    r = runner.invoke(app, ["eval", col, str(pairs), "--depths", "0,4", "--out", str(tmp_path / "quick"), "--latency-queries", "0"])
    assert r.exit_code == 0, r.output
    quick = json.loads((tmp_path / "quick" / "report.json").read_text())
    assert quick["latency_ms"] == quick["latency_ms_i2t"] == {}
    assert not (tmp_path / "quick" / "latency_vs_depth.png").exists()


def test_blip_annotation_json_and_wrong_formats(tmp_path):
    from search.evaluate import read_pairs

    (tmp_path / "ann.json").write_text(json.dumps([
        {"image": "img/a.png", "caption": ["a red mug", "a mug, red"], "image_id": "a"},
        {"image": "img/b.png", "caption": "a blue hat"},
    ]))
    pairs = read_pairs(tmp_path / "ann.json")
    assert [(p.image.name, p.caption, p.line) for p in pairs] == [("a.png", "a red mug", 1), ("a.png", "a mug, red", 1), ("b.png", "a blue hat", 2)]
    for bad in ('{"annotations": []}', '[{"file": "x.png", "text": "y"}]', "[1, 2]", "{not json"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="BLIP/ALBEF annotation JSON"):
            read_pairs(tmp_path / "bad.json")
