"""The notebooks: committed clean and thin, run end to end on CPU with tiny budgets, and the
Dockerfile / environment.yml naming the same dependencies as pyproject.toml.

The execution test runs 01 -> 07 in order through papermill (03 twice: stopped by max_steps, then
resumed; 06 exports what 03 trained, 07 deploys what 06 exported), injecting small values into
each notebook's `parameters` cell; everything is written under a temporary directory, nothing
into the repository.
"""

import ast
import base64
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["01_data.ipynb", "02_spec.ipynb", "03_train.ipynb", "04_evaluate.ipynb",
             "05_visualize.ipynb", "06_export.ipynb", "07_tensorrt_deploy.ipynb"]
MAX_CODE_LINES = 15  # "a code cell of a few lines": anything longer belongs in the package


def load(name: str) -> dict:
    return json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def as_python(code: str) -> str:
    """Cell source with IPython shell escapes / magics (`!cmd`, `%magic`) replaced by `pass`."""
    return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line) for line in code.splitlines())


# ----- committed form ---------------------------------------------------------------------------

def test_the_notebook_set_is_complete():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = load(name)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name}: a code cell has outputs; clear them"
            assert cell["execution_count"] is None, f"{name}: execution counts left in"
        assert "papermill" not in cell.get("metadata", {}), f"{name}: papermill metadata left in"
    assert "papermill" not in nb["metadata"] and "widgets" not in nb["metadata"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_thin_and_tagged(name):
    nb = load(name)
    cells = nb["cells"]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert cells[0]["cell_type"] == "markdown"
    assert source(cells[0]).startswith(f"# {name[:2]} · "), "title: '# NN · Step'"
    code_cells = [c for c in cells if c["cell_type"] == "code"]
    tagged = [c for c in code_cells if "parameters" in c["metadata"].get("tags", [])]
    assert tagged == [code_cells[0]], "exactly one parameters cell, the first code cell"
    params = ast.parse(source(tagged[0]))
    assert all(isinstance(node, ast.Assign) for node in params.body), \
        "the parameters cell only assigns values"
    assert "root" in {t.id for node in params.body for t in node.targets}
    headings = [source(c) for c in cells if c["cell_type"] == "markdown"
                and source(c).startswith("## ")]
    numbers = [int(re.match(r"## (\d+)\. ", h).group(1)) for h in headings]
    assert numbers == list(range(1, len(numbers) + 1)), "steps are numbered 1, 2, ..."
    for cell in code_cells:
        code = source(cell)
        tree = ast.parse(as_python(code))
        defined = [n for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                     ast.Lambda))]
        assert not defined, f"{name}: define functions and classes in the package"
        assert len(code.splitlines()) <= MAX_CODE_LINES + 5 * (cell is code_cells[0]), \
            f"{name}: a code cell of {len(code.splitlines())} lines"
    assert any("mrcnn_helpers" in source(c) for c in code_cells)
    assert any("use_repo_root(root)" in source(c) for c in code_cells)


def test_multi_gpu_launch_is_guarded_by_a_parameter():
    code = [source(c) for c in load("03_train.ipynb")["cells"] if c["cell_type"] == "code"]
    launch = [c for c in code if "--gpus" in c]
    assert len(launch) == 1 and launch[0].startswith("if launch_multi_gpu:")
    assert "launch_multi_gpu = False" in code[0]


# ----- Dockerfile and environment.yml -------------------------------------------------------------

def requirement_map(requirements) -> dict[str, str]:
    """{normalized name: version specifier} of PEP 508 strings (no markers used here)."""
    out = {}
    for req in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*([<>=!~].*)?\s*", req)
        assert match, f"cannot read requirement {req!r}"
        out[re.sub(r"[-_.]+", "-", match.group(1).lower())] = (match.group(3) or "").replace(" ",
                                                                                            "")
    return out


# conda-forge names of packages whose conda name differs from the PyPI name.
CONDA_TO_PYPI = {"pytorch": "torch", "py-opencv": "opencv-python-headless"}
CONDA_ONLY = {"python", "pip"}


def environment_yml() -> tuple[dict[str, str], list[str]]:
    """(conda dependencies as {pypi name: specifier}, pip entries) of environment.yml.

    A line reader for the file's simple layout (a `dependencies:` list with one `pip:` sublist),
    so the check needs no YAML library.
    """
    conda, pip_entries, in_deps, in_pip = {}, [], False, False
    for raw in (REPO / "environment.yml").read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            in_deps, in_pip = line.startswith("dependencies:"), False
            continue
        item = re.match(r"^(\s*)- (.*)$", line)
        if not (in_deps and item):
            continue
        indent, value = len(item.group(1)), item.group(2).strip()
        if value == "pip:":
            in_pip = True
        elif in_pip and indent > 2:
            pip_entries.append(value)
        else:
            in_pip = False
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", value)
            name = match.group(1).lower()
            if name not in CONDA_ONLY:
                conda[CONDA_TO_PYPI.get(name, name)] = match.group(2).replace(" ", "")
    return conda, pip_entries


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    if "notebooks" not in extras:
        pytest.fail("pyproject.toml has no `notebooks` extra: add notebooks = [\"ipykernel\", "
                    "\"ipywidgets>=8\", \"jupyterlab>=4\", \"matplotlib>=3.7\"] under "
                    "[project.optional-dependencies]")
    return requirement_map(project["dependencies"] + extras["notebooks"])


def test_environment_yml_names_the_dependencies_of_pyproject():
    conda, pip_entries = environment_yml()
    assert conda == pyproject_requirements()
    assert pip_entries == ["-e .[notebooks]"]
    assert "python=3.11" in (REPO / "environment.yml").read_text(encoding="utf-8")


def test_dockerfile_installs_the_package_with_the_notebooks_extra():
    pyproject_requirements()  # the extra it installs exists
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    base = [line for line in lines if line.startswith(("FROM", "ARG BASE_IMAGE"))]
    assert any("nvcr.io/nvidia/pytorch:" in line for line in base)
    installs = [line for line in lines if "pip install" in line]
    assert len(installs) == 1 and installs[0].rstrip().endswith('-e ".[notebooks]"'), \
        "dependencies come from pyproject.toml only"
    assert "EXPOSE 8888" in lines
    assert any(line.startswith("CMD") and '"lab"' in line for line in lines)
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", "data/", "results/"} <= set(ignored)


# ----- execution --------------------------------------------------------------------------------

def output_texts(nb) -> list[str]:
    """Every text a notebook's cells produced (streams, text/plain, text/html), in order."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                texts += [out.data[k] for k in ("text/plain", "text/html") if k in out.data]
    return texts


def cell_texts(nb) -> list[str]:
    """Per code cell, everything it printed or returned as text, joined."""
    return ["".join(out.text if out.output_type == "stream" else out.data.get("text/plain", "")
                    for out in cell.get("outputs", []) if out.output_type != "error")
            for cell in nb.cells if cell.cell_type == "code"]


def png_dpis(nb) -> list[float]:
    """The horizontal dpi recorded in every PNG a notebook's cells displayed."""
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))).info["dpi"][0]
            for cell in nb.cells for out in cell.get("outputs", [])
            if out.output_type in ("execute_result", "display_data") and "image/png" in out.data]


def count_outputs(nb, mime: str) -> int:
    return sum(1 for cell in nb.cells for out in cell.get("outputs", [])
               if out.output_type in ("execute_result", "display_data") and mime in out.data)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Runs the notebooks in order with tiny budgets; returns (workdir, {run name: notebook})."""
    pm = pytest.importorskip("papermill")
    for module in ("ipykernel", "matplotlib", "ipywidgets"):
        pytest.importorskip(module)
    work = tmp_path_factory.mktemp("notebooks")
    data, experiment, export = work / "data", work / "experiment", work / "export"
    common = {"root": str(REPO), "device": "cpu"}
    runs = [
        ("01_data", "01_data.ipynb", {"root": str(REPO), "data_dir": str(data), "num_train": 30,
                                      "num_val": 6, "image_size": [128, 128], "num_show": 2}),
        ("02_spec", "02_spec.ipynb", {
            "root": str(REPO), "data_dir": str(data), "experiment_dir": str(experiment),
            "total_steps": 4, "train_batch_size": 2, "num_steps_per_eval": 4,
            "logging_frequency": 1, "learning_rate_steps": [], "learning_rate_decay_levels": [],
            "image_size": [128, 128], "eval_samples": 3}),
        ("03_train_part", "03_train.ipynb", {**common, "experiment_dir": str(experiment),
                                             "max_steps": 2}),
        ("03_train_resumed", "03_train.ipynb", {**common, "experiment_dir": str(experiment)}),
        ("04_evaluate", "04_evaluate.ipynb", {**common, "experiment_dir": str(experiment),
                                              "max_images": 3}),
        ("05_visualize", "05_visualize.ipynb", {**common, "experiment_dir": str(experiment),
                                                "num_images": 2, "viewer_images": 3,
                                                "viewer_classes": ["circle", "square"]}),
        ("06_export", "06_export.ipynb", {"root": str(REPO), "experiment_dir": str(experiment),
                                          "export_dir": str(export), "verify_images": 2,
                                          "cal_batches": 2}),
        # threshold 0.05 = the spec's test_score_thresh: the briefly trained model's detections
        # are drawn, so the ONNX and PyTorch frames can be compared.
        ("07_tensorrt_deploy", "07_tensorrt_deploy.ipynb", {
            **common, "experiment_dir": str(experiment), "export_dir": str(export),
            "output_dir": str(work / "deploy"), "max_frames": 3, "threshold": 0.05,
            "num_show": 2}),
    ]
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        runs = runs[:-2]  # 06 and 07 need the `export` extra; their tests skip
    done = {}
    for run, name, parameters in runs:
        done[run] = pm.execute_notebook(
            str(NOTEBOOK_DIR / name), str(work / f"{run}.ipynb"), parameters=parameters,
            cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False)
    return work, done


def test_01_makes_and_shows_the_data(executed):
    work, done = executed
    nb = done["01_data"]
    assert (work / "data" / "annotations" / "instances_train.json").is_file()
    assert len(list((work / "data" / "val").glob("*.png"))) == 6
    assert count_outputs(nb, "image/png") == 2  # ground truth grid, statistics
    assert all(dpi == pytest.approx(120, abs=0.5) for dpi in png_dpis(nb))
    assert any(text.startswith("30 images") for text in output_texts(nb))


def test_01_checks_fixes_subsets_and_writes_tfrecords(executed):
    work, done = executed
    texts = cell_texts(done["01_data"])
    doctor = [t for t in texts if "instances_train.json: 30 images" in t]
    assert len(doctor) == 1 and "OK: 0 errors, 0 warnings" in doctor[0]
    broken = next(t for t in texts if "broken_train.json: 30 images" in t
                  and "FAILED" in t)
    assert "FAILED: 2 errors" in broken
    assert "unknown_category (1)" in broken and "degenerate_box (1)" in broken
    fixed = next(t for t in texts if t.startswith("fixed copy: 30 images"))
    assert "OK: 0 errors, 0 warnings" in fixed
    assert (work / "data" / "doctor" / "fixed" / "annotations" / "broken_train.json").is_file()
    assert any("circles_train.json" in t and "(1, 'circle', 1)" in t for t in texts)
    assert any("instances_all.json" in t and "'num_images': 36" in t for t in texts)
    shards = sorted((work / "data" / "tfrecords").glob("*.tfrecord"))
    assert [p.name for p in shards] == [f"{split}-0000{k}-of-00002.tfrecord"
                                        for split in ("train", "val") for k in (0, 1)]
    joined = "".join(texts)
    assert "train: 30 records" in joined and "val: 6 records" in joined
    assert "training reads 30 records from 2 TFRecord files, classes ['circle', 'triangle', " \
           "'square']" in joined
    assert "evaluation reads 6 records from 2 TFRecord files" in joined
    assert "6 validation samples, the same from records and from JSON: True" in joined


def test_02_saves_the_changed_spec(executed):
    from mrcnn_helpers.spec import load_spec

    work, done = executed
    spec = load_spec(work / "experiment" / "experiment_spec.txt")
    assert (spec.total_steps, spec.train_batch_size, spec.logging_frequency) == (4, 2, 1)
    assert spec.data_config.image_size == (128, 128)
    assert spec.data_config.val_image_dir == str(work / "data" / "val")
    texts = output_texts(done["02_spec"])
    assert any("data_config.image_size" in t and "multiples of 2^max_level" in t for t in texts)
    assert any("reads back identical: True" in t for t in texts)


def test_03_trains_stops_and_resumes(executed):
    work, done = executed
    experiment = work / "experiment"
    first = "".join(output_texts(done["03_train_part"]))
    assert "Stopped at step 2 of 4" in first and "no evaluation yet" in first
    second = "".join(output_texts(done["03_train_resumed"]))
    assert "Resuming from" in second and "model.step-2.pth at step 2" in second
    assert (experiment / "model.step-4.pth").is_file()
    assert (experiment / "metrics_step-4.json").is_file()
    history = [json.loads(line) for line in
               (experiment / "notebook_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in history if r["event"] == "eval"] == [4]
    # The live plot is one display updated in place, in both runs.
    for run in ("03_train_part", "03_train_resumed"):
        assert count_outputs(done[run], "image/png") == 1
        assert png_dpis(done[run]) == [pytest.approx(120, abs=0.5)]


def test_04_reports_metrics_and_plots(executed):
    work, done = executed
    metrics = json.loads((work / "experiment" / "eval_metrics.json").read_text())
    assert metrics["eval_images"] == 3 and "mask_AP" in metrics and "per_class" in metrics
    nb = done["04_evaluate"]
    assert count_outputs(nb, "image/png") == 2  # per-class AP, PR curves
    assert any("<table" in t and "AP50" in t and "mask" in t for t in output_texts(nb))


def test_05_shows_predictions_and_the_viewer(executed):
    _, done = executed
    nb = done["05_visualize"]
    assert count_outputs(nb, "application/vnd.jupyter.widget-view+json") >= 1
    assert count_outputs(nb, "image/png") >= 1
    texts = output_texts(nb)
    assert any(t.startswith("Worst") or "no errors" in t for t in texts)
    # The viewer_classes parameter reaches the viewer's class filter.
    assert any("Worst" in t and "(classes: circle, square)" in t for t in texts)


def executed_run(executed, run):
    """(workdir, notebook) of one run, skipping when it was not run (no onnx / onnxruntime)."""
    work, done = executed
    if run not in done:
        pytest.skip(f"{run} needs onnx and onnxruntime (the `export` extra)")
    return work, done[run]


def test_06_exports_verifies_and_writes_deepstream_configs(executed):
    from mrcnn_helpers.export import read_config

    work, nb = executed_run(executed, "06_export")
    export = work / "export"
    assert (export / "model.onnx").is_file()
    infer = read_config(export / "deepstream" / "config_infer_primary_mrcnn.txt")["property"]
    assert (infer["network-type"], infer["output-instance-mask"], infer["infer-dims"]) == \
        ("3", "1", "3;128;128")
    assert (export / "deepstream" / infer["onnx-file"]).resolve() == (export / "model.onnx")
    texts = output_texts(nb)
    html = [t for t in texts if t.startswith("<table")]
    io, parity, ap = html[:3]
    assert "generate_detections" in io and "[1, 3, 128, 128]" in io and "[1, 50, 4, 16, 16]" in io
    assert "2 validation images: all within tolerance" in parity
    assert "onnx - pytorch" in ap and "mask_AP" in ap
    assert any("network-type=3" in t for t in texts)  # the nvinfer config is shown
    assert any(t.startswith("2 batches of float32 [1, 3, 128, 128]") for t in texts)
    accuracy = next(t for t in html if "Accuracy of every precision" in t)
    assert all(name in accuracy for name in ("pytorch fp32", "onnx fp32", "onnx fp16",
                                             "onnx int8"))
    assert (export / "model.fp16.onnx").is_file() and (export / "model.int8.onnx").is_file()
    assert (export / "int8_ranges.json").is_file()  # the calibration cache, reusable
    assert count_outputs(nb, "image/png") == 2  # the calibration image and the per-class plot
    if importlib.util.find_spec("tensorrt") is None:
        assert any("TensorRT is not used" in t and "NGC" in t for t in texts)
        assert not (export / "model.int8.plan").exists()


def test_07_deploys_with_onnx_and_pytorch(executed):
    import numpy as np
    from PIL import Image

    work, nb = executed_run(executed, "07_tensorrt_deploy")
    deploy = work / "deploy"
    onnx_frames = sorted((deploy / "onnx_frames").glob("*.png"))
    torch_frames = sorted((deploy / "pytorch_frames").glob("*.png"))
    assert len(onnx_frames) == len(torch_frames) == 3
    texts = output_texts(nb)
    summaries = re.findall(r"3 frames in [\d.]+ s: [\d.]+ FPS \((\w+), batch \d+, (\d+) detections",
                           "".join(texts))
    assert [backend for backend, _ in summaries] == ["onnxruntime", "pytorch"]
    assert summaries[0][1] == summaries[1][1] != "0"  # same detections drawn by both backends
    for onnx_frame, torch_frame in zip(onnx_frames, torch_frames, strict=True):
        a = np.asarray(Image.open(onnx_frame), np.int16)
        b = np.asarray(Image.open(torch_frame), np.int16)
        # The same drawing, up to mask pixels flipped by fp32 rounding at the 0.5 threshold.
        assert a.shape == b.shape and (np.abs(a - b) > 8).mean() < 0.01
    table = next(t for t in texts if t.startswith("<table") and "FPS" in t)
    assert "onnx, images" in table and "pytorch, images" in table
    video = importlib.util.find_spec("cv2") is not None
    assert ("onnx, video" in table) == video == (deploy / "clip_annotated.mp4").is_file()
    assert count_outputs(nb, "image/png") == 1 + video  # annotated folder frames (+ video frames)
    assert any(t.startswith("deepstream-app -c ") and "deepstream_app_source1_mrcnn.txt" in t
               for t in texts)
    if importlib.util.find_spec("tensorrt") is None:
        assert any("TensorRT is not used" in t for t in texts)


def test_tensorrt_choice_follows_the_parameter(tmp_path):
    from mrcnn_helpers import notebook as nb_helpers
    from mrcnn_helpers.inference import ExportError

    assert nb_helpers.tensorrt_choice(False) == (False, "TensorRT skipped (the parameter is False).")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="auto"):
            nb_helpers.tensorrt_choice(bad)
    use, message = nb_helpers.tensorrt_choice("auto", engine_path=tmp_path / "missing.plan")
    assert not use and message.startswith("TensorRT is not used: ")
    with pytest.raises(ExportError):  # required but absent (no TensorRT, no GPU or no engine)
        nb_helpers.tensorrt_choice(True, engine_path=tmp_path / "missing.plan")


def test_ap_and_deploy_tables_hold_the_numbers():
    from mrcnn_helpers import notebook as nb_helpers
    from mrcnn_helpers.deploy import DeployStats

    table = nb_helpers.ap_table({"pytorch": {"AP": 0.5, "mask_AP": 0.25, "eval_images": 4},
                                 "onnx": {"AP": 0.5, "mask_AP": 0.2}})
    assert list(table.columns) == ["metric", "pytorch", "onnx", "onnx - pytorch"]
    assert table.rows == [["AP", 0.5, 0.5, 0.0], ["mask_AP", 0.25, 0.2, -0.05]]
    assert "4 validation images" in table.title
    stats = DeployStats(backend="pytorch", batch_size=2, frames=4, detections=7, seconds=2.0,
                        frame_latency_ms=[10.0, 20.0, 30.0, 40.0], infer_latency_ms=[5.0, 7.0])
    row = nb_helpers.deploy_stats_table({"run": stats}).rows[0]
    assert row == ["run", "pytorch", 2, 4, 2.0, 25.0, 37.0, 6.0, 7, ""]
    stats.add_time("encode", 0.04)  # 10 ms per frame in the writer
    assert nb_helpers.deploy_stats_table({"run": stats}).rows[0][-1] == "writer 10.0 ms"


def test_no_cell_failed_and_the_repository_is_untouched(executed):
    _, done = executed
    for run, nb in done.items():
        errors = [out for cell in nb.cells for out in cell.get("outputs", [])
                  if out.output_type == "error"]
        assert not errors, f"{run}: {errors[0].ename}: {errors[0].evalue}"
    for name in NOTEBOOKS:  # papermill wrote its outputs elsewhere
        assert all(not c.get("outputs") for c in load(name)["cells"])
    assert not (REPO / "notebooks" / "results").exists()
