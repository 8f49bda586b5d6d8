"""softtopk.nn.SoftKNN, soft_knn, knn_predict: against a brute-force kNN written here (a loop over the queries,
distances by torch.dist, a stable sort)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from softtopk.nn import SoftKNN, knn_predict, soft_knn


def brute_knn(query, reference, labels, k, num_classes, exclude_self=False):
    """(votes (m, C) = fraction of the k nearest in each class, predicted labels (m,) with the documented tie rule:
    among the most voted classes, the one of the nearest neighbour)."""
    votes, preds = [], []
    for i, q in enumerate(query):
        d = [(float(torch.dist(q, r)), j) for j, r in enumerate(reference) if not (exclude_self and j == i)]
        nearest = [j for _, j in sorted(d)[:k]]
        count = [0] * num_classes
        for j in nearest:
            count[int(labels[j])] += 1
        votes.append([c / k for c in count])
        top = max(count)
        preds.append(next(int(labels[j]) for j in nearest if count[int(labels[j])] == top))
    return torch.tensor(votes, dtype=query.dtype), torch.tensor(preds)


def knn_data(m=7, n=12, d=3, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(m, d, generator=g, dtype=dtype)
    reference = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return query, reference, labels


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_knn_exact_in_eval_hard_and_small_temperature(k):
    query, reference, labels = knn_data()
    votes, preds = brute_knn(query, reference, labels, k, 3)
    knn = SoftKNN(k, temperature=1e-4)
    assert torch.equal(knn.eval()(query, reference, labels, num_classes=3), votes)
    assert torch.equal(soft_knn(query, reference, labels, k, num_classes=3, method="hard"), votes)
    assert torch.equal(knn_predict(query, reference, labels, k), preds)
    for method in ("sigmoid", "dftopk", "lapsum", "sparse", "soft"):
        soft = soft_knn(query, reference, labels, k, num_classes=3, method=method, temperature=1e-4)
        torch.testing.assert_close(soft, votes, rtol=0, atol=1e-6)
    torch.testing.assert_close(knn.train()(query, reference, labels, num_classes=3), votes, rtol=0, atol=1e-6)


def test_knn_predict_breaks_ties_towards_the_nearest_neighbour():
    reference = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[0.1], [1.4], [3.7], [1.6]])
    # k = 2: at 1.4, 3.7 and 1.6 two classes get one vote each: the nearest neighbour's wins (not the smaller label)
    assert knn_predict(query, reference, labels, 2).tolist() == [0, 0, 2, 1]
    # k = 4 at 1.6: classes 0 and 1 get two votes each; the nearest reference, 2.0, is of class 1
    assert knn_predict(query[3:], reference, labels, 4).tolist() == [1]
    for k in (2, 3, 4):
        _, preds = brute_knn(query, reference, labels, k, 3)
        assert torch.equal(knn_predict(query, reference, labels, k), preds)
        votes = SoftKNN(k).eval()(query, reference, labels)
        top = votes.max(-1, keepdim=True).values
        assert bool(votes.gather(-1, preds[:, None]).eq(top).all())  # the prediction is one of the argmaxes


def test_knn_exclude_self():
    _, reference, labels = knn_data(n=10, seed=1)
    for k in (1, 3):
        votes, preds = brute_knn(reference, reference, labels, k, 3, exclude_self=True)
        assert torch.equal(SoftKNN(k, exclude_self=True).eval()(reference, reference, labels, num_classes=3), votes)
        assert torch.equal(knn_predict(reference, reference, labels, k, exclude_self=True), preds)
        soft = soft_knn(reference, reference, labels, k, num_classes=3, temperature=1e-4, exclude_self=True)
        torch.testing.assert_close(soft, votes, rtol=0, atol=1e-6)
    # without exclude_self each point is its own nearest neighbour
    assert torch.equal(knn_predict(reference, reference, labels, 1), labels)
    with pytest.raises(ValueError, match=r"soft_knn: `k`=10 is out of range \[1, 9\]"):
        soft_knn(reference, reference, labels, 10, exclude_self=True)
    with pytest.raises(ValueError, match="knn_predict: `exclude_self` needs the query to be the reference"):
        knn_predict(reference[:4], reference, labels, 2, exclude_self=True)


@pytest.mark.parametrize("method", ["sigmoid", "dftopk", "lapsum", "soft", "sparse"])
def test_knn_vote_is_a_distribution_and_gradients_reach_both_embeddings(method):
    query, reference, labels = knn_data()
    q, r = query.clone().requires_grad_(), reference.clone().requires_grad_()
    p = soft_knn(q, r, labels, 3, method=method, temperature=2.0)
    assert p.shape == (7, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(7, dtype=torch.float64))
    assert bool((p >= 0).all())
    (-p.gather(1, labels[:7, None]).clamp_min(1e-12).log()).sum().backward()  # the NLL of some class per query
    for grad in (q.grad, r.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(query, q.detach()) and torch.equal(reference, r.detach())  # inputs not modified


@pytest.mark.parametrize("method", ["sigmoid", "dftopk", "lapsum"])
def test_knn_gradcheck(method):
    query, reference, labels = knn_data(m=4, n=6, d=2)
    q, r = query.requires_grad_(), reference.requires_grad_()
    t = torch.tensor([0.7, 1.0, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda q, r, t: soft_knn(q, r, labels, 2, method=method, temperature=t), (q, r, t))
    assert gradcheck(lambda r: soft_knn(r, r, labels, 2, method=method, exclude_self=True), (r,))


def test_knn_batch_shapes_broadcast():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    reference = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 8), generator=g)
    got = soft_knn(query, reference, labels, 3, num_classes=4, temperature=0.5)
    want = torch.stack([soft_knn(query[b], reference[b], labels[b], 3, num_classes=4, temperature=0.5)
                        for b in range(2)])  # fmt: skip
    assert got.shape == (2, 5, 4)
    torch.testing.assert_close(got, want)
    pred = knn_predict(query, reference, labels, 3)
    assert torch.equal(pred, torch.stack([knn_predict(query[b], reference[b], labels[b], 3) for b in range(2)]))
    # one reference set shared by a batch of query sets
    shared = soft_knn(query, reference[0], labels[0], 3, num_classes=4, temperature=0.5)
    torch.testing.assert_close(shared[1], soft_knn(query[1], reference[0], labels[0], 3, num_classes=4,
                                                   temperature=0.5))  # fmt: skip
    assert torch.equal(knn_predict(query, reference[0], labels[0], 3)[1], knn_predict(query[1], reference[0],
                                                                                       labels[0], 3))  # fmt: skip


def test_knn_num_classes_dtypes_and_straight_through():
    query, reference, labels = knn_data(m=4, n=9)
    p = soft_knn(query, reference, labels, 3, num_classes=6, temperature=0.5)
    assert p.shape == (4, 6) and bool((p[:, 3:] == 0).all())
    assert soft_knn(query, reference, labels, 3).shape == (4, int(labels.max()) + 1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = soft_knn(query.to(dtype), reference.to(dtype), labels, 3, num_classes=3)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert SoftKNN(3).eval()(query.to(dtype), reference.to(dtype), labels).dtype == dtype
    q = query.clone().requires_grad_()
    st = soft_knn(q, reference, labels, 3, num_classes=3, temperature=2.0, straight_through=True)
    assert torch.equal(st.detach(), soft_knn(query, reference, labels, 3, num_classes=3, method="hard"))
    st[:, 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_knn_module_train_eval_and_repr():
    query, reference, labels = knn_data()
    t = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    knn = SoftKNN(3, method="dftopk", temperature=t)
    assert any(p is t for p in knn.parameters())
    soft = knn(query, reference, labels)
    torch.testing.assert_close(soft, soft_knn(query, reference, labels, 3, method="dftopk", temperature=t))
    soft.sum().backward()  # a vote sums to 1: the temperature's gradient is 0 up to rounding, but it is there
    assert t.grad is not None
    exact = knn.eval()(query, reference, labels)
    assert torch.equal(exact, soft_knn(query, reference, labels, 3, method="hard"))
    r = repr(knn)
    assert "k=3" in r and "dftopk" in r and "exclude_self=False" in r
    assert "exclude_self=True" in repr(SoftKNN(2, exclude_self=True, scale="std"))


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(k=0), ValueError, "`k`=0 is out of range"),
        (dict(k=2.0), TypeError, "`k` must be an int"),
        (dict(k=True), TypeError, "`k` must be an int"),
        (dict(k=2, method="nope"), ValueError, "unknown `method`"),
        (dict(k=2, method="hard", temperature=0.5), TypeError, "`temperature`"),
        (dict(k=2, method="hard", scale="std"), TypeError, "`scale`"),
        (dict(k=2, method="sparse", epsilon=0.1), TypeError, "`epsilon`"),
        (dict(k=2, method="soft", epsilon=0.1, temperature=0.5), TypeError, "`temperature`"),
        (dict(k=2, method="soft", epsilon=0.1, scale="std"), TypeError, "`scale`"),
        (dict(k=2, temperature=0.0), ValueError, "`temperature`"),
        (dict(k=2, scale="var"), ValueError, "`scale`"),
        (dict(k=2, exclude_self=1), TypeError, "`exclude_self`"),
        (dict(k=2, straight_through="yes"), TypeError, "`straight_through`"),
        (dict(k=2, max_support=2), ValueError, "`max_support`"),
        (dict(k=2, tol=-1.0), ValueError, "`tol`"),
    ],
)
def test_knn_arguments_checked_at_construction_and_call(kwargs, exc, msg):
    with pytest.raises(exc, match=f"SoftKNN: .*{msg}"):
        SoftKNN(**kwargs)
    query, reference, labels = knn_data()
    with pytest.raises(exc, match=f"soft_knn: .*{msg}"):
        soft_knn(query, reference, labels, **kwargs)


def test_knn_bad_inputs_name_the_argument():
    query, reference, labels = knn_data()
    bad_nan = reference.clone()
    bad_nan[2, 1] = math.nan
    cases = [
        ((query.tolist(), reference, labels, 2), {}, TypeError, "`query` must be a torch.Tensor"),
        ((query.long(), reference, labels, 2), {}, TypeError, "`query` must have a floating dtype"),
        ((query[0], reference, labels, 2), {}, ValueError, r"`query` must have shape \(..., n_query, dim\)"),
        ((query, bad_nan, labels, 2), {}, ValueError, "`reference` contains NaN"),
        ((query, reference[:, :2], labels, 2), {}, ValueError, "`query` and `reference` must have the same"),
        ((query, reference.float(), labels, 2), {}, ValueError, "`query` and `reference` must have the same"),
        ((query, reference, labels.double(), 2), {}, TypeError, "`labels` must be an integer tensor"),
        ((query, reference, labels[:5], 2), {}, ValueError, r"`labels` must have shape \(..., n_reference\)"),
        ((query, reference.expand(2, 12, 3), labels.expand(3, 12), 2), {}, ValueError, r"`labels` must have shape"),
        ((query, reference, labels - 1, 2), {}, ValueError, r"`labels` must hold class indices"),
        (
            (query, reference, labels, 2),
            {"num_classes": 2},
            ValueError,
            r"`labels` must hold class indices in \[0, 1\]",
        ),
        ((query, reference, labels, 2), {"num_classes": 0}, ValueError, "`num_classes` must be None or a positive"),
        ((query, reference, labels, 13), {}, ValueError, r"`k`=13 is out of range \[1, 12\]"),
    ]
    for args, kw, exc, msg in cases:
        for fn, name in ((soft_knn, "soft_knn"), (knn_predict, "knn_predict")):
            with pytest.raises(exc, match=f"{name}: {msg}"):
                fn(*args, **kw)
        if args[3] == 2:  # the module's own k
            with pytest.raises(exc, match=msg):
                SoftKNN(2).eval()(*args[:3], **kw)


def test_knn_compiles_fullgraph_with_num_classes():
    """With ``num_classes`` given nothing reads the data: soft_knn and knn_predict trace into one graph."""
    query, reference, labels = knn_data()
    torch._dynamo.reset()
    soft = torch.compile(
        lambda q, r: soft_knn(q, r, labels, 3, num_classes=3, temperature=0.5), backend="eager", fullgraph=True
    )
    torch.testing.assert_close(soft(query, reference), soft_knn(query, reference, labels, 3, num_classes=3,
                                                                 temperature=0.5), rtol=1e-8, atol=1e-10)  # fmt: skip
    pred = torch.compile(lambda q, r: knn_predict(q, r, labels, 3, num_classes=3), backend="eager", fullgraph=True)
    assert torch.equal(pred(query, reference), knn_predict(query, reference, labels, 3))
