"""Every package folder of the source tree is listed in pyproject.toml (a wheel would leave an unlisted one out,
while an editable install hides the omission), and the wheel and the editable install build without a
setuptools warning."""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: ROOT / Path(*package.split(".")) for package in config["packages"]}
    for package, folder in config["package-dir"].items():   # graphopt.passes -> passes/, …
        for name in list(folders):
            if name == package or name.startswith(package + "."):
                folders[name] = ROOT / folder / Path(*name[len(package) + 1:].split(".")) if name != package \
                    else ROOT / folder
    listed = {folder.resolve() for folder in folders.values()}
    on_disk = {init.parent.resolve() for top in ("graphopt", "passes", "kernels") for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk - listed == set(), f"package folders missing from pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert all(folder.is_dir() for folder in folders.values())


def test_public_names_survive_importing_every_submodule() -> None:
    """`graphopt.finetune` (a function) must not be replaced by a submodule of the same name: Python sets
    `graphopt.<module>` on the package when a submodule is imported, silently shadowing a public name."""
    import pkgutil
    import subprocess
    import sys
    import graphopt
    clashing = [m.name for m in pkgutil.iter_modules(graphopt.__path__) if m.name in graphopt.__all__]
    assert clashing == [], f"submodules named like public functions: {clashing}"
    code = ("import importlib, pkgutil, graphopt\n"
            "for m in pkgutil.walk_packages(graphopt.__path__, 'graphopt.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "assert callable(graphopt.finetune) and callable(graphopt.tune) and callable(graphopt.optimize)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _copy_of_the_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".hypothesis", "bench", "tests", "docs"))
    return source


def test_the_editable_install_builds_without_warnings(tmp_path: Path) -> None:
    """`pip install -e .` (what `make demo` runs): the build backend pyproject.toml names, called as pip calls
    it, with every warning shown; setuptools' "Editable installation" notice, which the package-dir mapping
    triggers and pip ≥ 26 prints even under -q, must not appear, nor any other warning. The editable wheel
    maps graphopt.passes and graphopt.kernels onto the copy's folders."""
    source = _copy_of_the_source(tmp_path)
    system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    hook = ("import sys; sys.path[:0] = sys.argv[2].split(','); import importlib; "
            "print(importlib.import_module(sys.argv[3]).build_editable(sys.argv[1]))")
    built = subprocess.run([sys.executable, "-W", "always", "-c", hook, str(tmp_path / "wheel"),
                            ",".join(system.get("backend-path", [])), system["build-backend"]],
                           capture_output=True, text=True, cwd=source)
    assert built.returncode == 0, built.stderr
    output = built.stdout + built.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower() or "Editable installation" in line]
    assert warnings == [], "\n".join(warnings)
    wheel = tmp_path / "wheel" / built.stdout.split()[-1]
    finder = next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("_finder.py"))
    mapping = zipfile.ZipFile(wheel).read(finder).decode()
    assert str(source / "passes") in mapping and str(source / "kernels") in mapping


def test_the_wheel_builds_without_warnings_and_holds_every_package(tmp_path: Path) -> None:
    """`pip install .` as a user runs it: no setuptools warning, and the wheel has every package (the mapped
    passes/ and kernels/ included) and the bundled weights. Built from a copy, so the tree gets no build/."""
    source = _copy_of_the_source(tmp_path)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                            "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    warnings = [line for line in (built.stdout + built.stderr).splitlines()
                if "warning" in line.lower() and "running pip as the 'root' user" not in line.lower()]
    assert warnings == [], "\n".join(warnings)
    (wheel,) = (tmp_path / "wheel").glob("graphopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    missing = [p for p in packages if p.replace(".", "/") + "/__init__.py" not in names]
    assert missing == [], f"packages missing from the wheel: {missing}"
    assert "graphopt/data/digits_resnet.pt" in names
    assert "graphopt/passes/fusion/batchnorm.py" in names and "graphopt/kernels/ops.py" in names
