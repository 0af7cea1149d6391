"""The notebooks in ``notebooks/`` execute top to bottom, and the committed files (the notebooks'
only source: edit the notebook you run) are output-stripped.

Execution uses nbclient with a real ``python3`` kernel on the embedded SmolLM2 model; every key
cell of a notebook ends in ``assert``s against an independent recomputation, so an error in any
cell fails the test (with the cell's traceback). Each notebook gets a wall-clock budget
(``BIAS_LENS_NB_TIMEOUT`` seconds, default 240) shared by all of its cells.

The kernel inherits ``OMP_NUM_THREADS=1`` unless the variable is already set: on a machine whose
few cores are shared with other jobs, a multi-threaded OpenMP pool spin-waits on descheduled
threads and small forward passes get 5-20x slower (measured here: 8 single-prompt passes took 2 s
with one thread and 40 s with two under load). ``PLOTLY_RENDERER`` is removed, so each notebook's
first cell (``bias_lens.plot.notebook.setup_notebook()``) picks the renderer users get:
``plotly_mimetype+notebook``, the figure JSON for JupyterLab plus HTML with plotly.js embedded, so
an nbconvert HTML export of the executed notebook draws every figure offline (checked here).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
TIMEOUT = float(os.environ.get("BIAS_LENS_NB_TIMEOUT", "240"))

#: notebook -> (library modules it needs, minimum number of plotly figures it shows)
NOTEBOOKS: dict[str, tuple[tuple[str, ...], int]] = {
    "01_logit_lens_and_bmi": (("bias_lens.locate.layers", "bias_lens.plot.locate"), 3),
    "02_module_row_neuron_locating": (
        ("bias_lens.locate.modules", "bias_lens.locate.gradients", "bias_lens.plot.locate", "bias_lens.plot.gradients",
         "bias_lens.edit"), 4),
    "03_neuron_attribution_general_neurons_circuits": (
        ("bias_lens.locate.attribution", "bias_lens.locate.general_neurons", "bias_lens.locate.causal",
         "bias_lens.locate.circuit", "bias_lens.plot.attribution", "bias_lens.plot.circuit"), 5),
    "04_edit_and_export": (
        ("bias_lens.locate.attribution", "bias_lens.edit.finetune", "bias_lens.edit.neuron_masking",
         "bias_lens.edit.export", "bias_lens.edit.patch", "bias_lens.benchmarks"), 2),
    "05_biasedit": (
        ("bias_lens.locate.tracing", "bias_lens.plot.tracing", "bias_lens.edit.editor", "bias_lens.edit.editor_train",
         "bias_lens.benchmarks.stereoset_train", "bias_lens.pipeline.biasedit", "bias_lens.edit.export"), 4),
    "06_neuron_editing": (
        ("bias_lens.locate.query_neurons", "bias_lens.locate.general_neurons", "bias_lens.locate.neuron_pipeline",
         "bias_lens.locate.causal", "bias_lens.edit.neuron_masking", "bias_lens.benchmarks.runners",
         "bias_lens.locate.projection", "bias_lens.locate.circuit_positions", "bias_lens.plot.circuit",
         "bias_lens.locate.causal_joint"), 8),
    "07_contrastive_editing": (
        ("bias_lens.benchmarks.cda", "bias_lens.edit.imp", "bias_lens.edit.references", "bias_lens.edit.contrastive",
         "bias_lens.plot.contrastive"), 2),
}
PLOTLY_MIME = "application/vnd.plotly.v1+json"
GRAPH_DIV = 'class="plotly-graph-div"'


def assert_html_has_figures(nb, n_min: int, name: str) -> str:
    """nbconvert's HTML export of an executed notebook draws >= ``n_min`` figures with plotly.js inlined."""
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_notebook_node(nb)
    divs, plots = html.count(GRAPH_DIV), html.count("Plotly.newPlot(")
    assert divs >= n_min and plots >= n_min, f"{name}: the HTML export draws {divs} figure divs / {plots} newPlot calls"
    assert "plotly.js v" in html and "window.Plotly = Plotly" in html, f"{name}: plotly.js is not embedded in the HTML"
    assert not re.search(r"<script[^>]+src=[\"'][^\"']*plotly", html), f"{name}: the HTML fetches plotly.js (fails offline)"
    return html


def _missing(modules: tuple[str, ...]) -> list[str]:
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except ModuleNotFoundError:
            out.append(m)
    return out


def stripped_problems(text: str, name: str) -> list[str]:
    """What keeps a notebook file from being committed as the source: outputs, execution counts,
    invalid nbformat, or a layout that ``jupyter nbconvert --clear-output --inplace`` would rewrite."""
    import nbformat

    nb = nbformat.reads(text, as_version=4)
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as err:
        return [f"{name}: invalid notebook ({err.message})"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    bad = [f"{name}: cell {c.get('id', i)} has outputs or an execution count" for i, c in enumerate(code)
           if c.outputs or c.execution_count is not None]
    if not bad and importlib.util.find_spec("nbconvert") is not None:
        from nbconvert.exporters import NotebookExporter
        from nbconvert.preprocessors import ClearOutputPreprocessor

        cleared, _ = NotebookExporter(preprocessors=[ClearOutputPreprocessor]).from_notebook_node(nb)
        if cleared != text:
            bad.append(f"{name}: not saved as nbconvert --clear-output writes it")
    return bad


def test_committed_notebooks_are_stripped_sources():
    """The committed ``.ipynb`` files are the notebooks' source: users edit and run them directly,
    then clear outputs before committing (``jupyter nbconvert --clear-output --inplace notebooks/*.ipynb``)."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read notebooks (pip install nbformat)")
    assert {p.stem for p in NB_DIR.glob("*.ipynb")} == set(NOTEBOOKS)
    for name in NOTEBOOKS:
        text = (NB_DIR / f"{name}.ipynb").read_text(encoding="utf-8")
        assert stripped_problems(text, name) == [], "clear outputs: jupyter nbconvert --clear-output --inplace notebooks/*.ipynb"
        nb = nbformat.reads(text, as_version=4)
        assert nb.metadata.kernelspec.name == "python3", f"{name}: kernel must be python3"
        ids = [c.get("id") for c in nb.cells]
        assert all(ids) and len(set(ids)) == len(ids), f"{name}: cell ids missing or repeated"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2, f"{name}: too little explanation"
        assert any("assert " in c.source for c in code), f"{name} checks nothing"
        assert "setup_notebook()" in code[0].source, f"{name}: the first code cell must call setup_notebook()"


def test_stripped_check_catches_outputs_and_counts():
    """The check above fails on a committed notebook that still carries a run's outputs or counts."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read notebooks (pip install nbformat)")
    name = next(iter(NOTEBOOKS))
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    with_output, with_count = nbformat.from_dict(nb), nbformat.from_dict(nb)
    next(c for c in with_output.cells if c.id == cell.id).outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    next(c for c in with_count.cells if c.id == cell.id).execution_count = 1
    for dirty in (with_output, with_count):
        problems = stripped_problems(nbformat.writes(dirty) + "\n", name)
        assert problems == [f"{name}: cell {cell.id} has outputs or an execution count"]
    if importlib.util.find_spec("nbconvert") is not None:  # same content, re-indented by hand
        import json

        text = json.dumps(json.loads((NB_DIR / f"{name}.ipynb").read_text(encoding="utf-8")), indent=2) + "\n"
        assert stripped_problems(text, name) == [f"{name}: not saved as nbconvert --clear-output writes it"]


@pytest.mark.notebook
@pytest.mark.integration
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_executes(name, monkeypatch):
    missing = _missing(NOTEBOOKS[name][0] + ("nbclient", "nbformat", "ipykernel"))
    if missing:
        pytest.skip(f"{name}: missing module(s) {', '.join(missing)} needed by this notebook")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    if not os.environ.get("OMP_NUM_THREADS"):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)  # the notebooks' own setup_notebook() default
    # the kernel must import this checkout's bias_lens even when it is not installed in the venv
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    start = time.monotonic()
    remaining = lambda cell: max(1, int(TIMEOUT - (time.monotonic() - start)))  # noqa: E731
    client = NotebookClient(nb, kernel_name="python3", timeout_func=remaining, startup_timeout=120,
                            resources={"metadata": {"path": str(NB_DIR)}})
    try:
        client.execute()
    except CellTimeoutError as err:
        pytest.fail(f"{name} exceeded its {TIMEOUT:.0f} s budget (BIAS_LENS_NB_TIMEOUT): {str(err)[-500:]}")
    except CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{str(err)[-4000:]}")
    elapsed = time.monotonic() - start
    sys.stderr.write(f"{name}: {elapsed:.0f} s\n")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum(PLOTLY_MIME in o.get("data", {}) for o in outputs)
    assert figures >= NOTEBOOKS[name][1], f"{name} showed {figures} plotly figures"
    html_figures = sum(GRAPH_DIV in o.get("data", {}).get("text/html", "") for o in outputs)
    assert html_figures == figures, f"{name}: {figures} figures but only {html_figures} carry HTML"
    assert_html_has_figures(nb, NOTEBOOKS[name][1], name)
    assert any("notebook ran in" in o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.notebook
@pytest.mark.filterwarnings("ignore:Your element with mimetype")  # the JSON-only export below, on purpose
def test_setup_notebook_makes_exported_html_draw_figures(tmp_path, monkeypatch):
    """Without the model: a two-figure notebook run with setup_notebook() exports HTML that draws both
    (and without it, plotly's JupyterLab renderer exports none: the bug this guards against)."""
    missing = _missing(("nbclient", "nbformat", "ipykernel", "nbconvert"))
    if missing:
        pytest.skip(f"missing module(s) {', '.join(missing)}")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    figs = "import plotly.graph_objects as go\ngo.Figure(go.Bar(x=[1, 2], y=[3, 1])).show()\ngo.Figure(go.Scatter(y=[1, 4])).show()"

    def run(first: str):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(first), nbformat.v4.new_code_cell(figs)]
        NotebookClient(nb, kernel_name="python3", timeout=120, startup_timeout=120,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        return nb

    nb = run("from bias_lens.plot.notebook import setup_notebook\nprint(setup_notebook())")
    assert nb.cells[0].outputs[0]["text"].strip() == "plotly_mimetype+notebook"
    shown = [o for o in nb.cells[1].outputs if PLOTLY_MIME in o.get("data", {})]
    assert len(shown) == 2 and all(GRAPH_DIV in o["data"]["text/html"] for o in shown)  # JupyterLab JSON + HTML
    assert_html_has_figures(nb, 2, "setup_notebook")
    from nbconvert import HTMLExporter

    plain, _ = HTMLExporter().from_notebook_node(run("import plotly.io as pio\npio.renderers.default = 'plotly_mimetype'"))
    assert GRAPH_DIV not in plain  # the JSON-only renderer: an exported notebook shows no figure
