import pytest

from sd_distill.params import PROFILES, ParamsError, parse_set, resolve
from tests.conftest import write_params


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_resolves(tmp_path, profile):
    params = resolve(write_params(tmp_path, profile))
    assert params.profile == profile


def test_profile_preset_sits_under_params_file_and_set(tmp_path):
    path = write_params(tmp_path, "smoke", teacher={"unet_train": {"steps": 9}})
    params = resolve(path)
    assert params.teacher.unet_train.steps == 9  # params.yaml beats the smoke preset (6)
    assert params.teacher.unet_train.batch_size == 16  # untouched preset value survives the merge
    assert params.teacher.unet.block_out_channels == (8, 16, 16)
    params = resolve(path, ["teacher.unet_train.steps=11"])
    assert params.teacher.unet_train.steps == 11


def test_tiny_teacher_is_shaped_like_sd(tmp_path):
    unet = resolve(write_params(tmp_path, "tiny")).teacher.unet
    assert len(unet.block_out_channels) >= 3 and unet.layers_per_block == 2


def test_unknown_key_names_key_and_allowed(tmp_path):
    path = write_params(tmp_path, teacher={"unet_train": {"stepz": 3}})
    with pytest.raises(ParamsError) as err:
        resolve(path)
    message = str(err.value)
    assert "teacher.unet_train.stepz: unknown key" in message
    assert "steps" in message and str(path) in message


def test_wrong_type_and_out_of_range_are_reported_together(tmp_path):
    path = write_params(tmp_path, base={"seed": "abc"}, evaluate={"guidance": 0.5})
    with pytest.raises(ParamsError) as err:
        resolve(path)
    message = str(err.value)
    assert "base.seed" in message and "'abc'" in message
    assert "evaluate.guidance" in message and "greater than or equal to 1" in message


def test_unknown_profile_lists_profiles(tmp_path):
    with pytest.raises(ParamsError, match=r"profile: expected one of tiny, smoke, sd15, found 'huge'"):
        resolve(write_params(tmp_path, "huge"))


def test_unknown_top_level_section(tmp_path):
    path = write_params(tmp_path)
    path.write_text(path.read_text() + "halving: {}\n")
    with pytest.raises(ParamsError, match="unknown top-level key.*halving"):
        resolve(path)


def test_non_digits_source_needs_a_path(tmp_path):
    with pytest.raises(ParamsError, match="prepare.path"):
        resolve(write_params(tmp_path, prepare={"source": "folder"}))


def test_unet_channels_must_fit_group_norm(tmp_path):
    with pytest.raises(ParamsError, match="divisible by norm_num_groups"):
        resolve(write_params(tmp_path, teacher={"unet": {"block_out_channels": [12, 16, 16]}}))


@pytest.mark.parametrize("bad", ["teacher", "teacher.steps", "nosuch.key=1", "=3"])
def test_bad_set_syntax(bad):
    with pytest.raises(ParamsError):
        parse_set([bad])


def test_set_parses_yaml_values():
    assert parse_set(["prepare.templates=['{word}']", "base.seed=3"]) == {
        "prepare": {"templates": ["{word}"]}, "base": {"seed": 3}}


def test_params_are_frozen(tmp_path):
    params = resolve(write_params(tmp_path))
    with pytest.raises(Exception):
        params.teacher.unet_train.steps = 3


def test_one_nested_key_keeps_the_sections_other_defaults(tmp_path):
    params = resolve(write_params(tmp_path, "tiny"), ["guidance.train.learning_rate=5e-4"])
    assert params.guidance.train.learning_rate == 5e-4
    assert params.guidance.train.steps == 400 and params.guidance.train.batch_size == 64  # section defaults kept


def test_teacher_targets_cannot_be_combined_with_a_rescaled_schedule(tmp_path):
    with pytest.raises(ParamsError, match="set targets=data"):
        resolve(write_params(tmp_path, vpred={"zero_terminal_snr": True}))


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: smoke\nteacher:\n  unet_train: {steps: 3\n  vae: {}\n")
    with pytest.raises(ParamsError) as err:
        resolve(path)
    assert str(err.value) == (f"{path}:4:6: not valid YAML: expected ',' or '}}', but got ':' (while parsing a flow "
                              "mapping at line 3, column 15)")


def test_a_section_given_twice_is_refused_not_silently_dropped(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: smoke\nteacher:\n  kl_weight: 0.5\nbase: {}\nteacher:\n  caption_dropout: 0.2\n")
    with pytest.raises(ParamsError, match=r"params.yaml:5:1: not valid YAML: found duplicate key 'teacher' "
                                          r"\(first given on line 2\)"):
        resolve(path)


def test_params_file_that_is_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"profile: smoke\nbase: {seed: \xff}\n")
    with pytest.raises(ParamsError, match=r"params.yaml:2:14: not UTF-8 text \(byte 0xff\)"):
        resolve(path)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping of sections at the top level (section: {key: value}), found list ['a', 'b']"),
    ("profile: smoke\nbase: [1, 2]\n", "section 'base' must be a mapping of keys to values, found list [1, 2]"),
    ("profile: [smoke]\n", "profile: expected one of tiny, smoke, sd15, found ['smoke']"),
    ("1: 2\n", "unknown top-level key(s) 1; allowed: "),
    ("profile: smoke\nbase: {seed: {a: 1}}\n", "base.seed: Input should be a valid integer (found a mapping)"),
])
def test_wrong_shapes_name_file_key_expected_and_found(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        resolve(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_an_error_names_where_the_bad_value_came_from(tmp_path):
    path = write_params(tmp_path, base={"seed": 1})
    with pytest.raises(ParamsError, match=r"^overrides: base.seed: .*\(found 'x'\)$"):
        resolve(path, ["base.seed=x"])
    with pytest.raises(ParamsError, match=r"^--set 'base.seed=\[1':1:3: not valid YAML"):
        resolve(path, ["base.seed=[1"])
    with pytest.raises(ParamsError, match=r"base.seed is already set to a value"):
        parse_set(["base.seed=1", "base.seed.x=2"])
