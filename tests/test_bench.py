import statistics
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_distill import bench, cli
from sd_distill.bench import FakeTimer, Measurement, Options, Session
from sd_distill.models import costs
from sd_distill.params import DecoderArch, resolve

# SD v1.5's layout, tiny: 3 stages (BK tiny drops one), 2 layers per stage (BK base drops one)
TINY = costs.Arch(
    "tiny test",
    unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16, 16], layers_per_block=2,
              down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
              cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
             norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    text_encoder=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=8, vocab_size=100, projection_dim=16),
)
TINY_RUN = dict(arch=TINY, decoder_arch=DecoderArch(channels=8), guidance_dim=8)
SMALL = Options(resolution=16)  # latent 8x8

# raw samples (seconds) per label; medians: teacher b2 20 ms, full decode 50 ms, text b2 3 ms, BK small 6 ms, ...
SECONDS = {
    "unet/teacher/b1": [0.012, 0.010, 0.011], "unet/teacher/b2": [0.030, 0.018, 0.020],
    "unet/guided/b1": [0.011, 0.011, 0.011], "unet/bk-base/b1": [0.009, 0.008, 0.007],
    "unet/bk-small/b1": [0.005, 0.007, 0.006], "unet/bk-tiny/b1": [0.005, 0.005, 0.005],
    "decoder/full/b1": [0.050, 0.060, 0.040], "decoder/tiny/b1": [0.004, 0.009, 0.001],
    "text/b1": [0.002, 0.002, 0.002], "text/b2": [0.003, 0.004, 0.001],
}


def by_pipeline(result):
    return {(r["pipeline"], r["decoder"]): r for r in result["arch"]["pipelines"]}


@pytest.fixture(scope="module")
def arch_run(tmp_path_factory):
    timer = FakeTimer(SECONDS, run=False)
    result = bench.run(Session(timer, warmup=0, repeats=3), SMALL, ["arch"], tmp_path_factory.mktemp("p"), **TINY_RUN)
    return result, timer


def test_pipeline_ms_per_image_is_steps_times_unet_call_plus_decode_plus_text(arch_run):
    rows = by_pipeline(arch_run[0])
    teacher, student = rows["teacher@64 CFG", "full"], rows["student BK small@1", "tiny"]
    assert teacher["ms_per_image"] == pytest.approx(64 * 20 + 50 + 3)  # CFG: one call at 2B per step
    assert teacher["unet_calls_per_image"] == 128
    assert rows["teacher@25 CFG", "tiny"]["ms_per_image"] == pytest.approx(25 * 20 + 4 + 3)
    assert rows["guided@8", "full"]["ms_per_image"] == pytest.approx(8 * 11 + 50 + 2)
    assert student["ms_per_image"] == pytest.approx(6 + 4 + 2)
    assert student["images_per_s"] == pytest.approx(1000 / 12)
    assert student["speedup"] == pytest.approx(1333 / 12)
    assert teacher["speedup"] == pytest.approx(1.0)


def test_flops_per_image_are_the_counted_calls_and_their_ratio(arch_run):
    result = arch_run[0]
    flops, rows = result["arch"]["flops_per_call_b1"], by_pipeline(result)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(TINY.unet)
    assert flops["unet/teacher"] == 2 * costs.unet_macs(unet, 8, 8, seq_len=8)["macs_total"]
    teacher, student = rows["teacher@64 CFG", "full"], rows["student BK small@1", "tiny"]
    assert teacher["flops_per_image"] == 128 * flops["unet/teacher"] + flops["decoder/full"] + 2 * flops["text"]
    assert student["flops_per_image"] == flops["unet/bk-small"] + flops["decoder/tiny"] + flops["text"]
    assert student["flop_ratio"] == pytest.approx(teacher["flops_per_image"] / student["flops_per_image"])
    target = result["arch"]["targets"][0]
    assert target["value"] == student["flop_ratio"] and target["measured_latency_ratio"] == student["speedup"]
    assert target["pass"] == (student["flop_ratio"] >= 100)
    assert student["peak_fraction"] is None  # CPU: no known peak


def test_recorded_medians_are_the_medians_of_the_raw_samples(arch_run):
    result, _ = arch_run
    for label, samples in SECONDS.items():
        assert result["measurements"][label]["samples_s"] == samples
        assert result["measurements"][label]["median_s"] == statistics.median(samples)
    calls = {r["from"][0]: r for r in result["arch"]["calls"]}
    assert calls["unet/teacher/b2"]["ms"] == pytest.approx(20)
    assert calls["unet/teacher/b2"]["flops"] == 2 * result["arch"]["flops_per_call_b1"]["unet/teacher"]


def test_batch_divides_the_cost_and_peak_fraction_is_achieved_over_peak():
    flops = {**{f"unet/{k}": 10**9 for k in bench.UNETS}, "decoder/full": 4 * 10**9, "decoder/tiny": 10**8,
             "text": 10**7}
    labels = [f"unet/{k}/b2" for k in bench.UNETS] + ["unet/teacher/b4", "decoder/full/b2", "decoder/tiny/b2",
                                                      "text/b2", "text/b4"]
    calls = {label: Measurement(label, (0.1, 0.3, 0.2), int(label.rsplit("/b", 1)[1])) for label in labels}
    rows = {(r["pipeline"], r["decoder"]): r for r in bench.compose(calls, flops, batch=2, peak=1.0)}
    row = rows["teacher@25 CFG", "full"]
    seconds = (25 * 0.2 + 0.2 + 0.2) / 2
    assert row["ms_per_image"] == pytest.approx(seconds * 1e3)
    assert row["peak_fraction"] == pytest.approx((50 * 10**9 + 4 * 10**9 + 2 * 10**7) / seconds / 1e12)


def test_known_devices_have_a_dense_peak_and_unknown_ones_none():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert bench.peak_tflops("NVIDIA H200", "float16") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert bench.peak_tflops("NVIDIA GeForce GTX 1080", "bfloat16") is None


def test_measure_warms_up_untimed_then_times_each_repeat():
    ran = []
    samples = bench.measure(lambda: ran.append(1) or time.sleep(0.005), warmup=2, repeats=3, timer=bench.CpuTimer())
    assert len(ran) == 5 and len(samples) == 3 and min(samples) >= 0.005


def test_every_row_comes_from_a_measurement_of_this_run(tmp_path):
    ticks = iter(range(1, 10**6))
    timer = FakeTimer(lambda label: next(ticks) / 1000, run=False)  # every sample a new value
    result = bench.run(Session(timer, warmup=0, repeats=2), SMALL, bench.PARTS, tmp_path, **TINY_RUN)
    recorded: dict[str, list[float]] = {}
    for label, s in timer.calls:
        recorded.setdefault(label, []).append(s)
    assert {label: m["samples_s"] for label, m in result["measurements"].items()} == recorded
    a, train = result["arch"], result["train"]["rows"]
    rows = [*a["calls"], *a["pipelines"], *a["targets"], *train]
    assert {label for r in rows for label in r["from"]} == set(recorded)  # no row without, no timing unused
    median = {label: statistics.median(s) for label, s in recorded.items()}
    for r in a["calls"]:
        assert r["ms"] == pytest.approx(median[r["from"][0]] * 1e3)
    for r in train:
        assert {r["shapes"] for r in train} == {"tiny"}
        assert r["samples_per_s"] == pytest.approx(r["batch"] / median[r["from"][0]])
    assert {r["name"].split(":")[0].split(" (")[0] for r in train} == {"halve round", "prune"}
    # the printed table shows exactly these rows and numbers
    lines = bench.render(result).splitlines()
    for r in a["calls"]:
        assert sum(r["name"] in line and f"| {bench._n(r['ms'])} " in line and f"| {r['batch']} " in line
                   for line in lines) == 1
    for r in a["pipelines"]:
        assert any(line.startswith(f"| {r['pipeline']} ") and f"| {r['decoder']} " in line
                   and f"| {bench._n(r['ms_per_image'])} " in line for line in lines)
    for r in train:
        assert any(r["name"] in line and f"| {bench._n(r['samples_per_s'])} " in line for line in lines)
    assert "FLOP-based projection, not a measurement" in "\n".join(lines)
    assert result["train"]["projection"]["total_gpu_hours"] > 0


@pytest.fixture
def one_thread():
    """A correctness test, not a timing: one thread keeps it fast on a machine that is busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_timed_calls_and_training_steps_run(one_thread):
    """What the fake timers above skip: every timed call and both training steps, once (smoke profile shapes)."""
    session = Session(FakeTimer(lambda label: 0.5), warmup=0, repeats=1)
    calls = bench.measure_arch(session, TINY, SMALL, DecoderArch(channels=8), guidance_dim=8)
    assert len(calls) == len(bench.UNETS) + 1 + len(bench.DECODERS) + 2
    rows = bench.run_train(session, SMALL, resolve(bench.NO_PARAMS_FILE, profile="smoke"), "tiny", None)
    assert [r["batch"] for r in rows] == [8, 16]  # the smoke profile's halve and prune batch sizes
    assert [r["samples_per_s"] for r in rows] == [16, 32]


def test_equal_quality_picks_the_fewest_dpmpp_steps_at_or_under_the_student_fid():
    metrics = {"models": {
        "teacher@64": {"fid": 0.98, "steps": 64},
        "teacher-dpmpp@8": {"fid": 1.02, "steps": 8}, "teacher-dpmpp@4": {"fid": 1.10, "steps": 4},
        "teacher-dpmpp@2": {"fid": 3.85, "steps": 2}, "teacher-dpmpp@1": {"fid": 5.81, "steps": 1},
        "teacher-ddim@2": {"fid": 1.00, "steps": 2},  # another solver: not the DPM-Solver++ baseline
        "student@1": {"fid": 1.10, "steps": 1}, "student-vae@1": {"fid": 3.0, "steps": 1},
    }}
    q = bench.equal_quality(metrics)
    assert (q["student"], q["match"], q["match_steps"], q["match_fid"]) == ("student@1", "teacher-dpmpp@4", 4, 1.10)
    metrics["models"]["student@1"]["fid"] = 0.5
    q = bench.equal_quality(metrics)
    assert q["match"] is None and "0.5" in q["note"]


def test_models_part_is_skipped_with_a_message_when_the_folders_are_absent(tmp_path):
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "teacher" / "model_index.json").write_text("{}")
    result = bench.run(Session(FakeTimer({}), 0, 1), SMALL, ["models"], tmp_path)
    message = result["models"]["skipped"]
    assert "skipped" in message and str(tmp_path / "models" / "student") in message and "make run" in message
    assert str(tmp_path / "models" / "teacher") not in message
    assert result["measurements"] == {}
    assert message in bench.render(result)


@pytest.mark.parametrize("argv, named", [
    (["--dtype", "float8"], "--dtype"),
    (["--device", "cuda"], "--device cuda"),
    (["--device", "tpu"], "--device"),
    (["--resolution", "100"], "--resolution"),
    (["--parts", "arch,speed"], "--parts"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_option_exits_2_with_one_line_naming_it(argv, named, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", *argv, "--project", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and err[0].startswith("sd-distill bench: error:")
    assert not (tmp_path / "reports").exists()
