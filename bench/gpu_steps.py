"""The steps of bench/gpu_check.py, each run in its own process (``--step NAME``).

A step writes its numbers to ``<workdir>/steps/NAME.json`` as it goes, so a step
killed at its time box still leaves what it finished. Rows a..g of the table come
from the ``rows`` entry of these documents.

The comparisons alternate rounds (in-process recipe, then exgen, then again), with
both loaded side by side, so that whatever else loads the machine hits both sides;
the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchlib import Daemon, running_daemon
from gpu_check import Plan
from gpu_model import make_model

RATIO_GOAL = 0.95  # exgen with one slot against the lone process
SEEDS_GOAL = 1.0  # exgen against the seeds' own method (the goal)
RESTART_GOAL = 2.0  # restart time against the worker's load time
RELEASED_SHARE = 0.75  # of the killed worker's GPU memory, seen freed before it is back


class StepSkipped(Exception):
    """The step cannot run here; the reason goes to the table."""


class Record:
    """The step's JSON document, rewritten after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = {"status": "running", "rows": {}}
        self.flush()

    def set(self, **fields: Any) -> None:
        self.doc.update(fields)
        self.flush()

    def row(self, key: str, status: str, summary: str, goal: str = "", **numbers: Any) -> None:
        self.doc["rows"][key] = {"status": status, "summary": summary, "goal": goal, **numbers}
        self.flush()
        print(f"row {key}: {status}: {summary} {goal}", flush=True)

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        tmp.replace(self.path)


@dataclass
class Ctx:
    plan: Plan
    rec: Record
    deadline: float  # time.time() by which the step should be done

    def left(self) -> float:
        return self.deadline - time.time()


# --- measuring through exgen ----------------------------------------------------------


def gpu_slots(plan: Plan, engine: str, slots: int) -> str | None:
    """``--gpus`` for ``slots`` slots of the one GPU ("0", or "0;0" for two); None for
    CPU slots (the synthetic engine has no use for a GPU)."""
    if plan.gpus is None or engine == "synthetic":
        return None
    return ";".join([plan.gpus] * slots)


def daemon_args(plan: Plan, engine: str) -> list[str]:
    args = ["--log-level", "info"]
    return args if engine == "synthetic" else [*args, "--model", plan.model_dir]


@contextlib.contextmanager
def serve(plan: Plan, engine: str, slots: int, timeout: float) -> Iterator[tuple[Daemon, float]]:
    """``exgen serve`` ready (and the seconds that took), its log copied to ours."""
    opts = plan.engine_opts.get(engine, {})
    started = time.monotonic()
    gpus = gpu_slots(plan, engine, slots)
    with running_daemon(
        slots, engine, opts, *daemon_args(plan, engine), timeout=timeout, gpus=gpus
    ) as daemon:
        try:
            yield daemon, time.monotonic() - started
        finally:
            print(f"--- daemon log ---\n{daemon.log.read_text(errors='replace')[-8000:]}")


@dataclass
class Submitted:
    tokens: int
    seconds: float  # as exgen-client measured it (from its summary line)
    wall_s: float
    ids: Counter[str]
    errors: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


SUMMARY = re.compile(r"(\d+) done, (\d+) failed.* in ([0-9.]+)s \(")


def submit_command(plan: Plan, daemon: Daemon, out: Path, max_new: int) -> list[str]:
    return [*plan.client, "submit", plan.prompts_file, "-o", str(out), "--connect",
            daemon.address, "--timeout", "600", "--no-progress",
            "--max-new-tokens", str(max_new)]  # fmt: skip


def read_results(out: Path, proc_stderr: str, wall: float) -> Submitted:
    ids: Counter[str] = Counter()
    errors: list[str] = []
    tokens = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        row = json.loads(line)
        ids[row["id"]] += 1
        tokens += int(row.get("completion_tokens") or 0)
        if row.get("error"):
            errors.append(f"{row['id']}: {row['error']}")
    match = SUMMARY.search(proc_stderr)
    # The client's own clock starts after its imports; its summary rounds to 0.1 s, too
    # coarse for a run under a second (dry runs), where the wall time is taken instead.
    seconds = float(match.group(3)) if match else wall
    if seconds < 1.0:
        seconds = wall
    return Submitted(tokens, seconds, wall, ids, errors)


def submit(plan: Plan, daemon: Daemon, tag: str, max_new: int, timeout: float) -> Submitted:
    """The workload through ``exgen-client submit``, as a user runs it."""
    out = Path(plan.workdir) / f"results-{tag}.jsonl"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        submit_command(plan, daemon, out, max_new), capture_output=True, text=True, timeout=timeout
    )
    result = read_results(out, proc.stderr, time.monotonic() - started)
    print(f"exgen-client submit ({tag}): exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return result


def workload(plan: Plan) -> list[str]:
    lines = Path(plan.prompts_file).read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def check_once(result: Submitted, expected: int) -> str | None:
    """What is wrong with the results as a user sees them, or None."""
    dupes = [i for i, n in result.ids.items() if n > 1]
    if dupes:
        return f"{len(dupes)} ids answered twice (e.g. {dupes[0]})"
    if len(result.ids) != expected:
        return f"{expected - len(result.ids)} of {expected} ids missing"
    if result.errors:
        return f"{len(result.errors)} errors, e.g. {result.errors[0]}"
    return None


# --- GPU memory ----------------------------------------------------------------------------


def gpu_used_mib() -> float | None:
    """Memory in use on GPU 0, by every process (nvidia-smi; torch as a fallback)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info(0)
        return float((total - free) / 2**20)
    return None


def gpu_apps() -> dict[int, float] | None:
    """GPU memory per process (MiB), where nvidia-smi lists processes."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        rows = [line.split(",") for line in out.splitlines() if line.strip()]
        return {int(pid): float(mib) for pid, mib in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class MemorySampler(threading.Thread):
    """The lowest GPU memory seen while it runs (every 0.2 s)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.low: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            used = gpu_used_mib()
            if used is not None:
                self.low = used if self.low is None else min(self.low, used)
            self.halt.wait(0.2)


# --- in-process recipes: what a user runs without exgen ---------------------------------------


class Recipe(Protocol):
    label: str

    def load(self) -> float: ...

    def run(self, prompts: list[str], max_new: int) -> dict[str, float]: ...


def measured(tokens: int, seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


class SyntheticRecipe:
    """Dry run: the synthetic engine driven in-process (bench/overhead.py's loop)."""

    label = "synthetic engine in-process (dry-run stand-in)"

    def __init__(self, opts: dict[str, str]) -> None:
        self.opts = opts

    def load(self) -> float:
        return 0.0

    def run(self, prompts: list[str], max_new: int) -> dict[str, float]:
        from overhead import synthetic_direct

        out = synthetic_direct(self.opts, len(prompts), max_new)
        return measured(int(out["tokens"]), out["seconds"])


class ExlRecipe:
    """An exllama generator alone: every prompt enqueued, ``iterate()`` to the end,
    greedy, stopping on the model's EOS ids; the engine's default cache and batch."""

    label = "exllama generator in-process"

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.tokenizer: Any = None
        self.generator: Any = None
        self.stop: list[int | str] = []

    def job(self, ids: Any, max_new: int, key: int) -> Any:
        raise NotImplementedError

    def run(self, prompts: list[str], max_new: int) -> dict[str, float]:
        started = time.monotonic()
        for key, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, add_bos=True, encode_special_tokens=True)
            self.generator.enqueue(self.job(ids, max_new, key))
        return measured(drive(self.generator), time.monotonic() - started)


class Exl2Recipe(ExlRecipe):
    """ExLlamaV2's dynamic generator (unpaged, one job at a time, without flash-attn)."""

    label = "ExLlamaV2DynamicGenerator in-process"

    def load(self) -> float:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.attn import has_flash_attn_with_paged
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2Sampler

        from exgen.daemon.engines.exl_common import PAGE_SIZE, parse_options, round_up

        started = time.monotonic()
        opts = parse_options({}, "exllamav2")
        config = ExLlamaV2Config(self.model_dir)
        config.arch_compat_overrides()
        self.paged = bool(has_flash_attn_with_paged)
        tokens = opts.cache_tokens if self.paged else round_up(config.max_seq_len, PAGE_SIZE)
        model = ExLlamaV2(config)
        model.load()
        cache = ExLlamaV2Cache(model, max_seq_len=tokens)
        self.tokenizer = ExLlamaV2Tokenizer(config)
        self.generator = ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=self.tokenizer, paged=self.paged,
            max_batch_size=opts.max_batch_size if self.paged else 1,
        )  # fmt: skip
        self.settings = ExLlamaV2Sampler.Settings.greedy()
        self.stop = stop_ids(self.model_dir, self.tokenizer.eos_token_id)
        return time.monotonic() - started

    def job(self, ids: Any, max_new: int, key: int) -> Any:
        from exllamav2.generator import ExLlamaV2DynamicJob

        return ExLlamaV2DynamicJob(
            input_ids=ids, max_new_tokens=max_new, gen_settings=self.settings,
            stop_conditions=self.stop, identifier=key,
        )  # fmt: skip


class Exl3Recipe(ExlRecipe):
    """ExLlamaV3's generator (always paged: its own attention kernels), ArgmaxSampler."""

    label = "ExLlamaV3 Generator in-process"

    def load(self) -> float:
        from exllamav3 import Cache, Config, Generator, Model, Tokenizer

        from exgen.daemon.engines.exl_common import parse_options

        started = time.monotonic()
        opts = parse_options({}, "exllamav3")
        config = Config.from_directory(self.model_dir)
        model = Model.from_config(config)
        cache = Cache(model, max_num_tokens=opts.cache_tokens, max_batch_size=opts.max_batch_size)
        model.load(device="cuda:0", progressbar=False)
        self.tokenizer = Tokenizer.from_config(config)
        self.generator = Generator(
            model=model, cache=cache, tokenizer=self.tokenizer,
            max_batch_size=opts.max_batch_size, max_chunk_size=opts.max_chunk_size,
        )  # fmt: skip
        self.stop = stop_ids(self.model_dir, self.tokenizer.eos_token_id)
        return time.monotonic() - started

    def job(self, ids: Any, max_new: int, key: int) -> Any:
        from exllamav3 import ArgmaxSampler, Job

        return Job(
            input_ids=ids, max_new_tokens=max_new, sampler=ArgmaxSampler(),
            stop_conditions=self.stop, identifier=key,
        )  # fmt: skip


def stop_ids(model_dir: str, eos: int | None) -> list[int | str]:
    from exgen.daemon.engines.exl_common import eos_token_ids

    return list(eos_token_ids(Path(model_dir), eos))


def drive(generator: Any) -> int:
    """iterate() until every job is done; the tokens generated."""
    tokens = 0
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            if result.get("stage") == "streaming" and result.get("eos"):
                tokens += int(result.get("new_tokens") or 0)
    return tokens


class SeedsHFRecipe:
    """The seeds' transformers recipe (bench/seeds_accelerate.py: left-padded batches of
    16, greedy), one process on the GPU in bf16 (CPU fp32 in a dry run)."""

    label = "seeds' recipe in-process (batches of 16)"

    def __init__(self, model_dir: str, dry: bool) -> None:
        self.model_dir = model_dir
        self.dry = dry

    def load(self) -> float:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        dtype, device = (torch.float32, "cpu") if self.dry else (torch.bfloat16, "cuda")
        if self.dry:
            torch.set_num_threads(1)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = OnDevice(tokenizer, device)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model = model.to(device)
        self.model.eval()
        return time.monotonic() - started

    def run(self, prompts: list[str], max_new: int) -> dict[str, float]:
        from seeds_accelerate import _generate

        started = time.monotonic()
        counts = _generate(self.tokenizer, self.model, prompts, max_new)
        if not self.dry:
            import torch

            torch.cuda.synchronize()
        return measured(sum(counts), time.monotonic() - started)


class OnDevice:
    """A tokenizer whose batches land on the model's device: the seeds' loop moved
    them with ``PartialState.device``; here one process owns the one GPU."""

    def __init__(self, tokenizer: Any, device: str) -> None:
        self._tokenizer = tokenizer
        self._device = device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs).to(self._device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


# --- the comparison + kill step ------------------------------------------------------------


@dataclass
class Comparison:
    """Rows for one engine: in-process (a), through exgen (b), kill -9 (d)."""

    engine: str
    recipe: Recipe
    rows: tuple[str, str, str]  # table keys for in-process, daemon, kill
    goal: float = RATIO_GOAL  # exgen ÷ in-process, at least
    rounds: list[dict[str, float]] = field(default_factory=list)


def compare(ctx: Ctx, comp: Comparison) -> None:
    """In-process against exgen, then kill -9. gpu_check pauses any JIT build still
    compiling while this runs: the numbers are the engine's, not nvcc's."""
    plan = ctx.plan
    prompts = workload(plan)
    mem0 = gpu_used_mib()
    with serve(plan, comp.engine, 1, timeout=max(30.0, ctx.left() - 30)) as (daemon, ready_s):
        worker = daemon.status()["workers"][0]
        mem1 = gpu_used_mib()
        ctx.rec.set(daemon={"ready_s": round(ready_s, 2), "worker": worker, "gpu_mib": mem1})
        recipe_load = comp.recipe.load()
        facts = {"paged": getattr(comp.recipe, "paged", None)}
        ctx.rec.set(
            inprocess={"label": comp.recipe.label, "load_s": round(recipe_load, 2), **facts}
        )
        alternate_rounds(ctx, comp, daemon, prompts)
        kill_test(ctx, comp, daemon, worker, KillMemory(mem0, mem1))


def alternate_rounds(ctx: Ctx, comp: Comparison, daemon: Daemon, prompts: list[str]) -> None:
    plan = ctx.plan
    key_b = comp.rows[1]
    for r in range(plan.rounds):
        started = time.monotonic()
        a = comp.recipe.run(prompts, plan.max_new_tokens)
        b = submit(plan, daemon, f"{comp.engine}-{r}", plan.max_new_tokens, ctx.left())
        problem = check_once(b, len(prompts))
        if problem:
            ctx.rec.row(key_b, "failed", f"exgen-client submit: {problem}")
            raise StepSkipped(f"results wrong: {problem}")
        comp.rounds.append({"inprocess": a["tokens_per_s"], "exgen": b.tokens_per_s,
                            "inprocess_tokens": a["tokens"], "exgen_tokens": b.tokens,
                            "ratio": b.tokens_per_s / a["tokens_per_s"]})  # fmt: skip
        report_rounds(ctx, comp)
        spent = time.monotonic() - started
        if ctx.left() < 2.5 * spent + 30:  # keep time for the kill test
            break


def judge(ctx: Ctx, met: bool) -> str:
    """A goal's verdict; a dry run's numbers (stand-ins on a CPU) judge nothing."""
    if ctx.plan.dry_run:
        return "not judged (dry run)"
    return "met" if met else "NOT met"


def report_rounds(ctx: Ctx, comp: Comparison) -> None:
    key_a, key_b, _ = comp.rows
    rs = comp.rounds
    a = statistics.median(r["inprocess"] for r in rs)
    b = statistics.median(r["exgen"] for r in rs)
    ratio = statistics.median(r["ratio"] for r in rs)
    n = f"median of {len(rs)} round{'s' if len(rs) > 1 else ''}"
    tokens = rs[-1]["inprocess_tokens"], rs[-1]["exgen_tokens"]
    # The model never emits EOS under greedy decoding: both sides make the same tokens.
    same = "" if tokens[0] == tokens[1] else f"; token counts differ: {tokens}"
    ctx.rec.row(key_a, "ok", f"{a:.1f} tok/s ({comp.recipe.label}; {n}; {tokens[0]} tokens)",
                tokens_per_s=a, runs=[r["inprocess"] for r in rs])  # fmt: skip
    verdict = judge(ctx, ratio >= comp.goal)
    ctx.rec.row(key_b, "ok", f"{b:.1f} tok/s, ratio {ratio:.3f} ({n}; {tokens[1]} tokens)",
                goal=f"ratio >= {comp.goal}: {verdict}{same}", tokens_per_s=b, ratio=ratio,
                ratios=[r["ratio"] for r in rs])  # fmt: skip


def kill_test(ctx: Ctx, comp: Comparison, daemon: Daemon, worker: dict[str, Any],
              memory: KillMemory) -> None:  # fmt: skip
    """kill -9 the worker mid-job: it comes back, its memory is freed, nothing is lost."""
    plan = ctx.plan
    out = Path(plan.workdir) / f"results-{comp.engine}-kill.jsonl"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    cmd = submit_command(plan, daemon, out, plan.kill_max_new_tokens)
    client = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler()
    try:
        victim, done_at_kill = kill_mid_job(daemon, client, out, ctx, memory)
        sampler.start()
        back = wait_back(daemon, victim, client, ctx)
        sampler.halt.set()
        note_after_restart(memory, victim, back["worker"].get("pid"))
        _, stderr = client.communicate(timeout=max(10.0, ctx.left()))
    finally:
        sampler.halt.set()
        if client.poll() is None:
            client.kill()
    memory.lowest_after_kill = sampler.low
    result = read_results(out, stderr, time.monotonic() - started)
    report_kill(ctx, comp.rows[2], worker, back, result, memory, done_at_kill)


def note_before_kill(memory: KillMemory, victim: int) -> None:
    memory.before_kill = gpu_used_mib()
    apps = gpu_apps()
    if apps:
        memory.victim_mib = apps.get(victim)


def note_after_restart(memory: KillMemory, victim: int, new_pid: Any) -> None:
    memory.after_restart = gpu_used_mib()
    apps = gpu_apps()
    if apps:
        memory.victim_listed_after = victim in apps
        memory.new_worker_mib = apps.get(int(new_pid)) if new_pid is not None else None


def kill_mid_job(daemon: Daemon, client: subprocess.Popen[str], out: Path, ctx: Ctx,
                 memory: KillMemory) -> tuple[int, int]:  # fmt: skip
    """SIGKILL the worker once it has work in flight and has answered some (or ran a
    while: an engine that batches statically answers all at once)."""
    first_busy = None
    while ctx.left() > 0:
        if client.poll() is not None:
            raise StepSkipped("the job ended before the kill could land (make it longer)")
        w = daemon.status()["workers"][0]
        if w.get("inflight", 0) > 0:
            first_busy = first_busy or time.monotonic()
            answered = count_lines(out)
            if answered >= 1 or time.monotonic() - first_busy > ctx.plan.kill_after_s:
                note_before_kill(memory, int(w["pid"]))
                os.kill(int(w["pid"]), signal.SIGKILL)
                print(f"kill -9 {w['pid']} with {w['inflight']} in flight, {answered} answered")
                return int(w["pid"]), answered
        time.sleep(0.05)
    raise StepSkipped("no time left to kill the worker")


def count_lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except FileNotFoundError:
        return 0


def completed(worker: dict[str, Any]) -> int:
    return int(worker.get("completed") or 0)


def wait_back(
    daemon: Daemon, victim: int, client: subprocess.Popen[str], ctx: Ctx
) -> dict[str, Any]:
    """When a new process was ready in the slot, and when it first answered."""
    killed = time.monotonic()
    ready_at: float | None = None
    served_at: float | None = None
    base = 0
    worker: dict[str, Any] = {}
    while ctx.left() > 0:
        worker = daemon.status()["workers"][0]
        if ready_at is None:
            if worker.get("state") == "ready" and worker.get("pid") not in (None, victim):
                ready_at, base = time.monotonic(), completed(worker)
        elif completed(worker) > base:
            served_at = time.monotonic()
            break
        elif client.poll() is not None:
            break
        time.sleep(0.1)
    if ready_at is None:
        raise StepSkipped("the killed worker did not come back in the step's time")
    return {"worker": worker, "restart_s": ready_at - killed,
            "serving_s": None if served_at is None else served_at - killed}  # fmt: skip


def report_kill(ctx: Ctx, key: str, first: dict[str, Any], back: dict[str, Any],
                result: Submitted, memory: KillMemory, done_at_kill: int) -> None:  # fmt: skip
    expected = ctx.plan.prompts
    load_s = float(first.get("load_s") or 0.0)
    restart = float(back["restart_s"])
    ratio = restart / load_s if load_s > 0 else None
    once = check_once(result, expected)
    problems = [p for p in (once, memory.problem()) if p]
    if done_at_kill >= expected:
        problems.append("every result was in before the kill")
    verdict = "n/a" if ratio is None else judge(ctx, ratio < RESTART_GOAL)
    summary = (
        f"killed with {done_at_kill}/{expected} answered; back in {restart:.1f}s "
        f"(load {load_s:.1f}s, x{ratio or 0:.2f}); {len(result.ids)} results, each once: "
        f"{'yes' if not once else 'NO'}; {memory.text()}"
    )
    ctx.rec.set(kill={"restart_s": restart, "load_s": load_s, "ratio": ratio,
                      "memory": asdict(memory), "serving_s": back["serving_s"],
                      "new_worker": back["worker"], "answered_at_kill": done_at_kill})  # fmt: skip
    ctx.rec.row(key, "failed" if problems else "ok", summary + "".join(f"; {p}" for p in problems),
                goal=f"restart < {RESTART_GOAL}x load: {verdict}", restart_s=restart,
                load_s=load_s, ratio=ratio)  # fmt: skip


@dataclass
class KillMemory:
    """GPU memory around a kill: totals (MiB) and, where listed, per process."""

    before_daemon: float | None
    daemon_ready: float | None
    before_kill: float | None = None
    lowest_after_kill: float | None = None
    after_restart: float | None = None
    victim_mib: float | None = None  # what the killed process held (per-process listing)
    victim_listed_after: bool | None = None  # still listed once the new one serves
    new_worker_mib: float | None = None

    def worker_mib(self) -> float | None:
        """The killed worker's memory: listed per process, else what the daemon added."""
        if self.victim_mib is not None:
            return self.victim_mib
        if self.before_daemon is None or self.daemon_ready is None:
            return None
        return self.daemon_ready - self.before_daemon

    def problem(self) -> str | None:
        """Freed: the killed pid is gone, the total dropped by most of what it held
        before the new worker filled the card again, and no second copy is left."""
        if self.victim_listed_after:
            return "the killed worker's pid is still listed on the GPU"
        held = self.worker_mib()
        if held is None or self.before_kill is None or self.lowest_after_kill is None:
            return None  # no GPU (a dry run), or no way to read it
        freed = self.before_kill - self.lowest_after_kill
        if held > 0 and freed < RELEASED_SHARE * held:
            return f"only {freed:.0f} of the worker's {held:.0f} MiB seen freed after the kill"
        if self.after_restart is not None and self.after_restart > self.before_kill + held / 2:
            grown = self.after_restart - self.before_kill
            return f"{grown:.0f} MiB more in use after the restart: the old memory was kept"
        return None

    def text(self) -> str:
        held = self.worker_mib()
        if held is None or self.before_kill is None or self.lowest_after_kill is None:
            return "GPU memory: n/a (no GPU)"
        freed = self.before_kill - self.lowest_after_kill
        back = (
            ""
            if self.after_restart is None
            else f", {self.after_restart - self.before_kill:+.0f} MiB after"
        )
        return f"worker held {held:.0f} MiB, {freed:.0f} MiB freed after the kill{back}"


# --- the steps ---------------------------------------------------------------------------------


def step_model(ctx: Ctx) -> None:
    plan = ctx.plan
    device = "cpu" if plan.dry_run else "cuda"
    doc = make_model(Path(plan.model_dir), plan.shape, device=device)
    size = doc["bytes"] / 2**20
    summary = f"{plan.shape}: {doc['parameters'] / 1e6:,.1f}M parameters, {size:,.0f} MiB fp16"
    summary += " (reused)" if doc["reused"] else f", made in {doc['seconds']}s"
    ctx.rec.set(model=doc, summary=summary)


def exllama_comparison(ctx: Ctx, role: str, rows: tuple[str, str, str]) -> Comparison:
    plan = ctx.plan
    engine = plan.engines[role]
    recipe: Recipe
    if engine == "synthetic":
        recipe = SyntheticRecipe(plan.engine_opts["synthetic"])
    elif engine == "exllamav2":
        recipe = Exl2Recipe(plan.model_dir)
    else:
        recipe = Exl3Recipe(plan.model_dir)
    return Comparison(engine, recipe, rows)


def step_exl2(ctx: Ctx) -> None:
    compare(ctx, exllama_comparison(ctx, "exl2", ("a", "b", "d")))


def step_exl3(ctx: Ctx) -> None:
    comp = exllama_comparison(ctx, "exl3", ("e-in", "e-exgen", "e-kill"))
    try:
        compare(ctx, comp)
    finally:
        fold_rows(ctx, "e", ("e-in", "e-exgen", "e-kill"))


def step_hf(ctx: Ctx) -> None:
    plan = ctx.plan
    recipe = SeedsHFRecipe(plan.model_dir, plan.dry_run)
    comp = Comparison("transformers", recipe, ("f-seeds", "f-exgen", "f-kill"), SEEDS_GOAL)
    try:
        compare(ctx, comp)
    finally:
        fold_rows(ctx, "f", ("f-seeds", "f-exgen", "f-kill"))


def fold_rows(ctx: Ctx, key: str, parts: tuple[str, ...]) -> None:
    """One table row from a comparison's three (in-process, exgen, kill)."""
    rows = ctx.rec.doc["rows"]
    got = [rows[p] for p in parts if p in rows]
    if not got:
        return
    bad = [r["status"] for r in got if r["status"] != "ok"]
    status = bad[0] if bad else ("ok" if len(got) == len(parts) else "failed")
    summary = " | ".join(r["summary"] for r in got)
    if len(got) < len(parts):
        summary += " | (not all parts ran)"
    goal = "; ".join(r["goal"] for r in got if r["goal"])
    rows[key] = {"status": status, "summary": summary, "goal": goal}
    ctx.rec.flush()


def step_two_slots(ctx: Ctx) -> None:
    plan = ctx.plan
    engine = plan.engines["exl2"]
    try:
        with serve(plan, engine, 2, timeout=max(20.0, ctx.left() - 20)) as (daemon, ready_s):
            result = submit(plan, daemon, f"{engine}-two-slots", plan.max_new_tokens, ctx.left())
            workers = daemon.status()["workers"]
    except RuntimeError as exc:
        if "exited early" not in str(exc):
            raise  # not a refusal: a failure like any other
        reason = refusal(str(exc))  # the daemon's own words say why
        slots = gpu_slots(plan, engine, 2)
        how = f"--gpus '{slots}'" if slots else "--workers 2"
        ctx.rec.row("c", "refused", f"exgen serve {how}: {reason}")
        ctx.rec.set(status="refused", reason=reason)
        return
    problem = check_once(result, plan.prompts)
    per_slot = {w["slot"]: w.get("completed") for w in workers}
    summary = (f"{result.tokens_per_s:.1f} tok/s over 2 slots (ready in {ready_s:.1f}s); "
               f"answered per slot {per_slot}")  # fmt: skip
    ctx.rec.row("c", "failed" if problem else "ok", summary + (f"; {problem}" if problem else ""),
                tokens_per_s=result.tokens_per_s, per_slot=per_slot)  # fmt: skip


def refusal(text: str) -> str:
    """The line of a daemon's log that says why it stopped."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("Error:", "error", "no worker could start", "unavailable"):
        hit = [ln for ln in lines if marker in ln]
        if hit:
            return hit[-1][:300]
    return (lines or ["exited"])[-1][:300]


def gpu_tests(ctx: Ctx, engine: str) -> None:
    plan = ctx.plan
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-k", engine, "-q", "-rs",
           "-p", "no:cacheprovider", "-W", "default",
           "-o", f"timeout={max(30, int(ctx.left()) - 10)}"]  # fmt: skip
    env = {**os.environ, "EXGEN_GPU_MODEL": plan.model_dir}
    proc = subprocess.run(cmd, cwd=plan.root, env=env, capture_output=True, text=True,
                          timeout=max(20.0, ctx.left()))  # fmt: skip
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    summary = pytest_summary(proc.stdout)
    if proc.returncode not in (0, 5) or "failed" in summary or "error" in summary:
        ctx.rec.row("g", "failed", f"{engine}: {summary}")
    else:
        skipped = skip_reasons(proc.stdout)
        ctx.rec.row("g", "ok", f"{engine}: {summary}" + (f" ({skipped})" if skipped else ""))


def pytest_summary(stdout: str) -> str:
    lines = [ln.strip("= ") for ln in stdout.splitlines() if re.search(r"\d+ (passed|skipped|"
             r"failed|error|deselected)", ln)]  # fmt: skip
    return lines[-1] if lines else "no summary line"


def skip_reasons(stdout: str) -> str:
    reasons = {m.group(1).strip() for m in re.finditer(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", stdout)}
    return "; ".join(sorted(reasons))[:200]


STEP_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "model": step_model,
    "hf": step_hf,
    "exl2": step_exl2,
    "two_slots": step_two_slots,
    "exl3": step_exl3,
    "gpu_tests_v2": lambda ctx: gpu_tests(ctx, "exllamav2"),
    "gpu_tests_v3": lambda ctx: gpu_tests(ctx, "exllamav3"),
}


def failure_reason(exc: BaseException) -> str:
    """One line for the table: the exception's, or, where that only introduces a log
    (a daemon that exited early), the log's line that says why."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    head = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if len(lines) > 1 and lines[0].endswith(":"):
        head += " " + refusal("\n".join(lines[1:]))
    return head[:300]


def run_step(name: str, plan: Plan, deadline: float) -> int:
    rec = Record(Path(plan.workdir) / "steps" / f"{name}.json")
    ctx = Ctx(plan, rec, deadline)
    try:
        STEP_FUNCS[name](ctx)
    except StepSkipped as exc:
        rec.set(status="failed", reason=str(exc))
    except Exception as exc:  # any failure: the reason in the table, the trace in the log
        traceback.print_exc()
        rec.set(status="failed", reason=failure_reason(exc))
    if rec.doc["status"] == "running":
        rec.set(status="ok")
    return 0
