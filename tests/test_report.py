"""``dmipro report``: a real run on the simulated LM, then its figure, HTML and JSON."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmipro.errors import ConfigError
from dmipro.jobs import JobStore

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "examples" / "math_qa" / "job.yaml"
BEST_LINE = (0xC4, 0x4E, 0x52)  # dmipro's pick, best so far
IMPORTANCE_BAR = (0x81, 0x72, 0xB3)
SEARCH_PHASE = (0x55, 0xA8, 0x68)


def _cli(*args: str, home: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMIPRO_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dmipro.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _pixels(png: bytes) -> tuple[tuple[int, int], dict[tuple[int, int, int], int]]:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20) or []
    return image.size, {rgb: n for n, rgb in colors}


def _near(counts: dict[tuple[int, int, int], int], rgb: tuple[int, int, int], tol: int = 6) -> int:
    return sum(n for c, n in counts.items() if all(abs(a - b) <= tol for a, b in zip(c, rgb, strict=True)))


@pytest.fixture(scope="module")
def demo_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two real optimizations of the demo job (seeds 9 and 4) in one job database."""
    home = tmp_path_factory.mktemp("report-home")
    ids = []
    for seed in (9, 4):
        job = tmp_path_factory.mktemp("job") / "job.yaml"
        shutil.copytree(DEMO_JOB.parent / "data", job.parent / "data")  # datasets stay in a job's directory
        job.write_text(re.sub(r"seed: \d+", f"seed: {seed}", DEMO_JOB.read_text()))
        run = _cli("optimize", str(job), "--json", home=home)
        assert run.returncode == 0, run.stderr
        ids.append(json.loads(run.stdout)["job_id"])
    return home, ids


@pytest.mark.slow
def test_report_png_of_the_demo_job_is_a_full_figure(
    demo_jobs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    home, (job, _) = demo_jobs
    out = tmp_path / "report.png"
    run = _cli("report", job, "--out", str(out), home=home)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""  # the path is a message for the person, on stderr
    assert str(out) in run.stderr
    size, counts = _pixels(out.read_bytes())
    assert size == (1430, 1012)  # 13 × 9.2 inches at 110 dpi: the four panels
    assert len(counts) > 200  # text, markers and bars, not a blank canvas
    assert counts.get((255, 255, 255), 0) < 0.9 * size[0] * size[1]
    # Each panel drew what it is for: the best-so-far line, importance bars, phase shares.
    assert _near(counts, BEST_LINE) > 500
    assert _near(counts, IMPORTANCE_BAR) > 2000
    assert _near(counts, SEARCH_PHASE) > 5000


@pytest.mark.slow
def test_report_html_is_one_self_contained_file(demo_jobs: tuple[Path, list[str]], tmp_path: Path) -> None:
    home, ids = demo_jobs
    out = tmp_path / "compare.html"
    run = _cli("report", *ids, "--out", str(out), home=home)
    assert run.returncode == 0, run.stderr
    page = out.read_text()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1
    size, counts = _pixels(base64.b64decode(images[0]))
    assert size == (2420, 1100) and len(counts) > 200  # two rows of four panels, side by side
    # Nothing is fetched: no external resource of any kind.
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    record = JobStore(f"sqlite:///{home}/dmipro.db").get(ids[0])
    assert record.result is not None
    assert f"<td>{record.result['best_score']}</td>" in page
    for job in ids:
        assert f"<h2>{job}</h2>" in page
    assert "predict.instruction" in page and "fANOVA, seed 0" in page


@pytest.mark.slow
def test_report_json_is_the_numbers_behind_the_figure(
    demo_jobs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    home, (job, _) = demo_jobs
    run = _cli("report", job, "--json", home=home, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)  # exactly one JSON document on stdout
    assert doc["out"] is None and list(tmp_path.iterdir()) == []  # --json alone draws nothing
    (data,) = doc["jobs"]
    result = JobStore(f"sqlite:///{home}/dmipro.db").get(job).result
    assert result is not None
    assert data["best_score"] == result["best_score"] == data["best_so_far"][-1]["score"]
    assert data["baseline_score"] == result["baseline_score"]
    assert data["total"]["lm_calls"] == result["lm_calls"] and data["total"]["tokens"] == result["tokens"]
    assert set(data["phases"]) == {"bootstrap", "propose", "search"}
    assert len(data["trials"]) == len(result["trial_logs"])
    scores = {str(t["trial"]): t["score"] for t in data["trials"]}
    assert scores == {k: v["score"] for k, v in result["trial_logs"].items()}
    imp = data["importance"]
    assert imp["note"] is None and set(imp["params"]) == {"predict: instruction", "predict: demo set"}
    assert abs(sum(imp["params"].values()) - 1.0) < 1e-3
    # Seeded: the same study gives the same importances.
    again = json.loads(_cli("report", job, "--json", home=home, cwd=tmp_path).stdout)
    assert again["jobs"][0]["importance"] == imp


def test_a_small_or_unstarted_job_gets_notes_not_a_crash(tmp_path: Path) -> None:
    import dmipro
    from dmipro.report import collect, report
    from tests.teleprompt.conftest import small_spec

    result = dmipro.optimize(small_spec(num_trials=3, val=20, minibatch_size=5))
    data = collect(result.job_id)
    assert data["importance"]["params"] == {} and "too few" in data["importance"]["note"]
    assert data["choices"]  # the mean score per choice is still there
    queued = JobStore().create(
        name="later", spec={"program": "x:y", "lm": {"model": "sim/math"}}, executor="thread"
    )
    out = tmp_path / "r.png"
    doc = report([result.job_id, queued.id], out=out)
    assert doc["jobs"][1]["trials"] == [] and doc["jobs"][1]["phases"] == {}
    assert out.read_bytes().startswith(b"\x89PNG")


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import dmipro
    from dmipro.report import report
    from tests.teleprompt.conftest import small_spec

    job = dmipro.optimize(small_spec(num_trials=2, val=10, minibatch_size=5)).job_id
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"dmipro\[bench\]"):
        report([job], out=tmp_path / "out" / "r.png")
    assert not (tmp_path / "out").exists()  # nothing half-written
