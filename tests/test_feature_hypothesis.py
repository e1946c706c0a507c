"""Issue #39: a hypothesis search per uncertainty feature (variance, covariance column, KL,
condition) over shapes with 1 in any dimension or narrower than the stencil, dilations, coupled
channels, volumes and low-rank modes (cov_factor, rank 1 or 3), against the dense float64 oracle of tests/oracle.py, on every backend (the
Triton interpreter on fewer, small examples). The largest error seen per feature is kept in
LARGEST and written to $STRUCTLIK_ERRORS_FILE when that is set (the stop notes quote it)."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, kl_divergence

from oracle import dense_diagonal, dense_normal
from structlik import Stencil, StructuredNormal, backends

LARGEST: dict = {}
TOL = 1e-9


def _record(feature, backend, err):
    key = f"{feature}/{backend}"
    LARGEST[key] = max(LARGEST.get(key, 0.0), float(err))
    assert err < TOL, f"{feature} on {backend}: {err:.3g} from dense float64"


@pytest.fixture(scope="module", autouse=True)
def _write_largest():
    yield
    path = os.environ.get("STRUCTLIK_ERRORS_FILE")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.update({k: max(v, old.get(k, 0.0)) for k, v in LARGEST.items()})
        json.dump(old, open(path, "w"), indent=1, sort_keys=True)


@st.composite
def models(draw, coupled=True):
    """A random StructuredNormal: image or volume, radius 1-2, dilations, C 1-3, cross weights or
    not, low-rank modes or not, every spatial size 1..4 (so narrower than the stencil too), float64,
    well conditioned."""
    ndim = draw(st.sampled_from([2, 3]))
    radius = draw(st.integers(1, 2 if ndim == 2 else 1))
    dilations = draw(st.sampled_from([(1,), (1, 2), (2,)] if ndim == 2 else [(1,), (2,)]))
    stencil = Stencil(radius, dilations, ndim=ndim)
    C = draw(st.integers(1, 3 if coupled else 2))
    space = tuple(draw(st.integers(1, 4 if ndim == 2 else 3)) for _ in range(ndim))
    B = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *space)

    def rand(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g, dtype=torch.float64)
    cross = rand(B, C * (C - 1) // 2, *space, scale=0.3) if coupled and C > 1 and draw(st.booleans()) else None
    rank = draw(st.sampled_from([0, 0, 1, 3]))          # low-rank modes (issue #43) half the time
    modes = rand(B, rank, *shape[1:], scale=0.5) if rank else None
    return StructuredNormal(rand(*shape), rand(*shape, scale=0.3),
                            rand(B, C * stencil.S, *space, scale=0.3 / stencil.S ** 0.5), stencil, cross=cross,
                            cov_factor=modes)


def _examples(backend, feature=None):
    """15 examples per feature, 4 under the Triton interpreter; the conditional's CG iterations and rim
    solves cost 2 minutes an example there (CI measured 479 s for 4), so one."""
    if backend != "triton":
        return 15
    return 1 if feature == "condition" else 4


BACKENDS = pytest.mark.backends("reference", "cpu", "triton")


@BACKENDS
def test_variance(backend):
    @settings(max_examples=_examples(backend))
    @given(p=models())
    def check(p):
        with backends.using(backend):
            got = p.variance
        sigma = torch.linalg.inv(dense_normal(p).precision_matrix)
        _record("variance", backend, (got.reshape(sigma.shape[:-1]) - sigma.diagonal(dim1=-2, dim2=-1)).abs().max())
    check()


@BACKENDS
def test_covariance_column(backend):
    @settings(max_examples=_examples(backend))
    @given(p=models(), data=st.data())
    def check(p, data):
        space = tuple(p.event_shape[1:])
        index = tuple(data.draw(st.integers(0, s - 1)) for s in space)
        with backends.using(backend):
            got = p.covariance(index)
        sigma = torch.linalg.inv(dense_normal(p).precision_matrix)
        B, C, n = sigma.shape[0], p.event_shape[0], torch.Size(space).numel()
        at = sum(i * torch.Size(space[k + 1:]).numel() for k, i in enumerate(index))
        want = torch.stack([sigma[:, c * n + at, c * n:(c + 1) * n] for c in range(C)], 1)
        _record("covariance", backend, (got.reshape(B, C, n) - want).abs().max())
    check()


@BACKENDS
def test_kl_every_pair(backend):
    @settings(max_examples=_examples(backend))
    @given(p=models(), data=st.data())
    def check(p, data):
        # q: the same event, another stencil of the same kind, with or without cross weights
        radius = data.draw(st.integers(1, 2 if p.stencil.ndim == 2 else 1))
        q_stencil = Stencil(radius, ndim=p.stencil.ndim)
        B, C = p.batch_shape[0], p.event_shape[0]
        space = tuple(p.event_shape[1:])
        cross = 0.3 * torch.randn(B, C * (C - 1) // 2, *space, dtype=torch.float64) if C > 1 and data.draw(
            st.booleans()) else None
        q = StructuredNormal(torch.randn(p.loc.shape, dtype=torch.float64), 0.3 * torch.randn(p.loc.shape,
                             dtype=torch.float64), 0.1 * torch.randn(B, C * q_stencil.S, *space, dtype=torch.float64),
                             q_stencil, cross=cross)
        diag = Independent(Normal(torch.randn(p.loc.shape, dtype=torch.float64),
                                  0.5 + torch.rand(p.loc.shape, dtype=torch.float64)), len(p.event_shape))
        dd = dense_diagonal(diag.base_dist.loc, diag.base_dist.scale)
        with backends.using(backend):
            got = [kl_divergence(p, q), kl_divergence(q, p), kl_divergence(p, diag), kl_divergence(diag, p)]
        want = [kl_divergence(dense_normal(p), dense_normal(q)), kl_divergence(dense_normal(q), dense_normal(p)),
                kl_divergence(dense_normal(p), dd), kl_divergence(dd, dense_normal(p))]
        _record("kl", backend, max(float(((a - b) / b.abs().clamp_min(1)).abs().max()) for a, b in zip(got, want)))
    check()


@BACKENDS
def test_condition(backend):
    @settings(max_examples=_examples(backend, "condition"))
    @given(p=models(), data=st.data())
    def check(p, data):
        mask = torch.rand(p.loc.shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999)))) < 0.5
        value = torch.randn(p.loc.shape, dtype=torch.float64)
        with backends.using(backend):
            c = p.condition(value, mask, tol=1e-12)
            mean = c.mean
            x = torch.where(mask, value, torch.randn(p.loc.shape, dtype=torch.float64))
            log_prob = c.log_prob(x)
            observed = c.observed_log_prob()
            variance, entropy = c.variance, c.entropy()
        lam = dense_normal(p).precision_matrix
        err = 0.0
        for b in range(p.batch_shape[0]):
            m, o = ~mask[b].reshape(-1), mask[b].reshape(-1)
            mu, v, xb = p.loc[b].reshape(-1), value[b].reshape(-1), x[b].reshape(-1)
            cond_mean = mu[m] - torch.linalg.solve(lam[b][m][:, m], lam[b][m][:, o] @ (v[o] - mu[o]))
            err = max(err, float((mean[b].reshape(-1)[m] - cond_mean).abs().max()) if m.any() else 0.0)
            if m.any():
                mvn = torch.distributions.MultivariateNormal(cond_mean, precision_matrix=lam[b][m][:, m])
                err = max(err, abs(float(log_prob[b] - mvn.log_prob(xb[m]))) / max(1.0, abs(float(log_prob[b]))))
                err = max(err, float((variance[b].reshape(-1)[m] - mvn.covariance_matrix.diagonal()).abs().max()))
                err = max(err, abs(float(entropy[b] - mvn.entropy())) / max(1.0, abs(float(mvn.entropy()))))
            err = max(err, float(variance[b].reshape(-1)[o].abs().max()) if o.any() else 0.0)
            if o.any():
                marginal = torch.distributions.MultivariateNormal(mu[o], torch.linalg.inv(lam[b])[o][:, o])
                want = float(marginal.log_prob(v[o]))
                err = max(err, abs(float(observed[b]) - want) / max(1.0, abs(want)))
        _record("condition", backend, err)
    check()
