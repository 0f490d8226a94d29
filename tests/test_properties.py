"""Property-based tests (hypothesis): config overrides and batch augmentation."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sokd import config
from sokd.data import augment
from sokd.errors import SokdError

KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
SCALAR = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                   st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
                   .filter(lambda s: s not in ("yes", "no", "on", "off", "true", "false", "null", "y", "n")))


@given(st.lists(KEY, min_size=1, max_size=4), SCALAR)
def test_override_sets_exactly_the_dotted_path(path, value):
    text = f"{'.'.join(path)}={str(value).lower() if isinstance(value, bool) else value}"
    tree = config.apply_overrides({"keep": 1}, [text])
    node = tree
    for p in path[:-1]:
        node = node[p]
    assert node[path[-1]] == value
    if path[0] != "keep":
        assert tree["keep"] == 1


BASE = {"data": {"name": "synthetic"}, "model": {"arch": "resnet8"}, "method": {"name": "vanilla"}}


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(KEY, min_size=1, max_size=3), SCALAR)
def test_any_override_is_accepted_or_rejected_with_a_sokd_error(path, value):
    try:
        tree = config.apply_overrides(BASE, [f"{'.'.join(path)}={value}"])
        config.build(tree)
    except SokdError as err:
        assert "\n" not in str(err)


@given(st.integers(1, 60), st.integers(-5, 5))
def test_valid_epoch_override_round_trips(epochs, seed):
    cfg = config.build(config.apply_overrides(BASE, [f"train.epochs={epochs}", f"train.seed={seed}"]))
    assert (cfg.train.epochs, cfg.train.seed) == (epochs, seed)


images = st.tuples(st.integers(1, 6), st.sampled_from([1, 3]), st.integers(4, 20), st.integers(4, 20),
                   st.integers(0, 2**31 - 1))


def uint8_batch(spec, low: int = 0):
    """A random uint8 (N,C,H,W) batch from a drawn spec, and the generator that made it."""
    n, c, h, w, seed = spec
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (n, c, h, w), dtype=torch.uint8, generator=g), g


@settings(max_examples=60, deadline=None)
@given(images, st.integers(0, 4), st.sampled_from(["reflect", "zeros"]))
def test_random_crop_preserves_shape_dtype_and_values(spec, padding, mode):
    x, g = uint8_batch(spec, low=1)  # no zeros in the input, so zero padding is recognisable
    padding = min(padding, x.shape[2] - 1, x.shape[3] - 1)
    out = augment.random_crop(x, padding, mode, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    allowed = set(x.unique().tolist()) | ({0} if mode == "zeros" else set())
    assert set(out.unique().tolist()) <= allowed
    if mode == "reflect":  # every output row of a sample is a (shifted, reflected) window of its input
        assert out.float().mean() > 0


@settings(max_examples=60, deadline=None)
@given(images)
def test_hflip_twice_is_identity_and_once_mirrors(spec):
    x, g = uint8_batch(spec)
    mask = torch.rand(x.shape[0], generator=g) < 0.5
    once = augment.hflip(x, mask)
    assert torch.equal(augment.hflip(once, mask), x)
    assert torch.equal(once[mask], x[mask].flip(3)) and torch.equal(once[~mask], x[~mask])


@settings(max_examples=40, deadline=None)
@given(images)
def test_normalize_maps_uint8_range_to_expected_affine_range(spec):
    x, g = uint8_batch(spec)
    mean, std = [0.5] * x.shape[1], [0.25] * x.shape[1]
    y = augment.normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert y.min() >= -2.0 - 1e-5 and y.max() <= 2.0 + 1e-5
    assert torch.allclose(y, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=512),
                 st.binary(max_size=256).map(lambda b: b"\x80\x02" + b),  # pickle-looking
                 st.binary(max_size=256).map(lambda b: b"PK\x03\x04" + b)))  # zip-looking
def test_any_bytes_as_a_checkpoint_give_a_one_line_error(tmp_path_factory, blob):
    """Random files reach odd corners of the unpickler (IndexError, TypeError, ...); all are SokdError."""
    from sokd.files import safe_load
    path = tmp_path_factory.mktemp("ckpt") / "blob.pt"
    path.write_bytes(blob)
    try:
        obj = safe_load(path)
    except SokdError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:  # a few bytes can be a valid pickle of a plain mapping; then it is returned as such
        assert isinstance(obj, dict)
