from pathlib import Path

import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import DEFAULT_KEEP, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "x", "source": {"path": "a"}, "destination": {"path": "b"}}


def test_shipped_manifests_load():
    for p in (ROOT / "manifests").glob("*.yaml"):
        m = load_manifest(p)
        assert m.quantize.bits == 5 and m.verify.min_cos_sim == 0.998
    g = load_manifest(ROOT / "manifests/gemma-4-31B-it.yaml")
    assert g.source.repo == "google/gemma-4-31B-it" and "*vision_tower*" in g.quantize.keep_bf16


def test_defaults():
    m = parse_manifest(BASE)
    assert (m.quantize.bits, m.quantize.block_size, m.quantize.scale, m.quantize.sign_seed) == (5, 128, "lsq", 0)
    assert m.quantize.keep_bf16 == DEFAULT_KEEP and m.load_check.max_vram_gb == 22.0
    assert m.bits_for("anything") == 5


def test_smoothing_and_target_keys():
    m = parse_manifest({**BASE, "quantize": {"smooth": {"alpha": 0.125, "sequences": 4}, "target_bpw": 5}})
    assert m.quantize.smooth is not None and (m.quantize.smooth.alpha, m.quantize.smooth.sequences) == (0.125, 4)
    assert m.quantize.smooth.length == 256 and m.quantize.target_bpw == 5.0
    assert parse_manifest(BASE).quantize.smooth is None and parse_manifest(BASE).quantize.target_bpw is None
    assert parse_manifest({**BASE, "quantize": {"smooth": None}}).quantize.smooth is None
    assert parse_manifest({**BASE, "quantize": {"smooth": {}}}).quantize.smooth.alpha == 0.25  # type: ignore[union-attr]


def test_overrides_first_match_wins():
    m = parse_manifest({**BASE, "quantize": {"overrides": {"*.down_proj.*": 6, "*.mlp.*": 4}}})
    assert m.bits_for("l.0.mlp.down_proj.weight") == 6 and m.bits_for("l.0.mlp.up_proj.weight") == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "source": {"path": "a"}}, "destination: required key is missing"),
        ({**BASE, "quantize": {"bitz": 4}}, "quantize.bitz: unknown key"),
        ({**BASE, "quantise": {}}, "quantise: unknown key"),
        ({**BASE, "quantize": {"bits": "5"}}, "quantize.bits: expected int"),
        ({**BASE, "quantize": {"bits": True}}, "quantize.bits: expected int"),
        ({**BASE, "quantize": {"bits": 9}}, "quantize.bits: bits must be in 2..8"),
        ({**BASE, "quantize": {"block_size": 100}}, "quantize.block_size"),
        ({**BASE, "quantize": {"scale": "max"}}, "quantize.scale: must be one of"),
        ({**BASE, "quantize": {"overrides": {"*": 1}}}, "quantize.overrides"),
        ({**BASE, "quantize": {"keep_bf16": "*norm*"}}, "quantize.keep_bf16: expected a list"),
        ({**BASE, "verify": {"min_cos_sim": 1.5}}, "verify.min_cos_sim"),
        ({**BASE, "source": {"path": "a", "repo": "o/n"}}, "source: give exactly one"),
        ({**BASE, "source": {"repo": "no-slash"}}, "source.repo"),
        ({**BASE, "name": "../evil"}, "name:"),
        ({**BASE, "slurm": {"extra": ["#SBATCH --x"]}}, "slurm.extra"),
        ([1, 2], "expected a mapping"),
        ({**BASE, "name": "a" * 300}, "name: 'aaaa"),
        ({**BASE, "destination": {"repo": "o/" + "n" * 97}}, "destination.repo"),
        ({**BASE, "quantize": {"smooth": {"alpha": 2}}}, "quantize.smooth.alpha: must be in"),
        ({**BASE, "quantize": {"smooth": {"max_ratio": 0.5}}}, "quantize.smooth.max_ratio"),
        ({**BASE, "quantize": {"smooth": {"sequences": 0}}}, "quantize.smooth: sequences"),
        ({**BASE, "quantize": {"smooth": {"alpah": 0.25}}}, "quantize.smooth.alpah: unknown key"),
        ({**BASE, "quantize": {"smooth": "on"}}, "quantize.smooth: expected a mapping"),
        ({**BASE, "quantize": {"target_bpw": 1.5}}, "quantize.target_bpw: must be in"),
        ({**BASE, "quantize": {"target_bpw": "5.5"}}, "quantize.target_bpw: expected float"),
    ],
)
def test_bad_manifests_name_the_key(data, message):
    with pytest.raises(ManifestError, match=message.replace("*", r"\*").replace(".", r"\.")):
        parse_manifest(data)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    p = tmp_path / "m.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="invalid YAML at line"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "nope.yaml")


def test_duplicate_keys_and_aliases_are_refused(tmp_path: Path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nsource: {path: a}\ndestination: {path: b}\nquantize: {bits: 4}\nquantize: {bits: 6}\n")
    with pytest.raises(ManifestError, match="invalid YAML at line 5: duplicate key 'quantize'"):
        load_manifest(p)
    p.write_text(
        "name: x\nsource: {path: a}\ndestination: {path: b}\nquantize: {keep_bf16: &k ['*norm*'], "
        "overrides: {}}\nverify: {min_cos_sim: 0.9}\nslurm: {extra: *k}\n"
    )
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(p)


def test_long_values_are_cut_in_messages():
    with pytest.raises(ManifestError) as e:
        parse_manifest({**BASE, "name": "é" * 100_000})
    assert len(str(e.value)) < 400 and "100002 characters" in str(e.value)
