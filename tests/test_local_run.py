"""The local main job's contract with its user: one error line for a failing step, the step's
traceback in the log only, results that appear only when a run succeeds, and a model id that
depends on what was trained and on what data, not on where."""

import io
import json
from pathlib import Path

import pytest

from dfu_ml.data.synthetic import generate_synthetic_dataset
from pipelines.local_run import StepConsole

KFP_LINES = """\
15:43:04.228 - INFO - Executing task \x1b[96m'prepare-data'\x1b[0m
15:43:04.229 - INFO - Streamed logs:
    [KFP Executor 2026-11-27 15:41:05,530 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {
                "x": 1
            }
        }
    }
    prepared 40 visits
    Traceback (most recent call last):
      File "ephemeral_component.py", line 3, in prepare_data
        raise DataError("bad label")
    dfu_ml.errors.DataError: data.csv, line 5, column 'Healing Phase Abs': label 'X' is not one of I, P, R
15:43:05.000 - ERROR - Task \x1b[96m'prepare-data'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
15:43:06.000 - INFO - Task 'make-fold-plan' outputs:
    fold_plan: Dataset( name='fold_plan',
                  uri='/tmp/x',
                  metadata={} )
15:43:07.000 - INFO - Executing task 'clinical-forest'
"""


def test_the_console_shows_progress_and_the_steps_own_output_but_no_dumps_or_tracebacks(tmp_path):
    log, console = io.StringIO(), io.StringIO()
    stream = StepConsole(log, console)
    stream.write(KFP_LINES[:50])  # arbitrary pieces, as print() delivers them
    stream.write(KFP_LINES[50:])
    shown = console.getvalue()
    assert "Executing task 'prepare-data'" in shown and "prepared 40 visits" in shown
    assert "FAILURE" in shown and "Executing task 'clinical-forest'" in shown
    for hidden in (
        "KFP Executor",
        "parameterValues",
        "Traceback",
        "raise DataError",
        "uri=",
        "fold_plan: Dataset",
    ):
        assert hidden not in shown, hidden
    assert log.getvalue().count("\n") == KFP_LINES.count("\n")  # every line is logged
    assert "\x1b[" not in log.getvalue()
    error = str(stream.failure(tmp_path / "pipeline.log"))
    assert error.startswith(
        "step 'prepare-data' failed: data.csv, line 5, column 'Healing Phase Abs'"
    )
    assert "Traceback" not in error and str(tmp_path / "pipeline.log") in error


def test_parallel_steps_printing_at_once_leave_every_log_line_whole(tmp_path):
    """kfp.local runs a ParallelFor's iterations in threads that all print to the console: each
    line they print reaches the log whole and valid UTF-8 (once, unlocked, it did not)."""
    import threading

    path = tmp_path / "pipeline.log"
    with open(path, "a", encoding="utf-8") as log:
        stream = StepConsole(log, io.StringIO())

        def step(n):
            for i in range(300):
                # In pieces, as print() delivers them; multi-byte characters included.
                stream.write(f"    fold {n} · epoch {i} ± κ ")
                stream.write("done\n")

        threads = [threading.Thread(target=step, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = path.read_bytes().decode("utf-8").splitlines()
    expected = {f"    fold {n} · epoch {i} ± κ done" for n in range(4) for i in range(300)}
    assert len(lines) == len(expected) and set(lines) == expected


def test_an_unexpected_step_error_points_to_the_log(tmp_path):
    stream = StepConsole(io.StringIO(), io.StringIO())
    stream.write("Executing task 'stage1-fusion'\n    KeyError: 'encoder'\n")
    stream.write("Task 'stage1-fusion' finished with status FAILURE\n")
    error = str(stream.failure(tmp_path / "pipeline.log"))
    assert "step 'stage1-fusion' failed with an unexpected error (KeyError: 'encoder')" in error
    assert "traceback is in" in error


def _with_bad_label(folder):
    import pandas as pd

    from dfu_ml.data.schema import CLINICAL_CSV, LABEL_COLUMN

    path = folder / CLINICAL_CSV
    table = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    table.loc[3, LABEL_COLUMN] = "X"
    table.to_csv(path, index=False, encoding="utf-8-sig")


@pytest.mark.slow
def test_a_failing_run_is_one_error_line_and_previous_results_stay_marked(tmp_path, capfd):
    from pipelines.cli import main

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=8, seed=2, image_scale=0.05)
    _with_bad_label(data)
    out = tmp_path / "out"
    out.mkdir()
    previous = {"run_id": "earlier", "mean": {}}
    (out / "summary.json").write_text(json.dumps(previous))
    code = main(["run", "--data", str(data), "--out", str(out), "--set", "modalities=metadata"])
    captured = capfd.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("error: step 'prepare-data' failed: ")
    assert "line 5, column 'Healing Phase Abs': label 'X'" in errors[0]
    assert "are from an earlier run" in errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert json.loads((out / "summary.json").read_text()) == previous
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "failed" and "label 'X'" in status["error"]
    assert "previous_results" in status
    assert "dfu_ml.errors.DataError" in (out / "logs" / "pipeline.log").read_text()


def _duplicate_patient_header(folder):
    from dfu_ml.data.schema import CLINICAL_CSV

    path = folder / CLINICAL_CSV
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    lines = [lines[0] + ',"Patient#"'] + [line + ",1" for line in lines[1:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")


def _empty_box_filename(folder):
    from dfu_ml.data.schema import DEPTH_BOX_CSV

    path = folder / DEPTH_BOX_CSV
    lines = path.read_text().splitlines()
    lines[2] = "," + lines[2].split(",", 1)[1]
    path.write_text("\n".join(lines) + "\n")


def _corrupt_first_depth_image(folder):
    from dfu_ml.data.schema import MODALITY_FOLDERS

    next(iter(sorted((folder / MODALITY_FOLDERS["depth_rgb"]).glob("*.png")))).write_bytes(b"x")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("small") / "data"
    generate_synthetic_dataset(data, patients=6, seed=2, image_scale=0.05)
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "spoil, modalities, message",
    [
        (_duplicate_patient_header, "metadata", "column 'Patient#' appears twice"),
        (_empty_box_filename, "metadata,depth_rgb", "line 3, column 'Filename': the cell is empty"),
        (_corrupt_first_depth_image, "metadata,depth_rgb", "is corrupt or not a PNG"),
    ],
    ids=["duplicate header", "empty box filename", "corrupt png"],
)
def test_bad_data_through_the_main_command_is_one_error_line(
    small_dataset, tmp_path, capfd, spoil, modalities, message
):
    import shutil

    from pipelines.cli import main

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    spoil(data)
    out = tmp_path / "out"
    code = main(
        ["run", "--data", str(data), "--out", str(out), "--set", f"modalities={modalities}"]
    )
    captured = capfd.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1, captured.err
    assert errors[0].startswith("error: step 'prepare-data' failed: ") and message in errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (out / "summary.json").exists()
    assert json.loads((out / "run_status.json").read_text())["status"] == "failed"


def test_unreachable_object_storage_through_the_main_command(tmp_path, capfd, monkeypatch):
    import socket

    from pipelines.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
    for name, value in {
        "DFU_S3_ENDPOINT": endpoint,
        "DFU_S3_ACCESS_KEY": "someone",
        "DFU_S3_SECRET_KEY": "a-long-secret-key",
        "DFU_S3_SECURE": "false",
    }.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    code = main(
        ["run", "--data", "s3://dfu-data/study", "--out", str(out), "--set", "modalities=metadata"]
    )
    captured = capfd.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1, captured.err
    assert "cannot reach the S3 endpoint" in errors[0] and endpoint in errors[0]
    assert "a-long-secret-key" not in captured.out + captured.err
    assert "a-long-secret-key" not in (out / "logs" / "pipeline.log").read_text()


def test_an_unexpected_error_is_one_line_with_the_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    import dfu_ml.predict
    from pipelines.cli import main

    def broken(*_args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(dfu_ml.predict, "predict_folder", broken)
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: unexpected ZeroDivisionError: division by zero")
    log = Path(err[0].split("traceback is in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "broken" in log.read_text()
    log.unlink()


def test_predict_into_a_folder_is_a_clean_error(tmp_path, capsys):
    from pipelines.cli import main

    assert (
        main(["predict", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path)])
        == 2
    )
    assert "is a folder; give the path of the CSV file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synth", "--out", "{tmp}/s", "--patients", "0"], "patients=0"),
        (["synth", "--out", "{tmp}/s", "--image-scale", "-1"], "image_scale=-1.0"),
        (["synth", "--out", "/proc/no-such-dir/s", "--patients", "1"], "/proc/no-such-dir"),
        (["synth", "--from-real", "{tmp}/none", "--out", "{tmp}/s"], "clinical CSV not found"),
        (["compile", "--config", "nope", "--output", "{tmp}/p.yaml"], "config 'nope'"),
        (["compile", "--set", "images=[1]", "--output", "{tmp}/p.yaml"], "'images'"),
        (["check", "{tmp}/none.yaml"], "no such pipeline file"),
        (["predict", "--model", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/p.csv"], "no manifest"),
        (["run", "--set", "no_such_key=1", "--out", "{tmp}/o"], "unknown config key 'no_such_key'"),
    ],
)
def test_every_entry_point_gives_one_error_line(tmp_path, capsys, argv, message):
    from pipelines.cli import main

    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0]
