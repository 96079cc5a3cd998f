"""Core formulas against independently computed reference values.

Expected numbers are hard-coded from ../shared/reference/consistency-training.md (sections 0, 2, 6 and 7, computed in
double precision from the published formulas); none of them is produced by calling gensample. The tolerances follow
the number of digits printed in those tables.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel

from gensample.core.losses import get_distance, pseudo_huber, pseudo_huber_constant, pseudo_huber_elementwise, squared_l2
from gensample.core.parametrization import (
    ConsistencyFunction,
    consistency_scalings,
    input_scaling,
    noise_conditioning,
)
from gensample.core.sampling import renoise_std
from gensample.core.sigmas import (
    ict_loss_weighting,
    ict_num_sigmas,
    karras_sigma_at_descending_index,
    karras_sigmas,
    lognormal_index_probabilities,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one intra-op thread is faster and immune to CPU contention from other jobs; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(dtype=torch.float32, seed=0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    )
    return unet.to(dtype).eval()


# --------------------------------------------------------------------------------------------------------------------
# §7.2: ascending Karras grid N = 11, lognormal probabilities p(i), weights lambda(sigma_i)
# --------------------------------------------------------------------------------------------------------------------
REF_SIGMAS_11 = [0.002, 0.0167208, 0.0850872, 0.318283, 0.965417, 2.51522, 5.83895, 12.3816, 24.4083, 45.3137, 80.0]
REF_P_11 = [0.062633, 0.181737, 0.245501, 0.213494, 0.142446, 0.080605, 0.041080, 0.019580, 0.008944, 0.003980]
REF_ERF_DIFF_11 = [0.124222, 0.360444, 0.486909, 0.423429, 0.282517, 0.159865, 0.081475, 0.038834, 0.017739, 0.007893]
REF_LAMBDA_11 = [67.9313, 14.6271, 4.28824, 1.54528, 0.645244, 0.300867, 0.152844, 0.0831479, 0.0478345, 0.0288299]
REF_E_P_LAMBDA_11 = 8.420307


def test_karras_grid_n11_matches_reference_table():
    sigmas = karras_sigmas(11)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (11,)
    # 6 significant digits in the table
    torch.testing.assert_close(sigmas, torch.tensor(REF_SIGMAS_11, dtype=torch.float64), rtol=1e-5, atol=0)
    # ascending, end points sigma_min and sigma_max
    assert (sigmas[1:] > sigmas[:-1]).all()
    assert sigmas[0].item() == pytest.approx(0.002, rel=1e-12)
    assert sigmas[-1].item() == pytest.approx(80.0, rel=1e-12)


def test_karras_grid_rejects_fewer_than_two_points():
    with pytest.raises(ValueError, match="num_sigmas must be >= 2"):
        karras_sigmas(1)


def test_lognormal_probabilities_n11_match_reference_table():
    p = lognormal_index_probabilities(karras_sigmas(11))
    assert p.shape == (10,)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, torch.tensor(REF_P_11, dtype=torch.float64), rtol=0, atol=1e-6)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # ratios against the unnormalised erf differences of the table (independent of normalisation)
    erf = torch.tensor(REF_ERF_DIFF_11, dtype=torch.float64)
    torch.testing.assert_close(p / p[2] * erf[2], erf, rtol=2e-6, atol=1e-6)  # table rounding: 5e-7 abs
    # the mode is pair 2 (sigma_2, sigma_3) = (0.085, 0.318), around e^-1.1 = 0.33
    assert int(p.argmax()) == 2


def test_ict_loss_weighting_n11_matches_reference_table():
    lam = ict_loss_weighting(karras_sigmas(11))
    assert lam.shape == (10,)
    torch.testing.assert_close(lam, torch.tensor(REF_LAMBDA_11, dtype=torch.float64), rtol=1e-5, atol=0)


def test_expected_weight_under_lognormal_sampling():
    sigmas = karras_sigmas(11)
    e_lambda = (lognormal_index_probabilities(sigmas) * ict_loss_weighting(sigmas)).sum().item()
    assert e_lambda == pytest.approx(REF_E_P_LAMBDA_11, abs=2e-6)


def test_lognormal_sign_matters():
    """A +1.1 mean (a typo in Kinyugo's README) must give a visibly different distribution."""
    sigmas = karras_sigmas(11)
    p_good = lognormal_index_probabilities(sigmas)
    p_typo = lognormal_index_probabilities(sigmas, p_mean=1.1)
    assert int(p_typo.argmax()) > int(p_good.argmax())
    assert not torch.allclose(p_good, p_typo, atol=1e-3)


def test_sampled_lognormal_indices_concentrate_near_e_minus_1_1():
    """Pitfall P9: student sigmas drawn with torch.multinomial over p(i), N = 1281, have median ~ e^-1.1 ~ 0.33."""
    sigmas = karras_sigmas(1281)
    p = lognormal_index_probabilities(sigmas)
    g = torch.Generator().manual_seed(1234)
    idx = torch.multinomial(p, 50_000, replacement=True, generator=g)
    student = sigmas[idx + 1]  # pair i = (sigma_i, sigma_{i+1}); the student sees the larger sigma_{i+1}
    median = student.median().item()
    target = math.exp(-1.1)
    assert target / 1.5 < median < target * 1.5, median
    # ln(student sigma) has its mean near P_mean = -1.1 (the truncation to [ln 0.002, ln 80] shifts it a little)
    assert student.log().mean().item() == pytest.approx(-1.1, abs=0.2)
    # the typo'd sign puts the median around e^{+1.1} ~ 3, an order of magnitude away
    p_typo = lognormal_index_probabilities(sigmas, p_mean=1.1)
    idx_typo = torch.multinomial(p_typo, 50_000, replacement=True, generator=g)
    assert sigmas[idx_typo + 1].median().item() > 2.0


# --------------------------------------------------------------------------------------------------------------------
# §7.1: iCT curriculum N(k)
# --------------------------------------------------------------------------------------------------------------------
REF_N_K400K = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 199_999: 81, 200_000: 161, 349_999: 641,
               350_000: 1281, 399_999: 1281}
REF_N_K800K = {0: 11, 49_999: 11, 50_000: 11, 100_000: 21, 199_999: 21, 200_000: 41, 349_999: 81, 350_000: 81,
               399_999: 81, 799_999: 1281}
REF_N_SLCT_K700K = {0: 11, 99_999: 11, 100_000: 21, 200_000: 41, 599_999: 321, 600_000: 641, 699_999: 641}


@pytest.mark.parametrize("k, n", sorted(REF_N_K400K.items()))
def test_ict_curriculum_k400k(k, n):
    assert ict_num_sigmas(k, 400_000) == n


@pytest.mark.parametrize("k, n", sorted(REF_N_K800K.items()))
def test_ict_curriculum_k800k(k, n):
    assert ict_num_sigmas(k, 800_000) == n


@pytest.mark.parametrize("k, n", sorted(REF_N_SLCT_K700K.items()))
def test_slct_curriculum_s1_640_k700k(k, n):
    assert ict_num_sigmas(k, 700_000, s0=10, s1=640) == n


def test_ict_curriculum_k400k_visits_every_doubling():
    seen = sorted({ict_num_sigmas(k, 400_000) for k in range(0, 400_000, 1000)})
    assert seen == [11, 21, 41, 81, 161, 321, 641, 1281]


@pytest.mark.parametrize("total_steps", [1, 3])
def test_ict_curriculum_tiny_k_does_not_crash(total_steps):
    """K' = floor(K / 8) = 0 for tiny K: must not divide by zero; N grows monotonically and saturates at s1 + 1."""
    ns = [ict_num_sigmas(k, total_steps) for k in range(0, 20)]
    assert ns[0] == 11
    assert all(isinstance(n, int) for n in ns)
    assert all(b >= a for a, b in zip(ns, ns[1:]))
    assert ns[-1] == 1281
    assert max(ns) == 1281
    assert 1281 in ns[: 10]  # 10 * 2^7 = 1280 is reached after 7 doublings


def test_ict_curriculum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        ict_num_sigmas(0, 0)
    with pytest.raises(ValueError, match="s0"):
        ict_num_sigmas(0, 100, s0=20, s1=10)


# --------------------------------------------------------------------------------------------------------------------
# §7.3: c_skip, c_out, c_in, c_noise (sigma_data = 0.5, sigma_min = 0.002); c_noise is the 1000 * 0.25 * ln form
# --------------------------------------------------------------------------------------------------------------------
REF_SCALINGS = [
    # sigma, c_skip, c_out, c_in, c_noise (1000 * 0.25 * ln)
    (0.002, 1.000000, 0.000000, 1.999984, -1553.6520),
    (0.01, 0.999744, 0.007998, 1.999600, -1151.2925),
    (0.1, 0.963005, 0.096097, 1.961161, -575.6463),
    (0.5, 0.502004, 0.352139, 1.414214, -173.2868),
    (1.0, 0.200641, 0.446319, 0.894427, 0.0),
    (10.0, 0.002495, 0.499276, 0.099875, 575.6463),
    (80.0, 0.000039, 0.499978, 0.012500, 1095.5067),
]


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in, c_noise", REF_SCALINGS)
def test_scalings_match_reference_table(sigma, c_skip, c_out, c_in, c_noise):
    got_skip, got_out = consistency_scalings(sigma)
    assert got_skip.item() == pytest.approx(c_skip, abs=1e-6)
    assert got_out.item() == pytest.approx(c_out, abs=1e-6)
    assert input_scaling(sigma).item() == pytest.approx(c_in, abs=1e-6)
    assert noise_conditioning(sigma).item() == pytest.approx(c_noise, abs=1e-4)


def test_scalings_vectorised_match_table():
    sig = torch.tensor([r[0] for r in REF_SCALINGS], dtype=torch.float64)
    c_skip, c_out = consistency_scalings(sig)
    torch.testing.assert_close(c_skip, torch.tensor([r[1] for r in REF_SCALINGS], dtype=torch.float64), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(c_out, torch.tensor([r[2] for r in REF_SCALINGS], dtype=torch.float64), rtol=0,
                               atol=1e-6)


def test_boundary_scalings_are_exact_at_sigma_min():
    c_skip, c_out = consistency_scalings(0.002)
    assert c_skip.item() == 1.0
    assert c_out.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_exact_with_random_backbone(dtype):
    """f(x, sigma_min) == x bit for bit, whatever the (random) backbone outputs (a float32 sigma_min would break it)."""
    f = ConsistencyFunction(tiny_unet(dtype))
    g = torch.Generator().manual_seed(0)
    # include tiny values so that any non-zero c_out * F would show up
    x = torch.cat([torch.randn(2, 1, 8, 8, generator=g), 1e-6 * torch.randn(1, 1, 8, 8, generator=g)]).to(dtype)
    with torch.no_grad():
        assert torch.equal(f(x, 0.002), x)
        assert torch.equal(f(x, torch.tensor(0.002, dtype=torch.float64)), x)
        assert torch.equal(f(x, torch.full((3,), 0.002, dtype=torch.float64)), x)
        # and the backbone does matter away from the boundary
        assert not torch.allclose(f(x, 1.0), x, atol=1e-3)
        assert f(x, 1.0).dtype == dtype


def test_consistency_function_wires_scalings_and_noise_conditioning():
    """f(x, 0.5) = 0.502004 x + 0.352139 F(1.414214 x, 250 ln 0.5): table constants, backbone called directly."""
    unet = tiny_unet()
    f = ConsistencyFunction(unet)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        F = unet(1.414214 * x, torch.full((2,), -173.2868)).sample
        expected = 0.502004 * x + 0.352139 * F
        got = f(x, 0.5)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
        # per-sample sigmas: row b uses sigma_b
        got_rows = f(x, torch.tensor([0.5, 10.0], dtype=torch.float64))
        F10 = unet(0.099875 * x[1:], torch.full((1,), 575.6463)).sample
        torch.testing.assert_close(got_rows[:1], expected[:1], rtol=0, atol=2e-5)
        torch.testing.assert_close(got_rows[1:], 0.002495 * x[1:] + 0.499276 * F10, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------------------------------
# §7.4 / §7.8: pseudo-Huber constants and loss test vectors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, c", [(3072, 0.029930), (12288, 0.059860), (4096, 0.03456), (196608, 0.239439)])
def test_pseudo_huber_constant(d, c):
    assert pseudo_huber_constant(d) == pytest.approx(c, abs=1e-6)


@pytest.mark.parametrize(
    "shape, l2_form, elementwise, ect",
    [((3, 32, 32), 0.525134, 0.00162638, 0.554256), ((4, 32, 32), 0.606372, 0.00141768, 0.64)],
)
def test_pseudo_huber_test_vectors(shape, l2_form, elementwise, ect):
    """Residual 0.01 in every element."""
    x = torch.zeros(2, *shape)
    y = torch.full((2, *shape), 0.01)
    got = pseudo_huber(x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.full((2,), l2_form), rtol=0, atol=2e-6)
    got_el = pseudo_huber_elementwise(x, y)
    assert got_el.shape == (2,)
    torch.testing.assert_close(got_el, torch.full((2,), elementwise), rtol=2e-5, atol=0)
    # ECT: c = 0 is the plain L2 norm
    torch.testing.assert_close(pseudo_huber(x, y, c=0.0), torch.full((2,), ect), rtol=0, atol=2e-6)
    # the two forms differ by orders of magnitude: summed vs averaged over elements
    assert (got / got_el).min() > 100


def test_pseudo_huber_is_per_sample():
    """One value per sample, each from its own residual (computed here with math, not the library)."""
    d = 3 * 32 * 32
    c = 0.00054 * math.sqrt(d)
    x = torch.zeros(3, 3, 32, 32)
    y = torch.stack([torch.full((3, 32, 32), r) for r in (0.01, 0.0, 0.02)])
    got = pseudo_huber(x, y)
    assert got.shape == (3,)
    expected = [math.sqrt(d * r * r + c * c) - c for r in (0.01, 0.0, 0.02)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=2e-6)
    assert got[1].abs().item() < 1e-7
    # symmetric, gradient flows
    xr = torch.randn(3, 3, 32, 32, requires_grad=True)
    yr = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(pseudo_huber(xr, yr), pseudo_huber(yr, xr))
    pseudo_huber(xr, yr).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_squared_l2_and_distance_registry():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.01)
    y[1] = 0.1
    torch.testing.assert_close(squared_l2(x, y), torch.tensor([1e-4, 1e-2]), rtol=1e-5, atol=0)
    assert get_distance("pseudo_huber") is pseudo_huber
    assert get_distance("pseudo_huber_elementwise") is pseudo_huber_elementwise
    with pytest.raises(ValueError, match="Unknown distance 'huber'"):
        get_distance("huber")


# --------------------------------------------------------------------------------------------------------------------
# §0.5 / §7.6: sampler intermediate sigmas and re-noising std
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "index, steps, sigma",
    [(22, 40, 1.38237), (106, 201, 1.91284), (17, 40, 4.36556), (67, 151, 3.99122), (62, 151, 5.24850),
     (440, 641, 0.369315)],
)
def test_sampler_intermediate_sigmas(index, steps, sigma):
    assert karras_sigma_at_descending_index(index, steps) == pytest.approx(sigma, rel=5e-6)


def test_karras_sigma_at_index_end_points_and_direction():
    assert karras_sigma_at_descending_index(0, 40) == pytest.approx(80.0, rel=1e-12)
    assert karras_sigma_at_descending_index(39, 40) == pytest.approx(0.002, rel=1e-12)
    assert karras_sigma_at_descending_index(10, 40) > karras_sigma_at_descending_index(11, 40)
    # descending index i on N points == ascending grid entry N-1-i
    asc = karras_sigmas(11)
    for i in range(11):
        assert karras_sigma_at_descending_index(i, 11) == pytest.approx(REF_SIGMAS_11[10 - i], rel=1e-5)
        assert karras_sigma_at_descending_index(i, 11) == pytest.approx(asc[10 - i].item(), rel=1e-12)


def test_renoise_std():
    assert renoise_std(0.821).item() == pytest.approx(0.820998, abs=1e-6)
    assert renoise_std(1.38237).item() == pytest.approx(math.sqrt(1.38237**2 - 0.002**2), rel=1e-12)
    assert renoise_std(0.002).item() == 0.0
    assert renoise_std(0.001).item() == 0.0  # clamped at sigma_min, never NaN
