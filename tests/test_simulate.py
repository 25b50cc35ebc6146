"""engine.simulate: cost formulas, the event schedule, its trace, profiles, bad input."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest

import engine.simulate as sim
from engine import trace
from engine.simulate import Link, Network, Profile, Task, allreduce_s, schedule
from engine.simulate.cli import main as cli_main


@pytest.fixture(scope="module")
def r18():
    """The real ResNet-18 (10 classes) layout with fresh random per-layer times."""
    model = sim._model("resnet18", 10)
    rng = np.random.default_rng()
    layers = tuple(sim.LayerTime(l.name, rng.uniform(1e-4, 2e-3), rng.uniform(2e-4, 4e-3),
                                 getattr(l, "grad_range", None), sim.ready_fraction(l, model))
                   for l, _ in sim.forward_layers(model))
    return Profile(layers, model.layout, 1e-9, 8, "synthetic")


# ------------------------------------------------------------------ cost formulas ------

def test_ring_inside_one_node():
    lat, bw = allreduce_s(8e6, 8, 8, Link(1e-6, 1e9), Link(9.0, 1.0), "ring")
    assert lat == pytest.approx(2 * 7 * 1e-6, rel=1e-12)           # 2(p-1) alpha_i
    assert bw == pytest.approx(2 * 7 / 8 * 8e6 / 1e9, rel=1e-12)   # 2(p-1)/p n / B_i


def test_ring_across_nodes_takes_the_slowest_level():
    lat, bw = allreduce_s(6e6, 16, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "ring")
    assert lat == pytest.approx(2 * 15 * 4e-6, rel=1e-12)
    assert bw == pytest.approx(2 * 15 / 16 * 6e6 / 10e9, rel=1e-12)


def test_tree():
    lat, bw = allreduce_s(6e6, 32, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "tree")
    assert lat == pytest.approx(2 * (7 * 1e-6 + 2 * 4e-6), rel=1e-12)     # log2(4 nodes) = 2
    assert bw == pytest.approx(2 * 6e6 / 10e9, rel=1e-12)


def test_hierarchical():
    lat, bw = allreduce_s(6e6, 32, 8, Link(1e-6, 50e9), Link(4e-6, 10e9), "hier")
    assert lat == pytest.approx(2 * 7 * 1e-6 + 2 * 3 * 4e-6, rel=1e-12)
    assert bw == pytest.approx(2 * 7 / 8 * 6e6 / 50e9 + 2 * 3 / 4 * 6e6 / 10e9, rel=1e-12)


def test_ring_link_from_a_fit_gives_back_the_fitted_line():
    a, b = 7e-4, 1 / 0.9e9
    link = sim.ring_link_from_fit(a, b, 4)
    for n in (1e3, 1e6, 3e7):
        assert sum(allreduce_s(n, 4, 4, link, link)) == pytest.approx(a + b * n, rel=1e-12)


def test_one_rank_communicates_nothing():
    assert allreduce_s(1e6, 1, 8, Link(1e-6, 1e9), Link(1e-6, 1e9)) == (0.0, 0.0)


def test_conv_flops_from_real_shapes():
    model = sim._model("resnet18", 10)
    costs = {layer.name: (f, b) for layer, f, b in sim.layer_costs(model, 32, 2, 4)}
    fl = 2.0 * 2 * 16 * 16 * 7 * 7 * 3 * 64               # stem: 32 px -> 16 px, 7x7x3 -> 64
    assert costs["conv1"][0][0] == pytest.approx(fl, rel=1e-12)
    assert costs["conv1"][1][0] == pytest.approx(fl, rel=1e-12)      # no input gradient
    # layer2.0's shortcut reads the block input (8x8x64), not conv2's output
    assert costs["layer2.0.downsample.0"][0][0] == pytest.approx(2.0 * 2 * 4 * 4 * 64 * 128, rel=1e-12)
    assert costs["layer2.0.conv2"][1][0] == pytest.approx(2 * 2.0 * 2 * 4 * 4 * 9 * 128 * 128, rel=1e-12)


def test_resnet50_forward_macs_match_the_published_figure():
    from engine.layers import Conv2d, Linear
    model = sim._model("resnet50", 1000)
    macs = sum(f[0] / 2 for l, f, _ in sim.layer_costs(model, 224, 1, 4) if isinstance(l, (Conv2d, Linear)))
    # The published figure: torchvision's model table gives ResNet-50 4.09 GFLOPS (counted as
    # multiply-adds) per 224x224 image
    assert macs == pytest.approx(4.09e9, rel=0.01)


def test_calibration_reproduces_the_measured_throughput():
    s = replace(sim.preset("dgx-a100"), calib_ips=1234.0, calib_batch=64)
    p = sim.analytic_profile(s, batch=64)
    step = sum(l.forward_s + l.backward_s for l in p.layers) + p.layout.total * p.update_s_per_elem
    assert 64 / step == pytest.approx(1234.0, rel=1e-9)


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
    buckets = sim.plan_buckets(r18.layout, 1, 0.25, 4)
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
    comm = sum(sum(allreduce_s((b - a) * 4, 2, 2, link, link)) for a, b in sim.plan_buckets(r18.layout, 4, 1, 4))
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
    with pytest.raises(ValueError, match="bandwidth > 0"):
        Link(1e-6, -5e9)
    with pytest.raises(SystemExit):
        cli_main(["--inter-gbs", "-5"])
    assert "--inter-gbs must be > 0, got -5" in capsys.readouterr().err


def test_unknown_algorithm_and_ragged_nodes_are_refused():
    with pytest.raises(ValueError, match="unknown all-reduce algorithm 'mesh'"):
        allreduce_s(1e6, 8, 8, Link(1e-6, 1e9), Link(1e-6, 1e9), "mesh")
    with pytest.raises(ValueError, match="12 ranks do not fill nodes of 8"):
        allreduce_s(1e6, 12, 8, Link(1e-6, 1e9), Link(1e-6, 1e9))


def test_cli_table_and_trace(tmp_path, capsys):
    out = str(tmp_path / "t.json")
    png = tmp_path / "sweep.png"
    assert cli_main(["--preset", "seed", "--gpus", "8,1024", "--bucket-mb", "0,25", "--out-trace", out,
                     "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.count("devices, bucket") == 4 and math.isfinite(trace.step_figures(trace.load(out))[0]["step_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
