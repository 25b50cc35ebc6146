"""engine.simulate: cost formulas, the event schedule, its trace, profiles, bad input."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest

import engine.simulate as sim
from engine import trace
from engine.reducer import plan_buckets
from engine.simulate import Link, Network, Profile, Task, allreduce_s, profiles, schedule, step
from engine.simulate.cli import main as cli_main
from engine.simulate.collectives import TREE_BUS, tree_factor


@pytest.fixture(scope="module")
def r18():
    """The real ResNet-18 (10 classes) layout with fresh random per-layer times."""
    model = profiles.real_model("resnet18", 10)
    rng = np.random.default_rng()
    layers = tuple(sim.LayerTime(l.name, rng.uniform(1e-4, 2e-3), rng.uniform(2e-4, 4e-3),
                                 getattr(l, "grad_range", None), profiles.ready_fraction(l, model))
                   for l, _ in profiles.forward_layers(model))
    return Profile(layers, model.layout, 1e-9, 8, "synthetic")


# ------------------------------------------------------------------ cost formulas ------

def test_ring_inside_one_node():
    _, lat, bw = allreduce_s(8e6, 8, 8, Link(1e-6, 1e9), Link(9.0, 1.0), "ring")
    assert lat == pytest.approx(2 * 7 * 1e-6, rel=1e-12)           # 2(p-1) alpha_i
    assert bw == pytest.approx(2 * 7 / 8 * 8e6 / 1e9, rel=1e-12)   # 2(p-1)/p n / B_i


def test_ring_across_nodes_takes_the_slowest_level_and_its_plateau():
    """NCCL 2.18: a ring over nodes pays 1.4x its latency (1.9x before compute capability
    8.0) once each channel carries >= 64 bytes per rank."""
    for cc, plateau in ((70, 1.9), (90, 1.4)):
        _, lat, bw = allreduce_s(6e6, 16, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "ring", channels=8, cc=cc)
        assert lat == pytest.approx(2 * 15 * 4e-6 * plateau, rel=1e-12)
        assert bw == pytest.approx(2 * 15 / 16 * 6e6 / 10e9, rel=1e-12)
    _, lat, _ = allreduce_s(16 * 8 * 63, 16, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "ring", channels=8)
    assert lat == pytest.approx(2 * 15 * 4e-6, rel=1e-12)          # below the plateau


def test_tree():
    _, lat, bw = allreduce_s(6e6, 32, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "tree")
    assert lat == pytest.approx(2 * (7 * 1e-6 + 2 * 4e-6), rel=1e-12)     # log2(4 nodes) = 2
    # NCCL 2.18: bus bandwidth x 0.92, x 0.7 for 6 MB (entry floor(log2(6e6 / 64)) = 16 of its table)
    assert tree_factor(6e6) == 0.7 and TREE_BUS == 0.92
    assert bw == pytest.approx(2 * 6e6 / (10e9 * 0.92 * 0.7), rel=1e-12)
    assert tree_factor(1e12) == 1.0 and tree_factor(10) == 0.9


def test_auto_picks_the_cheaper_of_ring_and_tree_as_nccl_does():
    intra, inter = Link(3e-6, 450e9), Link(5e-6, 400e9)
    picks = {}
    for ranks in (8, 1024):
        for nbytes in (1e5, 1e9):
            costs = {a: allreduce_s(nbytes, ranks, 8, intra, inter, a, fixed_s=2e-5, channels=8) for a in ("ring", "tree")}
            auto = allreduce_s(nbytes, ranks, 8, intra, inter, "auto", fixed_s=2e-5, channels=8)
            assert auto == min(costs.values(), key=lambda c: c.latency_s + c.bandwidth_s)
            picks[ranks, nbytes] = auto.algo
    # one node: the ring (same steps, better bandwidth); 1024 ranks, small: the tree's log2 latency
    assert picks[8, 1e5] == picks[8, 1e9] == "ring" and picks[1024, 1e5] == "tree"


def test_every_collective_pays_its_fixed_cost():
    plain = allreduce_s(1e6, 8, 8, Link(1e-6, 1e9), Link(1e-6, 1e9), "ring")
    fixed = allreduce_s(1e6, 8, 8, Link(1e-6, 1e9), Link(1e-6, 1e9), "ring", fixed_s=3e-5)
    assert fixed.latency_s == pytest.approx(plain.latency_s + 3e-5, rel=1e-12)
    assert fixed.bandwidth_s == plain.bandwidth_s


def test_hierarchical():
    _, lat, bw = allreduce_s(6e6, 32, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "hier")
    assert lat == pytest.approx(2 * 7 * 1e-6 + 2 * 3 * 4e-6, rel=1e-12)
    assert bw == pytest.approx(2 * 7 / 8 * 6e6 / 50e9 + 2 * 3 / 4 * 6e6 / 10e9, rel=1e-12)


def test_ring_link_from_a_fit_gives_back_the_fitted_line():
    a, b = 7e-4, 1 / 0.9e9
    link = sim.ring_link_from_fit(a, b, 4)
    for n in (1e3, 1e6, 3e7):
        assert sum(allreduce_s(n, 4, 4, link, link, "ring")[1:]) == pytest.approx(a + b * n, rel=1e-12)


def test_one_rank_communicates_nothing():
    assert allreduce_s(1e6, 1, 8, Link(1e-6, 1e9), Link(1e-6, 1e9)) == ("none", 0.0, 0.0)


def test_conv_flops_from_real_shapes():
    model = profiles.real_model("resnet18", 10)
    costs = {layer.name: (f, b) for layer, f, b in profiles.layer_costs(model, 32, 2, 4)}
    fl = 2.0 * 2 * 16 * 16 * 7 * 7 * 3 * 64               # stem: 32 px -> 16 px, 7x7x3 -> 64
    assert costs["conv1"][0][0] == pytest.approx(fl, rel=1e-12)
    assert costs["conv1"][1][0] == pytest.approx(fl, rel=1e-12)      # no input gradient
    assert costs["conv1"][0][2] == 2 * 16 * 16 * 64 and costs["conv1"][1][2] == 2 * 16 * 16 * 64   # y; dy (no dx)
    # layer2.0's shortcut reads the block input (8x8x64), not conv2's output
    assert costs["layer2.0.downsample.0"][0][0] == pytest.approx(2.0 * 2 * 4 * 4 * 64 * 128, rel=1e-12)
    assert costs["layer2.0.conv2"][1][0] == pytest.approx(2 * 2.0 * 2 * 4 * 4 * 9 * 128 * 128, rel=1e-12)


def test_resnet50_forward_macs_match_the_published_figure():
    from engine.layers import Conv2d, Linear
    model = profiles.real_model("resnet50", 1000)
    macs = sum(f[0] / 2 for l, f, _ in profiles.layer_costs(model, 224, 1, 4) if isinstance(l, (Conv2d, Linear)))
    # The published figure: torchvision's model table gives ResNet-50 4.09 GFLOPS (counted as
    # multiply-adds) per 224x224 image
    assert macs == pytest.approx(4.09e9, rel=0.01)


def _compute_step(p):
    return sum(l.forward_s + l.backward_s for l in p.layers) + p.layout.total * p.update_s_per_elem + p.other_s


def test_calibration_reproduces_the_measured_throughput():
    s = replace(sim.preset("dgx-a100"), calib_ips=1234.0, calib_batch=64)
    p = sim.analytic_profile(s, batch=64)
    assert p.other_s == s.step_overhead_s > 0
    assert 64 / _compute_step(p) == pytest.approx(1234.0, rel=1e-9)


def test_two_calibration_points_are_both_reproduced_and_set_the_falloff():
    s = replace(sim.preset("dgx-a100"), calib_ips=1500.0, calib_batch=32, calib2=(2400.0, 128))
    eff, half = sim.calibrate(s)
    assert 0 < eff <= 1 and half > 0
    for ips, batch in ((1500.0, 32), (2400.0, 128)):
        assert batch / _compute_step(sim.analytic_profile(s, batch=batch)) == pytest.approx(ips, rel=1e-9)
    # the loss per image at small batches grows with half_work: a quarter of the solved one loses less
    one = replace(s, calib2=None, half_work=half / 4)
    ratio = lambda sys_: (_compute_step(sim.analytic_profile(sys_, batch=16)) / 16       # noqa: E731
                          / (_compute_step(sim.analytic_profile(sys_, batch=256)) / 256))
    assert ratio(s) > ratio(one) > 1
    with pytest.raises(ValueError, match="do not fit one efficiency"):
        sim.calibrate(replace(s, calib2=(1000.0, 128)))     # slower per image at 4x the batch


def test_small_batches_lose_efficiency():
    """Per image, batch 32 costs more than batch 64 by more than the fixed per-op cost
    explains: fewer outputs per kernel than the device's threads."""
    s = sim.preset("dgx1-v100")
    per_image = {b: _compute_step(sim.analytic_profile(s, batch=b)) / b for b in (32, 64)}
    no_falloff = replace(s, half_work=0.0)
    flat = {b: _compute_step(sim.analytic_profile(no_falloff, batch=b)) / b for b in (32, 64)}
    assert per_image[32] / per_image[64] > flat[32] / flat[64] > 1


def test_px_is_used_and_the_calibration_stays_at_its_own_size():
    s = sim.preset("dgx-a100")
    step = {px: _compute_step(sim.analytic_profile(s, px=px, batch=s.calib_batch)) for px in (112, 224, 448)}
    assert s.calib_batch / step[224] == pytest.approx(s.calib_ips, rel=1e-9)
    assert step[112] < step[224] < step[448]
    assert 2 < step[448] / step[224] < 4.5          # ~4x the pixels, less the fixed costs

    # calibrating at another size moves the efficiency, not the meaning of --calib-ips
    assert sim.calibrate(replace(s, calib_px=112))[0] < sim.calibrate(s)[0]


def test_every_preset_calibrates_below_its_roofline_and_runs():
    for name, s in sim.PRESETS.items():
        eff, _ = sim.calibrate(s)
        assert 0 < eff <= 1, name
        assert s.sources and "ASSUMED" in s.sources
        f = sim.simulate(sim.analytic_profile(s), Network.of(s), decode_s=s.decode_s, workers=s.workers,
                         node_cores=s.node_cores)
        assert math.isfinite(f["step_s"]) and f["step_s"] >= f["compute_s"] > 0


def test_precision_and_device_overrides():
    a100 = sim.preset("dgx-a100")
    with pytest.raises(ValueError, match=r"--calib-ips 2500 is above what A100"):
        sim.calibrate(replace(a100, precision="fp32"))       # a mixed-precision figure on FP32 cores
    fp32 = replace(a100, precision="fp32", calib_ips=400.0)
    tf32 = replace(a100, precision="tf32", calib_ips=400.0)
    assert sim.calibrate(tf32)[0] < sim.calibrate(fp32)[0]   # same figure, 8x the peak: lower efficiency
    with pytest.raises(ValueError, match="has no tf32 peak"):
        sim.calibrate(replace(sim.preset("dgx1-v100"), precision="tf32"))
    assert "dgx-h200" in sim.PRESETS and sim.PRESETS["dgx-h200"].device.mem_bw == 4800e9
    from engine.simulate.cli import parse, system_from_args
    given = system_from_args(parse(["--preset", "dgx-a100", "--precision", "tf32", "--calib-ips", "900",
                                    "--device-tflops", "100", "--device-mem-gbs", "1555"]))
    assert given.peak == 100e12 and given.device.mem_bw == 1555e9 and given.device.name.endswith("(as given)")
    assert given.device.peak["mixed"] == a100.device.peak["mixed"]      # only --precision's peak replaced


# ---------------------------------------------------------------------- schedule ------

def _spans(out, cat):
    return [(n, s, e) for n, c, s, e, _ in out if c == cat]


def test_bucket_starts_at_ready_or_when_the_previous_one_ends():
    compute = [Task("backward a", "backward", 1.0), Task("backward b", "backward", 2.0)]
    comm = [Task("allreduce b0", "comm", 3.0, 0), Task("allreduce b1", "comm", 0.5, 1)]
    c = _spans(schedule(compute, comm), "comm")
    assert c == [("allreduce b0", 1.0, 4.0), ("allreduce b1", 4.0, 4.5)]    # b1 ready at 3, b0 ends at 4
    comm = [Task("allreduce b0", "comm", 0.5, 0), Task("allreduce b1", "comm", 0.5, 1)]
    c = _spans(schedule(compute, comm), "comm")
    assert c == [("allreduce b0", 1.0, 1.5), ("allreduce b1", 3.0, 3.5)]    # b1 waits for its gradients


def test_update_waits_for_its_bucket_and_the_wait_is_recorded():
    compute = [Task("backward a", "backward", 1.0), Task("update b0", "update", 0.25, 0)]
    out = schedule(compute, [Task("allreduce b0", "comm", 2.0, 0)])
    assert _spans(out, "wait") == [("wait b0", 1.0, 3.0)]
    assert _spans(out, "update") == [("update b0", 3.0, 3.25)]


def test_contention_slows_both_streams_only_while_both_run():
    # compute 1 s at half speed while comm (1 s, full speed) runs: 0.5 s of work left at t=1
    out = schedule([Task("backward a", "backward", 1.0)], [Task("allreduce b0", "comm", 1.0)], 1.0, 0.0)
    assert _spans(out, "backward") == [("backward a", 0.0, pytest.approx(1.5, rel=1e-12))]
    out = schedule([Task("backward a", "backward", 1.0)], [Task("allreduce b0", "comm", 1.0)], 0.0, 3.0)
    assert _spans(out, "comm") == [("allreduce b0", 0.0, pytest.approx(1.75, rel=1e-12))]


def test_schedule_refuses_a_deadlock():
    with pytest.raises(ValueError, match="waits on the other"):
        schedule([Task("update b0", "update", 1.0, 0)], [Task("allreduce b0", "comm", 1.0, 0)])


def test_overlapped_step_on_the_real_bucket_plan(r18):
    """Every bucket starts at max(the moment its last layer reports, previous bucket's end):
    a conv or fc reports halfway through its backward (after dW, before dx), the stem conv
    and a BN at its end; nothing overlaps on the communication stream."""
    net = Network(16, 8, Link(2e-6, 5e9), Link(5e-6, 1e9), "ring", "fp32", bucket_mb=1, first_bucket_mb=0.25)
    out = sim.run_step(r18, net, "overlap")
    parts = {}
    for n, c, s, e, _ in out:
        if c == "backward":
            parts.setdefault(n.split(" ", 1)[1], []).append((s, e))
    assert len(parts["conv1"]) == len(parts["bn1"]) == 1 and len(parts["layer1.0.conv2"]) == len(parts["fc"]) == 2
    ends = {name: p[0][1] for name, p in parts.items()}       # where each layer reports
    for l in r18.layers:
        s, e = parts[l.name][0]
        assert e - s == pytest.approx(l.backward_s * l.ready_frac, rel=1e-9)
    buckets = plan_buckets(r18.layout, 1, 0.25, 4)
    comm = [(s, e, a) for _, c, s, e, a in out if c == "comm"]
    assert [(a["start"], a["stop"]) for _, _, a in comm] == buckets
    prev_end = 0.0
    for s, e, a in comm:
        last = next(l for l in r18.layers if l.grad is not None and l.grad[0] < a["stop"] <= l.grad[1])
        assert s == pytest.approx(max(ends[last.name], prev_end), rel=1e-12)
        assert s >= prev_end
        prev_end = e


def test_prediction_on_a_fixed_profile(r18):
    """Serial = compute + every all-reduce + the last update; one bucket overlapped is
    serial; free communication per layer is compute."""
    link = Link(1e-3, 1e9)
    total_fb = sum(l.forward_s + l.backward_s for l in r18.layers)
    zero_update = replace(r18, update_s_per_elem=0.0)
    net = Network(2, 2, link, link, "ring", "fp32", bucket_mb=4)
    serial = max(e for *_, e, _ in sim.run_step(zero_update, net, "serial"))
    comm = sum(sum(allreduce_s((b - a) * 4, 2, 2, link, link)[1:]) for a, b in plan_buckets(r18.layout, 4, 1, 4))
    assert serial == pytest.approx(total_fb + comm, rel=1e-9)
    one = replace(net, bucket_mb=1e6, first_bucket_mb=1e6)      # a single bucket
    assert max(e for *_, e, _ in sim.run_step(zero_update, one, "overlap")) == pytest.approx(
        max(e for *_, e, _ in sim.run_step(zero_update, one, "serial")), rel=1e-12)
    free = Network(2, 2, Link(0.0, 1e30), Link(0.0, 1e30), "ring", "fp32", bucket_mb=0)
    assert max(e for *_, e, _ in sim.run_step(zero_update, free, "overlap")) == pytest.approx(total_fb, rel=1e-9)


def test_figures(r18):
    net = Network(1, 8, Link(1e-6, 1e9), Link(1e-6, 1e9), bucket_mb=25)
    f = sim.simulate(r18, net, decode_s=0.0, epochs=2, images=1000)
    assert f["scaling"] == pytest.approx(1.0, rel=1e-12) and f["exposed_s"] == 0
    assert f["train_s"] == pytest.approx(2 * 1000 / f["images_s"], rel=1e-12)
    slow_loader = sim.simulate(r18, net, decode_s=1.0, workers=4)
    assert slow_loader["step_s"] == pytest.approx(8 * 1.0 / 4) and slow_loader["bound"] == "data"


# ------------------------------------------------------------------- trace format ------

def test_simulated_trace_reads_like_a_measured_one(tmp_path, r18, capsys):
    net = Network(64, 8, Link(2e-6, 5e9), Link(5e-6, 1e9), bucket_mb=4)
    path = str(tmp_path / "sim.json")
    sim.write_trace(sim.run_step(r18, net, "overlap"), path)
    events = json.load(open(path))
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} == {"data", "compute", "steps",
                                                                                "communication"}
    (fig,) = trace.step_figures(events)
    expected = sim.simulate(r18, net)
    # the trace keeps times in ~0.25 us ticks (wall-clock microseconds in a float64)
    assert fig["hidden_fraction"] == pytest.approx(expected["hidden_trace"], abs=1e-3)
    assert fig["step_s"] == pytest.approx(expected["step_s"], abs=1e-6)
    assert trace.main(["figures", path]) == 0
    assert "hidden" in capsys.readouterr().out


def test_trace_profile_reads_back_the_layer_times(tmp_path, r18):
    path = str(tmp_path / "compute.json")
    net = Network(1, 1, Link(0.0, 1.0), Link(0.0, 1.0))
    sim.write_trace(sim.run_step(replace(r18, other_s=0.003), net, "compute"), path)
    back = sim.trace_profile(path, "resnet18", 10)
    for want, got in zip(r18.layers, back.layers):
        assert (got.name, got.grad, got.ready_frac) == (want.name, want.grad, want.ready_frac)
        assert got.forward_s == pytest.approx(want.forward_s, rel=0, abs=1e-6)   # the trace keeps ~0.25 us
        assert got.backward_s == pytest.approx(want.backward_s, rel=0, abs=1e-6)
    assert back.other_s == pytest.approx(0.003, abs=1e-6)
    assert back.update_s_per_elem == pytest.approx(r18.update_s_per_elem, rel=1e-3)


# --------------------------------------------------------------------- bad input ------

def test_unknown_preset_is_refused(capsys):
    with pytest.raises(ValueError, match="unknown preset 'dgx-9'"):
        sim.preset("dgx-9")
    with pytest.raises(SystemExit):
        cli_main(["--preset", "dgx-9"])
    assert "unknown preset 'dgx-9'" in capsys.readouterr().err


def test_trace_without_layer_spans_is_refused(tmp_path):
    path = str(tmp_path / "plain.json")
    tl = trace.Timeline(path)
    tl.record("forward", "forward", 0.0, 1.0)
    tl.record("backward", "backward", 1.0, 2.0)
    tl.close()
    with pytest.raises(ValueError, match=r"plain\.json: no per-layer spans of resnet18"):
        sim.trace_profile(path, "resnet18", 10)
    assert cli_main(["--trace", path, "--arch", "resnet18", "--classes", "10"]) == 2


def test_negative_bandwidth_is_refused(capsys):
    with pytest.raises(ValueError, match="bandwidth finite and > 0"):
        Link(1e-6, -5e9)
    with pytest.raises(SystemExit):
        cli_main(["--inter-gbs", "-5"])
    assert "argument --inter-gbs: must be one of the numbers in (0, 1e+06], got '-5'" in capsys.readouterr().err


def test_unknown_algorithm_and_ragged_nodes_are_refused():
    with pytest.raises(ValueError, match="unknown all-reduce algorithm 'mesh'"):
        allreduce_s(1e6, 8, 8, Link(1e-6, 1e9), Link(1e-6, 1e9), "mesh")
    with pytest.raises(ValueError, match="12 ranks do not fill nodes of 8"):
        allreduce_s(1e6, 12, 8, Link(1e-6, 1e9), Link(1e-6, 1e9))


def test_json_holds_every_figure_of_every_row_and_the_inputs(capsys):
    assert cli_main(["--preset", "dgx-h100", "--gpus", "8,64", "--bucket-mb", "0,25", "--batch", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"]["gpus"] == [8, 64] and report["inputs"]["batch"] == 64
    assert report["system"]["device"]["name"] == "H100 SXM5" and report["system"]["algo"] == "auto"
    net = Network.of(sim.preset("dgx-h100"))
    want = sim.simulate(sim.analytic_profile(replace(sim.preset("dgx-h100"), batch=64)),
                        replace(net, ranks=64, bucket_mb=0.0), decode_s=5e-3, workers=14, node_cores=112)
    assert [(r["gpus"], r["bucket_mb"]) for r in report["rows"]] == [(8, 0), (8, 25), (64, 0), (64, 25)]
    row = report["rows"][2]
    assert set(want) <= set(row)
    for key, value in want.items():
        assert row[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert all(r["serial_s"] >= r["step_s"] for r in report["rows"])


def test_scaling_inside_a_node_pays_contention_stragglers_and_shared_cpus():
    """8 GPUs on NVLink lose to NCCL's SMs, to waiting for the slowest rank, and, where the
    node's cores run short, to the loader; one device alone loses none of it."""
    s = replace(sim.preset("dgx-a100"), batch=64, workers=16)
    profile = sim.analytic_profile(s)
    one, eight = (sim.simulate(profile, Network.of(s, ranks=n), decode_s=s.decode_s, workers=s.workers,
                               node_cores=s.node_cores) for n in (1, 8))
    assert one["scaling"] == 1.0 and one["straggler_s"] == 0
    assert eight["straggler_s"] == pytest.approx(s.jitter * eight["compute_s"] * math.sqrt(2 * math.log(8)), rel=1e-12)
    assert eight["scaling"] < 1 and Network.of(s).contention == pytest.approx(8 / (108 - 8), rel=1e-12)
    assert step.loader_workers(16, 128, 8, 8) == 16 and step.loader_workers(32, 128, 8, 8) == 16
    assert step.loader_workers(32, 128, 1, 8) == 32
    starved = sim.simulate(profile, Network.of(s, ranks=8), decode_s=s.decode_s, workers=32, node_cores=64)
    assert starved["loader_workers"] == 8 and starved["bound"] == "data"


def test_cli_table_and_trace(tmp_path, capsys):
    out = str(tmp_path / "t.json")
    png = tmp_path / "sweep.png"
    assert cli_main(["--preset", "seed", "--gpus", "8,1024", "--bucket-mb", "0,25", "--out-trace", out,
                     "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert " serial " in text.splitlines()[2] and text.count("devices, bucket") == 4
    assert math.isfinite(trace.step_figures(trace.load(out))[0]["step_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Each bad input of issue 18, refused where it is parsed: (argv, what the one line says).
REFUSED = [
    (["--calib-ips", "nan"], "argument --calib-ips: must be one of the numbers in (0, 1e+07], got 'nan'"),
    (["--inter-alpha-us", "inf"], "argument --inter-alpha-us: must be one of the numbers in [0, 1e+06], got 'inf'"),
    (["--gpus", "-8"], "argument --gpus: must be up to 64 comma-separated integers in [1, 1.04858e+06], got '-8'"),
    (["--gpus", "0"], "argument --gpus: must be up to 64 comma-separated integers in [1, 1.04858e+06], got '0'"),
    (["--gpus", "1e6"], "argument --gpus: must be up to 64 comma-separated integers in [1, 1.04858e+06], got '1e6'"),
    (["--gpus", "8,,16"], "argument --gpus: must be up to 64 comma-separated integers in [1, 1.04858e+06], got '8,,16'"),
    (["--gpus", ",".join(["8"] * 65)], "argument --gpus: must be up to 64 comma-separated integers"),
    (["--bucket-mb", "-1"], "argument --bucket-mb: must be up to 64 comma-separated numbers in [0, 100000], got '-1'"),
    (["--workers", "0"], "argument --workers: must be one of the integers in [1, 4096], got '0'"),
    (["--per-node", "0"], "argument --per-node: must be one of the integers in [1, 1024], got '0'"),
    (["--gpus", "12", "--per-node", "8"], "--gpus 12 does not fill nodes of 8 (--per-node): give at most 8 or a multiple"),
    (["--intra-gbs", "nan"], "argument --intra-gbs: must be one of the numbers in (0, 1e+06], got 'nan'"),
    (["--batch", "0"], "argument --batch: must be one of the integers in [1, 65536], got '0'"),
    (["--batch", "-4"], "argument --batch: must be one of the integers in [1, 65536], got '-4'"),
    (["--decode-ms", "nan"], "argument --decode-ms: must be one of the numbers in [0, 10000], got 'nan'"),
    (["--px", "0"], "argument --px: must be one of the integers in [32, 4096], got '0'"),
    (["--px", "16"], "argument --px: must be one of the integers in [32, 4096], got '16'"),
    (["--epochs", "-1"], "argument --epochs: must be one of the numbers in (0, 10000], got '-1'"),
    (["--images", "0"], "argument --images: must be one of the integers in [1, 1e+10], got '0'"),
    (["--gpus", "1024", "--batch", "32", "--images", "10000"],
     "--gpus 1024 x --batch 32 = 32768 images per step is more than the epoch's --images 10000"),
    (["--contention", "nan"], "argument --contention: must be one of the numbers in [0, 100], got 'nan'"),
    (["--jitter", "2"], "argument --jitter: must be one of the numbers in [0, 1], got '2'"),
    (["--device-tflops", "0"], "argument --device-tflops: must be one of the numbers in (0, 1e+06], got '0'"),
    (["--nccl-sms", "56"], "--nccl-sms must be in [0, 55] (Tesla P100 PCIe 16GB has 56 SMs), got 56"),
    (["--calib2-ips", "300"], "--calib2-ips and --calib2-batch go together"),
    (["--preset", "dgx-a100", "--precision", "tf32"],
     "--precision tf32 needs --calib-ips measured at tf32: the preset's 2500 images/s are a mixed figure"),
    (["--calib2-ips", "300", "--calib2-batch", "32"], "--calib2-batch 32 must differ from --calib-batch"),
    (["--out-trace", "no/such/folder/t.json"], "argument --out-trace: folder 'no/such/folder' does not exist"),
    (["--plot", "no/such/folder/p.png"], "argument --plot: folder 'no/such/folder' does not exist"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_input_is_refused_in_one_line_naming_the_option(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # the missing folders are missing here, and nothing is created
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("python -m engine.simulate: error: ") and message in err[-1]
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("argv, message", [
    (["--calib-ips", "1400"], "--calib-ips 1400 is above what Tesla P100 PCIe 16GB can run (fp32, batch 32, 224 px)"),
    (["--preset", "dgx-a100", "--precision", "fp32", "--calib-ips", "2500"],
     "--calib-ips 2500 is above what A100 SXM4 80GB can run (fp32"),
    (["--preset", "dgx1-v100", "--precision", "tf32", "--calib-ips", "400"],
     "--precision tf32: Tesla V100 SXM2 has no tf32 peak"),
    (["--device-tflops", "1"], "--calib-ips 200 is above what Tesla P100 PCIe 16GB (as given) can run"),
    (["--calib-ips", "1", "--calib-batch", "1", "--calib2-ips", "1", "--calib2-batch", "64"], "do not fit one efficiency"),
])
def test_a_calibration_the_device_cannot_run_is_refused(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("engine.simulate: ") and message in err[0]


def test_a_trace_that_is_not_json_is_refused_by_name(tmp_path, capsys):
    for name, content in (("broken.json", b"{not json"), ("binary.json", b"\xff\xfe\x00"), ("dict.json", b"{}")):
        path = tmp_path / name
        path.write_bytes(content)
        assert cli_main(["--trace", str(path), "--arch", "resnet18", "--classes", "10"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"--trace {path}: not a" in err[0]


def test_a_task_that_never_ends_is_refused_and_the_schedule_is_bounded():
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="duration must be finite and >= 0"):
            Task("backward a", "backward", bad)
    with pytest.raises(ValueError, match="contention must be finite"):
        schedule([Task("a", "forward", 1.0)], [], math.nan)
    # zero-length tasks on both streams still end, one round each
    out = schedule([Task("a", "forward", 0.0), Task("b", "forward", 0.0)], [Task("c", "comm", 0.0, 0)])
    assert sorted(n for n, *_ in out) == ["a", "b", "c"]


def test_the_extremes_of_every_range_run(capsys):
    assert cli_main(["--gpus", "1,1048576", "--batch", "1", "--images", "10000000000", "--bucket-mb", "0,1e-9,1e5",
                     "--per-node", "1024", "--epochs", "1e4", "--calib-ips", "1e-3", "--decode-ms", "1e4",
                     "--inter-alpha-us", "1e6", "--intra-gbs", "1e-6", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 6 and all(math.isfinite(r["step_s"]) and r["step_s"] > 0 for r in rows)


def test_published_figures_are_predicted_from_their_own_one_gpu_calibration():
    """bench/published.py: every group's 1-GPU figure is only the calibration (no row of
    its own), the others are predictions with finite errors, and the summary is the median /
    signed median / worst of those errors."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "published.py"
    spec = importlib.util.spec_from_file_location("published", path)
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    rows = published.predictions()
    assert len(rows) == sum(len(g[-1]) - 1 for g in published.GROUPS) and all(r["gpus"] > 1 for r in rows)
    assert all(math.isfinite(r["error"]) and r["source"] in published.SOURCES for r in rows)
    s = published.summary(rows)
    errors = sorted(r["error"] for r in rows)
    assert s["signed_median"] == pytest.approx(float(np.median(errors)), rel=1e-12)
    assert s["worst"] in (errors[0], errors[-1]) and abs(s["worst"]) >= s["median_abs_error"]


def test_a_calibration_the_overheads_alone_exceed_is_refused_by_option():
    s = replace(sim.preset("dgx-a100"), calib_ips=1e6, calib_batch=1)
    with pytest.raises(ValueError, match=r"--calib-ips 1e\+06 at batch 1 is 0.001 ms per step, less than the 218 ops"):
        sim.calibrate(s)
    with pytest.raises(ValueError, match=r"--calib2-ips 1e\+06 at batch 2"):
        sim.calibrate(replace(sim.preset("dgx-a100"), calib2=(1e6, 2)))
