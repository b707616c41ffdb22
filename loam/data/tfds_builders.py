"""tensorflow-datasets builders for the five loam domains: corpus files -> versioned tfds datasets.

One ``GeneratorBasedBuilder`` per domain (``loam_literature``, ``loam_dialogue``, ...). They only
read local corpus files (``corpora.corpus_path``), never the network, so ``download_and_prepare``
works offline. Each example is one document with its id, its index in the corpus file and its
domain id; the train/validation split is ``corpora.is_validation(doc_id)``, a hash of the id.

    python -m loam.data.tfds_builders [--data_dir DIR] [--corpus_dir DIR] [domain ...]

builds them (into $LOAM_TFDS_DIR, else ~/tensorflow_datasets). The corpus file's SHA-256 is
recorded in the dataset's metadata so a dataset built from a different corpus is detected.

These datasets are an export of the bundled corpora for tfds users. Any prepared tfds dataset
(these, c4 on a bucket, a local one) is read as a source with ``tfds:<name>`` (see
``loam.data.sources.tfds``): ``{"source": "tfds:loam_code", "data_dir": DIR, "id_field":
"doc_id"}`` gives the code corpus' training documents back.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import types
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from loam import cli
from loam.data import corpora

VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "Documents of the corpus file as text, doc_id, doc_index, domain_id."}


def default_tfds_dir() -> Path:
    """Where loam's tfds datasets live: $LOAM_TFDS_DIR, else tfds' own default directory."""
    env = os.environ.get("LOAM_TFDS_DIR")
    return Path(env).expanduser() if env else Path("~/tensorflow_datasets").expanduser()


@functools.cache
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # cache key only: re-hash when the file changes
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path), st.st_mtime_ns, st.st_size)


class _LoamDomainBuilder(tfds.core.GeneratorBasedBuilder,  # type: ignore[call-arg]
                         skip_registration=True):
    """A corpus file of one domain as a tfds dataset. Subclasses set DOMAIN."""

    DOMAIN: str = ""
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = RELEASE_NOTES
    pkg_dir_path = epath.Path(__file__).parent  # tfds' own lookup fails under `python -m`

    def __init__(self, *, corpus_dir: str | os.PathLike | None = None, **kwargs):
        # Resolved at construction so a later change of $LOAM_DATA_DIR cannot mix corpora.
        self._corpus_path = corpora.corpus_path(self.DOMAIN, corpus_dir)
        super().__init__(**kwargs)

    # tfds 4.9.x resolves this through the `importlib_resources` backport, which Python >= 3.9
    # installs lack; the file of this module is the answer anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    @property
    def corpus_path(self) -> Path:
        return self._corpus_path

    @property
    def domain_id(self) -> int:
        return corpora.DOMAIN_NAMES.index(self.DOMAIN)

    def _info(self) -> tfds.core.DatasetInfo:
        domain = corpora.DOMAINS[self.domain_id]
        sha = corpus_sha256(self._corpus_path) if self._corpus_path.exists() else ""
        return self.dataset_info_from_configs(
            description=(f"loam '{domain.name}' domain: {domain.source}. One example is "
                         f"{domain.unit}. Licence: {domain.licence}."),
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "doc_id": tfds.features.Text(),
                "doc_index": tfds.features.Scalar(dtype=np.int64),
                "domain_id": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(corpus_sha256=sha, domain=domain.name),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        # Read once, fail early (CorpusError names the file and the fix).
        docs = list(corpora.read_documents(self._corpus_path))
        if not docs:
            raise corpora.CorpusError(
                f"corpus file {self._corpus_path} holds no documents; rebuild it with "
                "`python -m loam.data.build`")
        return {
            "train": self._generate_examples(docs, validation=False),
            "validation": self._generate_examples(docs, validation=True),
        }

    def _generate_examples(self, docs, validation: bool):
        for index, (doc_id, text) in enumerate(docs):
            if corpora.is_validation(doc_id) == validation:
                yield index, {"text": text, "doc_id": doc_id, "doc_index": index,
                              "domain_id": self.domain_id}


def _class_name(domain: str) -> str:
    return "Loam" + "".join(part.capitalize() for part in domain.split("_"))


def _class_body(domain: str):
    def fill(ns: dict) -> None:
        ns.update(DOMAIN=domain, __module__=__name__,
                  __doc__=f"The '{domain}' corpus as a tfds dataset.")
    return fill


# One registered builder class per domain: LoamLiterature -> "loam_literature", ...
BUILDERS: dict[str, type[_LoamDomainBuilder]] = {}
for _domain in corpora.DOMAIN_NAMES:
    # Under `python -m` this file also runs as __main__; only the importable module registers.
    _cls = types.new_class(
        _class_name(_domain), (_LoamDomainBuilder,),
        {"skip_registration": __name__ == "__main__"}, _class_body(_domain))
    globals()[_cls.__name__] = _cls
    BUILDERS[_domain] = _cls
del _domain, _cls


def tfds_name(domain: str) -> str:
    return builder_class(domain).name


def builder_class(domain: str) -> type[_LoamDomainBuilder]:
    if domain not in BUILDERS:
        raise ValueError(f"unknown domain {domain!r}; loam's domains are {list(BUILDERS)}")
    return BUILDERS[domain]


def get_builder(domain: str, data_dir=None, corpus_dir=None) -> _LoamDomainBuilder:
    """The builder of `domain` over tfds dir `data_dir` (default ``default_tfds_dir()``)."""
    return builder_class(domain)(data_dir=str(data_dir or default_tfds_dir()),
                                 corpus_dir=corpus_dir)


def check_prepared(builder: _LoamDomainBuilder) -> None:
    """Raises if the prepared dataset was built from a different corpus file than the current."""
    stored = builder.info.metadata.get("corpus_sha256") if builder.info.metadata else None
    if builder.corpus_path.exists() and stored and stored != corpus_sha256(builder.corpus_path):
        raise ValueError(
            f"tfds dataset {builder.name}:{builder.version} in {builder.data_dir} was built from a "
            f"different corpus than {builder.corpus_path}; rebuild it into another directory with "
            f"`python -m loam.data.tfds_builders --data_dir NEW_DIR {builder.DOMAIN}` and set "
            "LOAM_TFDS_DIR=NEW_DIR (or delete the old dataset directory)")


def build_domain(domain: str, data_dir=None, corpus_dir=None) -> _LoamDomainBuilder:
    """Prepares the tfds dataset of `domain` (no-op if already prepared) and returns its builder."""
    builder = get_builder(domain, data_dir, corpus_dir)
    if builder.is_prepared():
        check_prepared(builder)
    else:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def main(argv=None):
    p = argparse.ArgumentParser(description="Build loam's tfds datasets from the corpus files.")
    p.add_argument("domains", nargs="*", default=list(corpora.DOMAIN_NAMES))
    p.add_argument("--data_dir", default=None, help="tfds data dir (default $LOAM_TFDS_DIR or "
                   "~/tensorflow_datasets)")
    p.add_argument("--corpus_dir", default=None, help="corpora (default $LOAM_DATA_DIR or bundled)")
    args = p.parse_args(argv)
    from loam.data import tfds_builders  # noqa: PLC0415 — the registered classes, not __main__'s
    for domain in args.domains:
        with cli.user_errors():  # includes CorpusError: one message, non-zero exit
            b = tfds_builders.build_domain(domain, args.data_dir, args.corpus_dir)
        sizes = {s: b.info.splits[s].num_examples for s in ("train", "validation")}
        print(f"{b.name}:{b.version} {sizes} -> {b.data_path}")


if __name__ == "__main__":
    main()
