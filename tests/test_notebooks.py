"""Execute the notebooks end to end on tiny sizes, so they never rot.

Design decisions:
- Each notebook runs in a fresh kernel of THIS interpreter: the test writes its own
  kernel spec (argv = sys.executable) into a temporary directory and hands nbclient
  a kernel manager that reads only that directory. Nothing is registered globally,
  and the venv's own `python3` spec (argv "python", resolved through PATH) is never
  used, so a non-activated venv in CI still runs the right Python.
- The kernel gets ENTRL_NOTEBOOK_TINY=1 (every size in the notebooks shrinks),
  JAX_PLATFORMS=cpu, one CPU device (not the 8 fake devices of conftest), and the
  test suite's persistent compile cache: the three notebooks compile the same
  shapes, so only the first one pays for most compiles.
- The notebooks share one working directory and run in file order. The quickstart
  lays its SENT and GRPO runs out like `entrl ablate demo` (with `result.json`),
  so the ablation notebook's `run_ablation` call, pointed at them through
  ENTRL_NOTEBOOK_ABLATE_OUT, finds every run done and trains nothing. Run alone
  (no quickstart output), it trains its own tiny runs.
- Committed notebooks must carry no outputs (they would come from another machine).
- Every notebook opens with an Open-in-Colab badge pointing at itself and the same install cell. Its helpers
  are run outside `__main__` (so nothing is installed): a clone of the repository is found from the
  notebooks directory, and on CPU no accelerator extra is asked of pip. The device decisions of the
  accelerator path are tested with faked devices in test_colab.py.
- The tiny run takes the CPU demo path only; the quickstart's accelerator path (a
  real model from the hub) cannot run here, so every entrl name the notebooks
  import or reach through a module (`demo.QUICK`) is checked to exist, which
  catches an API move in the code the tiny run skips.
"""

import ast
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart.ipynb", "semantic_entropy.ipynb", "ablation_analysis.ipynb"]
KERNEL = "entrl-notebook-test"
CELL_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def jupyter_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "entrl notebook test", "language": "python"}))
    return root


def _kernel_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(ENTRL_NOTEBOOK_TINY="1", JAX_PLATFORMS="cpu", MPLBACKEND="module://matplotlib_inline.backend_inline",
               PYTHONWARNINGS="ignore::DeprecationWarning")
    cache = jax.config.jax_compilation_cache_dir  # set by conftest
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(jax.config.jax_persistent_cache_min_compile_time_secs)
    env.update(extra)
    return env


def run_notebook(name: str, workdir: Path, jupyter_dir: Path, **env) -> list[str]:
    """Execute `name` in `workdir`; returns the text outputs of every cell (raises on a failing cell)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        # Connection files and IPython's profile in the temp dir: HOME may be read-only in CI.
        mp.setenv("JUPYTER_RUNTIME_DIR", str(jupyter_dir / "runtime"))
        mp.setenv("IPYTHONDIR", str(jupyter_dir / "ipython"))
        km = AsyncKernelManager(kernel_name=KERNEL,
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(jupyter_dir / "kernels")]))
        client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(workdir)}})
        client.execute(env=_kernel_env(env))
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") or "".join(str(v) for v in out.get("data", {}).values()))
    return texts


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), f"{name}: strip the outputs"
    assert "ENTRL_NOTEBOOK_TINY" in "".join(c.source for c in code)


def _install_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code").source


@pytest.mark.parametrize("name", NAMES)
def test_colab_badge_and_install_source(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    intro = next(c for c in nb.cells if c.cell_type == "markdown").source
    assert re.search(r"\(https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/notebooks/"
                     + re.escape(name) + r"\)", intro), f"{name}: no Open-in-Colab badge pointing at itself"
    install = _install_cell(name)
    assert install == _install_cell(NAMES[0]), "the notebooks' install cells differ"
    assert "ENTRL_SOURCE" in install and "/dev/accel" not in install and "COLAB_TPU_ADDR" not in install
    ns = {"__name__": "install_cell_under_test"}  # defines the helpers; installs nothing outside __main__
    exec(compile(install, name, "exec"), ns)
    assert ns["entrl_checkout"](NOTEBOOKS) == NOTEBOOKS.parent  # inside a clone: the clone is installed
    assert ns["entrl_checkout"](tmp_path) is None


def test_install_cell_keeps_the_backend_jax_sees():
    ns = {"__name__": "install_cell_under_test"}
    exec(compile(_install_cell(NAMES[0]), NAMES[0], "exec"), ns)
    assert ns["jax_requirement"]() is None  # CPU here: no accelerator extra for pip


def _is_module(path: str) -> bool:
    try:
        return importlib.util.find_spec(path) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _entrl_names(source: str):
    """(module, name) of every `from entrl... import name` and every `<entrl module alias>.name`."""
    tree = ast.parse(source)
    modules = {}  # local alias -> module path, for aliases that are entrl modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "entrl":
            for alias in node.names:
                yield node.module, alias.name
                if _is_module(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "entrl":
                    modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            yield modules[node.value.id], node.attr


@pytest.mark.parametrize("name", NAMES)
def test_entrl_names_exist(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    missing = []
    for module, attr in sorted(set(_entrl_names(source))):
        mod = importlib.import_module(module)
        if not hasattr(mod, attr) and not _is_module(f"{module}.{attr}"):
            missing.append(f"{module}.{attr}")
    assert not missing, f"{name} uses names entrl no longer has: {missing}"


def test_quickstart(workdir, jupyter_dir):
    texts = run_notebook("quickstart.ipynb", workdir, jupyter_dir)
    out = workdir / "quickstart_out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "demo" and set(summary["results"]) == {"before RL", "sent", "grpo"}
    curve = summary["pass@k_curve"]
    for label, res in summary["results"].items():  # the curve (from the correctness matrix) ends at the table's
        at = dict(zip(curve["k"], curve[label]))
        assert at[1] == pytest.approx(res["pass@1"]) and at[summary["k"]] == pytest.approx(res[f"pass@{summary['k']}"])
    for loss in ("sent", "grpo"):
        run = out / "seed0" / loss
        assert (run / "metrics.jsonl").exists() and json.loads((run / "result.json").read_text())["loss"] == loss
    assert (out / "curves.png").exists()
    assert any("quickstart done" in t for t in texts)


def test_semantic_entropy(workdir, jupyter_dir):
    texts = run_notebook("semantic_entropy.ipynb", workdir, jupyter_dir)
    out = workdir / "semantic_entropy_out"
    result = json.loads((out / "curriculum.json").read_text())
    assert sum(stage["size"] for stage in result["stages"]) == result["prompts"]
    assert len(result["examples"]) == 6 and (out / "se_hist.png").exists()
    assert any("semantic entropy done" in t for t in texts)


def test_ablation_analysis(workdir, jupyter_dir):
    quickstart = workdir / "quickstart_out"
    done = all((quickstart / "seed0" / loss / "result.json").exists() for loss in ("sent", "grpo"))
    env = {"ENTRL_NOTEBOOK_ABLATE_OUT": str(quickstart)} if done else {}
    texts = run_notebook("ablation_analysis.ipynb", workdir, jupyter_dir, **env)
    table = (workdir / "ablation_out" / "ablation.md").read_text()
    assert "| sent" in table and "| grpo" in table
    assert (workdir / "ablation_out" / "plots" / "entropy.png").exists()
    assert any("ablation analysis done: 2 runs" in t for t in texts)
