"""`import adapterops` is lean: no Triton import, no CUDA initialisation, no kernel compile."""
import subprocess
import sys


def test_import_is_lean():
    code = ("import sys, torch, adapterops\n"
            "assert 'triton' not in sys.modules, 'import adapterops imported triton'\n"
            "assert 'adapterops.kernels' not in sys.modules\n"
            "assert not torch.cuda.is_initialized(), 'import adapterops initialised CUDA'\n"
            "assert not any(m.startswith(('adapterops._C', 'adapterops_C')) for m in sys.modules), "
            "'import adapterops loaded the C++ extension'\n"
            "assert not hasattr(torch.ops.adapterops, 'lowrank_linear_fwd_cuda')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_runs_and_names_backends():
    out = subprocess.run([sys.executable, "-m", "adapterops.info"], check=True, capture_output=True,
                         text=True).stdout
    for piece in ("adapterops", "torch", "triton", "backends, in priority order", "  torch: available",
                  "CUDA C++ extension adapterops._C: ", "  cuda: "):
        assert piece in out, (piece, out)
