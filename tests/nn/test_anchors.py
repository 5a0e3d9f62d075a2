import math

import pytest
import torch

from ncmcli import make_anchors
from ncmcli.errors import NcmError
from ncmcli.nn.certificate import anchor_certificate, best_known_min_angle, pairwise_angles
from ncmcli.nn.floors import loss_floor


def min_angle(a):
    return pairwise_angles(a).min().item()


@pytest.mark.parametrize(
    "method,c,d",
    [
        ("orthogonal", 10, 16),
        ("polar", 10, 2),
        ("polar", 7, 3),
        ("polar", 20, 64),
        ("simplex", 10, 9),
        ("orthoplex", 12, 6),
        ("optimized", 9, 3),
        ("random", 5, 4),
        ("auto", 100, 64),
        ("auto", 4, 8),
    ],
)
def test_shape_dtype_unit_rows_and_determinism(method, c, d):
    a = make_anchors(method, c, d, seed=3)
    assert a.shape == (c, d) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(c), atol=1e-6)
    assert torch.equal(a, make_anchors(method, c, d, seed=3))
    assert min_angle(a) > 1.0  # distinct rows


def test_orthogonal_is_the_standard_basis():
    a = make_anchors("orthogonal", 10, 12)
    assert torch.equal(a, torch.eye(10, 12))


def test_polar_2d_has_equal_angles():
    a = make_anchors("polar", 10, 2).double()
    ang = torch.rad2deg(torch.atan2(a[:, 1], a[:, 0])) % 360
    assert torch.allclose(torch.sort(ang).values, torch.arange(10).double() * 36, atol=1e-4)
    assert min_angle(a) == pytest.approx(36.0, abs=1e-4)


def test_polar_high_dim_is_distinct_and_reports_angle():
    a = make_anchors("polar", 30, 5)
    cert = anchor_certificate(a, "polar")
    assert cert.duplicates == [] and cert.min_angle_deg > 20


def test_simplex_has_equal_pairwise_cosines():
    for c, d in [(10, 9), (3, 2), (5, 64)]:
        a = make_anchors("simplex", c, d).double()
        cos = a @ a.T
        off = cos[~torch.eye(c, dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-6)
    assert min_angle(make_anchors("simplex", 10, 9)) == pytest.approx(96.379, abs=1e-3)


def test_orthoplex_is_90_degrees():
    a = make_anchors("orthoplex", 100, 64)
    assert min_angle(a) == pytest.approx(90.0, abs=1e-6)


def test_optimized_targets():
    assert min_angle(make_anchors("optimized", 12, 2)) >= 30.0 * 0.995
    assert min_angle(make_anchors("optimized", 10, 3)) >= 64.0
    assert min_angle(make_anchors("optimized", 8, 5)) >= 90.0 - 1e-6  # >= orthoplex
    assert min_angle(make_anchors("optimized", 6, 5)) >= best_known_min_angle(6, 5) - 1e-4


@pytest.mark.slow
def test_optimized_100_in_2d():
    assert min_angle(make_anchors("optimized", 100, 2)) >= 3.6 * 0.995


@pytest.mark.parametrize(
    "method,c,d,fragment",
    [
        ("orthogonal", 11, 10, "orthogonal anchors need dim >= classes"),
        ("simplex", 12, 10, "simplex anchors need"),
        ("orthoplex", 21, 10, "orthoplex anchors need"),
        ("nope", 3, 3, "unknown anchor method"),
        ("auto", 1, 3, "classes must be"),
        ("auto", 3, 0, "dim must be"),
    ],
)
def test_errors_are_value_errors_not_cli_errors(method, c, d, fragment):
    with pytest.raises(ValueError, match=fragment) as exc:
        make_anchors(method, c, d)
    assert not isinstance(exc.value, NcmError)  # the library raises no CLI error (ncm anchors maps it)


def test_orthogonal_error_names_the_methods_that_work():
    with pytest.raises(ValueError) as exc:
        make_anchors("orthogonal", 11, 10)
    for name in ("simplex", "orthoplex", "optimized", "auto"):
        assert name in str(exc.value)


def test_from_files(tmp_path):
    from safetensors.torch import save_file

    raw = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    save_file({"anchors": raw}, str(tmp_path / "a.safetensors"))
    a = make_anchors(str(tmp_path / "a.safetensors"), 3, 2)
    assert torch.allclose(a, raw / raw.norm(dim=1, keepdim=True))
    (tmp_path / "a.csv").write_text("2,0\n0,-3\n1,1\n")
    assert torch.allclose(make_anchors(str(tmp_path / "a.csv"), 3, 2), a)
    (tmp_path / "dup.csv").write_text("1,0\n2,0\n0,1\n")
    with pytest.raises(ValueError, match="duplicate"):
        make_anchors(str(tmp_path / "dup.csv"), 3, 2)
    (tmp_path / "zero.csv").write_text("1,0\n0,0\n0,1\n")
    with pytest.raises(ValueError, match="zero"):
        make_anchors(str(tmp_path / "zero.csv"), 3, 2)
    with pytest.raises(ValueError, match="shape"):
        make_anchors(str(tmp_path / "a.csv"), 4, 2)
    (tmp_path / "bad.csv").write_text("1,x\n")
    with pytest.raises(ValueError, match="cannot read"):
        make_anchors(str(tmp_path / "bad.csv"), 1 + 1, 2)


def test_loss_floor_matches_closed_form():
    a = make_anchors("orthogonal", 10, 10)
    # E-NCM: on its own anchor the distance is 0, to the 9 others sqrt(2). The tolerance
    # covers the 1e-6 that the eps inside the sqrt adds at distance 0.
    assert loss_floor(a, "euclidean") == pytest.approx(math.log(1 + 9 * math.exp(-math.sqrt(2))), abs=2e-6)
    assert loss_floor(a, "euclidean") == pytest.approx(1.159, abs=1e-3)
    # C-NCM: not on the anchor. With C orthonormal anchors the best unit feature is
    # sqrt((C-1)/C) a_c - sum_j a_j / sqrt(C (C-1)), whose cosine gap to every other anchor is
    # sqrt(C/(C-1)) (on the anchor it is only 1).
    gap = math.sqrt(10 / 9)
    assert loss_floor(a, "cosine", 2.0) == pytest.approx(math.log(1 + 9 * math.exp(-2.0 * gap)), abs=1e-9)
    assert loss_floor(a, "cosine") < math.log(1 + 9 * math.exp(-1.0)) - 0.04  # 1.420 vs 1.461 on the anchor
    wide = make_anchors("orthogonal", 100, 512)
    assert loss_floor(wide, "cosine") == pytest.approx(
        math.log(1 + 99 * math.exp(-math.sqrt(100 / 99))), abs=1e-9
    )
    # sq-NCM: the gap 2 f.(a_c - a_j) is unbounded along f = t a_c.
    assert loss_floor(a, "sqeuclidean") == 0.0


def _cosine_floor_by_search(anchors, scale):
    """Reference: every class's loss minimised separately over unit features, by Adam on an
    unconstrained vector (normalised inside), float64, from 3 random starts per class; the
    best start per class, averaged over classes. Rows never interact, so one batch holds all."""
    a = torch.nn.functional.normalize(anchors.double(), dim=1)
    c, d = a.shape
    g = torch.Generator().manual_seed(0)
    v = (a.repeat(3, 1) + 0.5 * torch.randn(3 * c, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.arange(c).repeat(3)
    opt = torch.optim.Adam([v], lr=0.02)
    for _ in range(1500):
        logits = scale * torch.nn.functional.normalize(v, dim=1) @ a.T
        per_row = torch.logsumexp(logits, 1) - logits[torch.arange(3 * c), target]
        opt.zero_grad()
        per_row.sum().backward()
        opt.step()
    return per_row.detach().view(3, c).min(0).values.mean().item()


@pytest.mark.parametrize(
    "method,c,d,scale", [("random", 6, 4, 1.0), ("orthogonal", 5, 7, 3.0), ("random", 7, 2, 2.0)]
)
def test_cosine_floor_matches_a_per_class_search(method, c, d, scale):
    a = make_anchors(method, c, d)
    on_anchor = torch.nn.functional.cross_entropy(
        scale * (lambda n: n @ n.T)(torch.nn.functional.normalize(a.double(), dim=1)), torch.arange(c)
    ).item()
    floor = loss_floor(a, "cosine", scale)
    assert floor == pytest.approx(_cosine_floor_by_search(a, scale), abs=1e-6)
    assert floor <= on_anchor + 1e-12


def test_cosine_floor_in_2d_matches_a_grid_over_angles():
    a = make_anchors("random", 5, 2)
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    u = torch.stack([angles.cos(), angles.sin()], 1)  # every unit feature in the plane
    logits = u @ torch.nn.functional.normalize(a.double(), dim=1).T  # (N, C)
    per_class = (torch.logsumexp(logits, 1, keepdim=True) - logits).min(0).values  # best angle per class
    assert loss_floor(a, "cosine") == pytest.approx(per_class.mean().item(), abs=1e-8)


def test_certificate_fields():
    cert = anchor_certificate(make_anchors("simplex", 10, 9), "simplex")
    assert cert.classes == 10 and cert.dim == 9
    assert cert.min_angle_deg == pytest.approx(96.3794, abs=1e-3)
    assert cert.best_known_min_angle_deg == pytest.approx(96.3794, abs=1e-3)
    assert cert.norm_min == pytest.approx(1.0) and cert.norm_max == pytest.approx(1.0)
    assert cert.duplicates == []
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert anchor_certificate(dup, "x").duplicates == [(0, 1)]


@pytest.mark.parametrize("rho,c,scale", [(0.0, 6, 1.0), (-1 / 5, 6, 2.0), (0.3, 5, 1.0), (0.6, 4, 3.0)])
def test_equiangular_closed_form_matches_the_solver_and_a_search(rho, c, scale):
    from ncmcli.nn.floors import _cosine_floor, _equiangular_floor

    # C unit vectors with every pairwise cosine rho: the rows of the Cholesky factor of
    # (1 - rho) I + rho 11^T (rho = -1/(C-1) is the regular simplex), in a random rotation.
    gram = (1 - rho) * torch.eye(c, dtype=torch.float64) + rho
    vectors = torch.linalg.cholesky(gram + 1e-15 * torch.eye(c, dtype=torch.float64))
    rot, _ = torch.linalg.qr(
        torch.randn(c + 2, c + 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )
    a = torch.nn.functional.pad(vectors, (0, 2)) @ rot
    closed = _equiangular_floor(a, scale)
    assert closed is not None
    assert closed == pytest.approx(_cosine_floor(a, scale), abs=1e-9)
    assert closed == pytest.approx(_cosine_floor_by_search(a, scale), abs=1e-6)
    assert loss_floor(a.float(), "cosine", scale) == pytest.approx(closed, abs=1e-6)
    assert _equiangular_floor(make_anchors("random", 6, 4), 1.0) is None  # not equiangular: the solver's
    simplex = make_anchors("simplex", 10, 9)  # float32: cosines -1/9 to within about 3e-8
    assert _equiangular_floor(simplex.double(), 1.0) == pytest.approx(
        math.log1p(9 * math.exp(-10 / 9)), abs=1e-7
    )


def test_loss_floor_is_cached_per_anchors_metric_and_scale(monkeypatch):
    import ncmcli.nn.floors as floors

    monkeypatch.setattr(floors, "_CACHE", {})  # whatever earlier tests computed
    calls = []
    solver = floors._cosine_floor
    monkeypatch.setattr(floors, "_cosine_floor", lambda a, s: calls.append(s) or solver(a, s))
    a = make_anchors("random", 5, 3, seed=7)
    first = loss_floor(a, "cosine", 1.5)
    assert loss_floor(a.clone(), "cosine", 1.5) == first and calls == [1.5]
    assert loss_floor(a, "cosine", 2.5) < first and calls == [1.5, 2.5]
    b = a.clone()
    b[0] = -b[0]
    loss_floor(b, "cosine", 1.5)
    assert len(calls) == 3  # other anchors, computed again


def test_optimized_anchors_are_cached_per_classes_dim_and_seed(tmp_path, monkeypatch):
    from ncmcli.nn import anchors as anchors_mod

    monkeypatch.setenv("NCM_CACHE", str(tmp_path))
    first = make_anchors("optimized", 7, 3, seed=4)
    files = list((tmp_path / "anchors").glob("*.safetensors"))
    assert [f.name for f in files] == ["optimized-v1-c7-d3-seed4.safetensors"]

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(anchors_mod, "_optimized", boom)
    assert torch.equal(make_anchors("optimized", 7, 3, seed=4), first)  # read back, bit for bit
    with pytest.raises(AssertionError, match="recomputed"):
        make_anchors("optimized", 7, 3, seed=5)  # another seed is another entry
    monkeypatch.undo()
    monkeypatch.setenv("NCM_CACHE", str(tmp_path))
    files[0].write_bytes(b"torn")
    assert torch.equal(make_anchors("optimized", 7, 3, seed=4), first)  # recomputed and replaced
    assert files[0].stat().st_size > 100
