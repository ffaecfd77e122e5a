"""CI's check of csrc/ on a machine without a GPU (`make csrc-check`, part of `make test`):
compile and link adapterops._C against a CUDA build of torch for every arch in
TORCH_CUDA_ARCH_LIST (setup.py's default: sm_80 and sm_90, plus sm_90 PTX), then prove what was
built:

1. the shared library holds a cubin for each arch, and PTX where the list asks for it
   (cuobjdump --list-elf / --list-ptx);
2. it imports as the Python module adapterops._C (no GPU needed), a CUDA build with its
   kernel-image probe, and every op it registers has the schema of the Python custom op it
   mirrors (adapterops/ops/*.py, less the `backend` argument).

Run it with the Python of a CUDA build of torch (the Makefile's .venv-cuda): `python
tests/csrc_build_check.py`. The CUDA toolkit is the one `nvcc` on PATH runs from (CUDA_HOME
overrides); the cuBLAS headers and libraries come from the torch wheel's nvidia-* packages, as
`../shared/facts.md` describes. Exits non-zero, saying why, on any failure.
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SETTINGS = ROOT / "adapterops" / "backends" / "cuda" / "build.py"
BUILD_LIB = ROOT / "build" / "csrc-check"
BUILD_TEMP = ROOT / "build" / "csrc-temp"
# Each C++ op and the Python custom op it mirrors.
MIRRORS = {
    "lowrank_linear_fwd_cuda": "lowrank_linear_fwd",
    "lowrank_linear_bwd_cuda": "lowrank_linear_bwd",
    "routed_lowrank_linear_fwd_cuda": "routed_lowrank_linear_fwd",
    "routed_lowrank_linear_bwd_cuda": "routed_lowrank_linear_bwd",
    "hdpissa_linear_fwd_cuda": "hdpissa_linear_fwd",
    "hdpissa_linear_bwd_cuda": "hdpissa_linear_bwd",
    "lowrank_update_cuda_": "lowrank_update_",
}


def fail(message: str) -> None:
    print(f"csrc check FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def _load_file(name: str, path: Path):
    """A module from its file (an extension module too), without importing its package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_home() -> str:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    # The `nvcc` on PATH may be a wrapper script; its dry run names the real install.
    dry_run = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
    match = re.search(r"TOP=(\S+)", dry_run.stdout + dry_run.stderr)
    if match is None:
        fail(f"cannot find the CUDA install from `nvcc --dryrun`:\n{dry_run.stderr[-2000:]}")
    return str(Path(match.group(1)).resolve())


def build_environment() -> dict:
    import torch
    if torch.version.cuda is None:
        fail(f"{sys.executable} has torch {torch.__version__}, a CPU build; run this with a "
             "CUDA build of torch (make csrc-check does)")
    # The archs CI must prove (setup.py's default), a compile error an error, no skipping.
    env = dict(os.environ, CUDA_HOME=cuda_home(), ADAPTEROPS_REQUIRE_CUDA="1",
               TORCH_CUDA_ARCH_LIST=_load_file("build_settings", BUILD_SETTINGS).DEFAULT_ARCHS)
    env.pop("ADAPTEROPS_SKIP_CUDA", None)
    env.setdefault("MAX_JOBS", "2")
    nvidia = [Path(p) for p in glob.glob(str(Path(torch.__file__).parents[1] / "nvidia" / "*"))]
    for variable, sub in (("CPATH", "include"), ("LIBRARY_PATH", "lib")):
        paths = [str(p / sub) for p in nvidia if (p / sub).is_dir()]
        env[variable] = os.pathsep.join(paths + [env[variable]] if env.get(variable) else paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def built_library() -> Path:
    found = sorted((BUILD_LIB / "adapterops").glob("_C*.so"))
    if len(found) != 1:
        fail(f"expected one adapterops/_C*.so under {BUILD_LIB}, found {found}")
    return found[0]


def check_archs(library: Path, arch_list: str) -> list[str]:
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    def listing(kind: str) -> str:
        return subprocess.run([str(cuobjdump), f"--list-{kind}", str(library)],
                              capture_output=True, text=True, check=True).stdout

    entries = [a for a in re.split(r"[;\s]+", arch_list) if a]
    archs = [f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in entries]
    ptx = [f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in entries if a.endswith("+PTX")]
    cubins, ptxs = listing("elf"), listing("ptx") if ptx else ""
    missing = [a for a in archs if f".{a}.cubin" not in cubins]
    missing += [f"{a} PTX" for a in ptx if f".{a}.ptx" not in ptxs]
    if missing:
        fail(f"{library.name} lacks {missing}:\n{cubins}{ptxs}")
    return archs + [f"{a} PTX" for a in ptx]


def check_schemas(library: Path) -> None:
    """Run in a fresh interpreter (`--schemas`): load the library, import the Python ops, compare."""
    import torch
    extension = _load_file("adapterops._C", library)
    if extension.with_cuda is not True or not callable(getattr(extension, "kernel_image_problem", None)):
        fail(f"{library.name} imported but is not a CUDA build with its kernel-image probe")
    sys.path.insert(0, str(ROOT))
    import adapterops.ops  # noqa: F401  (registers the Python custom ops)

    def signature(schema, drop_backend: bool):
        args = [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write))
                for a in schema.arguments if not (drop_backend and a.name == "backend")]
        return args, [str(r.type) for r in schema.returns]

    for cxx_name, python_name in MIRRORS.items():
        cxx = getattr(torch.ops.adapterops, cxx_name).default._schema
        python = getattr(torch.ops.adapterops, python_name).default._schema
        if signature(cxx, False) != signature(python, True):
            fail(f"adapterops::{cxx_name} does not mirror adapterops::{python_name}:\n"
                 f"  C++:    {cxx}\n  Python: {python}")
        print(f"  {cxx}")


def main() -> None:
    if sys.argv[1:] == ["--schemas"]:
        check_schemas(built_library())
        return
    env = build_environment()
    for old in (BUILD_LIB / "adapterops").glob("_C*.so"):  # only this run's library counts
        old.unlink()
    start = time.monotonic()
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib",
                            str(BUILD_LIB), "--build-temp", str(BUILD_TEMP)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    if built.returncode != 0:
        fail(f"setup.py build_ext exited {built.returncode}:\n{built.stdout[-6000:]}\n{built.stderr[-6000:]}")
    seconds = time.monotonic() - start
    # Compiler warnings in our own sources are printed (torch's headers' are not ours to fix).
    ours = sorted({line for line in (built.stdout + built.stderr).splitlines()
                   if "warning" in line.lower() and str(ROOT / "csrc") in line})
    for line in ours:
        print(f"csrc warning: {line}")
    library = built_library()
    archs = check_archs(library, env["TORCH_CUDA_ARCH_LIST"])
    print(f"csrc check: {library.relative_to(ROOT)} compiled and linked in {seconds:.0f} s "
          f"(MAX_JOBS={env['MAX_JOBS']}) for {', '.join(archs)}; its ops:")
    subprocess.run([sys.executable, __file__, "--schemas"], cwd=ROOT, check=True)
    print("csrc check passed")


if __name__ == "__main__":
    main()
