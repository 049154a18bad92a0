"""Phase 1, the corpus: documents from pydoc topics and from stdlib and dependency docstrings (read with `ast`,
never imported), the hash-based train/calibration/held-out split, and the texts the model and tokenizer see."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant that answers questions about Python and its libraries."
# Installed distributions whose docstrings join the corpus: (import name, distribution name, char cap).
DEPENDENCIES = [
    ("transformers", "transformers", 4_500_000),
    ("torch", "torch", 3_500_000),
    ("huggingface_hub", "huggingface_hub", 800_000),
    ("safetensors", "safetensors", 200_000),
    ("tokenizers", "tokenizers", 200_000),
    ("accelerate", "accelerate", 600_000),
    ("typer", "typer", 300_000),
    ("click", "click", 400_000),
    ("rich", "rich", 600_000),
    ("yaml", "PyYAML", 200_000),
    ("jinja2", "Jinja2", 400_000),
    ("markupsafe", "MarkupSafe", 100_000),
    ("numpy", "numpy", 2_500_000),
    ("matplotlib", "matplotlib", 2_000_000),
    ("psutil", "psutil", 300_000),
    ("packaging", "packaging", 200_000),
    ("filelock", "filelock", 100_000),
    ("fsspec", "fsspec", 600_000),
    ("tqdm", "tqdm", 200_000),
    ("requests", "requests", 200_000),
    ("httpx", "httpx", 300_000),
    ("sympy", "sympy", 1_500_000),
    ("networkx", "networkx", 1_500_000),
]
SKIP_DIRS = {"test", "tests", "testing", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip",
             "tkinter", "benchmarks", "_vendor", "vendored"}


@dataclass
class Document:
    """One module or pydoc topic: plain text plus question/answer pairs drawn from it."""

    key: str
    source: str
    text: str
    qa: list[tuple[str, str]] = field(default_factory=list)


def clean(doc: str) -> str:
    return "\n".join(line.rstrip() for line in doc.strip().splitlines()).strip()


def first_paragraphs(doc: str, limit: int = 700) -> str:
    """Leading paragraphs of a docstring, up to about `limit` characters: the answer to 'what does X do?'."""
    out, size = [], 0
    for para in doc.split("\n\n"):
        if out and size + len(para) > limit:
            break
        out.append(para)
        size += len(para)
    return "\n\n".join(out)[: 2 * limit]


def python_files(base: Path, prefix: str) -> list[tuple[Path, str]]:
    """(path, dotted module name) of every .py file under `base`, sorted, skipping tests and private dirs."""
    out = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                rel = Path(root, name).relative_to(base).with_suffix("")
                mod = ".".join([prefix, *rel.parts]) if prefix else ".".join(rel.parts)
                out.append((Path(root, name), mod.removesuffix(".__init__")))
    return out


def module_document(path: Path, module: str, source: str, seen: set[str]) -> Document | None:
    """The public docstrings of one source file as a document; docstrings already in `seen` are skipped."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, RecursionError):
        return None

    def fresh(doc: str | None) -> str | None:
        if not doc or len(doc) < 40:
            return None
        doc = clean(doc)
        digest = hashlib.sha1(doc.encode()).hexdigest()
        if digest in seen:
            return None
        seen.add(digest)
        return doc

    parts: list[str] = []
    qa: list[tuple[str, str]] = []
    if doc := fresh(ast.get_docstring(tree)):
        parts.append(f"Module {module}\n\n{doc}")
        qa.append((f"What does the {module} module do?", first_paragraphs(doc)))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        name = f"{module}.{node.name}"
        if doc := fresh(ast.get_docstring(node)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            parts.append(f"{kind} {name}\n\n{doc}")
            qa.append((f"What does {name} do?", first_paragraphs(doc)))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    if sdoc := fresh(ast.get_docstring(sub)):
                        parts.append(f"method {name}.{sub.name}\n\n{sdoc}")
                        qa.append((f"What does {name}.{sub.name} do?", first_paragraphs(sdoc)))
    if not parts:
        return None
    return Document(key=f"{source}:{module}", source=source, text="\n\n".join(parts), qa=qa)


def pydoc_documents(seen: set[str]) -> list[Document]:
    import pydoc_data.topics as topics  # a data dict of the reference manual, safe to import

    docs = []
    for name in sorted(topics.topics):
        text = clean(topics.topics[name])
        digest = hashlib.sha1(text.encode()).hexdigest()
        if len(text) < 80 or digest in seen:
            continue
        seen.add(digest)
        title = name.replace("-", " ")
        docs.append(Document(key=f"pydoc:{name}", source="pydoc_data", text=text,
                             qa=[(f"Explain {title} in Python.", first_paragraphs(text)),
                                 (f"What is {title}?", first_paragraphs(text, 400))]))
    return docs


def package_documents(base: Path, prefix: str, source: str, cap: int, seen: set[str]) -> list[Document]:
    """Documents of one package, at most about `cap` characters, files taken in hash order so a capped
    package is a spread sample (not just its alphabetically first sub-packages)."""
    files = sorted(python_files(base, prefix), key=lambda pm: hashlib.sha1(pm[1].encode()).hexdigest())
    docs, used = [], 0
    for path, module in files:
        if used >= cap:
            break
        if (doc := module_document(path, module, source, seen)) is not None:
            docs.append(doc)
            used += len(doc.text)
    return sorted(docs, key=lambda d: d.key)


def build_corpus(scale: float, only: set[str] | None = None) -> tuple[list[Document], dict[str, str]]:
    """All documents in a deterministic order, and the versions of the sources they came from. `only`: the
    distributions to read (another model's sources, so that a package installed since does not change
    the corpus)."""
    seen: set[str] = set()
    versions = {"python": sys.version.split()[0]}
    docs = pydoc_documents(seen)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += package_documents(stdlib, "", "stdlib", int(6_000_000 * scale), seen)
    site = Path(sysconfig.get_paths()["purelib"])
    for module, dist, cap in DEPENDENCIES:
        base = site / module
        if not base.is_dir() or (only is not None and dist not in only):
            continue
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
        docs += package_documents(base, module, dist, int(cap * scale), seen)
    return docs, versions


def split_of(key: str) -> str:
    """Split by document: 90 % train, 5 % calibration, 5 % held-out, from a hash of the document key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 20
    return "calibration" if bucket == 0 else "heldout" if bucket == 1 else "train"


def render_chat(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """`training.tokenizer.CHAT_TEMPLATE` in Python (checked against the jinja one in `check_tokenizer`), for speed."""
    out = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return out + ("<|assistant|>\n" if generation_prompt else "")


def training_texts(docs: list[Document], seed: int) -> list[str]:
    """Plain documents wrapped in <s>…</s> plus their QA pairs as chats (a quarter with a system turn)."""
    rng = random.Random(seed)
    texts = []
    for doc in docs:
        texts.append(f"<s>{doc.text}</s>")
        for question, answer in doc.qa:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.25:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            texts.append(render_chat(messages))
    rng.shuffle(texts)
    return texts


def plain_text(docs: list[Document], limit: int) -> str:
    """Documents separated by blank lines, whole documents only, at most `limit` bytes."""
    out, size = [], 0
    for doc in docs:
        n = len(doc.text.encode()) + 2
        if size + n > limit:
            continue
        out.append(doc.text)
        size += n
    return "\n\n".join(out) + "\n"
