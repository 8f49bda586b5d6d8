"""softtopk.nn.SoftTopK: the nn.Module form of topk_mask (moved out of the package root), its construction-time
checks, and hard_in_eval (the exact top-k mask in eval(), the soft mask in train())."""

from __future__ import annotations

import importlib

import pytest
import torch

import softtopk
from conftest import METHOD_VARIANTS, run, variant_kwargs
from softtopk.nn import SoftTopK

topk_mask = softtopk.topk_mask
ALL_VARIANTS = list(METHOD_VARIANTS)


def test_module_lives_in_nn():
    assert not hasattr(softtopk, "SoftTopK")  # softtopk.SoftTopK is gone: softtopk.nn.SoftTopK
    assert issubclass(SoftTopK, torch.nn.Module)
    assert importlib.import_module("softtopk.nn").SoftTopK is SoftTopK


def test_keyword_only_after_k():
    with pytest.raises(TypeError):
        SoftTopK(2, "sigmoid")
    with pytest.raises(TypeError):
        SoftTopK(2, "sigmoid", 0.5)
    SoftTopK(2, method="sigmoid", temperature=0.5)
    SoftTopK(k=2)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_module_agrees_with_function(variant):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    kt = torch.tensor([[1, 2, 3, 0, 1]] * 4)  # one k per row of the (4, 5) batch when dim=1
    for k, dim, largest, t in (
        (2, -1, True, 0.5),
        (1, 0, False, 2.0),
        (kt, 1, True, 1.0),
        (kt.unsqueeze(1), 1, False, 1.0),
    ):
        kw = variant_kwargs(variant, temperature=t, dim=dim, largest=largest)
        mod = SoftTopK(k, **kw)
        assert isinstance(mod, torch.nn.Module)
        assert torch.equal(mod(x), topk_mask(x, k, **kw))
        assert torch.equal(mod.eval()(x), topk_mask(x, k, **kw))  # hard_in_eval=False: eval() changes nothing
        repr(mod)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum"])
def test_module_scale_and_max_support_agree_with_function(variant):
    x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(19)) * 5 + 2
    for kw in ({"scale": "std"}, {"max_support": 6}, {"scale": "std", "max_support": 4}):
        mod = SoftTopK(3, **variant_kwargs(variant, temperature=0.4, **kw))
        assert torch.equal(mod(x), run(x, 3, variant, temperature=0.4, **kw))


def test_module_temperature_parameter():
    t = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    mod = SoftTopK(3, method="sigmoid", temperature=t)
    assert any(p is t for p in mod.parameters()) or mod.temperature is t
    x = torch.randn(2, 8, dtype=torch.float64)
    (mod(x) * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad != 0


def test_module_validates_method_options_temperature_at_construction():
    with pytest.raises(ValueError, match="`method`"):
        SoftTopK(2, method="nope")
    with pytest.raises(ValueError, match="`method`"):
        SoftTopK(2, method="straight_through")  # now SoftTopK(2, method="sigmoid", straight_through=True)
    with pytest.raises(TypeError):
        SoftTopK(2, method="sigmoid", p=2)
    with pytest.raises(TypeError):
        SoftTopK(2, method="hard", tol=1e-3)
    for t in (0.0, -1.0, torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="`temperature`"):
            SoftTopK(2, temperature=t)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(k=-1), ValueError),
        (dict(k="3"), TypeError),
        (dict(k=2.5, method="hard"), ValueError),
        (dict(k=2.5, method="sigmoid", straight_through=True), ValueError),
        (dict(k=2, largest="yes"), TypeError),
        (dict(k=2, dim=1.5), TypeError),
        (dict(k=2, method="sparse", p=3), ValueError),
        (dict(k=2, tol=-1.0), ValueError),
        (dict(k=2, max_iter=0), ValueError),
        (dict(k=2, method="hard", temperature=0.5), TypeError),
        (dict(k=2, method="hard", scale="std"), TypeError),
        (dict(k=2, method="hard", straight_through=True), TypeError),
        (dict(k=2, method="sparse", epsilon=0.1), TypeError),
        (dict(k=2, method="soft", epsilon=0.1, temperature=0.5), TypeError),
        (dict(k=2, scale="var"), (ValueError, TypeError)),
        (dict(k=3, method="sparse", max_support=2), ValueError),
        (dict(k=2, method="dftopk", max_support=4), TypeError),
    ],
    ids=[
        "k<0",
        "k-str",
        "k-frac-hard",
        "k-frac-straight-through",
        "largest-str",
        "dim-float",
        "p=3",
        "tol<0",
        "max_iter=0",
        "hard-temperature",
        "hard-scale",
        "hard-straight-through",
        "sparse-epsilon",
        "soft-epsilon-and-temperature",
        "scale-var",
        "max_support<k",
        "dftopk-max_support",
    ],
)
def test_module_validates_other_arguments_at_construction(kwargs, exc):
    """SoftTopK's docstring: "The arguments are checked when the module is built". Everything that can be
    checked without x (k's type and sign, whole k for hard methods, largest, dim's type, unused arguments,
    option values, max_support ≥ k)."""
    with pytest.raises(exc):
        SoftTopK(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# hard_in_eval.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant", ["sigmoid", "straight_through", "dftopk", "soft_eps", "sparse", "sparse43", "lapsum"]
)
def test_hard_in_eval(variant):
    """eval(): exactly topk_mask(method="hard") (same k, dim, largest); train(): the soft mask, with gradients."""
    g = torch.Generator().manual_seed(20)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    kt = torch.tensor([[0, 1, 2, 3, 3, 1]] * 4)  # one k per row of the (4, 6) batch when dim=1 (n = 3)
    w = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    for k, dim, largest in ((2, -1, True), (1, 0, False), (kt, 1, True), (kt.unsqueeze(1), 1, False)):
        kw = variant_kwargs(variant, temperature=0.6, dim=dim, largest=largest)
        mod = SoftTopK(k, hard_in_eval=True, **kw)
        assert mod.training
        xr = x.clone().requires_grad_()
        y = mod(xr)
        assert torch.equal(y, topk_mask(x, k, **kw))
        (y * w).sum().backward()
        assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
        mod.eval()
        hard = topk_mask(x, k, method="hard", dim=dim, largest=largest)
        out = mod(x)
        assert torch.equal(out, hard) and out.dtype == x.dtype
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        mod.train()
        assert torch.equal(mod(x), topk_mask(x, k, **kw))
        mod.train(False)
        assert torch.equal(mod(x), hard)


def test_hard_in_eval_dtypes_and_infinities():
    x = torch.tensor([[0.5, -float("inf"), 2.0, 1.0, float("inf")], [3.0, 2.0, 1.0, 0.0, -1.0]])
    mod = SoftTopK(2, method="sparse", temperature=5.0, hard_in_eval=True)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xd = x.to(dt)
        assert not torch.equal(mod.train()(xd), topk_mask(xd, 2, method="hard"))
        out = mod.eval()(xd)
        assert out.dtype == dt and torch.equal(out, topk_mask(xd, 2, method="hard"))
    # with scale and straight-through options too: eval() ignores them
    mod = SoftTopK(2, temperature=0.3, scale="std", straight_through=True, hard_in_eval=True).eval()
    assert torch.equal(mod(x), topk_mask(x, 2, method="hard"))


def test_extra_repr_shows_hard_in_eval():
    mod = SoftTopK(3, method="sparse", temperature=0.5, hard_in_eval=True)
    r = repr(mod)
    assert "hard_in_eval=True" in r and "k=3" in r and "sparse" in r
    assert "hard_in_eval=True" in mod.extra_repr()
    assert "hard_in_eval=True" not in repr(SoftTopK(3))


# ----------------------------------------------------------------------------------------------------------
# SoftKNN, soft_knn, knn_predict: against a brute-force kNN written here (a loop over the queries, distances by
# torch.dist, a stable sort).
# ----------------------------------------------------------------------------------------------------------
import math  # noqa: E402

from torch.autograd import gradcheck  # noqa: E402

from softtopk.nn import SoftKNN, knn_predict, soft_knn  # noqa: E402


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


# ----------------------------------------------------------------------------------------------------------------
# TopKRouter: the mixture-of-experts router (issue 16, part 1)
# ----------------------------------------------------------------------------------------------------------------
from softtopk.nn import Routing, TopKRouter  # noqa: E402

ROUTER_VARIANTS = ["hard", "straight_through", "dftopk", "sigmoid", "soft", "sparse", "sparse43", "lapsum"]


def make_router(d=6, e=5, k=2, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TopKRouter(d, e, k, **kw).to(dtype)


def tokens_of(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gate_logits(router, tokens):
    w = router.gate.weight.detach().to(tokens.dtype)
    return tokens.reshape(-1, w.shape[1]) @ w.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)])
def test_router_shapes_and_dtypes(dtype, shape):
    torch.manual_seed(0)
    router = TopKRouter(6, 5, 2, temperature=0.5, capacity_factor=1.5)  # a float32 gate, fed float64 too
    r = router(tokens_of(*shape, dtype=dtype))
    t = math.prod(shape[:-1])
    assert isinstance(r, Routing) and isinstance(r, tuple)
    assert r.indices.shape == (t, 2) and r.indices.dtype == torch.long
    assert r.weights.shape == (t, 2) and r.weights.dtype == dtype
    assert r.dense.shape == (t, 5) and r.dense.dtype == dtype
    assert r.routing_map.shape == (t, 5) and r.routing_map.dtype == torch.bool
    assert r.load.shape == (5,) and r.load.dtype == dtype
    assert r.aux_loss.shape == () and r.aux_loss.dtype == dtype
    assert r.dropped.shape == () and r.dropped.dtype == dtype
    assert r.outside.shape == (t,) and r.outside.dtype == dtype
    torch.testing.assert_close(r.load.sum(), torch.tensor(1.0, dtype=dtype))


@pytest.mark.parametrize("variant", ROUTER_VARIANTS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid", None])
def test_router_indices_weights_dense_and_map(variant, score):
    router = make_router(**variant_kwargs(variant, temperature=0.7), score=score)
    tokens = tokens_of(4, 3, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    assert torch.equal(r.indices, torch.topk(logits, 2).indices)
    assert torch.equal(r.indices, softtopk.topk(logits, 2, method="hard").indices)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(12, dtype=torch.float64))
    assert (r.weights >= 0).all()
    assert torch.equal(r.dense.gather(-1, r.indices), r.weights)
    assert torch.equal(r.dense.scatter(-1, r.indices, 0.0), torch.zeros_like(r.dense))
    assert torch.equal(r.routing_map, torch.zeros_like(r.routing_map).scatter(-1, r.indices, True))
    assert (r.routing_map.sum(-1) == 2).all() and r.dropped == 0


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "dftopk"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", None])
def test_router_train_weights_are_the_soft_mask_times_the_scores(variant, score):
    kw = variant_kwargs(variant, temperature=0.8)
    router = make_router(**kw, score=score, normalize=False)
    tokens = tokens_of(9, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    opts = {"max_support": 3} if variant == "sparse" else {}
    ref = softtopk.topk(logits, 2, **kw, **opts)
    scores = {"softmax": torch.softmax(logits, -1), "sigmoid": torch.sigmoid(logits), None: torch.ones_like(logits)}
    torch.testing.assert_close(r.weights, ref.weights * scores[score].gather(-1, ref.indices))
    torch.testing.assert_close(r.outside, ref.outside)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "soft"])
def test_router_eval_is_exact_topk_of_the_scores(variant):
    router = make_router(**variant_kwargs(variant, temperature=2.0), jitter=0.3)
    tokens = tokens_of(11, 6)
    logits = gate_logits(router, tokens)
    top = logits.topk(2)
    exact = torch.softmax(top.values, -1)  # the normalised softmax at the top k
    r = router.eval()(tokens)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, exact)
    assert torch.equal(r.outside, torch.zeros(11, dtype=torch.float64))
    assert not torch.allclose(router.train()(tokens).weights, exact, atol=1e-3)  # soft (and jittered) in train
    soft = make_router(**variant_kwargs(variant, temperature=2.0), hard_in_eval=False).eval()
    torch.testing.assert_close(soft(tokens).weights, soft.train()(tokens).weights)  # no jitter: the same


def test_router_hard_softmax_is_the_standard_topk_gate():
    torch.manual_seed(3)
    router = TopKRouter(8, 6, 2, method="hard", load_balance=None)
    tokens = tokens_of(5, 4, 8, dtype=torch.float32)
    r = router(tokens)
    logits = tokens.reshape(-1, 8) @ router.gate.weight.T
    vals, idx = torch.topk(logits, 2, dim=-1)
    gate = torch.softmax(vals, dim=-1)  # Mixtral: softmax over the top-k logits
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.weights, gate)
    assert r.aux_loss == 0
    r.weights.sum().backward()  # the gradient reaches the gate through the scores (sum is constant: zero here)
    assert router.gate.weight.grad is not None


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "dftopk", "straight_through"])
@pytest.mark.parametrize("score", ["softmax", None])
def test_router_gradients_reach_the_gate(variant, score):
    router = make_router(**variant_kwargs(variant, temperature=1.0), score=score)
    tokens = tokens_of(10, 6)
    r = router(tokens)
    target = torch.randn(r.weights.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (r.weights * target).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_router_aux_loss_is_the_switch_formula():
    router = make_router(e=4, k=2, temperature=0.5)
    tokens = tokens_of(13, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    t, e, k = 13, 4, 2
    probs = torch.softmax(logits, -1)
    f = [sum(int(e_ in logits[i].topk(k).indices.tolist()) for i in range(t)) / (t * k) for e_ in range(e)]
    p = [float(probs[:, e_].mean()) for e_ in range(e)]
    expected = e * sum(f_e * p_e for f_e, p_e in zip(f, p))
    assert r.aux_loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(r.load, torch.tensor(f, dtype=torch.float64))
    r.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0  # through P
    assert make_router(load_balance=None)(tokens).aux_loss == 0
    assert make_router(load_balance="bias")(tokens).aux_loss == 0


def test_router_bias_balancing_pushes_overloaded_experts_down():
    router = TopKRouter(2, 3, 1, method="hard", score="sigmoid", load_balance="bias", bias_update_rate=0.1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    assert "expert_bias" in dict(router.named_buffers()) and not any("bias" in n for n, _ in router.named_parameters())
    tokens = torch.tensor([[3.0, 0.5], [2.0, 0.1], [4.0, -0.2], [1.0, 0.3]])  # all to expert 0
    r = router(tokens)
    assert (r.indices == 0).all()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    router.eval()(tokens)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))  # no update in eval
    assert TopKRouter(2, 3, 1, load_balance="aux").expert_bias is None


def test_router_bias_changes_the_selection_not_the_weights():
    router = make_router(e=5, k=2, method="hard", score="sigmoid", load_balance="bias", bias_update_rate=0.0)
    tokens = tokens_of(20, 6)
    logits = gate_logits(router, tokens)
    before = router(tokens)
    router.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.2, 0.0, -0.1], dtype=torch.float64))
    after = router(tokens)
    assert torch.equal(after.indices, (logits + router.expert_bias).topk(2).indices)
    assert not torch.equal(after.indices, before.indices)  # the bias moved some selections
    s = torch.sigmoid(logits).gather(-1, after.indices)
    torch.testing.assert_close(after.weights, s / s.sum(-1, keepdim=True))  # the scores carry no bias
    same = (after.indices == before.indices).all(-1)
    assert same.any()
    assert torch.equal(after.weights[same], before.weights[same])


def test_router_capacity_drops_the_lowest_weights():
    router = TopKRouter(2, 2, 1, method="hard", normalize=False, capacity_factor=1.0, load_balance=None)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    tokens = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])  # all to expert 0, C = ⌈4/2⌉ = 2
    r = router(tokens)
    assert (r.indices == 0).all()
    assert r.routing_map[:, 0].tolist() == [False, True, False, True]  # the two largest weights are kept
    assert r.weights[[0, 2]].eq(0).all() and (r.weights[[1, 3]] > 0.5).all()
    assert r.dropped.item() == 0.5
    torch.testing.assert_close(r.load, torch.tensor([1.0, 0.0]))  # the selection, before the drop


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_router_capacity_bound_and_dropped_fraction(capacity_factor):
    router = make_router(e=4, k=2, temperature=0.5, capacity_factor=capacity_factor)
    tokens = tokens_of(30, 6) + torch.tensor([2.0, 0, 0, 0, 0, 0], dtype=torch.float64)  # unbalanced
    r = router(tokens)
    free = make_router(e=4, k=2, temperature=0.5)(tokens)
    c = math.ceil(capacity_factor * 30 * 2 / 4)
    assert (r.routing_map.sum(0) <= c).all()
    kept = r.routing_map.sum().item()
    assert r.dropped.item() == pytest.approx(1 - kept / 60)
    assert r.dropped > 0
    for e in range(4):  # each expert keeps its c largest weights (or all)
        w = free.dense[:, e][free.routing_map[:, e]]
        kept_w = free.dense[:, e][r.routing_map[:, e]]
        torch.testing.assert_close(kept_w.sort().values, w.sort().values[len(w) - len(kept_w) :])
    keep = r.routing_map.gather(-1, r.indices)
    assert torch.equal(r.weights, torch.where(keep, free.weights, 0.0))  # dropped, not rerouted or renormalised
    assert torch.equal(r.indices, free.indices)


def test_router_sparse_support_stays_within_the_selection():
    tokens = tokens_of(40, 6)
    router = make_router(e=8, k=2, method="sparse", temperature=20.0, normalize=False, score=None)
    logits = gate_logits(router, tokens)
    unbounded = softtopk.topk_mask(logits, 2, method="sparse", temperature=20.0)
    assert ((unbounded > 0).sum(-1) > 3).any()  # without the bound the support exceeds k + 1
    r = router(tokens)
    ref = softtopk.topk(logits, 2, method="sparse", temperature=20.0, max_support=3)
    assert ((r.dense > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(r.weights, ref.weights)
    torch.testing.assert_close(r.outside, ref.outside)
    torch.testing.assert_close(r.weights.sum(-1) + r.outside, torch.full((40,), 2.0, dtype=torch.float64))
    assert (r.outside > 0).any()
    given = make_router(e=8, k=2, method="sparse", temperature=20.0, max_support=5, normalize=False, score=None)
    torch.testing.assert_close(given(tokens).weights, softtopk.topk(logits, 2, method="sparse", temperature=20.0,
                                                                    max_support=5).weights)  # fmt: skip


def test_router_jitter_only_in_train():
    router = make_router(jitter=0.2)
    tokens = tokens_of(6, 6)
    assert not torch.equal(router(tokens).weights, router(tokens).weights)
    router.eval()
    assert torch.equal(router(tokens).weights, router(tokens).weights)
    plain = make_router()
    assert torch.equal(plain(tokens).weights, plain(tokens).weights)


@pytest.mark.parametrize("method", ["sigmoid", "lapsum", "sparse"])
def test_router_gradcheck(method):
    router = make_router(d=3, e=4, k=2, method=method, temperature=1.5, capacity_factor=2.0)
    tokens = tokens_of(5, 3).requires_grad_()
    weight = router.gate.weight.detach().clone().requires_grad_()

    def f(w, x):
        r = torch.func.functional_call(router, {"gate.weight": w}, (x,))
        return r.weights, r.dense, r.aux_loss

    assert gradcheck(f, (weight, tokens), atol=1e-6, rtol=1e-5)


def test_router_extra_repr_and_module():
    router = TopKRouter(16, 8, 2, method="sparse", temperature=0.5, capacity_factor=1.25, load_balance="bias")
    text = repr(router)
    for part in ("d_model=16", "n_experts=8", "k=2", "method='sparse'", "temperature=0.5", "capacity_factor=1.25",
                 "load_balance='bias'", "hard_in_eval=True", "(gate): Linear"):  # fmt: skip
        assert part in text, text
    assert isinstance(router, torch.nn.Module)
    assert [n for n, _ in router.named_parameters()] == ["gate.weight"]
    with pytest.raises(ValueError, match="`tokens`"):
        router(torch.randn(3, 15))
    with pytest.raises(ValueError, match="`tokens`"):
        router(torch.full((2, 16), math.nan))


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((0, 4, 2), {}, ValueError, "d_model"),
        ((8.0, 4, 2), {}, TypeError, "d_model"),
        ((8, 0, 1), {}, ValueError, "n_experts"),
        ((8, True, 1), {}, TypeError, "n_experts"),
        ((8, 4, 0), {}, ValueError, "k"),
        ((8, 4, 5), {}, ValueError, "k"),
        ((8, 4, 1.5), {}, TypeError, "k"),
        ((8, 4, 2), {"method": "nope"}, ValueError, "method"),
        ((8, 4, 2), {"method": "hard", "temperature": 0.5}, TypeError, "temperature"),
        ((8, 4, 2), {"temperature": 0.0}, ValueError, "temperature"),
        ((8, 4, 2), {"method": "sigmoid", "p": 2}, TypeError, "p"),
        ((8, 4, 2), {"method": "sparse", "max_support": 2}, ValueError, "max_support"),
        ((8, 4, 2), {"score": "tanh"}, ValueError, "score"),
        ((8, 4, 2), {"load_balance": "loss"}, ValueError, "load_balance"),
        ((8, 4, 2), {"capacity_factor": 0.0}, ValueError, "capacity_factor"),
        ((8, 4, 2), {"capacity_factor": "1"}, TypeError, "capacity_factor"),
        ((8, 4, 2), {"jitter": 1.0}, ValueError, "jitter"),
        ((8, 4, 2), {"jitter": -0.1}, ValueError, "jitter"),
        ((8, 4, 2), {"bias_update_rate": -1.0}, ValueError, "bias_update_rate"),
        ((8, 4, 2), {"normalize": 1}, TypeError, "normalize"),
        ((8, 4, 2), {"hard_in_eval": "yes"}, TypeError, "hard_in_eval"),
    ],
)
def test_router_bad_arguments_name_them(args, kwargs, exc, name):
    with pytest.raises(exc, match=f"TopKRouter: .*`{name}`"):
        TopKRouter(*args, **kwargs)
