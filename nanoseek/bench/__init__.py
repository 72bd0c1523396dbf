"""Side-by-side benchmarks against the projects people use today, behind `nanoseek bench`; each prints a ratio
last. One module a benchmark (train, decode, speculation, grpo, data, serve), llama_cpp.py for llama.cpp's own
tools (built once from llama-cpp-python's source) and common.py for what they share. The package may import
anything of nanoseek below the CLI; nothing of nanoseek imports it but the CLI (and benchmarks/ scripts)."""
