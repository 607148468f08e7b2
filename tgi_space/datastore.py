"""A self-drafted datastore: the model's own greedy continuations of corpus prompts, where suffix drafts
are also looked up (`tgi-space datastore`; docs/speculation.md).

Suffix drafts from the request's own text find nothing where that text does not repeat itself. A
model's greedy continuations of code it has seen repeat its own habits (the same idioms, the same
docstring and loop shapes), and greedy verification accepts exactly the model's habits: so the
model's outputs on corpus prompts are drafts that verification tends to accept. Built once per
checkpoint, read-only while serving: one request's speed never depends on another's text (unlike
the opt-in shared cache of recent outputs), and outputs never depend on it at all (drafts are only
candidates; verification decides).

Files, in the model folder (or anywhere, `--datastore PATH`): `datastore.npy`, int32 token ids, each
output followed by -1; `datastore.json`, how it was built. config.json's `space_datastore` names the
.npy, relative to the model folder, and the engine loads it when suffix drafts are on.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from tgi_space.drafters import SEPARATOR, SuffixIndex

log = logging.getLogger(__name__)

FILE = "datastore.npy"
MANIFEST = "datastore.json"
END = -1  # ends each output in the .npy file
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
PROMPT_KINDS = ("function-heads", "windows")
# A function head: its `def` line and, if it has one, its docstring (what a code model is asked to complete).
_HEAD = re.compile(r'^[ \t]*(?:async[ \t]+)?def [^\n]*:[ \t]*\n(?:[ \t]+(?:"""|\'\'\')(?:.|\n)*?(?:"""|\'\'\')[ \t]*\n)?',
                   re.MULTILINE)


class DatastoreError(ValueError):
    """A datastore that cannot serve this model (the message names the file or setting)."""


def stdlib_dir() -> Path:
    """The running interpreter's standard library (the default corpus: present on every machine)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(paths: list[Path]) -> list[Path]:
    """Python files under `paths`, sorted, without test suites and installed packages (SKIPPED_DIRS)."""
    files = []
    for path in paths:
        found = [path] if path.is_file() else path.rglob("*.py")
        files += [f for f in found if not SKIPPED_DIRS & set(f.relative_to(path).parts[:-1] if path.is_dir() else ())]
    return sorted(set(files))


def function_heads(text: str, context_chars: int) -> list[str]:
    """Every function head of `text` (`def` line and docstring) with up to `context_chars` characters before it."""
    return [text[max(0, m.start() - context_chars) : m.end()] for m in _HEAD.finditer(text)]


def windows(text: str, length: int, rng: random.Random) -> list[str]:
    """One window of `length` characters cut at a random line start of `text` (none if it is shorter)."""
    if len(text) <= length:
        return []
    start = rng.choice([0] + [m.end() for m in re.finditer("\n", text[: len(text) - length])])
    return [text[start : start + length]]


def corpus_prompts(paths: list[Path], count: int, kind: str, context_chars: int, seed: int) -> list[str]:
    """`count` prompts drawn (seeded) from the files under `paths`: function heads or text windows."""
    if kind not in PROMPT_KINDS:
        raise DatastoreError(f"prompts: unknown {kind!r}; allowed: {', '.join(PROMPT_KINDS)}")
    rng = random.Random(seed)
    prompts = []
    for f in source_files(paths):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        prompts += function_heads(text, context_chars) if kind == "function-heads" else windows(text, context_chars, rng)
    if not prompts:
        raise DatastoreError(f"source: no {kind} found in Python files under {', '.join(map(str, paths))}")
    rng.shuffle(prompts)
    return prompts[:count]


def generate(llm, prompts: list[str], new_tokens: int, batch_size: int, max_tokens: int) -> np.ndarray:
    """The model's greedy continuations of `prompts` (batched), each followed by END, until `max_tokens`;
    prompts too long for the context with `new_tokens` after them are left out."""
    from tgi_space.sampling import SamplingParams

    limit = llm.engine.model_config.max_model_len - new_tokens
    prompts = [ids for ids in map(llm.tokenizer.encode, prompts) if len(ids) <= limit]  # the rest do not fit
    params, out, held, t0 = SamplingParams(max_new_tokens=new_tokens), [], 0, time.time()
    for i in range(0, len(prompts), batch_size):
        for result in llm.generate(prompts[i : i + batch_size], params, speculate="none"):
            out += [*result.token_ids, END]
            held += len(result.token_ids) + 1
        log.info("%d/%d prompts, %d tokens, %.0f tokens/s", min(i + batch_size, len(prompts)), len(prompts), held,
                 held / (time.time() - t0))
        if held >= max_tokens:
            break
    return np.asarray(out, dtype=np.int32)


def save(folder: Path, tokens: np.ndarray, manifest: dict) -> Path:
    """Write FILE and MANIFEST into `folder`; returns the .npy path."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / FILE, tokens.astype(np.int32))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder / FILE


def register_in_config(model_dir: Path, npy: Path) -> None:
    """Name `npy` in the model's config.json (`space_datastore`, relative to the model folder when inside it)."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    try:
        config["space_datastore"] = str(npy.resolve().relative_to(model_dir.resolve()))
    except ValueError:
        config["space_datastore"] = str(npy.resolve())
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def datastore_path(model_dir: str | Path, explicit: str | None, configured: str | None) -> Path | None:
    """The datastore to load: `explicit` ("none": none), else config.json's `space_datastore` (relative to the
    model folder), else none."""
    if explicit == "none":
        return None
    if explicit:
        path, field = Path(explicit), "datastore"
    elif configured:
        path, field = Path(model_dir) / configured, "config.json space_datastore"
    else:
        return None
    if not path.is_file():
        raise DatastoreError(f"{field}: no such file {path}")
    return path


def load(path: Path, vocab_size: int) -> np.ndarray:
    """The datastore's token ids (END between outputs), checked against the model's vocabulary."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DatastoreError(f"datastore {path}: not a .npy array ({err})") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DatastoreError(f"datastore {path}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    bad = tokens[(tokens != END) & ((tokens < 0) | (tokens >= vocab_size))]
    if bad.size:
        raise DatastoreError(f"datastore {path}: token id {int(bad[0])} is outside the model's vocabulary "
                             f"(vocab_size {vocab_size}): built for another tokenizer? Rebuild it: tgi-space datastore")
    return tokens


def index_of(tokens: np.ndarray, max_n: int) -> SuffixIndex:
    """A SuffixIndex over the datastore (END becomes the index's SEPARATOR: no match runs across outputs)."""
    ids = tokens.astype(np.int64)
    ids[ids == END] = SEPARATOR
    index = SuffixIndex(max_n)
    index.extend(ids.tolist())
    return index


def manifest(model: str, kind: str, sources: list[Path], tokens: np.ndarray, new_tokens: int, context_chars: int,
             seed: int) -> dict:
    """How a datastore was built (MANIFEST)."""
    stdlib = stdlib_dir().resolve()
    return {
        "model": Path(model).name, "prompts": kind, "context_chars": context_chars, "new_tokens": new_tokens,
        "seed": seed, "tokens": int((tokens != END).sum()), "outputs": int((tokens == END).sum()),
        "sources": ["python-stdlib" if s.resolve() == stdlib else s.name for s in sources],
        "python": ".".join(map(str, sys.version_info[:3])), "greedy": True,
    }


def build(
    model: str,
    source: list[str] | None = None,
    prompts_kind: str = "function-heads",
    num_tokens: int = 200_000,
    new_tokens: int = 128,
    context_chars: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    out: str | None = None,
    register: bool = True,
    dtype: str = "auto",
) -> Path:
    """Build a model's datastore (see `datastore_command`); returns the .npy path."""
    from tgi_space.llm import LLM

    sources = [Path(s) for s in source] if source else [stdlib_dir()]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise DatastoreError(f"source: no such file or folder {', '.join(missing)}")
    llm = LLM(model, dtype=dtype, datastore="none")
    prompts = corpus_prompts(sources, max(1, 2 * num_tokens // max(1, new_tokens)), prompts_kind, context_chars, seed)
    tokens = generate(llm, prompts, new_tokens, batch_size, num_tokens)
    folder = Path(out) if out else Path(model)
    npy = save(folder, tokens, manifest(model, prompts_kind, sources, tokens, new_tokens, context_chars, seed))
    if register:
        register_in_config(Path(model), npy)
    return npy


def register_command(app) -> None:
    """Add the `datastore` command to the tgi-space CLI."""
    import typer

    def datastore_command(
        model: str = typer.Option(..., "--model", help="model folder whose greedy outputs fill the datastore"),
        source: list[str] = typer.Option(None, "--source", help="Python files or folders to draw prompts from "
                                         "(repeatable; default: the interpreter's standard library, tests left out)"),
        prompts_kind: str = typer.Option("function-heads", "--prompts", help="function-heads | windows"),
        num_tokens: int = typer.Option(200_000, "--tokens", min=1, help="tokens to generate (the datastore's size)"),
        new_tokens: int = typer.Option(128, "--new-tokens", min=1, help="tokens per continuation at most"),
        context_chars: int = typer.Option(200, "--context-chars", min=1,
                                          help="characters before a function head (windows: a window's length)"),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        seed: int = typer.Option(0, "--seed"),
        out: str = typer.Option(None, "--out", help="folder for datastore.npy / .json (default: the model folder)"),
        register: bool = typer.Option(True, "--register/--no-register",
                                      help="name it in the model's config.json (space_datastore)"),
        dtype: str = typer.Option("auto", "--dtype"),
    ) -> None:
        """Build the model's self-drafted datastore: its own greedy continuations of corpus prompts, where suffix
        drafts are also looked up (lossless: drafts are only candidates)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        try:
            npy = build(model, source, prompts_kind, num_tokens, new_tokens, context_chars, batch_size, seed, out,
                        register, dtype)
        except DatastoreError as err:
            raise typer.BadParameter(str(err)) from None
        typer.echo(f"datastore written to {npy}" + (" (config.json space_datastore)" if register else ""))

    app.command("datastore")(datastore_command)
