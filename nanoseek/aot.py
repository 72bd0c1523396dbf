"""A step compiled ahead of time: torch.export, then AOTInductor, for an engine of one sequence on a CPU.

At one sequence torch.compile's own runtime is a large part of a decode step on a CPU (docs/BENCHMARKS.md,
"steps compiled ahead of time"): dynamo's guards over every weight and input, the wrappers passing every
tensor. A package compiled by AOTInductor holds the graph as a shared library that takes
only the step's inputs: no guard runs, and the weights are bound once, by reference, from the model, so
nothing is copied and weights changed in place are decoded with (weights replaced by new tensors are not:
make a new engine). The package depends on the code, the model's shape and the thread count, not on its
weights, so it is kept on disk and compiled once (a later process loads it in a fraction of the compile
time); compiling one deletes those of other nanoseek source.

A step is fn(model, *tensors, *caches): tensors have fixed shapes; caches are lists or tuples of tensors
(one per layer) whose dimension 1, the cache length, is one dynamic size for all of them.
"""

import glob
import hashlib
import os
import tempfile
import warnings

import torch

import nanoseek

# the weights stay the model's (bound at load, not packaged); matrix products with one row become fused
# multiply-and-sum loops instead of calls to a BLAS (faster at one row: docs/BENCHMARKS.md)
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False,
                    "post_grad_fusion_options": {"decompose_mm_pass": {}}}


class AotStep:
    """fn compiled at its first call for those inputs' shapes (or loaded from the disk); later calls run the
    package. fn returns a tuple of tensors. The package is called with the inputs flattened here, not through
    AOTICompiledModel.__call__, which parses the call's input and output specs again at every call (~40 us)."""

    def __init__(self, fn, model, fallback):
        """fallback(model, *args): what runs instead where fn cannot be exported or compiled ahead of time (a
        warning says why), e.g. fn under torch.compile."""
        self.fn, self.model, self.fallback = fn, model, fallback
        self.run = None
        self.weights = {}  # the tensors bound to the package, kept alive while it reads them

    def __call__(self, model, *args):
        if model is not self.model:
            raise ValueError("an AotStep runs the model it was compiled for")
        if self.run is None:
            self.run = self.load(args)
        return self.run(model, *args)

    def load(self, args):
        """A function running the package for inputs like args, or the fallback where there is none."""
        try:
            loader = self.package(args).loader
        except Exception as e:  # an op export cannot trace, no C++ compiler, a package that does not load
            warnings.warn(f"{self.fn.__name__} could not be compiled ahead of time ({type(e).__name__}: {e}); "
                          "it runs under torch.compile instead", stacklevel=3)
            return self.fallback
        return lambda model, *args: tuple(loader.boxed_run(_flat(args)))

    def package(self, args):
        """The loaded package, compiled first if the disk holds none, its constants bound to the weights."""
        wrapper = _Bound(self.fn, self.model)
        source = source_key()
        path = os.path.join(cache_dir(), f"{self.fn.__name__}-{source}-{self.key(args)}.pt2")
        if not os.path.exists(path):
            length = torch.export.Dim("cache_length", min=2, max=self.model.config.max_position_embeddings)
            dynamic = tuple(_cache_dims(a, length) if isinstance(a, (list, tuple)) else None for a in args)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp, warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecations, not the user's
                program = torch.export.export(wrapper, args, dynamic_shapes=(dynamic,))  # forward(*args)
                built = torch._inductor.aoti_compile_and_package(
                    program, package_path=os.path.join(tmp, "step.pt2"), inductor_configs=INDUCTOR_CONFIGS)
                os.replace(built, path)  # written whole, then renamed
            prune(source)
        runner = torch._inductor.aoti_load_package(path)
        named = dict(wrapper.named_parameters(remove_duplicate=False))
        named.update(wrapper.named_buffers(remove_duplicate=False))
        self.weights = {name: named[name] for name in runner.get_constant_fqns()}
        runner.load_constants(self.weights, check_full_update=True, user_managed=True)
        return runner

    def key(self, args):
        """What the package depends on besides nanoseek's code (source_key): torch's version, the model's
        config, the dtypes and the fixed shapes of the inputs, and the threads its kernels were compiled for."""
        h = hashlib.sha256()
        shapes = [_signature(a) for a in args]
        params = sorted({str(p.dtype) for p in self.model.parameters()})
        for part in (torch.__version__, repr(self.model.config), shapes, params, torch.get_num_threads()):
            h.update(repr(part).encode())
        return h.hexdigest()[:20]


def source_key():
    """A hash of nanoseek's source: a package compiled from other code is never loaded."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(os.path.dirname(nanoseek.__file__), "*.py"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def prune(source):
    """Delete the packages compiled from other nanoseek source than `source` (an older version's, ~2 MB each)."""
    for path in glob.glob(os.path.join(cache_dir(), "*.pt2")):
        if os.path.basename(path).split("-")[1:2] != [source]:
            try:
                os.remove(path)
            except OSError:  # another process removed it first
                pass


class _Bound(torch.nn.Module):
    """fn with its model as a submodule: what torch.export traces (the model's weights become the package's
    constants, named model.<its parameter names>)."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *args):
        return self.fn(self.model, *args)


def _flat(args):
    """The tensors of args, caches (lists or tuples, nested) in order."""
    flat = []
    for a in args:
        if isinstance(a, (list, tuple)):
            flat.extend(_flat(a))
        else:
            flat.append(a)
    return flat


def _cache_dims(caches, length):
    """export's dynamic shapes for lists of caches: dimension 1 of each tensor is the cache length."""
    if isinstance(caches, (list, tuple)):
        return type(caches)(_cache_dims(c, length) for c in caches)
    return {1: length}


def _signature(arg, cache=False):
    """An input's dtype and shape; a cache's (a tensor in a list or tuple) without its length."""
    if isinstance(arg, (list, tuple)):
        return [_signature(a, cache=True) for a in arg]
    return str(arg.dtype), tuple(arg.shape[:1]) + tuple(arg.shape[2:]) if cache else tuple(arg.shape)


def cache_dir(name="aot"):
    """A folder of nanoseek's in the user's cache (XDG_CACHE_HOME, else ~/.cache): the packages by default."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nanoseek", name)
