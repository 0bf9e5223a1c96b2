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


@pytest.mark.parametrize("section, old, value, says", [
    ("evaluate", "steps", 9, "renamed to evaluate.sampling_steps"),
    ("evaluate", "baseline_steps", [2, 1], "renamed to evaluate.baseline_sampling_steps"),
    ("evaluate", "grid_steps", [2, 1], "renamed to evaluate.grid_sampling_steps"),
    ("halve", "round_steps", {1: 5}, "renamed to halve.round_train_steps"),
    ("halve", "steps_from", 64, "no longer a param: the first round's teacher always samples in 64 steps"),
])
def test_an_old_key_is_refused_by_one_line_naming_the_new_one(tmp_path, section, old, value, says):
    path = write_params(tmp_path, **{section: {old: value}})
    with pytest.raises(ParamsError) as err:
        resolve(path)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{path}") and f"{section}.{old}: {says}" in line
    with pytest.raises(ParamsError, match=f"{section}.{old}: {says}"):  # from --set too
        resolve(write_params(tmp_path), [f"{section}.{old}={value}"])


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


def every_train_params(params):
    """(section.key, TrainParams) of every training loop the params configure."""
    from sd_distill.params import TrainParams

    for name in type(params).model_fields:
        section = getattr(params, name)
        for key in type(section).model_fields if hasattr(type(section), "model_fields") else ():
            if isinstance(getattr(section, key), TrainParams):
                yield f"{name}.{key}", getattr(section, key)


@pytest.mark.parametrize("profile", ["tiny", "smoke"])
def test_memory_levers_are_off_in_the_cpu_profiles_and_their_fingerprints_unchanged(tmp_path, profile):
    found = dict(every_train_params(resolve(write_params(tmp_path, profile))))
    assert {"teacher.vae_train", "teacher.unet_train", "vpred.train", "prune.train", "decoder.train"} <= set(found)
    for where, tp in found.items():
        assert (tp.optimizer, tp.adam_beta1, tp.adam_beta2, tp.adam_epsilon, tp.adam_amsgrad,
                tp.gradient_checkpointing, tp.allow_tf32) == ("adamw", 0.9, 0.999, 1e-8, False, False, False), where
    from sd_distill.params import TrainParams

    # the fingerprint a checkpoint records, as it was before these knobs existed: old checkpoints still resume
    assert TrainParams().fingerprint() == (
        '{"batch_size": 128, "checkpoint_every": 200, "ema_decay": 0.995, "grad_accum": 1, "keep_checkpoints": 2, '
        '"learning_rate": 0.001, "log_every": 25, "lr_schedule": "cosine", "max_grad_norm": 1.0, '
        '"min_micro_batch": 1, "steps": 1200, "warmup_steps": 50, "weight_decay": 0.0}')
    assert '"optimizer": "adamw8bit"' in TrainParams(optimizer="adamw8bit").fingerprint()
    assert TrainParams(gradient_checkpointing=True).fingerprint() == TrainParams().fingerprint()


def test_sd15_preset_is_the_published_recipes(tmp_path):
    p = resolve(write_params(tmp_path, "sd15"))
    assert p.base.mixed_precision == "bf16"
    prune = p.prune.train  # BK-SDM scripts/kd_train.sh
    assert (prune.learning_rate, prune.lr_schedule, prune.warmup_steps, prune.batch_size, prune.grad_accum,
            prune.steps, prune.max_grad_norm, prune.weight_decay, prune.ema_decay) == (
        5e-5, "constant", 0, 64, 4, 50_000, 1.0, 1e-2, 0.9999)
    assert (p.prune.task_weight, p.prune.out_kd_weight, p.prune.feat_kd_weight, p.prune.variant) == (1, 1, 1, "small")
    halve = p.halve.train  # Salimans & Ho, imagenet64_distill.py
    assert (halve.learning_rate, halve.lr_schedule, halve.warmup_steps, halve.weight_decay, halve.ema_decay,
            halve.max_grad_norm) == (1e-4, "linear", 0, 0.0, 0.0, 1.0)
    assert (p.guidance.w_min, p.guidance.w_max, p.halve.w_min, p.halve.w_max) == (2, 14, 2, 14)  # Meng et al.
    dec = p.decoder.train  # TAESD, madebyollin/taesd#11
    assert (dec.learning_rate, dec.adam_beta1, dec.adam_beta2, dec.adam_amsgrad, dec.weight_decay,
            dec.batch_size) == (3e-4, 0.9, 0.9, True, 0.0, 16)
    unet_stages = [p.vpred.train, p.guidance.train, prune, halve]
    assert all(tp.gradient_checkpointing and tp.allow_tf32 and tp.batch_size * tp.grad_accum == 256
               for tp in unet_stages)


def test_decoder_refuses_gradient_checkpointing_naming_the_upstream_reason(tmp_path):
    with pytest.raises(ParamsError, match=r"decoder: .*gradient_checkpointing must be false for the decoder: under "
                                          r"gradient checkpointing diffusers' EncoderTiny skips"):
        resolve(write_params(tmp_path, decoder={"train": {"gradient_checkpointing": True}}))


def test_amsgrad_needs_the_torch_optimizer(tmp_path):
    with pytest.raises(ParamsError, match=r"vpred.train: .*adam_amsgrad needs optimizer adamw"):
        resolve(write_params(tmp_path, vpred={"train": {"optimizer": "adamw8bit", "adam_amsgrad": True}}))
