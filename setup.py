"""Build script.

The pure-Python package (reference path and Triton kernels) needs nothing
compiled. The compiled kernels of csrc/ are one optional extension module,
``sgopd_kernels._C`` (pybind11, no torch C++ ABI):

- its CPU part is compiled whenever a C++ compiler is there;
- its CUDA part when nvcc is found (``$CUDA_HOME/bin``, ``$PATH``, /usr/local/cuda),
  for sm_90a (Hopper clusters), sm_80 and PTX for newer GPUs; the CUDA runtime is
  linked statically, so the module imports on a machine without a GPU or driver.

Environment:

- ``SGOPD_NO_EXT=1``: compile nothing (the pure-Python package);
- ``SGOPD_NO_CUDA=1``: skip the CUDA part;
- ``SGOPD_FORCE_CUDA=1``: build the CUDA part or fail;
- ``SGOPD_CUDA_ARCHS``: the gencode list, default ``90a;80`` (the last one also as PTX).

A failed optional build prints one line and installs the package without that part.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/kernels.cpp"]
CUDA_SOURCE = "csrc/cuda/kernels.cu"
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
             "-fvisibility=hidden", "-pthread"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _say(msg: str) -> None:
    print(f"sgopd_kernels: {msg}", file=sys.stderr, flush=True)


def _first_error(text: str) -> str:
    """The compiler's first error line (or the message's last line), short."""
    lines = [" ".join(ln.split()) for ln in str(text).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error:" in ln.lower()), lines[-1] if lines else
                "no output")
    return pick if len(pick) <= 160 else pick[:157] + "..."


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def cuda_home(nvcc: str) -> str:
    """The toolkit's root: nvcc's own idea of it (a wrapper script may sit elsewhere)."""
    real = os.path.realpath(nvcc)
    for cand in (os.path.dirname(os.path.dirname(real)), os.environ.get("CUDA_HOME", ""),
                 "/usr/local/cuda"):
        if cand and os.path.isdir(os.path.join(cand, "include")) and \
                os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    try:  # ask nvcc (it prints its TOP directory with --dryrun)
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                             text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return line.split("TOP=", 1)[1].strip()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def gencode_flags() -> list:
    archs = [a.strip() for a in os.environ.get("SGOPD_CUDA_ARCHS", "90a;80").split(";")
             if a.strip()]
    flags, targets = [], []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        targets.append(f"sm_{a}")
    if archs:  # PTX of the last (oldest) arch: other and newer GPUs JIT it
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        targets.append(f"compute_{archs[-1]}")
    return flags + [f"-DSGOPD_CUDA_ARCHS={'__'.join(targets)}"]


class BuildExt(build_ext):
    """Compiles the CUDA part with nvcc beside the C++ sources (concurrently), links both;
    falls back to CPU-only, then to no extension, unless told to fail."""

    def build_extensions(self):
        # drop -g and friends of the Python build (newer setuptools compile and link C++
        # through the *_cxx commands)
        for name in ("compiler_so", "compiler_so_cxx", "linker_so", "linker_so_cxx"):
            if getattr(self.compiler, name, None):
                setattr(self.compiler, name, [f for f in getattr(self.compiler, name)
                                              if f not in ("-g", "-O2", "-Wall", "-DNDEBUG")])
        def run(cmd, env=None, **kw):  # the compiler's output travels in the error (for
            # _first_error) instead of scrolling past
            proc = subprocess.run([os.fspath(c) for c in cmd], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout or f"{cmd[0]} failed ({proc.returncode})")

        # setuptools runs the compiler through .call (newer) or .spawn (older)
        names = [n for n in ("call", "spawn") if hasattr(self.compiler, n)]
        for n in names:
            setattr(self.compiler, n, run)
        try:
            super().build_extensions()
        finally:
            for n in names:
                self.compiler.__dict__.pop(n, None)

    def build_extension(self, ext):
        cuda = not _flag("SGOPD_NO_CUDA") and os.path.exists(os.path.join(ROOT, CUDA_SOURCE))
        nvcc = find_nvcc() if cuda else None
        if _flag("SGOPD_FORCE_CUDA") and not nvcc:
            raise RuntimeError("SGOPD_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if nvcc:
            try:
                self._build(ext, nvcc)
                return
            except Exception as e:  # noqa: BLE001
                if _flag("SGOPD_FORCE_CUDA"):
                    raise
                _say(f"the CUDA kernels were not built ({_first_error(str(e))}); "
                     "building the CPU kernels only")
        try:
            self._build(ext, None)
        except Exception as e:  # noqa: BLE001
            _say(f"the compiled kernels were not built ({_first_error(str(e))}); installing "
                 "the pure-Python package")

    def _build(self, ext, nvcc):
        base = dict(sources=list(ext.sources), macros=list(ext.define_macros),
                    objects=list(ext.extra_objects), link=list(ext.extra_link_args))
        proc = None
        if nvcc:
            home = cuda_home(nvcc)
            tmp = os.path.join(self.build_temp, "cuda")
            os.makedirs(tmp, exist_ok=True)
            obj = os.path.join(tmp, "kernels.o")
            cxx = shutil.which(os.environ.get("CXX", "c++")) or "c++"
            cmd = [nvcc, "-c", os.path.join(ROOT, CUDA_SOURCE), "-o", obj, "-O3", "-std=c++17",
                   "--threads", "2", "-ccbin", cxx, "-Xcompiler", "-fPIC,-fvisibility=hidden",
                   "-I" + os.path.join(ROOT, "csrc"), "-DSGOPD_WITH_CUDA", "-lineinfo",
                   *gencode_flags(), *shlex.split(os.environ.get("SGOPD_NVCC_FLAGS", ""))]
            self.announce(" ".join(cmd), level=2)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            ext.define_macros = base["macros"] + [("SGOPD_WITH_CUDA", "1")]
            ext.extra_objects = base["objects"] + [obj]
            lib = next((d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib"),
                                    os.path.join(home, "targets", "x86_64-linux", "lib"))
                        if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
            if lib is None:
                proc.kill()
                raise RuntimeError(f"error: libcudart_static.a not found under {home}")
            ext.extra_link_args = base["link"] + [f"-L{lib}", "-lcudart_static", "-ldl", "-lrt",
                                                  "-lpthread"]
            ext.include_dirs = list(ext.include_dirs) + [os.path.join(home, "include")]

        compiler = self.compiler
        orig_link = compiler.link_shared_object

        def link(*args, **kw):  # the C++ sources are compiled by now: wait for nvcc
            if proc is not None:
                out, _ = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed: {_first_error(out)}")
            return orig_link(*args, **kw)

        compiler.link_shared_object = link
        try:
            super().build_extension(ext)
        finally:
            compiler.link_shared_object = orig_link
            if proc is not None and proc.poll() is None:
                proc.kill()
            ext.define_macros, ext.extra_objects = base["macros"], base["objects"]
            ext.extra_link_args = base["link"]


def extensions():
    if _flag("SGOPD_NO_EXT"):
        return []
    try:
        import pybind11
    except ImportError:
        _say("pybind11 is not importable: installing the pure-Python package")
        return []
    depends = ["csrc/opd_math.h", "csrc/cpu/kernels.h", "csrc/cuda/kernels.h", CUDA_SOURCE]
    return [Extension("sgopd_kernels._C", sources=CPU_SOURCES, depends=depends,
                      include_dirs=[pybind11.get_include(), os.path.join(ROOT, "csrc")],
                      extra_compile_args=CXX_FLAGS, extra_link_args=["-pthread"],
                      language="c++", optional=True)]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
