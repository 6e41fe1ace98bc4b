"""Result files are written from a committed tree: a dirty checkout is refused unless `--allow-dirty`, which records
the diff in the file; the file is replaced atomically; and every benchmark and study that writes one goes through
that gate."""

import ast
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from calibrated_cache.testbed import results
from calibrated_cache.testbed.results import Tree, committed, read_tree, write_result

ROOT = Path(__file__).resolve().parents[1]
WRITERS = sorted([*(ROOT / "studies").glob("*.py"), *(ROOT / "benchmarks").rglob("*.py"), ROOT / "cli.py"])
TESTBED_STUDIES = ["fit_samples.py", "goc_study.py", "plan_oracle.py", "plan_study.py", "plan_variants.py",
                   "spans_study.py"]  # the ones that import without ComfyUI


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "study.py").write_text("RATE = 1\n")
    git(repo, "add", "study.py")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def test_a_clean_tree_is_accepted_and_named_by_its_commit(repo, tmp_path):
    (repo / "notes.txt").write_text("untracked files are not the measured code\n")
    tree = committed(allow_dirty=False, root=repo)
    assert tree == Tree(git(repo, "rev-parse", "--short", "HEAD").strip()) and not tree.dirty
    report = json.loads(write_result(tmp_path / "r.json", {"rows": [1]}, tree).read_text())
    assert report == {"rows": [1], "commit": tree.commit, "dirty": False}


def test_a_tree_with_uncommitted_changes_is_refused_naming_allow_dirty(repo):
    (repo / "study.py").write_text("RATE = 2\n")
    with pytest.raises(SystemExit) as refused:
        committed(allow_dirty=False, root=repo)
    assert "--allow-dirty" in str(refused.value) and "study.py" in str(refused.value)
    git(repo, "add", "study.py")  # staged but not committed is just as dirty
    with pytest.raises(SystemExit):
        committed(allow_dirty=False, root=repo)


def test_changed_result_files_alone_leave_the_tree_clean_so_one_study_can_read_anothers_results(repo):
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "plans.json").write_text("{}\n")
    git(repo, "add", "benchmarks")
    git(repo, "commit", "-q", "-m", "results")
    (results / "plans.json").write_text('{"rows": [1]}\n')
    assert not committed(allow_dirty=False, root=repo).dirty
    (repo / "study.py").write_text("RATE = 2\n")
    with pytest.raises(SystemExit, match="study.py"):
        committed(allow_dirty=False, root=repo)


def test_allow_dirty_writes_the_file_with_the_diff_it_was_measured_with(repo, tmp_path):
    (repo / "study.py").write_text("RATE = 2\n")
    tree = committed(allow_dirty=True, root=repo)
    report = json.loads(write_result(tmp_path / "r.json", {"rows": []}, tree).read_text())
    assert report["dirty"] is True and report["commit"] == git(repo, "rev-parse", "--short", "HEAD").strip()
    assert "-RATE = 1\n+RATE = 2\n" in report["uncommitted_diff"]
    assert report["uncommitted_diff"] == git(repo, "diff", "HEAD")


def test_outside_a_git_checkout_nothing_is_refused_and_no_commit_is_claimed(tmp_path):
    tree = committed(allow_dirty=False, root=tmp_path)
    assert tree == Tree(None)
    assert json.loads(write_result(tmp_path / "r.json", {}, tree).read_text()) == {"commit": None, "dirty": None}


def test_a_copy_inside_another_repository_claims_none_of_its_commits(repo):
    inside = repo / "custom_nodes" / "pack"
    inside.mkdir(parents=True)
    (repo / "study.py").write_text("RATE = 2\n")  # the enclosing checkout is dirty, which is not the pack's state
    assert committed(allow_dirty=False, root=inside) == Tree(None)


def test_an_interrupted_write_leaves_the_previous_file_whole_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_result(path, {"rows": [1]}, Tree("abc1234"))
    before = path.read_text()
    real = Path.write_text

    def half_then_interrupt(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_result(path, {"rows": list(range(100))}, Tree("abc1234"))
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("script", [w for w in WRITERS if 'add_argument("--json"' in w.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_that_writes_a_result_file_goes_through_the_gate(script):
    source = script.read_text()
    calls = {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
             for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and isinstance(node.func, (ast.Name, ast.Attribute))}
    assert {"committed", "write_result"} <= calls, f"{script.name} writes --json without the gate"
    assert "add_allow_dirty" in calls or 'add_argument("--allow-dirty"' in source, f"{script.name} has no --allow-dirty"
    assert "json.dumps(" not in source.replace("print(json.dumps(", "") and "json.dump(" not in source, \
        f"{script.name} writes JSON around write_result"


def dirty_checkout(monkeypatch):
    monkeypatch.setattr(results, "read_tree", lambda root=results.ROOT: Tree("abc1234", "diff --git a/x b/x\n"))
    monkeypatch.setattr(results, "_git", lambda root, *args: " M calibration/plan.py\n")


def test_the_bench_command_refuses_a_dirty_tree_before_measuring_anything(monkeypatch, tmp_path):
    from calibrated_cache import cli

    dirty_checkout(monkeypatch)
    monkeypatch.setattr("calibrated_cache.testbed.bench.run_benchmark",
                        lambda *a: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit, match="--allow-dirty"):
        cli.main(["bench", "--json", str(tmp_path / "bench.json")])
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("name", TESTBED_STUDIES)
def test_each_testbed_study_refuses_a_dirty_tree_before_loading_its_model(name, monkeypatch, tmp_path):
    dirty_checkout(monkeypatch)
    monkeypatch.setattr("calibrated_cache.testbed.weights.load_dit", lambda: pytest.fail("loaded before refusing"))
    monkeypatch.syspath_prepend(str(ROOT / "studies"))  # goc_study imports error_share beside it
    monkeypatch.setattr(sys, "argv", [name, "--json", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match="--allow-dirty"):
        runpy.run_path(str(ROOT / "studies" / name), run_name="__main__")
    assert not (tmp_path / "out.json").exists()


def test_the_packages_own_checkout_is_read(monkeypatch):
    """provenance() and the gate look at the pack's checkout, wherever the command is run from."""
    monkeypatch.chdir("/")
    assert read_tree().commit == (git(ROOT, "rev-parse", "--short", "HEAD").strip() if (ROOT / ".git").exists()
                                  else None)
