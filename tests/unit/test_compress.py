import pytest
import torch

from dtm_ray.core.compress import compress
from dtm_ray.core.specs import Spec, check_applicable, parse_spec

ALL_SPECS = [
    "magnitude:0.5",
    "wanda:0.5",
    "nm:2:4",
    "int8",
    "int8-tensor",
    "int4-g128",
    "fp8-e4m3",
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape).to(dtype)


def norm_stats(in_features: int, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {"input_norm": torch.rand(in_features) + 0.5}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


# --- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ALL_SPECS + ["wanda:0.25", "nm:1:8", "int4-g32", "magnitude:1"])
def test_canonical_string_round_trips(text):
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec


def test_parse_fields_and_properties():
    assert parse_spec(" Magnitude:0.50 ") == Spec("magnitude", sparsity=0.5)
    assert parse_spec("nm:2:4") == Spec("nm", n=2, m=4)
    assert parse_spec("int4-g64") == Spec("int4", group=64)
    assert str(parse_spec("magnitude:1.0")) == "magnitude:1"
    assert parse_spec("wanda:0.3").needs_stats and parse_spec("wanda:0.3").is_pruning
    assert parse_spec("nm:2:4").is_pruning and not parse_spec("nm:2:4").needs_stats
    assert not parse_spec("int8").is_pruning and not parse_spec("fp8-e4m3").needs_stats


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("magnitud:0.5", "magnitud:0.5"),
        ("magnitude:1.5", "1.5"),
        ("magnitude:-0.1", "-0.1"),
        ("wanda:abc", "abc"),
        ("nm:4:2", "nm:4:2"),
        ("nm:0:4", "nm:0:4"),
        ("nm:2:x", "nm:2:x"),
        ("int4-g0", "int4-g0"),
        ("int4", "int4"),
        ("int3", "int3"),
    ],
)
def test_parse_errors_name_the_bad_value(text, fragment):
    with pytest.raises(ValueError, match="expected|outside|not a number|needs|must") as err:
        parse_spec(text)
    assert fragment in str(err.value)


def test_unknown_spec_lists_choices():
    with pytest.raises(ValueError) as err:
        parse_spec("magnitud:0.5")
    assert "int4-g128" in str(err.value) and "magnitude:S" in str(err.value)


def test_spec_constructor_validates():
    with pytest.raises(ValueError, match="1.5"):
        Spec("magnitude", sparsity=1.5)
    with pytest.raises(ValueError, match="sparsity"):
        Spec("magnitude")
    with pytest.raises(ValueError, match="group"):
        Spec("int8", group=128)


# --- check_applicable ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, shape, has_stats, fragments",
    [
        ("int4-g128", (64, 100), False, ["int4-g128", "100"]),
        ("nm:2:4", (8, 6), False, ["nm:2:4", "6"]),
        ("wanda:0.5", (8, 16), False, ["wanda:0.5", "stats"]),
        ("int8", (2, 3, 4), False, ["int8", "(2, 3, 4)"]),
    ],
)
def test_check_applicable_errors(spec, shape, has_stats, fragments):
    with pytest.raises(ValueError) as err:
        check_applicable(spec, shape, has_stats=has_stats)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_check_applicable_accepts_valid(spec):
    check_applicable(spec, (8, 256), has_stats=True)
    check_applicable(parse_spec(spec), (8, 256), has_stats=True)


def test_compress_runs_the_same_checks():
    with pytest.raises(ValueError, match="int4-g128"):
        compress(randn(4, 100), "int4-g128")
    with pytest.raises(ValueError, match="wanda"):
        compress(randn(4, 16), "wanda:0.5")
    with pytest.raises(ValueError, match="input_norm"):
        compress(randn(4, 16), "wanda:0.5", {"input_norm": torch.ones(15)})
    with pytest.raises(ValueError, match="input_norm"):
        compress(randn(4, 16), "wanda:0.5", {"other": torch.ones(16)})
    with pytest.raises(ValueError):
        compress(randn(4), "int8")


# --- common contract -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_shape_dtype_preserved_and_input_untouched(spec, dtype):
    w = randn(8, 256, dtype=dtype)
    before = w.clone()
    out = compress(w, spec, norm_stats(256))
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(bits(w), bits(before))
    assert torch.isfinite(out).all()
    assert not torch.equal(out, w)  # every spec changes a random matrix


def test_spec_object_and_string_agree():
    w = randn(6, 32)
    for text in ALL_SPECS[:3] + ["int8", "int4-g16", "fp8-e4m3"]:
        stats = norm_stats(32)
        assert torch.equal(compress(w, text, stats), compress(w, parse_spec(text), stats))


def test_parameter_input_gives_plain_tensor():
    w = torch.nn.Parameter(randn(4, 16))
    out = compress(w, "magnitude:0.5")
    assert not out.requires_grad and not isinstance(out, torch.nn.Parameter)


# --- magnitude -------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_magnitude_exact_zero_count_odd_numel(s):
    w = randn(7, 13)  # numel 91
    out = compress(w, f"magnitude:{s}")
    assert int((out == 0).sum()) == round(s * 91)


def test_magnitude_zeroes_the_smallest():
    w = randn(16, 32)
    out = compress(w, "magnitude:0.4")
    k = round(0.4 * w.numel())
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[w.abs().flatten().argsort()[:k]] = True  # random values: no ties
    assert torch.equal(out.flatten() == 0, expected)
    assert w[out == 0].abs().max() < w[out != 0].abs().min()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["magnitude:0.6", "wanda:0.6", "nm:2:4"])
def test_pruning_keeps_values_bit_identical(spec, dtype):
    w = randn(8, 64, dtype=dtype)
    out = compress(w, spec, norm_stats(64))
    kept = out != 0
    assert kept.sum() > 0
    assert torch.equal(bits(out[kept]), bits(w[kept]))


def test_magnitude_ties_broken_by_flat_index():
    w = torch.ones(4, 6)
    w[1::2] *= -1  # same |w| with mixed signs
    out = compress(w, "magnitude:0.5")
    zero = (out == 0).flatten()
    assert zero[:12].all() and not zero[12:].any()


def test_magnitude_composes_across_levels():
    w = randn(9, 31)  # numel 279
    step = compress(w, "magnitude:0.3")
    twice = compress(step, "magnitude:0.5")
    assert torch.equal(bits(twice), bits(compress(w, "magnitude:0.5")))
    assert (twice[step == 0] == 0).all()
    assert int((twice == 0).sum()) == round(0.5 * 279)


# --- wanda -----------------------------------------------------------------------------------


def test_wanda_prunes_per_row():
    w = randn(5, 20)
    out = compress(w, "wanda:0.3", norm_stats(20))
    assert ((out == 0).sum(dim=1) == 6).all()


def test_wanda_zeroes_smallest_scores():
    w = randn(6, 40)
    stats = norm_stats(40)
    out = compress(w, "wanda:0.5", stats)
    score = w.abs() * stats["input_norm"]
    expected = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(dim=1)[:, :20], True)
    assert torch.equal(out == 0, expected)


def test_wanda_large_input_norm_protects_column():
    w = randn(8, 16)
    w[:, 3] = 1e-4  # the smallest weights: magnitude pruning removes them first
    norm = torch.ones(16)
    assert (compress(w, "magnitude:0.25")[:, 3] == 0).all()
    norm[3] = 1e6
    out = compress(w, "wanda:0.25", {"input_norm": norm})
    assert (out[:, 3] != 0).all()
    assert ((out == 0).sum(dim=1) == 4).all()


def test_wanda_ties_broken_by_lower_index():
    out = compress(torch.ones(2, 8), "wanda:0.25", {"input_norm": torch.ones(8)})
    assert torch.equal((out == 0)[0], torch.tensor([True, True] + [False] * 6))


# --- n:m -------------------------------------------------------------------------------------


def test_nm_2_4_keeps_two_largest_per_group():
    w = randn(6, 32)
    w = w + 0.1 * w.sign()  # no zeros to start with
    out = compress(w, "nm:2:4")
    groups, orig = out.reshape(6, 8, 4), w.reshape(6, 8, 4)
    assert ((groups == 0).sum(dim=-1) == 2).all()
    top2 = orig.abs().topk(2, dim=-1).values.sort(dim=-1).values
    kept = groups.abs().sort(dim=-1).values[..., 2:]
    assert torch.equal(kept, top2)


def test_nm_ties_broken_by_lower_index():
    out = compress(torch.tensor([[1.0, -1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0]]), "nm:1:4")
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0]]))


# --- int8 ------------------------------------------------------------------------------------


def test_int8_per_row_levels_and_error():
    w = randn(8, 512) * torch.logspace(-3, 1, 8).unsqueeze(1)  # rows of very different range
    out = compress(w, "int8")
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = out / scale
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3
    assert all(row.unique().numel() <= 255 for row in out)
    assert ((out - w).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_int8_round_half_to_even_hand_example():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.4]])  # scale exactly 1
    out = compress(w, "int8")
    assert torch.equal(out, torch.tensor([[127.0, 0.0, 2.0, 2.0, -2.0, -0.0, 3.0]]))


@pytest.mark.parametrize("spec", ["int8", "int8-tensor", "int4-g4", "fp8-e4m3"])
def test_quantizers_keep_all_zero_rows(spec):
    w = randn(3, 8)
    w[1] = 0
    out = compress(w, spec)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0] != 0).any()
    assert torch.equal(compress(torch.zeros(2, 8), spec), torch.zeros(2, 8))


def test_int8_tensor_uses_one_scale():
    w = torch.tensor([[127.0, -50.3, 3.0], [0.4, 0.6, -1.0]])  # one scale of 1.0
    out = compress(w, "int8-tensor")
    assert torch.equal(out, torch.tensor([[127.0, -50.0, 3.0], [0.0, 1.0, -1.0]]))
    assert not torch.equal(out, compress(w, "int8"))  # per row, row 1 would keep 0.4


def test_int8_tensor_levels_random():
    w = randn(16, 64)
    out = compress(w, "int8-tensor")
    q = out / (w.abs().max() / 127)
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert out.unique().numel() <= 255


# --- int4 ------------------------------------------------------------------------------------


def test_int4_g128_groups():
    w = randn(4, 512) * torch.linspace(0.1, 4, 512)  # groups of different range
    out = compress(w, "int4-g128")
    og, wg = out.reshape(4, 4, 128), w.reshape(4, 4, 128)
    scale = wg.abs().amax(dim=-1, keepdim=True) / 7
    q = og / scale
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().min() >= -8 and q.round().max() <= 7
    assert all(g.unique().numel() <= 16 for g in og.reshape(-1, 128))
    assert ((og - wg).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_int4_group_scales_are_independent():
    w = torch.cat([torch.full((1, 4), 7.0), torch.tensor([[0.07, 0.01, -0.05, 0.03]])], dim=1)
    out = compress(w, "int4-g4")
    assert torch.allclose(out, torch.tensor([[7.0] * 4 + [0.07, 0.01, -0.05, 0.03]]))
    assert not torch.allclose(compress(w, "int4-g8"), w)  # one group: small values collapse


# --- fp8 -------------------------------------------------------------------------------------


def test_fp8_hand_computation():
    # Row 0 has scale 1: 0.3 -> 0.3125 (3 mantissa bits), 17 -> 16 (tie, to even), 5.5 exact.
    row = torch.tensor([448.0, 1.0, 0.3, 17.0, -5.5])
    w = torch.stack([row, 2 * row, torch.zeros(5)])
    expected = torch.tensor([448.0, 1.0, 0.3125, 16.0, -5.5])
    assert torch.equal(compress(w, "fp8-e4m3"), torch.stack([expected, 2 * expected, row * 0]))


def test_fp8_matches_formula():
    w = randn(8, 64)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    expected = scale * (w / scale).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(compress(w, "fp8-e4m3"), expected)
    assert compress(w, "fp8-e4m3").abs().amax(dim=1).allclose(w.abs().amax(dim=1))


def test_magnitude_prunes_the_k_smallest_in_stable_sort_order() -> None:
    """The selection picks exactly what a stable sort of |w| would: ties in flat-index order,
    existing zeros first — on matrices full of ties, with zeros, at every sparsity."""

    def by_sort(w: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = round(sparsity * w.numel())
        order = torch.sort(w.abs().flatten(), stable=True).indices
        pruned = torch.zeros(w.numel(), dtype=torch.bool)
        pruned[order[:k]] = True
        return w.masked_fill(pruned.view(w.shape), 0)

    generator = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(60):
        shape = tuple(torch.randint(1, 40, (2,), generator=generator).tolist())
        if trial % 2:  # few distinct values: many ties at the threshold
            w = torch.randint(-3, 4, shape, generator=generator).float() * 0.5
        else:
            w = torch.randn(shape, generator=generator)
        if trial % 3 == 0:
            w = by_sort(w, 0.3)  # zeros already there
        for sparsity in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
            assert torch.equal(compress(w, f"magnitude:{sparsity}"), by_sort(w, sparsity))
            checked += 1
    assert checked == 360


# --- the stored form: integers and scales that a compressed-tensors loader decodes exactly ------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text", ["int8", "int8-tensor", "int4-g64", "fp8-e4m3"])
def test_quantized_form_decodes_to_the_compressed_weight(text, dtype):
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from dtm_ray.core.compress import quantize

    w = randn(48, 256, seed=3, dtype=dtype)
    w[5] = 0  # an all-zero row keeps scale 0 and decodes to zeros
    q = quantize(w, text)
    served_scale = q.scale.to(dtype)  # serving stacks hold the scale in the model's dtype
    assert torch.equal(served_scale.float(), q.scale)  # so it must be representable
    if text == "int8-tensor":  # written with its one scale repeated per row
        served_scale = served_scale.expand(w.shape[0], 1)
    # compressed-tensors' own decoder (what transformers and vLLM call): q.to(scale.dtype) * scale
    decoded = dequantize(x_q=q.values, scale=served_scale).to(dtype)
    assert torch.equal(bits(decoded), bits(compress(w, text)))
    if text != "fp8-e4m3":  # dtm_ray's ranges: int4 [-8, 7], int8 [-127, 127]
        low, high = (-8, 7) if text.startswith("int4") else (-127, 127)
        assert q.values.dtype == torch.int8
        assert low <= int(q.values.min()) and int(q.values.max()) <= high
