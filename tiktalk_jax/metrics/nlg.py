"""Generation metrics under the TikTalk paper's protocol (paper section 4.1).

BLEU-2/4, METEOR, ROUGE-L and CIDEr come from the COCO caption scorers (`pycocoevalcap`, what
Maluuba/nlg-eval wraps); nothing here reimplements them. What this module adds is the protocol
around them:

* Chinese is pre-tokenized, because the scorers split on spaces: "char" (every non-space
  character is a token; the deterministic default), "jieba" (word segmentation) or "space"
  (the text is already tokenized).
* Each val/test example has K references (5 in TikTalk). The scorers run K times, run k with only
  the k-th reference of every example, and the K results are averaged. So BLEU stays corpus-level
  within a run and CIDEr's IDF comes from one reference set at a time, as in the paper.
* Dist-n is corpus-level: distinct n-grams / all n-grams over every hypothesis.

All numbers are returned x100, like the paper's tables. `scores_metadata` records what must match
for two numbers to be comparable (segmenter and version, scorer versions, aggregation).

METEOR runs pycocoevalcap's `meteor-1.5.jar` in a Java subprocess. `_Meteor` below wraps the
pycocoevalcap class to make that robust: an English JVM locale (under e.g. a German locale the jar
parses its own "3.0" statistics with `Scanner.nextDouble`, fails, and the stock wrapper then blocks
forever in `__del__` on a lock it never released), sanitized input lines (a newline or a '|||'
inside a reference breaks the line protocol: '|||' silently splits one reference into several),
a watchdog, and an error that says how to install Java when there is none.

Observed behaviour worth knowing: with pycocoevalcap's `-norm` flag the jar's own normalizer splits
CJK text into single characters, so METEOR is character-level whatever `tokenize` is ("我爱你"
against "我 爱 你" scores 1.0); only BLEU, ROUGE-L, CIDEr and Dist-n depend on the segmentation.
The jar reads its stdin as UTF-8 regardless of the locale, so Chinese needs no extra encoding care.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _pycoco_meteor
from pycocoevalcap.rouge.rouge import Rouge

TOKENIZE_MODES = ("char", "jieba", "space")
METRIC_KEYS = ("bleu2", "bleu4", "meteor", "rouge_l", "cider", "dist2", "dist3")
AGGREGATION = "per-reference average over K"

JAVA_INSTALL_HINT = (
    "install a Java runtime, e.g. `apt-get install default-jre-headless` (Debian/Ubuntu) or "
    "`conda install -c conda-forge openjdk`, or set JAVA_HOME; or pass skip_meteor=True to "
    "report METEOR as skipped"
)

# The JVM must read and print numbers the English way (see module docstring). Command-line -D
# options win over JAVA_TOOL_OPTIONS; _JAVA_OPTIONS would win over them, so it is dropped.
_JVM_LOCALE_FLAGS = ("-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8")
_METEOR_ARGS = ("-", "-", "-stdio", "-l", "en", "-norm")  # exactly pycocoevalcap's arguments
_METEOR_TIMEOUT_S = 600.0


class JavaNotFoundError(RuntimeError):
    """No `java` executable: METEOR cannot run."""


class MeteorError(RuntimeError):
    """The METEOR subprocess died or stopped answering."""


# --------------------------------------------------------------------------------------------
# Tokenization.


def _clean(text: str) -> str:
    # Control and format characters (newline, tab, zero-width space, BOM...) become separators:
    # they are never content, and a newline would break METEOR's one-line-per-segment protocol.
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)


@functools.cache
def _jieba_tokenizer():
    import jieba  # Imported lazily: loading its dictionary takes about a second.

    # A private Tokenizer, so user words added to jieba's global instance elsewhere cannot change
    # the segmentation (and hence the scores).
    tokenizer = jieba.Tokenizer()
    logger = logging.getLogger("jieba")
    level = logger.level
    logger.setLevel(logging.WARNING)  # Silence "Building prefix dict ..." chatter.
    try:
        tokenizer.initialize()
    finally:
        logger.setLevel(level)
    return tokenizer


def tokenize_text(text: str, tokenize: str = "char") -> list[str]:
    """Splits one utterance into the tokens every scorer sees.

    Args:
      text: the raw utterance.
      tokenize: "char" (each non-whitespace character is a token), "jieba" (jieba word
        segmentation, default dictionary, HMM on) or "space" (split on whitespace).

    Returns:
      The tokens; never contains whitespace or control characters, may be empty.
    """
    text = _clean(text)
    if tokenize == "char":
        return [c for c in text if not c.isspace()]
    if tokenize == "space":
        return text.split()
    if tokenize == "jieba":
        return [t for t in _jieba_tokenizer().lcut(text, HMM=True) if t.strip()]
    raise ValueError(f"tokenize must be one of {TOKENIZE_MODES}, got {tokenize!r}")


def distinct_n(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Corpus-level Dist-n in [0, 1]: distinct n-grams / total n-grams over all hypotheses.

    n-grams never cross hypothesis boundaries. 0.0 when no hypothesis has n tokens.
    """
    total = 0
    distinct = set()
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


# --------------------------------------------------------------------------------------------
# METEOR.


def find_java() -> str:
    """Path of the `java` executable: PATH first, then $JAVA_HOME/bin/java.

    Raises:
      JavaNotFoundError: with a message naming the fix.
    """
    java = shutil.which("java")
    if java:
        return java
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = os.path.join(java_home, "bin", "java")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise JavaNotFoundError(
        "METEOR needs a Java runtime (pycocoevalcap runs meteor-1.5.jar) but no `java` was found "
        f"on PATH or in $JAVA_HOME/bin. Fix: {JAVA_INSTALL_HINT}."
    )


@functools.cache
def java_version(java: str) -> str:
    """First line of `java -version` (which prints to stderr), e.g. 'openjdk version "17..."'."""
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else "unknown"


def _meteor_safe(text: str) -> str:
    # One segment per line and ' ||| ' between fields: no line breaks, no '|||' (pycocoevalcap
    # strips it from hypotheses only; a reference keeping it would be split in two).
    return " ".join(_clean(text).replace("|||", " ").split())


class _Meteor(_pycoco_meteor.Meteor):
    """pycocoevalcap's Meteor, started under an English UTF-8 JVM, with safe input and failure.

    Scoring itself (the SCORE/EVAL exchange, the corpus-level aggregate) is the parent's.
    """

    def __init__(self, java: str | None = None):
        self.java = java or find_java()
        jar_dir = os.path.dirname(os.path.abspath(_pycoco_meteor.__file__))
        self.meteor_cmd = [
            self.java,
            *_JVM_LOCALE_FLAGS,
            "-jar",
            "-Xmx2G",
            _pycoco_meteor.METEOR_JAR,
            *_METEOR_ARGS,
        ]
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        env.pop("_JAVA_OPTIONS", None)
        # stderr goes to a file, not an undrained pipe that could fill up and stall the JVM; its
        # tail is quoted when the process fails.
        self._stderr = tempfile.TemporaryFile()
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=jar_dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.meteor_p.poll() is None

    def compute_score(self, gts, res, timeout_s: float = _METEOR_TIMEOUT_S):
        """As pycocoevalcap's, on sanitized strings; kills the JVM if it exceeds timeout_s."""
        gts = {key: [_meteor_safe(r) for r in refs] for key, refs in gts.items()}
        res = {key: [_meteor_safe(h) for h in hyps] for key, hyps in res.items()}
        # A killed process closes stdout, so a blocked readline returns and the parse fails below.
        watchdog = threading.Timer(timeout_s, self.meteor_p.kill)
        watchdog.start()
        try:
            return super().compute_score(gts, res)
        except (ValueError, OSError) as e:
            # The parent leaves its lock held on failure; release it so close() cannot hang.
            if self.lock.locked():
                self.lock.release()
            self.meteor_p.kill()
            self.meteor_p.wait(timeout=30)
            stderr = self._stderr_tail()
            self.close()
            raise MeteorError(
                f"METEOR subprocess ({' '.join(self.meteor_cmd)}) failed: {e!r}; "
                f"exit code {self.meteor_p.returncode}; stderr: {stderr!r}"
            ) from e
        finally:
            watchdog.cancel()

    def _stderr_tail(self, limit: int = 2000) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def close(self):
        """Ends the JVM. Never waits on the lock, unlike the parent's __del__."""
        proc = getattr(self, "meteor_p", None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:  # Unflushed input to a dead process: nothing left to deliver.
                pass
        self._stderr.close()

    def __del__(self):
        self.close()


_meteor_instance: _Meteor | None = None
_meteor_guard = threading.Lock()


def get_meteor() -> _Meteor:
    """The process-wide METEOR scorer (the JVM takes seconds to start); restarted if it died."""
    global _meteor_instance
    with _meteor_guard:
        if _meteor_instance is None or not _meteor_instance.alive():
            _meteor_instance = _Meteor()
        return _meteor_instance


@atexit.register
def _close_meteor():
    if _meteor_instance is not None:
        _meteor_instance.close()


# --------------------------------------------------------------------------------------------
# Scores.


def _cider(gts, res) -> float:
    # pycocoevalcap's CiderScorer asserts on max() of an empty document-frequency table when no
    # reference of the run has a single token. Every similarity then involves a zero vector, which
    # its own formula scores 0, so 0 is the value it would give.
    if not any(r.split() for refs in gts.values() for r in refs):
        return 0.0
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def nlg_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: str = "char",
    skip_meteor: bool = False,
) -> dict[str, float | None]:
    """The paper's generation metrics, x100.

    Args:
      hypotheses: N generated responses.
      references: N lists of K reference responses (the same K for every example).
      tokenize: "char", "jieba" or "space" (see `tokenize_text`).
      skip_meteor: report "meteor" as None instead of running Java. Record it with
        `scores_metadata(..., skip_meteor=True)`.

    Returns:
      {"bleu2", "bleu4", "meteor", "rouge_l", "cider", "dist2", "dist3"}: floats x100. BLEU,
      METEOR, ROUGE-L and CIDEr are the mean over k of a pycocoevalcap run against the k-th
      references only; Dist-n is corpus-level over the hypotheses.

    Raises:
      JavaNotFoundError: no Java runtime and skip_meteor is False (raised before any scoring).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    ks = {len(refs) for refs in references}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"every example needs the same number K >= 1 of references, got {ks}")
    (num_refs,) = ks
    if tokenize not in TOKENIZE_MODES:
        raise ValueError(f"tokenize must be one of {TOKENIZE_MODES}, got {tokenize!r}")
    meteor = None if skip_meteor else get_meteor()

    hyp_tokens = [tokenize_text(h, tokenize) for h in hypotheses]
    ref_tokens = [[tokenize_text(r, tokenize) for r in refs] for refs in references]
    res = {i: [" ".join(tokens)] for i, tokens in enumerate(hyp_tokens)}

    sums = dict.fromkeys(("bleu2", "bleu4", "meteor", "rouge_l", "cider"), 0.0)
    for k in range(num_refs):
        gts = {i: [" ".join(refs[k])] for i, refs in enumerate(ref_tokens)}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        sums["bleu2"] += bleu[1]
        sums["bleu4"] += bleu[3]
        if meteor is not None:
            sums["meteor"] += float(meteor.compute_score(gts, res)[0])
        sums["rouge_l"] += float(Rouge().compute_score(gts, res)[0])
        sums["cider"] += _cider(gts, res)

    scores: dict[str, float | None] = {key: 100.0 * v / num_refs for key, v in sums.items()}
    if meteor is None:
        scores["meteor"] = None
    scores["dist2"] = 100.0 * distinct_n(hyp_tokens, 2)
    scores["dist3"] = 100.0 * distinct_n(hyp_tokens, 3)
    return {key: scores[key] for key in METRIC_KEYS}


def scores_metadata(tokenize: str = "char", skip_meteor: bool = False) -> dict[str, str | None]:
    """What must match for two `nlg_scores` results to be comparable; store it with the scores."""
    if tokenize == "char":
        segmenter, version = "char: every non-whitespace character is a token", None
    elif tokenize == "jieba":
        import jieba

        segmenter, version = "jieba: default dictionary, HMM=True", jieba.__version__
    elif tokenize == "space":
        segmenter, version = "space: input already tokenized, split on whitespace", None
    else:
        raise ValueError(f"tokenize must be one of {TOKENIZE_MODES}, got {tokenize!r}")
    if skip_meteor:
        meteor, java = "skipped (skip_meteor=True)", None
    else:
        try:
            java_path = find_java()
            java = java_version(java_path)
        except JavaNotFoundError:
            java = "not found"
        meteor = f"pycocoevalcap meteor-1.5.jar {' '.join(_METEOR_ARGS)}, JVM locale en_US UTF-8"
    return {
        "tokenize": tokenize,
        "segmenter": segmenter,
        "segmenter_version": version,
        "pycocoevalcap_version": importlib.metadata.version("pycocoevalcap"),
        "scorers": "Bleu(4) option=closest; Rouge-L beta=1.2; CIDEr-D n=4 sigma=6",
        "meteor": meteor,
        "java_version": java,
        "aggregation": AGGREGATION,
        "dist_n": "corpus-level distinct/total n-grams over all hypotheses",
        "scale": "x100",
    }
