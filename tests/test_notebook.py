"""The Colab notebook runs end to end on CPU and shows the results table and plots inline."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_notebook_executes(tmp_path):
  nbclient = pytest.importorskip("nbclient")
  import nbformat
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "demo.ipynb"), as_version=4)
  for cell in nb.cells:  # a private work directory for this run
    if cell.cell_type == "code":
      cell.source = cell.source.replace('"/tmp/autotraj_notebook"', repr(str(tmp_path / "run")))
  env_flags = os.environ.pop("XLA_FLAGS", None)  # the notebook's run uses the real device count
  try:
    nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  finally:
    if env_flags is not None:
      os.environ["XLA_FLAGS"] = env_flags
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert "| base policy |" in markdown and "AutoTraj RL" in markdown
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3
