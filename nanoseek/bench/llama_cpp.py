"""llama.cpp's own C++ tools (llama-bench, llama-batched-bench, llama-server), built once with CMake from the
llama.cpp inside llama-cpp-python's source package and kept in the cache: the same llama.cpp the Python peer
runs, measured the way a CPU user measures it. Also their commands, and their output read."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from nanoseek.aot import cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the release whose llama.cpp is built when llama-cpp-python is not installed
NATIVE_TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF")  # the server without its web page: no download
BUILD_JOBS = 2


def llama_cpp_python_version():
    """The installed llama-cpp-python's version, else LLAMA_CPP_PYTHON_VERSION."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return LLAMA_CPP_PYTHON_VERSION


def native_cache_dir(version):
    return cache_dir(f"llama.cpp-{version}")


def native_llama_tools(version=None):
    """{tool: path} for llama.cpp's llama-bench, llama-batched-bench and llama-server (CPU, Release), built
    once from llama-cpp-python's source package and kept in the cache; later calls build nothing."""
    version = version or llama_cpp_python_version()
    cache = native_cache_dir(version)
    tools = {name: os.path.join(cache, "bin", name) for name in NATIVE_TOOLS}
    if all(os.access(path, os.X_OK) for path in tools.values()):
        return tools
    check_build_tools()
    print(f"building llama.cpp's {' and '.join(NATIVE_TOOLS)} (llama-cpp-python {version}'s source) into {cache}: "
          f"once, a few minutes on {BUILD_JOBS} cores", flush=True)
    os.makedirs(os.path.join(cache, "bin"), exist_ok=True)
    sdist = llama_cpp_sdist(version, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = cmake_build(unpack_llama_cpp(sdist, tmp), os.path.join(tmp, "build"), os.path.join(cache, "build.log"))
        for name, path in tools.items():
            shutil.copy2(os.path.join(built, name), path + ".part")
            os.replace(path + ".part", path)
    return tools


def check_build_tools():
    """Raise with what to install when cmake, make or a C++ compiler is missing."""
    needed = {"cmake": ("cmake",), "make": ("make",), "a C++ compiler": ("c++", "g++", "clang++")}
    missing = [what for what, names in needed.items() if not any(shutil.which(n) for n in names)]
    if missing:
        raise RuntimeError(f"building llama.cpp's llama-bench needs {' and '.join(missing)}, which this machine "
                           "lacks: install them, e.g. apt-get install cmake make g++")


def llama_cpp_sdist(version, cache):
    """llama-cpp-python's source package from the cache, downloaded there with pip the first time."""
    path = os.path.join(cache, f"llama_cpp_python-{version}.tar.gz")
    if not os.path.exists(path):
        run_tool([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                  "--no-deps", "--quiet", "-d", cache])
    return path


def unpack_llama_cpp(sdist, into):
    """Unpack only the package's vendor/llama.cpp; returns its path."""
    import tarfile

    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        source = f"{members[0].name.split('/')[0]}/vendor/llama.cpp"
        tar.extractall(into, members=[m for m in members if m.name.startswith(source + "/")], filter="data")
    return os.path.join(into, source)


def cmake_build(source, build, log):
    """Configure and build NATIVE_TOOLS, the output going to log; returns the folder the binaries are in."""
    with open(log, "w") as f:
        for step in (["cmake", "-S", source, "-B", build, *CMAKE_OPTIONS],
                     ["cmake", "--build", build, "--target", *NATIVE_TOOLS, "-j", str(BUILD_JOBS)]):
            f.write(f"$ {' '.join(step)}\n")
            f.flush()
            if subprocess.run(step, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"building llama.cpp failed at `{' '.join(step[:3])} ...`: see {log}")
    return os.path.join(build, "bin")


def run_tool(command):
    """The command's standard output; raises with the end of its error output if it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{os.path.basename(command[0])} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def llama_bench_command(tool, gguf, threads, new_tokens, repetitions):
    return [tool, "-m", gguf, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", str(repetitions),
            "-o", "json"]


def batched_bench_command(tool, gguf, threads, batch, prompt_len, new_tokens):
    return [tool, "-m", gguf, "-c", str(batch * (prompt_len + new_tokens)), "-b", "2048", "-ub", "512",
            "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(batch), "-t", str(threads)]


def llama_bench_rate(output):
    """Tokens per second of the generation test in llama-bench's -o json output: its tokens over its time,
    all repetitions together."""
    (test,) = [t for t in json.loads(output) if t["n_gen"] and not t["n_prompt"]]
    return test["n_gen"] * len(test["samples_ns"]) / sum(test["samples_ns"]) * 1e9


def batched_bench_table(output):
    """The rows of llama-batched-bench's results table, each as {column heading: number}."""
    header, rows = None, []
    for line in output.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and set(cells[0]) != {"-"}:
            rows.append(dict(zip(header, map(float, cells))))
    return rows


def batched_bench_output(command, attempts=10):
    """llama-batched-bench's output with its results table. It prints through a logging thread that the
    process does not wait for on exit, so a run now and then ends before its table is printed: such runs
    are run again."""
    for _ in range(attempts):
        output = run_tool(command)
        if batched_bench_table(output):
            return output
    raise RuntimeError(f"llama-batched-bench printed no results table in {attempts} runs")


def batched_bench_rate(outputs):
    """Tokens per second of text generation (S_TG) over llama-batched-bench's outputs: all their rows'
    generated tokens over their generation time."""
    rows = [row for output in outputs for row in batched_bench_table(output)]
    if not rows:
        raise RuntimeError("llama-batched-bench printed no results table")
    tokens = [row["B"] * row["TG"] for row in rows]
    return sum(tokens) / sum(n / row["S_TG t/s"] for n, row in zip(tokens, rows))


