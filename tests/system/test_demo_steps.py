"""The step runner of ``make demo`` and ``make release`` (common.apps.pipeline.run_steps) and the demo's stop-on-failure path through run_demo.

Each step here is a real ``Step`` whose command is a tiny real Python program in place of
``python -m monai.bundle run``: it logs that it ran (its name, working directory, tracking URI and
PYTHONUNBUFFERED) and then writes its done files, exits 1, or exits 0 without writing them. So the
runner's own logic is exercised for real (a child process per step, exit codes, done files, skip, retrain,
the error message and its re-run command) in well under a second per test. The tests of ``run_python`` check
that a step forked from the preloaded server runs as ``python <argv>`` would in a fresh process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import common.apps.demo as demo
import common.apps.demo_report as demo_report
from common.apps.pipeline import PRELOAD, REPO_ROOT, Step, run_python, run_steps

# The child: log one JSON line, then behave as its mode says ("ok", "fail" = exit 1, "no_done" = exit 0 without done files).
CHILD = r"""
import json, os, sys, pathlib
mode, name, log, tracking_uri, *done = sys.argv[1:]
with open(log, "a") as f:
    f.write(json.dumps({"name": name, "cwd": os.getcwd(), "tracking_uri": tracking_uri,
                        "unbuffered": os.environ.get("PYTHONUNBUFFERED")}) + "\n")
if mode == "fail":
    sys.exit(1)
if mode == "ok":
    for p in done:
        pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(p).write_text(name)
"""


@dataclass
class ScriptStep(Step):
    """A demo Step whose command is the tiny child above rather than ``monai.bundle run``."""

    mode: str = "ok"
    log: Path | None = None

    def command(self, tracking_uri: str, overwrite: bool = False) -> list[str]:
        return [
            sys.executable,
            "-c",
            CHILD,
            self.mode,
            self.name,
            str(self.log),
            tracking_uri,
            *[str(p) for p in [self.done_file, *self.extra_done]],
        ]


def _step(out: Path, name: str, mode: str = "ok", stage: str = "clip", n_extra: int = 0) -> ScriptStep:
    return ScriptStep(
        stage,
        name,
        "no_bundle",
        [],
        {},
        out / name / "done.json",
        f"test step {name}",
        extra_done=[out / name / f"extra_{i}.json" for i in range(n_extra)],
        mode=mode,
        log=out / "ran.jsonl",
    )


def _ran(out: Path) -> list[dict]:
    log = out / "ran.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _finish(step: Step) -> None:
    """Write a step's done files as a previous run would have, an hour ago."""
    for p in [step.done_file, *step.extra_done]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("earlier run")
        os.utime(p, (time.time() - 3600, time.time() - 3600))


@pytest.fixture(scope="module", autouse=True)
def python_server():
    """The preloaded server up before the tests time their steps: its start (10-25 s of imports) is no step's time."""
    assert run_python(["-c", "pass"]) == 0


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    # run_steps first calls prepare_scans(out), which generates the demo's training phantoms and links the
    # real CT from ../shared: seconds of work and real data that these fake steps never read. A no-op here
    # keeps the tests to the runner's own logic (prepare_scans is exercised by `make demo` itself).
    monkeypatch.setattr(demo, "prepare_scans", lambda *args: None)
    folder = tmp_path / "demo out"  # a space, so the re-run command's quoting is tested too
    folder.mkdir()
    return folder


def test_steps_run_in_order_as_real_child_processes(out, capsys):
    steps = [_step(out, "first", n_extra=2), _step(out, "second", stage="probmap")]
    run_steps(steps, out)

    ran = _ran(out)
    assert [r["name"] for r in ran] == ["first", "second"]
    for r in ran:  # each process runs from the repository root, unbuffered, into the one MLflow store of <out>
        assert Path(r["cwd"]) == REPO_ROOT
        assert r["unbuffered"] == "1"
        assert r["tracking_uri"] == f"sqlite:///{(out / 'mlruns.db').resolve()}"
    for s in steps:
        assert s.status == "ran"
        assert s.finished()
        assert isinstance(s.seconds, float) and 0.0 < s.seconds < 30.0
        assert shlex.split(s.cmd) == s.command(ran[0]["tracking_uri"])  # the command as run, for the report
    printed = capsys.readouterr().out
    assert "==> [1/2] first: test step first" in printed and "==> [2/2] second: test step second" in printed
    assert "first done in 0:0" in printed


def test_finished_steps_are_reused_not_run(out, capsys):
    steps = [_step(out, "done_before", n_extra=1), _step(out, "new")]
    _finish(steps[0])
    run_steps(steps, out)

    assert [r["name"] for r in _ran(out)] == ["new"]
    assert (steps[0].status, steps[0].seconds) == ("reused", 0.0)
    assert steps[0].done_file.read_text() == "earlier run"  # untouched
    assert steps[1].status == "ran" and steps[1].seconds > 0.0
    assert steps[0].cmd  # a reused step still shows its command in the report
    assert f"==> [1/2] done_before: already finished ({steps[0].done_file}), reused" in capsys.readouterr().out


def test_a_step_missing_one_extra_done_file_runs_again(out):
    step = _step(out, "partial", n_extra=2)
    _finish(step)
    step.extra_done[1].unlink()  # e.g. a multi-case step stopped before its last case
    run_steps([step], out)

    assert [r["name"] for r in _ran(out)] == ["partial"]
    assert step.status == "ran"
    assert all(p.read_text() == "partial" for p in [step.done_file, *step.extra_done])


def test_retrain_runs_finished_steps_again(out):
    steps = [_step(out, "a", n_extra=1), _step(out, "b")]
    for s in steps:
        _finish(s)
    run_steps(steps, out, retrain=True)

    assert [r["name"] for r in _ran(out)] == ["a", "b"]
    assert [s.status for s in steps] == ["ran", "ran"]
    assert all(s.seconds > 0.0 for s in steps)
    assert steps[0].done_file.read_text() == "a" and steps[0].extra_done[0].read_text() == "a"  # rewritten


def test_retrain_fails_a_step_that_leaves_only_the_earlier_runs_files(out):
    """On --retrain the previous run's done files are still on disk: a step that exits 0 but writes nothing
    must not pass as re-done with stale results."""
    steps = [_step(out, "stale", mode="no_done"), _step(out, "after")]
    for s in steps:
        _finish(s)
    with pytest.raises(RuntimeError, match=r"step stale failed \(no new .*done\.json\)"):
        run_steps(steps, out, retrain=True)
    assert [s.status for s in steps] == ["failed", "not run"]
    assert steps[0].done_file.read_text() == "earlier run"  # left as it was, not deleted


def test_retrain_makes_inference_steps_redo_cases_they_already_wrote():
    """A case-by-case bundle skips cases already written (``overwrite`` false): --retrain passes
    ``--overwrite true`` to inference runs, and nothing to trainers or to evaluations (which overwrite anyway)."""
    inference = Step("probmap", "p", "probmap", ["inference.json"], {"output_dir": "/x"}, Path("/x/done"), "")
    trainer = Step("hsam", "t", "hsam_finetune", ["train.json", "demo.json"], {}, Path("/x/model.pt"), "")
    evaluation = Step("probmap", "e", "probmap", ["inference.json", "evaluate.json"], {}, Path("/x/scores.json"), "")

    def option(step, overwrite):
        cmd = step.command("sqlite:///x.db", overwrite=overwrite)
        return cmd[cmd.index("--overwrite") + 1] if "--overwrite" in cmd else None

    assert (
        option(inference, False) is None and option(inference, True) == "True"
    )  # a Python literal, as python-fire parses it
    assert option(trainer, True) is None
    assert option(evaluation, True) == "True"  # evaluate.json sets it true already; the override agrees


def test_overrides_reach_the_bundle_as_the_values_they_are():
    """``monai.bundle run`` parses its command line with python-fire: False, None, lists of dicts and floats must
    arrive as themselves (JSON's ``false`` would arrive as the string "false", which a config takes as true)."""
    from fire.parser import DefaultParseValue

    overrides = {
        "pretrained": False,
        "random_init": True,
        "text_model_dir": None,
        "tau": 0.0,
        "phantom_shape": [64, 64, 12],
        "cases": [{"image": "/data/a b/scan", "case_id": "a"}],
        "qc": {"lung_ml_range": [0.0, 1.0e9]},
        "output_dir": "/x/y",
    }
    cmd = Step("probmap", "p", "probmap", ["inference.json"], overrides, Path("/x/done"), "").command("sqlite:///x.db")
    parsed = {key: DefaultParseValue(cmd[cmd.index(f"--{key}") + 1]) for key in overrides}
    assert parsed == overrides
    assert parsed["pretrained"] is False and parsed["text_model_dir"] is None


def _rerun(cmd_line: str) -> int:
    """Run the re-run command exactly as the message prints it, through a shell from the repository root."""
    return subprocess.run(["bash", "-c", cmd_line], cwd=REPO_ROOT).returncode


def test_nonzero_exit_stops_the_demo_with_the_rerun_command(out):
    steps = [_step(out, "good"), _step(out, "broken", mode="fail", stage="probmap"), _step(out, "after", stage="hsam")]
    with pytest.raises(RuntimeError) as info:
        run_steps(steps, out, started=0.0)

    message = str(info.value)
    first, rerun = message.split("\n", 1)  # (the child script itself spans lines; monai.bundle commands do not)
    assert first.startswith("step broken failed (exit 1) after 0:0") and first.endswith("; re-run it with:")
    assert rerun == "  " + steps[1].cmd
    assert [r["name"] for r in _ran(out)] == ["good", "broken"]  # "after" never started
    assert [s.status for s in steps] == ["ran", "failed", "not run"]
    assert steps[1].seconds > 0.0 and steps[2].seconds is None
    assert not steps[2].done_file.exists()
    # the printed command is the exact one: run through a shell (quoting of "demo out" included) it runs
    # the same step again and fails the same way
    assert _rerun(rerun.strip()) == 1
    assert [r["name"] for r in _ran(out)] == ["good", "broken", "broken"]


def test_exit_zero_without_the_done_file_is_a_failure(out):
    steps = [_step(out, "silent", mode="no_done", n_extra=1), _step(out, "after")]
    with pytest.raises(RuntimeError, match=r"^step silent failed \(no .*done\.json\) after 0:0") as info:
        run_steps(steps, out)

    assert f"(no {steps[0].done_file})" in str(info.value)
    assert str(info.value).endswith("re-run it with:\n  " + steps[0].cmd)
    assert [r["name"] for r in _ran(out)] == ["silent"]
    assert [s.status for s in steps] == ["failed", "not run"]
    assert _rerun(steps[0].cmd) == 0 and not steps[0].done_file.exists()


def test_a_stopped_demo_still_writes_its_report(out, monkeypatch):
    """run_demo: the failure goes into the report (metrics.json, index.html) and the demo exits naming both."""
    # run_ingest reads, QCs and preprocesses every default case (minutes); the report only needs its summary.
    ingest = {
        "n_cases": 0,
        "n_passed": 0,
        "n_excluded": 0,
        "excluded": {},
        "cases": [],
        "figures": [],
        "qc_rows": [],
        "phantom_example": None,
        "qc_dir": str(out / "qc"),
    }
    monkeypatch.setattr(demo, "run_ingest", lambda out_, data_dir, fig_dir: dict(ingest))
    steps = [
        _step(out, "clip_ok"),
        _step(out, "probmap_broken", mode="fail", stage="probmap"),
        _step(out, "hsam_after", stage="hsam"),
    ]
    monkeypatch.setattr(demo, "demo_steps", lambda *args: steps)
    # Two report sections are heavy even with no stage output: the held-out comparison runs
    # benchmarks/hsam_comparison.py, which generates and scores the held-out phantoms anyway (about 30 s
    # here), and the SA-1 section imports torch and the CLIP networks before it finds no checkpoint (about
    # 10 s cold). Both are stubbed; the rest of build_report (steps table, failure, metrics.json) is real.
    monkeypatch.setattr(demo_report, "comparison_section", lambda *a: (None, "<p>comparison not run in this test</p>"))
    monkeypatch.setattr(
        demo_report, "clip_section", lambda *a: ({"ran": False}, "<p>SA-1 section not built in this test</p>")
    )

    with pytest.raises(SystemExit) as info:
        demo.run_demo(out, data_dir=out / "unused")

    message = str(info.value.code)
    assert message.startswith("demo stopped: step probmap_broken failed (exit 1)")
    assert steps[1].cmd in message
    assert message.endswith(f"report so far: {out / 'report' / 'index.html'}")
    assert [r["name"] for r in _ran(out)] == ["clip_ok", "probmap_broken"]

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["failure"].startswith("step probmap_broken failed (exit 1)")
    assert [(s["name"], s["status"]) for s in metrics["steps"]] == [
        ("clip_ok", "ran"),
        ("probmap_broken", "failed"),
        ("hsam_after", "not run"),
    ]
    assert metrics["steps"][2]["seconds"] is None
    assert [s["command"] for s in metrics["steps"]] == [s.cmd for s in steps]
    assert metrics["steps"][0]["seconds"] > 0.0 and metrics["timings"]["hsam_s"] == 0.0
    page = (out / "report" / "index.html").read_text()
    assert "The demo stopped: step probmap_broken failed (exit 1)" in page


def test_release_chain_maps_with_a_given_sa1_checkpoint_instead_of_training_one(tmp_path):
    from common.apps.release import release_steps

    trained = release_steps(tmp_path / "a")
    assert trained[0].name == "foundation_clip_train"
    sa1 = tmp_path / "sa1.pt"
    sa1.write_bytes(b"x")
    reused = release_steps(tmp_path / "b", clip_ckpt=sa1)
    assert [s.stage for s in reused].count("clip") == 0
    assert len(reused) == len(trained) - 1
    probmaps = [s for s in reused if s.stage == "probmap"]
    assert probmaps and all(s.overrides["ckpt_path"] == str(sa1) for s in probmaps)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        release_steps(tmp_path / "c", clip_ckpt=tmp_path / "missing.pt")


def test_a_linked_scan_is_found_by_its_case_id_whatever_its_kind(tmp_path):
    from common.apps.pipeline import linked_scan, scan_link_name

    sources = {
        "dicom_case": tmp_path / "src" / "series",
        "nifti_case": tmp_path / "src" / "scan.nii.gz",
        "nrrd_case": tmp_path / "src" / "scan.nrrd",
    }
    sources["dicom_case"].mkdir(parents=True)
    sources["nifti_case"].write_bytes(b"x")
    sources["nrrd_case"].write_bytes(b"x")
    folder = tmp_path / "scans"
    folder.mkdir()
    for case_id, source in sources.items():
        (folder / scan_link_name(case_id, source)).symlink_to(source)
    assert {c: linked_scan(folder, c).name for c in sources} == {
        "dicom_case": "dicom_case",
        "nifti_case": "nifti_case.nii.gz",
        "nrrd_case": "nrrd_case.nrrd",
    }
    # a case whose id is another's prefix is not taken for it, and an unlinked case names the path it would have
    (folder / scan_link_name("nifti_case_2", sources["nifti_case"])).symlink_to(sources["nifti_case"])
    assert linked_scan(folder, "nifti_case").name == "nifti_case.nii.gz"
    assert linked_scan(folder, "missing_case") == folder / "missing_case"


# --------------------------------------------------------------------------- run_python: a step forked from the preloaded server

PROBE = """
import json, os, sys
import multiprocessing
print(json.dumps({"name": __name__, "start_method": multiprocessing.get_start_method(), "argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "probe": os.environ.get("LUNGSEG_TEST_PROBE"),
                  "mark": globals().get("MARK"), "unbuffered": os.environ.get("PYTHONUNBUFFERED")}))
import common  # the interpreter state a step can change: must not reach the next step
assert not hasattr(common, "_probe_mark"), "a previous child's change is visible"
common._probe_mark = True
code = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0
if sys.argv[1:2] == ["raise"]:
    raise ValueError("probe failed on purpose")
sys.exit(code)
"""


def _fresh_python(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def test_run_python_runs_a_script_as_a_fresh_interpreter_would(tmp_path, monkeypatch):
    script = tmp_path / "probe dir" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    monkeypatch.setenv("LUNGSEG_TEST_PROBE", "set after the server started")  # the environment follows each call
    for args, code in ((["a b", "c"], 0), (["7"], 7), (["raise"], 1)):
        log = tmp_path / f"run_{code}.log"
        returncode = run_python([str(script), *args], cwd=tmp_path, log=log)
        fresh = _fresh_python([str(script), *args], tmp_path)
        assert returncode == fresh.returncode == code
        printed, expected = log.read_text().splitlines()[0], fresh.stdout.splitlines()[0]
        assert json.loads(printed) == json.loads(expected)
        assert json.loads(printed)["probe"] == "set after the server started" and json.loads(printed)["path0"] == str(
            script.parent
        )
    assert "ValueError: probe failed on purpose" in (tmp_path / "run_1.log").read_text()


def test_run_python_runs_modules_and_code_like_python_m_and_c(tmp_path):
    data = tmp_path / "d.json"
    data.write_text('{"b": [1, 2], "a": null}')
    log = tmp_path / "m.log"
    assert run_python(["-m", "json.tool", "--sort-keys", str(data)], cwd=tmp_path, log=log) == 0
    assert log.read_text() == _fresh_python(["-m", "json.tool", "--sort-keys", str(data)], tmp_path).stdout
    code = "import sys, json; print(json.dumps([__name__, sys.argv]))"
    assert run_python(["-c", code, "x", "y"], cwd=tmp_path, log=log) == 0
    assert (
        json.loads(log.read_text())
        == ["__main__", ["-c", "x", "y"]]
        == json.loads(_fresh_python(["-c", code, "x", "y"], tmp_path).stdout)
    )


def test_run_python_children_start_with_the_heavy_modules_imported(tmp_path):
    """The point of the server: torch, MONAI and the bundles' code are already imported in each child, which a fresh
    interpreter spends 10-15 s on; the forking and the running are in the child, so nothing leaks between steps (the
    probe above asserts that too)."""
    log = tmp_path / "modules.log"
    code = "import sys, json; print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))"
    assert run_python(["-c", code, *PRELOAD], log=log) == 0
    assert json.loads(log.read_text()) == sorted(PRELOAD)
    assert json.loads(_fresh_python(["-c", code, *PRELOAD], tmp_path).stdout) == []


def test_link_scan_links_by_case_id_and_replaces_a_link_to_another_scan(tmp_path):
    from common.apps.pipeline import link_scan, linked_scan

    first, second = tmp_path / "a.nii.gz", tmp_path / "series"
    first.write_bytes(b"x")
    second.mkdir()
    link = link_scan(tmp_path / "scans", "case", first)
    assert (
        link == tmp_path / "scans" / "case.nii.gz"
        and link.resolve() == first
        and linked_scan(tmp_path / "scans", "case") == link
    )
    assert link_scan(tmp_path / "scans", "case", first) == link  # linked again: left as it is
    folder_link = link_scan(tmp_path / "other", "case", second)
    assert folder_link.name == "case" and folder_link.resolve() == second
    stale = tmp_path / "other" / "case"
    third = tmp_path / "series2"
    third.mkdir()
    assert link_scan(tmp_path / "other", "case", third).resolve() == third and stale.is_symlink()


def test_a_benchmark_script_step_runs_every_time_and_its_failure_stops_the_chain(out, tmp_path):
    """A chain's script step (make chain's benchmarks): ``python <script> <args>`` as its own process, no done file,
    so it runs on every run of the chain; a non-zero exit stops the chain with the command that re-runs it."""
    script, printed = tmp_path / "figures.py", tmp_path / "printed.txt"
    script.write_text(
        "import sys\nwith open(sys.argv[1], 'a') as f:\n    print('speedup', sys.argv[2], file=f)\nsys.exit(int(sys.argv[3]))\n"
    )
    ok = Step("benchmark", "figures", "", [], {}, None, "a benchmark", script=[str(script), str(printed), "2.5", "0"])
    run_steps([ok], out)
    run_steps([ok], out)  # no done file: a re-run runs it again
    assert ok.status == "ran" and printed.read_text().splitlines() == ["speedup 2.5", "speedup 2.5"]
    failing = Step("benchmark", "broken", "", [], {}, None, "failing", script=[str(script), str(printed), "1", "3"])
    with pytest.raises(RuntimeError, match="step broken failed .exit 3.") as err:
        run_steps([failing, _step(out, "after")], out)
    assert str(script) in str(err.value) and failing.status == "failed"
    assert not any(r["name"] == "after" for r in _ran(out))
