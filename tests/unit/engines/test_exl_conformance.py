"""Conformance of the exllama engines with the installed exllamav2 / exllamav3 sources.

Neither library can be imported without CUDA (both compile an extension at import),
so these tests read their sources with ``ast`` instead:

1. every name the engines declare using (``EXLLAMAV2_API`` / ``EXLLAMAV3_API``:
   classes, methods with the keyword arguments we pass, attributes, module names)
   exists in the installed source exactly as used — a rename upstream fails here;
2. the engine modules use no library name, keyword or attribute outside those
   declarations, so the declarations cannot drift from the code;
3. the result-dict keys and finish reasons we read are the ones the generators emit,
   and every sampler setting the libraries have is set explicitly by us;
4. the installed versions are the pinned ones;
5. negative controls: the checker fails on a copy of the sources with one name
   renamed, and on an engine source using an undeclared keyword.

The packages are installed for CI with (pure-Python wheels, never imported):
    pip install --no-deps exllamav2==0.3.2 exllamav3==1.6.5
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import shutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

from exgen.daemon.engines import exl2, exl3
from exgen.daemon.engines.base import SamplingParams
from exgen.daemon.engines.exl_common import (
    LENGTH_REASONS,
    STOP_REASONS,
    ApiUse,
    ExlOptions,
    JobSpec,
)
from exgen.daemon.engines.grammar import SchemaMatcher

INSTALL_LINE = "pip install --no-deps exllamav2==0.3.2 exllamav3==1.6.5"
PINS = {"exllamav2": exl2.EXLLAMAV2_VERSION, "exllamav3": exl3.EXLLAMAV3_VERSION}
TABLES = {"exllamav2": exl2.EXLLAMAV2_API, "exllamav3": exl3.EXLLAMAV3_API}
ENGINE_SOURCES = {"exllamav2": Path(exl2.__file__), "exllamav3": Path(exl3.__file__)}


# --- reading a package's source without importing it ---------------------------------


def installed_root(dist: str) -> Path:
    """The directory that holds the package (site-packages), found from the installed
    distribution's metadata: nothing of the package is executed."""
    try:
        package = Path(str(importlib.metadata.distribution(dist).locate_file(dist)))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed; install it for these tests with: {INSTALL_LINE}")
    assert (package / "__init__.py").is_file(), f"{package} is not a package"
    return package.parent


class SourceTree:
    """Modules, classes and functions of packages under ``root``, parsed, never run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._modules: dict[str, ast.Module] = {}

    def module_file(self, dotted: str) -> Path | None:
        base = self.root / Path(*dotted.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._modules:
            path = self.module_file(dotted)
            if path is None:
                return None
            self._modules[dotted] = ast.parse(path.read_text(encoding="utf-8"), str(path))
        return self._modules[dotted]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        file = self.module_file(module)
        package = (
            module if file is not None and file.name == "__init__.py" else module.rpartition(".")[0]
        )
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def find_class(
        self, module: str, qualname: str, depth: int = 0
    ) -> tuple[str, ast.ClassDef] | None:
        """The class ``qualname`` as seen from ``module``, following re-exports."""
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        first, _, rest = qualname.partition(".")
        found = self._find_top_class(module, tree, first, depth)
        if found is None:
            return None
        where, cls = found
        for part in filter(None, rest.split(".")):
            inner = [n for n in cls.body if isinstance(n, ast.ClassDef) and n.name == part]
            if not inner:
                return None
            cls = inner[0]
        return where, cls

    def _find_top_class(
        self, module: str, tree: ast.Module, name: str, depth: int
    ) -> tuple[str, ast.ClassDef] | None:
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module, node
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            source = self._absolute(module, node)
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name) == name:
                    target = name if alias.name == "*" else alias.name
                    found = self.find_class(source, target, depth + 1)
                    if found is not None:
                        return found
        return None

    def find_method(
        self, module: str, qualname: str, method: str
    ) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        found = self.find_class(module, qualname)
        if found is None:
            return None
        for _where, cls in self._mro(*found):
            for node in cls.body:
                if (
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name == method
                ):
                    return node
        return None

    def _mro(
        self, module: str, cls: ast.ClassDef, depth: int = 0
    ) -> list[tuple[str, ast.ClassDef]]:
        """The class and its bases that resolve inside these packages (depth first)."""
        out = [(module, cls)]
        if depth > 8:
            return out
        for base in cls.bases:
            if isinstance(base, ast.Name):
                found = self.find_class(module, base.id)
                if found is not None:
                    out.extend(self._mro(*found, depth=depth + 1))
        return out

    def class_attributes(self, module: str, qualname: str) -> set[str]:
        """Names set on the class body or on ``self`` in its (and its bases') methods."""
        found = self.find_class(module, qualname)
        if found is None:
            return set()
        names: set[str] = set()
        for _, cls in self._mro(*found):
            for stmt in cls.body:
                names |= _assigned_names(stmt)
            for node in ast.walk(cls):
                for target in _targets(node):
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        names.add(target.attr)
        return names

    def class_fields(self, module: str, qualname: str) -> set[str]:
        """Annotated names in the class body: a dataclass's fields."""
        found = self.find_class(module, qualname)
        if found is None:
            return set()
        return {
            n.target.id
            for n in found[1].body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }

    def module_names(self, module: str) -> set[str]:
        tree = self.module(module)
        names: set[str] = set()
        for node in _module_level(tree.body if tree else []):
            names |= _assigned_names(node)
        return names


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def _assigned_names(node: ast.AST) -> set[str]:
    names = {t.id for t in _targets(node) if isinstance(t, ast.Name)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(node.name)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _module_level(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Statements that run at import: into try/if/with blocks, not into defs."""
    for node in body:
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        inner: list[ast.stmt] = []
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list):
                inner += [n for n in value if isinstance(n, ast.stmt)]
        for handler in getattr(node, "handlers", None) or []:
            inner += handler.body
        yield from _module_level(inner)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = fn.args
    return {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}


# --- the check -----------------------------------------------------------------------


def _split(target: str) -> tuple[str, str]:
    module, _, qualname = target.partition(":")
    return module, qualname


def check_use(tree: SourceTree, use: ApiUse) -> list[str]:
    """What is wrong with one declared use against the source tree ([] if nothing)."""
    module, qualname = _split(use.target)
    where = f"{use.target}{'.' + use.member if use.member else ''}"
    if use.kind == "module_attr":
        ok = use.member in tree.module_names(module)
        return [] if ok else [f"{where}: no module-level name {use.member!r} in {module}"]
    if tree.find_class(module, qualname) is None:
        return [f"{where}: class {qualname} not found from {module}"]
    if use.kind == "class":
        return []
    if use.kind == "attr":
        ok = use.member in tree.class_attributes(module, qualname)
        return [] if ok else [f"{where}: {qualname} has no attribute {use.member!r}"]
    if use.kind == "fields":
        missing = set(use.kwargs) - tree.class_fields(module, qualname)
        return [f"{where}: no field {name!r}" for name in sorted(missing)]
    return _check_method(tree, use, module, qualname, where)


def _check_method(
    tree: SourceTree, use: ApiUse, module: str, qualname: str, where: str
) -> list[str]:
    assert use.member is not None
    fn = tree.find_method(module, qualname, use.member)
    if fn is None:
        return [f"{where}: method not found"]
    if use.via is None:
        # A name swallowed by **kwargs would be silently ignored: it must be a parameter.
        missing = set(use.kwargs) - _params(fn)
        return [f"{where}: no parameter {name!r}" for name in sorted(missing)]
    if fn.args.kwarg is None:
        return [f"{where}: takes no **kwargs to forward {', '.join(use.kwargs)} to {use.via}"]
    via_module, via_qual = _split(use.via)
    via_class, _, via_method = via_qual.rpartition(".")
    target = tree.find_method(via_module, via_class, via_method)
    if target is None:
        return [f"{where}: forwarding target {use.via} not found"]
    missing = set(use.kwargs) - _params(target)
    return [f"{where}: {use.via} has no parameter {name!r}" for name in sorted(missing)]


def check_table(root: Path, uses: Iterable[ApiUse]) -> list[str]:
    tree = SourceTree(root)
    return [problem for use in uses for problem in check_use(tree, use)]


def source_strings(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def emitted_eos_reasons(path: Path) -> set[str]:
    """The eos_reason values a generator source passes to its emit()."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        kw.value.value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        for kw in call.keywords
        if kw.arg == "eos_reason"
        and isinstance(kw.value, ast.Constant)
        and isinstance(kw.value.value, str)
    }


# --- our side: the engine modules use only what they declare ----------------------------

# Keywords and attributes of things that are not the library (torch, logging, ours).
FOREIGN_KWARGS = {"dtype", "strict"}  # torch.tensor(..., dtype=torch.long), zip(strict=)
FOREIGN_ATTRS = {"tensor", "long", "tolist", "warning", "info", "debug", "append", "get", "shape"}
# torch's and concurrent.futures' (close() and RawLogitsMixin in exl2.py)
FOREIGN_ATTRS |= {"clone", "empty_cache", "shutdown"}
FOREIGN_KWARGS |= {"wait", "cancel_futures"}  # ThreadPoolExecutor.shutdown()
# ``**`` in a library call is allowed only for these, whose keys the tables declare.
SPLAT_FUNCTIONS = {"sampler_settings", "sampler_kwargs"}


def _our_attrs() -> set[str]:
    names: set[str] = set()
    for cls in (ExlOptions, JobSpec, SamplingParams):
        names |= {f.name for f in dataclasses.fields(cls)}
        names |= {n for n in vars(cls) if not n.startswith("_")}
    # the grammar's matcher, which the schema filters drive (vocab_size: set in __init__)
    names |= {n for n in vars(SchemaMatcher) if not n.startswith("_")} | {"vocab_size"}
    return names


def engine_source_problems(source: str, library: str, uses: Iterable[ApiUse]) -> list[str]:
    """Library names, keywords and attributes in an engine module that its table lacks."""
    uses = list(uses)
    declared_kwargs = {k for u in uses for k in u.kwargs}
    declared_attrs = {u.member for u in uses if u.member} | {
        part for u in uses for part in _split(u.target)[1].split(".") if part
    }
    imports = {
        (_split(u.target)[0], _split(u.target)[1].split(".")[0] or (u.member or "")) for u in uses
    }
    allowed_attrs = declared_attrs | FOREIGN_ATTRS | _our_attrs()
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == library:
            problems += [
                f"line {node.lineno}: imports undeclared {node.module}.{a.name}"
                for a in node.names
                if (node.module, a.name) not in imports
            ]
        elif isinstance(node, ast.Call) and _callee(node) != "ApiUse":
            problems += _call_problems(node, declared_kwargs)
        elif (
            isinstance(node, ast.Attribute)
            and not _on_self_or_module(node)
            and node.attr not in allowed_attrs
        ):
            problems.append(f"line {node.lineno}: undeclared attribute .{node.attr}")
    return problems


def _callee(call: ast.Call) -> str:
    func = call.func
    return (
        func.id
        if isinstance(func, ast.Name)
        else func.attr
        if isinstance(func, ast.Attribute)
        else ""
    )


def _call_problems(call: ast.Call, declared_kwargs: set[str]) -> list[str]:
    problems = []
    for kw in call.keywords:
        if kw.arg is None:
            if not (isinstance(kw.value, ast.Call) and _callee(kw.value) in SPLAT_FUNCTIONS):
                problems.append(
                    f"line {call.lineno}: ** of something undeclared in {_callee(call)}()"
                )
        elif kw.arg not in declared_kwargs | FOREIGN_KWARGS:
            problems.append(
                f"line {call.lineno}: undeclared keyword {kw.arg}= in {_callee(call)}()"
            )
    return problems


def _on_self_or_module(node: ast.Attribute) -> bool:
    """self.x is ours; module.x (importlib.metadata, ...) is not a library object."""
    return isinstance(node.value, ast.Name) and node.value.id in {
        "self",
        "importlib",
        "logging",
        "log",
        "torch",
        "math",
        "gc",
    }


# --- tests -------------------------------------------------------------------------------


@cache
def root_of(dist: str) -> Path:
    return installed_root(dist)


@pytest.mark.parametrize("dist", sorted(PINS))
def test_installed_version_is_the_pinned_one(dist: str) -> None:
    installed = importlib.metadata.version(dist)
    assert installed == PINS[dist], (
        f"{dist} {installed} installed, engines verified against {PINS[dist]}: "
        f"re-run this conformance suite against the new version, then move the pin ({INSTALL_LINE})"
    )


@pytest.mark.parametrize("dist", sorted(TABLES))
def test_every_declared_name_exists_as_used(dist: str) -> None:
    assert check_table(root_of(dist), TABLES[dist]) == []


@pytest.mark.parametrize("dist", sorted(TABLES))
def test_engine_source_uses_only_declared_names(dist: str) -> None:
    source = ENGINE_SOURCES[dist].read_text(encoding="utf-8")
    assert engine_source_problems(source, dist, TABLES[dist]) == []


@pytest.mark.parametrize("module", [exl2, exl3])
def test_result_dict_keys_we_read_are_emitted(module: object) -> None:
    dist = "exllamav2" if module is exl2 else "exllamav3"
    strings = source_strings(root_of(dist) / module.RESULT_SOURCE)  # type: ignore[attr-defined]
    missing = set(module.RESULT_STRINGS) - strings  # type: ignore[attr-defined]
    assert not missing, f"{module.RESULT_SOURCE} no longer has {sorted(missing)}"  # type: ignore[attr-defined]


def test_exllamav3_error_results_are_emitted() -> None:
    strings = source_strings(root_of("exllamav3") / exl3.ERROR_SOURCE)
    assert set(exl3.ERROR_STRINGS) <= strings


@pytest.mark.parametrize(
    ("dist", "source"), [("exllamav2", exl2.RESULT_SOURCE), ("exllamav3", exl3.RESULT_SOURCE)]
)
def test_every_finish_reason_the_generator_emits_is_mapped(dist: str, source: str) -> None:
    reasons = emitted_eos_reasons(root_of(dist) / source)
    assert "max_new_tokens" in reasons and "stop_token" in reasons
    assert reasons <= LENGTH_REASONS | STOP_REASONS, (
        f"unmapped: {reasons - LENGTH_REASONS - STOP_REASONS}"
    )


def test_every_exllamav2_sampler_setting_is_set_explicitly() -> None:
    fields = SourceTree(root_of("exllamav2")).class_fields(
        "exllamav2.generator", "ExLlamaV2Sampler.Settings"
    )
    assert fields, "ExLlamaV2Sampler.Settings not found"
    ours = set(exl2.sampler_settings(SamplingParams()))
    assert fields - exl2.SAMPLER_STATE_FIELDS == ours, (
        "a sampler field was added or removed upstream: set it explicitly (library defaults "
        f"are not neutral): {sorted((fields - exl2.SAMPLER_STATE_FIELDS) ^ ours)}"
    )


def test_every_exllamav3_combo_sampler_argument_is_set_explicitly() -> None:
    fn = SourceTree(root_of("exllamav3")).find_method("exllamav3", "ComboSampler", "__init__")
    assert fn is not None
    assert _params(fn) - {"self"} == set(exl3.sampler_kwargs(SamplingParams()))


def test_dynamic_generator_refuses_the_fp8_cache_we_do_not_offer() -> None:
    # Our q8 is ExLlamaV2Cache_Q8; the dynamic generator asserts against _8bit (FP8).
    source = (root_of("exllamav2") / "exllamav2/generator/dynamic.py").read_text(encoding="utf-8")
    assert "not isinstance(cache, ExLlamaV2Cache_8bit)" in source


# --- structured output and logprobs: the filter hooks and logits we rely on -----------------

MODULES = {"exllamav2": exl2, "exllamav3": exl3}


def referenced_names(path: Path) -> set[str]:
    """Attribute names a source refers to (``f.feed(...)``, ``pool.submit(self.next)``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def filter_call_problems(root: Path, calls: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for rel, hooks in calls.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        names = referenced_names(path)
        problems += [f"{rel} no longer uses .{hook}" for hook in hooks if hook not in names]
    return problems


@pytest.mark.parametrize("dist", sorted(MODULES))
def test_the_filter_hooks_we_override_are_driven_by_the_library(dist: str) -> None:
    calls = MODULES[dist].FILTER_CALLS  # type: ignore[attr-defined]
    assert filter_call_problems(root_of(dist), calls) == []


def _schema_filter_methods(source: str) -> set[str]:
    tree = ast.parse(source)
    [cls] = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SchemaFilter"]
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)} - {"__init__"}


@pytest.mark.parametrize("dist", sorted(MODULES))
def test_the_schema_filter_overrides_only_declared_hooks(dist: str) -> None:
    declared = {u.member for u in TABLES[dist] if u.target.endswith("Filter") and u.member}
    overridden = _schema_filter_methods(ENGINE_SOURCES[dist].read_text(encoding="utf-8"))
    assert overridden and overridden <= declared, sorted(overridden - declared)
    # ...and every declared hook is one the library calls
    calls = {h for hooks in MODULES[dist].FILTER_CALLS.values() for h in hooks}  # type: ignore[attr-defined]
    assert overridden <= calls | {"next"}, sorted(overridden - calls)


def test_exllamav2_returns_the_logits_before_sampling_and_masks_out_of_place() -> None:
    # logprobs are computed from return_logits: the logits the job held must be the
    # ones it sampled from, and the sampler must use the masked copy our filter returns
    # (so the held logits stay the model's own).
    gen = root_of("exllamav2") / "exllamav2/generator"
    dynamic = (gen / "dynamic.py").read_text(encoding="utf-8")
    sampler = (gen / "sampler.py").read_text(encoding="utf-8")
    assert "self.held_logits.append(logits[:1, :, :])" in dynamic
    assert "logits = f.mask_logits(flat_logits).view(1, 1, -1)" in sampler
    # the library's own token probs are after top-k (1.0 for a greedy token): not ours
    assert "output_probs" in sampler and "top_k_cpu" in (
        root_of("exllamav2") / "exllamav2/exllamav2_ext/ext_sampling.cpp"
    ).read_text(encoding="utf-8")


def test_exllamav2_penalises_in_place_between_the_two_hooks_raw_logits_job_overrides() -> None:
    # RawLogitsMixin copies the logits in receive_logits (before the sampler's in-place
    # penalties) and hands the copy to receive_sample, which holds what it is given:
    # that holds only while the generator passes one tensor to both, in that order.
    gen = root_of("exllamav2") / "exllamav2/generator"
    dynamic = (gen / "dynamic.py").read_text(encoding="utf-8")
    sampler = (gen / "sampler.py").read_text(encoding="utf-8")
    sample_at = dynamic.index("job.receive_logits(job_logits)")
    assert "self.sampling_pool.submit(job.receive_logits, job_logits)" in dynamic
    assert "eos, sampled_token = job.receive_sample(\n                    job_logits," in dynamic
    assert dynamic.index("job.receive_sample(", sample_at) > sample_at
    assert "ext_c.apply_rep_penalty(sequence_ids[:, :]," in sampler
    call = sampler[sampler.index("ext_c.apply_rep_penalty(") :]
    assert call[: call.index(")")].rstrip().endswith("logits")  # written into, in place


def test_exllamav3_returns_probabilities_of_the_raw_logits() -> None:
    job = (root_of("exllamav3") / "exllamav3/generator/job.py").read_text(encoding="utf-8")
    assert "probs = torch.softmax(logits.float(), dim = -1)" in job
    custom = root_of("exllamav3") / "exllamav3/generator/sampler/custom.py"
    # a bitmask is applied to a copy: the logits the probabilities come from stay raw
    assert "masked = torch.empty_like(logits.view(bsz, dim))" in custom.read_text(encoding="utf-8")


def test_both_samplers_take_openai_presence_and_frequency_penalties() -> None:
    v3 = SourceTree(root_of("exllamav3")).find_method("exllamav3", "ComboSampler", "__init__")
    assert v3 is not None and {"pres_p", "freq_p"} <= _params(v3)
    fields = SourceTree(root_of("exllamav2")).class_fields(
        "exllamav2.generator", "ExLlamaV2Sampler.Settings"
    )
    assert {"token_presence_penalty", "token_frequency_penalty"} <= fields
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.3)
    assert exl2.sampler_settings(params)["token_presence_penalty"] == 0.7
    assert exl2.sampler_settings(params)["token_frequency_penalty"] == -0.3
    assert (exl3.sampler_kwargs(params)["pres_p"], exl3.sampler_kwargs(params)["freq_p"]) == (
        0.7,
        -0.3,
    )


# --- negative controls ---------------------------------------------------------------------


def test_a_filter_hook_renamed_upstream_fails(tmp_path: Path) -> None:
    root = _copy_package("exllamav2", tmp_path)
    _edit(
        root / "exllamav2/generator/sampler.py",
        "logits = f.mask_logits(flat_logits)",
        "logits = f.apply_mask(flat_logits)",
    )
    problems = filter_call_problems(root, exl2.FILTER_CALLS)
    assert problems == ["exllamav2/generator/sampler.py no longer uses .mask_logits"]


def _copy_package(dist: str, dest: Path) -> Path:
    src = root_of(dist) / dist
    shutil.copytree(
        src,
        dest / dist,
        ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.cpp", "*.cu", "*.cuh", "*.h", "*.c"
        ),
    )
    return dest


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_copy_unchanged_passes(tmp_path: Path) -> None:
    root = _copy_package("exllamav2", tmp_path)
    assert check_table(root, exl2.EXLLAMAV2_API) == []


def test_renamed_keyword_upstream_fails(tmp_path: Path) -> None:
    root = _copy_package("exllamav2", tmp_path)
    _edit(
        root / "exllamav2/generator/dynamic.py",
        "stop_conditions: list | tuple | set = None",
        "stop_conds: list | tuple | set = None",
    )
    problems = check_table(root, exl2.EXLLAMAV2_API)
    assert any("stop_conditions" in p and "ExLlamaV2DynamicJob" in p for p in problems), problems


def test_renamed_class_upstream_fails(tmp_path: Path) -> None:
    root = _copy_package("exllamav2", tmp_path)
    for rel in ("exllamav2/generator/dynamic.py", "exllamav2/generator/__init__.py"):
        text = (root / rel).read_text(encoding="utf-8")
        (root / rel).write_text(
            text.replace("ExLlamaV2DynamicJob", "ExLlamaV2DynamicTask"), encoding="utf-8"
        )
    problems = check_table(root, exl2.EXLLAMAV2_API)
    assert any("ExLlamaV2DynamicJob not found" in p for p in problems), problems


def test_renamed_method_and_forwarding_upstream_fail(tmp_path: Path) -> None:
    root = _copy_package("exllamav3", tmp_path)
    _edit(root / "exllamav3/generator/generator.py", "    def cancel(\n", "    def cancel_job(\n")
    _edit(root / "exllamav3/cache/quant.py", "k_bits: int,", "key_bits: int,")
    problems = check_table(root, exl3.EXLLAMAV3_API)
    assert any("Generator.cancel: method not found" in p for p in problems), problems
    assert any("CacheLayer_quant.__init__ has no parameter 'k_bits'" in p for p in problems), (
        problems
    )


def test_engine_using_an_undeclared_keyword_fails() -> None:
    source = ENGINE_SOURCES["exllamav2"].read_text(encoding="utf-8")
    assert "token_healing=False" in source
    problems = engine_source_problems(
        source.replace("token_healing=False", "token_heal=False"), "exllamav2", exl2.EXLLAMAV2_API
    )
    assert any("token_heal=" in p for p in problems), problems


def test_engine_using_an_undeclared_method_or_import_fails() -> None:
    source = ENGINE_SOURCES["exllamav3"].read_text(encoding="utf-8")
    edited = source.replace(
        "self._generator.cancel(job=handle)", "self._generator.cancel_all(job=handle)"
    )
    edited = edited.replace(
        "from exllamav3 import ComboSampler, Job",
        "from exllamav3 import ComboSampler, Job, ArgmaxSampler",
    )
    problems = engine_source_problems(edited, "exllamav3", exl3.EXLLAMAV3_API)
    assert any(".cancel_all" in p for p in problems), problems
    assert any("ArgmaxSampler" in p for p in problems), problems
